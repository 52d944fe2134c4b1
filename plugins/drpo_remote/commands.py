"""``drpo serve-ranker NAME[:VARIANT]``: any registered ranker over HTTP (docs/remote-rankers.md)."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer


def serve_ranker(
    ranker: Annotated[str, typer.Argument(help="Ranker NAME[:VARIANT] to serve.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless you open it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8765,
    token_env: Annotated[str | None, typer.Option(
        help="Environment variable holding a token: requests without `Authorization: Bearer TOKEN` get 401.")] = None,
    device: Annotated[str, typer.Option(help="Device of the ranker: auto (cuda if torch sees a GPU, else mps, "
                                             "else cpu), cpu, cuda, cuda:N, mps.")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="Images scored at once; larger requests go in chunks.")] = 32,
    assignments: Annotated[list[str] | None, typer.Option(
        "--set", help="A ranker option, key=value (as rankers.N.key in a recipe), repeatable.")] = None,
) -> None:
    """Serve a registered ranker over HTTP (for --ranker remote:http://HOST:PORT)."""
    from drpo_core.config import parse_assignment
    from drpo_core.context import BuildContext
    from drpo_core.errors import ConfigError
    from drpo_core.preflight import check_device, resolve_device
    from drpo_core.registry import get_registry, split_reference
    from drpo_remote.server import listen, make_app, serve

    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError(f"--token-env {token_env}: the environment variable is not set or empty")
    elif not _loopback(host):
        typer.echo(f"warning: serving on {host} without a token (--token-env): anyone who reaches it can use it",
                   err=True)
    options = dict(parse_assignment(text) for text in assignments or [])
    device = resolve_device(device, "--device")
    registry = get_registry()
    checked = registry.validate_options("ranker", ranker, options, "ranker")
    if isinstance(getattr(checked, "device", None), str):  # the ranker's own device option: --set device=cuda:1
        check_device(checked.device, "--set device")
    sock = listen(host, port)  # a taken port fails here, before the ranker loads and before "serving"
    built = registry.build("ranker", ranker, checked, BuildContext(device=device), "ranker")
    name, variant = split_reference(ranker)
    app = make_app(built, name=name, variant=variant, token=token, max_batch=max_batch, device=device)
    typer.echo(f"serving ranker {ranker!r} on http://{host}:{sock.getsockname()[1]} ({device})")
    serve(app, sock)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
