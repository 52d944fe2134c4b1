"""drpo: Drifting Preference Optimization for one-step image generators."""

from drpo_core.hookspecs import hookimpl
from drpo_core.interfaces import API_VERSION, FeatureSpace, Generator, Kernel, Ranker

__version__ = "0.1.0"
__all__ = ["API_VERSION", "FeatureSpace", "Generator", "Kernel", "Ranker", "hookimpl", "__version__"]
