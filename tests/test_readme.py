"""The ``drpo list-plugins`` output shown in README.md is the current one."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _updater():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "docs" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_list_plugins_block_is_current():
    updater = _updater()
    shown = updater.current((REPO / "README.md").read_text(encoding="utf-8"))
    assert shown is not None, f"README.md has no {updater.START} ... {updater.END} block"
    assert shown == updater.render(), (
        "README.md shows an outdated `drpo list-plugins` table: regenerate it with `python docs/update_readme.py`"
    )


def test_the_updater_only_touches_its_block():
    updater = _updater()
    text = f"# title\n\nbefore\n\n{updater.START}\n```text\nold\n```\n{updater.END}\n\nafter\n"
    assert updater.updated(text, "new") == text.replace("old", "new")
    assert updater.current(updater.updated("# title\n", "table")) == "table"
    assert updater.updated("# title\n", "table").startswith("# title\n\n")
