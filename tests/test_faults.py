"""Components that misbehave: non-finite updates, rankers that return junk, fail in evaluation or hang,
and a second Ctrl-C. Each ends in a bounded, one-line outcome with nothing lost."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from rich.console import Console

from drpo_core import checkpoint as ckpt
from drpo_core.config import EvalConfig, resolve_config
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, DrpoError, PluginError
from drpo_core.evaluation import Evaluator
from drpo_core.hookspecs import hookimpl
from drpo_core.metrics import read_metrics
from drpo_core.prompts import PromptRecord
from drpo_core.testing import BrightnessRanker, PixelFeatures, TinyGenerator, slow_plugin
from drpo_core.trainer import Trainer
from drpo_core.worker import WorkerTimeout, ranker_in_worker
from tests.conftest import make_registry

from .test_trainer import tiny_config


def _train(config: dict, *plugins, console: Console | None = None) -> Trainer:
    registry = make_registry(*plugins)
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry, console=console)
    trainer.train()
    return trainer


def _trainer(config: dict, *plugins, console: Console | None = None) -> Trainer:
    registry = make_registry(*plugins)
    return Trainer(resolve_config(base=config, registry=registry), registry=registry, console=console)


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def _all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# -- non-finite weights are never applied or saved -----------------------------------------------------


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")  # inf where the gradient is not zero, NaN where it is


class PoisonedPixels(PixelFeatures):
    """Tiny pixels whose backward pass is infinite from the ``from_pass``-th pass with grad on."""

    def __init__(self, from_pass: int):
        self.from_pass, self.passes = from_pass, 0

    def features(self, x, context):
        if x.requires_grad:
            self.passes += 1
            if self.passes >= self.from_pass:
                x = _Poison.apply(x)
        return super().features(x, context)


class _PoisonPlugin:
    @hookimpl
    def drpo_register_features(self, register):
        register("poisoned-pixels", lambda o, c: PoisonedPixels(4), requires=("latents",))


def test_non_finite_gradients_skip_the_step_and_stop_the_run_after_the_budget(tmp_path):
    config = tiny_config(tmp_path, features="poisoned-pixels", prompts={"eval_count": 0},
                         train={"steps": 6, "max_failures": 3})
    trainer = _trainer(config, _PoisonPlugin())
    with pytest.raises(ComponentError) as stop:
        trainer.train()
    message = str(stop.value)
    assert "\n" not in message and "4 prompts failed in the last 5 steps" in message
    assert "gradients are not finite" in message and "step-000003" in message
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # the 5th step crossed the budget: neither applied nor written
    skipped = metrics[3]
    assert skipped["update"] == "skipped" and skipped["skip_failure"] == 2 and "grad_norm" not in skipped
    assert skipped["failure"].startswith("gradients are not finite") and skipped["failures"] == {skipped["failure"]: 2}
    assert all(m["skip_failure"] == 0 and "update" not in m for m in metrics[:3])
    # the weights after three applied steps: unchanged by the skipped steps, finite, and what latest holds
    assert _latest(tmp_path / "run") == "step-000003"
    saved = ckpt.load_checkpoint(tmp_path / "run").trainable
    now = trainer.generator.trainable_state_dict()
    assert _all_finite(saved) and all(torch.equal(now[k], saved[k]) for k in now)
    assert {state["step"].item() for state in trainer.optimizer.state_dict()["state"].values()} == {3.0}


def test_fp16_overflows_are_left_to_the_grad_scaler_until_a_window_of_them(tmp_path):
    """With fp16 loss scaling (CUDA), an overflow is how the GradScaler finds its scale: it skips the step and
    lowers the scale. Those steps are not failed prompts; a whole train.failure_window of them stops the run."""
    from accelerate.optimizer import AcceleratedOptimizer

    config = tiny_config(tmp_path, features="poisoned-pixels", prompts={"eval_count": 0},
                         train={"steps": 12, "failure_window": 4, "max_failures": 1})
    trainer = _trainer(config, _PoisonPlugin())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what Accelerator(mixed_precision="fp16") keeps on CUDA
    optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    accelerator = trainer.accelerator
    accelerator.scaler, accelerator.native_amp, accelerator._optimizers = scaler, True, [optimizer]
    trainer.optimizer, trainer.scheduler.optimizers = optimizer, [optimizer]
    with pytest.raises(ComponentError, match=r"not finite in the last 4 steps .* fp16 loss scale came down to 4096"):
        trainer.train()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m.get("update", "applied")[:30] for m in metrics] == ["applied"] * 3 + ["skipped by the fp16 GradScaler"] * 3
    assert all(m["skip_failure"] == 0 for m in metrics)  # not failed prompts
    saved = ckpt.load_checkpoint(tmp_path / "run").trainable
    now = trainer.generator.trainable_state_dict()
    assert _latest(tmp_path / "run") == "step-000006" and all(torch.equal(now[k], saved[k]) for k in now)
    third = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000003").trainable
    assert all(torch.equal(third[k], saved[k]) for k in now)  # the skipped steps changed nothing


@pytest.mark.parametrize("lr", [1e37, 1e38])
def test_an_update_that_overflows_stops_the_run_before_anything_is_saved(tmp_path, lr):
    # lr and gradients finite, so the step is applied: with 1e37 the weights overflow float32 in the second
    # step; with 1e38 lr / (1 - beta1) does in the first, where PyTorch's AdamW raises
    config = tiny_config(tmp_path, prompts={"eval_count": 0}, train={"steps": 6, "lr": lr}, checkpoint={"every": 1})
    with pytest.raises(ComponentError, match=rf"step {2 if lr < 1e38 else 1} made the weights non-finite \(an "
                                             rf"overflow: lr {re.escape(f'{lr:g}')}") as stop:
        _train(config)
    assert "\n" not in str(stop.value)
    run = tmp_path / "run"
    if lr >= 1e38:
        assert not (run / "checkpoints").exists() and "no checkpoint was written yet" in str(stop.value)
        return
    assert _latest(run) == "step-000001" and "step-000001" in str(stop.value)
    assert _all_finite(ckpt.load_checkpoint(run).trainable)


def test_a_checkpoint_of_non_finite_tensors_is_refused_and_the_last_one_kept(tmp_path):
    good = {"w": torch.ones(3), "count": torch.tensor([1, 2])}
    common = dict(optimizer_state={}, scheduler_state={}, state={}, config_text="seed: 0\n")
    first = ckpt.save_checkpoint(tmp_path, 1, trainable=good, **common)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    bad = {"w": torch.tensor([1.0, float("nan"), 2.0]), "v": torch.tensor([float("inf")]), "count": torch.tensor([1])}
    with pytest.raises(DrpoError, match=r"non-finite weights: 2 of 3 tensors .* \(first: 'w'\); the previous"):
        ckpt.save_checkpoint(tmp_path, 2, trainable=bad, **common)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and ckpt.resolve_checkpoint(tmp_path) == first


# -- rankers that return junk or fail in evaluation ------------------------------------------------------


class _JunkRanker(BrightnessRanker):
    def __init__(self, junk):
        self.junk = junk

    def score(self, images, prompts, metadata):
        return self.junk


class _JunkPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("returns-none", lambda o, c: _JunkRanker(None))
        register("returns-text", lambda o, c: _JunkRanker("0.5"))


@pytest.mark.parametrize(("ranker", "reason"), [
    ("returns-none", "ranker 'returns-none' returned None, not scores"),
    ("returns-text", "ranker 'returns-text' returned scores that are not numbers (str: "),
])
def test_a_ranker_returning_no_scores_skips_its_prompts_with_the_reason(tmp_path, ranker, reason):
    config = tiny_config(tmp_path, rankers=[ranker], prompts={"eval_count": 0}, train={"steps": 2, "max_failures": 10})
    _train(config, _JunkPlugin())
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(m["skip_failure"], m["prompts"]) for m in metrics] == [(2, 2)] * 2
    assert all(m["failure"].startswith(reason) and m["failures"] == {m["failure"]: 2} for m in metrics)


class _Flaky(BrightnessRanker):
    """Brightness, except that the calls numbered in ``FAIL`` raise, and ``NAN`` scores the first half NaN."""

    FAIL: set[int] = set()
    NAN = False
    calls = 0

    def score(self, images, prompts, metadata):
        _Flaky.calls += 1
        if _Flaky.calls in _Flaky.FAIL:
            raise RuntimeError(f"call {_Flaky.calls} failed\nsecond line of the error")
        scores = super().score(images, prompts, metadata)
        if _Flaky.NAN:
            scores[: len(scores) // 2] = float("nan")
        return scores


class _FlakyPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("flaky", lambda o, c: _Flaky())


@pytest.fixture
def flaky():
    _Flaky.calls, _Flaky.FAIL, _Flaky.NAN = 0, set(), False
    yield _Flaky
    _Flaky.calls, _Flaky.FAIL, _Flaky.NAN = 0, set(), False


# the calls of a 2-step run evaluating every step: step-0 evaluation (current, base), step 1, its
# evaluation (the base is kept), step 2, the final evaluation
EVAL_CALLS = {"before": 1, "between": 4, "final": 6}


@pytest.mark.parametrize("when", ["before", "between", "final"])
def test_a_ranker_failing_in_evaluation_is_one_line_and_loses_nothing(tmp_path, flaky, when):
    flaky.FAIL = {EVAL_CALLS[when]}
    out = io.StringIO()
    config = tiny_config(tmp_path, rankers=["flaky"], train={"steps": 2}, eval={"every": 1})
    trainer = _trainer(config, _FlakyPlugin(), console=Console(file=out, width=300))
    run = tmp_path / "run"
    if when == "between":  # a warning, and training goes on
        trainer.train()
        assert "the evaluation at step 1 failed: ranker 'flaky' raised RuntimeError: call 4 failed; training " \
               "goes on" in out.getvalue()
        assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 2]
        return
    with pytest.raises(DrpoError) as failed:
        trainer.train()
    message = str(failed.value)
    assert "\n" not in message and f"ranker 'flaky' raised RuntimeError: call {EVAL_CALLS[when]} failed" in message
    if when == "before":
        assert message.startswith("the evaluation before training failed") and "nothing was trained" in message
        assert not (run / "checkpoints").exists()
        return
    assert message.startswith("the final evaluation failed") and "step-000002" in message
    assert f"`drpo train --resume latest --output-dir {run}`" in message
    assert _latest(run) == "step-000002" and "end_time" in json.loads((run / "run.json").read_text())
    # what the message says redoes it: the same run resumed at its end evaluates again
    summary = _trainer(config, _FlakyPlugin()).train(resume="latest")
    assert summary["step"] == 2 and "score/flaky" in summary
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_non_finite_evaluation_scores_report_their_count_and_the_mean_of_the_others(tmp_path):
    class HalfNan(BrightnessRanker):
        def score(self, images, prompts, metadata):
            scores = super().score(images, prompts, metadata)
            scores[::2] = float("nan")
            return scores

    out = io.StringIO()
    prompts = [PromptRecord(text, None) for text in ("a cat", "a dog")]
    evaluator = Evaluator(TinyGenerator(), lambda x, p=None, n=None: PixelFeatures().features(x, None),
                          [("half", HalfNan())], list, prompts, EvalConfig(seeds="0-3"), tmp_path,
                          Console(file=out, width=200))
    record = evaluator.run(0, lambda record: None, final=True)
    expected = BrightnessRanker().score(*_base_images(prompts, 4), None, None)[1::2].mean()
    assert record["nonfinite/half"] == record["base_nonfinite/half"] == 4
    assert record["score/half"] == pytest.approx(float(expected)) and record["base_score/half"] == record["score/half"]
    table = out.getvalue()
    assert "(4 non-finite)" in table and "nan" not in table.lower()


def _base_images(prompts, n_seeds):
    from drpo_core.noise import sample_noise

    generator = TinyGenerator()
    noise = torch.stack([sample_noise(generator.noise_shape, p, s) for p in range(len(prompts)) for s in range(n_seeds)])
    texts = [r.text for r in prompts for _ in range(n_seeds)]
    return (generator.decode(generator.reference(texts, noise)).float().clamp(0, 1),)


def test_skipped_prompts_are_counted_by_reason_on_the_console_and_per_step(tmp_path, flaky):
    flaky.NAN = True  # the first prompt of each batch of two fails
    out = io.StringIO()
    config = tiny_config(tmp_path, rankers=["flaky"], train={"steps": 3}, prompts={"eval_count": 0})
    _train(config, _FlakyPlugin(), console=Console(file=out, width=300))
    reason = "ranker 'flaky' returned non-finite scores"
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(m["skip_failure"], m["failures"]) for m in metrics] == [(1, {reason: 1})] * 3
    assert f"skipped 3 of 6 prompts: 3 failure ({reason})" in out.getvalue()


# -- rankers with a deadline run in a worker process --------------------------------------------------------


def test_a_ranker_in_a_worker_scores_as_in_process_raises_as_itself_and_is_ended_at_its_deadline():
    registry, images = make_registry(slow_plugin), torch.rand(4, 3, 8, 8)
    slow = ranker_in_worker(registry, "tiny-slow", {"seconds": 60, "after": 1}, BuildContext(), where="rankers.0",
                            timeout=1.0)
    assert torch.equal(slow.score(images, ["a"] * 4, [None] * 4), BrightnessRanker().score(images, None, None))
    start = time.monotonic()
    with pytest.raises(WorkerTimeout, match=r"ranker 'tiny-slow' did not answer score\(\) within 1 s"):
        slow.score(images, ["a"] * 4, [None] * 4)
    assert time.monotonic() - start < 2.5 and not slow.worker.alive
    broken = ranker_in_worker(registry, "tiny-broken", {"mode": "raise"}, BuildContext(), where="rankers.0", timeout=9)
    with pytest.raises(RuntimeError, match="scorer crashed"):
        broken.score(images, ["a"] * 4, [None] * 4)
    assert broken.worker.alive  # a call that raises leaves the worker up
    broken.close()
    assert not broken.worker.alive


class _LambdaPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("lambda-ranker", lambda o, c: BrightnessRanker())


def test_a_ranker_whose_factory_cannot_be_pickled_cannot_take_a_timeout(tmp_path):
    config = tiny_config(tmp_path, rankers=[{"name": "lambda-ranker", "timeout": 5}])
    with pytest.raises(PluginError, match=r"rankers.0.timeout: ranker 'lambda-ranker' cannot run in a worker "
                                          r"process: its factory .*<lambda>.* define.* at module level"):
        _trainer(config, _LambdaPlugin())


SCRIPT = textwrap.dedent("""
    import sys
    import drpo_kernels, drpo_latent
    from drpo_core.registry import set_registry
    from drpo_core.testing import make_registry, slow_plugin

    set_registry(make_registry(drpo_kernels, drpo_latent, slow_plugin))
    from drpo_cli.main import app
    app(sys.argv[1:])
""")


def _cli(tmp_path: Path, config: dict | None, *args: str) -> subprocess.Popen:
    """``drpo train`` in a subprocess with the fakes, ``config`` as its recipe (None: resume)."""
    script, recipe = tmp_path / "cli.py", tmp_path / f"recipe-{time.monotonic_ns()}.yaml"
    script.write_text(SCRIPT)
    recipe.write_text(json.dumps(config))
    command = [sys.executable, str(script), "train", *(["--config", str(recipe)] if config else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(path)]


@pytest.mark.slow
def test_a_hanging_ranker_is_ended_at_its_deadline_and_the_run_resumes_bit_identical(tmp_path):
    hang = tmp_path / "hang"
    slow = {"name": "tiny-slow", "timeout": 2, "seconds": 60}
    config = tiny_config(tmp_path, prompts={"eval_count": 0}, train={"steps": 6})
    straight = _train({**config, "rankers": [{**slow, "after": 1000}], "output_dir": str(tmp_path / "straight")},
                      slow_plugin)
    # the 5th call (step 5) hangs: the 4 completed steps are checkpointed with step 5's starting state
    started = tmp_path / "hang-started"
    process = _cli(tmp_path, {**config, "rankers": [{**slow, "after": 4, "signal_file": str(started)}],
                              "output_dir": str(hang)})
    _wait_for(started, process)
    _, err = process.communicate(timeout=60)
    waited = time.time() - started.stat().st_mtime
    assert process.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert "ranker 'tiny-slow' did not answer score() within 2 s" in err and "step-000004" in err
    assert waited < 2 + 5, waited  # the run returns ~0.2 s after the deadline; the rest is the interpreter's exit
    print(f"deadline 2 s: exit {waited:.2f} s after the hanging call began")
    assert _latest(hang) == "step-000004" and len(read_metrics(hang / "metrics.jsonl")) == 4
    assert _all_finite(ckpt.load_checkpoint(hang).trainable)
    # a new worker answers again: the resumed run ends where the uninterrupted one did, bit for bit
    resumed = _cli(tmp_path, None, "--resume", "latest", "--output-dir", str(hang))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = ckpt.load_checkpoint(straight.run_dir).trainable, ckpt.load_checkpoint(hang).trainable
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_time(hang / "metrics.jsonl") == _without_time(straight.run_dir / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["in-process", "signals-blocked", "worker"])
def test_a_second_sigint_aborts_a_hanging_ranker_within_two_seconds(tmp_path, where):
    started = tmp_path / "started"
    ranker = {"name": "tiny-slow", "seconds": 120, "after": 2, "signal_file": str(started),
              "block_signals": where == "signals-blocked", **({"timeout": 120} if where == "worker" else {})}
    config = tiny_config(tmp_path, rankers=[ranker], prompts={"eval_count": 0}, train={"steps": 50},
                         checkpoint={"every": 1})
    process = _cli(tmp_path, config)
    _wait_for(started, process)
    workers = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    assert bool(workers) == (where == "worker")  # the worker (and multiprocessing's resource tracker)
    process.send_signal(signal.SIGINT)  # the first: finish the step... which hangs
    time.sleep(0.3)
    assert process.poll() is None
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    took = time.monotonic() - sent
    print(f"{where}: exit {took:.2f} s after the second SIGINT")
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["aborted by a second SIGINT after 2 completed steps: the unfinished step "
                                        f"was not written; the last checkpoint is {tmp_path / 'run' / 'checkpoints'}"
                                        f"{os.sep}step-000002"]
    assert took < 2.0, took
    run = tmp_path / "run"
    assert _latest(run) == "step-000002" and len(read_metrics(run / "metrics.jsonl")) == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert _ended(workers, within=5.0), "a worker outlived the run"


def _ended(pids: list[int], within: float) -> bool:
    """Every process in ``pids`` is gone (or a zombie) within ``within`` seconds (multiprocessing's resource
    tracker leaves once the run's end of its pipe closes)."""
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- a run that fails before it finishes a step leaves the folder as it found it ---------------------------


@pytest.mark.parametrize("kept", [False, True])
def test_a_run_failing_before_its_first_step_removes_its_files_and_the_next_try_starts(tmp_path, flaky, kept):
    flaky.FAIL = {EVAL_CALLS["before"]}
    run = tmp_path / "run"
    if kept:  # a folder the user had: what was in it stays
        run.mkdir(parents=True)
        (run / "notes.txt").write_text("mine\n")
    out = io.StringIO()
    config = tiny_config(tmp_path, rankers=["flaky"], train={"steps": 2})
    with pytest.raises(DrpoError, match="^the evaluation before training failed"):
        _trainer(config, _FlakyPlugin(), console=Console(file=out, width=300)).train()
    assert out.getvalue().splitlines()[-1] == (f"removed the files this run wrote in {run} (it failed before "
                                                "finishing a step)")
    if kept:
        assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and (run / "notes.txt").read_text() == "mine\n"
    else:
        assert not run.exists()
    summary = _trainer(config, _FlakyPlugin()).train()  # the same --output-dir takes the next try
    assert summary["step"] == 2 and _latest(run) == "step-000002"
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 2]


def test_a_run_stopped_after_steps_but_before_a_checkpoint_keeps_its_log_and_is_not_offered_for_resume(tmp_path):
    config = tiny_config(tmp_path, rankers=[{"name": "tiny-broken", "mode": "raise"}], prompts={"eval_count": 0},
                         checkpoint={"every": 100})
    with pytest.raises(ComponentError) as stopped:
        _trainer(config).train()
    assert str(stopped.value).startswith("12 prompts failed in the last 6 steps (limit train.max_failures=10)")
    assert "no checkpoint was written yet" in str(stopped.value)
    run = tmp_path / "run"
    assert [m["skip_failure"] for m in read_metrics(run / "metrics.jsonl")] == [2] * 5  # why it stopped, kept (the 6th step crossed the limit)
    with pytest.raises(DrpoError) as refused:
        _trainer(config).train()
    assert str(refused.value) == (
        f"{run} already holds a run that wrote no checkpoint (config.yaml, run.json, metrics.jsonl): there is "
        "nothing to resume; if it is not running any more, delete those files, or choose another --output-dir")
    assert len(read_metrics(run / "metrics.jsonl")) == 5
