"""An example drpo plugin: the ``imq`` drift kernel and the ``warmth`` ranker.

This module only *registers* components; it imports pydantic and drpo_core (both light). torch
is imported by the factories, from :mod:`drpo_example_plugin.components`, when a run builds them,
so ``drpo --help`` and ``drpo list-plugins`` stay fast.

The hooks' ``register`` parameters are typed (``Register[Kernel]``, ``Register[Ranker]``): a type checker
(mypy, pyright) then refuses a factory that builds the wrong kind of component.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from drpo_core import Kernel, Ranker, hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register

__version__ = "0.1.0"


class IMQOptions(BaseModel):
    """Options of the ``imq`` kernel (``kernel: {name: imq, beta: 0.5}`` in a recipe)."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.5, gt=0, description="exponent: logits are -beta * log(1 + (d / (s r))^2)")


class WarmthOptions(BaseModel):
    """Options of the ``warmth`` ranker (``rankers: [{name: warmth, invert: true}]``)."""

    model_config = ConfigDict(extra="forbid")
    invert: bool = Field(False, description="prefer cool (blue) images instead")


#: recommended run settings, merged under the user's config (``drpo config show`` names the origin
#: ``kernel imq``): IMQ's heavy tails make large radii nearly uniform, so keep them local
IMQ_DEFAULTS = {"drift.radii": [0.05, 0.2, 0.5]}


@hookimpl
def drpo_register_kernels(register: Register[Kernel]) -> None:
    register("imq", _build_imq, options=IMQOptions, defaults=IMQ_DEFAULTS,
             summary="-beta log(1 + (d/(s r))^2): inverse multiquadric kernel (heavy tails)")


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    register("warmth", _build_warmth, options=WarmthOptions, summary="mean red minus mean blue")


def _build_imq(options: IMQOptions, context: BuildContext) -> Kernel:
    from drpo_example_plugin.components import IMQKernel

    return IMQKernel(beta=options.beta)


def _build_warmth(options: WarmthOptions, context: BuildContext) -> Ranker:
    from drpo_example_plugin.components import WarmthRanker

    return WarmthRanker(invert=options.invert)
