"""Sampling noise, drawn on the CPU from generators keyed by what it is for.

Training noise of candidate ``c`` of the prompt at global stream position ``i`` is keyed by
(run seed, i, c); evaluation and ``drpo sample`` use negative positions, so they never share noise
with training. Drawing on the CPU makes samples independent of the device and the process count.
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
