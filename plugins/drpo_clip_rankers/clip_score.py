"""``clip``: CLIP score, the image-prompt cosine of OpenAI's CLIP ViT-L/14 (the paper's "CLIP", x100 in its
tables), with the model's own processor (resize the shortest edge to 224, bicubic, centre crop 224)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_clip_rankers.similarity import SimilarityRanker, build_similarity

if TYPE_CHECKING:
    from drpo_clip_rankers.options import ClipModelOptions
    from drpo_core.context import BuildContext


def build(options: ClipModelOptions, context: BuildContext) -> SimilarityRanker:
    return build_similarity("clip", options, context)
