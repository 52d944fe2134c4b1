"""Image statistics as rewards; see the package docstring."""

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from drpo_core.interfaces import Ranker

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _statistic(name: str, images: torch.Tensor) -> torch.Tensor:
    images = images.float()
    luma = (images * _LUMA.to(images.device)[:, None, None]).sum(dim=1)
    if name == "brightness":
        return luma.flatten(1).mean(1)
    if name == "contrast":
        return luma.flatten(1).std(1)
    if name == "redness":
        return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).flatten(1).mean(1)
    high, low = images.max(dim=1).values, images.min(dim=1).values
    return ((high - low) / high.clamp_min(1e-6)).flatten(1).mean(1)  # saturation


class StatisticRanker(Ranker):
    uses_prompt = False  # a statistic of the pixels: `drpo doctor` checks that the caption changes nothing

    def __init__(self, statistic: str, invert: bool = False):
        self.statistic, self.sign = statistic, -1.0 if invert else 1.0

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        return self.sign * _statistic(self.statistic, images).cpu()
