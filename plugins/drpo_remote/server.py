"""``drpo serve-ranker``: a registered ranker behind HTTP, on Starlette and uvicorn (extra ``serve``).

Requests are queued: one batch is scored at a time, in arrival order (an ``asyncio.Lock`` is fair), in
chunks of at most ``max_batch`` images, so concurrent clients never share a batch and each answer carries
its own request's id. The ranker runs in a thread, so health and metadata answer while it works.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
from typing import Any

import torch

from drpo_core.errors import DrpoError
from drpo_remote.wire import (
    HEALTH,
    METADATA,
    SCORE,
    WIRE_VERSION,
    WireError,
    parse_score_request,
    score_response,
)


def make_app(ranker: Any, *, name: str, variant: str | None, token: str | None, max_batch: int,
             device: str) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    import drpo_core

    queue = asyncio.Lock()
    metadata = {"api": WIRE_VERSION, "name": name, "variant": variant, "binary": bool(getattr(ranker, "binary", False)),
                "server": f"drpo {drpo_core.__version__}", "drpo_version": drpo_core.__version__,
                "max_batch": max_batch, "uses_prompt": bool(getattr(ranker, "uses_prompt", True))}

    def refused(request: Request) -> Response | None:
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        why = "no bearer token" if not given else "wrong bearer token"
        return JSONResponse({"error": why}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def score_chunks(images: torch.Tensor, prompts: list[str], metadata: list[Any]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), max_batch):
                stop = start + max_batch
                scores = ranker.score(images[start:stop].to(device), prompts[start:stop], metadata[start:stop])
                scores = torch.as_tensor(scores).detach().float().cpu().flatten()
                if len(scores) != len(prompts[start:stop]):
                    raise RuntimeError(f"the ranker returned {len(scores)} scores for {len(prompts[start:stop])} "
                                       "images")
                out.append(scores)
        return torch.cat(out)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def describe(request: Request) -> Response:
        return refused(request) or JSONResponse(metadata)

    async def score(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        started = time.perf_counter()
        try:
            request_id, images, prompts, meta = parse_score_request(await request.body())
        except WireError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        decoded = time.perf_counter()
        async with queue:
            try:
                scores = await run_in_threadpool(score_chunks, images, prompts, meta)
            except Exception as error:
                return JSONResponse({"error": f"the ranker raised {type(error).__name__}: {error}"}, status_code=500)
        scored = time.perf_counter()
        timing = f"decode;dur={1e3 * (decoded - started):.3f}, score;dur={1e3 * (scored - decoded):.3f}"
        return Response(score_response(request_id, scores), media_type="application/json",
                        headers={"Server-Timing": timing})

    return Starlette(routes=[Route(HEALTH, health), Route(METADATA, describe), Route(SCORE, score, methods=["POST"])])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free one), or one line saying why it cannot be: the server
    binds it itself so that a taken port is a clear error before the ranker loads, not uvicorn's log line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise DrpoError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise DrpoError(f"--port {port}: cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on a socket from :func:`listen` until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
