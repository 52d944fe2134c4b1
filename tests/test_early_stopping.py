"""``eval.early_stopping_patience``: a run stops after that many evaluations in a row without a held-out
gain over the best so far (the step-0 evaluation of the base does not count), and only then."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from drpo_core.config import resolve_config
from drpo_core.hookspecs import hookimpl
from drpo_core.metrics import read_metrics
from drpo_core.testing import BrightnessRanker
from drpo_core.trainer import Trainer
from tests.conftest import make_registry
from tests.test_trainer import tiny_config

HELD_OUT = ["held out one", "held out two"]


class ScriptedRanker(BrightnessRanker):
    """Brightness on training prompts (so the run trains), a scripted score on the held-out prompts:
    ``script[step]``, the step being the number of training batches scored so far."""

    def __init__(self, script: dict[int, float]):
        self.script, self.steps = script, 0

    def score(self, images, prompts, metadata):
        if all(p in HELD_OUT for p in prompts):
            return torch.full((len(images),), self.script[self.steps])
        self.steps += 1
        return super().score(images, prompts, metadata)


def _run(tmp_path: Path, script: dict[int, float], patience: int | None, steps: int) -> tuple[dict, Path, str]:
    class Plugin:
        @hookimpl
        def drpo_register_rankers(self, register):
            register("scripted", lambda o, c: ScriptedRanker(script))

    (tmp_path / "held-out.txt").write_text("\n".join(HELD_OUT) + "\n")
    config = tiny_config(tmp_path, rankers=["scripted"], train={"steps": steps},
                         eval={"seeds": [0, 1], "every": 2, "early_stopping_patience": patience, "grid_prompts": 0},
                         checkpoint={"every": 100})
    config["prompts"] = {"path": config["prompts"]["path"], "eval_path": str(tmp_path / "held-out.txt")}
    registry = make_registry(Plugin())
    out = io.StringIO()
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry,
                      console=Console(file=out, width=200))
    return trainer.train(), trainer.run_dir, out.getvalue()


def _evaluations(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["score/scripted"], 6)) for r in records]


def test_a_run_whose_held_out_score_stops_improving_stops_at_the_patience(tmp_path):
    # the base (step 0) above everything is no bar; step 2 sets the best, step 4 falls short (1), step 6
    # gains (count reset), step 8 only ties (1), step 10 falls short (2): stop. Counting the base, a tie
    # as a gain, or not resetting on a gain would stop at step 4, 12 or 8.
    script = {0: 0.35, 2: 0.3, 4: 0.2, 6: 0.4, 8: 0.4, 10: 0.35, 12: 0.3, 14: 0.9, 16: 0.95}
    summary, run_dir, output = _run(tmp_path, script, patience=2, steps=16)
    assert "early stopping at step 10: no held-out gain in 2 evaluations" in output
    assert summary["step"] == 10 and summary["score/scripted"] == pytest.approx(0.35)
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 11))
    evaluations = _evaluations(run_dir)
    assert evaluations[:6] == [(0, 0.35), (2, 0.3), (4, 0.2), (6, 0.4), (8, 0.4), (10, 0.35)]
    assert evaluations[-1] == (10, 0.35)  # the final evaluation, of the step it stopped at
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000010"


@pytest.mark.parametrize(("script", "patience"), [
    ({0: 0.1, 2: 0.2, 4: 0.3, 6: 0.4, 8: 0.5, 10: 0.6}, 1),  # a gain at every evaluation
    ({0: 0.1, 2: 0.3, 4: 0.3, 6: 0.2, 8: 0.3, 10: 0.2}, None),  # no gain after step 2, but no patience set
    ({0: 0.1, 2: 0.3, 4: 0.2, 6: 0.4, 8: 0.3, 10: 0.5}, 2),  # never two evaluations in a row without one
])
def test_a_run_that_keeps_improving_or_has_no_patience_runs_to_the_end(tmp_path, script, patience):
    summary, run_dir, output = _run(tmp_path, script, patience=patience, steps=10)
    assert "early stopping" not in output
    assert summary["step"] == 10 and summary["score/scripted"] == pytest.approx(script[10])
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 11))
    assert [step for step, _ in _evaluations(run_dir)] == [0, 2, 4, 6, 8, 10]
