"""Scoring time per image of the CLIP-family rankers, tiny and at their real architecture sizes.

* **tiny**: the test models (:mod:`drpo_clip_rankers.testing`, the HPSv2 test checkpoint) built through the
  registry from ``save_pretrained`` folders, exactly as users load real weights;
* **real sizes, random weights**: ``CLIPModel`` built in memory from the published architectures (ViT-H/14 of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for ``pickscore`` and ``hpsv2``, ViT-L/14 of
  ``openai/clip-vit-large-patch14`` for ``clip`` and ``aesthetic`` with the 768-wide LAION MLP) and wrapped in the
  rankers' own classes with their own preprocessing (the processor's for PickScore, CLIP and the aesthetic
  head; open_clip's for HPSv2). Weights do not change the time; nothing is downloaded.

Images are 512 x 512 (what SD-Turbo and SDXL-Turbo generate), one prompt per call as in training (K candidates
share their prompt: its text embedding is computed once and cached, so the figures are the image path:
8-bit conversion, resize and crop, the image tower, the cosine or the head). Time is the median of
``--repeats`` calls after one warm-up call, divided by the batch size.

    python benchmarks/ranker_timing.py                 # tiny + real sizes, batch 1 and 8, float32
    python benchmarks/ranker_timing.py --only tiny
    python benchmarks/ranker_timing.py --device cuda --dtype bf16
    python benchmarks/ranker_timing.py --only real --threads 8 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
HPS_TINY = REPO / "tests" / "data" / "hpsv2" / "open_clip_tiny.safetensors"
PROMPT = "a photo of a red fox in the snow"
#: the published architectures (their config.json), as keyword arguments of CLIPConfig
VIT_H_14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)
VIT_L_14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       patch_size=14, image_size=224),
    projection_dim=768)


def seconds_per_image(ranker: Any, batch: int, repeats: int, device: str) -> float:
    images = torch.rand(batch, 3, 512, 512, generator=torch.Generator().manual_seed(batch))
    prompts = [PROMPT] * batch

    def call() -> float:
        start = time.perf_counter()
        ranker.score(images, prompts, [None] * batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    call()  # warm-up: the prompt's embedding, allocator, kernels
    return statistics.median(call() for _ in range(repeats)) / batch


def tiny_rankers(root: Path, device: str, dtype: str) -> Iterator[tuple[str, str, Any]]:
    import drpo_clip_rankers
    import drpo_image_rankers
    from drpo_clip_rankers.testing import build_tiny_rankers
    from drpo_core.context import BuildContext
    from drpo_core.registry import registry_from

    registry = registry_from([drpo_clip_rankers, drpo_image_rankers])
    paths = build_tiny_rankers(root)
    clip = str(paths["clip"])
    options = {"pickscore": {"model": clip, "processor": clip}, "clip": {"model": clip},
               "aesthetic": {"model": clip, "head": str(paths["head"])},
               "hpsv2": {"checkpoint": str(HPS_TINY), "tokenizer": str(paths["tokenizer"]), "vision_head_width": 20,
                         "text_head_width": 16}}
    for name, extra in options.items():
        built = registry.build("ranker", name, {**extra, "dtype": dtype, "batch_size": 8}, BuildContext(device=device))
        yield name, "tiny (32 px, width 32)", built


def real_size_rankers(device: str, dtype: str) -> Iterator[tuple[str, str, Any]]:
    """Each architecture built once, given to the rankers that use it, then freed (ViT-H/14 is 4 GB in fp32)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from drpo_clip_rankers.aesthetic import AestheticHead, AestheticRanker, ImageTower
    from drpo_clip_rankers.common import (
        DTYPES,
        OPENAI_MEAN,
        OPENAI_STD,
        OpenClipImages,
        Preprocessing,
        ProcessorImages,
    )
    from drpo_clip_rankers.similarity import SimilarityRanker
    from drpo_clip_rankers.testing import LAION_WIDTHS
    from drpo_diffusers.testing import make_tiny_tokenizer

    for architecture in (VIT_H_14, VIT_L_14):  # the tiny tokenizer's special tokens (its ids pool the text)
        architecture["text_config"].update(bos_token_id=514, eos_token_id=515, pad_token_id=515)  # type: ignore[attr-defined]

    torch_dtype = DTYPES.get(dtype, torch.float32)
    where = torch.device(device)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                      image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    tokenizer = make_tiny_tokenizer()  # text is embedded once per prompt: the vocabulary does not change the time
    run = dict(device=where, dtype=torch_dtype, batch_size=8)

    def similarity(name: str, model: CLIPModel, images: Callable[[torch.Tensor], torch.Tensor],
                   preprocessing: Preprocessing) -> SimilarityRanker:
        return SimilarityRanker(name, model, tokenizer, images=images, preprocessing=preprocessing, **run)

    torch.manual_seed(0)
    vit_h = CLIPModel(CLIPConfig(**VIT_H_14))
    label = f"ViT-H/14 ({sum(p.numel() for p in vit_h.parameters()) / 1e6:.0f}M parameters)"
    yield "pickscore", label, similarity("pickscore", vit_h, ProcessorImages(processor),
                                         Preprocessing.of_processor(processor, "pickscore"))
    open_clip = Preprocessing(224, (224, 224), OPENAI_MEAN, OPENAI_STD, crop_offset="half-even")
    yield "hpsv2", label, similarity("hpsv2", vit_h, OpenClipImages(open_clip), open_clip)
    del vit_h
    gc.collect()

    vit_l = CLIPModel(CLIPConfig(**VIT_L_14))
    label = f"ViT-L/14 ({sum(p.numel() for p in vit_l.parameters()) / 1e6:.0f}M parameters)"
    yield "clip", label, similarity("clip", vit_l, ProcessorImages(processor),
                                    Preprocessing.of_processor(processor, "clip"))
    state, previous = {}, 768
    for index, width in zip((0, 2, 4, 6, 7), LAION_WIDTHS, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(width, previous) / previous**0.5
        state[f"layers.{index}.bias"] = torch.zeros(width)
        previous = width
    yield "aesthetic", label + " image tower + MLP", AestheticRanker(
        ImageTower(vit_l), AestheticHead(state, "random"), images=ProcessorImages(processor),
        preprocessing=Preprocessing.of_processor(processor, "aesthetic"), **run)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("tiny", "real"), help="one of the two groups")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared or small machine, more threads than free cores "
                             "make OpenMP spin: 20x slower for the tiny models on 2 busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; {args.dtype}; images 512x512; "
          f"median of {args.repeats} calls after a warm-up")
    print(f"{'ranker':<10} {'model':<44} " + " ".join(f"{f'batch {b} s/img':>14}" for b in batches))
    with tempfile.TemporaryDirectory() as root:
        groups = []
        if args.only in (None, "tiny"):
            groups.append(tiny_rankers(Path(root), args.device, args.dtype))
        if args.only in (None, "real"):
            groups.append(real_size_rankers(args.device, args.dtype))
        for group in groups:
            for name, label, ranker in group:
                figures = [seconds_per_image(ranker, b, args.repeats, args.device) for b in batches]
                print(f"{name:<10} {label:<44} " + " ".join(f"{f:>14.4f}" for f in figures), flush=True)
                del ranker
                gc.collect()


if __name__ == "__main__":
    main()
