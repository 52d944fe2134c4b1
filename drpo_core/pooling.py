"""Statistics of feature maps as particle sets, shared by the feature spaces of method.md §5.

A feature map ``x`` is ``(B, C, H, W)``; every function returns ``(B, T, C)``: T particles of dimension C
per input, the layout ``FeatureSpace.features`` hands to the drift field. They follow the official
extractors exactly (``safe_std``: the two-pass variance, ``sqrt(var + 1e-6)``), in the input's dtype.

* :func:`spatial_tokens`: every position as a particle (H*W, row-major);
* :func:`spatial_stats`: channel mean and std over the whole map (one particle each);
* :func:`patch_stats`: channel mean and std inside each non-overlapping p x p patch
  ((H/p)(W/p) particles, patches in row-major order): the paper's ``{name}_mean_p`` / ``{name}_std_p``;
* :func:`channel_rms`: ``sqrt(mean(x^2))`` per channel (one particle): the official ``latent_norm`` / ``norm_x``.
"""

from __future__ import annotations

import torch

#: added to the variance before the square root, as the official ``safe_std``
STD_EPS = 1e-6


def _std(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``sqrt(mean((x - mean)^2) + eps)`` over ``dims``, computed in float32 at least."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var = (wide - wide.mean(dim=dims, keepdim=True)).square().mean(dim=dims)
    return (var.clamp_min(0) + STD_EPS).sqrt().to(x.dtype)


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a feature map (B, C, H, W), got shape {tuple(x.shape)}")


def spatial_tokens(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Every ``stride``-th position of each row and column as a particle: ``(B, ceil(H/s)*ceil(W/s), C)``."""
    _check(x)
    return x[:, :, ::stride, ::stride].flatten(2).transpose(1, 2)


def spatial_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std over the whole map: ``(B, 1, C)`` each."""
    _check(x)
    return x.mean(dim=(2, 3)).unsqueeze(1), _std(x, (2, 3)).unsqueeze(1)


def patch_stats(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std inside each non-overlapping ``p x p`` patch: ``(B, (H/p)(W/p), C)`` each.

    ``H`` and ``W`` must be multiples of ``p`` (the official code drops the key otherwise; here it is an error).
    """
    _check(x)
    B, C, H, W = x.shape
    if p < 1 or H % p or W % p:
        raise ValueError(f"a {H}x{W} map does not split into {p}x{p} patches")
    patches = x.reshape(B, C, H // p, p, W // p, p)
    mean = patches.mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    std = _std(patches, (3, 5)).flatten(2).transpose(1, 2)
    return mean, std


def channel_rms(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean(x^2))`` over the map, per channel: ``(B, 1, C)``."""
    _check(x)
    return x.float().square().mean(dim=(2, 3)).clamp_min(0).sqrt().to(x.dtype).unsqueeze(1)
