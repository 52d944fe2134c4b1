"""``pickscore``: PickScore_v1 (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences), image-prompt cosine.

The model card's recipe: ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (resize the shortest edge to 224, bicubic, centre crop 224, CLIP
mean and std). The model card multiplies the cosine by ``logit_scale.exp()`` (100); the paper ranks by the
cosine and reports it x100.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_clip_rankers.similarity import SimilarityRanker, build_similarity

if TYPE_CHECKING:
    from drpo_clip_rankers.options import ClipModelOptions
    from drpo_core.context import BuildContext


def build(options: ClipModelOptions, context: BuildContext) -> SimilarityRanker:
    return build_similarity("pickscore", options, context)
