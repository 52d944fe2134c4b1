"""The plugin registry: discovers plugins through entry points and collects their components.

Discovery goes through ``importlib.metadata`` rather than pluggy's
``load_setuptools_entrypoints`` because we want three things pluggy does not give:

* a plugin whose import raises is listed as *broken* while every other plugin keeps working;
* two components registered under one name are listed as a clash; only a run that uses the name
  fails, with a message naming both distributions;
* ``DRPO_LOAD_PLUGINS`` / ``DRPO_DISABLE_PLUGINS`` filter by the names ``drpo list-plugins`` shows: a
  plugin's name or its distribution's (built-ins come from the ``drpo`` distribution and are filtered
  by plugin name only). A name that matches nothing is warned about.

pluggy still holds the hook specifications and validates every plugin's hooks (``check_pending``).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from drpo_core import hookspecs
from drpo_core.assets import Asset
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, ConfigError, PluginError
from drpo_core.interfaces import API_VERSION, Units
from drpo_core.validation import validate_model

ENTRY_POINT_GROUP = "drpo"
BUILTIN_DISTRIBUTION = "drpo"
#: what torch says (an AssertionError) when a CPU-only build is asked for a CUDA device
NO_CUDA = "Torch not compiled with CUDA enabled"
KINDS = ("generator", "ranker", "feature", "kernel", "asset")
_HOOKS = {
    "generator": "drpo_register_generators",
    "ranker": "drpo_register_rankers",
    "feature": "drpo_register_features",
    "kernel": "drpo_register_kernels",
    "asset": "drpo_register_assets",
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
    #: "kind name" -> the one-line summary it registered with
    summaries: dict[str, str] = field(default_factory=dict)


@dataclass
class ComponentSpec:
    kind: str
    name: str
    factory: Callable[[Any, BuildContext], Any]
    plugin: PluginInfo
    options: type | None = None
    defaults: Mapping[str, Any] | Callable[[str | None], Mapping[str, Any]] | None = None
    pair_defaults: Mapping[str, Mapping[str, Any]] | None = None
    #: allowed ``name:variant`` suffixes, or a function that checks a free-form one (a URL) and returns the
    #: problem (None: fine)
    variants: tuple[str, ...] | Callable[[str], str | None] | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""
    provides: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    #: what a data kind registers instead of a factory (an asset's :class:`drpo_core.assets.Asset`)
    record: Any = None
    #: a ranker's report units (``drpo eval``); None: raw scores
    units: Units | None = None

    def recommended(self, variant: str | None) -> dict[str, Any]:
        """The component's recommended run settings for a variant, as ``{"dotted.key": value}``."""
        if self.defaults is None:
            return {}
        return dict(self.defaults(variant) if callable(self.defaults) else self.defaults)

    def recommended_with(self, other: str) -> dict[str, Any]:
        """Settings recommended only when the run also uses the component named ``other``."""
        return dict((self.pair_defaults or {}).get(other, {}))


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
        #: (kind, name) -> every spec that claimed it, the first one included
        self.clashes: dict[tuple[str, str], list[ComponentSpec]] = {}

    # -- loading -----------------------------------------------------------------------------

    def load_entry_points(self) -> Registry:
        """Load the plugins installed in the environment, honouring the env filters."""
        only = _env_list("DRPO_LOAD_PLUGINS")
        disabled = _env_list("DRPO_DISABLE_PLUGINS") or set()
        seen: set[str] = set()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist is None, e.name)):
            dist = ep.dist.metadata["Name"] if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else ""
            builtin = dist == BUILTIN_DISTRIBUTION
            info = PluginInfo(ep.name, ep.value, dist, version, builtin)
            # built-ins by plugin name; third parties by plugin or distribution name
            names = {ep.name} if builtin else {ep.name, dist}
            seen |= names
            if names & disabled or (not builtin and only is not None and not names & only):
                info.state = "disabled"
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
            except Exception as error:  # a broken plugin must not take the others down
                self._mark_broken(info, error)
                continue
            self.register_module(module, info)
        for variable, names in (("DRPO_LOAD_PLUGINS", only or set()), ("DRPO_DISABLE_PLUGINS", disabled)):
            unknown = sorted(names - seen)
            if unknown:
                warnings.warn(f"{variable} names {', '.join(unknown)}, which match no installed plugin "
                              "(see `drpo list-plugins`)", stacklevel=2)
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

    def _run_hook(self, hook: Callable[..., object], kind: str, info: PluginInfo) -> None:
        def register(name: str, factory: Callable[[Any, BuildContext], Any], **details: Any) -> None:
            self._add(ComponentSpec(kind=kind, name=name, factory=factory, plugin=info, **_normalise(details)))

        def register_asset(name: str, **details: Any) -> None:
            asset = Asset(name=name, **details)
            self._add(ComponentSpec(kind=kind, name=name, factory=lambda options, context: asset, plugin=info,
                                    summary=asset.summary, record=asset))

        try:
            hook(register=register_asset if kind == "asset" else register)
        except Exception as error:
            self._mark_broken(info, error, append=False)

    def _add(self, spec: ComponentSpec) -> None:
        """Add a component; a name (or alias) taken already is recorded as a clash, not an error, so
        only a run that uses that name fails."""
        table, aliases = self._components[spec.kind], self._aliases[spec.kind]

        def owner(name: str) -> ComponentSpec | None:
            return table.get(name) or table.get(aliases.get(name, ""))

        self._record(spec)
        existing = owner(spec.name)
        if existing is not None:
            self.clashes.setdefault((spec.kind, spec.name), [existing]).append(spec)
            return
        table[spec.name] = spec
        for alias in spec.aliases:
            existing = owner(alias)
            if existing is not None:
                self.clashes.setdefault((spec.kind, alias), [existing]).append(spec)
            else:
                aliases[alias] = spec.name

    @staticmethod
    def _record(spec: ComponentSpec) -> None:
        spec.plugin.components.append((spec.kind, spec.name))
        spec.plugin.summaries[f"{spec.kind} {spec.name}"] = spec.summary

    def _mark_broken(self, info: PluginInfo, error: BaseException, append: bool = True) -> None:
        info.state = "broken"
        info.error = f"{type(error).__name__}: {error}".splitlines()[0]
        # drop whatever the plugin managed to register before failing (not another plugin's clashing one)
        for kind, name in info.components:
            if getattr(self._components[kind].get(name), "plugin", None) is info:
                del self._components[kind][name]
        for key, specs in list(self.clashes.items()):
            specs[:] = [spec for spec in specs if spec.plugin is not info]
            if len(specs) < 2:
                del self.clashes[key]
                if specs and key[1] not in self._components[key[0]]:
                    self._components[key[0]][key[1]] = specs[0]
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
        clash = self.clashes.get((kind, name)) or self.clashes.get((kind, self._aliases[kind].get(name, name)))
        name = self._aliases[kind].get(name, name)
        if clash:
            owners = " and by ".join(f"{s.plugin.distribution} ({s.plugin.name})" for s in clash)
            raise PluginError(f"{kind} {name!r} is registered twice: by {owners}; uninstall or disable "
                              "one of them (DRPO_DISABLE_PLUGINS)")
        spec = self._components[kind].get(name)
        if spec is None:
            known = self.names(kind) + sorted(self._aliases[kind])
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            listing = "drpo assets list" if kind == "asset" else "drpo list-plugins"
            raise PluginError(f"unknown {kind} {name!r}: {hint}run `{listing}` to see the installed ones"
                              + self._unloaded_hint())
        if variant is not None and callable(spec.variants):
            problem = spec.variants(variant)
            if problem:
                raise PluginError(f"{kind} {name!r}: variant {variant!r}: {problem}")
        elif variant is not None and isinstance(spec.variants, tuple) and variant not in spec.variants:
            raise PluginError(
                f"unknown variant {variant!r} of {kind} {name!r}: choose one of {', '.join(spec.variants)}"
            )
        if variant is not None and spec.variants is None:
            raise PluginError(f"{kind} {name!r} takes no variant (got {reference!r})")
        return spec

    def asset(self, name: str) -> Asset:
        """The :class:`drpo_core.assets.Asset` registered under ``name`` (unknown names: the closest ones)."""
        record: Asset = self.get("asset", name).record
        return record

    def assets(self) -> list[Asset]:
        """Every registered asset, by name."""
        return [self.asset(name) for name in self.names("asset")]

    def _unloaded_hint(self) -> str:
        """Plugins that might provide an unknown name: their components are unknown until they load."""
        unloaded = [f"{p.name} ({'disabled' if p.state == 'disabled' else 'broken: ' + str(p.error)})"
                    for p in self.plugins if p.state != "loaded"]
        return f"; not loaded, and may provide it: {', '.join(unloaded)}" if unloaded else ""

    def validate_options(self, kind: str, reference: str, options: Mapping[str, Any], where: str) -> Any:
        """Validate a component's own options with its pydantic model; errors name ``where.key``."""
        spec = self.get(kind, reference)
        if spec.options is None:
            if options:
                raise ConfigError(
                    f"{where}.{next(iter(options))}: unknown key ({kind} {spec.name!r} takes no options)"
                )
            return {}
        return validate_model(spec.options, dict(options), where)

    def build(self, kind: str, reference: str, options: Any, context: BuildContext,
              where: str | None = None) -> Any:
        """Build a component. ``options`` are the validated options (what ``resolve_config`` keeps),
        or a raw mapping, validated here."""
        spec = self.get(kind, reference)
        if spec.options is None or not isinstance(options, spec.options):
            options = self.validate_options(kind, reference, options, where or kind)
        _, variant = split_reference(reference)
        context = BuildContext(**{**context.__dict__, "variant": variant})
        try:
            component = spec.factory(options, context)
        except (PluginError, ConfigError):
            raise
        except ImportError as error:
            raise PluginError(
                f"{kind} {spec.name!r} from {spec.plugin.distribution} needs a missing package: {error}"
            ) from error
        except (AssertionError, RuntimeError) as error:
            if NO_CUDA not in str(error):
                raise
            # a device the preflight did not see (set by the plugin itself): one line, not torch's traceback
            raise ComponentError(f"{where or kind}: {kind} {spec.name!r} asked for a CUDA device, but this torch "
                                 "was built without CUDA (set its device to cpu)") from error
        _check_built(spec, component)
        return component

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
            added = _command_names(cli)
            for name in sorted(set(added) - set(before)):
                info.components.append(("command", name))
                info.summaries[f"command {name}"] = added[name]


def _command_names(cli: Any) -> dict[str, str]:
    """Every command and sub-app of a Typer app, with the first line of its help."""
    def first_line(text: Any) -> str:
        return str(text or "").strip().split("\n")[0]

    names = {c.name or c.callback.__name__.replace("_", "-"): first_line(c.help or (c.callback.__doc__ or ""))
             for c in cli.registered_commands}
    return names | {g.name: first_line(g.help or g.typer_instance.info.help) for g in cli.registered_groups}


def _check_built(spec: ComponentSpec, component: Any) -> None:
    """What a factory returned speaks this drpo's API and matches what its registration declared."""
    where = f"{spec.kind} {spec.name!r} from {spec.plugin.distribution}"
    version = getattr(component, "api_version", API_VERSION)  # kernels are plain functions
    if version != API_VERSION:
        raise PluginError(f"{where} implements drpo API version {version}, this drpo speaks version "
                          f"{API_VERSION}: install a release of the plugin made for it")
    if spec.kind == "ranker" and bool(getattr(component, "binary", False)) != ("binary" in spec.provides):
        raise PluginError(f"{where}: its scores are {'binary' if component.binary else 'graded'} but its "
                          "registration says otherwise (provides=('binary',) declares 0/1 scores)")


def _normalise(details: dict[str, Any]) -> dict[str, Any]:
    allowed = {"options", "defaults", "pair_defaults", "variants", "aliases", "summary", "provides", "requires",
               "units"}
    unknown = set(details) - allowed
    if unknown:
        raise TypeError(f"register() got unexpected keyword(s): {', '.join(sorted(unknown))}")
    if details.get("variants") is not None and not callable(details["variants"]):
        details["variants"] = tuple(details["variants"])
    for key in ("aliases", "provides", "requires"):
        details[key] = tuple(details.get(key, ()))
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
