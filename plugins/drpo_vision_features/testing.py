"""Tiny DINOv2 and ViT-MAE checkpoints for tests, built from configs of the real architectures without
hub access and saved with ``save_pretrained`` (plus a ``preprocessor_config.json``), so the feature
spaces load them through the same ``from_pretrained`` path as real weights."""

from __future__ import annotations

import json
from pathlib import Path

#: the side the tiny models take (4 x 4 patches of 8 pixels)
TINY_IMAGE_SIZE = 32
TINY_LAYERS = 4


def _write_preprocessor(directory: Path, size: int) -> None:
    config = {"crop_size": {"height": size, "width": size}, "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225]}
    (directory / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")


def make_tiny_dinov2(directory: str | Path, seed: int = 0) -> Path:
    """A 4-layer DINOv2 of width 32 (``Dinov2Model``) in ``directory``."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    directory = Path(directory)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=TINY_LAYERS, num_attention_heads=4, mlp_ratio=2,
                          image_size=TINY_IMAGE_SIZE, patch_size=8)
    Dinov2Model(config).save_pretrained(directory)
    _write_preprocessor(directory, TINY_IMAGE_SIZE)
    return directory


def make_tiny_vit_mae(directory: str | Path, seed: int = 0, layers: int = TINY_LAYERS) -> Path:
    """A ``layers``-layer ViT-MAE encoder of width 32 (``ViTMAEModel``, mask_ratio 0.75 as vit-mae-base) in
    ``directory`` (12 layers: vit-mae-base's depth, so a recipe's ``layers: [12]`` fits)."""
    import torch
    from transformers import ViTMAEConfig, ViTMAEModel

    directory = Path(directory)
    torch.manual_seed(seed)
    config = ViTMAEConfig(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
                          mask_ratio=0.75)
    ViTMAEModel(config).save_pretrained(directory)
    _write_preprocessor(directory, TINY_IMAGE_SIZE)
    return directory


def build_tiny_models(root: str | Path) -> dict[str, Path]:
    """``{"dinov2": dir, "vit-mae": dir}`` under ``root``, built once (reused when already there)."""
    root = Path(root)
    dirs = {"dinov2": root / "tiny-dinov2", "vit-mae": root / "tiny-vit-mae"}
    for name, builder in (("dinov2", make_tiny_dinov2), ("vit-mae", make_tiny_vit_mae)):
        if not (dirs[name] / "config.json").is_file():
            builder(dirs[name])
    return dirs
