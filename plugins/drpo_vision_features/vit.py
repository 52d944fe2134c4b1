"""What the ViT feature spaces share: loading a frozen transformers model from the hub or a folder,
the differentiable preprocessing (bicubic resize, normalise) and the token statistics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from drpo_core.errors import PluginError
from drpo_core.hub import hub_offline

#: used when a model has no preprocessor config (both DINOv2 and ViT-MAE use these)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224





@dataclass(frozen=True)
class Preprocessing:
    """Images in [0, 1] -> the model's input: bicubic resize to ``size`` x ``size``, then normalise."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PluginError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (self.size, self.size):  # as the official code: no antialiasing
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def read_preprocessing(model: str, is_local: bool, revision: str | None, size: int | None) -> Preprocessing:
    """Size, mean and std from the model's ``preprocessor_config.json`` (crop size first, as the official
    code), ImageNet's and 224 where it has none; ``size`` overrides."""
    config: dict[str, Any] = {}
    if is_local:
        path: str | None = str(Path(model) / "preprocessor_config.json")
    else:
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(model, "preprocessor_config.json", revision=revision,
                               local_files_only=hub_offline(), _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
    if path and Path(path).is_file():
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    return Preprocessing(size or _config_size(config), tuple(config.get("image_mean") or IMAGENET_MEAN),
                         tuple(config.get("image_std") or IMAGENET_STD))


def _config_size(config: dict[str, Any]) -> int:
    for entry in (config.get("crop_size"), config.get("size")):
        if isinstance(entry, int):
            return entry
        if isinstance(entry, dict):
            for key in ("height", "shortest_edge"):
                if key in entry:
                    return int(entry[key])
    return DEFAULT_SIZE


def check_layers(layers: Sequence[int], depth: int, model: str) -> list[int]:
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise PluginError(f"layers {bad} do not exist in {model!r}, which has layers 1..{depth}")
    return list(dict.fromkeys(layers))


def token_statistics(tokens: Sequence[torch.Tensor], layers: Sequence[int], stats: Sequence[str],
                     prefix_tokens: int = 1) -> dict[str, torch.Tensor]:
    """Keys ``layer{L}_{stat}``, one particle each: ``patch_mean`` / ``patch_std`` over the patch tokens
    (std = sqrt(population variance + 1e-6), in float32) and ``cls``. ``tokens[i]`` are layer
    ``layers[i]``'s hidden states (B, prefix + patches, D); the CLS token comes first, then
    ``prefix_tokens - 1`` register tokens, which no key uses."""
    out: dict[str, torch.Tensor] = {}
    for layer, hidden in zip(layers, tokens, strict=True):
        hidden = hidden.float()
        patches = hidden[:, prefix_tokens:]
        for stat in stats:
            if stat == "patch_mean":
                value = patches.mean(dim=1, keepdim=True)
            elif stat == "patch_std":
                value = (patches.var(dim=1, unbiased=False, keepdim=True) + 1e-6).sqrt()
            else:
                value = hidden[:, :1]
            out[f"layer{layer}_{stat}"] = value
    return out
