"""`drpo sample`, `drpo eval` and `drpo export` on a finished tiny run."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from drpo_cli.main import app
from tests.test_trainer import PROMPTS, run, tiny_config


@pytest.fixture
def finished_run(tmp_path, isolated_registry):
    trainer, _ = run(tiny_config(tmp_path, prompts={"eval_count": 0}, train={"steps": 3}))
    return trainer.run_dir


def test_sample_then_eval_round_trip(tmp_path, finished_run, monkeypatch):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(app, ["sample", "--run", str(finished_run), "--prompts", str(prompts),
                                     "--seeds", "42-44", "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in PROMPTS[:2] for s in (42, 43, 44)]
    pixels = [np.asarray(Image.open(tmp_path / d / rows[0]["file"])) for d in ("a", "b")]
    assert np.array_equal(*pixels)  # same run, prompt and seed: the same image

    import drpo_core.runs

    batches = []  # the images each ranker call saw: --batch-size applies to a manifest too
    score = drpo_core.runs.checked_scores
    monkeypatch.setattr(drpo_core.runs, "checked_scores", lambda *a, **k: batches.append(len(a[2])) or score(*a, **k))
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "a" / "manifest.jsonl"), "--ranker", "tiny-brightness",
                                 "--json", str(report), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert batches == [4, 2]
    per_image = [np.asarray(Image.open(tmp_path / "a" / r["file"])).mean() / 255.0 for r in rows]
    found = json.loads(report.read_text())["rankers"]["tiny-brightness"]
    assert found["units"] == "raw" and found["images"]["n"] == 6
    assert abs(found["images"]["mean"] - np.mean(per_image)) < 1e-6
    assert abs(found["images"]["std"] - np.std(per_image)) < 1e-6  # population std, as the paper's summaries
    assert "tiny-brightness" in result.stdout and f"{np.mean(per_image):.4g}" in result.stdout


def test_export_of_a_generator_without_formats_is_one_clear_error(finished_run):
    result = CliRunner().invoke(app, ["export", str(finished_run)])
    assert result.exit_code == 2
    assert "generator 'tiny' cannot export 'diffusers' (formats: none)" in result.output


def test_sample_rejects_bad_seeds(tmp_path, finished_run):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = CliRunner().invoke(app, ["sample", "--run", str(finished_run), "--prompts", str(prompts),
                                      "--seeds", "4x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--seeds" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--generator", "tiny"], "{run}: give a run directory or --generator, not both (the run names its generator)"),
    (["--set", "generator.size=3"], "--set generator.*: a run's generator is rebuilt as it was trained; sample "
                                    "another base model with --generator NAME --set generator.KEY=VALUE"),
    (["--set", "train.lr=3"], "--set train.lr: does not apply to `drpo sample` (only generator.KEY=VALUE, with "
                              "--generator)"),
])
def test_sample_of_a_run_refuses_another_generator_as_eval_does(tmp_path, finished_run, flags, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = CliRunner().invoke(app, ["sample", "--run", str(finished_run), "--prompts", str(prompts), *flags,
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {message.format(run=finished_run)}"]
    assert not (tmp_path / "o").exists()


def test_sample_into_a_folder_holding_a_sample_is_refused_and_force_replaces_it_whole(tmp_path, finished_run):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out, runner = tmp_path / "o", CliRunner()

    def sample(*flags):
        return runner.invoke(app, ["sample", "--run", str(finished_run), "--prompts", str(prompts), "--out", str(out),
                                   *flags])

    assert sample("--seeds", "42-44").exit_code == 0
    assert runner.invoke(app, ["eval", str(out / "manifest.jsonl"), "--ranker", "tiny-brightness"]).exit_code == 0
    (out / "mine.png").write_bytes(b"not ours")  # the user's file beside the sample
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 6 + 3  # 6 images, manifest, scores, mine.png
    refused = sample("--seeds", "42")
    assert refused.exit_code == 2 and refused.output.strip().splitlines() == [
        f"Error: --out {out} already holds a sample (manifest.jsonl): choose another --out, or add --force to "
        "replace it (its images and scores.jsonl)"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    replaced = sample("--seeds", "42", "--force")
    assert replaced.exit_code == 0, replaced.output
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.jsonl", "mine.png", *(r["file"] for r in rows)])
    assert len(rows) == 2 and (out / "mine.png").read_bytes() == b"not ours"


def test_sample_names_what_it_takes_for_a_missing_run_and_says_when_it_samples_the_default(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("two red circles\n")
    runner = CliRunner()
    missing = runner.invoke(app, ["sample", "--run", str(tmp_path / "my-run"), "--prompts", str(prompts),
                                  "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and missing.output.strip().splitlines() == [
        f"Error: {tmp_path / 'my-run'}: not a directory (give a run directory, or --generator NAME for a base "
        "generator)"]
    default = runner.invoke(app, ["sample", "--prompts", str(prompts), "--seeds", "1", "--out", str(tmp_path / "o")])
    assert default.exit_code == 0, default.output
    assert default.output.splitlines()[0] == ("no --run or --generator: sampling the embedded default's generator "
                                              "'shapes', untrained")
    assert len((tmp_path / "o" / "manifest.jsonl").read_text().splitlines()) == 1
