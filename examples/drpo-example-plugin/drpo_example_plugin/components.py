"""The components themselves (imported only when a run builds them: this is where torch lives)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from drpo_core.interfaces import Ranker


class IMQKernel:
    """Inverse multiquadric logits ``-beta * log(1 + (d / (s r))^2)``, a :class:`drpo_core.interfaces.Kernel`.

    exp(logits) = (1 + (d / (s r))^2)^-beta: like the Laplacian kernel near zero distance but with
    polynomial rather than exponential tails, so far particles keep a little pull.
    """

    def __init__(self, beta: float = 0.5):
        self.beta = beta

    def __call__(self, dist: Tensor, scale: Tensor, radius: float, x: Tensor, targets: Tensor) -> Tensor:
        return -self.beta * torch.log1p((dist / (scale * radius)).pow(2))


class WarmthRanker(Ranker):
    """Mean red minus mean blue of images in [0, 1]: higher is warmer."""

    def __init__(self, invert: bool = False):
        self.sign = -1.0 if invert else 1.0

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None]) -> Tensor:
        images = images.float()
        warmth = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        return (self.sign * warmth).cpu()
