"""The plugin registry: discovery, broken plugins, env filters, name clashes, lookup, light imports."""

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import typer

import drpo_kernels
import drpo_latent
import drpo_shapes
from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.errors import PluginError
from drpo_core.registry import Registry, registry_from

BUILTIN_MODULES = ["drpo_kernels", "drpo_latent", "drpo_mae", "drpo_image_rankers", "drpo_shapes", "drpo_diffusers",
                   "drpo_vision_features"]
HEAVY = ["diffusers", "transformers", "torch"]


class FakeDist:
    def __init__(self, name: str, version: str):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Just what the registry reads from an ``importlib.metadata.EntryPoint``."""

    def __init__(self, name: str, target, dist: str = "drpo", version: str = "0.1.0"):
        self.name, self.dist, self._target = name, FakeDist(dist, version), target
        self.value = getattr(target, "__name__", name)

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A module-like plugin whose hooks are the given functions (wrapped in ``hookimpl``)."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def kernel_plugin(name: str, *kernels: str, aliases=()) -> types.ModuleType:
    def drpo_register_kernels(register):
        for kernel in kernels:
            register(kernel, lambda o, c: None, aliases=aliases)

    return plugin_module(name, drpo_register_kernels=drpo_register_kernels)


@pytest.fixture
def installed(monkeypatch):
    """Pretend the given entry points are what ``pip`` installed, then load a fresh registry."""

    def load(*eps: FakeEntryPoint) -> Registry:
        monkeypatch.setattr("drpo_core.registry.entry_points", lambda group: list(eps))
        return Registry().load_entry_points()

    monkeypatch.delenv("DRPO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DRPO_DISABLE_PLUGINS", raising=False)
    return load


def by_name(registry: Registry) -> dict:
    return {info.name: info for info in registry.plugins}


# -- discovery -----------------------------------------------------------------------------------


def test_broken_plugin_is_listed_with_its_error_and_others_keep_working(installed):
    registry = installed(
        FakeEntryPoint("kernels", drpo_kernels),
        FakeEntryPoint("fancy", ModuleNotFoundError("No module named 'fancy_dep'"), "drpo-fancy", "2.0"),
    )
    plugins = by_name(registry)
    assert plugins["fancy"].state == "broken"
    assert plugins["fancy"].error == "ModuleNotFoundError: No module named 'fancy_dep'"
    assert (plugins["fancy"].distribution, plugins["fancy"].version) == ("drpo-fancy", "2.0")
    assert plugins["kernels"].state == "loaded"
    assert registry.names("kernel") == ["cosine", "laplacian", "rbf"]


def test_plugin_whose_hook_raises_is_broken_and_registers_nothing(installed):
    def drpo_register_kernels(register):
        register("half", lambda o, c: None)
        raise RuntimeError("GPU not found\nsecond line")

    registry = installed(FakeEntryPoint("flaky", plugin_module("flaky", drpo_register_kernels=drpo_register_kernels),
                                        "drpo-flaky"))
    info = by_name(registry)["flaky"]
    assert (info.state, info.error, info.components) == ("broken", "RuntimeError: GPU not found", [])
    assert "half" not in registry.names("kernel")


def test_misspelled_hook_marks_the_plugin_broken_naming_the_hook():
    def drpo_register_kernel(register):  # missing "s"
        register("typo", lambda o, c: None)

    registry = registry_from([drpo_kernels, plugin_module("typo", drpo_register_kernel=drpo_register_kernel)])
    info = by_name(registry)["typo"]
    assert info.state == "broken"
    assert "drpo_register_kernel" in info.error
    assert "laplacian" in registry.names("kernel")  # the others still load


def test_unknown_register_keyword_marks_the_plugin_broken():
    def drpo_register_kernels(register):
        register("k", lambda o, c: None, default={"train.lr": 1.0})  # "defaults"

    info = registry_from([plugin_module("kw", drpo_register_kernels=drpo_register_kernels)]).plugins[0]
    assert info.state == "broken"
    assert "unexpected keyword(s): default" in info.error


def test_components_are_recorded_with_the_plugin_distribution_and_version(installed):
    registry = installed(FakeEntryPoint("kernels", drpo_kernels, "drpo", "0.1.0"),
                         FakeEntryPoint("extra", kernel_plugin("extra", "imq"), "drpo-extra", "1.2.3"))
    info = by_name(registry)["extra"]
    assert (info.distribution, info.version, info.builtin, info.state) == ("drpo-extra", "1.2.3", False, "loaded")
    assert info.components == [("kernel", "imq")]
    assert by_name(registry)["kernels"].builtin
    assert registry.get("kernel", "imq").plugin is info


def test_commands_are_recorded_as_components():
    def drpo_register_commands(cli):
        @cli.command("hello")
        def hello():
            """Say hello."""

    registry = registry_from([plugin_module("greeter", drpo_register_commands=drpo_register_commands)])
    cli = typer.Typer()
    registry.add_commands(cli)
    assert by_name(registry)["greeter"].components == [("command", "hello")]


# -- DRPO_LOAD_PLUGINS / DRPO_DISABLE_PLUGINS ------------------------------------------------------


@pytest.fixture
def three_plugins():
    return [FakeEntryPoint("kernels", drpo_kernels),
            FakeEntryPoint("a", kernel_plugin("a", "ka"), "drpo-a"),
            FakeEntryPoint("b", kernel_plugin("b", "kb"), "drpo-b")]


def states(registry: Registry) -> dict[str, str]:
    return {info.name: info.state for info in registry.plugins}


def test_every_plugin_loads_without_filters(installed, three_plugins):
    assert states(installed(*three_plugins)) == {"kernels": "loaded", "a": "loaded", "b": "loaded"}


def test_load_plugins_selects_third_party_distributions_and_keeps_builtins(installed, three_plugins, monkeypatch):
    monkeypatch.setenv("DRPO_LOAD_PLUGINS", " drpo-b ,")
    registry = installed(*three_plugins)
    assert states(registry) == {"kernels": "loaded", "a": "disabled", "b": "loaded"}
    assert "ka" not in registry.names("kernel")


def test_empty_load_plugins_means_builtins_only(installed, three_plugins, monkeypatch):
    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "")
    assert states(installed(*three_plugins)) == {"kernels": "loaded", "a": "disabled", "b": "disabled"}


def test_disable_plugins_blocks_distributions_and_builtins_by_name(installed, three_plugins, monkeypatch):
    monkeypatch.setenv("DRPO_DISABLE_PLUGINS", "drpo-a,kernels")
    registry = installed(*three_plugins)
    assert states(registry) == {"kernels": "disabled", "a": "disabled", "b": "loaded"}
    assert registry.names("kernel") == ["kb"]


def test_disabling_the_drpo_distribution_does_not_disable_builtins(installed, three_plugins, monkeypatch):
    monkeypatch.setenv("DRPO_DISABLE_PLUGINS", "drpo")
    assert states(installed(*three_plugins))["kernels"] == "loaded"


# -- name clashes -------------------------------------------------------------------------------------


def test_two_components_under_one_name_fail_only_the_run_that_uses_it(installed):
    registry = installed(FakeEntryPoint("one", kernel_plugin("one", "imq", "one-only"), "drpo-imq-one"),
                         FakeEntryPoint("two", kernel_plugin("two", "imq"), "drpo-imq-two"))
    assert {p.name: p.state for p in registry.plugins} == {"one": "loaded", "two": "loaded"}
    assert registry.get("kernel", "one-only").plugin.name == "one"  # the rest of each plugin works
    with pytest.raises(PluginError) as error:
        registry.get("kernel", "imq")
    message = str(error.value)
    assert "kernel 'imq' is registered twice" in message
    assert "drpo-imq-one" in message and "drpo-imq-two" in message
    assert "DRPO_DISABLE_PLUGINS" in message
    assert [(key, [s.plugin.name for s in specs]) for key, specs in registry.clashes.items()] == [
        (("kernel", "imq"), ["one", "two"])]


def test_a_name_clashing_with_an_alias_is_a_clash_too(installed):
    registry = installed(FakeEntryPoint("kernels", drpo_kernels),
                         FakeEntryPoint("exp", kernel_plugin("exp", "exponential"), "drpo-exp"))
    with pytest.raises(PluginError, match=r"kernel 'exponential' is registered twice") as error:
        registry.get("kernel", "exponential")
    assert "by drpo (kernels)" in str(error.value) and "by drpo-exp (exp)" in str(error.value)
    assert registry.get("kernel", "laplacian").plugin.name == "kernels"


def test_list_plugins_shows_a_clash_and_keeps_working(installed, monkeypatch):
    from typer.testing import CliRunner

    from drpo_cli.main import app
    from drpo_core import registry as registry_module

    registry = installed(FakeEntryPoint("one", kernel_plugin("one", "imq"), "drpo-imq-one"),
                         FakeEntryPoint("two", kernel_plugin("two", "imq"), "drpo-imq-two"))
    monkeypatch.setattr(registry_module, "_default", registry)
    result = CliRunner().invoke(app, ["list-plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["one"]["clashes"] == ["clash: kernel 'imq' is also registered by two"]
    assert rows["two"]["clashes"] == ["clash: kernel 'imq' is also registered by one"]


def test_filters_take_the_names_list_plugins_shows_and_warn_on_others(installed, monkeypatch):
    eps = [FakeEntryPoint("one", kernel_plugin("one", "a"), "drpo-one"),
           FakeEntryPoint("two", kernel_plugin("two", "b"), "drpo-two")]
    monkeypatch.setenv("DRPO_DISABLE_PLUGINS", "one")  # the plugin name, not only the distribution's
    assert {p.name: p.state for p in installed(*eps).plugins} == {"one": "disabled", "two": "loaded"}
    monkeypatch.setenv("DRPO_DISABLE_PLUGINS", "")
    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "two,nothing-here")
    with pytest.warns(UserWarning, match="DRPO_LOAD_PLUGINS names nothing-here, which match no installed plugin"):
        states = {p.name: p.state for p in installed(*eps).plugins}
    assert states == {"one": "disabled", "two": "loaded"}


def test_unknown_name_says_which_plugins_did_not_load(installed, monkeypatch):
    monkeypatch.setenv("DRPO_DISABLE_PLUGINS", "drpo-one")
    registry = installed(FakeEntryPoint("one", kernel_plugin("one", "a"), "drpo-one"),
                         FakeEntryPoint("bad", ImportError("needs torch 9"), "drpo-bad"))
    with pytest.raises(PluginError) as error:
        registry.get("kernel", "a")
    assert str(error.value).endswith(
        "; not loaded, and may provide it: bad (broken: ImportError: needs torch 9), one (disabled)")


def test_a_component_of_another_api_version_is_refused_when_built():
    class OldRanker:
        api_version = 1
        binary = False

    module = plugin_module("old", drpo_register_rankers=lambda register: register("old", lambda o, c: OldRanker()))
    registry = registry_from([module])
    with pytest.raises(PluginError, match=r"ranker 'old' from \(local\) implements drpo API version 1, this drpo "
                                          r"speaks version 2"):
        registry.build("ranker", "old", {}, BuildContext())


def test_a_ranker_whose_scores_contradict_its_registration_is_refused():
    from drpo_core.testing import BrightnessRanker

    module = plugin_module("liar", drpo_register_rankers=lambda register: register(
        "liar", lambda o, c: BrightnessRanker(), provides=("binary",)))
    with pytest.raises(PluginError, match="its scores are graded but its registration says otherwise"):
        registry_from([module]).build("ranker", "liar", {}, BuildContext())


def test_the_same_name_in_different_kinds_is_fine():
    registry = registry_from([drpo_shapes])
    assert {kind: registry.names(kind) for kind in ("generator", "ranker", "feature")} == {
        "generator": ["shapes"], "ranker": ["shapes"], "feature": ["shapes"]}


# -- lookup -------------------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Registry:
    return registry_from([drpo_kernels, drpo_latent, drpo_shapes])


def test_unknown_name_suggests_the_closest_and_how_to_list(registry):
    with pytest.raises(PluginError) as error:
        registry.get("kernel", "laplacain")
    assert str(error.value) == ("unknown kernel 'laplacain': did you mean laplacian? "
                                "run `drpo list-plugins` to see the installed ones")


def test_unknown_name_without_close_match_still_says_how_to_list(registry):
    with pytest.raises(PluginError, match=r"^unknown feature 'zzz': run `drpo list-plugins`"):
        registry.get("feature", "zzz")


def test_variants_are_checked(registry):
    assert registry.get("ranker", "shapes:counting").name == "shapes"
    assert registry.get("ranker", "shapes").name == "shapes"
    with pytest.raises(PluginError, match=r"unknown variant 'colour' of ranker 'shapes': choose one of counting"):
        registry.get("ranker", "shapes:colour")
    with pytest.raises(PluginError, match=r"kernel 'rbf' takes no variant \(got 'rbf:wide'\)"):
        registry.get("kernel", "rbf:wide")


def test_aliases_resolve_to_the_component(registry):
    from drpo_kernels.kernels import laplacian

    assert registry.get("kernel", "exponential").name == "laplacian"
    assert registry.build("kernel", "exponential", {}, BuildContext()) is laplacian


def test_recommended_settings_depend_on_the_variant(registry):
    spec = registry.get("ranker", "shapes:counting")
    assert spec.recommended("counting")["train.lr"] == 3e-4
    assert registry.get("kernel", "rbf").recommended(None) == {}


def test_options_are_validated_naming_the_plugin_key(registry):
    from drpo_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^features\.strid: unknown key \(did you mean stride\?\)$"):
        registry.validate_options("feature", "latent", {"strid": 2}, "features")
    with pytest.raises(ConfigError, match=r"^kernel\.width: unknown key \(kernel 'rbf' takes no options\)$"):
        registry.validate_options("kernel", "rbf", {"width": 2}, "kernel")
    assert registry.validate_options("feature", "latent", {"stride": 2, "keys": ["latent"]}, "features").stride == 2


def test_a_factory_missing_a_package_names_the_component_and_distribution():
    def drpo_register_rankers(register):
        def build(options, context):
            import drpo_package_that_does_not_exist  # noqa: F401

        register("needs-extra", build)

    registry = registry_from([plugin_module("extra", drpo_register_rankers=drpo_register_rankers)])
    with pytest.raises(PluginError, match=r"ranker 'needs-extra' from \(local\) needs a missing package: No module"):
        registry.build("ranker", "needs-extra", {}, BuildContext())


# -- registration is light --------------------------------------------------------------------------


def _imported_heavy(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", BUILTIN_MODULES)
def test_registering_a_builtin_plugin_imports_no_heavy_library(module):
    code = f"import {module}\nfrom drpo_core.registry import registry_from\nregistry_from([{module}])"
    assert _imported_heavy(code) == []


def test_loading_the_cli_and_every_installed_plugin_imports_no_heavy_library():
    code = "import drpo_cli.main\nfrom drpo_core.registry import get_registry\nget_registry()"
    assert _imported_heavy(code) == []


def test_help_time_is_reported(record_property):
    """Information only (machines differ): how long ``drpo --help`` takes in a fresh process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "drpo_cli.main", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parent)
    elapsed = time.perf_counter() - start
    record_property("drpo_help_seconds", round(elapsed, 3))
    print(f"drpo --help: {elapsed:.2f} s")
    assert result.returncode == 0 and "list-plugins" in result.stdout


def test_registering_a_plugin_twice_keeps_the_first_copy_working():
    def drpo_register_commands(cli):
        cli.command("hello")(lambda: None)

    plugin = plugin_module("twice", drpo_register_commands=drpo_register_commands)
    registry = registry_from([plugin, plugin])
    first, second = registry.plugins
    assert second.state == "broken" and "already registered" in second.error
    registry.add_commands(typer.Typer())
    assert (first.state, first.components) == ("loaded", [("command", "hello")])
