"""The plugin registry: discovers plugins through entry points and collects their components.

Discovery goes through ``importlib.metadata`` rather than pluggy's
``load_setuptools_entrypoints`` because we want three things pluggy does not give:

* a plugin whose import raises is listed as *broken* while every other plugin keeps working;
* two components registered under one name fail with a message naming both distributions;
* ``DRPO_LOAD_PLUGINS`` / ``DRPO_DISABLE_PLUGINS`` filter by *distribution* name (built-in plugins,
  which come from the ``drpo`` distribution, are filtered by their entry-point name).

pluggy still holds the hook specifications and validates every plugin's hooks (``check_pending``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from drpo_core import hookspecs
from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "drpo"
BUILTIN_DISTRIBUTION = "drpo"
KINDS = ("generator", "ranker", "feature", "kernel")
_HOOKS = {
    "generator": "drpo_register_generators",
    "ranker": "drpo_register_rankers",
    "feature": "drpo_register_features",
    "kernel": "drpo_register_kernels",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    builtin: bool
    state: str = "loaded"  # loaded | broken | disabled
    error: str | None = None
    components: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ComponentSpec:
    kind: str
    name: str
    factory: Callable[[Any, BuildContext], Any]
    plugin: PluginInfo
    options: type | None = None
    defaults: Mapping[str, Any] | Callable[[str | None], Mapping[str, Any]] | None = None
    variants: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def recommended(self, variant: str | None) -> dict[str, Any]:
        """The component's recommended run settings for a variant, as ``{"dotted.key": value}``."""
        if self.defaults is None:
            return {}
        return dict(self.defaults(variant) if callable(self.defaults) else self.defaults)


def split_reference(reference: str) -> tuple[str, str | None]:
    """``"geneval:counting"`` -> ``("geneval", "counting")``."""
    name, _, variant = reference.partition(":")
    return name, (variant or None)


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class Registry:
    """Every component of every loaded plugin, by kind and name."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("drpo")
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._components: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._info_by_plugin: dict[int, PluginInfo] = {}

    # -- loading -----------------------------------------------------------------------------

    def load_entry_points(self) -> Registry:
        """Load the plugins installed in the environment, honouring the env filters."""
        only = _env_list("DRPO_LOAD_PLUGINS")
        disabled = _env_list("DRPO_DISABLE_PLUGINS") or set()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist is None, e.name)):
            dist = ep.dist.metadata["Name"] if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else ""
            builtin = dist == BUILTIN_DISTRIBUTION
            info = PluginInfo(ep.name, ep.value, dist, version, builtin)
            # built-ins are addressed by entry-point name, third parties by distribution name
            key = ep.name if builtin else dist
            if key in disabled or (not builtin and only is not None and dist not in only):
                info.state = "disabled"
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
            except Exception as error:  # a broken plugin must not take the others down
                self._mark_broken(info, error)
                continue
            self.register_module(module, info)
        return self

    def register_module(self, module: ModuleType | object, info: PluginInfo | None = None) -> PluginInfo:
        """Register a plugin object (a module or any object with hookimpls)."""
        if info is None:
            name = getattr(module, "__name__", type(module).__name__)
            info = PluginInfo(name, name, "(local)", "", builtin=False)
        self.plugins.append(info)
        registered = False
        try:
            self.manager.register(module, name=f"{info.distribution}:{info.name}")
            registered = True
            self.manager.check_pending()
        except Exception as error:
            if registered:  # a module registered twice must not unregister its first, working copy
                self.manager.unregister(module)
            self._mark_broken(info, error, append=False)
            return info
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                if impl.plugin is module:
                    self._run_hook(impl.function, kind, info)
        self._info_by_plugin[id(module)] = info
        return info

    def _run_hook(self, hook: Callable, kind: str, info: PluginInfo) -> None:
        def register(name: str, factory: Callable, **details: Any) -> None:
            self._add(ComponentSpec(kind=kind, name=name, factory=factory, plugin=info, **_normalise(details)))

        try:
            hook(register=register)
        except PluginError:
            raise  # a name clash is the user's to fix, not a broken plugin
        except Exception as error:
            self._mark_broken(info, error, append=False)

    def _add(self, spec: ComponentSpec) -> None:
        table = self._components[spec.kind]
        for name in (spec.name, *spec.aliases):
            existing = table.get(name) or table.get(self._aliases[spec.kind].get(name, ""))
            if existing is not None:
                raise PluginError(
                    f"{spec.kind} {name!r} is registered twice: by {existing.plugin.distribution} "
                    f"({existing.plugin.name}) and by {spec.plugin.distribution} ({spec.plugin.name}); "
                    "uninstall or disable one of them (DRPO_DISABLE_PLUGINS)"
                )
        table[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[spec.kind][alias] = spec.name
        spec.plugin.components.append((spec.kind, spec.name))

    def _mark_broken(self, info: PluginInfo, error: BaseException, append: bool = True) -> None:
        info.state = "broken"
        info.error = f"{type(error).__name__}: {error}".splitlines()[0]
        # drop whatever the plugin managed to register before failing
        for kind, name in info.components:
            self._components[kind].pop(name, None)
        info.components.clear()
        if append:
            self.plugins.append(info)

    # -- lookup ------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def specs(self, kind: str) -> list[ComponentSpec]:
        return [self._components[kind][name] for name in self.names(kind)]

    def get(self, kind: str, reference: str) -> ComponentSpec:
        """The spec for ``name`` or ``name:variant``; unknown names get the closest matches."""
        name, variant = split_reference(reference)
        name = self._aliases[kind].get(name, name)
        spec = self._components[kind].get(name)
        if spec is None:
            known = self.names(kind) + sorted(self._aliases[kind])
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise PluginError(
                f"unknown {kind} {name!r}: {hint}run `drpo list-plugins` to see the installed ones"
            )
        if variant is not None and spec.variants is not None and variant not in spec.variants:
            raise PluginError(
                f"unknown variant {variant!r} of {kind} {name!r}: choose one of {', '.join(spec.variants)}"
            )
        if variant is not None and spec.variants is None:
            raise PluginError(f"{kind} {name!r} takes no variant (got {reference!r})")
        return spec

    def validate_options(self, kind: str, reference: str, options: Mapping[str, Any], where: str) -> Any:
        """Validate a component's own options with its pydantic model; errors name ``where.key``."""
        from drpo_core.config import validate_model  # config imports the registry lazily too

        spec = self.get(kind, reference)
        if spec.options is None:
            if options:
                raise ConfigError(
                    f"{where}.{next(iter(options))}: unknown key ({kind} {spec.name!r} takes no options)"
                )
            return {}
        return validate_model(spec.options, dict(options), where)

    def build(self, kind: str, reference: str, options: Mapping[str, Any], context: BuildContext,
              where: str | None = None) -> Any:
        spec = self.get(kind, reference)
        validated = self.validate_options(kind, reference, options, where or kind)
        _, variant = split_reference(reference)
        context = BuildContext(**{**context.__dict__, "variant": variant})
        try:
            return spec.factory(validated, context)
        except (PluginError, ConfigError):
            raise
        except ImportError as error:
            raise PluginError(
                f"{kind} {spec.name!r} from {spec.plugin.distribution} needs a missing package: {error}"
            ) from error

    def add_commands(self, cli: Any) -> None:
        """Let every loaded plugin add its commands to the Typer app, recording their names."""
        for impl in self.manager.hook.drpo_register_commands.get_hookimpls():
            info = self._info_by_plugin[id(impl.plugin)]
            before = _command_names(cli)
            try:
                impl.function(cli=cli)
            except Exception as error:
                self._mark_broken(info, error, append=False)
                continue
            info.components += [("command", name) for name in sorted(_command_names(cli) - before)]


def _command_names(cli: Any) -> set[str]:
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in cli.registered_commands}
    return commands | {group.name for group in cli.registered_groups}


def _normalise(details: dict[str, Any]) -> dict[str, Any]:
    allowed = {"options", "defaults", "variants", "aliases", "summary"}
    unknown = set(details) - allowed
    if unknown:
        raise TypeError(f"register() got unexpected keyword(s): {', '.join(sorted(unknown))}")
    if details.get("variants") is not None:
        details["variants"] = tuple(details["variants"])
    details["aliases"] = tuple(details.get("aliases", ()))
    return details


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry of installed plugins, loaded on first use."""
    global _default
    if _default is None:
        _default = Registry().load_entry_points()
    return _default


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests use an isolated one)."""
    global _default
    _default = registry


def registry_from(plugins: Iterable[object]) -> Registry:
    """A registry holding only the given plugin objects (no entry points)."""
    registry = Registry()
    for plugin in plugins:
        registry.register_module(plugin)
    return registry
