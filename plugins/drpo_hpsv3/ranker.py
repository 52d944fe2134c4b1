"""The ``hpsv3`` ranker: HPSv3's mean reward ``mu`` of (image, prompt), on transformers' Qwen2-VL.

Forward pass, as upstream's ``Qwen2VLRewardModelBT.forward``: the vision tower's merged patch embeddings
replace the ``<|image_pad|>`` embeddings; the Qwen2 decoder runs with **1-D positions** ``0..L-1`` on all
three M-RoPE axes (upstream called the 4.45 decoder with ``position_ids=None``, which gives exactly that; the
3-D M-RoPE positions current transformers computes by default give other hidden states); the reward head, in
float32, reads the final hidden state at the ``<|Reward|>`` token and returns ``(mu, sigma)``; the score is
``mu``. Batches are padded on the right, so every row keeps positions ``0..n-1`` and scores the same batched
as alone. ``mm_token_type_ids`` (1 at image tokens), which current transformers requires with images, is
passed along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from drpo_core.errors import ComponentError, PluginError
from drpo_core.model_rankers import ModelRanker, to_pictures
from drpo_hpsv3.processing import IMAGE_TOKEN, REWARD_TOKEN, ImagePatching, prompt_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2VLModel

    from drpo_hpsv3.checkpoint import RewardHead


class HPSv3Ranker(ModelRanker):
    """HPSv3 ``mu`` per image (float32, on the CPU); the paper's tables print it unscaled."""

    #: ``score_differentiable`` back-propagates to the images (DRaFT-style baselines; DrPO never does)
    differentiable: ClassVar[bool] = True

    def __init__(self, backbone: Qwen2VLModel, head: RewardHead, tokenizer: PreTrainedTokenizerBase, *,
                 patching: ImagePatching, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.name = "hpsv3"
        self.backbone, self.head, self.tokenizer = backbone, head, tokenizer
        self.patching, self.device, self.dtype, self.batch_size = patching, device, dtype, batch_size
        reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if not isinstance(reward_token_id, int):
            raise PluginError(f"ranker 'hpsv3': the tokenizer has no single {REWARD_TOKEN} token")
        self.reward_token_id = reward_token_id
        self.image_token_id = int(backbone.config.image_token_id)

    # -- the Ranker API

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``mu`` of each image (the first of the head's ``(mu, sigma)``)."""
        return self.rewards(to_pictures(images), prompts)[:, 0]

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(B,)`` float32 ``mu`` through tensor resizing (:meth:`ImagePatching.tensor_pixel_values`: no 8-bit
        rounding, antialiased bicubic as upstream's differentiable path), differentiable with respect to
        ``images`` when grad is enabled; on the ranker's device."""
        self.check_inputs(images, prompts)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            pixel_values, grid = self.patching.tensor_pixel_values(chunk)
            batch = self.batch(pixel_values, grid, prompts[start:start + self.batch_size])
            out.append(self.forward(batch)[:, 0])
        return torch.cat(out)

    # -- the model

    def inputs(self, pictures: Sequence[Any], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model inputs of (picture, prompt) pairs, on the ranker's device."""
        return self.batch(*self.patching.pixel_values(pictures), prompts)

    def batch(self, pixel_values: torch.Tensor, grid: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model inputs of patch rows (``image_grid_thw`` ``grid``) and their prompts."""
        merged = grid.prod(dim=1) // self.patching.merge_size ** 2
        texts = [prompt_text(p, int(n)) for p, n in zip(prompts, merged, strict=True)]
        tokens = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        input_ids = tokens["input_ids"]
        return {"input_ids": input_ids.to(self.device), "attention_mask": tokens["attention_mask"].to(self.device),
                "pixel_values": pixel_values.to(self.device, self.dtype), "image_grid_thw": grid.to(self.device),
                "mm_token_type_ids": (input_ids == self.image_token_id).int().to(self.device)}

    def rewards(self, pictures: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 2)`` float32 ``(mu, sigma)`` of 8-bit pictures, as upstream's ``HPSv3RewardInferencer.reward``
        scores image files."""
        return self.forward(self.inputs(pictures, prompts))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 2)`` float32 ``(mu, sigma)`` of model inputs."""
        input_ids = batch["input_ids"]
        size, length = input_ids.shape
        positions = torch.arange(length, device=self.device).view(1, 1, length).expand(3, size, length)
        with self.own_precision():
            hidden = self.backbone(**batch, position_ids=positions, use_cache=False).last_hidden_state
        at = self.reward_positions(input_ids)
        pooled = hidden[torch.arange(size, device=hidden.device), at].float()
        with self.own_precision():
            out: torch.Tensor = self.head(pooled)
        return out

    def reward_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row's ``<|Reward|>`` token is: the last one (a prompt may spell the token itself;
        upstream would fail on it), whatever the padding."""
        is_reward = input_ids == self.reward_token_id
        if not bool(is_reward.any(dim=1).all()):
            raise ComponentError("ranker 'hpsv3': a row lost its <|Reward|> token (prompt truncated?)")
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        return torch.where(is_reward, columns, -1).amax(dim=1)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, embedding_rows: int, source: str) -> None:
    """The tokenizer must be the one the checkpoint was trained with: upstream added ``<|Reward|>`` as the
    last token and then sized the embedding to the tokenizer, so its id is the last row."""
    reward = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if reward != embedding_rows - 1 or image is None or image == tokenizer.unk_token_id:
        raise PluginError(f"ranker 'hpsv3': the tokenizer of {source!r} does not match the checkpoint (<|Reward|> "
                          f"is token {reward}, the checkpoint's embedding has {embedding_rows} rows: expected "
                          f"{embedding_rows - 1}); use the Qwen2-VL base HPSv3 was trained from")
