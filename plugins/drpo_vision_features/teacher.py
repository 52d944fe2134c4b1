"""Teacher-UNet features (method.md §5.3): the frozen base UNet's activations at chosen blocks.

For latents x (the generator's scaled latents) and each row's prompt, the base UNet runs once on
``x + noise_level * xi`` at ``timestep`` (no ``scale_model_input``, as the official code) with the prompt's
text conditioning from the generator (SDXL: pooled embeddings and time ids ``[r, r, 0, 0, r, r]``);
forward hooks take the output of each block in ``blocks`` (the first element of a tuple), which is
average-pooled ``pool`` x ``pool`` (adaptive 1x1 when the map is smaller) and flattened: one particle
per block and image, keyed by the block's name. The forward stops after the last block it needs.

**The noise xi** is derived from each row's own noise (``FeatureContext.noise``): a CPU generator
seeded with SHA-256 of (``seed``, the row's noise values). A candidate, its copy as an anchor and the
reference sample on the same noise all see the same xi, on every call, device and process. Rows
without noise (offline pairs, real images, extra rollouts) seed it from their prompt and their own
values instead. The official code draws xi afresh per call.

**The teacher** is the generator's own UNet with its LoRA adapters off, through the forward *and* the
backward (``TurboGenerator.frozen_base``): with gradient checkpointing each block is recomputed in the
backward with the adapters off again; a plain recompute would run after they are back on and give a
silently wrong gradient. Its base weights never require grad: the gradient reaches only the latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from drpo_core.errors import PluginError
from drpo_core.interfaces import FeatureContext, FeatureSpace

#: the UNet's top-level blocks, in the order its forward runs them (``up_blocks.N`` after ``mid_block``)
_TOP_LEVEL = ("down_blocks", "mid_block", "up_blocks")


@runtime_checkable
class BaseUNetProvider(Protocol):
    """What the teacher needs from a generator (``drpo_diffusers.generator.TurboGenerator`` has it)."""

    def frozen_base(self, checkpointing: bool = True) -> AbstractContextManager[torch.nn.Module]: ...

    def unet_conditioning(self, prompts: Sequence[str], dtype: torch.dtype | None = None) -> dict[str, Any]: ...


class _Done(Exception):
    """Raised by the hook of the last block needed: the rest of the UNet does not run."""


class TeacherUNetFeatures(FeatureSpace):
    input = "latents"

    def __init__(self, blocks: Sequence[str], *, noise_level: float = 0.1, timestep: int = 100, pool: int = 4,
                 checkpointing: bool = True, seed: int = 0) -> None:
        if not blocks:
            raise PluginError("teacher-unet: blocks must name at least one UNet module")
        self.blocks = list(dict.fromkeys(blocks))
        self.noise_level, self.timestep, self.pool = noise_level, timestep, pool
        self.checkpointing, self.seed = checkpointing, seed

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        generator = context.generator
        if not isinstance(generator, BaseUNetProvider):
            raise PluginError(f"teacher-unet needs a generator with a frozen base UNet (frozen_base, "
                              f"unet_conditioning), not {type(generator).__name__}")
        xi = self.feature_noise(x, context)
        captured: dict[str, torch.Tensor] = {}
        with generator.frozen_base(self.checkpointing) as unet:
            dtype = next(unet.parameters()).dtype
            cond = generator.unet_conditioning(context.prompts, dtype)
            timestep = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
            with self._hooks(unet, captured):
                try:
                    unet((x + self.noise_level * xi).to(dtype), timestep, **cond, return_dict=False)
                except _Done:
                    pass
        return {name: self._pool(captured[name]) for name in self.blocks}

    def feature_noise(self, x: torch.Tensor, context: FeatureContext) -> torch.Tensor:
        """xi for each row, derived from its noise (or, without, its prompt and values): see the module docs."""
        rows = []
        for i in range(x.shape[0]):
            digest = hashlib.sha256(f"drpo teacher-unet xi {self.seed}".encode())
            if context.noise is not None:
                digest.update(context.noise[i].detach().float().cpu().contiguous().numpy().tobytes())
            else:
                digest.update(f"\0no noise\0{context.prompts[i]}\0".encode())
                digest.update(x[i].detach().float().cpu().contiguous().numpy().tobytes())
            cpu = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))
            rows.append(torch.randn(tuple(x.shape[1:]), generator=cpu))
        return torch.stack(rows).to(x.device, torch.float32)

    def _pool(self, feature: torch.Tensor) -> torch.Tensor:
        feature = feature.float()
        if feature.ndim == 4 and self.pool > 1:
            if min(feature.shape[-2:]) >= self.pool:
                feature = F.avg_pool2d(feature, kernel_size=self.pool, stride=self.pool)
            else:
                feature = F.adaptive_avg_pool2d(feature, 1)
        return feature.flatten(1).unsqueeze(1)

    def _hooks(self, unet: torch.nn.Module, captured: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
        modules = dict(unet.named_modules())
        missing = [name for name in self.blocks if name not in modules]
        if missing:
            tops = [f"{kind}.{i}" for kind in ("down_blocks", "up_blocks") for i in range(len(getattr(unet, kind, [])))]
            raise PluginError(f"teacher-unet: the UNet has no module {missing[0]!r} (its blocks: "
                              f"{', '.join(sorted(tops) + ['mid_block'])})")
        last = _last_top_level(unet, self.blocks)
        return _Hooks([(modules[name], name) for name in self.blocks], captured,
                      modules[last] if last is not None else None)


class _Hooks(AbstractContextManager[None]):
    """Forward hooks that capture the blocks' outputs, and stop the forward after ``stop`` ran."""

    def __init__(self, targets: list[tuple[torch.nn.Module, str]], captured: dict[str, torch.Tensor],
                 stop: torch.nn.Module | None) -> None:
        self.targets, self.captured, self.stop = targets, captured, stop
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        for module, name in self.targets:
            self.handles.append(module.register_forward_hook(self._capture(name)))
        if self.stop is not None:  # registered last: runs after the capture of the same module
            self.handles.append(self.stop.register_forward_hook(self._halt))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _capture(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if not isinstance(value, torch.Tensor):
                raise PluginError(f"teacher-unet: block {name!r} returned {type(value).__name__}, not a tensor")
            self.captured[name] = value

        return hook

    @staticmethod
    def _halt(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        raise _Done


def _last_top_level(unet: torch.nn.Module, blocks: Sequence[str]) -> str | None:
    """The top-level block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) that runs last among those
    holding ``blocks``; None when a block lies outside them (then the whole UNet runs)."""
    order = list(_top_level_order(unet))
    positions = []
    for name in blocks:
        parts = name.split(".")
        top = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
        if top not in order:
            return None
        positions.append(order.index(top))
    return order[max(positions)]


def _top_level_order(unet: torch.nn.Module) -> Iterator[str]:
    for kind in _TOP_LEVEL:
        child = getattr(unet, kind, None)
        if isinstance(child, torch.nn.ModuleList):
            yield from (f"{kind}.{i}" for i in range(len(child)))
        elif isinstance(child, torch.nn.Module):
            yield kind
