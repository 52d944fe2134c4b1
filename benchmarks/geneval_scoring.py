"""Scoring time per image of the ``geneval`` ranker: detection, thresholds, colour classification, rules.

Two model sizes, random weights (timing only: the scores mean nothing):

* ``tiny``: the test models of ``drpo_geneval.testing`` (Swin 8-wide Mask2Former, 2-layer CLIP), loaded with
  ``from_pretrained`` exactly as the ranker loads real weights;
* ``real``: the architectures of the defaults, built from configs in memory: Mask2Former Swin-S COCO
  (``facebook/mask2former-swin-small-coco-instance``: Swin-S backbone, 100 queries, 384 px input) and CLIP
  ViT-L/14 (``openai/clip-vit-large-patch14``, 224 px crops).

Images are 512x512 (SD-Turbo's), scored in batches of ``--batch``. Two prompt kinds: counting (detection only)
and colour attribution (two objects' crops through CLIP). With random weights no instance reaches GenEval's
thresholds, so each is timed twice: at GenEval's thresholds (0.3 / 0.9: the model and its pre-processing,
nothing kept: a lower bound) and at threshold 0 (all 100 instances of an image upsampled to 512 px, scored
and boxed, and the colour clauses' crops classified: an upper bound; a trained model keeps a few instances
above 0.3). Time is the median of ``--repeats`` after one warm-up, per image, in wall-clock and process CPU time.

    python benchmarks/geneval_scoring.py                 # tiny and real, on the CPU
    python benchmarks/geneval_scoring.py --sizes tiny --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "cup", "count": 1, "color": "blue"}],
              "prompt": "a photo of a red car and a blue cup"}


def tiny_ranker(device: str, threshold: float) -> Any:
    from drpo_core.context import BuildContext
    from drpo_geneval.options import GenevalOptions
    from drpo_geneval.ranker import build_ranker
    from drpo_geneval.testing import build_tiny_detectors

    paths = build_tiny_detectors(tempfile.mkdtemp(prefix="geneval-bench-"))
    options = GenevalOptions(detector_model=str(paths["mask2former"]), clip_model=str(paths["clip"]),
                             threshold=min(threshold, 0.3), counting_threshold=threshold, device=device)
    return build_ranker(options, BuildContext(device=device))


def real_ranker(device: str, threshold: float) -> Any:
    """Mask2Former Swin-S and CLIP ViT-L/14 with random weights, built in memory."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        SwinConfig,
    )
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from drpo_diffusers.testing import make_tiny_tokenizer
    from drpo_geneval.colors import ColorClassifier
    from drpo_geneval.detectors import Mask2FormerDetector
    from drpo_geneval.options import GenevalOptions
    from drpo_geneval.ranker import GenevalRanker
    from drpo_geneval.testing import coco_labels
    from drpo_geneval.vocabulary import map_labels

    dev = torch.device(device)
    stages: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    swin_s = SwinConfig(image_size=384, embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=12,
                        drop_path_rate=0.0, **stages)
    head: dict[str, Any] = {"num_labels": 80, "id2label": coco_labels()}
    detector_model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=swin_s, **head)).eval().to(dev)
    processor = Mask2FormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 1536}, size_divisor=32)
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                max_position_embeddings=77, bos_token_id=514, eos_token_id=515, pad_token_id=515)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  image_size=224, patch_size=14)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval().to(dev)
    images = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    options = GenevalOptions(threshold=min(threshold, 0.3), counting_threshold=threshold, device=device)
    detector = Mask2FormerDetector(detector_model, processor, map_labels(coco_labels()), dev, torch.float32,
                                   options.batch_size)
    colors = ColorClassifier(clip, images, make_tiny_tokenizer(), dev, torch.float32, 4 * options.batch_size)
    return GenevalRanker(detector, lambda: colors, options)


def seconds_per_image(ranker: Any, meta: dict[str, Any], batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds per image (CPU time reads a shared machine more steadily)."""
    images = torch.rand(batch, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    prompts, metadata = [meta["prompt"]] * batch, [meta] * batch
    ranker.score(images, prompts, metadata)  # warm-up (and the colour classifier's text weights)
    walls, cpus = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        ranker.score(images, prompts, metadata)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls) / batch, statistics.median(cpus) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device {args.device}, {torch.get_num_threads()} threads, batch {args.batch}, 512x512 images; "
          "per image: median wall ms, process CPU ms")
    for size in args.sizes:
        ranker = (tiny_ranker if size == "tiny" else real_ranker)(args.device, 0.9)
        geneval_options = ranker.options
        for threshold, label in ((0.9, "GenEval thresholds"), (0.0, "threshold 0")):
            ranker.options = geneval_options.model_copy(update={"threshold": min(threshold, 0.3),
                                                                "counting_threshold": threshold})
            for name, meta in (("counting", COUNTING), ("color_attr", COLOR_ATTR)):
                wall, cpu = seconds_per_image(ranker, meta, args.batch, args.repeats, args.device)
                print(f"{size:5s} {label:18s} {name:11s} {wall * 1000:9.1f} {cpu * 1000:9.1f}", flush=True)


if __name__ == "__main__":
    main()
