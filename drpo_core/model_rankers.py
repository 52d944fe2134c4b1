"""The scoring loop rankers on a frozen model share (their options: :class:`drpo_core.context.ModelRunOptions`).

:class:`ModelRanker`'s ``score`` checks its inputs, gives NaN to images whose pixels are not finite (their
prompt is skipped, not the batch), scores the rest ``batch_size`` at a time under no grad in the ranker's own
dtype (the caller's autocast does not apply), and checks the count and finiteness of what comes back, with
errors naming the ranker. Subclasses implement :meth:`ModelRanker.score_chunk`. Also what their factories
share: the device and dtype an option picks, images as 8-bit pictures. Imported by a plugin's factory, not at
registration (it imports torch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, PluginError
from drpo_core.interfaces import Ranker

if TYPE_CHECKING:
    from PIL import Image

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(choice: str | None, context: BuildContext) -> torch.device:
    """A ranker's ``device`` option, else the run's device."""
    return torch.device(choice or context.device)


def pick_dtype(choice: str, device: torch.device, context: BuildContext,
               cuda_auto: torch.dtype | None = None) -> torch.dtype:
    """A ranker's ``dtype`` option; ``auto``: ``cuda_auto`` (else the run's mixed precision) on CUDA, float32
    elsewhere."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda":
        return cuda_auto or DTYPES.get(context.mixed_precision, torch.float32)
    return torch.float32


def load_exact(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Give ``module`` (built on the meta device) the checkpoint's tensors as they are, no copy: every key and
    shape must fit, else one :class:`PluginError` line starting with ``what`` ("the HPSv3 checkpoint does not fit
    the Qwen2-VL config") naming the first missing and unexpected keys or the shape that differs."""
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise PluginError(f"{what}: missing {missing[:4]}, unexpected {extra[:4]}")
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:  # a shape mismatch
        raise PluginError(f"{what}: {' '.join(str(error).splitlines()[-1].split())}") from None


def to_pictures(images: torch.Tensor) -> list[Image.Image]:
    """Images in [0, 1] as 8-bit RGB pictures, rounded as diffusers' ``numpy_to_pil`` does."""
    from PIL import Image

    # rounded on the images' device; only the 8-bit values travel to the CPU
    array = images.detach().float().clamp(0, 1).mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return [Image.fromarray(a) for a in array.cpu().numpy()]


class ModelRanker(Ranker):
    """A ranker on a frozen model; subclasses set ``name``, ``device``, ``dtype`` and ``batch_size``."""

    name: str
    device: torch.device
    dtype: torch.dtype
    batch_size: int

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(b,)`` scores of at most ``batch_size`` finite images (float in [0, 1], on the CPU)."""
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """One float32 score per image, on the CPU; NaN for images whose pixels are not finite."""
        self.check_inputs(images, prompts)
        finite = images.detach().flatten(1).isfinite().all(dim=1).cpu()
        scores = torch.full((len(images),), float("nan"))
        rows = finite.nonzero().flatten().tolist()
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                with self.own_precision():
                    out = self.score_chunk(images[chunk], [prompts[i] for i in chunk])
                scores[chunk] = self.checked(out, len(chunk)).cpu()
        return scores

    @contextlib.contextmanager
    def own_precision(self) -> Iterator[None]:
        """The ranker's own dtype: the caller's autocast (mixed precision) does not apply."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            yield

    def check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ComponentError(f"ranker {self.name!r} takes images (B, 3, H, W), got {shape}")
        if len(prompts) != len(images):
            raise ComponentError(f"ranker {self.name!r} got {len(images)} images but {len(prompts)} prompts")

    def checked(self, scores: torch.Tensor, expected: int) -> torch.Tensor:
        """``scores`` as float32, after checking there is one finite score per image."""
        scores = scores.detach().float().flatten()
        if scores.numel() != expected:
            raise ComponentError(f"ranker {self.name!r} computed {scores.numel()} scores for {expected} images")
        bad = int((~scores.isfinite()).sum())
        if bad:
            hint = " (fp16 overflow? try dtype: bf16 or fp32)" if self.dtype == torch.float16 else ""
            raise ComponentError(f"ranker {self.name!r} computed non-finite scores for {bad} of {expected} images "
                                 f"with finite pixels{hint}")
        return scores
