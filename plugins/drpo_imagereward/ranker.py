"""The ``imagereward`` ranker: loading the hub layout (or a local copy) and scoring batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from drpo_clip_rankers.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipFamilyRanker,
    OpenClipImages,
    Preprocessing,
    freeze,
)
from drpo_core import assets
from drpo_core.config import resolve_path
from drpo_core.errors import PluginError
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.model_rankers import pick_device, pick_dtype
from drpo_imagereward import model as imagereward

if TYPE_CHECKING:
    from transformers import BertTokenizer

    from drpo_core.context import BuildContext
    from drpo_imagereward.options import ImageRewardOptions

MED_CONFIG = "med_config.json"


class ImageRewardRanker(ClipFamilyRanker):
    """ImageReward v1.0's normalised score (roughly standard normal, higher is better), float32 on the CPU.

    Images take ImageReward's preprocessing: 8-bit pictures, shortest edge resized to 224 (bicubic, PIL),
    centre crop with torchvision's rounding, OpenAI CLIP mean and std (``OpenClipImages``); the
    differentiable path does the same on tensors. Prompts are tokenised with [CLS] first, padded and cut to 35
    tokens.
    """

    def __init__(self, name: str, model: imagereward.ImageRewardModel, tokenizer: BertTokenizer, *,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        size = model.image_size
        preprocessing = Preprocessing(size, (size, size), OPENAI_MEAN, OPENAI_STD, crop_offset="half-even")
        super().__init__(name, images=OpenClipImages(preprocessing), preprocessing=preprocessing, device=device,
                         dtype=dtype, batch_size=batch_size)
        freeze(model.vision_model, device, dtype)
        freeze(model.text_encoder, device, dtype)
        freeze(model.mlp, device, torch.float32)  # never rounded to the backbone's dtype: it reads float32 features
        self.model = model
        self.tokenizer = tokenizer

    def scores_of_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=imagereward.MAX_LENGTH, return_tensors="pt")
        return self.model.reward(pixel_values, tokens["input_ids"].to(self.device),
                                 tokens["attention_mask"].to(self.device))


def _hub_files(repo: str, *, local_files_only: bool, revision: str | None, checkpoint: str) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    found = [hf_hub_download(repo, name, revision=revision, local_files_only=local_files_only)
             for name in (checkpoint, MED_CONFIG)]
    return Path(found[0]), Path(found[1])


def model_files(name: str, options: ImageRewardOptions, context: BuildContext) -> tuple[Path, Path]:
    """(checkpoint, med_config.json): from a local directory, else from the hub (its cache first)."""
    where = f"ranker {name!r}: model"
    source, is_local = resolve_model(options.model, context.config_dir, where=where)
    if not is_local:
        return from_hub_or_cache(_hub_files, source, False, {"revision": options.revision,
                                                             "checkpoint": options.checkpoint}, owner=f"ranker {name!r}")
    if options.revision is not None:
        raise PluginError(f"ranker {name!r}: revision {options.revision!r} is for hub ids, but model "
                          f"{options.model!r} is a local directory")
    files = Path(source) / options.checkpoint, Path(source) / MED_CONFIG
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise PluginError(f"{where} {options.model!r} has no {' and no '.join(missing)} (ImageReward's hub layout: "
                          f"{options.checkpoint} and {MED_CONFIG})")
    return files


def read_checkpoint(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The upstream state dict: a torch file (``weights_only``) or ``.safetensors``."""
    state: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = assets.load_checkpoint(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PluginError(f"ranker {name!r}: {path} does not hold a state dict of tensors")
    return dict(state)


def build(name: str, options: ImageRewardOptions, context: BuildContext) -> ImageRewardRanker:
    device = pick_device(options.device, context)
    dtype = pick_dtype(options.dtype, device, context)
    checkpoint, med_config = model_files(name, options, context)
    vocabulary = (resolve_path(options.vocabulary, context.config_dir) if options.vocabulary
                  else imagereward.BERT_VOCAB)
    try:
        state = read_checkpoint(checkpoint, name)
        model = imagereward.build_model(state, imagereward.read_med_config(med_config), options.vision_head_width)
        tokenizer = imagereward.tokenizer(vocabulary)
    except PluginError as error:
        raise PluginError(f"ranker {name!r}: {error}") from None
    del state
    embeddings = int(model.text_encoder.config.vocab_size)
    if len(tokenizer) != embeddings:
        raise PluginError(f"ranker {name!r}: the vocabulary {vocabulary} gives {len(tokenizer)} tokens with [DEC] "
                          f"and [ENC], but the text encoder has {embeddings} embeddings (a different vocab.txt?)")
    return ImageRewardRanker(name, model, tokenizer, device=device, dtype=dtype, batch_size=options.batch_size)
