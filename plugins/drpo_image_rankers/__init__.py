"""Programmatic image rankers: cheap, deterministic rewards for tests, demos and recipes.

``brightness`` (mean luminance), ``saturation`` (mean HSV saturation), ``contrast`` (luminance
std), ``redness`` (red minus the mean of green and blue). Each is a black box to DrPO like any
learned reward; use ``--set rankers.0.invert=true`` to prefer the opposite.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Ranker

STATISTICS = ("brightness", "saturation", "contrast", "redness")


class StatisticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invert: bool = False


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    for name in STATISTICS:
        register(name, _factory(name), options=StatisticOptions, summary=f"image {name} (programmatic)")


def _factory(name: str) -> Callable[[StatisticOptions, BuildContext], Ranker]:
    def build(options: StatisticOptions, context: BuildContext) -> Ranker:
        from drpo_image_rankers.rankers import StatisticRanker

        return StatisticRanker(name, invert=options.invert)

    return build
