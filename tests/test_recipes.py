"""Every recipe shipped in configs/ resolves as written and builds every component (generator, rankers, the
evaluation rankers, features, kernel) against tiny models, with the recipe's hyper-parameters unchanged; the
paper recipes hold method.md §6.4's numbers.

A recipe naming a component that ``TINY_OPTIONS`` does not know fails here, asking for an entry: add the
options that point that component at a tiny local model (or ``{}`` when it loads nothing)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from drpo_core.config import _flatten, resolve_config
from drpo_core.context import BuildContext
from drpo_core.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
HPS_DATA = REPO / "tests" / "data" / "hpsv2"

Tiny = dict[str, Path]
#: component name -> the options of its section that point it at a tiny model (``tiny`` from the fixture below)
TINY_OPTIONS: dict[str, Callable[[Tiny], dict[str, Any]]] = {
    # 64 px: 32x32 latents, so latent-MAE's layer4 map (4x4) splits into the paper keys' 4x4 patches
    "sd-turbo": lambda t: {"model": t["sd"], "resolution": 64},
    "sdxl-turbo": lambda t: {"model": t["sdxl"], "resolution": 32},
    "latent-mae": lambda t: {"weights": t["mae"]},
    "pixel-mae": lambda t: {"model": t["vit-mae"]},
    "dinov2": lambda t: {"model": t["dinov2"]},
    **{name: (lambda t: {}) for name in ("latent", "teacher-unet", "laplacian", "rbf", "cosine")},
    "pickscore": lambda t: {"model": t["clip"], "processor": t["clip"]},
    "clip": lambda t: {"model": t["clip"]},
    "aesthetic": lambda t: {"model": t["clip"], "head": t["head"]},
    **{name: (lambda t: {"checkpoint": HPS_DATA / "open_clip_tiny.safetensors", "tokenizer": t["tokenizer"],
                         "vision_head_width": 20, "text_head_width": 16}) for name in ("hpsv2", "hpsv2.1")},
    **{name: (lambda t: {}) for name in ("brightness", "saturation", "contrast", "redness")},
}
#: what the overrides may change besides model files: nothing a recipe's result depends on but the hardware
RUN_ON_CPU = {"train.device": "cpu", "train.mixed_precision": "no"}
MODEL_KEYS = {"model", "processor", "weights", "head", "checkpoint", "tokenizer", "resolution",
              "vision_head_width", "text_head_width"}

#: method.md §6.4, per paper recipe
PAPER_RECIPES = {
    "sd-turbo-pickscore.yaml": {
        "generator.name": "sd-turbo:paper", "generator.one_step": "official", "features.name": "latent-mae",
        "selection.candidates": 24, "train.lr": 1e-4, "train.mixed_precision": "fp16", "train.steps": 1000,
        "drift.aggregation": "sum"},
    "sdxl-turbo-pickscore.yaml": {
        "generator.name": "sdxl-turbo:paper", "generator.resolution": 512, "features.name": "pixel-mae",
        "selection.candidates": 16, "train.lr": 1e-5, "train.mixed_precision": "bf16", "train.steps": 5000,
        "drift.aggregation": "mean"},
}
PAPER_SHARED = {
    "rankers.0.name": "pickscore", "selection.positives": 8, "selection.negatives": 8, "selection.combine": "zscore",
    "train.prompts_per_step": 1, "train.grad_accum": 8, "kernel.name": "laplacian", "drift.radii": [0.02, 0.05, 0.2],
    "drift.positive_weight": 3000.0, "drift.negative_weight": 3000.0, "drift.ref_positive_weight": 3000.0,
    "drift.ref_negative_weight": 3000.0, "drift.ref_lambda": 0.2, "generator.lora_rank": 16,
    "generator.lora_alpha": 16.0, "train.betas": [0.9, 0.999], "train.weight_decay": 0.01,
    "train.max_grad_norm": 1.0, "train.ema_decay": None, "eval.seeds": [42, 43, 44, 45, 46],
}


@pytest.fixture(scope="module")
def tiny(tiny_dirs, tiny_vision_dirs, tmp_path_factory) -> Tiny:
    from drpo_clip_rankers.testing import build_tiny_rankers
    from drpo_mae.testing import write_tiny_checkpoint
    from drpo_vision_features.testing import make_tiny_vit_mae

    root = tmp_path_factory.mktemp("recipe-models")
    rankers = build_tiny_rankers(root)
    return {"sd": tiny_dirs["sd"], "sdxl": tiny_dirs["sdxl"], "dinov2": tiny_vision_dirs["dinov2"],
            "vit-mae": make_tiny_vit_mae(root / "vit-mae-12", layers=12),  # vit-mae-base's 12 layers
            "mae": write_tiny_checkpoint(root / "latent-mae.pth"), **rankers}


def components(resolved) -> dict[str, str]:
    """Section -> component name (without its variant) of a resolved recipe."""
    cfg = resolved.config
    named = {"generator": cfg.generator.name, "features": cfg.features.name, "kernel": cfg.kernel.name}
    named.update({f"rankers.{i}": r.name for i, r in enumerate(cfg.rankers)})
    named.update({f"eval.rankers.{i}": r.name for i, r in enumerate(cfg.eval.rankers)})
    return {section: name.partition(":")[0] for section, name in named.items()}


def tiny_assignments(resolved, tiny: Tiny, run_dir: Path) -> dict[str, Any]:
    """``--set`` keys and values pointing every component of a resolved recipe at a tiny model, on the CPU."""
    out: dict[str, Any] = {**RUN_ON_CPU, "output_dir": str(run_dir)}
    for section, name in components(resolved).items():
        if name not in TINY_OPTIONS:
            pytest.fail(f"{section}: component {name!r} has no tiny-model entry in TINY_OPTIONS: add one")
        out.update({f"{section}.{key}": value for key, value in TINY_OPTIONS[name](tiny).items()})
    return out


def test_the_recipes_are_found():
    names = {path.name for path in RECIPES}
    assert set(PAPER_RECIPES) <= names and "sd-turbo-brightness.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_resolves_and_builds_on_tiny_models(recipe, tiny, builtin_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve from the recipe's folder, as for a user elsewhere
    shipped = resolve_config(recipe, registry=builtin_registry)
    overrides = tiny_assignments(shipped, tiny, tmp_path / "run")
    # the overrides touch model files and the hardware only
    assert all(key in RUN_ON_CPU or key == "output_dir" or key.rsplit(".", 1)[1] in MODEL_KEYS for key in overrides)
    resolved = resolve_config(recipe, assignments=[f"{key}={value}" for key, value in overrides.items()],
                              registry=builtin_registry)
    as_shipped, as_built = _flatten(shipped.to_dict()), _flatten(resolved.to_dict())
    changed = {key for key in as_shipped if as_shipped[key] != as_built.get(key)}
    assert changed <= set(overrides), sorted(changed - set(overrides))

    trainer = Trainer(resolved, registry=builtin_registry)
    assert trainer.k == shipped.config.selection.candidates
    assert trainer.optimizer.param_groups[0]["lr"] == shipped.config.train.lr
    assert [name for name, _, _ in trainer.rankers] == [r.name for r in shipped.config.rankers]
    assert trainer.features is not None and trainer.estimator is not None
    context = BuildContext(device="cpu", config_dir=resolved.config_dir)
    evaluation = [builtin_registry.build("ranker", r.name, resolved.options[f"eval.rankers.{i}"], context)
                  for i, r in enumerate(resolved.config.eval.rankers)]  # built by each evaluation: built here once
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for ranker in [r for _, r, _ in trainer.rankers] + evaluation:  # each built ranker scores
        scores = ranker.score(images, ["a red apple", "a blue car"], [None, None])
        assert scores.shape == (2,) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_the_paper_recipes_hold_the_papers_hyper_parameters(name, builtin_registry):
    resolved = resolve_config(REPO / "configs" / name, registry=builtin_registry)
    table = _flatten(resolved.to_dict())
    for key, value in {**PAPER_SHARED, **PAPER_RECIPES[name]}.items():
        assert table[key] == value, key
    assert not resolved.conflicts  # the recipe agrees with every recommendation of its components
    assert {r.name for r in resolved.config.eval.rankers} == {"clip", "aesthetic", "hpsv2"}
