"""Latent statistics as particle sets; see the package docstring for the keys."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from drpo_core.interfaces import FeatureContext, FeatureSpace


def _grid_stats(x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std inside each cell of a grid x grid partition: (B, grid*grid, C) each."""
    mean = F.adaptive_avg_pool2d(x, grid)
    var = (F.adaptive_avg_pool2d(x * x, grid) - mean * mean).clamp_min(0)
    std = (var + 1e-6).sqrt()
    return mean.flatten(2).transpose(1, 2), std.flatten(2).transpose(1, 2)


class LatentFeatures(FeatureSpace):
    input = "latents"

    def __init__(self, keys: Sequence[str], stride: int = 4):
        self.keys, self.stride = list(keys), stride

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        x = x.float()
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key == "latent":
                out[key] = x[:, :, :: self.stride, :: self.stride].flatten(2).transpose(1, 2)
                continue
            _, stat, *grid = key.split("_")
            mean, std = _grid_stats(x, int(grid[0]) if grid else 1)
            out[key] = mean if stat == "mean" else std
        return out
