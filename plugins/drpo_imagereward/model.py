"""ImageReward's network on transformers BLIP modules, built from the upstream checkpoint's state dict.

The upstream model (``image-reward``'s ``ImageReward``) is ``BLIP_Pretrain``'s timm-style ViT (``blip.visual_encoder``)
and BERT "med" text encoder with cross-attention (``blip.text_encoder``), plus a five-layer linear head
(``mlp.layers.{0,2,4,6,7}``, dropouts between, no activations). Its score is::

    image = visual_encoder(pixels)                                        # (B, 1 + patches, width)
    text = text_encoder(ids, mask, encoder_hidden_states=image)[:, 0]     # the first token, after cross-attention
    score = (mlp(text.float()) - MEAN) / STD

``BlipVisionModel`` and ``BlipTextModel`` compute the same thing (transformers' BLIP port of the same code): the
text encoder's keys are identical; the ViT's are renamed as transformers' BLIP conversion script renames them
(:data:`VISION_RENAMES`). The ViT's layer norms use eps 1e-6 (timm's, not transformers' 1e-5 default). The
checkpoint records every size except the ViT's head count, which the ranker's ``vision_head_width`` gives.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from drpo_core.errors import PluginError
from drpo_core.model_rankers import load_exact

#: ImageReward's score normalisation (``ImageReward.mean`` / ``.std``): scores come out roughly standard normal
MEAN = 0.16717362830052426
STD = 1.0333394966054072
#: the text encoder reads prompts padded and cut to 35 tokens ([CLS] ... [SEP])
MAX_LENGTH = 35
#: the shipped bert-base-uncased WordPiece vocabulary (Apache-2.0, google-research/bert)
BERT_VOCAB = Path(__file__).with_name("bert-base-uncased-vocab.txt")
#: upstream ViT names -> BlipVisionModel names, applied in order (from transformers' BLIP conversion script)
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^norm\.", "post_layernorm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)
#: checkpoint entries scoring does not use: BLIP's contrastive projections and BERT's position-id buffer
UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|\.position_ids$")
#: the head's linear layers inside ``mlp.layers`` (an ``nn.Sequential`` with dropouts at 1, 3 and 5)
HEAD_LINEARS = (0, 2, 4, 6, 7)
_MED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")


class RewardHead(nn.Module):
    """ImageReward's ``MLP``: linear layers of the checkpoint's widths with (inactive) dropouts between them,
    keyed ``layers.{0,2,4,6,7}`` as upstream."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.layers = nn.Sequential(linears[0], nn.Dropout(), linears[1], nn.Dropout(), linears[2], nn.Dropout(),
                                    linears[3], linears[4])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(features)
        return out


class ImageRewardModel(nn.Module):
    """The ViT, the cross-attending text encoder and the head; :meth:`reward` is ImageReward's score."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig, head_widths: list[int]) -> None:
        super().__init__()
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = RewardHead(head_widths)
        #: the square input size of the ViT (224 for ImageReward v1.0)
        self.image_size = image_size(vision)

    def reward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) normalised scores: the text features cast to float32 for the head (keep the head in float32)."""
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # every image token is attended to (upstream passes a mask of ones), so no encoder mask is needed
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 is_decoder=False).last_hidden_state[:, 0]
        return ((self.mlp(text.float()) - MEAN) / STD).flatten()


def image_size(config: BlipVisionConfig) -> int:
    size = config.image_size
    if not isinstance(size, int):
        raise PluginError(f"ImageReward's ViT takes square images, got image_size {size}")
    return size


# ------------------------------------------------------------------------------------------ the checkpoint


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The upstream checkpoint's entries under :class:`ImageRewardModel`'s names; unused ones dropped, anything
    else unknown refused (a checkpoint of another model)."""
    converted, unknown = {}, []
    for key, value in state.items():
        if UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in VISION_RENAMES:
                name, found = re.subn(pattern, replacement, name)
                if found:
                    converted[f"vision_model.{name}"] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            converted["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            converted[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise PluginError(f"not an ImageReward checkpoint: unexpected entries {', '.join(unknown[:3])}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    return converted


def _entry(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise PluginError(f"not an ImageReward checkpoint: no {key!r}")
    return state[key]


def vision_config(state: Mapping[str, torch.Tensor], head_width: int) -> BlipVisionConfig:
    """The ViT's sizes, read from the (converted) state dict."""
    positions = _entry(state, "vision_model.embeddings.position_embedding")
    patch = _entry(state, "vision_model.embeddings.patch_embedding.weight")
    width, grid = int(positions.shape[-1]), math.isqrt(int(positions.shape[1]) - 1)
    if grid * grid + 1 != positions.shape[1] or patch.shape[-1] != patch.shape[-2] or patch.shape[1] != 3:
        raise PluginError(f"ImageReward checkpoint: {positions.shape[1]} ViT positions are not a square grid plus "
                          "the class token, or its patches are not square RGB")
    if width % head_width:
        raise PluginError(f"ImageReward checkpoint: ViT width {width} is not a multiple of vision_head_width "
                          f"{head_width}")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(_entry(state, "vision_model.encoder.layers.0.mlp.fc1.weight").shape[0]),
        num_hidden_layers=len(layers), num_attention_heads=width // head_width, image_size=grid * int(patch.shape[-1]),
        patch_size=int(patch.shape[-1]), layer_norm_eps=1e-6, hidden_act="gelu",
        attention_dropout=0.0)


def read_med_config(path: Path) -> dict[str, Any]:
    """``med_config.json``: BLIP's BERT configuration (the sizes of the text encoder)."""
    try:
        med = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PluginError(f"{path} is not a readable med_config.json ({error})") from None
    bad = [k for k in _MED_KEYS if not isinstance(med.get(k), int) or med[k] < 1] if isinstance(med, dict) else ["all"]
    if bad:
        raise PluginError(f"{path}: med_config.json needs positive integers {', '.join(bad)}")
    if not med.get("add_cross_attention", False):
        raise PluginError(f"{path}: med_config.json has no cross-attention (add_cross_attention), ImageReward's "
                          "text encoder needs it")
    return dict(med)


def text_config(med: Mapping[str, Any], encoder_width: int) -> BlipTextConfig:
    """The text encoder's configuration: ``med_config.json``'s sizes; its keys and values attend to the ViT's
    width (``BLIP_Pretrain`` sets ``encoder_width`` to it, whatever the file says). ``is_decoder`` only makes
    transformers build the cross-attention layers: the model is called as a bidirectional encoder."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None, eos_token_id=None, sep_token_id=None, is_decoder=True)


def head_widths(state: Mapping[str, torch.Tensor]) -> list[int]:
    weights = [_entry(state, f"mlp.layers.{i}.weight") for i in HEAD_LINEARS]
    return [int(weights[0].shape[1]), *(int(w.shape[0]) for w in weights)]


def build_model(state: Mapping[str, torch.Tensor], med: Mapping[str, Any], vision_head_width: int) -> ImageRewardModel:
    """:class:`ImageRewardModel` holding the checkpoint's tensors (no copy, no random initialisation first)."""
    converted = convert_state_dict(state)
    vision = vision_config(converted, vision_head_width)
    text = text_config(med, vision.hidden_size)
    with torch.device("meta"):
        model = ImageRewardModel(vision, text, head_widths(converted))
    load_exact(model, converted, "the checkpoint does not fit med_config.json and the ViT it describes")
    # a buffer no checkpoint holds (transformers does not save it), still on the meta device
    model.text_encoder.embeddings.register_buffer("position_ids", torch.arange(text.max_position_embeddings)[None],
                                                  persistent=False)
    return model


# --------------------------------------------------------------------------------------------- the tokenizer


def read_vocab(path: Path) -> dict[str, int]:
    """A WordPiece ``vocab.txt``: one token a line, its id the line number (as BERT's ``load_vocab``)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise PluginError(f"vocabulary {path} cannot be read ({error})") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token: index for index, token in enumerate(lines)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise PluginError(f"vocabulary {path} is not a BERT vocab.txt (no {', '.join(missing)})")
    return vocab


def tokenizer(vocabulary: Path = BERT_VOCAB) -> BertTokenizer:
    """BLIP's ``init_tokenizer`` on a local vocabulary: an uncased BERT WordPiece tokenizer plus ``[DEC]``
    (bos) and ``[ENC]``, in that order, so bert-base-uncased gives 30524 tokens ([ENC] = 30523). Scoring keeps
    [CLS] as the first token, as ``ImageReward.score`` does."""
    from tokenizers import AddedToken

    result = BertTokenizer(vocab=read_vocab(vocabulary))
    result.add_special_tokens({"bos_token": AddedToken("[DEC]", special=True)})
    result.add_tokens([AddedToken("[ENC]", special=True)], special_tokens=True)
    return result
