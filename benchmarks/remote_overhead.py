"""Per-image overhead of a remote ranker (``drpo serve-ranker``) against the same ranker in process.

Serves PickScore's architecture with random weights (``--size tiny``: the test model; ``real``: CLIP
ViT-H/14 widths as PickScore_v1, 224 px, or ``vit-l`` for CLIP ViT-L/14) with ``drpo serve-ranker`` on
127.0.0.1, sends batches of generator-sized images (default 512 x 512) and splits each image's time into:

* encode: float images -> uint8 -> base64 JSON (client);
* decode: JSON -> float images (server, from its ``Server-Timing`` header);
* score: the ranker on the server (``Server-Timing``), to compare with ``in process``;
* transfer: the rest of the round trip (HTTP over loopback, the server's queue, the response);

and prints the medians over ``--repeats`` batches, per image, in milliseconds; ``wire`` is encode + transfer
+ decode, what the remote path adds to the score itself::

    python benchmarks/remote_overhead.py --size tiny --images 32 --resolution 512
    python benchmarks/remote_overhead.py --size vit-l --images 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import torch

from drpo_clip_rankers.testing import make_tiny_clip
from drpo_core.context import BuildContext
from drpo_core.registry import get_registry
from drpo_remote.wire import SCORE, parse_score_response, score_request

SIZES = {  # CLIPConfig widths of the real models: (vision width, layers, heads, patch; text width, layers, heads)
    "vit-l": dict(vision=(1024, 24, 16, 14), text=(768, 12, 12), projection=768),
    "real": dict(vision=(1280, 32, 16, 14), text=(1024, 24, 16), projection=1024),  # ViT-H/14: PickScore_v1
}


def make_model(size: str, folder: Path) -> Path:
    if size == "tiny":
        return make_tiny_clip(folder / "tiny")
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from drpo_diffusers.testing import make_tiny_tokenizer

    (vw, vl, vh, patch), (tw, tl, th), projection = SIZES[size]["vision"], SIZES[size]["text"], SIZES[size]["projection"]
    config = CLIPConfig(
        text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=514, eos_token_id=515,
                         pad_token_id=515),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                           image_size=224, patch_size=patch),
        projection_dim=projection)
    directory = folder / size
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)  # random weights: the time depends on the shapes alone
    images = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=make_tiny_tokenizer()).save_pretrained(directory)
    return directory


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited: {process.communicate()}")
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not come up")


def remote_batch(url: str, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    request_id = uuid.uuid4().hex
    body = score_request(request_id, images, prompts, [None] * len(prompts))
    encoded = time.perf_counter()
    request = urllib.request.Request(url + SCORE, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as answer:
        payload, timing = answer.read(), answer.headers["Server-Timing"]
    received = time.perf_counter()
    parse_score_response(payload, request_id, len(prompts))
    done = time.perf_counter()
    server = {part.split(";")[0].strip(): float(part.split("dur=")[1]) / 1e3 for part in timing.split(",")}
    round_trip = received - encoded
    return {"encode": encoded - started, "decode": server["decode"], "score": server["score"],
            "transfer": round_trip - server["decode"] - server["score"] + (done - received),
            "total": done - started, "bytes": len(body)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "vit-l", "real"], default="tiny")
    parser.add_argument("--images", type=int, default=32, help="images per request (one batch)")
    parser.add_argument("--resolution", type=int, default=512, help="the generator's image size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="drpo-remote-bench-"))
    try:
        model = make_model(args.size, folder)
        options = {"model": str(model), "processor": str(model), "batch_size": args.images}
        ranker = get_registry().build("ranker", "pickscore", options, BuildContext())
        url = f"http://127.0.0.1:{args.port}"
        drpo = shutil.which("drpo", path=str(Path(sys.executable).parent)) or "drpo"
        command = [drpo, "serve-ranker", "pickscore", "--port", str(args.port),
                   "--device", "cpu", "--max-batch", str(args.images),
                   *[f"--set={key}={value}" for key, value in options.items()]]
        server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        try:
            wait_healthy(url, server)
            generator = torch.Generator().manual_seed(0)
            prompts = [f"a photo of {i} cats" for i in range(args.images)]
            local, remote = [], []
            for repeat in range(args.repeats + 1):  # the first of each warms up
                images = torch.rand(args.images, 3, args.resolution, args.resolution, generator=generator)
                start = time.perf_counter()
                ranker.score(images, prompts, [None] * args.images)
                if repeat:
                    local.append(time.perf_counter() - start)
                measured = remote_batch(url, images, prompts)
                if repeat:
                    remote.append(measured)
        finally:
            server.terminate()
            server.wait(30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = args.images

    def per_image_ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values) / n

    figures = {key: per_image_ms([m[key] for m in remote]) for key in ("encode", "transfer", "decode", "score", "total")}
    figures["in_process"] = per_image_ms(local)
    # what the wire adds to scoring: serial work on the client and server CPUs, whatever the ranker
    figures["wire"] = figures["encode"] + figures["transfer"] + figures["decode"]
    print(f"{args.size} PickScore architecture, {n} images of {args.resolution}x{args.resolution} per request "
          f"({remote[0]['bytes'] / n / 1e6:.2f} MB of JSON per image), median of {args.repeats}, ms per image:")
    for key, value in figures.items():
        print(f"  {key:<11}{value:9.2f}")
    print(json.dumps({"size": args.size, "images": n, "resolution": args.resolution, **figures}))


if __name__ == "__main__":
    main()
