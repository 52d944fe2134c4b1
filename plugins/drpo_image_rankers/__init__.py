"""Programmatic image rankers: cheap, deterministic rewards for tests, demos and recipes.

``brightness`` (mean luminance), ``saturation`` (mean HSV saturation), ``contrast`` (luminance
std), ``redness`` (red minus the mean of green and blue). Each is a black box to DrPO like any
learned reward; use ``--set rankers.0.invert=true`` to prefer the opposite.
"""

from functools import partial

from pydantic import BaseModel, ConfigDict

from drpo_core import hookimpl

STATISTICS = ("brightness", "saturation", "contrast", "redness")


class StatisticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invert: bool = False


@hookimpl
def drpo_register_rankers(register):
    for name in STATISTICS:
        # a partial of a module-level function pickles, so `timeout` can run the ranker in a worker process
        register(name, partial(_build, name), options=StatisticOptions, summary=f"image {name} (programmatic)")


def _build(name, options, context):
    from drpo_image_rankers.rankers import StatisticRanker

    return StatisticRanker(name, invert=options.invert)
