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


def yaml_blocks() -> list[tuple[str, str]]:
    """``(file, text)`` of every ```yaml block in the README and docs/."""
    import re

    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for text in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
            blocks.append((path.name, text))
    return blocks


def test_every_yaml_block_in_the_docs_is_a_valid_config_as_written(builtin_registry):
    """A user copies these into a recipe: each must resolve as written (completed with a generator and prompts
    when it shows only some sections), unknown keys and bad values being refused by resolve."""
    from drpo_core.config import parse_yaml, resolve_config

    blocks = yaml_blocks()
    assert len(blocks) >= 3
    for name, text in blocks:
        shown = parse_yaml(text, name)  # as drpo reads a recipe (1e-4 is a number there)
        resolved = resolve_config(base={"generator": "sd-turbo", "prompts": {"path": "prompts.txt"}, **shown},
                                  registry=builtin_registry)
        ranker_names = [r["name"] if isinstance(r, dict) else r for r in shown.get("rankers", [])]
        assert [r.name for r in resolved.config.rankers][:len(ranker_names)] == ranker_names, name
