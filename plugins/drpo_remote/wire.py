"""The remote-ranker wire format, version 1 (docs/remote-rankers.md): JSON over HTTP, images as raw uint8.

A score request is ``{"id": str, "images": {"dtype": "uint8", "shape": [N, C, H, W], "data": base64},
"prompts": [N str], "metadata": [N object or null]}``; its answer ``{"id": the same, "scores": [N number or
null]}`` (null: the ranker gave a non-finite score). No pickle: a body is data, never code.

Images are quantised to uint8 (``round(255 x)``): each pixel moves by at most 1/510 from the float image
the loop ranks. This module is the drpo side (torch); the reference server implements the same format with
the standard library alone.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

WIRE_VERSION = 1
#: the wire carries RGB images, channel first
CHANNELS = 3
HEALTH, METADATA, SCORE = "/v1/health", "/v1/metadata", "/v1/score"


class WireError(ValueError):
    """A body that does not follow the wire format (the message says what is wrong)."""


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as the uint8 the wire carries (round to nearest)."""
    # round(255 clamp(x, 0, 1)) = clamp(round(255 x), 0, 255): one new tensor, then in place (half the time)
    return images.detach().cpu().float().mul(255).round_().clamp_(0, 255).to(torch.uint8).contiguous()


def encode_images(images: torch.Tensor) -> dict[str, Any]:
    pixels = quantise(images)
    return {"dtype": "uint8", "shape": list(pixels.shape),
            "data": base64.b64encode(pixels.numpy().tobytes()).decode("ascii")}


def decode_images(field: Any) -> torch.Tensor:
    """The ``images`` object as float images in [0, 1], shape (N, C, H, W)."""
    if not isinstance(field, Mapping) or field.get("dtype") != "uint8":
        raise WireError('"images" must be an object with "dtype": "uint8", "shape" and "data"')
    shape = field.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int and n > 0 for n in shape)):
        raise WireError(f'"images.shape" must be 4 positive integers [N, C, H, W] (got {shape!r})')
    if shape[1] != CHANNELS:
        raise WireError(f'"images.shape" {shape}: images must be RGB, C = {CHANNELS} (got C = {shape[1]})')
    try:
        raw = base64.b64decode(field.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise WireError('"images.data" is not base64') from None
    if len(raw) != math.prod(shape):
        raise WireError(f'"images.data" holds {len(raw)} bytes, shape {shape} needs {math.prod(shape)}')
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(shape).float().div_(255)


def loads(body: bytes, what: str) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` are not JSON, so they are malformed here too."""
    def refuse(token: str) -> Any:
        raise WireError(f"{what} is not valid JSON: {token} is not a JSON value (non-finite scores are null)")

    try:
        return json.loads(body, parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"{what} is not valid JSON ({error})") from None


def score_request(request_id: str, images: torch.Tensor, prompts: Sequence[str],
                  metadata: Sequence[Mapping[str, Any] | None]) -> bytes:
    body = {"id": request_id, "images": encode_images(images), "prompts": list(prompts),
            "metadata": [None if m is None else dict(m) for m in metadata]}
    return json.dumps(body, allow_nan=False).encode()


def parse_score_request(body: bytes) -> tuple[str, torch.Tensor, list[str], list[Any]]:
    data = loads(body, "the request")
    if not isinstance(data, dict):
        raise WireError("the request must be a JSON object")
    request_id, prompts = data.get("id"), data.get("prompts")
    if not isinstance(request_id, str) or not request_id:
        raise WireError('"id" must be a non-empty string')
    images = decode_images(data.get("images"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireError('"prompts" must be a list of strings')
    metadata = data.get("metadata", [None] * len(prompts))
    if not isinstance(metadata, list) or not all(m is None or isinstance(m, dict) for m in metadata):
        raise WireError('"metadata" must be a list of objects or nulls')
    if not len(images) == len(prompts) == len(metadata):
        raise WireError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata: "
                        "one of each per image")
    return request_id, images, prompts, metadata


def score_response(request_id: str, scores: torch.Tensor) -> bytes:
    values = [v if math.isfinite(v) else None for v in scores.detach().double().cpu().flatten().tolist()]
    return json.dumps({"id": request_id, "scores": values}, allow_nan=False).encode()


def parse_score_response(body: bytes, request_id: str, count: int) -> torch.Tensor:
    """The scores of request ``request_id`` (``count`` images) as float32, NaN for null."""
    data = loads(body, "the response")
    if not isinstance(data, dict) or "scores" not in data:
        raise WireError('the response is not a JSON object with "scores"')
    if data.get("id") != request_id:
        raise WireError(f"the response answers request {data.get('id')!r}, not {request_id!r}")
    scores = data["scores"]
    if not isinstance(scores, list) or not all(s is None or type(s) in (int, float) for s in scores):
        raise WireError('"scores" must be a list of numbers or nulls')
    if len(scores) != count:
        raise WireError(f"{len(scores)} scores for {count} images")
    return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32)
