"""Errors a user can fix. The CLI prints ``str(error)`` as one line and exits with code 2."""


class DrpoError(Exception):
    """Bad input: config, CLI arguments, plugin, data, or a component's output."""


class ConfigError(DrpoError):
    """The run configuration is invalid."""


class PluginError(DrpoError):
    """A plugin could not be found, loaded or built."""


class ComponentError(DrpoError):
    """A component misbehaved at run time (a ranker returned NaN or the wrong count, ...)."""


class AssetError(DrpoError):
    """A model file is missing, cannot be downloaded, fails its checksum or cannot be read safely."""


class RunAborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: the run stops at once, writing nothing half-done. The CLI prints
    ``str(error)`` as one line and exits with code 130. A ``KeyboardInterrupt``, so no ``except
    Exception`` on the way (a ranker guard, say) can swallow it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def reason(error: BaseException) -> str:
    """An exception as a short clause: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
