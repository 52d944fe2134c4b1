"""The example third-party plugin: installed with pip into a throwaway environment, it is found
through its entry point alone, honours the plugin filters, and a short run uses both components."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "drpo-example-plugin"
DIST = "drpo-example-plugin"

pytestmark = pytest.mark.slow

RECIPE = """\
seed: 0
generator: tiny
rankers:
  - {name: warmth, weight: 1.5}
features: tiny-pixels
kernel: {name: imq, beta: 1.0}
selection: {candidates: 4, positives: 1, negatives: 1}
prompts: {path: prompts.txt, eval_count: 1}
train: {steps: 3, lr: 1e-3, device: cpu}
eval: {seeds: [0], grid_prompts: 0}
checkpoint: {every: 100}
log: {progress: false}
"""

# The test fakes (tiny generator, tiny-pixels features) are not installed through entry points: add
# them to the registry the installed plugins were loaded into, then run the real CLI.
RUN_WITH_FAKES = """\
import sys
from drpo_core.registry import Registry, set_registry
from drpo_core.testing import fakes_plugin
registry = Registry().load_entry_points()
registry.register_module(fakes_plugin)
set_registry(registry)
from drpo_cli.main import main
sys.argv = ["drpo", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv that sees this environment's packages (drpo, torch, pip, setuptools) through a
    .pth file, with the example plugin pip-installed into it, offline."""
    root = tmp_path_factory.mktemp("example-plugin")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir (not a bare path line) so the .pth files there, e.g. drpo's editable install, apply too
    main_site = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_drpo_parent_env.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    source = shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment: cannot install the example plugin")
    # offline with this environment's setuptools; without one, pip fetches it for an isolated build
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", *offline, str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def drpo(python: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DRPO_LOAD_PLUGINS", "DRPO_DISABLE_PLUGINS")}
    return subprocess.run([str(python), "-m", "drpo_cli.main", *args], capture_output=True, text=True,
                          timeout=300, env={**environ, **env}, cwd=cwd)


def example_row(python: Path, **env: str) -> dict:
    result = drpo(python, "list-plugins", "--json", **env)
    assert result.returncode == 0, result.stderr
    rows = [row for row in json.loads(result.stdout) if row["distribution"] == DIST]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_example_plugin_is_not_installed_here():
    """The main environment must not see it: the throwaway venv is what makes it appear."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(DIST)
    except PackageNotFoundError:
        return
    pytest.fail(f"{DIST} is installed in this environment: `pip uninstall {DIST}` (the test installs it "
                "into a throwaway one; a second copy would clash with it)")


def test_installed_plugin_is_listed_with_its_components(venv):
    row = example_row(venv, DRPO_LOAD_PLUGINS=DIST)
    assert row == {"name": "example", "module": "drpo_example_plugin", "distribution": DIST, "version": "0.1.0",
                   "builtin": False, "state": "loaded", "error": None,
                   "components": {"ranker": ["warmth"], "kernel": ["imq"]}, "clashes": [],
                   "summaries": {"kernel imq": "-beta log(1 + (d/(s r))^2): inverse multiquadric kernel (heavy tails)",
                                 "ranker warmth": "mean red minus mean blue"}}


def test_installed_plugin_loads_without_filters(venv):
    assert example_row(venv)["state"] == "loaded"


def test_disable_plugins_blocks_it(venv):
    row = example_row(venv, DRPO_DISABLE_PLUGINS=DIST)
    assert (row["state"], row["components"]) == ("disabled", {})


def test_empty_load_plugins_leaves_it_out(venv):
    assert example_row(venv, DRPO_LOAD_PLUGINS="")["state"] == "disabled"


def test_a_short_run_uses_both_components(venv, tmp_path):
    (tmp_path / "prompts.txt").write_text("a warm sunset\na cold lake\na red apple\na blue car\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "run.py").write_text(RUN_WITH_FAKES)
    env = {k: v for k, v in os.environ.items() if k != "DRPO_DISABLE_PLUGINS"}
    result = subprocess.run(
        [str(venv), "run.py", "train", "--config", "recipe.yaml", "--output-dir", "out"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**env, "DRPO_LOAD_PLUGINS": DIST})
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "out"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["kernel"] == {"name": "imq", "beta": 1.0}
    assert config["rankers"] == [{"name": "warmth", "weight": 1.5}]
    assert config["drift"]["radii"] == [0.05, 0.2, 0.5]  # the kernel's recommended setting
    plugins = json.loads((run / "run.json").read_text())["plugins"]
    assert plugins["example"] == {"distribution": DIST, "version": "0.1.0", "state": "loaded"}
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert any("score/warmth" in record for record in evals)


def test_config_show_names_the_plugins_recommended_setting(venv, tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "run.py").write_text(RUN_WITH_FAKES)
    env = {**os.environ, "DRPO_LOAD_PLUGINS": DIST, "COLUMNS": "200"}
    result = subprocess.run([str(venv), "run.py", "config", "show", "-c", "recipe.yaml"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("drift.radii"))
    assert line.split()[1:] == ["[0.05,", "0.2,", "0.5]", "kernel", "imq"]
