"""A plugin that is wrong on purpose, for the type checker only (never imported, not collected by pytest).

``tests/test_typecheck.py`` runs mypy on this file with the project's settings and requires exactly the
errors marked ``# expect: CODE[, CODE]`` on their lines, and no other: what a plugin author who annotates the
hooks with ``Register[...]`` is told before anything runs. Everything not marked must type-check, so
the file also shows the right way beside each wrong one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import FeatureContext, FeatureSpace, Kernel, Ranker


class GoodRanker(Ranker):
    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def build_good_ranker(options: Any, context: BuildContext) -> GoodRanker:
    return GoodRanker()


def build_count(options: Any, context: BuildContext) -> int:
    """A ranker factory that returns a number instead of a ranker."""
    return 3


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    register("good", build_good_ranker, summary="fine")
    register("count", build_count)  # expect: arg-type
    register("count-lambda", lambda options, context: 3)  # expect: arg-type, return-value
    register("typo", build_good_ranker, sumary="a misspelt keyword")  # expect: call-arg


class GoodFeatures(FeatureSpace):
    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        return {"mean": x.flatten(2).mean(-1)[:, None]}


class ContextlessFeatures(FeatureSpace):
    """``features`` without the FeatureContext that API version 2 passes."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # expect: override
        return {"mean": x.flatten(2).mean(-1)[:, None]}


class FlatFeatures(FeatureSpace):
    """``features`` returning one tensor instead of ``{key: (B, T, D)}``."""

    def features(self, x: torch.Tensor, context: FeatureContext) -> torch.Tensor:  # expect: override
        return x.flatten(1)


class DuckFeatures:
    """Has a ``features`` method but is no FeatureSpace (feature spaces are classes, not protocols)."""

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        return {"mean": x.flatten(2).mean(-1)[:, None]}


def build_duck(options: Any, context: BuildContext) -> DuckFeatures:
    return DuckFeatures()


@hookimpl
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    register("good", lambda options, context: GoodFeatures())
    register("duck", build_duck)  # expect: arg-type


def two_argument_kernel(dist: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -dist / scale


@hookimpl
def drpo_register_kernels(register: Register[Kernel]) -> None:
    register("bad", lambda options, context: two_argument_kernel)  # expect: arg-type, return-value
