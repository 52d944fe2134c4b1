"""Test helpers for drpo and for plugin authors.

Use them from a test suite with ``pytest_plugins = ["drpo_core.testing"]``:

* ``isolated_registry`` fixture: a registry holding the fakes below and only the plugins you add
  (``isolated_registry.register_module(my_plugin)``); installed plugins, the built-in ones included,
  are not picked up, and the process-wide registry is restored afterwards. A recipe for it names
  its components (``kernel: tiny-laplacian``: the default kernel ``laplacian`` is a built-in).
* ``make_registry(*plugins)``: the same registry as a plain function.
* ``TinyGenerator``: a one-step generator of 8x8 RGB images from an 8x8 noise map with a
  per-prompt bias (a few hundred parameters); latents are images, reference is a frozen copy.
* ``BrightnessRanker`` / ``BrokenRanker``, ``PixelFeatures`` and ``tiny_laplacian``.
* ``slow_plugin``: registers the ranker ``tiny-slow`` (``SlowRanker``: brightness that hangs), for
  deadline and Ctrl-C tests: ``make_registry(slow_plugin)``, ``rankers: [{name: tiny-slow, seconds: 60,
  timeout: 2}]``.

The fakes register under the names ``tiny`` (generator), ``tiny-brightness`` and ``tiny-broken``
(rankers), ``tiny-pixels`` (feature space) and ``tiny-laplacian`` (kernel). The rankers' factories are
module-level functions, so they also run in a worker process (a ranker section with ``timeout``).
This module imports no built-in plugin, so a plugin's tests can run a training loop with it alone.
"""

from __future__ import annotations

import copy
import hashlib
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from drpo_core.hookspecs import hookimpl
from drpo_core.interfaces import FeatureSpace, Generator, Ranker
from drpo_core.registry import Registry, get_registry, registry_from, set_registry

PROMPT_SLOTS = 64


def _slot(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") % PROMPT_SLOTS


class _TinyNet(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 3, kernel_size=3, padding=1)
        self.prompt_bias = torch.nn.Embedding(PROMPT_SLOTS, 3)
        torch.nn.init.zeros_(self.prompt_bias.weight)

    def forward(self, noise: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mix(noise) + self.prompt_bias(slots)[:, :, None, None])


class TinyGenerator(Generator):
    def __init__(self, size: int = 8, seed: int = 0):
        torch.manual_seed(seed)
        self.noise_shape = (3, size, size)
        self.net = _TinyNet(size)
        self.base = copy.deepcopy(self.net).requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def module(self) -> torch.nn.Module:
        return self.net

    def _slots(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([_slot(p) for p in prompts], device=self.device)

    def trainable_parameters(self):
        return list(self.net.parameters())

    def sample(self, prompts, noise):
        return self.net(noise, self._slots(prompts))

    def reference(self, prompts, noise):
        with torch.no_grad():
            return self.base(noise, self._slots(prompts))

    def decode(self, latents):
        return latents.clamp(0, 1)

    def encode(self, images):
        return images.clamp(0, 1)

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]):
        self.net.load_state_dict(dict(state))


class BrightnessRanker(Ranker):
    def score(self, images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)).cpu()


class BrokenRanker(Ranker):
    """Misbehaves on purpose: ``nan`` scores, the ``wrong-count``, or ``raise``."""

    def __init__(self, mode: str):
        self.mode = mode

    def score(self, images, prompts, metadata):
        if self.mode == "raise":
            raise RuntimeError("scorer crashed")
        if self.mode == "wrong-count":
            return torch.zeros(len(images) + 1)
        return torch.full((len(images),), float("nan"))


class SlowRanker(BrightnessRanker):
    """Brightness, after answering ``after`` calls at once, sleeping ``seconds`` in every later call (a hang).

    ``signal_file``: created when a sleep starts (tests time deadlines from it). ``block_signals``: SIGINT
    and SIGTERM are blocked in the sleeping thread, as in C code that never returns to Python.
    """

    def __init__(self, seconds: float, after: int = 0, signal_file: str | None = None, block_signals: bool = False):
        self.seconds, self.after, self.signal_file, self.block_signals = seconds, after, signal_file, block_signals
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls > self.after:
            if self.signal_file:
                Path(self.signal_file).touch()
            if not self.block_signals:
                time.sleep(self.seconds)
            else:
                previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    time.sleep(self.seconds)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return super().score(images, prompts, metadata)


class PixelFeatures(FeatureSpace):
    """Channel means (one particle) and 2x2-pooled pixels (one particle per cell)."""

    input = "latents"

    def features(self, x, context):
        pooled = torch.nn.functional.avg_pool2d(x.float(), 2)
        return {"mean": x.float().mean(dim=(2, 3))[:, None, :], "cells": pooled.flatten(2).transpose(1, 2)}


def tiny_laplacian(dist, scale, radius, x, targets):
    """-d / (s r): the Laplacian kernel (computed as the built-in one is), so the fakes need no built-in."""
    return dist * (-1.0 / (scale * radius))


class TinyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 8


class BrokenOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["nan", "wrong-count", "raise"] = "nan"


class SlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 1.0
    after: int = 0
    signal_file: str | None = None
    block_signals: bool = False


# module-level factories: a ranker with a timeout is built in a worker process, which imports them by name
def _brightness_ranker(options, context) -> BrightnessRanker:
    return BrightnessRanker()


def _broken_ranker(options: BrokenOptions, context) -> BrokenRanker:
    return BrokenRanker(options.mode)


def _slow_ranker(options: SlowOptions, context) -> SlowRanker:
    return SlowRanker(options.seconds, options.after, options.signal_file, options.block_signals)


class _FakesPlugin:
    """The fakes, registered through the same hooks as any plugin."""

    @hookimpl
    def drpo_register_generators(self, register):
        register("tiny", lambda o, c: TinyGenerator(o.size, c.seed), options=TinyOptions,
                 summary="8x8 test generator", provides=("latents", "images"))

    @hookimpl
    def drpo_register_rankers(self, register):
        register("tiny-brightness", _brightness_ranker, summary="mean pixel value")
        register("tiny-broken", _broken_ranker, options=BrokenOptions)

    @hookimpl
    def drpo_register_features(self, register):
        register("tiny-pixels", lambda o, c: PixelFeatures(), summary="channel means and pooled pixels",
                 requires=("latents",))

    @hookimpl
    def drpo_register_kernels(self, register):
        register("tiny-laplacian", lambda o, c: tiny_laplacian, summary="-d/(s r), the test kernel")


fakes_plugin = _FakesPlugin()


class _SlowPlugin:
    """``tiny-slow``, apart from the fakes: a ranker that hangs is for deadline tests only."""

    @hookimpl
    def drpo_register_rankers(self, register):
        register("tiny-slow", _slow_ranker, options=SlowOptions, summary="mean pixel value, slowly (a hang)")


slow_plugin = _SlowPlugin()


def make_registry(*plugins: object) -> Registry:
    """The fakes and ``plugins``; nothing installed (no built-in plugin either)."""
    return registry_from([fakes_plugin, *plugins])


@pytest.fixture
def isolated_registry() -> Iterator[Registry]:
    """A registry of the fakes alone, set as the process-wide one for the test and restored after;
    add plugins with ``isolated_registry.register_module(plugin)``."""
    previous = get_registry.__globals__["_default"]
    registry = make_registry()
    set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)
