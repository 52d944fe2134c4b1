"""The import graph of drpo's own packages, read from the source with the standard library's ``ast``.

Every import statement counts: at module level, inside functions (lazy imports) and under
``if TYPE_CHECKING:``, because each of them is a dependency that a refactoring has to respect, and a
lazy import that closes a cycle is a cycle that merely has not bitten yet. ``from x import y`` is an
import of the module ``x.y`` when ``y`` is a submodule, else of ``x``; relative imports are resolved;
importing ``a.b`` is not counted as importing the package ``a`` (every submodule would otherwise
import its package, and every package that imports a submodule would close a cycle). Imports of
anything that is not one of our modules are ignored, as are dynamic ones (``importlib.import_module``).

API (used by ``tests/test_import_cycles.py``)::

    modules = discover(REPO)            # {"drpo_core.config": Path(...), ...}
    graph = build_graph(modules)        # {importer: {imported: [Import(line, lazy, type_checking)]}}
    cycles(graph)                       # strongly connected components of 2+ modules (or self-imports)
    layering_violations(graph)          # the project's layering rules, one line per violating import
    report(graph)                       # all of it as text

Run ``python tests/import_graph.py`` for the report (exit status 1 when there is a cycle or a violation).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: where our packages live: the core, the CLI, the built-in plugins and the example plugin
PACKAGE_GLOBS = ("drpo_core", "cli/drpo_*", "plugins/drpo_*", "examples/*/drpo_*")
CORE, CLI = "drpo_core", "drpo_cli"


@dataclass(frozen=True)
class Import:
    """One import statement of a module of another: where it is and how it runs."""

    line: int
    #: inside a function (runs when the function is called)
    lazy: bool
    #: inside ``if TYPE_CHECKING:`` (never runs, but the type checker follows it)
    type_checking: bool

    def describe(self) -> str:
        return f"line {self.line}" + ", lazy" * self.lazy + ", TYPE_CHECKING" * self.type_checking


Graph = dict[str, dict[str, list[Import]]]


def discover(root: Path = REPO, globs: Iterable[str] = PACKAGE_GLOBS) -> dict[str, Path]:
    """Every module of the packages (folders with an ``__init__.py``) that ``globs`` name under ``root``, by
    dotted name: ``{"drpo_core.config": path, "drpo_core": .../__init__.py, ...}``."""
    modules: dict[str, Path] = {}
    for pattern in globs:
        for package in sorted(root.glob(pattern)):
            if not (package / "__init__.py").is_file():
                continue
            for path in sorted(package.rglob("*.py")):
                parts = path.relative_to(package.parent).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def package_of(module: str) -> str:
    """The top-level package: ``drpo_core.config`` -> ``drpo_core``."""
    return module.split(".", 1)[0]


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: Iterable[str]):
        self.module, self.known = module, set(known)
        # the package relative imports start from
        self.base = module if is_package else module.rpartition(".")[0]
        self.found: dict[str, list[Import]] = {}
        self._depth = 0  # functions we are in
        self._type_checking = 0  # `if TYPE_CHECKING:` blocks we are in

    # -- where we are

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self._type_checking += guarded
        for child in node.body:
            self.visit(child)
        self._type_checking -= guarded
        for child in node.orelse:  # the else branch of `if TYPE_CHECKING:` runs
            self.visit(child)

    # -- what is imported

    def _add(self, target: str | None, line: int) -> None:
        if target is None:
            return
        found = Import(line, lazy=self._depth > 0, type_checking=self._type_checking > 0)
        statements = self.found.setdefault(target, [])
        if found not in statements:  # `from m import a, b` is one import of m
            statements.append(found)

    def _known_prefix(self, name: str) -> str | None:
        """The longest prefix of ``name`` that is one of our modules (``a.b.Class`` -> ``a.b``)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.known:
                return candidate
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(self._known_prefix(alias.name), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.base.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.known:  # `from pkg import module`
                self._add(submodule, node.lineno)
            else:  # `from module import name`
                self._add(self._known_prefix(source), node.lineno)


def imports_of(module: str, path: Path, known: Iterable[str]) -> dict[str, list[Import]]:
    """The modules among ``known`` that ``module`` (the file ``path``) imports, each with its statements."""
    visitor = _Visitor(module, path.name == "__init__.py", known)
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor.found


def build_graph(modules: Mapping[str, Path]) -> Graph:
    """``{importer: {imported: [Import, ...]}}`` over ``modules`` (every module is a key)."""
    return {module: imports_of(module, path, modules) for module, path in sorted(modules.items())}


def cycles(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """Every strongly connected component of two or more modules, and every module that imports
    itself, each sorted; the list sorted too. Tarjan's algorithm, without recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, {}):
                        components.append(sorted(component))
    return sorted(components)


def reachable(graph: Mapping[str, Mapping[str, object]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others (``start`` excluded unless in a cycle)."""
    seen: set[str] = set()
    todo = list(graph.get(start, {}))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, {}))
    return seen


def plugin_packages(graph: Mapping[str, object]) -> set[str]:
    """Every package of ours but the core and the CLI: the built-in plugins and the example plugin."""
    return {package_of(module) for module in graph} - {CORE, CLI}


def layering_violations(graph: Graph) -> list[str]:
    """The project's layering rules, one line per import that breaks one:

    * ``drpo_core`` imports no plugin package and not ``drpo_cli`` (the library is generic);
    * plugin packages never import ``drpo_cli`` (plugins add commands through the hook);
    * ``drpo_core.testing`` reaches no plugin package, not even through other modules (a plugin's
      tests can use it with that plugin alone installed).
    """
    plugins = plugin_packages(graph)
    problems = []
    for importer, targets in sorted(graph.items()):
        for imported, statements in sorted(targets.items()):
            where = f"{importer} imports {imported} ({'; '.join(s.describe() for s in statements)})"
            source, target = package_of(importer), package_of(imported)
            if source == CORE and (target in plugins or target == CLI):
                problems.append(f"{where}: drpo_core must not import a plugin or the CLI")
            elif source in plugins and target == CLI:
                problems.append(f"{where}: plugins must not import the CLI")
    testing = f"{CORE}.testing"
    if testing in graph:
        for module in sorted(reachable(graph, testing)):
            if package_of(module) in plugins:
                problems.append(f"{testing} reaches {module}: it must import no built-in plugin")
    return problems


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """A cycle and the imports that close it: ``a -> b (line 3, lazy)`` for each edge inside it."""
    members = set(component)
    edges = [f"    {importer} -> {imported} ({'; '.join(s.describe() for s in graph[importer][imported])})"
             for importer in component for imported in sorted(graph[importer]) if imported in members]
    return "cycle: " + ", ".join(component) + "\n" + "\n".join(edges)


def report(graph: Graph) -> str:
    lines = [describe_cycle(graph, component) for component in cycles(graph)]
    lines += layering_violations(graph)
    return "\n".join(lines)


def main() -> int:
    graph = build_graph(discover())
    text = report(graph)
    edges = sum(len(targets) for targets in graph.values())
    print(text or f"no import cycles, no layering violations ({len(graph)} modules, {edges} imports)")
    return 1 if text else 0


if __name__ == "__main__":
    sys.exit(main())
