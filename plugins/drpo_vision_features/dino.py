"""DINOv2 on decoded images (method.md §5.4, the ablation "VAE-dec. + DINOv2").

Images in [0, 1] are resized (bicubic) to the preprocessor's crop size (224 for ``facebook/dinov2-*``)
and normalised with its mean and std, all as tensor operations, so the gradient reaches the images.
Keys ``layer{L}_patch_mean``, ``layer{L}_patch_std``, ``layer{L}_cls`` for each chosen layer L (the
outputs of transformer layer L, before the final layer norm, as the official extractor reads
``hidden_states[L]``); one particle of the model's width each.

Backends: ``transformers`` (``AutoModel``: DINOv2, also with registers) and ``timm`` (the ``timm``
extra; ``forward_intermediates`` of a timm ViT). The timm path is written to the same contract but not
tested here: timm needs torchvision, which cannot be installed beside the CPU torch of the test stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from drpo_core.context import BuildContext
from drpo_core.errors import PluginError
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.interfaces import FeatureContext, FeatureSpace
from drpo_vision_features.vit import (
    Preprocessing,
    check_layers,
    read_preprocessing,
    token_statistics,
)

if TYPE_CHECKING:
    from drpo_vision_features.options import DinoOptions


class DinoFeatures(FeatureSpace):
    """A frozen ViT's token statistics at chosen layers; ``model(pixels)`` returns each chosen layer's
    hidden states (B, prefix + patches, D), in the order of ``layers``."""

    input = "images"

    def __init__(self, model: torch.nn.Module, preprocess: Preprocessing, layers: Sequence[int],
                 stats: Sequence[str], prefix_tokens: int = 1, backend: str = "transformers") -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.layers, self.stats = list(layers), list(stats)
        self.prefix_tokens = prefix_tokens
        self.backend = backend

    def to(self, device: torch.device | str) -> DinoFeatures:
        self.model.to(device)
        return self

    def _hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        model: Any = self.model
        if self.backend == "timm":
            outputs = model.forward_intermediates(
                pixels, indices=[layer - 1 for layer in self.layers], return_prefix_tokens=True, norm=False,
                stop_early=True, output_fmt="NLC", intermediates_only=True)
            return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in outputs]
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [hidden[layer] for layer in self.layers]

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(x).to(dtype)
        return token_statistics(self._hidden_states(pixels), self.layers, self.stats, self.prefix_tokens)


def build_dino(options: DinoOptions, context: BuildContext) -> DinoFeatures:
    if options.backend == "timm":
        return _build_timm(options)
    from transformers import AutoModel

    model_id, is_local = resolve_model(options.model, context.config_dir)
    model = from_hub_or_cache(AutoModel.from_pretrained, model_id, is_local, {"revision": options.revision})
    config = model.config
    layers = check_layers(options.layers, config.num_hidden_layers, options.model)
    preprocess = read_preprocessing(model_id, is_local, options.revision, options.image_size)
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return DinoFeatures(model, preprocess, layers, options.stats, prefix_tokens=prefix)


def _build_timm(options: DinoOptions) -> DinoFeatures:
    try:
        import timm
    except ImportError as error:
        raise PluginError("the dinov2 feature space's timm backend needs timm: pip install 'drpo[timm]' "
                          f"(or use backend: transformers) ({error})") from error
    size = options.image_size or 224
    try:
        model = timm.create_model(options.model, pretrained=True, num_classes=0, img_size=size)
    except (OSError, RuntimeError, ValueError) as error:
        raise PluginError(f"timm could not create {options.model!r}: {str(error).splitlines()[0]}") from error
    layers = check_layers(options.layers, len(model.blocks), options.model)
    config = model.pretrained_cfg
    preprocess = Preprocessing(size, tuple(config.get("mean", Preprocessing.mean)),
                               tuple(config.get("std", Preprocessing.std)))
    return DinoFeatures(model, preprocess, layers, options.stats, prefix_tokens=model.num_prefix_tokens,
                        backend="timm")
