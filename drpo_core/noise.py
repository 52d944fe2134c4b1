"""Sampling noise, drawn on the CPU from generators keyed by what it is for.

Training noise of candidate ``c`` of the prompt at global stream position ``i`` is keyed by
(run seed, i, c); the held-out evaluation during training uses negative positions, so it never shares
noise with training. ``drpo sample`` and ``drpo eval`` key theirs as the paper's evaluation does
(:func:`protocol_noise`). Drawing on the CPU makes samples independent of the device and the process count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def noise_seed(run_seed: int, prompt_index: int, candidate: int) -> int:
    digest = hashlib.sha256(f"drpo-noise:{run_seed}:{prompt_index}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_noise(shape: Sequence[int], run_seed: int, prompt_index: int, candidates: range) -> torch.Tensor:
    """Noise of ``candidates`` of one prompt, stacked: ``(len(candidates), *shape)``."""
    return torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(run_seed, prompt_index, c)))
        for c in candidates
    ])


def sample_noise(shape: Sequence[int], prompt_position: int, seed: int) -> torch.Tensor:
    """The noise of (prompt, seed) at evaluation and sampling time: disjoint from training noise."""
    return make_noise(shape, seed, -1 - prompt_position, range(1))[0]


#: the paper's evaluation keys a sample's noise by ``seed * PROTOCOL_STRIDE + prompt_id`` (method.md §10)
PROTOCOL_STRIDE = 10**6


def protocol_noise(shape: Sequence[int], prompt_id: int, seed: int) -> torch.Tensor:
    """The noise of ``drpo sample`` and ``drpo eval`` for the prompt at ``prompt_id`` (its 0-based position in
    the prompt file, so a subset draws what the full set draws) and ``seed``: a CPU generator seeded with
    ``seed * 10**6 + prompt_id``, as the paper's evaluation keys it (where its generator lived is not
    recorded, so the images are not claimed equal to the paper's)."""
    if not 0 <= prompt_id < PROTOCOL_STRIDE:
        raise ValueError(f"prompt_id must be in [0, {PROTOCOL_STRIDE}), got {prompt_id}")
    generator = torch.Generator().manual_seed(seed * PROTOCOL_STRIDE + prompt_id)
    return torch.randn(tuple(shape), generator=generator)
