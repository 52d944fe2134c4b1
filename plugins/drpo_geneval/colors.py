"""GenEval's colour classifier: CLIP zero-shot over its 10 colours, each the mean of 3 templates' normalised
text embeddings, on an object's crop with everything outside its mask painted ``#999``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from drpo_geneval.detectors import own_precision
from drpo_geneval.rules import Detection
from drpo_geneval.vocabulary import COLOR_TEMPLATES, COLORS

if TYPE_CHECKING:
    from PIL import Image


def object_crop(picture: Image.Image, detection: Detection, background: Image.Image) -> Image.Image:
    """The detection's box of ``picture``, with the pixels outside its mask (when it has one) replaced by
    ``background``; at least one pixel wide and high."""
    from PIL import Image

    if detection.mask is not None:
        picture = Image.composite(picture, background, Image.fromarray(detection.mask))
    # PIL rounds crop coordinates: the box of a mask is in whole pixels already, a detector's box may not be
    x0, y0, x1, y1 = (round(v) for v in detection.box)
    return picture.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ColorClassifier:
    """``classify`` names the colour of each (picture, detection, object name) with a frozen CLIP model."""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 batch_size: int, background: str = "#999") -> None:
        from drpo_clip_rankers.common import TextEmbeddings

        self.model, self.image_processor = model, image_processor
        self.device, self.dtype, self.batch_size, self.background = device, dtype, batch_size, background
        self.text = TextEmbeddings(model, tokenizer, device)
        self._weights: dict[str, torch.Tensor] = {}

    def weights(self, name: str) -> torch.Tensor:
        """(10, D) zero-shot weights of ``name``: per colour, the normalised mean of its normalised templates."""
        if name not in self._weights:
            texts = [t.format(c=c, cls=name) for c in COLORS for t in COLOR_TEMPLATES]
            with own_precision(self.device):
                embeddings = self.text(texts).reshape(len(COLORS), len(COLOR_TEMPLATES), -1)
            self._weights[name] = F.normalize(embeddings.mean(dim=1), dim=-1)
        return self._weights[name]

    def classify(self, requests: Sequence[tuple[Image.Image, Detection, str]]) -> list[str]:
        from PIL import Image

        from drpo_clip_rankers.common import pooled

        colours: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            crops = [object_crop(p, d, Image.new("RGB", p.size, self.background)) for p, d, _ in chunk]
            pixels = self.image_processor(images=crops, return_tensors="pt")["pixel_values"]
            with own_precision(self.device):
                features = pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            features = F.normalize(features.float(), dim=-1)
            for feature, (_, _, name) in zip(features, chunk, strict=True):
                colours.append(COLORS[int((self.weights(name) @ feature).argmax())])
        return colours


def load_color_classifier(source: str, context: Any, device: torch.device, dtype: torch.dtype, batch_size: int,
                          background: str) -> ColorClassifier:
    from transformers import CLIPImageProcessorPil, CLIPModel

    from drpo_clip_rankers.common import check_tokenizer, freeze, load_pretrained, load_tokenizer

    model = load_pretrained("geneval", "clip_model", CLIPModel.from_pretrained, source, context, dtype=dtype)
    processor = load_pretrained("geneval", "clip_model", CLIPImageProcessorPil.from_pretrained, source, context)
    tokenizer = load_tokenizer("geneval", source, context, None)
    check_tokenizer("geneval", tokenizer, model.config.text_config, source)
    return ColorClassifier(freeze(model, device, dtype), processor, tokenizer, device, dtype, batch_size, background)
