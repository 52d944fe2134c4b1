"""Programmatic image rankers: cheap, deterministic rewards for tests, demos and recipes.

``brightness`` (mean luminance), ``saturation`` (mean HSV saturation), ``contrast`` (luminance
std), ``redness`` (red minus the mean of green and blue). Each is a black box to DrPO like any
learned reward; use ``--set rankers.0.invert=true`` to prefer the opposite.
"""

from __future__ import annotations

from functools import partial

from pydantic import BaseModel, ConfigDict

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register, RegisterAsset
from drpo_core.interfaces import Ranker

STATISTICS = ("brightness", "saturation", "contrast", "redness")
#: the LAION aesthetic predictor's MLP head (768 -> 1 on L2-normalised CLIP ViT-L/14 image embeddings), as
#: committed in christophschuhmann/improved-aesthetic-predictor (Apache-2.0) at 61f2f07; its SHA-256 was computed
#: from that commit's blob (its MD5 b1047fd767a00134b8fd6529bf19521a matches the one other projects publish)
LAION_AESTHETIC_MLP = {
    "url": "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
           "61f2f07a2b16be5ffb40a10ba5adae4a74c9d0d9/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    "sha256": "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    "licence": "Apache-2.0",
    "summary": "LAION aesthetic predictor MLP head (on CLIP ViT-L/14)",
}


class StatisticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invert: bool = False


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    for name in STATISTICS:
        # a partial of a module-level function pickles, so `timeout` can run the ranker in a worker process
        register(name, partial(_build, name), options=StatisticOptions, summary=f"image {name} (programmatic)")


@hookimpl
def drpo_register_assets(register: RegisterAsset) -> None:
    register("laion-aesthetic-mlp", **LAION_AESTHETIC_MLP)


def _build(name: str, options: StatisticOptions, context: BuildContext) -> Ranker:
    from drpo_image_rankers.rankers import StatisticRanker

    return StatisticRanker(name, invert=options.invert)
