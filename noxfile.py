"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s demo``,
``nox -s image_reward_server``."""

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


@nox.session(venv_backend="venv")
def image_reward_server(session: nox.Session) -> None:
    """The reference ranker server with the real `image-reward` package in its own venv, at a tiny size.

    image-reward 1.5 needs transformers<=4.55, setuptools<81 and undeclared `datasets` and `clip`, which
    cannot share drpo's environment (docs/remote-rankers.md); its venv here has no drpo at all. Not in CI:
    it installs an old stack (torch with its matching torchvision)."""
    session.install("torch==2.14.1", "torchvision==0.29.1", "transformers==4.45.2", "setuptools<81",
                    "image-reward==1.5", "datasets", "openai-clip", "numpy", "pillow",
                    "diffusers<0.31")  # image-reward imports diffusers, whose later releases need newer transformers
    session.run("python", "examples/reference-ranker-server/tiny_image_reward.py", env={"HF_HUB_OFFLINE": "1"})
