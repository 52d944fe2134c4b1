"""The training loop on the tiny fakes: learning, exact resume, chunking, sources and failures."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drpo_core.config import resolve_config
from drpo_core.errors import ComponentError, DrpoError
from drpo_core.hookspecs import hookimpl
from drpo_core.interfaces import Ranker
from drpo_core.metrics import StepTimer, read_metrics
from drpo_core.sources import Anchors
from drpo_core.testing import BrightnessRanker
from drpo_core.trainer import Trainer
from tests.conftest import make_registry

PACKAGES = ("drpo", "torch", "diffusers", "transformers", "peft", "accelerate")  # run.json records their versions
PROMPTS = ["a red apple", "a blue car", "a green tree", "a cat", "a dog", "a house", "the sea", "a bird"]


def tiny_config(tmp_path: Path, **sections) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = {
        "seed": 3, "generator": "tiny", "rankers": ["tiny-brightness"], "features": "tiny-pixels",
        "prompts": {"path": str(prompts), "eval_count": 2},
        "selection": {"candidates": 8, "positives": 2, "negatives": 2},
        "train": {"steps": 6, "prompts_per_step": 2, "lr": 0.05},
        "eval": {"seeds": "0-7"}, "checkpoint": {"every": 3}, "log": {"progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def run(config: dict, *plugins) -> tuple[Trainer, dict]:
    registry = make_registry(*plugins)
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    return trainer, trainer.train()


def test_ranking_drives_the_gain_not_repulsion_or_reference(tmp_path):
    steps = {"steps": 15}
    _, ranked = run(tiny_config(tmp_path / "a", train=steps))
    _, shuffled = run(tiny_config(tmp_path / "b", train=steps, selection={"shuffle_scores": True}))
    gain = ranked["score/tiny-brightness"] - ranked["base_score/tiny-brightness"]
    control = shuffled["score/tiny-brightness"] - shuffled["base_score/tiny-brightness"]
    assert gain > 0.1, gain
    assert abs(control) < gain / 4, (gain, control)


def test_run_writes_outputs_and_per_step_metrics(tmp_path):
    trainer, summary = run(tiny_config(tmp_path))
    run_dir = Path(trainer.run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    first = metrics[0]
    for key in ("loss_pref", "loss_ref", "grad_norm", "score_positives", "score_negatives", "skip_failure"):
        assert key in first
    assert first["score_positives"] > first["score_negatives"]
    assert {"mean/pref/rms_r0.02", "cells/pref/s"} <= set(first)
    assert {"sample", "reference", "features", "rank", "drift", "backward", "optimizer"} <= set(first["time"])
    assert (run_dir / "config.yaml").read_text().startswith("seed: 3")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["packages"] == {name: version(name) for name in PACKAGES}  # local tags (+cpu) included
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert (run_dir / "grid-step000006.png").is_file() and (run_dir / "reward-curve.png").is_file()
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 6] and evals[0]["samples"] == 2 * 8
    assert summary["diversity_ratio"] > 0


def _first_step(config: dict, *plugins, prompts: int = 2) -> tuple[torch.Tensor, dict, Anchors, Trainer, list]:
    """The gradients of the first micro-step, its metrics, the source's anchors, the trainer, the batch."""
    registry = make_registry(*plugins)
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    trainer.timer = StepTimer()
    trainer.optimizer.zero_grad()
    anchors, captured = trainer.source.anchors, []
    trainer.source.anchors = lambda batch, k: captured.append(anchors(batch, k)) or captured[-1]
    batch = trainer.stream.next_batch(prompts)
    out = trainer.micro_step(0, batch, 1.0)
    gradients = torch.cat([p.grad.flatten() for p in trainer.generator.trainable_parameters()])
    return gradients, out, captured[0], trainer, batch


def _first_step_gradients(config: dict, *plugins, prompts: int = 2) -> tuple[torch.Tensor, dict]:
    """The gradients of the first micro-step, and its metrics."""
    gradients, out, _, _, _ = _first_step(config, *plugins, prompts=prompts)
    return gradients, out


def _assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 sums in another order: equal to rounding, 1e-5 of the largest gradient entry
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("train", [{"candidate_chunk": 3}, {"single_pass": True}])
def test_chunked_or_single_pass_gradients_equal_two_passes(tmp_path, train):
    two_passes, _ = _first_step_gradients(tiny_config(tmp_path / "a"))
    other, _ = _first_step_gradients(tiny_config(tmp_path / "b", train=train))
    _assert_equal_to_rounding(other, two_passes)
    assert two_passes.abs().sum() > 0


def _write_images(folder: Path, value: int, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        noise = np.random.default_rng(i).integers(-20, 20, (8, 8, 3))
        Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names


def test_offline_pairs_move_samples_toward_chosen(tmp_path):
    bright, dark = _write_images(tmp_path / "bright", 230, 3), _write_images(tmp_path / "dark", 25, 3)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": bright, "rejected": dark}) + "\n" for p in PROMPTS))
    config = tiny_config(tmp_path, source={"kind": "offline", "path": str(pairs)},
                         train={"steps": 12, "prompts_per_step": 1}, drift={"ref_lambda": 0.0})
    _, summary = run(config)
    assert summary["score/tiny-brightness"] > summary["base_score/tiny-brightness"] + 0.1


def test_offline_bad_rows_name_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a cat", "chosen": "missing.png", "rejected": []}) + "\n")
    with pytest.raises(DrpoError, match=r"pairs.jsonl:1: chosen image not found: missing.png"):
        run(tiny_config(tmp_path, source={"kind": "offline", "path": str(pairs)}))


def test_nan_scores_are_skipped_then_stop_the_run_naming_the_ranker(tmp_path):
    config = tiny_config(tmp_path, rankers=[{"name": "tiny-broken", "mode": "nan"}],
                         train={"steps": 6, "max_failures": 5}, prompts={"eval_count": 0})
    with pytest.raises(ComponentError, match=r"prompts failed .*tiny-broken.* non-finite"):
        run(config)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["skip_failure"] for m in metrics] == [2, 2]  # the third step crosses the limit


def test_ranker_exceptions_count_as_failures(tmp_path):
    config = tiny_config(tmp_path, rankers=[{"name": "tiny-broken", "mode": "raise"}],
                         train={"steps": 2, "max_failures": 10}, prompts={"eval_count": 0})
    run(config)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["skip_failure"] for m in metrics] == [2, 2]
    assert "scorer crashed" in metrics[0]["failure"]


def test_wrong_score_count_is_one_clear_error(tmp_path):
    config = tiny_config(tmp_path, rankers=[{"name": "tiny-broken", "mode": "wrong-count"}],
                         prompts={"eval_count": 0})
    with pytest.raises(ComponentError, match=r"ranker 'tiny-broken' returned 17 scores for 16 images"):
        run(config)


class ThresholdRanker(BrightnessRanker):
    """Binary: 1 when an image is brighter than the threshold (GenEval-style correctness)."""

    binary = True

    def score(self, images, prompts, metadata):
        return (super().score(images, prompts, metadata) > 0.48).float()


class _BinaryPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("bright-enough", lambda o, c: ThresholdRanker(), provides=("binary",))


@pytest.mark.parametrize("fresh_anchors", [False, True])
def test_binary_rollout_counts_skips_and_learns(tmp_path, fresh_anchors):
    config = tiny_config(tmp_path, rankers=["bright-enough"], train={"steps": 10},
                         selection={"rollout_rounds": 3, "fresh_anchors": fresh_anchors})
    trainer, summary = run(config, _BinaryPlugin())
    metrics = read_metrics(Path(trainer.run_dir) / "metrics.jsonl")
    assert all("skip_rollout" in m for m in metrics)
    assert summary["score/bright-enough"] > summary["base_score/bright-enough"]


def test_single_pass_trains_only_the_prompts_the_rollout_kept(tmp_path):
    grads = []
    for name, train in (("a", {}), ("b", {"single_pass": True})):
        config = tiny_config(tmp_path / name, rankers=["bright-enough"], selection={"rollout_rounds": 1}, train=train)
        gradients, out = _first_step_gradients(config, _BinaryPlugin(), prompts=8)
        assert 0 < out["skip_rollout"] < out["prompts"], out  # some prompts kept, some skipped
        grads.append(gradients)
    _assert_equal_to_rounding(grads[1], grads[0])


def test_the_reference_pass_runs_on_the_kept_prompts_only(tmp_path):
    config = tiny_config(tmp_path, rankers=["bright-enough"], train={"steps": 10}, selection={"rollout_rounds": 1})
    registry = make_registry(_BinaryPlugin())
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    reference, sampled = trainer.generator.reference, []
    trainer.generator.reference = lambda prompts, noise: sampled.append(len(prompts)) or reference(prompts, noise)
    trainer.train()
    steps = [m for m in read_metrics(Path(trainer.run_dir) / "metrics.jsonl") if "skip_rollout" in m]
    skipped = sum(m["skip_rollout"] + m["skip_failure"] for m in steps)
    kept = sum(m["prompts"] for m in steps) - skipped
    assert skipped > 0 and kept > 0, (skipped, kept)
    evaluations = len((Path(trainer.run_dir) / "eval.jsonl").read_text().splitlines())
    # each evaluation regenerates the base on its noise (for the distances to the base), in whole prompts
    base_evaluation = evaluations * len(trainer.eval_prompts) * len(trainer.cfg.eval.seeds)
    assert evaluations == 2 and sum(sampled) - base_evaluation == trainer.k * kept  # K per kept prompt


# -- the reward only ranks: transforms of the scores, ties ---------------------------------------------


def _redness(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].float().mean(dim=(1, 2)).cpu()


class _Scored(Ranker):
    """A ranker from a function of the images (float64 where the function computes in float64)."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, images, prompts, metadata):
        return self.fn(images, prompts)


def _brightness(images: torch.Tensor) -> torch.Tensor:
    return BrightnessRanker().score(images, None, None).double()  # float32 values, exactly in float64


def _flat_first(images, prompts):
    """The batch's first prompt: K equal scores; the others by brightness."""
    first = torch.tensor([p == prompts[0] for p in prompts])
    return torch.where(first, 0.5, _brightness(images))


def _nan_first(images, prompts):
    first = torch.tensor([p == prompts[0] for p in prompts])
    return torch.where(first, float("nan"), _brightness(images))


RANKERS = {
    # strictly increasing transforms of brightness (positive), computed in float64
    "bright-squeezed": lambda x, p: 1e4 + 1e-3 * _brightness(x),  # below float32 resolution at 1e4
    "bright-exp": lambda x, p: torch.exp(_brightness(x)),
    "bright-cubed": lambda x, p: _brightness(x) ** 3,
    "bright-list": lambda x, p: [float(s) for s in 1e4 + 1e-3 * _brightness(x)],  # Python floats
    "redness": lambda x, p: _redness(x),
    "redness-affine": lambda x, p: 2.5 * _redness(x).double() + 100.0,
    "flat": lambda x, p: torch.full((len(x),), 0.5),
    "flat-first": _flat_first,
    "nan-first": _nan_first,
}


class _RankersPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        for name, fn in RANKERS.items():
            register(name, lambda o, c, fn=fn: _Scored(fn))


def _assert_same_step(a: tuple, b: tuple) -> None:
    """Bitwise-identical anchors, losses, drift statistics and gradients of two first micro-steps."""
    (grad_a, out_a, anchors_a, _, _), (grad_b, out_b, anchors_b, _, _) = a, b
    assert torch.equal(anchors_a.keep, anchors_b.keep)
    for side in ("positives", "negatives"):
        first, second = getattr(anchors_a, side), getattr(anchors_b, side)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    scores = {"score_positives", "score_negatives", "score_mean"}  # the ranker's own scale
    assert {k: v for k, v in out_a.items() if k not in scores} == {k: v for k, v in out_b.items() if k not in scores}
    assert torch.equal(grad_a, grad_b) and grad_a.abs().sum() > 0


@pytest.mark.parametrize("transformed", ["bright-squeezed", "bright-exp", "bright-cubed", "bright-list"])
def test_an_increasing_transform_of_one_ranker_changes_nothing_but_the_scores(tmp_path, transformed):
    plain = _first_step(tiny_config(tmp_path / "a"), _RankersPlugin())
    other = _first_step(tiny_config(tmp_path / "b", rankers=[transformed]), _RankersPlugin())
    _assert_same_step(plain, other)


def test_a_positive_affine_transform_within_a_zscored_ensemble_changes_nothing(tmp_path):
    def ensemble(name: str) -> list:
        return [{"name": "tiny-brightness", "weight": 2.0}, {"name": name, "weight": 1.0}]

    plain = _first_step(tiny_config(tmp_path / "a", rankers=ensemble("redness")), _RankersPlugin())
    affine = _first_step(tiny_config(tmp_path / "b", rankers=ensemble("redness-affine")), _RankersPlugin())
    _assert_same_step(plain, affine)


def test_a_prompt_whose_scores_are_all_equal_is_skipped_as_tied_with_no_update(tmp_path):
    gradients, out, anchors, _, _ = _first_step(tiny_config(tmp_path / "a", rankers=["flat"]), _RankersPlugin())
    assert out["skip_tied"] == 2 and out["skip_failure"] == 0 and not anchors.keep.any()
    assert torch.equal(gradients, torch.zeros_like(gradients))
    # one tied prompt of two: nothing from it, exactly as when its ranker fails
    tied = _first_step(tiny_config(tmp_path / "b", rankers=["flat-first"]), _RankersPlugin())
    failed = _first_step(tiny_config(tmp_path / "c", rankers=["nan-first"]), _RankersPlugin())
    assert tied[1]["skip_tied"] == 1 and tied[1]["skip_failure"] == 0
    assert failed[1]["skip_failure"] == 1 and failed[1]["skip_tied"] == 0
    assert tied[2].keep.tolist() == [False, True]
    assert torch.equal(tied[0], failed[0]) and tied[0].abs().sum() > 0
    trainer, batch = tied[3], tied[4]
    slots = trainer.generator._slots([record.text for _, record in batch]).tolist()
    assert slots[0] != slots[1]
    bias = trainer.generator.net.prompt_bias.weight.grad
    assert torch.equal(bias[slots[0]], torch.zeros(3)) and bias[slots[1]].abs().sum() > 0


def test_tied_prompts_are_counted_in_the_metrics(tmp_path):
    config = tiny_config(tmp_path, rankers=["flat"], train={"steps": 2}, prompts={"eval_count": 0})
    trainer, _ = run(config, _RankersPlugin())
    metrics = read_metrics(Path(trainer.run_dir) / "metrics.jsonl")
    assert [(m["skip_tied"], m["skip_failure"], m["prompts"]) for m in metrics] == [(2, 0, 2), (2, 0, 2)]


# -- exact resume and signals (true subprocesses) -------------------------------------------------

SCRIPT = textwrap.dedent("""
    import os, sys, signal
    import drpo_kernels, drpo_latent
    from drpo_core.hookspecs import hookimpl
    from drpo_core.registry import set_registry
    from drpo_core.testing import BrightnessRanker, make_registry

    class KillingBrightness(BrightnessRanker):
        calls = 0
        def score(self, images, prompts, metadata):
            KillingBrightness.calls += 1
            if KillingBrightness.calls == int(os.environ.get("KILL_AT_CALL", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("SLOW"):
                import time; time.sleep(0.3)
            return super().score(images, prompts, metadata)

    class Plugin:
        @hookimpl
        def drpo_register_rankers(self, register):
            register("killing-brightness", lambda o, c: KillingBrightness())

    set_registry(make_registry(drpo_kernels, drpo_latent, Plugin()))
    from drpo_cli.main import app
    app(sys.argv[1:])
""")


def _cli(tmp_path: Path, config: dict | None, *args: str, env: dict | None = None, wait: bool = True):
    """``drpo train`` in a subprocess, with ``config`` as its recipe (None: no recipe, e.g. to resume)."""
    script, recipe = tmp_path / "cli.py", tmp_path / "recipe.yaml"
    script.write_text(SCRIPT)
    recipe.write_text(json.dumps(config))  # JSON is YAML
    command = [sys.executable, str(script), "train", *(["--config", str(recipe)] if config else []), *args]
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k != "time"} for m in metrics]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = tiny_config(tmp_path, rankers=["killing-brightness"], prompts={"eval_count": 0})
    straight = _cli(tmp_path, {**config, "output_dir": str(tmp_path / "straight")})
    assert straight.returncode == 0, straight.stderr
    killed_dir = tmp_path / "killed"
    killed = _cli(tmp_path, {**config, "output_dir": str(killed_dir)}, env={"KILL_AT_CALL": "5"})
    assert killed.returncode == -signal.SIGKILL
    assert len(read_metrics(killed_dir / "metrics.jsonl")) == 4  # step 4 was written after checkpoint 3
    resumed = _cli(tmp_path, None, "--resume", "latest", "--output-dir", str(killed_dir))  # the run directory alone
    assert resumed.returncode == 0, resumed.stderr

    from drpo_core.checkpoint import load_checkpoint, resolve_checkpoint

    a = load_checkpoint(resolve_checkpoint(tmp_path / "straight")).trainable
    b = load_checkpoint(resolve_checkpoint(killed_dir)).trainable
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_time(read_metrics(killed_dir / "metrics.jsonl")) == _without_time(
        read_metrics(tmp_path / "straight" / "metrics.jsonl"))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    config = tiny_config(tmp_path, rankers=["killing-brightness"], prompts={"eval_count": 0},
                         train={"steps": 200}, checkpoint={"every": 1000})
    process = _cli(tmp_path, config, env={"SLOW": "1"}, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    steps = len(read_metrics(metrics))
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps:06d}" and 2 <= steps < 200
    assert "stopped by SIGTERM" in out and "--resume latest" in out


def test_evaluation_and_loaded_runs_use_the_ema_weights(tmp_path, isolated_registry):
    from drpo_core.runs import load_generator

    trainer, summary = run(tiny_config(tmp_path, train={"steps": 3, "ema_decay": 0.9}))
    params = trainer.generator.trainable_parameters()
    trained = [p.detach().clone() for p in params]

    def score() -> float:
        return trainer.evaluator.measure().record["score/tiny-brightness"]

    with trainer.ema_weights():
        assert all(torch.equal(p, shadow) for p, shadow in zip(params, trainer.ema, strict=True))
        ema_score = score()
    assert all(torch.equal(p, t) for p, t in zip(params, trained, strict=True))  # restored afterwards
    assert summary["score/tiny-brightness"] == pytest.approx(ema_score)
    assert score() != pytest.approx(ema_score)  # the trained weights score otherwise
    _, loaded = load_generator(trainer.run_dir)
    assert all(torch.equal(p, shadow) for p, shadow in zip(loaded.trainable_parameters(), trainer.ema, strict=True))


def test_ema_of_trainable_weights_is_checkpointed_and_lags_the_weights(tmp_path):
    trainer, _ = run(tiny_config(tmp_path, train={"steps": 3, "ema_decay": 0.9}, prompts={"eval_count": 0}))
    from drpo_core.checkpoint import load_checkpoint, resolve_checkpoint
    from drpo_core.context import BuildContext

    saved = load_checkpoint(resolve_checkpoint(trainer.run_dir)).trainable
    params = trainer.generator.trainable_parameters()
    assert [k for k in saved if k.startswith("ema.")] == [f"ema.{i}" for i in range(len(params))]
    start = make_registry().build("generator", "tiny", {}, BuildContext(seed=3)).trainable_parameters()
    for i, (param, initial) in enumerate(zip(params, start, strict=True)):
        ema = saved[f"ema.{i}"]
        # an average of the path: strictly between the start and the current weights
        assert not torch.equal(ema, param.detach()) and not torch.equal(ema, initial.detach())
        assert (ema - param.detach()).norm() < (initial.detach() - param.detach()).norm()


def test_resume_restores_the_memory_of_correct_samples(tmp_path):
    import shutil

    config = tiny_config(tmp_path, rankers=["bright-enough"], selection={"rollout_rounds": 1, "positive_memory": 3},
                         prompts={"eval_count": 0})
    straight, _ = run(config, _BinaryPlugin())
    assert straight.source.memory, "the binary ranker found correct samples to remember"
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    registry = make_registry(_BinaryPlugin())
    resumed = Trainer(resolve_config(base={**config, "output_dir": str(resumed_dir)}, registry=registry),
                      registry=registry)
    resumed.train(resume=str(resumed_dir / "checkpoints" / "step-000003"))
    assert resumed.source.memory.keys() == straight.source.memory.keys()
    assert all(torch.equal(resumed.source.memory[p], straight.source.memory[p]) for p in straight.source.memory)
    a, b = dict(straight.generator.trainable_state_dict()), dict(resumed.generator.trainable_state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_memory_and_ema_loads_with_its_ema_weights(tmp_path, isolated_registry):
    from drpo_core.registry import set_registry
    from drpo_core.runs import load_generator

    set_registry(make_registry(_BinaryPlugin()))  # the fixture restores the previous one
    config = tiny_config(tmp_path, rankers=["bright-enough"], selection={"rollout_rounds": 1, "positive_memory": 3},
                         train={"ema_decay": 0.9})
    trainer, _ = run(config, _BinaryPlugin())
    assert trainer.source.memory, "the checkpoint holds remembered samples beside the weights"
    _, loaded = load_generator(trainer.run_dir)
    assert all(torch.equal(p, shadow) for p, shadow in zip(loaded.trainable_parameters(), trainer.ema, strict=True))


def test_resume_with_another_ema_setting_is_one_clear_error(tmp_path):
    config = tiny_config(tmp_path, train={"steps": 3})
    run(config)
    registry = make_registry()
    with_ema = Trainer(resolve_config(base={**config, "train": {**config["train"], "ema_decay": 0.9}},
                                      registry=registry), registry=registry)
    with pytest.raises(DrpoError, match="holds 0 EMA tensors, this run keeps"):
        with_ema.train(resume="latest")


def test_the_evaluation_log_is_strict_json_with_one_seed(tmp_path):
    """With one seed per prompt there is no diversity: eval.jsonl says null (NaN is not JSON)."""
    _, _ = run(tiny_config(tmp_path, train={"steps": 2}, eval={"seeds": "0", "every": 2}))
    lines = (tmp_path / "run" / "eval.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in eval.jsonl")) for line in lines]
    assert len(records) == 2 and all(r["diversity"] is None and r["diversity_ratio"] is None for r in records)
    assert all(isinstance(r["score/tiny-brightness"], float) for r in records)
