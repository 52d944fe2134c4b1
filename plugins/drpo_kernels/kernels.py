"""Drift kernels: logits of the affinity between generated particles and targets (larger = closer).

Signature of :class:`drpo_core.interfaces.Kernel`: ``kernel(dist, scale, radius, x, targets)`` with ``dist``
(B, N, J) Euclidean distances in feature units, ``scale`` = s (B, 1, 1) the weighted mean distance, ``radius``
= r the relative temperature, and the unscaled features ``x`` (B, N, D), ``targets`` (B, J, D).
"""

from __future__ import annotations

import torch
from torch import Tensor


def laplacian(dist: Tensor, scale: Tensor, radius: float, x: Tensor, targets: Tensor) -> Tensor:
    """-d / (s r): the official default (also called "exponential")."""
    return dist * (-1.0 / (scale * radius))  # one pass over (B, N, J): multiply by a (B, 1, 1) factor


def rbf(dist: Tensor, scale: Tensor, radius: float, x: Tensor, targets: Tensor) -> Tensor:
    """-(d / (s r))^2 / 2: Gaussian kernel."""
    return (dist * (1.0 / (scale * radius))).square_().mul_(-0.5)


def cosine(dist: Tensor, scale: Tensor, radius: float, x: Tensor, targets: Tensor) -> Tensor:
    """cos(x, T) / r: ignores distances and the scale (cosine is scale invariant)."""
    x_hat = torch.nn.functional.normalize(x, dim=-1)
    t_hat = torch.nn.functional.normalize(targets, dim=-1)
    return x_hat @ t_hat.transpose(-1, -2) / radius


KERNELS = {"laplacian": laplacian, "exponential": laplacian, "rbf": rbf, "cosine": cosine}
