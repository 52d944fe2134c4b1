"""The scoring loop rankers on a frozen model share (their options: :class:`drpo_core.context.ModelRunOptions`).

:class:`ModelRanker`'s ``score`` checks its inputs, gives NaN to images whose pixels are not finite (their
prompt is skipped, not the batch), scores the rest ``batch_size`` at a time under no grad in the ranker's own
dtype (the caller's autocast does not apply), and checks the count and finiteness of what comes back, with
errors naming the ranker. Subclasses implement :meth:`ModelRanker.score_chunk`. Imported by a plugin's
factory, not at registration (it imports torch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from drpo_core.errors import ComponentError
from drpo_core.interfaces import Ranker


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
