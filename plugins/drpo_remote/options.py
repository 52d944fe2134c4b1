"""The remote ranker's options and URL check: light (no torch), read when the plugin registers."""

from __future__ import annotations

import urllib.parse

from pydantic import BaseModel, ConfigDict, Field


class RemoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_env: str | None = Field(None, description="environment variable holding the server's bearer token")
    request_timeout: float = Field(30.0, gt=0, description="seconds one HTTP request may take")
    retries: int = Field(4, ge=0, description="retries of a request that failed in a way that may pass")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry; doubles with each one")
    batch_size: int = Field(32, ge=1, description="images per request")


def check_url(url: str) -> str | None:
    """What is wrong with a server URL (the ranker's variant), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected a server URL such as http://127.0.0.1:8765"
    try:
        parts.port  # noqa: B018 (a bad port raises)
    except ValueError as error:
        return str(error)
    return None
