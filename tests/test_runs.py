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


def test_sample_then_eval_round_trip(tmp_path, finished_run):
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

    report = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "a" / "manifest.jsonl"), "--ranker", "tiny-brightness",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
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
