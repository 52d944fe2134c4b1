"""Latent statistics as particle sets; see the package docstring for the keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drpo_core.errors import ComponentError
from drpo_core.interfaces import FeatureContext, FeatureSpace
from drpo_core.pooling import channel_rms, patch_stats, spatial_stats, spatial_tokens


class LatentFeatures(FeatureSpace):
    input = "latents"

    def __init__(self, keys: Sequence[str], stride: int = 1) -> None:
        self.keys, self.stride = list(keys), stride

    def features(self, x: torch.Tensor, context: FeatureContext | None = None) -> dict[str, torch.Tensor]:
        x = x.float()
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key == "latent":
                out[key] = spatial_tokens(x, self.stride)
            elif key == "latent_norm":
                out[key] = channel_rms(x)
            else:
                _, stat, *patch = key.split("_")
                if patch:
                    try:
                        mean, std = patch_stats(x, int(patch[0]))
                    except ValueError as error:
                        raise ComponentError(f"latent feature key {key!r}: {error} (latents of shape "
                                             f"{tuple(x.shape[1:])})") from None
                else:
                    mean, std = spatial_stats(x)
                out[key] = mean if stat == "mean" else std
        return out
