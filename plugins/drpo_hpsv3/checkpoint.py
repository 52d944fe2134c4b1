"""HPSv3's checkpoint on current transformers: key remap, the reward head, loading without a 7B init.

``HPSv3.safetensors`` is the state dict of upstream's ``Qwen2VLRewardModelBT``, a
``Qwen2VLForConditionalGeneration`` of transformers 4.45.2 with a head added, so its keys follow that
version's module tree. Current transformers nests the tree differently; this module renames:

==============================  =======================================  ==========================
HPSv3.safetensors (4.45)        here (a ``Qwen2VLModel``, transformers 5)   note
==============================  =======================================  ==========================
``visual.*``                    ``visual.*``                             the vision tower and merger
``model.*``                     ``language_model.*``                     the Qwen2 decoder
``lm_head.weight``              not loaded                               a reward never predicts text
``rm_head.{0,3,5}.*``           :class:`RewardHead` ``{0,3,5}``          float32
==============================  =======================================  ==========================

Keys already in the current layout (``model.visual.*``, ``model.language_model.*``) are taken as well.

The token embedding has one row per token of the tokenizer the checkpoint was trained with: Qwen2-VL's
151,657 plus the ``<|Reward|>`` token upstream adds (so 151,658 rows, not the config's padded 152,064);
the text config's ``vocab_size`` is set from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drpo_core.errors import PluginError

if TYPE_CHECKING:
    from transformers import Qwen2VLConfig, Qwen2VLModel

#: upstream's "ranknet" head: Linear(H, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)
HEAD_LINEARS = (0, 3, 5)


class RewardHead(nn.Sequential):
    """HPSv3's reward head on the ``<|Reward|>`` token's hidden state: ``(mu, sigma)`` in float32."""

    def __init__(self, hidden: int, inner: int = 1024, bottleneck: int = 16, outputs: int = 2) -> None:
        super().__init__(nn.Linear(hidden, inner), nn.ReLU(), nn.Dropout(0.05), nn.Linear(inner, bottleneck),
                         nn.ReLU(), nn.Linear(bottleneck, outputs))


def backbone_key(key: str) -> str | None:
    """The ``Qwen2VLModel`` name of a checkpoint key outside the head; None: not loaded (``lm_head``)."""
    for legacy, current in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                            ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(legacy):
            return current + key[len(legacy):]
    if key.startswith("lm_head."):
        return None
    raise PluginError(f"the HPSv3 checkpoint has key {key!r}, which is no part of Qwen2-VL or the reward head")


def read_checkpoint(path: Path, device: torch.device, dtype: torch.dtype
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(backbone weights renamed, in dtype on device; head weights, float32 on device)``, one tensor at a
    time (the 1.1 GB ``lm_head`` is never read)."""
    from safetensors import SafetensorError, safe_open

    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as checkpoint:
            for key in checkpoint.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                if key.startswith("rm_head."):
                    head[key.removeprefix("rm_head.")] = checkpoint.get_tensor(key).to(device, torch.float32)
                elif (name := backbone_key(key)) is not None:
                    backbone[name] = checkpoint.get_tensor(key).to(device, dtype)
    except (SafetensorError, OSError) as error:
        raise PluginError(f"could not read the HPSv3 checkpoint {path}: {error}") from None
    return backbone, head


def load_head(weights: dict[str, torch.Tensor], hidden: int, device: torch.device) -> RewardHead:
    expected = {f"{i}.{kind}" for i in HEAD_LINEARS for kind in ("weight", "bias")}
    if set(weights) != expected:
        raise PluginError(f"the HPSv3 checkpoint's rm_head has {sorted(weights)}, not the ranknet head "
                          f"{sorted(expected)}")
    inner, bottleneck, outputs = (int(weights[f"{i}.weight"].shape[0]) for i in HEAD_LINEARS)
    with torch.device("meta"):
        head = RewardHead(hidden, inner, bottleneck, outputs)
    try:
        head.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise PluginError(f"the HPSv3 checkpoint's rm_head does not fit a {hidden}-wide backbone: "
                          f"{str(error).splitlines()[-1].strip()}") from None
    if outputs != 2:
        raise PluginError(f"the HPSv3 checkpoint's rm_head gives {outputs} values, not (mu, sigma)")
    return head.to(device).eval().requires_grad_(False)


def load_backbone(weights: dict[str, torch.Tensor], config: Qwen2VLConfig, device: torch.device,
                  dtype: torch.dtype) -> Qwen2VLModel:
    """A ``Qwen2VLModel`` holding ``weights`` (renamed), built without allocating or initialising 8 billion
    parameters first: parameters are made on the meta device and take the checkpoint's tensors as they are;
    buffers (the rotary frequencies, which no checkpoint holds) are computed as usual."""
    from accelerate import init_empty_weights
    from transformers import Qwen2VLModel

    from drpo_core.model_rankers import load_exact

    embed = weights.get("language_model.embed_tokens.weight")
    if embed is None:
        raise PluginError("the HPSv3 checkpoint has no token embedding (model.embed_tokens.weight)")
    text_config: Any = config.text_config
    text_config.vocab_size = int(embed.shape[0])
    with init_empty_weights(include_buffers=False):
        model: Any = Qwen2VLModel._from_config(config, attn_implementation="sdpa")
    load_exact(model, weights, "the HPSv3 checkpoint does not fit the Qwen2-VL config (a different base model?)")
    # upstream casts the whole model (rotary frequency buffers included) to its dtype: so do we
    loaded: Qwen2VLModel = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return loaded
