"""The built-in kernels' formulas and their registration (with a stand-in register callback)."""

from __future__ import annotations

import math

import torch

from drpo_kernels.kernels import KERNELS, cosine, laplacian, rbf


def test_kernel_formulas():
    dist = torch.tensor([[[0.5, 2.0]]])
    s = torch.tensor([[[2.0]]])
    x = torch.tensor([[[1.0, 0.0]]])
    T = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])
    torch.testing.assert_close(laplacian(dist, s, 0.1, x, T), torch.tensor([[[-2.5, -10.0]]]))
    torch.testing.assert_close(rbf(dist, s, 0.5, x, T), torch.tensor([[[-0.125, -2.0]]]))
    torch.testing.assert_close(cosine(dist, s, 0.5, x, T), torch.tensor([[[2 / math.sqrt(2), 0.0]]]))
    # cosine ignores the scale: scaling features changes nothing
    torch.testing.assert_close(cosine(dist, s, 0.5, 7 * x, 3 * T), cosine(dist, s, 0.5, x, T))
    assert KERNELS["exponential"] is laplacian


def test_registration_builds_the_functions():
    import drpo_kernels

    registered = {}

    def register(name, factory, *, options=None, defaults=None, variants=None, aliases=(), summary=""):
        registered[name] = (factory, tuple(aliases), summary)

    drpo_kernels.drpo_register_kernels(register)
    assert set(registered) == {"laplacian", "rbf", "cosine"}
    assert registered["laplacian"][1] == ("exponential",)
    for name, (factory, _, summary) in registered.items():
        assert factory({}, None) is KERNELS[name] and summary
