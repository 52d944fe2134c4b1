"""Tiny CLIP models, processors and heads for tests: saved with ``save_pretrained`` (and ``torch.save``), so the
rankers load them through the same ``from_pretrained`` path as real weights. No hub access.

The tokenizer is the minimal CLIP BPE vocabulary of :func:`drpo_diffusers.testing.write_clip_vocab` (516
tokens: ``<|startoftext|>`` 514, ``<|endoftext|>`` 515, which also pads).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPConfig

#: the tiny models' input size (images are resized to it: 32 px, patches of 8)
TINY_IMAGE_SIZE = 32
#: the LAION MLP's widths after its input (768 in the real head)
LAION_WIDTHS = (1024, 128, 64, 16, 1)


def tiny_clip_config(projection_dim: int = 16) -> CLIPConfig:
    from transformers import CLIPConfig

    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=514, eos_token_id=515, pad_token_id=515)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_processor(directory: str | Path) -> Path:
    """A ``CLIPProcessor`` (PIL image processor at ``TINY_IMAGE_SIZE``, the tiny tokenizer) in ``directory``."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    from drpo_diffusers.testing import make_tiny_tokenizer

    directory = Path(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    CLIPProcessor(image_processor=images, tokenizer=make_tiny_tokenizer()).save_pretrained(directory)
    return directory


def make_tiny_clip(directory: str | Path, seed: int = 0, processor: bool = True) -> Path:
    """Save a tiny random ``CLIPModel`` (and, with ``processor``, its processor) into ``directory``."""
    import torch
    from transformers import CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(directory)
    if processor:
        save_tiny_processor(directory)
    return directory


def make_tiny_aesthetic_head(path: str | Path, in_features: int = 16, seed: int = 0) -> Path:
    """Save a random MLP in the LAION layout (``layers.{0,2,4,6,7}``, ``torch.save`` of a state dict)."""
    import torch

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    state, previous = {}, in_features
    for index, width in zip((0, 2, 4, 6, 7), LAION_WIDTHS, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(width, previous, generator=generator) / previous**0.5
        state[f"layers.{index}.bias"] = 0.1 * torch.randn(width, generator=generator)
        previous = width
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_tiny_rankers(root: str | Path) -> dict[str, Path]:
    """``{"clip": dir, "head": file, "tokenizer": dir}`` under ``root``, built once (reused when there)."""
    root = Path(root)
    paths = {"clip": root / "tiny-clip", "head": root / "tiny-aesthetic-head.pth", "tokenizer": root / "tiny-tokenizer"}
    if not (paths["clip"] / "config.json").is_file():
        make_tiny_clip(paths["clip"])
    if not paths["head"].is_file():
        make_tiny_aesthetic_head(paths["head"])
    if not (paths["tokenizer"] / "tokenizer_config.json").is_file():
        from drpo_diffusers.testing import make_tiny_tokenizer

        make_tiny_tokenizer().save_pretrained(paths["tokenizer"])
    return paths
