"""drpo's plugin hooks. Each hook receives a ``register`` callback, so one plugin can add several
components::

    from drpo_core import hookimpl
    from drpo_core.hookspecs import Register
    from drpo_core.interfaces import Kernel

    @hookimpl
    def drpo_register_kernels(register: Register[Kernel]) -> None:
        register("imq", build_imq, summary="inverse multiquadric")

``register(name, factory, *, options=None, defaults=None, pair_defaults=None, variants=None,
aliases=(), summary="", provides=(), requires=(), units=None)``:

* ``factory(options, context)`` builds the component; ``options`` is an instance of the
  ``options`` pydantic model (or ``{}`` when there is none), ``context`` a
  :class:`drpo_core.context.BuildContext` (variant, device, mixed precision, seed, config folder).
  Import heavy libraries inside the factory, never at module level, so ``drpo --help`` stays fast.
* ``options``: a pydantic model class (``extra="forbid"``) declaring the component's own keys;
  annotate file and folder options with :data:`drpo_core.context.LocalPath` so a run's saved config
  holds them resolved, and offline ``drpo train`` checks the hub ids among them are cached before any model
  loads (an options class may define ``hub_models(variant) -> {option: model}`` to say which it loads).
  Rankers on a frozen model subclass :class:`drpo_core.context.ModelRunOptions` (batch size, dtype, device).
* ``defaults``: recommended run settings as ``{"dotted.key": value}`` (or a function of the
  variant returning one), merged under the user's config and shown with their origin.
* ``pair_defaults``: ``{other component name: {"dotted.key": value}}``, settings recommended only
  when the run also uses that component (a feature space's anchor weights for one generator). A key
  may name a variant (``"sdxl-turbo:paper"``): it applies only with that variant and wins over the
  plain name's.
* ``variants``: the allowed ``name:variant`` suffixes (``None``: no variant), or a function that takes
  a free-form variant (``remote:http://host:port``) and returns what is wrong with it (``None``: fine).
* ``variants`` with a ``defaults`` function make presets: what ``defaults(variant)`` changes from
  ``defaults(None)`` is shown with the origin ``name:variant`` (``generator sd-turbo:paper``).
* ``provides`` / ``requires``: capabilities checked when a run is resolved, before anything loads.
  A generator provides what it can hand on (``"latents"``, ``"images"``, a model family); a feature
  space requires them; a ranker provides ``"binary"`` when its scores are 0/1 correctness, and requires
  ``"geneval-prompts"`` when it scores against each prompt's GenEval clauses (the run's prompt files must be
  GenEval .jsonl: ``drpo_core.config.PROMPT_REQUIREMENTS``) or ``"timeout"`` when its section must set one (a
  remote ranker's total deadline).
* ``units``: a ranker's :class:`drpo_core.interfaces.Units`, how ``drpo eval`` reports its scores
  (``Units(100)``: PickScore x100 as in the paper's tables); none: raw scores.

When two recommendations disagree, the more specific wins: pair recommendations, then the generator,
the feature space, the rankers in list order, the kernel (``drpo config show`` lists each conflict).

Model files that are not on the Hugging Face hub are *assets* (:mod:`drpo_core.assets`), registered with
``drpo_register_assets(register)``: ``register(name, *, url, sha256, licence, filename="", summary="")``.
A component gets the local file with ``drpo_core.assets.path(name)``; ``drpo assets list`` shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pluggy

from drpo_core.context import BuildContext
from drpo_core.interfaces import FeatureSpace, Generator, Kernel, Ranker, Units

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("drpo")
hookimpl = pluggy.HookimplMarker("drpo")

# contravariant: a callback that accepts factories of any component serves as a Register[Ranker]
T_contra = TypeVar("T_contra", contravariant=True)
Component = TypeVar("Component")

#: ``factory(options, context) -> component``
Factory = Callable[[Any, BuildContext], Component]
Recommendations = Mapping[str, Any]


class Register(Protocol[T_contra]):
    """The ``register`` callback a hook receives; ``T_contra`` is the kind of component its factories
    build. Annotate a hook implementation's parameter with it (``register: Register[Ranker]``) and a type
    checker refuses a factory that returns anything else."""

    def __call__(
        self,
        name: str,
        factory: Callable[[Any, BuildContext], T_contra],
        *,
        options: type | None = None,
        defaults: Recommendations | Callable[[str | None], Recommendations] | None = None,
        pair_defaults: Mapping[str, Recommendations] | None = None,
        variants: Iterable[str] | Callable[[str], str | None] | None = None,
        aliases: Iterable[str] = (),
        summary: str = "",
        provides: Iterable[str] = (),
        requires: Iterable[str] = (),
        units: Units | None = None,
    ) -> None: ...


class RegisterAsset(Protocol):
    """The ``register`` callback of ``drpo_register_assets``: one downloadable file (``drpo_core.assets.Asset``).

    ``url``: ``https://``, ``file://`` or ``hf://org/repo[@revision]/path``; ``sha256``: 64 hex digits, or
    ``"unverified"`` when it could not be computed; ``licence``: as the publisher states it ("not stated");
    ``filename``: the cached file's name (default: the URL's last segment).
    """

    def __call__(
        self,
        name: str,
        *,
        url: str,
        sha256: str,
        licence: str,
        filename: str = "",
        summary: str = "",
    ) -> None: ...


@hookspec
def drpo_register_generators(register: Register[Generator]) -> None:
    """Register one-step generators (``drpo_core.interfaces.Generator``)."""


@hookspec
def drpo_register_rankers(register: Register[Ranker]) -> None:
    """Register rankers (``Ranker``: rewards used only for their order)."""


@hookspec
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    """Register frozen feature spaces (``FeatureSpace``)."""


@hookspec
def drpo_register_kernels(register: Register[Kernel]) -> None:
    """Register drift kernels (``Kernel``)."""


@hookspec
def drpo_register_assets(register: RegisterAsset) -> None:
    """Register model files components download (``drpo_core.assets.Asset``): ``drpo assets list``."""


@hookspec
def drpo_register_commands(cli: typer.Typer) -> None:
    """Add Typer commands or sub-apps (``cli`` is the ``drpo`` Typer app)."""
