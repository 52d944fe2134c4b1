"""Shared test setup: no hub access, no installed third-party plugins, the drpo fixtures."""

import os

# before any Hugging Face import: a hub lookup would otherwise retry for minutes
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DRPO_LOAD_PLUGINS", "")  # built-ins only, unless a test says otherwise

pytest_plugins = ["drpo_core.testing"]


def pytest_configure(config):
    # two xdist workers on two cores: one torch thread each, or they thrash
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
