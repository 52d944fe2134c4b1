"""Rewrite the ``drpo list-plugins`` block of README.md (``--check``: only say whether it is current).

The block sits between ``<!-- list-plugins:start -->`` and ``<!-- list-plugins:end -->``; it shows the
built-in plugins only, rendered by the real CLI at a fixed width without colour, so it does not
depend on the terminal or on third-party plugins installed on the machine that runs it::

    python docs/update_readme.py          # rewrite the block (appended at the end if missing)
    python docs/update_readme.py --check  # exit 1 when it is out of date (tests/test_readme.py)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- list-plugins:start -->", "<!-- list-plugins:end -->"
WIDTH = 100

# the CLI's own table, with the registry narrowed to the plugins that ship with drpo
_RENDER = """\
from drpo_core.registry import Registry, set_registry
registry = Registry().load_entry_points()
registry.plugins = [info for info in registry.plugins if info.builtin]
set_registry(registry)
from drpo_cli.main import app
app(["list-plugins"], prog_name="drpo")
"""


def render() -> str:
    """The ``drpo list-plugins`` table of the built-in plugins, as the README shows it."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DRPO_DISABLE_PLUGINS", "FORCE_COLOR", "CLICOLOR_FORCE")}
    env.update(DRPO_LOAD_PLUGINS="", COLUMNS=str(WIDTH), LINES="50", NO_COLOR="1", TERM="dumb",
               PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-c", _RENDER], capture_output=True, text=True, encoding="utf-8",
                            env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise SystemExit(f"drpo list-plugins failed:\n{result.stderr}")
    return "\n".join(line.rstrip() for line in result.stdout.strip("\n").splitlines())


def block(table: str) -> str:
    return f"{START}\n```text\n{table}\n```\n{END}"


def current(text: str) -> str | None:
    """The table the README shows now (``None`` without the markers)."""
    if START not in text or END not in text:
        return None
    inner = text.split(START, 1)[1].split(END, 1)[0].strip("\n")
    lines = inner.splitlines()
    if lines[:1] == ["```text"] and lines[-1:] == ["```"]:
        lines = lines[1:-1]
    return "\n".join(lines)


def updated(text: str, table: str) -> str:
    """``text`` with its block replaced (or appended at the end), everything else untouched."""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        return before + block(table) + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block(table) + "\n"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    table = render()
    if "--check" in argv:
        if current(text) == table:
            return 0
        print(f"{README.name}: the `drpo list-plugins` block is out of date; run python docs/update_readme.py")
        return 1
    new = updated(text, table)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"{README.name}: updated the `drpo list-plugins` block")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
