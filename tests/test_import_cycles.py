"""No module imports its importers, and the layering holds (see ``tests/import_graph.py``).

Every import statement counts: module level, lazy (inside functions) and ``if TYPE_CHECKING:``.
"""

from pathlib import Path

import pytest

from tests.import_graph import (
    Import,
    build_graph,
    cycles,
    describe_cycle,
    discover,
    layering_violations,
    plugin_packages,
)


@pytest.fixture(scope="module")
def graph():
    return build_graph(discover())


def test_every_package_is_covered(graph):
    packages = {module.split(".")[0] for module in graph}
    assert {"drpo_core", "drpo_cli", "drpo_kernels", "drpo_latent", "drpo_image_rankers", "drpo_shapes",
            "drpo_diffusers", "drpo_geneval", "drpo_example_plugin"} <= packages
    assert "drpo_core.trainer" in graph and "drpo_diffusers.generator" in graph


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe_cycle(graph, c) for c in found)


def test_layering(graph):
    assert layering_violations(graph) == []


# -- the checker itself, on a package written for it -------------------------------------------


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return discover(root, ("drpo_core", "cli/drpo_*", "plugins/drpo_*"))


def test_lazy_type_checking_and_submodule_imports_close_cycles(tmp_path):
    modules = _package(tmp_path, {
        "drpo_core/__init__.py": "from drpo_core.api import Thing\n",
        "drpo_core/api.py": "Thing = 1\n",
        # a -> b at module level, b -> a lazily: a cycle
        "drpo_core/a.py": "from drpo_core import b\n",
        "drpo_core/b.py": "def f():\n    from . import a\n",
        # c -> d under TYPE_CHECKING, d -> c through a relative `from .c import`: a cycle
        "drpo_core/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import drpo_core.d\n",
        "drpo_core/d.py": "from .c import something\n",
        # e imports its own package, whose __init__ does not import e: no cycle
        "drpo_core/e.py": "from drpo_core import Thing\n",
        "plugins/drpo_x/__init__.py": "import drpo_core.api\n",
        "plugins/drpo_x/sub/__init__.py": "from ..helpers import h\n",
        "plugins/drpo_x/helpers.py": "def h():\n    import drpo_x.sub\n",
    })
    assert set(modules) == {"drpo_core", "drpo_core.api", "drpo_core.a", "drpo_core.b", "drpo_core.c",
                            "drpo_core.d", "drpo_core.e", "drpo_x", "drpo_x.sub", "drpo_x.helpers"}
    graph = build_graph(modules)
    assert graph["drpo_core.b"] == {"drpo_core.a": [Import(2, lazy=True, type_checking=False)]}
    assert graph["drpo_core.c"] == {"drpo_core.d": [Import(3, lazy=False, type_checking=True)]}
    assert set(graph["drpo_core.e"]) == {"drpo_core"}
    assert cycles(graph) == [["drpo_core.a", "drpo_core.b"], ["drpo_core.c", "drpo_core.d"],
                             ["drpo_x.helpers", "drpo_x.sub"]]
    text = describe_cycle(graph, ["drpo_core.a", "drpo_core.b"])
    assert "drpo_core.b -> drpo_core.a (line 2, lazy)" in text
    assert plugin_packages(graph) == {"drpo_x"}
    assert layering_violations(graph) == []


def test_layering_rules_are_enforced(tmp_path):
    modules = _package(tmp_path, {
        "drpo_core/__init__.py": "",
        "drpo_core/registry.py": "def load():\n    import drpo_cli.main\n",
        "drpo_core/helpers.py": "from drpo_plug import thing\n",
        # testing imports no plugin itself, but reaches one through helpers
        "drpo_core/testing.py": "from drpo_core import helpers\n",
        "cli/drpo_cli/__init__.py": "",
        "cli/drpo_cli/main.py": "import drpo_core.registry\n",
        "plugins/drpo_plug/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from drpo_cli.main import app\nthing = 1\n",
    })
    problems = layering_violations(build_graph(modules))
    assert problems == [
        "drpo_core.helpers imports drpo_plug (line 1): drpo_core must not import a plugin or the CLI",
        "drpo_core.registry imports drpo_cli.main (line 2, lazy): drpo_core must not import a plugin or the CLI",
        "drpo_plug imports drpo_cli.main (line 3, TYPE_CHECKING): plugins must not import the CLI",
        "drpo_core.testing reaches drpo_plug: it must import no built-in plugin",
    ]
