"""Tiny Mask2Former and OWLv2 detectors for tests, built from configs with random weights and saved with
``save_pretrained`` (model and image processor), so the ranker loads them through the same
``from_pretrained`` path as real weights. The colour classifier's tiny CLIP is
:func:`drpo_clip_rankers.testing.make_tiny_clip`. No hub access."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drpo_geneval.rules import Detection
from drpo_geneval.vocabulary import OBJECT_NAMES

if TYPE_CHECKING:
    from PIL import Image

    from drpo_core.context import BuildContext
    from drpo_geneval.detectors import Found
    from drpo_geneval.options import GenevalOptions

#: COCO's own spellings of the names GenEval renames: the tiny models' labels use them, as the real ones do
COCO_SPELLING = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
#: the tiny detectors' input size
TINY_DETECTOR_SIZE = 64


def coco_labels() -> dict[int, str]:
    """COCO's 80 thing labels in GenEval's order, spelled as COCO models spell them."""
    return {i: COCO_SPELLING.get(name, name) for i, name in enumerate(OBJECT_NAMES)}


def make_tiny_mask2former(directory: str | Path, seed: int = 0, labels: dict[int, str] | None = None) -> Path:
    """A random Mask2Former (Swin backbone) for COCO instance segmentation and its image processor."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    directory = Path(directory)
    labels = coco_labels() if labels is None else labels
    # keyword arguments the configs take through **kwargs (their signatures do not name them)
    stages: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    backbone = SwinConfig(image_size=TINY_DETECTOR_SIZE, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=2, **stages)
    head: dict[str, Any] = {"use_pretrained_backbone": False, "num_labels": len(labels), "id2label": labels,
                            "label2id": {v: k for k, v in labels.items()}}
    # hidden sizes must be multiples of 32 (GroupNorm(32, .) in the pixel decoder)
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=64,
                               dim_feedforward=64, num_queries=10, **head)
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
    Mask2FormerImageProcessorPil(size={"shortest_edge": TINY_DETECTOR_SIZE, "longest_edge": 4 * TINY_DETECTOR_SIZE},
                                 size_divisor=32).save_pretrained(directory)
    return directory


def make_tiny_owlv2(directory: str | Path, seed: int = 0) -> Path:
    """A random OWLv2 detector and its processor (the tiny CLIP tokenizer, ``TINY_DETECTOR_SIZE`` images)."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    from drpo_diffusers.testing import make_tiny_tokenizer

    directory = Path(directory)
    text = dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=16, bos_token_id=514, eos_token_id=515, pad_token_id=515)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                  image_size=TINY_DETECTOR_SIZE, patch_size=8)
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    tokenizer = make_tiny_tokenizer()
    tokenizer.model_max_length = 16
    images = Owlv2ImageProcessorPil(size={"height": TINY_DETECTOR_SIZE, "width": TINY_DETECTOR_SIZE})
    Owlv2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_tiny_detectors(root: str | Path) -> dict[str, Path]:
    """``{"mask2former": dir, "owlv2": dir, "clip": dir}`` under ``root``, built once (reused when there)."""
    from drpo_clip_rankers.testing import make_tiny_clip

    root = Path(root)
    paths = {"mask2former": root / "tiny-mask2former", "owlv2": root / "tiny-owlv2", "clip": root / "tiny-clip"}
    builders = {"mask2former": make_tiny_mask2former, "owlv2": make_tiny_owlv2, "clip": make_tiny_clip}
    for name, build in builders.items():
        if not (paths[name] / "config.json").is_file():
            build(paths[name])
    return paths


class StubDetector:
    """A detector for end-to-end tests: it sees, of every one of the 80 objects, 1 to 4 confident instances
    side by side, the number set by the picture's mean brightness. The candidates of a prompt then differ in
    correctness (a random tiny detector would call all of them wrong, or all right, and skip every prompt)."""

    def detect(self, pictures: Sequence[Image.Image], min_score: float) -> list[Found]:
        import numpy as np

        out: list[Found] = []
        for picture in pictures:
            count = 1 + int(np.asarray(picture, dtype=np.float64).mean() * 1000) % 4
            step = picture.width / count
            boxes = [(i * step, 0.0, (i + 1) * step, float(picture.height)) for i in range(count)]
            out.append({name: [Detection(0.95, box) for box in boxes] for name in OBJECT_NAMES})
        return out


def stub_detector(options: GenevalOptions, context: BuildContext) -> StubDetector:
    """``detector: drpo_geneval.testing:stub_detector``."""
    return StubDetector()
