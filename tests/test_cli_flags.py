"""What a new user reads back from the command line: repeated --ranker, what `config validate` checked, the
origins of eval.rankers entries, tables in a log that keep every character, one-line errors with nothing
before them."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import drpo_cli.main as cli_main
from drpo_cli.main import app
from tests.conftest import DRPO

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--generator", "tiny", "--features", "tiny-pixels", "--set", "prompts.path=prompts.txt", "--set",
         "prompts.eval_count=1"]


@pytest.fixture
def runner(monkeypatch, tmp_path) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a warm sunset\na cold lake\n")
    monkeypatch.setattr(cli_main, "console", Console(width=200, no_color=True))
    return CliRunner()


def _piped(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``drpo ARGS`` with stdout and stderr to pipes (as in a log) and no COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([DRPO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _rows(stdout: str) -> dict[str, list[str]]:
    """The rows of `config show`'s table: key -> [value, origin] (its columns are 2 or more spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()[1:]]
    return {row[0]: row[1:] for row in rows if len(row) == 3}


def test_a_repeated_ranker_gives_several_rankers_in_order(runner, isolated_registry):
    result = runner.invoke(app, ["config", "show", *FLAGS, "--ranker", "tiny-brightness", "--ranker", "tiny-broken"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert rows["rankers.0.name"] == ['"tiny-brightness"', "--ranker"]
    assert rows["rankers.1.name"] == ['"tiny-broken"', "--ranker"]
    assert "rankers.2.name" not in rows
    shown = runner.invoke(app, ["config", "show", *FLAGS, "--ranker", "tiny-broken", "--ranker", "tiny-brightness",
                                "--no-origins"])
    assert [r["name"] for r in yaml.safe_load(shown.stdout)["rankers"]] == ["tiny-broken", "tiny-brightness"]
    for command in (["train"], ["config", "show"], ["config", "validate"]):
        help_text = " ".join(runner.invoke(app, [*command, "--help"]).stdout.replace("│", " ").split())
        assert "Ranker NAME[:VARIANT], repeatable" in help_text, command


@pytest.mark.parametrize("args, what", [
    ([*FLAGS, "--ranker", "tiny-brightness"], "the run given by the flags"),
    ([*FLAGS, "--ranker", "tiny-brightness", "--ranker", "tiny-broken"], "the run given by the flags"),
    (["--set", "train.steps=2"], "the embedded default recipe with the flags"),
    ([], "the embedded default recipe"),
])
def test_config_validate_says_what_it_validated(runner, request, args, what):
    if "tiny" in args:  # the fakes; the embedded default needs the built-in shapes world
        request.getfixturevalue("isolated_registry")
    result = runner.invoke(app, ["config", "validate", *args], catch_exceptions=False)
    assert (result.exit_code, result.stdout) == (0, f"{what}: valid\n"), result.stderr


def test_a_run_without_training_prompts_names_where_prompts_path_came_from(runner, isolated_registry):
    result = runner.invoke(app, ["config", "validate", "--generator", "tiny", "--features", "tiny-pixels",
                                 "--ranker", "tiny-brightness"])
    assert result.exit_code == 2
    assert result.stderr == ("Error: prompts.path: an online run needs training prompts: set prompts.path in a recipe "
                             "or --set prompts.path=FILE (prompts.path from default)\n")
    chosen = runner.invoke(app, ["config", "validate", "--generator", "tiny", "--features", "tiny-pixels",
                                 "--ranker", "tiny-brightness", "--set", "source.kind=online"])
    assert chosen.stderr.endswith("(prompts.path from default, source.kind from --set)\n")


def test_config_show_in_a_log_keeps_every_key_value_and_origin_and_eval_rankers_their_origin():
    recipe = "configs/sd-turbo-pickscore.yaml"
    shown = _piped("config", "show", "-c", recipe)
    assert shown.returncode == 0, shown.stderr
    assert "…" not in shown.stdout
    rows = _rows(shown.stdout)
    assert "train.gradient_checkpointing" in rows
    assert [rows[f"eval.rankers.{i}.name"] for i in range(3)] == [['"clip"', recipe], ['"aesthetic"', recipe],
                                                                  ['"hpsv2"', recipe]]
    assert rows["eval.rankers.0.weight"] == ["1.0", "default"]
    overridden = _rows(_piped("config", "show", "-c", recipe, "--set", "eval.rankers=[aesthetic, clip]").stdout)
    assert [overridden[f"eval.rankers.{i}.name"] for i in range(2)] == [['"aesthetic"', "--set"], ['"clip"', "--set"]]
    assert "eval.rankers.2.name" not in overridden


def test_eval_errors_in_a_log_are_the_one_line_alone(tmp_path):
    (tmp_path / "p.txt").write_text("two red circles\n")
    result = _piped("eval", "--generator", "shapes", "--prompts", "p.txt", "--ranker", "nope", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "Error: unknown ranker 'nope': run `drpo list-plugins` to see the installed ones\n"


def test_validate_notes_a_run_without_a_checkpoint_without_offering_resume(runner, isolated_registry):
    Path("run").mkdir()
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        Path("run", name).write_text("{}\n")
    result = runner.invoke(app, ["config", "validate", *FLAGS, "--ranker", "tiny-brightness", "--output-dir", "run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "the run given by the flags: valid",
        "note: `drpo train` would not start a new run there: run already holds a run that wrote no checkpoint "
        "(config.yaml, run.json, metrics.jsonl): there is nothing to resume; if it is not running any more, delete "
        "those files, or choose another --output-dir"]
