"""open_clip CLIP state dicts (HPSv2's ViT-H-14 checkpoints) as transformers ``CLIPModel`` weights.

The two implement the same network; the conversion renames, splits and transposes:

=======================================================  ====================================================
open_clip                                                transformers ``CLIPModel``
=======================================================  ====================================================
``visual.conv1.weight`` (no bias)                        ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding`` / ``visual.positional_embedding``  ``...embeddings.class_embedding`` / ``position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``                   ``vision_model.pre_layrnorm`` / ``post_layernorm``
``visual.proj`` (width, embed), ``x @ proj``             ``visual_projection.weight`` = ``proj.T``
``token_embedding`` / ``positional_embedding``           ``text_model.embeddings.token_embedding`` / ``position_embedding``
``ln_final``                                             ``text_model.final_layer_norm``
``text_projection`` (width, embed), ``x @ proj``         ``text_projection.weight`` = ``text_projection.T``
``...resblocks.i.ln_1`` / ``ln_2``                       ``...encoder.layers.i.layer_norm1`` / ``layer_norm2``
``...resblocks.i.attn.in_proj_weight`` (3w, w), ``_bias``  ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (in that order)
``...resblocks.i.attn.out_proj``                         ``self_attn.out_proj``
``...resblocks.i.mlp.c_fc`` / ``c_proj``                 ``mlp.fc1`` / ``mlp.fc2``
``logit_scale``                                          ``logit_scale``
=======================================================  ====================================================

Behaviour that is configuration, not weights: the activation (ViT-H-14 uses exact GELU; OpenAI's own
models QuickGELU), the attention heads (the state dict does not record them: ViT-H-14 has head width 80
in the image tower and 16 heads of 64 in the text tower) and text pooling: open_clip takes the output at
the largest token id (``argmax``), which for its vocabulary is the first end-of-text token, so the
converted config ends prompts with the vocabulary's last id (``eos_token_id = vocab_size - 1``) and
transformers pools at its first occurrence. Layer norms use open_clip's eps 1e-5. Anything else in the
checkpoint (layer scale, attention pooling, a different text tower) is refused, never dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from drpo_core.errors import PluginError

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

#: buffers some open_clip versions saved; rebuilt from the config
_IGNORED = re.compile(r"(visual\.)?attn_mask")
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_RENAMED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


@dataclass(frozen=True)
class OpenClipArchitecture:
    """What a state dict does not record; the defaults are ViT-H-14's (HPSv2)."""

    vision_head_width: int = 80
    text_head_width: int = 64
    #: QuickGELU (OpenAI's models, open_clip's ``-quickgelu`` configs) instead of exact GELU
    quick_gelu: bool = False


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without a DDP ``module.`` prefix, with a ``CustomTextCLIP``'s ``text.`` tower named as ``CLIP``'s."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("text.") and not key.startswith("text_projection"):
            key = key.removeprefix("text.")
        out[key] = value
    return out


def _layers(state: Mapping[str, torch.Tensor], tower: str) -> int:
    prefix = "visual.transformer.resblocks." if tower == "visual" else "transformer.resblocks."
    found = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not found or found != set(range(len(found))):
        raise PluginError(f"the open_clip checkpoint's {tower} tower has no resblocks 0..n-1 (found {sorted(found)})")
    return len(found)


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise PluginError(f"the open_clip {tower} tower is {width} wide, not a multiple of head width {head_width}")
    return width // head_width


def clip_config(state: Mapping[str, torch.Tensor], architecture: OpenClipArchitecture) -> CLIPConfig:
    """The ``CLIPConfig`` of an open_clip state dict (``_strip``-ed), sizes read from its shapes."""
    from transformers import CLIPConfig

    required = [*_RENAMED, *_TRANSPOSED]
    missing = [k for k in required if k not in state]
    if missing:
        raise PluginError("not an open_clip CLIP checkpoint of the ViT/transformer kind HPSv2 uses: missing "
                          + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    vision_width = state["visual.class_embedding"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise PluginError("the open_clip image tower's positional embedding is not a square grid plus a class token")
    vocab, text_width = state["token_embedding.weight"].shape
    embed = state["visual.proj"].shape[1]
    act = "quick_gelu" if architecture.quick_gelu else "gelu"
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=text_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_layers(state, "text"),
            num_attention_heads=_heads(text_width, architecture.text_head_width, "text"),
            max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=embed, pad_token_id=0, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_layers(state, "visual"),
            num_attention_heads=_heads(vision_width, architecture.vision_head_width, "image"),
            image_size=grid * patch, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed,
        ),
        projection_dim=embed,
    )


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPModel`` weights from an open_clip CLIP state dict (``_strip``-ed); unknown keys
    are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _RENAMED:
            out[_RENAMED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif block := _BLOCK.fullmatch(key):
            visual, index, part = block.groups()
            prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{index}."
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]
                for name, piece in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = piece.contiguous()
            elif part in _BLOCK_PARTS:
                out[prefix + _BLOCK_PARTS[part]] = value
            else:
                unknown.append(key)
        elif not _IGNORED.fullmatch(key):
            unknown.append(key)
    if unknown:
        raise PluginError("the open_clip checkpoint has parts this conversion does not know (a different "
                          "architecture than ViT-H-14's?): " + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5
                                                                                          else ""))
    return out


def to_transformers(state: Mapping[str, torch.Tensor], architecture: OpenClipArchitecture = OpenClipArchitecture(),
                    dtype: torch.dtype = torch.float32) -> CLIPModel:
    """A ``CLIPModel`` holding an open_clip CLIP state dict's weights, in ``dtype`` on the CPU.

    The model is built on the meta device and takes the converted tensors as they are (no random
    initialisation of a billion parameters first); only the position ids, which no checkpoint holds,
    are made anew.
    """
    from transformers import CLIPModel

    from drpo_core.model_rankers import load_exact

    state = _strip(state)
    config = clip_config(state, architecture)
    weights = {key: value.to(dtype) for key, value in convert_state_dict(state).items()}
    with torch.device("meta"):
        model = CLIPModel(config)
    load_exact(model, weights, "converted open_clip weights do not fit CLIPModel")
    for embeddings in (model.vision_model.embeddings, model.text_model.embeddings):
        positions = embeddings.position_embedding.num_embeddings
        embeddings.position_ids = torch.arange(positions).expand((1, -1))
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise PluginError(f"converted open_clip weights leave {leftover[:4]} unset")
    return model.eval()
