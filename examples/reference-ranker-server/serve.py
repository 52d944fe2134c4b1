"""A ranker server that needs only Python and the reward package: no drpo, no web framework.

It speaks drpo's remote-ranker wire format, version 1 (docs/remote-rankers.md), so a scorer whose pins
clash with drpo's (image-reward wants transformers<=4.55, GenEval an exact mmdet stack) serves rankings
from its own virtual environment::

    python serve.py --scorer image-reward --model ImageReward.pt --option med_config=med_config.json
    drpo train --ranker remote:http://127.0.0.1:8765 --set rankers.0.timeout=120

A scorer is ``score(images, prompts, metadata) -> list of floats (None: could not score)``, where each
image is an :class:`Image` (raw uint8 pixels, with ``to_pil()`` and ``to_numpy()``). ``--scorer`` takes a
built-in name (``stub``: mean pixel value; ``image-reward``) or ``module:function`` returning a scorer
(called with ``--model``, ``--device`` and each ``--option KEY=VALUE``). Requests are scored one at a time, in arrival order.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import importlib
import json
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = 1


class BadRequest(ValueError):
    pass


class Image:
    """One image of a request: ``channels`` x ``height`` x ``width`` uint8 pixels, channel-major."""

    def __init__(self, pixels: bytes, channels: int, height: int, width: int):
        self.pixels, self.channels, self.height, self.width = pixels, channels, height, width

    def to_numpy(self):  # (H, W, C) uint8
        import numpy as np

        return np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.channels, self.height, self.width) \
            .transpose(1, 2, 0)

    def to_pil(self):
        from PIL import Image as PILImage

        array = self.to_numpy()
        return PILImage.fromarray(array[..., 0] if self.channels == 1 else array)


def decode_request(body: bytes):
    def refuse(token):
        raise BadRequest(f"the request is not valid JSON: {token} is not a JSON value")

    try:
        data = json.loads(body, parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"the request is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
        raise BadRequest('the request must be a JSON object with a non-empty string "id"')
    field, prompts = data.get("images"), data.get("prompts")
    if not isinstance(field, dict) or field.get("dtype") != "uint8":
        raise BadRequest('"images" must be an object with "dtype": "uint8", "shape" and "data"')
    shape = field.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int and n > 0 for n in shape)):
        raise BadRequest(f'"images.shape" must be 4 positive integers [N, C, H, W] (got {shape!r})')
    if shape[1] != 3:
        raise BadRequest(f'"images.shape" {shape}: images must be RGB, C = 3 (got C = {shape[1]})')
    try:
        raw = base64.b64decode(field.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise BadRequest('"images.data" is not base64') from None
    if len(raw) != math.prod(shape):
        raise BadRequest(f'"images.data" holds {len(raw)} bytes, shape {shape} needs {math.prod(shape)}')
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings')
    metadata = data.get("metadata", [None] * len(prompts))
    if not isinstance(metadata, list) or not all(m is None or isinstance(m, dict) for m in metadata):
        raise BadRequest('"metadata" must be a list of objects or nulls')
    n, c, h, w = shape
    if not n == len(prompts) == len(metadata):
        raise BadRequest(f"{n} images, {len(prompts)} prompts and {len(metadata)} metadata: one of each per image")
    size = c * h * w
    images = [Image(raw[i * size:(i + 1) * size], c, h, w) for i in range(n)]
    return data["id"], images, prompts, metadata


# -- scorers --------------------------------------------------------------------------------------------


def stub_scorer(model=None, device="cpu"):
    """The mean pixel value in [0, 1]: the conformance tests' scorer."""
    def score(images, prompts, metadata):
        return [sum(image.pixels) / (255 * len(image.pixels)) for image in images]
    return score


def image_reward_scorer(model="ImageReward-v1.0", device="cpu", med_config=None):
    """THUDM's ImageReward (``pip install image-reward``): a name it knows or a local checkpoint file;
    ``--option med_config=PATH`` spares its download of ``med_config.json``."""
    import ImageReward

    reward = ImageReward.load(model, device=device, med_config=med_config)

    def score(images, prompts, metadata):
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            value = float(reward.score(prompt, image.to_pil()))
            out.append(value if math.isfinite(value) else None)
        return out
    return score


SCORERS = {"stub": stub_scorer, "image-reward": image_reward_scorer}


def load_scorer(name, model, device, options=()):
    if name in SCORERS:
        factory = SCORERS[name]
    else:  # a module beside this script, or importable in this environment
        module, _, function = name.partition(":")
        factory = getattr(importlib.import_module(module), function)
    extra = dict(option.split("=", 1) for option in options)
    return factory(**({"model": model} if model else {}), device=device, **extra)


# -- the server -----------------------------------------------------------------------------------------


def make_handler(scorer, metadata, token):
    lock = threading.Lock()  # one batch at a time: the scorer need not be thread-safe

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: one line per request would drown the training log
            pass

        def answer(self, status, payload, extra=()):
            body = json.dumps(payload, allow_nan=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in extra:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def authorised(self):
            if token is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self.answer(401, {"error": "no bearer token" if not given else "wrong bearer token"},
                        [("WWW-Authenticate", "Bearer")])
            return False

        def do_GET(self):
            if self.path == "/v1/health":
                self.answer(200, {"status": "ok"})
            elif self.path == "/v1/metadata":
                if self.authorised():
                    self.answer(200, metadata)
            else:
                self.answer(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/score":
                self.answer(404, {"error": f"no endpoint {self.path}"})
                return
            if not self.authorised():
                return
            try:
                request_id, images, prompts, meta = decode_request(body)
            except BadRequest as error:
                self.answer(400, {"error": str(error)})
                return
            try:
                with lock:
                    scores = [None if s is None else float(s) for s in scorer(images, prompts, meta)]
                if len(scores) != len(images):
                    raise RuntimeError(f"the scorer returned {len(scores)} scores for {len(images)} images")
            except Exception as error:
                self.answer(500, {"error": f"the scorer raised {type(error).__name__}: {error}"})
                return
            scores = [s if s is not None and math.isfinite(s) else None for s in scores]
            self.answer(200, {"id": request_id, "scores": scores})

    return Handler


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorer", default="stub", help="stub, image-reward or module:function")
    parser.add_argument("--model", default=None, help="what the scorer loads (a name or a local path)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword argument of the scorer's factory (repeatable)")
    parser.add_argument("--binary", action="store_true", help="the scores are 0/1 correctness")
    args = parser.parse_args(argv)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            sys.exit(f"--token-env {args.token_env}: the environment variable is not set or empty")
    bad = [option for option in args.option if "=" not in option]
    if bad:
        sys.exit(f"--option expects KEY=VALUE, got {bad[0]!r}")
    scorer = load_scorer(args.scorer, args.model, args.device, args.option)
    metadata = {"api": API, "name": args.scorer, "variant": args.model, "binary": args.binary,
                "server": "reference-ranker-server", "drpo_version": None}
    server = ThreadingHTTPServer((args.host, args.port), make_handler(scorer, metadata, token))
    print(f"serving {args.scorer} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
