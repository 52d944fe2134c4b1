"""Image-text cosine similarity of a CLIP model: what PickScore, CLIP score and HPSv2 compute."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessorPil, CLIPModel

from drpo_clip_rankers.common import (
    ClipFamilyRanker,
    Preprocessing,
    ProcessorImages,
    TextEmbeddings,
    check_tokenizer,
    freeze,
    load_pretrained,
    load_tokenizer,
    pooled,
)
from drpo_core.model_rankers import pick_device, pick_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from drpo_clip_rankers.options import ClipModelOptions
    from drpo_core.context import BuildContext


class SimilarityRanker(ClipFamilyRanker):
    """``cos(image embedding, prompt embedding)`` in float32, without the logit scale (the paper's scores;
    its tables print them x100). Only the order matters to DrPO, so the scale changes nothing there."""

    def __init__(self, name: str, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, *,
                 images: Callable[[torch.Tensor], torch.Tensor], preprocessing: Preprocessing,
                 device: torch.device, dtype: torch.dtype, batch_size: int,
                 clean_text: Callable[[str], str] | None = None) -> None:
        super().__init__(name, images=images, preprocessing=preprocessing, device=device, dtype=dtype,
                         batch_size=batch_size)
        self.model = freeze(model, device, dtype)
        self.text = TextEmbeddings(self.model, tokenizer, device, clean_text)

    def scores_of_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = F.normalize(pooled(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
        return (image * self.text(prompts)).sum(dim=-1)


def build_similarity(name: str, options: ClipModelOptions, context: BuildContext) -> SimilarityRanker:
    """A ``CLIPModel`` and its transformers processor (``options.processor``, else the model's own)."""
    device = pick_device(options.device, context)
    dtype = pick_dtype(options.dtype, device, context)
    model = load_pretrained(name, "model", CLIPModel.from_pretrained, options.model, context, options.revision,
                            dtype=dtype)
    source = options.processor or options.model
    revision = options.processor_revision if options.processor else options.revision
    processor = load_pretrained(name, "processor", CLIPImageProcessorPil.from_pretrained, source, context, revision)
    tokenizer = load_tokenizer(name, source, context, revision)
    check_tokenizer(name, tokenizer, model.config.text_config, source)
    return SimilarityRanker(name, model, tokenizer, images=ProcessorImages(processor),
                            preprocessing=Preprocessing.of_processor(processor, name), device=device, dtype=dtype,
                            batch_size=options.batch_size)
