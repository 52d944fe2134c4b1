"""Held-out evaluation: streamed metrics equal the all-in-memory ones, rankers built per evaluation."""

import gc
import io
import json
import random
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import drpo_core.evaluation as evaluation
from drpo_core.config import EvalConfig, resolve_config
from drpo_core.evaluation import EvaluationError, Evaluator
from drpo_core.hookspecs import hookimpl
from drpo_core.noise import sample_noise
from drpo_core.prompts import PromptRecord
from drpo_core.testing import BrightnessRanker, PixelFeatures, TinyGenerator
from drpo_core.trainer import Trainer
from tests.conftest import make_registry

from .test_trainer import tiny_config

PROMPTS = [PromptRecord(text, {"group": group}) for text, group in
           [("a red apple", "fruit"), ("a blue car", "thing"), ("a cat", "animal"), ("a dog", "animal"),
            ("a pear", "fruit")]]


class GroupedRanker(BrightnessRanker):
    """Binary brightness with a breakdown by the record's metadata (like GenEval's tags)."""

    binary = True

    def score(self, images, prompts, metadata):
        return (images[:, 1, 0, 0] > 0.5).float().cpu()  # one pixel: some pass, some fail

    def groups(self, record):
        return [f"group={record.metadata['group']}", "all"]


class RedRanker(BrightnessRanker):
    def score(self, images, prompts, metadata):
        return images[:, 0].float().mean(dim=(1, 2)).cpu()


def _featurise(latents, prompts=None, noise=None):
    return PixelFeatures().features(latents, None)


def _nudge(generator: TinyGenerator, seed: int, scale: float = 0.4) -> None:
    """Move the trainable net away from the base, deterministically."""
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in generator.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=noise) * scale)


def _evaluator(tmp_path, generator, *, seeds="0-4", grid_prompts=3, eval_rankers=()):
    config = EvalConfig(seeds=seeds, grid_prompts=grid_prompts)
    return Evaluator(generator, _featurise, [("grouped", GroupedRanker())], lambda: list(eval_rankers),
                     PROMPTS, config, tmp_path, Console(file=io.StringIO()))


def _in_memory(generator, rankers, seeds) -> dict:
    """The metrics computed the way evaluation did before it streamed: every image at once."""
    records = [r for r in PROMPTS for _ in seeds]
    texts = [r.text for r in records]
    noise = torch.stack([sample_noise(generator.noise_shape, i, s) for i in range(len(PROMPTS)) for s in seeds])
    with torch.no_grad():
        images = generator.decode(generator.sample(texts, noise)).float().clamp(0, 1)
        base_images = generator.decode(generator.reference(texts, noise)).float().clamp(0, 1)
        features = torch.cat([v.flatten(1) for _, v in sorted(_featurise(images).items())], dim=1)
        base_features = torch.cat([v.flatten(1) for _, v in sorted(_featurise(base_images).items())], dim=1)

    def diversity(f):
        per_prompt = f.reshape(len(PROMPTS), len(seeds), -1)
        n = len(seeds)
        return float(torch.cdist(per_prompt, per_prompt).sum(dim=(1, 2)).mean() / (n * (n - 1)))

    out = {"samples": len(images)}
    for name, ranker in rankers:
        for prefix, source in (("", images), ("base_", base_images)):
            scores = torch.as_tensor(ranker.score(source, texts, [r.metadata for r in records]))
            out[f"{prefix}score/{name}"] = float(scores.mean())
            if hasattr(ranker, "groups"):
                groups = {}
                for record, value in zip(records, scores.tolist(), strict=True):
                    for group in ranker.groups(record):
                        groups.setdefault(group, []).append(value)
                out.update({f"{prefix}score/{name}/{g}": float(np.mean(v)) for g, v in groups.items()})
    out["diversity"] = diversity(features)
    out["diversity_ratio"] = out["diversity"] / diversity(base_features)
    out["pixel_rms_to_base"] = float((images - base_images).pow(2).mean().sqrt())
    out["feature_distance_to_base"] = float((features - base_features).norm(dim=1).mean())
    return out


@pytest.mark.parametrize("batch", [64, 10, 3])  # all prompts in one batch, two per batch, one per batch
def test_streamed_metrics_equal_the_in_memory_ones(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(evaluation, "EVAL_BATCH", batch)
    generator, seeds = TinyGenerator(seed=1), list(range(5))
    _nudge(generator, 0)
    rankers = [("grouped", GroupedRanker()), ("red", RedRanker())]
    evaluator = _evaluator(tmp_path, generator, eval_rankers=[("red", RedRanker())])
    records = []
    for step, seed in ((0, None), (5, 1), (9, 2)):  # the later evaluations use the cached base scores
        if seed is not None:
            _nudge(generator, seed)
        result = evaluator.run(step, records.append, final=step == 9)
        assert result == (records[-1] if step == 9 else None)
        expected = _in_memory(generator, rankers, seeds)
        record = records[-1]
        assert record["step"] == step
        assert set(record) - {"step"} == set(expected), set(record) ^ set(expected)
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert record["samples"] == 25 and 0 < record["score/grouped"] < 1
        assert record["score/red"] != pytest.approx(record["base_score/red"])
    # the grid: 3 prompts x 5 seeds, base row above current row, each tile padded by 2 and scaled x12
    grid = Image.open(tmp_path / "grid-step000009.png")
    assert grid.size == (5 * 12 * 12, 6 * 12 * 12)
    assert (tmp_path / "reward-curve.png").is_file()


def test_grid_tiles_and_borders_match_the_samples(tmp_path):
    generator = TinyGenerator(seed=2)
    _nudge(generator, 3)
    evaluator = _evaluator(tmp_path, generator, seeds="0-9", grid_prompts=2)
    evaluator.run(0, lambda record: None)
    grid = np.asarray(Image.open(tmp_path / "grid-step000000.png").convert("RGB"))[::12, ::12]  # unscaled
    seeds, prompts = range(8), PROMPTS[:2]  # at most 8 seeds shown
    noise = torch.stack([sample_noise(generator.noise_shape, i, s) for i in range(2) for s in seeds])
    texts = [p.text for p in prompts for _ in seeds]
    for row, sample in enumerate([generator.reference, generator.sample]):
        with torch.no_grad():
            images = generator.decode(sample(texts, noise)).clamp(0, 1)
        passed = GroupedRanker().score(images, texts, [None] * len(texts))
        for i, image in enumerate(images):
            p, s = divmod(i, 8)
            y, x = (2 * p + row) * 12, s * 12
            tile = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert np.array_equal(grid[y + 2:y + 10, x + 2:x + 10], tile)
            assert tuple(grid[y, x]) == ((40, 170, 60) if passed[i] else (210, 40, 40))


# -- the secondary rankers: built by each evaluation, released after ---------------------------


class _Counted(BrightnessRanker):
    builds: list = []  # a weakref per build
    alive: list = []  # at each score call, how many built rankers are still alive

    def __init__(self):
        # a reference cycle: only a garbage collection frees it, as with many real models
        self.cycle = self
        # building a model draws random numbers: evaluation must hide that from training
        self.weights = torch.randn(4)

    def score(self, images, prompts, metadata):
        _Counted.alive.append(sum(ref() is not None for ref in _Counted.builds))
        return super().score(images, prompts, metadata)


class _CountedPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        def build(options, context):
            ranker = _Counted()
            _Counted.builds.append(weakref.ref(ranker))
            return ranker

        register("counted", build)


def test_eval_rankers_are_built_per_evaluation_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(_Counted, "builds", [])
    monkeypatch.setattr(_Counted, "alive", [])
    registry = make_registry(_CountedPlugin())
    config = tiny_config(tmp_path, eval={"seeds": "0-3", "rankers": ["counted"], "every": 2},
                         train={"steps": 4})
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    assert _Counted.builds == []  # start-up does not build the secondary rankers
    summary = trainer.train()
    evals = [json.loads(line) for line in (Path(trainer.run_dir) / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert len(_Counted.builds) == 3  # once per evaluation
    assert set(_Counted.alive) == {1}  # while scoring, only this evaluation's ranker is alive
    assert all(ref() is None for ref in _Counted.builds)  # released after each evaluation
    assert "score/counted" in summary and "base_score/counted" in summary


def test_evaluation_leaves_the_global_random_generators_alone(tmp_path):
    generator = TinyGenerator(seed=0)
    evaluator = _evaluator(tmp_path, generator, eval_rankers=[("counted", _Counted())])
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    evaluator.run(0, lambda record: None)
    after = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())


def test_evaluation_frees_the_secondary_rankers_when_it_fails(tmp_path):
    built = []

    def build():
        ranker = _Counted()
        built.append(weakref.ref(ranker))
        return [("counted", ranker)]

    class Failing(BrightnessRanker):
        def score(self, images, prompts, metadata):
            raise RuntimeError("scorer crashed")

    evaluator = Evaluator(TinyGenerator(), _featurise, [("failing", Failing())], build, PROMPTS,
                          EvalConfig(seeds="0-1"), tmp_path)
    with pytest.raises(EvaluationError, match="ranker 'failing' raised RuntimeError: scorer crashed"):
        evaluator.run(0, lambda record: None)
    gc.collect()
    assert len(built) == 1 and built[0]() is None


# -- which prompts are evaluated --------------------------------------------------------------


def _trainer(tmp_path, **prompts) -> Trainer:
    registry = make_registry()
    config = tiny_config(tmp_path, prompts=prompts)
    return Trainer(resolve_config(base=config, registry=registry), registry=registry)


def test_eval_count_takes_a_seeded_subset_of_an_eval_file(tmp_path):
    from drpo_core.prompts import EVAL_SUBSET_COUNT, subset_prompts

    eval_file = tmp_path / "test.txt"
    eval_file.write_text("".join(f"held-out prompt {i}\n" for i in range(100)))
    records = [PromptRecord(f"held-out prompt {i}") for i in range(100)]
    default = _trainer(tmp_path / "a", eval_path=str(eval_file), eval_count="auto")
    assert EVAL_SUBSET_COUNT == 64 and len(default.eval_prompts) == 64
    assert default.eval_prompts == subset_prompts(records, 64, seed=3)  # the run's seed
    assert any("64 held out (a subset of the 100" in line for line in default.plan())
    assert len(default.train_prompts) == 8  # with an eval file, every prompt of path trains
    assert len(_trainer(tmp_path / "b", eval_path=str(eval_file), eval_count=5).eval_prompts) == 5
    every = _trainer(tmp_path / "c", eval_path=str(eval_file), eval_count="all")
    assert every.eval_prompts == records
    assert not any("subset" in line for line in every.plan())


def test_eval_count_split_from_path_by_default_and_all_needs_a_file(tmp_path):
    from drpo_core.errors import ConfigError
    from drpo_core.prompts import EVAL_SPLIT_COUNT

    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(30)))
    trainer = _trainer(tmp_path / "a", path=str(prompts), eval_count="auto")
    assert EVAL_SPLIT_COUNT == 8 and len(trainer.eval_prompts) == 8 and len(trainer.train_prompts) == 22
    with pytest.raises(ConfigError, match="eval_count: all needs prompts.eval_path"):
        _trainer(tmp_path / "b", eval_count="all")
    with pytest.raises(ConfigError, match=r"prompts.eval_count: must be a non-negative integer, auto or all, got 'x'"):
        _trainer(tmp_path / "c", eval_count="x")
