"""The ``drpo`` command line: list-plugins, config show/validate, train --dry-run, one-line errors."""

import json
import subprocess
import textwrap
import types
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import drpo_cli.main as cli_main
from drpo_cli.main import app
from drpo_core import hookimpl
from drpo_core.errors import ConfigError
from tests.conftest import DRPO

RECIPE = """\
seed: 3
generator: {name: tiny, size: 8}
rankers:
  - {name: tiny-brightness, weight: 2}
features: tiny-pixels
kernel: laplacian
selection: {candidates: 4, positives: 1, negatives: 1}
prompts: {path: prompts.txt, eval_count: 1}
train: {steps: 2, lr: 3e-4, device: cpu}
eval: {seeds: [0], grid_prompts: 0}
log: {progress: false}
"""
JSON_KEYS = {"name", "module", "distribution", "version", "builtin", "state", "error", "components", "summaries",
             "clashes"}


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.setattr(cli_main, "console", Console(width=200, no_color=True))
    return CliRunner()


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a warm sunset\na cold lake\na red apple\n")
    Path("recipe.yaml").write_text(RECIPE)
    return "recipe.yaml"


def broken_plugin():
    module = types.ModuleType("drpo_broken_thing")

    @hookimpl
    def drpo_register_kernels(register):
        raise ImportError("needs the 'fancy' extra")

    module.drpo_register_kernels = drpo_register_kernels
    return module


# -- list-plugins ---------------------------------------------------------------------------------------


def test_list_plugins_json(runner, isolated_registry):
    isolated_registry.register_module(broken_plugin())
    result = runner.invoke(app, ["list-plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert all(set(row) == JSON_KEYS for row in rows.values())
    assert rows["drpo_kernels"]["components"] == {"kernel": ["laplacian", "rbf", "cosine"]}
    assert rows["_FakesPlugin"]["components"] == {
        "generator": ["tiny"], "ranker": ["tiny-brightness", "tiny-broken"], "feature": ["tiny-pixels"],
        "kernel": ["tiny-laplacian"]}
    assert rows["drpo_kernels"]["state"] == "loaded" and rows["drpo_kernels"]["error"] is None
    assert rows["_FakesPlugin"]["summaries"]["generator tiny"] == "8x8 test generator"
    broken = rows["drpo_broken_thing"]
    assert (broken["state"], broken["error"], broken["components"]) == (
        "broken", "ImportError: needs the 'fancy' extra", {})


def test_list_plugins_table(runner, isolated_registry):
    isolated_registry.register_module(broken_plugin())
    result = runner.invoke(app, ["list-plugins"])
    assert result.exit_code == 0, result.output
    for header in ("plugin", "component", "summary", "distribution", "version", "state"):
        assert header in result.stdout
    lines = result.stdout.splitlines()
    kernels = next(line for line in lines if "drpo_kernels" in line)
    assert "kernel laplacian" in kernels and "the official default" in kernels and "loaded" in kernels
    assert any("broken: ImportError: needs the 'fancy' extra" in line for line in lines)
    assert any("ranker tiny-brightness" in line and "mean pixel value" in line for line in lines)


def test_list_plugins_of_the_installed_builtins(runner, monkeypatch):
    from drpo_core import registry as registry_module

    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "")
    monkeypatch.setattr(registry_module, "_default", registry_module.Registry().load_entry_points())
    rows = json.loads(runner.invoke(app, ["list-plugins", "--json"]).stdout)
    builtins = {row["name"]: row for row in rows if row["builtin"]}
    assert {"kernels", "latent", "mae", "image-rankers", "shapes", "diffusers"} <= set(builtins)
    assert all(row["distribution"] == "drpo" and row["state"] == "loaded" for row in builtins.values())
    assert builtins["diffusers"]["components"]["generator"] == ["sd-turbo", "sdxl-turbo"]


# -- config show / validate -------------------------------------------------------------------------------


def test_config_show_prints_values_with_origins(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["config", "show", "--config", recipe, "--kernel", "rbf",
                                 "--set", "train.steps=9", "--output-dir", "runs/a"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    assert rows["train.lr"] == ["0.0003", recipe]
    assert rows["train.steps"] == ["9", "--set"]
    assert rows["kernel.name"] == ['"rbf"', "--kernel"]
    assert rows["output_dir"] == ['"runs/a"', "--output-dir"]
    assert rows["train.eps"] == ["1e-08", "default"]


def test_config_show_without_origins_prints_yaml(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["config", "show", "--config", recipe, "--no-origins"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["train"]["lr"] == 3e-4 and data["rankers"] == [{"name": "tiny-brightness", "weight": 2.0}]


def test_config_validate_ok(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["config", "validate", recipe])
    assert (result.exit_code, result.stdout) == (0, f"{recipe}: valid\n")


def test_config_validate_fails_with_one_line(runner, isolated_registry, recipe):
    Path(recipe).write_text(RECIPE.replace("lr: 3e-4", "lrr: 3e-4"))
    result = runner.invoke(app, ["config", "validate", recipe])
    assert result.exit_code == 2
    assert result.stderr == f"Error: {recipe}:9: train.lrr: unknown key (did you mean lr?)\n"
    assert result.stdout == ""


def test_unknown_generator_flag(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["config", "show", "-c", recipe, "--generator", "tinyy"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: generator: unknown generator 'tinyy': did you mean tiny?")
    assert "drpo list-plugins" in result.stderr


def test_debug_reraises_the_error(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["--debug", "config", "validate", "missing.yaml"])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == "config file not found: missing.yaml"


# -- train ---------------------------------------------------------------------------------------------------


def test_train_dry_run_prints_the_plan_and_writes_nothing(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["train", "--config", recipe, "--output-dir", "runs/dry", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "generator  tiny: TinyGenerator" in out
    assert "rankers    tiny-brightness (weight 2)" in out
    assert "kernel     laplacian" in out
    assert "K=4, M+=1, M-=1" in out
    assert "prompts    2 train, 1 held out" in out
    assert not Path("runs/dry/metrics.jsonl").exists()


@pytest.mark.slow
def test_train_writes_its_resolved_config_beside_its_outputs(runner, isolated_registry, recipe):
    result = runner.invoke(app, ["train", "-c", recipe, "--set", "train.steps=2", "--output-dir", "runs/one"])
    assert result.exit_code == 0, result.output
    run = Path("runs/one")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["steps"] == 2 and written["output_dir"] == "runs/one"
    assert written["generator"] == {"name": "tiny", "size": 8}
    again = runner.invoke(app, ["config", "validate", str(run / "config.yaml")])
    assert again.exit_code == 0, again.output


# -- the real console script ------------------------------------------------------------------------------


def test_console_script_errors_are_one_line_with_exit_code_2(tmp_path):
    drpo = DRPO
    assert drpo, "the drpo console script is not installed next to this Python"
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        train:
          lr: fast
        """))
    result = subprocess.run([drpo, "config", "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"Error: {bad}:2: train.lr: Input should be a valid number")
    debug = subprocess.run([drpo, "--debug", "config", "validate", str(bad)], capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
