"""The plugin contract is typed: mypy, run with the project's settings (``[tool.mypy]`` in pyproject.toml),
refuses ``tests/typecheck/mistyped_plugin.py`` with exactly the errors marked in it: a ranker factory
that returns an ``int``, feature spaces whose ``features`` has the wrong signature, a duck-typed
feature space, a kernel with the wrong call signature and a misspelt ``register`` keyword.

The whole code base is type-checked by ``.ci/run`` (``python -m mypy``); this test checks that the check
has teeth for plugins.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "typecheck" / "mistyped_plugin.py"
EXPECT = re.compile(r"# expect: ([a-z-]+(?:, [a-z-]+)*)$")

pytestmark = pytest.mark.slow  # a cold mypy cache takes ~30 s


def expected_errors() -> set[tuple[int, str]]:
    """``(line, code)`` of every ``# expect: code[, code]`` comment in the fixture."""
    expected = set()
    for number, line in enumerate(FIXTURE.read_text(encoding="utf-8").splitlines(), start=1):
        match = EXPECT.search(line)
        if match:
            expected |= {(number, code) for code in match.group(1).split(", ")}
    return expected


@pytest.fixture(scope="module")
def mypy_errors() -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--output", "json",
         str(FIXTURE.relative_to(REPO))],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, f"mypy should report errors (exit 1), got {result.returncode}:\n" \
                                   f"{result.stdout}\n{result.stderr}"
    errors = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [e for e in errors if e["severity"] == "error"]


def test_the_fixture_declares_its_errors():
    assert len(expected_errors()) >= 8


def test_mypy_reports_exactly_the_marked_errors(mypy_errors):
    found = {(e["line"], e["code"]) for e in mypy_errors}
    assert {e["file"] for e in mypy_errors} == {str(FIXTURE.relative_to(REPO))}
    details = "\n".join(f"{e['line']}: [{e['code']}] {e['message']}" for e in mypy_errors)
    assert found == expected_errors(), f"missing: {sorted(expected_errors() - found)}, " \
                                       f"unexpected: {sorted(found - expected_errors())}\n{details}"


def _messages(mypy_errors: list[dict], marker: str) -> str:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    numbers = {n for n, line in enumerate(lines, start=1) if marker in line and EXPECT.search(line)}
    assert numbers, marker
    return "\n".join(e["message"] for e in mypy_errors if e["line"] in numbers)


def test_the_errors_say_what_is_wrong(mypy_errors):
    # the factory's return type against the kind of component the hook registers
    assert '"Callable[[Any, BuildContext], int]"' in _messages(mypy_errors, 'register("count", build_count)')
    assert '"Callable[[Any, BuildContext], Ranker]"' in _messages(mypy_errors, 'register("count", build_count)')
    assert "DuckFeatures" in _messages(mypy_errors, 'register("duck", build_duck)')
    assert "Kernel" in _messages(mypy_errors, 'register("bad", ')
    assert '"sumary"' in _messages(mypy_errors, 'sumary=')
    # a FeatureSpace subclass whose features() breaks the interface's signature
    contextless = _messages(mypy_errors, "def features(self, x: torch.Tensor) -> dict")
    assert 'Signature of "features" incompatible with supertype' in contextless
    flat = _messages(mypy_errors, "context: FeatureContext) -> torch.Tensor:")
    assert 'Return type "Tensor" of "features" incompatible' in flat
