"""The ``remote`` ranker: scores from a ranker server over HTTP, with the standard library's urllib.

Every call has one total deadline, the ranker section's ``timeout``: the ranker runs in the worker process
of :mod:`drpo_core.worker` like any ranker with a timeout, which is ended if a call passes it. Inside that
deadline the client retries what may pass (no connection, no answer within ``request_timeout``, HTTP 5xx)
with exponential backoff, at most ``retries`` times, and gives up a little before the worker would be
ended, with one error naming the URL, the attempts and the last failure. An answer that is wrong (not the
wire format, another request's id, a wrong count) or a refused token is not retried. Every such error is a
``WorkerLost``: the loop checkpoints the completed steps at the failing step's start and stops.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError
from drpo_core.interfaces import API_VERSION, Ranker
from drpo_core.worker import WorkerLost
from drpo_remote.options import RemoteOptions
from drpo_remote.wire import (
    METADATA,
    SCORE,
    WIRE_VERSION,
    WireError,
    loads,
    parse_score_response,
    score_request,
)


class RemoteRankerError(WorkerLost):
    """The server could not be reached, or answered wrongly, within the deadline."""


class _Retryable(Exception):
    """A failure that may pass: no connection, no answer in time, a server error."""


def _margin(deadline: float) -> float:
    """Seconds the client keeps before the worker's deadline, so its own error (which says more) comes first."""
    return min(1.0, 0.1 * deadline)


class RemoteRanker(Ranker):
    """Scores from the ranker server at ``url`` (module doc); ``deadline``: seconds one call may take."""

    api_version = API_VERSION

    def __init__(self, url: str, options: RemoteOptions, deadline: float, *, binary: bool):
        self.url, self.options = url.rstrip("/"), options
        self.deadline = deadline - _margin(deadline)
        self.token = _token(options.token_env)
        self.metadata = self._read_metadata()
        self.uses_prompt = bool(self.metadata.get("uses_prompt", True))  # absent: it may read the prompt
        if bool(self.metadata.get("binary")) != binary:
            kind, name = ("binary (0/1)", "remote-binary") if self.metadata.get("binary") else ("graded", "remote")
            raise ConfigError(f"{self.url} serves {self.metadata.get('name')!r}, whose scores are {kind}: use the "
                              f"ranker {name}:{self.url}")

    def _read_metadata(self) -> dict[str, Any]:
        try:
            meta = loads(self._request(METADATA, None, "metadata"), "the metadata")
        except WireError as error:
            raise RemoteRankerError(f"ranker server {self.url} answered wrongly: {error}") from None
        version = meta.get("api") if isinstance(meta, dict) else None
        if version != WIRE_VERSION:
            raise RemoteRankerError(f"ranker server {self.url} speaks remote-ranker API {version}, this drpo "
                                    f"speaks version {WIRE_VERSION}")
        return dict(meta)

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        started, size, scores = time.monotonic(), self.options.batch_size, []
        for start in range(0, len(images), size):
            request_id = uuid.uuid4().hex
            stop = min(len(images), start + size)
            body = score_request(request_id, images[start:stop], prompts[start:stop], metadata[start:stop])
            answer = self._request(SCORE, body, "score", started)
            try:
                scores.append(parse_score_response(answer, request_id, stop - start))
            except WireError as error:
                raise RemoteRankerError(f"ranker server {self.url} answered wrongly: {error}") from None
        return torch.cat(scores) if scores else torch.zeros(0)

    def _request(self, path: str, body: bytes | None, what: str, started: float | None = None) -> bytes:
        """One request, retried with backoff until it answers, ``retries`` run out or the deadline nears."""
        started = time.monotonic() if started is None else started
        end, attempts, last = started + self.deadline, 0, ""
        while True:
            attempts += 1
            remaining = end - time.monotonic()
            try:
                return self._once(path, body, min(self.options.request_timeout, max(remaining, 0.05)))
            except _Retryable as error:
                last = str(error)
            pause = self.options.backoff * 2 ** (attempts - 1)
            if attempts > self.options.retries or time.monotonic() + pause >= end:
                break
            time.sleep(pause)
        raise RemoteRankerError(f"ranker server {self.url}: {what} failed {attempts} time(s) in "
                                f"{time.monotonic() - started:.1f} s (deadline {self.deadline:g} s, retries "
                                f"{self.options.retries}); last: {last}")

    def _once(self, path: str, body: bytes | None, timeout: float) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            detail = _error_text(error)
            if error.code >= 500:
                raise _Retryable(f"HTTP {error.code}: {detail}") from None
            if error.code == 401:
                where = f"${self.options.token_env}" if self.options.token_env else "no token_env is set"
                raise RemoteRankerError(f"ranker server {self.url} refused the token (HTTP 401: {detail}); the "
                                        f"token comes from {where}") from None
            raise RemoteRankerError(f"ranker server {self.url} refused the request (HTTP {error.code}: "
                                    f"{detail})") from None
        except TimeoutError:
            raise _Retryable(f"no answer within {timeout:.3g} s (request_timeout)") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within {timeout:.3g} s (request_timeout)") from None
            raise _Retryable(f"cannot connect ({getattr(error.reason, 'strerror', None) or error.reason})") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"the connection broke ({type(error).__name__}: {error})") from None


class BinaryRemoteRanker(RemoteRanker):
    """A remote ranker whose scores are 0/1 correctness (``remote-binary``)."""

    binary = True


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
        data = json.loads(body)
        return str(data.get("error", data)) if isinstance(data, dict) else str(data)
    except Exception:
        return error.reason if isinstance(error.reason, str) else "no details"


def _token(variable: str | None) -> str | None:
    if variable is None:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ConfigError(f"token_env: the environment variable {variable} is not set (it holds the ranker "
                          "server's token)")
    return token


def build_remote(options: RemoteOptions, context: BuildContext, binary: bool) -> RemoteRanker:
    name = "remote-binary" if binary else "remote"
    if not context.variant:
        raise ConfigError(f"ranker {name!r} needs the server's URL: {name}:http://HOST:PORT")
    if context.timeout is None:
        raise ConfigError(f"ranker {name}:{context.variant} needs a timeout (seconds one score call may take, "
                          "retries included): `timeout: 120` in its ranker section of a recipe, or --set "
                          "rankers.NAME.timeout=120 with drpo eval and drpo doctor")
    kind = BinaryRemoteRanker if binary else RemoteRanker
    return kind(context.variant, options, context.timeout, binary=binary)
