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
* ``check_feature_space(space, x, context)``: the feature-space contract on one batch (declared input,
  ``{key: (B, T, D)}``, gradient reaches the input, no trainable weight of its own, deterministic);
  ``feature_space_cases`` / ``check_feature_space_case`` run it over every registered feature space
  with one case builder per name (see ``tests/test_feature_contract.py``)::

      @pytest.mark.parametrize("name, builder", feature_space_cases({"my-space": build_case}))
      def test_contract(request, name, builder):
          check_feature_space_case(request, name, builder)
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from drpo_core.checkpoint import check_state_fits
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register, hookimpl
from drpo_core.interfaces import FeatureContext, FeatureSpace, Generator, Kernel, Ranker
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())

    def sample(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise, self._slots(prompts))

    def reference(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.base(noise, self._slots(prompts))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp(0, 1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_state_fits(self.net.state_dict(), state, "tiny generator weights")
        self.net.load_state_dict(dict(state))


class BrightnessRanker(Ranker):
    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3)).cpu()


class BrokenRanker(Ranker):
    """Misbehaves on purpose: ``nan`` scores, the ``wrong-count``, or ``raise``."""

    def __init__(self, mode: str):
        self.mode = mode

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
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

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
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

    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        pooled = torch.nn.functional.avg_pool2d(x.float(), 2)
        return {"mean": x.float().mean(dim=(2, 3))[:, None, :], "cells": pooled.flatten(2).transpose(1, 2)}


def tiny_laplacian(dist: torch.Tensor, scale: torch.Tensor, radius: float, x: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
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
def _brightness_ranker(options: Any, context: BuildContext) -> BrightnessRanker:
    return BrightnessRanker()


def _broken_ranker(options: BrokenOptions, context: BuildContext) -> BrokenRanker:
    return BrokenRanker(options.mode)


def _slow_ranker(options: SlowOptions, context: BuildContext) -> SlowRanker:
    return SlowRanker(options.seconds, options.after, options.signal_file, options.block_signals)


class _FakesPlugin:
    """The fakes, registered through the same hooks as any plugin."""

    @hookimpl
    def drpo_register_generators(self, register: Register[Generator]) -> None:
        register("tiny", lambda o, c: TinyGenerator(o.size, c.seed), options=TinyOptions,
                 summary="8x8 test generator", provides=("latents", "images"))

    @hookimpl
    def drpo_register_rankers(self, register: Register[Ranker]) -> None:
        register("tiny-brightness", _brightness_ranker, summary="mean pixel value")
        register("tiny-broken", _broken_ranker, options=BrokenOptions)

    @hookimpl
    def drpo_register_features(self, register: Register[FeatureSpace]) -> None:
        register("tiny-pixels", lambda o, c: PixelFeatures(), summary="channel means and pooled pixels",
                 requires=("latents",))

    @hookimpl
    def drpo_register_kernels(self, register: Register[Kernel]) -> None:
        register("tiny-laplacian", lambda o, c: tiny_laplacian, summary="-d/(s r), the test kernel")


fakes_plugin = _FakesPlugin()


class _SlowPlugin:
    """``tiny-slow``, apart from the fakes: a ranker that hangs is for deadline tests only."""

    @hookimpl
    def drpo_register_rankers(self, register: Register[Ranker]) -> None:
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


# -- the feature-space contract -----------------------------------------------------------------------

#: ``builder(request) -> (space, x, context)``: one contract case (``request`` gives access to fixtures)
FeatureCaseBuilder = Callable[[pytest.FixtureRequest], tuple[FeatureSpace, torch.Tensor, FeatureContext]]


def check_feature_space(space: FeatureSpace, x: torch.Tensor, context: FeatureContext, *,
                        requires: Iterable[str] | None = None, atol: float = 1e-5,
                        rtol: float = 1e-5) -> dict[str, torch.Tensor]:
    """Check the :class:`FeatureSpace` contract on one batch ``x`` and return its features; an
    ``AssertionError`` names the rule broken:

    1. declared input: ``space.input`` is ``"latents"`` or ``"images"`` (images: ``(B, 3, H, W)`` in [0, 1]),
       and the registration's ``requires`` (when given) names it;
    2. ``{str key: (B, T, D)}`` floating and finite, T and D at least 1;
    3. the gradient of every key reaches the input (finite, not all zero);
    4. no trainable weight of its own: every leaf of the features' graph is the input or one of the
       generator's trainable parameters (a shared UNet's LoRA counts as the generator's), and no tensor
       the space holds requires grad unless the generator trains it;
    5. deterministic: a second call, without grad, gives the same features (``atol``, ``rtol``).
    """
    name = type(space).__name__
    assert space.input in ("latents", "images"), f"{name}.input must be 'latents' or 'images', not {space.input!r}"
    if requires is not None:
        assert space.input in tuple(requires), (
            f"{name} takes {space.input} but its registration requires {tuple(requires)}: declare requires=('{space.input}', ...)")
    if space.input == "images":
        assert x.ndim == 4 and x.shape[1] == 3, f"{name} takes images (B, 3, H, W); the case gave {tuple(x.shape)}"
        assert float(x.min()) >= 0 and float(x.max()) <= 1, f"{name} takes images in [0, 1]; the case's are not"
    batch = x.shape[0]
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        features = space.features(x, context)
    assert isinstance(features, dict) and features, f"{name}.features must return a non-empty dict"
    for key, value in features.items():
        assert isinstance(key, str), f"{name}: feature keys must be strings, got {key!r}"
        assert isinstance(value, torch.Tensor) and value.ndim == 3, (
            f"{name}: {key!r} must be a (B, T, D) tensor, got {getattr(value, 'shape', type(value))}")
        assert value.shape[0] == batch and min(value.shape[1:]) >= 1, (
            f"{name}: {key!r} has shape {tuple(value.shape)} for a batch of {batch}")
        assert value.is_floating_point() and bool(torch.isfinite(value).all()), f"{name}: {key!r} is not finite floats"
    trainable = {id(p) for p in context.generator.trainable_parameters()}
    foreign = [leaf for leaf in _graph_leaves(features.values()) if leaf is not x and id(leaf) not in trainable]
    assert not foreign, (f"{name}: its features depend on {len(foreign)} tensor(s) that require grad and are neither "
                         f"the input nor the generator's trainable parameters, e.g. shape {tuple(foreign[0].shape)}: "
                         "freeze them (requires_grad_(False))")
    held = [t for t in _held_tensors(space) if t.requires_grad and id(t) not in trainable]
    assert not held, f"{name} holds {len(held)} tensor(s) that require grad, e.g. shape {tuple(held[0].shape)}"
    projection = torch.Generator().manual_seed(0)
    for key, value in features.items():
        assert value.requires_grad, f"{name}: {key!r} does not depend on the input (no gradient)"
        weights = torch.randn(tuple(value.shape), generator=projection).to(value.device)
        (grad,) = torch.autograd.grad((value.float() * weights).sum(), x, retain_graph=True, allow_unused=True)
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0), (
            f"{name}: the gradient of {key!r} does not reach the input")
    with torch.no_grad():
        again = space.features(x.detach(), context)
    assert again.keys() == features.keys(), f"{name}: a second call gave other keys"
    for key, value in features.items():
        assert again[key].shape == value.shape and torch.allclose(again[key].float(), value.detach().float(),
                                                                  atol=atol, rtol=rtol), (
            f"{name}: {key!r} differs between two calls on the same input "
            f"(max |diff| {float((again[key].float() - value.detach().float()).abs().max()):.3g})")
    return features


def _graph_leaves(outputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors (``AccumulateGrad`` nodes) the autograd graph of ``outputs`` reaches."""
    outputs = list(outputs)
    seen: set[int] = set()
    leaves = [t for t in outputs if t.grad_fn is None and t.requires_grad]
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return leaves


def _held_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors a feature space holds: in its attributes, modules, lists and dicts (not in other objects)."""
    if depth > 4:
        return
    if isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _held_tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _held_tensors(item, depth + 1)
    elif depth == 0:
        for item in vars(obj).values():
            yield from _held_tensors(item, depth + 1)


def feature_space_cases(builders: Mapping[str, FeatureCaseBuilder | None],
                        names: Iterable[str] | None = None) -> list[Any]:
    """``pytest.param(name, builder)`` for every registered feature space (``names``; default: those of the
    installed plugins) and every builder for it: a builder's key is the space's name, or ``name[case]`` for
    several cases of one space. A registered space without a builder gets a case that fails, asking for one."""
    if names is None:
        from drpo_core.registry import Registry

        names = Registry().load_entry_points().names("feature")
    params = []
    for name in names:
        keys = [key for key in builders if key == name or key.startswith(f"{name}[")]
        params += [pytest.param(name, builders[key], id=key) for key in keys] or [pytest.param(name, None, id=name)]
    return params


def check_feature_space_case(request: pytest.FixtureRequest, name: str, builder: FeatureCaseBuilder | None,
                             registry: Registry | None = None, **tolerances: float) -> dict[str, torch.Tensor]:
    """Build one case of ``feature_space_cases`` and check it (:func:`check_feature_space`), with the
    ``requires`` the space registered with."""
    if builder is None:
        pytest.fail(f"feature space {name!r} is registered but has no contract case: add a builder for it "
                    "(space, x, context) to the builders given to feature_space_cases")
    space, x, context = builder(request)
    spec = (registry or get_registry()).get("feature", name)
    return check_feature_space(space, x, context, requires=spec.requires, **tolerances)
