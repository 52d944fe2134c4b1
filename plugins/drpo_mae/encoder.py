"""The latent-MAE encoder of *Generative Modeling via Drifting*, read from its released checkpoint.

Architecture (method.md §5.1), run functionally on frozen tensors (no ``nn.Parameter``):

* stem: 3x3 conv, stride 1, padding 1 -> GroupNorm -> ReLU (``encoder.conv1``, ``encoder.gn1``);
* four stages of ResNet basic blocks (``layers``, [3, 4, 6, 3] for MAE-256), the first block of stages 2-4
  with stride 2; a block is conv3x3-GN-ReLU-conv3x3-GN plus the input, projected by a 1x1 conv and GN
  when its shape changes, then ReLU (``encoder.stages_{i}.layers_{j}.{conv1,gn1,conv2,gn2,proj_conv,proj_gn}``);
* after each stage a GroupNorm ``encoder.layer{k}_norm``, whose output feeds the next stage.

GroupNorm uses the largest divisor of C that is at most 32 as its group count, eps 1e-5. Convolutions
have no bias.

Checkpoint formats: a ``torch.save`` file read with ``weights_only=True`` holding
``{"state_dict": ..., "metadata": {"model_config": {"layers": [...]}}}`` (or ``model_state_dict``, or the
bare state dict), or a ``.safetensors`` file (its header metadata may hold ``model_config`` as JSON).
Keys may carry ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``); flax names (``kernel`` in
HWIO layout, GroupNorm ``scale``) and PyTorch names (``weight`` in OIHW) are both read. Keys outside
``encoder.`` (an MAE decoder) are ignored. Without ``layers`` metadata the stage depths are read from the keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from drpo_core.assets import load_checkpoint
from drpo_core.errors import AssetError

GN_EPS = 1e-5
PREFIXES = ("module.", "_orig_mod.")
#: the layout expected, for error messages
LAYOUT = ("encoder.conv1.kernel, encoder.gn1.{scale,bias}, encoder.stages_{i}.layers_{j}.{conv1,gn1,conv2,gn2,"
          "proj_conv,proj_gn}.*, encoder.layer{k}_norm.*")


def gn_groups(channels: int, most: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``most``."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder tensors (prefixes stripped) and the ``model_config`` of a checkpoint file."""
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            raise AssetError(f"checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                state: Any = {key: handle.get_tensor(key) for key in handle.keys()}
                header = handle.metadata() or {}
        except Exception as error:
            raise AssetError(f"{path} is not a readable safetensors file ({error})") from None
        if "model_config" in header:
            try:
                metadata = {"model_config": json.loads(header["model_config"])}
            except ValueError:
                raise AssetError(f"{path}: its model_config metadata is not JSON") from None
    else:
        loaded = load_checkpoint(path)
        state = loaded
        if isinstance(loaded, Mapping):
            for wrapper in ("state_dict", "model_state_dict"):
                if isinstance(loaded.get(wrapper), Mapping):
                    state = loaded[wrapper]
                    found = loaded.get("metadata")
                    metadata = dict(found) if isinstance(found, Mapping) else {}
                    break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"{path} holds no state dict of tensors (a dict, or one under 'state_dict' / "
                         "'model_state_dict'): not a latent-MAE checkpoint")
    tensors = {_strip(str(key)): value for key, value in state.items()}
    config = metadata.get("model_config") if isinstance(metadata, Mapping) else None
    return tensors, dict(config) if isinstance(config, Mapping) else {}


@dataclass
class _Reader:
    """Walks the architecture over a state dict, converting tensors and noting missing keys."""

    path: Path
    state: dict[str, torch.Tensor]
    used: set[str]
    missing: list[str]
    weights: dict[str, torch.Tensor]

    def _take(self, *names: str) -> tuple[str, torch.Tensor] | None:
        for name in names:
            if name in self.state:
                self.used.add(name)
                return name, self.state[name]
        return None

    def conv(self, prefix: str, in_channels: int | None) -> int | None:
        """Store ``prefix`` as an OIHW weight; return its output channels (None when missing).

        The layout follows the name (flax ``kernel``: HWIO, ``weight``: OIHW) unless only the other one
        takes ``in_channels`` inputs (the official loader decides by shape alone)."""
        found = self._take(f"{prefix}.kernel", f"{prefix}.weight")
        if found is None:
            self.missing.append(f"{prefix}.kernel")
            return None
        name, tensor = found
        if tensor.ndim != 4:
            raise AssetError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, not a 2-d convolution kernel")
        flax = name.endswith(".kernel")
        if in_channels is not None:
            fits_hwio, fits_oihw = tensor.shape[2] == in_channels, tensor.shape[1] == in_channels
            if not (fits_hwio or fits_oihw):
                raise AssetError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, which takes no "
                                 f"{in_channels}-channel input (as HWIO or OIHW)")
            flax = fits_hwio if fits_hwio != fits_oihw else flax
        if flax:  # (H, W, I, O) -> (O, I, H, W)
            tensor = tensor.permute(3, 2, 0, 1)
        self.weights[f"{prefix}.weight"] = tensor.contiguous()
        return int(tensor.shape[0])

    def norm(self, prefix: str, channels: int | None) -> None:
        scale, bias = self._take(f"{prefix}.scale", f"{prefix}.weight"), self._take(f"{prefix}.bias")
        if scale is None:
            self.missing.append(f"{prefix}.scale")
        if bias is None:
            self.missing.append(f"{prefix}.bias")
        for found, key in ((scale, "weight"), (bias, "bias")):
            if found is None:
                continue
            if channels is not None and tuple(found[1].shape) != (channels,):
                raise AssetError(f"{self.path}: {found[0]} has shape {tuple(found[1].shape)}, expected ({channels},)")
            self.weights[f"{prefix}.{key}"] = found[1].contiguous()


def _stage_depths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    depths: list[int] = []
    while any(key.startswith(f"encoder.stages_{len(depths)}.layers_0.") for key in state):
        i = len(depths)
        depths.append(next(j for j in range(10_000) if not any(
            key.startswith(f"encoder.stages_{i}.layers_{j}.") for key in state)))
    return tuple(depths) or (3, 4, 6, 3)


class LatentMAEEncoder:
    """The frozen encoder: ``maps(latents, wanted)`` gives the named feature maps ``(B, C, H, W)``."""

    def __init__(self, weights: dict[str, torch.Tensor], layers: tuple[int, ...], in_channels: int,
                 widths: tuple[int, ...]) -> None:
        self.weights, self.layers, self.in_channels, self.widths = weights, layers, in_channels, widths

    @classmethod
    def load(cls, path: str | Path) -> LatentMAEEncoder:
        path = Path(path)
        tensors, config = read_checkpoint(path)
        state = {key: value for key, value in tensors.items() if key.startswith("encoder.")}
        try:
            layers = tuple(int(n) for n in config["layers"]) if "layers" in config else _stage_depths(state)
        except (TypeError, ValueError):
            raise AssetError(f"{path}: model_config layers {config.get('layers')!r} is not a list of integers") from None
        in_channels = int(config["in_channels"]) if "in_channels" in config else _in_channels(state)
        reader = _Reader(path, state, set(), [], {})
        channels = reader.conv("encoder.conv1", in_channels)
        reader.norm("encoder.gn1", channels)
        widths = []
        for i, blocks in enumerate(layers):
            for j in range(blocks):
                prefix = f"encoder.stages_{i}.layers_{j}"
                stride = 2 if i > 0 and j == 0 else 1
                out = reader.conv(f"{prefix}.conv1", channels) or channels
                reader.norm(f"{prefix}.gn1", out)
                reader.conv(f"{prefix}.conv2", out)
                reader.norm(f"{prefix}.gn2", out)
                if stride != 1 or out != channels:
                    reader.conv(f"{prefix}.proj_conv", channels)
                    reader.norm(f"{prefix}.proj_gn", out)
                channels = out
            reader.norm(f"encoder.layer{i + 1}_norm", channels)
            widths.append(channels or 0)
        unexpected = sorted(set(state) - reader.used)
        if reader.missing or unexpected:
            found = sorted(tensors)
            raise AssetError(
                f"{path} does not match the latent-MAE encoder layout (layers {list(layers)}): "
                + _listing("missing", reader.missing) + _listing("unexpected", unexpected)
                + f"expected {LAYOUT}; found {len(found)} keys: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}"
            )
        return cls(reader.weights, layers, in_channels or 0, tuple(widths))

    def to(self, device: torch.device | str) -> LatentMAEEncoder:
        self.weights = {key: value.to(device) for key, value in self.weights.items()}
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["encoder.conv1.weight"].dtype

    # -- the network ------------------------------------------------------------------------------

    def _conv(self, x: torch.Tensor, prefix: str, stride: int = 1, padding: int = 1) -> torch.Tensor:
        return F.conv2d(x, self.weights[f"{prefix}.weight"], stride=stride, padding=padding)

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.group_norm(x, gn_groups(x.shape[1]), self.weights[f"{prefix}.weight"],
                            self.weights[f"{prefix}.bias"], eps=GN_EPS)

    def _block(self, x: torch.Tensor, prefix: str, stride: int) -> torch.Tensor:
        y = F.relu(self._norm(self._conv(x, f"{prefix}.conv1", stride), f"{prefix}.gn1"))
        y = self._norm(self._conv(y, f"{prefix}.conv2"), f"{prefix}.gn2")
        residual = x
        if residual.shape != y.shape:
            residual = self._norm(self._conv(x, f"{prefix}.proj_conv", stride, padding=0), f"{prefix}.proj_gn")
        return F.relu(residual + y)

    def maps(self, latents: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        """The maps named in ``wanted`` (``conv1``, ``layer{k}``, ``layer{k}_blk{b}``), computing no further
        than the deepest one."""
        x = latents.to(self.dtype)
        out: dict[str, torch.Tensor] = {}
        x = F.relu(self._norm(self._conv(x, "encoder.conv1"), "encoder.gn1"))
        if "conv1" in wanted:
            out["conv1"] = x
        for i, blocks in enumerate(self.layers):
            if len(out) == len(wanted):
                break
            for j in range(blocks):
                x = self._block(x, f"encoder.stages_{i}.layers_{j}", 2 if i > 0 and j == 0 else 1)
                if f"layer{i + 1}_blk{j + 1}" in wanted:
                    out[f"layer{i + 1}_blk{j + 1}"] = x
            x = self._norm(x, f"encoder.layer{i + 1}_norm")
            if f"layer{i + 1}" in wanted:
                out[f"layer{i + 1}"] = x
        return out


def _in_channels(state: Mapping[str, torch.Tensor]) -> int | None:
    """The latent channels, from the stem kernel: flax ``kernel`` HWIO (dim 2), PyTorch ``weight`` OIHW (dim 1)."""
    for name, dim in (("encoder.conv1.kernel", 2), ("encoder.conv1.weight", 1)):
        kernel = state.get(name)
        if kernel is not None and kernel.ndim == 4:
            return int(kernel.shape[dim])
    return None


def _listing(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{len(keys)} {what} ({shown}); "
