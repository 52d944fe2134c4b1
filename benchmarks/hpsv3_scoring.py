"""Scoring time per image of the ``hpsv3`` ranker, and the size of the real HPSv3 model.

    python benchmarks/hpsv3_scoring.py            # tiny golden model + real model size (seconds)
    python benchmarks/hpsv3_scoring.py --slice    # also slices of 1-2 layers at the real width (minutes)

* **tiny**: the golden test model (tests/data/hpsv3: hidden 32, 2 decoder layers, 2 vision blocks) through
  ``Ranker.score`` on 448x448 images (1,024 patches, 256 image tokens, about 1,050 tokens a row with the test
  tokenizer), batch 4; median of 5 calls after a warm-up. It times the whole path (resize, patching,
  tokenising, forward), most of it input preparation at this size.
* **size**: parameters of Qwen2-VL-7B-Instruct's architecture with HPSv3's vocabulary (151,658 tokens), counted
  on the meta device (exact), and their bf16 bytes: what the ranker holds on its device (``lm_head`` is not
  loaded), plus the float32 head.
* **slice** (``--slice``): the same path on a model of the real width (hidden 3584, MLP 18944, 28/4 heads;
  vision 1280 wide, MLP 5120, 16 heads) but 2 decoder layers and 2 vision blocks, random weights, float32 on
  this CPU, batch 1. Three slices (1 layer + 1 block, 2 + 1, 1 + 2) give the time of one decoder layer, of one
  vision block and of the rest, extrapolated linearly to 28 decoder layers and 32 vision blocks: a CPU figure only, to size CPU scoring (a real 7B does not fit this machine's
  time budget), not a GPU prediction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "hpsv3"
#: Qwen2-VL-7B-Instruct's config.json numbers
QWEN2_VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, vocab_size=151658,
                   vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)


def images(n: int, size: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def time_scoring(ranker, batch: int, repeats: int) -> float:
    """Median seconds per image of ``ranker.score`` on a batch of 512x512 images (resized to 448x448)."""
    prompts = ["a watercolor painting of a lighthouse on a cliff at dawn"] * batch
    x = images(batch)
    ranker.score(x, prompts, [None] * batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ranker.score(x, prompts, [None] * batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def tiny_ranker():
    from drpo_core.context import BuildContext
    from drpo_hpsv3.loading import build
    from drpo_hpsv3.options import HPSv3Options

    return build(HPSv3Options(checkpoint=str(DATA / "hpsv3_tiny.safetensors"), base=str(DATA / "base")),
                 BuildContext())


def real_size() -> dict[str, float]:
    from accelerate import init_empty_weights
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from drpo_hpsv3.checkpoint import RewardHead

    with init_empty_weights():
        model = Qwen2VLModel(Qwen2VLConfig(**QWEN2_VL_7B))
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.language_model.parameters())
    head = sum(p.numel() for p in RewardHead(3584).parameters())
    lm_head = 151658 * 3584
    return {"vision_params_M": vision / 1e6, "decoder_params_M": text / 1e6, "head_params_M": head / 1e6,
            "loaded_bf16_GB": (vision + text) * 2 / 1e9 + head * 4 / 1e9,
            "checkpoint_file_GB_estimate": (vision + text + lm_head) * 2 / 1e9 + head * 4 / 1e9}


def slice_ranker(layers: int, blocks: int):
    """A real-width Qwen2-VL with ``layers`` decoder layers and ``blocks`` vision blocks, the test tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from drpo_core.context import BuildContext
    from drpo_hpsv3.checkpoint import RewardHead
    from drpo_hpsv3.loading import reward_tokenizer
    from drpo_hpsv3.options import HPSv3Options
    from drpo_hpsv3.processing import ImagePatching
    from drpo_hpsv3.ranker import HPSv3Ranker

    tokenizer = reward_tokenizer(HPSv3Options(base=str(DATA / "base")), BuildContext())
    ids = tokenizer.convert_tokens_to_ids
    numbers = {**QWEN2_VL_7B, "num_hidden_layers": layers, "vocab_size": len(tokenizer),
               "vision_config": {**QWEN2_VL_7B["vision_config"], "depth": blocks},
               "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
               "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
               "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    torch.manual_seed(0)
    model = Qwen2VLModel._from_config(Qwen2VLConfig(**numbers), attn_implementation="sdpa").eval()
    return HPSv3Ranker(model.requires_grad_(False), RewardHead(3584).eval(), tokenizer, patching=ImagePatching(),
                       device=torch.device("cpu"), dtype=torch.float32, batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", action="store_true", help="also time a 2-layer slice at the real width")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    result: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    tiny = tiny_ranker()
    result["tiny_s_per_image_batch4"] = time_scoring(tiny, 4, 5)
    result["tiny_tokens_per_row"] = int(tiny.inputs([Image.fromarray(np.zeros((448, 448, 3), np.uint8))],
                                                    ["a watercolor painting"])["input_ids"].shape[1])
    result["real_model"] = real_size()
    if args.slice:
        timings = {}
        for layers, blocks in ((1, 1), (2, 1), (1, 2)):
            timings[layers, blocks] = time_scoring(slice_ranker(layers, blocks), 1, 1)
        decoder_layer = timings[2, 1] - timings[1, 1]
        vision_block = timings[1, 2] - timings[1, 1]
        rest = timings[1, 1] - decoder_layer - vision_block
        result["slice_s_per_image"] = {f"{k[0]}_layers_{k[1]}_blocks": v for k, v in timings.items()}
        result["slice_s_per_decoder_layer"] = decoder_layer
        result["slice_s_per_vision_block"] = vision_block
        result["slice_s_rest"] = rest  # noise can make it negative on a shared CPU: then counted as 0
        result["cpu_extrapolated_full_s_per_image"] = max(rest, 0.0) + 28 * decoder_layer + 32 * vision_block
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
