"""Resume and re-run from the run directory alone, as a user types it, on tiny diffusers pipelines."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from drpo_core.metrics import read_metrics
from drpo_mae.testing import write_tiny_checkpoint
from tests.conftest import DRPO


def drpo(*args: str, cwd: Path, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DRPO_LOAD_PLUGINS": ""}
    command = [DRPO, *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def recipe_dir(tmp_path, tiny_dirs):
    """A recipe folder with relative paths: the tiny SD pipeline and a prompt file beside the recipe."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copytree(tiny_dirs["sd"], folder / "tiny-sd")
    (folder / "prompts.txt").write_text("a red apple\na blue car\na cat\na dog\n")
    write_tiny_checkpoint(folder / "tiny-mae.pth")  # SD-Turbo's recommended latent-MAE, tiny weights beside the recipe
    (folder / "recipe.yaml").write_text(yaml.safe_dump({
        "generator": {"name": "sd-turbo", "model": "tiny-sd", "resolution": 32, "lora_rank": 4},
        "rankers": ["brightness"],
        "features": {"name": "latent-mae", "weights": "tiny-mae.pth", "keys": ["layer4_mean", "layer4_std",
                                                                               "layer3_mean_2", "layer3_std_2"]},
        "selection": {"candidates": 4, "positives": 1, "negatives": 1},
        "train": {"steps": 6, "grad_accum": 1, "lr": 1e-2, "mixed_precision": "no"},
        "prompts": {"path": "prompts.txt", "eval_count": 1}, "eval": {"seeds": "0-1"},
        "checkpoint": {"every": 2}, "log": {"progress": False},
    }))
    return folder


def without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(path)]


def final_weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "trainable.safetensors"))


@pytest.mark.slow
def test_killed_then_resumed_from_the_run_directory_alone_is_bit_identical(recipe_dir, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    straight = drpo("train", "--config", str(recipe_dir / "recipe.yaml"), "--output-dir", "straight", cwd=work)
    assert straight.returncode == 0, straight.stderr

    killed = work / "killed"
    process = drpo("train", "--config", str(recipe_dir / "recipe.yaml"), "--output-dir", "killed", cwd=work,
                   wait=False)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == "step-000002"):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_metrics(killed / "metrics.jsonl")) < 6  # killed before the end

    # from another working directory, with nothing but the run directory
    resumed = drpo("train", "--resume", "latest", "--output-dir", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(work / "straight"), final_weights(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert without_time(work / "straight" / "metrics.jsonl") == without_time(killed / "metrics.jsonl")
    info = json.loads((killed / "run.json").read_text())
    assert info["steps_done"] == 6 and len(info["resumed"]) == 1 and "end_time" in info


def test_a_finished_run_continues_longer_and_other_changes_are_refused(recipe_dir, tmp_path):
    run = tmp_path / "run"
    first = drpo("train", "--config", str(recipe_dir / "recipe.yaml"), "--output-dir", str(run),
                 "--set", "train.steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["start_time"] <= info["end_time"] and info["steps_done"] == 2
    assert set(info["final_metrics"]) >= {"score/brightness", "base_score/brightness", "diversity_ratio"}
    saved = {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}

    for args, message in [
        (["--generator", "sdxl-turbo"], "--generator would change it"),
        (["--set", "train.lr=0.5"], "--set train.lr: --resume accepts only --set train.steps=N"),
        (["--config", str(recipe_dir / "recipe.yaml")], "--config would change it"),
    ]:
        refused = drpo("train", "--resume", "latest", "--output-dir", str(run), *args, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stderr.strip().endswith(message.split(": ")[-1]) or \
            message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    # a fresh run into the finished run's folder is refused before anything is written
    again = drpo("train", "--config", str(recipe_dir / "recipe.yaml"), "--output-dir", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume latest" in again.stderr
    assert {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")} == saved

    longer = drpo("train", "--resume", "latest", "--output-dir", str(run), "--set", "train.steps=3", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert "extending the run: train.steps 2 -> 3 (--set)" in longer.stdout
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_the_saved_config_is_a_recipe_that_works_from_any_directory(recipe_dir, tmp_path):
    run = tmp_path / "run"
    done = drpo("train", "--config", str(recipe_dir / "recipe.yaml"), "--output-dir", str(run),
                "--set", "train.steps=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["prompts"]["path"] == str((recipe_dir / "prompts.txt").resolve())
    assert saved["generator"]["model"] == str((recipe_dir / "tiny-sd").resolve())
    elsewhere = tmp_path / "other" / "deeper"
    elsewhere.mkdir(parents=True)
    rerun = drpo("train", "--config", str(run / "config.yaml"), "--output-dir", "again", cwd=elsewhere)
    assert rerun.returncode == 0, rerun.stderr
    assert without_time(run / "metrics.jsonl") == without_time(elsewhere / "again" / "metrics.jsonl")
