"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s demo``."""

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
CPU_TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(CPU_TORCH)
    session.install("-e", ".[dev]")
    session.run("pytest", "-n", "2", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy with the settings of ``[tool.mypy]`` in pyproject.toml (what .ci/run runs)."""
    session.install(CPU_TORCH)
    session.install("-e", ".[dev]")
    session.run("mypy", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The embedded default run: the README's main job."""
    session.install(CPU_TORCH)
    session.install("-e", ".")
    session.run("drpo", "train", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
