"""Built-in drift kernels (laplacian/exponential, rbf, cosine). Registration only: no torch import here."""

from __future__ import annotations

from typing import Any

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Kernel


@hookimpl
def drpo_register_kernels(register: Register[Kernel]) -> None:
    register("laplacian", _build_laplacian, aliases=("exponential",),
             summary="-d/(s r): Laplacian (exponential) kernel, the official default")
    register("rbf", _build_rbf, summary="-(d/(s r))^2/2: Gaussian kernel")
    register("cosine", _build_cosine, summary="cos(x, T)/r: cosine-similarity kernel")


def _build_laplacian(options: Any, context: BuildContext) -> Kernel:
    from drpo_kernels.kernels import laplacian

    return laplacian


def _build_rbf(options: Any, context: BuildContext) -> Kernel:
    from drpo_kernels.kernels import rbf

    return rbf


def _build_cosine(options: Any, context: BuildContext) -> Kernel:
    from drpo_kernels.kernels import cosine

    return cosine
