"""Shared test setup: no hub access, no installed third-party plugins, the drpo fixtures.

``drpo_core.testing`` holds only the fakes; this repository's tests also get the built-in kernels and
the ``latent`` feature space (the default kernel ``laplacian`` among them): through ``make_registry``
below and the ``isolated_registry`` fixture, which extends ``drpo_core.testing``'s.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

# before any Hugging Face import: a hub lookup would otherwise retry for minutes
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DRPO_LOAD_PLUGINS", "")  # built-ins only, unless a test says otherwise

pytest_plugins = ["drpo_core.testing"]
#: the ``drpo`` console script of the environment running the tests, for tests that run it as a user would
DRPO = shutil.which("drpo", path=str(Path(sys.executable).parent))
#: a one-step run of the fakes, fast enough to run through the console script; a test adds its `rankers:` line
TINY_RUN = """\
generator: tiny
features: tiny-pixels
kernel: tiny-laplacian
selection: {candidates: 4, positives: 1, negatives: 1}
prompts: {path: prompts.txt, eval_count: 1}
train: {steps: 1, device: cpu}
eval: {seeds: [0], grid_prompts: 0}
log: {progress: false}
"""
# input for the type checker only (tests/test_typecheck.py), never imported
collect_ignore_glob = ["typecheck/*"]


def builtin_plugins() -> tuple[object, ...]:
    """The built-in plugins every registry of these tests holds besides the fakes."""
    import drpo_kernels
    import drpo_latent

    return (drpo_kernels, drpo_latent)


def make_registry(*plugins: object):
    """The built-in kernels and latent features, the fakes, and ``plugins``; nothing else installed."""
    from drpo_core.testing import make_registry as fakes_registry

    return fakes_registry(*builtin_plugins(), *plugins)


def pytest_configure(config):
    # the test models are tiny: threads gain nothing, and two xdist workers on two cores thrash
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD and SDXL Turbo pipelines saved with save_pretrained: ``{"sd": dir, "sdxl": dir}``."""
    from drpo_diffusers.testing import build_tiny_pipelines

    return build_tiny_pipelines(tmp_path_factory.getbasetemp() / "drpo_diffusers_tiny")


@pytest.fixture
def isolated_registry(isolated_registry):
    """``drpo_core.testing``'s fixture (the fakes, restored afterwards) plus the built-in kernels and
    latent features."""
    for plugin in builtin_plugins():
        isolated_registry.register_module(plugin)
    return isolated_registry


@pytest.fixture(scope="session")
def tiny_vision_dirs(tmp_path_factory):
    """Tiny DINOv2 and ViT-MAE checkpoints saved with save_pretrained: ``{"dinov2": dir, "vit-mae": dir}``."""
    from drpo_vision_features.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "drpo_vision_tiny")


@pytest.fixture(scope="session")
def builtin_registry():
    """A registry of the installed built-in plugins only (no third-party ones, nothing disabled)."""
    from drpo_core.registry import Registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRPO_LOAD_PLUGINS", "")
        patch.delenv("DRPO_DISABLE_PLUGINS", raising=False)
        return Registry().load_entry_points()
