"""Tiny latent-MAE checkpoints in the released layout, for tests (ours and plugin authors')."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def tiny_state_dict(widths: Sequence[int] = (4, 8, 8, 16), layers: Sequence[int] = (1, 1, 1, 1),
                    in_channels: int = 4, stem: int | None = None, seed: int = 0,
                    flax: bool = True) -> dict[str, torch.Tensor]:
    """Random encoder weights named as the released checkpoint (``encoder.*``; flax ``kernel`` HWIO and GroupNorm
    ``scale`` when ``flax``, else PyTorch ``weight`` OIHW). ``stem``: the stem width (default ``widths[0]``)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, size: int) -> None:
        weight = torch.randn(cout, cin, size, size, generator=generator) * (2.0 / (cin * size * size)) ** 0.5
        if flax:
            state[f"{name}.kernel"] = weight.permute(2, 3, 1, 0).contiguous()
        else:
            state[f"{name}.weight"] = weight

    def norm(name: str, channels: int) -> None:
        state[f"{name}.{'scale' if flax else 'weight'}"] = 1 + 0.1 * torch.randn(channels, generator=generator)
        state[f"{name}.bias"] = 0.1 * torch.randn(channels, generator=generator)

    channels = stem or widths[0]
    conv("encoder.conv1", in_channels, channels, 3)
    norm("encoder.gn1", channels)
    for i, (width, blocks) in enumerate(zip(widths, layers, strict=True)):
        for j in range(blocks):
            prefix = f"encoder.stages_{i}.layers_{j}"
            conv(f"{prefix}.conv1", channels, width, 3)
            norm(f"{prefix}.gn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            norm(f"{prefix}.gn2", width)
            if (i > 0 and j == 0) or channels != width:
                conv(f"{prefix}.proj_conv", channels, width, 1)
                norm(f"{prefix}.proj_gn", width)
            channels = width
        norm(f"encoder.layer{i + 1}_norm", channels)
    return state


def write_tiny_checkpoint(path: str | Path, widths: Sequence[int] = (4, 8, 8, 16),
                          layers: Sequence[int] = (1, 1, 1, 1), *, seed: int = 0, flax: bool = True,
                          prefix: str = "module._orig_mod.", metadata: bool = True) -> Path:
    """A tiny checkpoint as released: ``{"state_dict": {prefix + key: ...}, "metadata": {"model_config":
    {"layers": ...}}}`` saved with ``torch.save`` (``.pth``/``.pt``), or a ``.safetensors`` file with
    ``model_config`` as JSON in its header."""
    path = Path(path)
    state = {prefix + key: value for key, value in tiny_state_dict(widths, layers, seed=seed, flax=flax).items()}
    config = {"layers": list(layers), "base_channels": widths[0]}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"model_config": json.dumps(config)} if metadata else None)
    else:
        torch.save({"state_dict": state, "metadata": {"model_config": config} if metadata else {}}, path)
    return path
