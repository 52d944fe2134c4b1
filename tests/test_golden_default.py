"""`drpo train` with no flags stays the same run: its first 10 steps equal a golden file bit for bit.

The golden metrics (``tests/data/toy-default-10-steps.jsonl``) were captured before the foundation
refactor with one thread and two evaluation seeds, the ``time`` field dropped from each row. A change
that moves any training number, or lets evaluation draw from the training's random numbers, fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "toy-default-10-steps.jsonl"
TIMING = {"time"}


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


def test_default_run_matches_the_golden_metrics(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "drpo_cli.main", "train", "--set", "train.steps=10", "--set", "eval.seeds=0-1",
               "--output-dir", str(run_dir)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows, golden = _rows(run_dir / "metrics.jsonl"), _rows(GOLDEN)
    assert len(rows) == len(golden) == 10
    for step, (row, expected) in enumerate(zip(rows, golden, strict=True), start=1):
        assert row == expected, f"step {step}: " + ", ".join(
            f"{k}: {row.get(k)!r} != {expected.get(k)!r}" for k in sorted(set(row) | set(expected))
            if row.get(k) != expected.get(k))
    # the toy world evaluates every one of its 24 held-out prompts (the default subset is larger)
    evaluations = _rows(run_dir / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 10] and evaluations[0]["samples"] == 24 * 2
