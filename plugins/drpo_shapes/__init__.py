"""The toy world: a procedural shapes renderer, a tiny one-step generator, a programmatic
GenEval-style counting ranker and a frozen feature space, so ``drpo train`` runs a real DrPO job
on a laptop CPU in minutes. Registration only: torch is imported inside the factories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from drpo_core import hookimpl
from drpo_core.context import BuildContext, LocalPath
from drpo_core.hookspecs import Register
from drpo_core.interfaces import FeatureSpace, Generator, Ranker

if TYPE_CHECKING:
    import typer

#: recommended run settings for the counting ranker (binary, GenEval-style online rollout)
COUNTING_DEFAULTS = {
    "source.kind": "online",
    # a fixed split: each count x shape has two colours in training and the other two held out
    "prompts.path": "pkg://drpo_shapes/prompts_train.jsonl",
    "prompts.eval_path": "pkg://drpo_shapes/prompts_eval.jsonl",
    "eval.seeds": "0-63",
    "selection.candidates": 16,
    "selection.positives": 4,
    "selection.negatives": 4,
    "train.prompts_per_step": 8,
    "train.lr": 3e-4,
    "drift.ref_lambda": 0.2,
}


class GeneratorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: safetensors file of base weights; default: the pretrained file shipped with the package
    weights: LocalPath | None = None
    init: Literal["pretrained", "random"] = "pretrained"

    @field_validator("init")
    @classmethod
    def _weights_need_pretrained(cls, init: str, info: ValidationInfo) -> str:
        if init == "random" and info.data.get("weights") is not None:
            raise ValueError("random ignores the weights option: drop weights, or use init: pretrained")
        return init


class FeatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: seed of the fixed random CNN (changing it changes the feature space)
    seed: int = 0
    #: the count-aware encoder's keys (enc, enc_cells); false = the pixel and random-CNN keys only
    encoder: bool = True
    #: drop the keys starting with any of these prefixes (ablations), e.g. ["edge", "cnn"]
    exclude: list[str] = []

    @field_validator("exclude")
    @classmethod
    def _prefixes_match(cls, exclude: list[str], info: ValidationInfo) -> list[str]:
        keys = feature_keys(info.data.get("encoder", True))
        for prefix in exclude:
            if not any(key.startswith(prefix) for key in keys):
                raise ValueError(f"{prefix!r} matches no key (keys: patch8@R,C, patch4@R,C, pool4, color, edges, "
                                 f"edge_cells, cnn1-3{', enc, enc_cells' if info.data.get('encoder', True) else ''})")
        if info.data.get("seed", 0) != 0 and all(any(k.startswith(p) for p in exclude) for k in keys if k[:3] == "cnn"):
            raise ValueError("it removes the random CNN's keys (cnn1-3), so its seed would change nothing")
        return exclude

    @model_validator(mode="after")
    def _keys_left(self) -> FeatureOptions:
        if not [key for key in feature_keys(self.encoder) if not key.startswith(tuple(self.exclude))]:
            families = ", ".join(dict.fromkeys(key.split("@")[0] for key in feature_keys(self.encoder)))
            raise ValueError(f"exclude removes every feature key (the keys start with: {families})")
        return self


def feature_keys(encoder: bool = True, cells: int = 4) -> list[str]:
    """The keys of the toy world's feature space (``features.ShapesFeatures``) for its 32x32 images."""
    grid = [f"{r},{c}" for r in range(cells) for c in range(cells)]
    keys = [f"patch8@{g}" for g in grid] + [f"patch4@{g}" for g in grid]
    keys += ["pool4", "color", "edges", "edge_cells", "cnn1", "cnn2", "cnn3"]
    return keys + (["enc", "enc_cells"] if encoder else [])


@hookimpl
def drpo_register_generators(register: Register[Generator]) -> None:
    register("shapes", _build_generator, options=GeneratorOptions, provides=("latents", "images", "shapes-world"),
             summary="toy world: 0.4M-parameter U-Net, noise (8,16,16) -> 32x32 shapes image")


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    register("shapes", _build_ranker, variants=("counting",), defaults=_ranker_defaults, provides=("binary",),
             summary="toy world: GenEval-style 0/1 correctness from a programmatic shape detector")


@hookimpl
def drpo_register_commands(cli: typer.Typer) -> None:
    from drpo_shapes.commands import toy

    cli.add_typer(toy, name="toy")


@hookimpl
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    register("shapes", _build_features, options=FeatureOptions, requires=("images", "shapes-world"),
             summary="toy world: pixel patches, random-CNN statistics, count-aware encoder (frozen)")


def _ranker_defaults(variant: str | None) -> dict[str, Any]:
    return dict(COUNTING_DEFAULTS) if variant in (None, "counting") else {}


def _build_generator(options: GeneratorOptions, context: BuildContext) -> Generator:
    from drpo_core.config import resolve_path
    from drpo_shapes.generator import ShapesGenerator

    weights = None if options.weights is None else resolve_path(options.weights, context.config_dir)
    return ShapesGenerator(weights=weights, init=options.init, device=context.device, seed=context.seed)


def _build_ranker(options: Any, context: BuildContext) -> Ranker:
    from drpo_shapes.rankers import ShapesCountingRanker

    return ShapesCountingRanker()


def _build_features(options: FeatureOptions, context: BuildContext) -> FeatureSpace:
    from drpo_shapes.features import ShapesFeatures

    return ShapesFeatures(seed=options.seed, exclude=options.exclude, encoder=options.encoder).to(context.device)
