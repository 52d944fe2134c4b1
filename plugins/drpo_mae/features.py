"""The ``latent-mae`` feature space: statistics of the latent-MAE encoder's maps as particle sets."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from drpo_core.errors import ComponentError, ConfigError
from drpo_core.interfaces import FeatureContext, FeatureSpace
from drpo_core.pooling import channel_rms, patch_stats, spatial_stats, spatial_tokens
from drpo_mae.encoder import LatentMAEEncoder

#: ``{map}``, ``{map}_mean``, ``{map}_std``, ``{map}_mean_P``, ``{map}_std_P`` (P >= 2); map: conv1, layerK, layerK_blkB
KEY = re.compile(r"(?P<map>conv1|layer(?P<stage>[1-9][0-9]*)(?:_blk(?P<block>[1-9][0-9]*))?)"
                 r"(?:_(?P<stat>mean|std)(?:_(?P<patch>[2-9]|[1-9][0-9]+))?)?")
#: statistics of the latents themselves (the official ``include_input_sq_mean`` keys)
INPUT_KEYS = ("norm_x", "input_x2_mean")


def check_key(key: str) -> None:
    """Raise ValueError for a key outside the grammar (the options validate with it)."""
    if key not in INPUT_KEYS and not KEY.fullmatch(key):
        raise ValueError(f"unknown key {key!r}: use MAP, MAP_mean, MAP_std, MAP_mean_P or MAP_std_P with MAP one "
                         f"of conv1, layerK, layerK_blkB (P: patch size >= 2), or {' / '.join(INPUT_KEYS)}")


class LatentMAEFeatures(FeatureSpace):
    """Particles ``{key: (B, T, C)}`` from the frozen encoder's maps of the generator's latents."""

    input = "latents"

    def __init__(self, encoder: LatentMAEEncoder, keys: Sequence[str], source: str | Path = "") -> None:
        self.encoder, self.keys = encoder, list(keys)
        self.maps: set[str] = set()
        for key in self.keys:
            match = KEY.fullmatch(key)
            if match is None:
                check_key(key)
                continue
            stage, block = match["stage"], match["block"]
            if stage is not None and int(stage) > len(encoder.layers):
                raise ConfigError(f"features.keys: {key!r} needs stage {stage}, and the checkpoint {source} has "
                                  f"{len(encoder.layers)} stages")
            if block is not None and int(block) >= encoder.layers[int(stage) - 1]:
                raise ConfigError(f"features.keys: {key!r}: stage {stage} of {source} has {encoder.layers[int(stage) - 1]} "
                                  f"blocks, and layer{stage}_blkB names the output of block B < "
                                  f"{encoder.layers[int(stage) - 1]} (layer{stage} is the stage's output)")
            self.maps.add(match["map"])

    def to(self, device: torch.device | str) -> LatentMAEFeatures:
        self.encoder.to(device)
        return self

    def features(self, x: torch.Tensor, context: FeatureContext | None = None) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.encoder.in_channels:
            raise ComponentError(f"latent-MAE takes latents (B, {self.encoder.in_channels}, H, W), got "
                                 f"{tuple(x.shape)}")
        maps = self.encoder.maps(x, self.maps)
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key == "norm_x":
                out[key] = channel_rms(x)
                continue
            if key == "input_x2_mean":
                out[key] = x.square().mean(dim=(2, 3)).unsqueeze(1)
                continue
            match = KEY.fullmatch(key)
            assert match is not None
            value = maps[match["map"]]
            if match["stat"] is None:
                out[key] = spatial_tokens(value)
                continue
            if match["patch"] is None:
                mean, std = spatial_stats(value)
            else:
                p = int(match["patch"])
                if value.shape[2] % p or value.shape[3] % p:
                    raise ComponentError(
                        f"latent-MAE key {key!r}: {match['map']}'s {value.shape[2]}x{value.shape[3]} map (from latents "
                        f"{x.shape[2]}x{x.shape[3]}) does not split into {p}x{p} patches: choose keys for this size "
                        "(512 px SD latents are 64x64, layer4 8x8)")
                mean, std = patch_stats(value, p)
            out[key] = mean if match["stat"] == "mean" else std
        return out
