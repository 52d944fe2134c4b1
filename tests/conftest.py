"""Shared test setup: no hub access, no installed third-party plugins, the drpo fixtures."""

import os

import pytest

# before any Hugging Face import: a hub lookup would otherwise retry for minutes
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DRPO_LOAD_PLUGINS", "")  # built-ins only, unless a test says otherwise

pytest_plugins = ["drpo_core.testing"]


def pytest_configure(config):
    # the test models are tiny: threads gain nothing, and two xdist workers on two cores thrash
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD and SDXL Turbo pipelines saved with save_pretrained: ``{"sd": dir, "sdxl": dir}``."""
    from drpo_diffusers.testing import build_tiny_pipelines

    return build_tiny_pipelines(tmp_path_factory.getbasetemp() / "drpo_diffusers_tiny")
