"""Rankers in another process or machine: the ``remote`` ranker and ``drpo serve-ranker``.

* ``remote:http://HOST:PORT`` (``remote-binary:...`` for 0/1 scores): a client of a ranker server, with the
  standard library's urllib; the ranker section's ``timeout`` is the total deadline of each score call
  (:mod:`drpo_remote.client`).
* ``drpo serve-ranker NAME[:VARIANT]``: any registered ranker behind HTTP on Starlette and uvicorn (extra
  ``serve``; :mod:`drpo_remote.server`).

The wire format (:mod:`drpo_remote.wire`) is plain JSON with raw uint8 images; a server in another virtual
environment needs no drpo (examples/reference-ranker-server). docs/remote-rankers.md has the details.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Ranker
from drpo_remote.options import RemoteOptions, check_url

if TYPE_CHECKING:
    import typer


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    # requires: a section timeout (the total deadline of a call, retries included), checked before loading
    register("remote", _build_graded, options=RemoteOptions, variants=check_url, requires=("timeout",),
             summary="scores from a ranker server over HTTP (drpo serve-ranker)")
    register("remote-binary", _build_binary, options=RemoteOptions, variants=check_url, provides=("binary",),
             requires=("timeout",),
             summary="0/1 scores from a ranker server over HTTP")


@hookimpl
def drpo_register_commands(cli: typer.Typer) -> None:
    from drpo_remote.commands import serve_ranker

    cli.command("serve-ranker")(serve_ranker)


# module-level factories (the ranker worker imports them by name); the client, with torch, only when built
def _build_graded(options: RemoteOptions, context: BuildContext) -> Ranker:
    from drpo_remote.client import build_remote

    return build_remote(options, context, binary=False)


def _build_binary(options: RemoteOptions, context: BuildContext) -> Ranker:
    from drpo_remote.client import build_remote

    return build_remote(options, context, binary=True)
