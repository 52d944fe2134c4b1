"""Scoring time per image of the ``imagereward`` ranker, tiny and at ImageReward v1.0's real size.

* ``tiny``: the parity test's model (tests/data/imagereward: a 2-block ViT 48 wide at 32 px, a 2-layer text
  encoder 32 wide), through the hub layout;
* ``full``: ImageReward v1.0's architecture (ViT-L/16 at 224, BERT-base with cross-attention, the 768-wide
  head) with random weights in the real checkpoint's layout (tests/data/imagereward/imagereward_v1_shapes.json),
  built through the same conversion as a downloaded ``ImageReward.pt``. Its parameter count and weight
  memory per dtype are printed too.

Each row scores 512x512 images (what SD-Turbo makes) with one prompt each, end to end (8-bit pictures, PIL
resize, tokenizer, ViT, text encoder, head); the time is the median of ``--repeats`` runs after one warm-up.

    python benchmarks/imagereward_scoring.py                     # tiny and full, batch 1 and 8, on the CPU
    python benchmarks/imagereward_scoring.py --sizes tiny --device cuda --dtype bf16 --batches 1 8 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from drpo_core.context import BuildContext
from drpo_imagereward import model as imagereward
from drpo_imagereward.options import ImageRewardOptions
from drpo_imagereward.ranker import ImageRewardRanker, build

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "imagereward"
PROMPTS = ["a photo of a cat sitting on a red sofa", "two dogs playing in the snow, highly detailed, 4k"]


def tiny_ranker(device: torch.device, dtype: torch.dtype, folder: Path) -> ImageRewardRanker:
    for name in ("ImageReward.pt", "med_config.json"):
        shutil.copy(DATA / name, folder / name)
    options = ImageRewardOptions(model=str(folder), vocabulary=str(DATA / "vocab.txt"), vision_head_width=24,
                                 device=str(device), dtype={torch.float32: "fp32", torch.bfloat16: "bf16",
                                                            torch.float16: "fp16"}[dtype])
    return build("imagereward", options, BuildContext())


def full_ranker(device: torch.device, dtype: torch.dtype) -> ImageRewardRanker:
    layout = json.loads((DATA / "imagereward_v1_shapes.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in layout["shapes"].items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1])[None]
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    model = imagereward.build_model(state, layout["med_config"], vision_head_width=64)
    return ImageRewardRanker("imagereward", model, imagereward.tokenizer(), device=device, dtype=dtype,
                             batch_size=64)


def time_scores(ranker: ImageRewardRanker, batch: int, repeats: int) -> float:
    images = torch.rand(batch, 3, 512, 512)
    prompts = [PROMPTS[i % 2] for i in range(batch)]
    ranker.score(images, prompts, [None] * batch)  # warm-up
    times = []
    for _ in range(repeats):
        if ranker.device.type == "cuda":
            torch.cuda.synchronize(ranker.device)
        start = time.perf_counter()
        ranker.score(images, prompts, [None] * batch)
        if ranker.device.type == "cuda":
            torch.cuda.synchronize(ranker.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                "fp16": torch.float16}[args.dtype]
    print(f"device {device}, dtype {args.dtype}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ranker = tiny_ranker(device, dtype, Path(tmp)) if size == "tiny" else full_ranker(device, dtype)
            built = time.perf_counter() - start
        backbone = sum(p.numel() for n, p in ranker.model.named_parameters() if not n.startswith("mlp."))
        head = sum(p.numel() for p in ranker.model.mlp.parameters())
        print(f"{size}: {backbone / 1e6:.1f} M backbone + {head / 1e6:.2f} M head parameters; weights "
              f"{backbone * 4 / 2**30:.2f} GiB fp32, {backbone * 2 / 2**30:.2f} GiB bf16 (+ head "
              f"{head * 4 / 2**20:.1f} MiB fp32); built in {built:.1f} s")
        for batch in args.batches:
            seconds = time_scores(ranker, batch, args.repeats)
            print(f"  batch {batch:3d}: {seconds:.3f} s, {1000 * seconds / batch:.1f} ms per image")
        del ranker


if __name__ == "__main__":
    main()
