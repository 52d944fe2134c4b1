"""Pixel ViT-MAE on decoded images (method.md §5.2, the SDXL trainer's "mae" features).

Preprocessing as for DINOv2 (bicubic resize to the preprocessor's size, 224, and its mean and std).
Keys ``layer{L}_patch_mean``, ``layer{L}_patch_std``, ``layer{L}_cls`` (default L = 12).

**Masking.** transformers' ``ViTMAEModel`` masks in every forward: it keeps ``(1 - mask_ratio)`` of
the patches (0.75 in ``facebook/vit-mae-base``'s config, so a random 49 of 196) and even with
``mask_ratio = 0`` it shuffles them by ``argsort`` of fresh random noise. ``masking: off`` (default)
loads the model with ``mask_ratio = 0`` and passes ``noise = arange(L)``: every patch, in image order,
the same on every call. ``masking: official`` is what the official code does (it never set the ratio):
the checkpoint's ratio with a fresh random mask per call and image, drawn from torch's global
generator, so two calls on the same images differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from drpo_core.context import BuildContext
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.interfaces import FeatureContext, FeatureSpace
from drpo_vision_features.vit import (
    Preprocessing,
    check_layers,
    read_preprocessing,
    token_statistics,
)

if TYPE_CHECKING:
    from drpo_vision_features.options import PixelMAEOptions


class PixelMAEFeatures(FeatureSpace):
    input = "images"

    def __init__(self, model: Any, preprocess: Preprocessing, layers: Sequence[int], stats: Sequence[str],
                 masking: str = "off") -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.layers, self.stats = list(layers), list(stats)
        self.masking = masking
        config = model.config
        patch = config.patch_size
        self.patches = (preprocess.size // patch) ** 2
        self.interpolate = preprocess.size != config.image_size
        if masking == "off" and config.mask_ratio != 0:
            raise ValueError("masking 'off' needs the model loaded with mask_ratio=0")

    def to(self, device: torch.device | str) -> PixelMAEFeatures:
        self.model.to(device)
        return self

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(x).to(dtype)
        noise = None
        if self.masking == "off":  # argsort(arange) keeps every patch in place
            noise = torch.arange(self.patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        outputs = self.model(pixel_values=pixels, noise=noise, output_hidden_states=True,
                             interpolate_pos_encoding=self.interpolate)
        hidden = outputs.hidden_states
        return token_statistics([hidden[layer] for layer in self.layers], self.layers, self.stats)


def build_pixel_mae(options: PixelMAEOptions, context: BuildContext) -> PixelMAEFeatures:
    from transformers import ViTMAEModel

    model_id, is_local = resolve_model(options.model, context.config_dir)
    extra: dict[str, Any] = {"mask_ratio": 0.0} if options.masking == "off" else {}
    model = from_hub_or_cache(ViTMAEModel.from_pretrained, model_id, is_local, {"revision": options.revision, **extra})
    layers = check_layers(options.layers, model.config.num_hidden_layers, options.model)
    preprocess = read_preprocessing(model_id, is_local, options.revision, options.image_size)
    return PixelMAEFeatures(model, preprocess, layers, options.stats, options.masking)
