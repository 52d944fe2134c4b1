"""Building the ``hpsv3`` ranker from its options: checkpoint, base config and tokenizer, device, dtype."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from drpo_core import assets
from drpo_core.config import resolve_path
from drpo_core.errors import AssetError, PluginError
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.model_rankers import pick_device, pick_dtype
from drpo_hpsv3.checkpoint import load_backbone, load_head, read_checkpoint
from drpo_hpsv3.options import HPSV3_ASSET
from drpo_hpsv3.processing import REWARD_TOKEN, ImagePatching
from drpo_hpsv3.ranker import HPSv3Ranker, check_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from drpo_core.context import BuildContext
    from drpo_hpsv3.options import HPSv3Options

def backbone_dtype(choice: str, device: torch.device, context: BuildContext) -> torch.dtype:
    """``auto``: bf16 on CUDA whatever the run's precision (HPSv3's training dtype; fp32 would take 32 GB),
    float32 elsewhere."""
    return pick_dtype(choice, device, context, cuda_auto=torch.bfloat16)


def checkpoint_path(options: HPSv3Options, context: BuildContext) -> Path:
    if options.checkpoint is None:
        asset = assets.Asset(name="hpsv3", **HPSV3_ASSET)
        return assets.path(asset, alternative="set the ranker's checkpoint to a local copy of HPSv3.safetensors")
    path = resolve_path(options.checkpoint, context.config_dir)
    if not path.is_file():
        raise AssetError(f"ranker 'hpsv3': checkpoint {options.checkpoint!r} does not exist (default: the asset "
                         "hpsv3, `drpo assets fetch hpsv3`)")
    return path


def from_base(load: Any, options: HPSv3Options, context: BuildContext) -> Any:
    """``load`` (a ``from_pretrained``) on the base model's hub id or local directory."""
    name, is_local = resolve_model(options.base, context.config_dir, where="ranker 'hpsv3': base")
    if is_local and options.base_revision is not None:
        raise PluginError(f"ranker 'hpsv3': base_revision is for hub ids, but base {options.base!r} is a directory")
    kwargs = {} if is_local else {"revision": options.base_revision}
    return from_hub_or_cache(load, name, is_local, kwargs, owner="ranker 'hpsv3'")


def reward_tokenizer(options: HPSv3Options, context: BuildContext) -> PreTrainedTokenizerBase:
    """The base's tokenizer with ``<|Reward|>`` added as upstream adds it (a special token, last id)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = from_base(AutoTokenizer.from_pretrained, options, context)
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def build(options: HPSv3Options, context: BuildContext) -> HPSv3Ranker:
    from transformers import AutoConfig

    device = pick_device(options.device, context)
    dtype = backbone_dtype(options.dtype, device, context)
    path = checkpoint_path(options, context)
    config = from_base(AutoConfig.from_pretrained, options, context)
    if getattr(config, "model_type", None) != "qwen2_vl":
        raise PluginError(f"ranker 'hpsv3': base {options.base!r} is a {getattr(config, 'model_type', '?')!r} "
                          "model, not Qwen2-VL (qwen2_vl)")
    tokenizer = reward_tokenizer(options, context)
    backbone_weights, head_weights = read_checkpoint(path, device, dtype)
    try:
        backbone = load_backbone(backbone_weights, config, device, dtype)
    except PluginError as error:
        raise PluginError(f"ranker 'hpsv3': {path}: {error}") from None
    del backbone_weights
    check_tokenizer(tokenizer, int(config.text_config.vocab_size), options.base)
    head = load_head(head_weights, int(config.text_config.hidden_size), device)
    vision = config.vision_config
    patching = ImagePatching(int(vision.patch_size), int(vision.temporal_patch_size), int(vision.spatial_merge_size),
                             options.min_pixels, options.max_pixels)
    return HPSv3Ranker(backbone, head, tokenizer, patching=patching, device=device, dtype=dtype,
                       batch_size=options.batch_size)
