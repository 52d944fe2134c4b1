"""Shared test setup: no hub access, no installed third-party plugins, the drpo fixtures."""

import os

# before any Hugging Face import: a hub lookup would otherwise retry for minutes
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DRPO_LOAD_PLUGINS", "")  # built-ins only, unless a test says otherwise

pytest_plugins = ["drpo_core.testing"]
