"""A frozen feature space for the toy world that sees counts, colours, shapes and layout.

Particle sets (``{key: (B, T, D)}``); the drift field pools each key's particles over a prompt's
candidates, so a key per image *location* compares candidates location by location:

* ``patch8@r,c``: the 8x8 pixel patch of grid cell (r, c), one particle (16 keys);
* ``patch4@r,c``: the four 4x4 patches inside that cell, as a set of four particles (16 keys);
* ``pool4``: the image average-pooled to 8x8, one particle: the coarse layout;
* ``color``: the mean colour;
* ``edges``: mean edge strength in 8 directions (0, 22.5, ... 157.5 degrees): a bar's edges are
  mostly horizontal, a pillar's vertical, a circle's spread over all directions;
* ``edge_cells``: the same 8 directions per 8x8 cell, as a set of 16 particles (local shape);
* ``cnn1..3``: per-channel mean and std of a fixed, randomly initialised 3-layer CNN: global
  texture statistics (how much edge, corner, colour). Without them the pixel keys alone trained
  poorly in the prototype.
* ``enc`` and ``enc_cells``: the count-aware encoder of ``encoder.py`` (trained once on renders,
  frozen), its pooled embedding (one particle) and its 4x4 map as a set of 16 particles. The pixel
  keys see an object's shape where one is drawn; these see how many there are.

Nothing here is trainable; everything is differentiable with respect to the input image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drpo_core.interfaces import FeatureContext, FeatureSpace

CELL = 8
DIRECTIONS = 8


class RandomCNN(nn.Module):
    """Three conv layers with a seeded random init (the same on every machine), frozen."""

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (16, 32, 32)):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers, in_channels = [], 3
        for i, out_channels in enumerate(widths):
            conv = nn.Conv2d(in_channels, out_channels, 3, stride=1 if i == 0 else 2, padding=1)
            fan_in = in_channels * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if conv.bias is not None:
                    conv.bias.zero_()
            layers.append(conv)
            in_channels = out_channels
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for conv in self.layers:
            x = F.relu(conv(x))
            outputs.append(x)
        return outputs


def directional_edges(x: torch.Tensor) -> torch.Tensor:
    """Edge strength binned by gradient direction (8 bins over 180 degrees), summed over RGB: (B, 8, H, W).

    Each pixel's gradient magnitude goes to the bins near its direction with weight cos^8 of the
    angle between them (about 25 degrees wide), so a box's edges land in the 0 and 90 degree bins.
    """
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / 2
    gy = (padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / 2
    magnitude = (gx.pow(2) + gy.pow(2) + 1e-6).sqrt()  # smooth: defined at 0
    angles = torch.arange(DIRECTIONS, device=x.device, dtype=x.dtype) * (torch.pi / DIRECTIONS)
    cos = ((gx / magnitude).unsqueeze(1) * angles.cos()[None, :, None, None, None]
           + (gy / magnitude).unsqueeze(1) * angles.sin()[None, :, None, None, None])  # (B, 8, 3, H, W)
    return (cos.square_().square_().square_() * magnitude.unsqueeze(1)).sum(dim=2)  # cos^8 x magnitude


class ShapesFeatures(FeatureSpace):
    input = "images"

    def __init__(self, seed: int = 0, exclude: tuple[str, ...] | list[str] = (), encoder: bool = True):
        from drpo_shapes.encoder import load_encoder

        self.cnn = RandomCNN(seed)
        self.exclude = tuple(exclude)
        self.encoder = load_encoder() if encoder else None

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        batch, _, height, width = x.shape
        rows, cols = height // CELL, width // CELL
        out: dict[str, torch.Tensor] = {}
        patch8 = F.unfold(x, CELL, stride=CELL).transpose(1, 2)  # (B, rows*cols, 3*8*8)
        # 4x4 patches grouped by the 8x8 cell they lie in: (B, rows, cols, 4, 3*4*4)
        patch4 = x.reshape(batch, 3, rows, 2, 4, cols, 2, 4).permute(0, 2, 5, 3, 6, 1, 4, 7)
        patch4 = patch4.reshape(batch, rows, cols, 4, 3 * 4 * 4)
        for r in range(rows):
            for c in range(cols):
                out[f"patch8@{r},{c}"] = patch8[:, r * cols + c].unsqueeze(1)
                out[f"patch4@{r},{c}"] = patch4[:, r, c]
        out["pool4"] = F.avg_pool2d(x, 4).flatten(1).unsqueeze(1)
        out["color"] = x.mean(dim=(2, 3)).unsqueeze(1)
        edges = directional_edges(x)  # (B, 8, H, W)
        out["edges"] = edges.mean(dim=(2, 3)).unsqueeze(1)
        out["edge_cells"] = F.avg_pool2d(edges, CELL).flatten(2).transpose(1, 2)  # (B, rows*cols, 8)
        for i, h in enumerate(self.cnn(x), start=1):
            stats = torch.cat([h.mean(dim=(2, 3)), h.flatten(2).std(dim=2)], dim=1)
            out[f"cnn{i}"] = stats.unsqueeze(1)
        if self.encoder is not None:
            cells = self.encoder.spatial(x)  # (B, 64, 4, 4)
            out["enc"] = self.encoder.embed(cells).unsqueeze(1)
            out["enc_cells"] = cells.flatten(2).transpose(1, 2)
        return {key: value for key, value in out.items() if not key.startswith(self.exclude)} if self.exclude else out

    def to(self, device: torch.device | str) -> ShapesFeatures:
        self.cnn.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self
