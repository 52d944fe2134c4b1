"""Rankers of the CLIP family: ``pickscore``, ``clip``, ``aesthetic``, ``hpsv2`` and ``hpsv2.1``.

Each loads its model from a hub id or a local directory (relative paths: from the working directory, else
the config's folder) and takes ``batch_size``, ``dtype`` and ``device`` (a big reward can sit on another
GPU: ``device: cuda:1``). Scores are float32 whatever the backbone's dtype; ``drpo_clip_rankers.common``
describes the image paths, the precision and the checks.

* ``pickscore``: cosine(image, prompt) of ``yuvalkirstain/PickScore_v1`` with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model card's); about 0.18-0.23.
* ``clip``: cosine(image, prompt) of ``openai/clip-vit-large-patch14``; about 0.2-0.35.
* ``aesthetic``: the LAION MLP (asset ``laion-aesthetic-mlp``) on the normalised image embedding of
  ``openai/clip-vit-large-patch14``; about 4-7 (1-10); the prompt is not used.
* ``hpsv2`` / ``hpsv2.1``: cosine(image, prompt) of the HPS checkpoint (asset of the same name: ``xswu/HPSv2``'s
  ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``), an open_clip ViT-H-14 converted to a transformers
  ``CLIPModel`` when loaded (:mod:`drpo_clip_rankers.convert`); about 0.2-0.35.

The paper's tables print PickScore, CLIP and HPSv2 x100 and the aesthetic score raw: each ranker registers these
``units``, which ``drpo eval`` reports in. Every ranker here is also differentiable (``score_differentiable``,
tensor preprocessing) for gradient baselines; DrPO itself never uses it.

Registration only: torch and transformers are imported inside the factories.
"""

from __future__ import annotations

from collections.abc import Callable

from drpo_clip_rankers.options import (
    HPS_ASSETS,
    AestheticOptions,
    ClipModelOptions,
    HPSv2Options,
    PickScoreOptions,
)
from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register, RegisterAsset
from drpo_core.interfaces import Ranker, Units


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    # units: how `drpo eval` reports them, as the paper's tables do (PickScore, CLIP and HPSv2 x100, aesthetic raw)
    register("pickscore", _pickscore, options=PickScoreOptions, units=Units(100),
             summary="PickScore_v1: image-prompt cosine of a preference-tuned CLIP ViT-H/14")
    register("clip", _clip, options=ClipModelOptions, units=Units(100),
             summary="CLIP score: image-prompt cosine of CLIP ViT-L/14")
    register("aesthetic", _aesthetic, options=AestheticOptions, units=Units(1),
             summary="LAION aesthetic predictor: MLP on CLIP ViT-L/14 image embeddings (1-10)")
    for name in HPS_ASSETS:
        register(name, _hps(name), options=HPSv2Options, aliases=("hps",) if name == "hpsv2" else (),
                 units=Units(100),
                 summary=f"HPS{name[3:]}: image-prompt cosine of an open_clip ViT-H-14 preference fine-tune")


@hookimpl
def drpo_register_assets(register: RegisterAsset) -> None:
    for name, asset in HPS_ASSETS.items():
        register(name, **asset)


def _pickscore(options: PickScoreOptions, context: BuildContext) -> Ranker:
    from drpo_clip_rankers import pickscore

    return pickscore.build(options, context)


def _clip(options: ClipModelOptions, context: BuildContext) -> Ranker:
    from drpo_clip_rankers import clip_score

    return clip_score.build(options, context)


def _aesthetic(options: AestheticOptions, context: BuildContext) -> Ranker:
    from drpo_clip_rankers import aesthetic

    return aesthetic.build(options, context)


def _hps(name: str) -> Callable[[HPSv2Options, BuildContext], Ranker]:
    def build(options: HPSv2Options, context: BuildContext) -> Ranker:
        from drpo_clip_rankers import hpsv2

        return hpsv2.build(name, options, context)

    return build
