"""The toy world's one-step generator: a small U-Net from a spatial noise map to a 32x32 image.

The prompt enters through FiLM (per-channel scale and shift in every block) from the sum of a
count, a colour and a shape embedding. The noise is a full spatial map (8x16x16), not a vector:
with a noise vector the network learned to ignore it and drew the same image for every seed.

The network is tiny (~0.4M parameters), so the frozen reference is simply a deep copy of the base
weights rather than a LoRA-disabled view of one network.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from drpo_core.checkpoint import check_state_fits
from drpo_core.errors import ComponentError
from drpo_core.interfaces import Generator
from drpo_shapes.world import COLORS, COUNT_WORDS, SHAPES, check_prompts, parse_prompt

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "base.safetensors"
NOISE_SHAPE = (8, 16, 16)


class FiLMBlock(nn.Module):
    """A residual conv block whose first normalisation is modulated by the prompt embedding."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels, affine=False)
        self.film = nn.Linear(embed_dim, 2 * channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(x) * (1 + scale) + shift))
        return x + self.conv2(F.silu(self.norm2(h)))


class ShapesUNet(nn.Module):
    """noise (8, 16, 16) -> 16x16 -> 8x8 -> 4x4 (sees the whole image) -> back up to 32x32 RGB."""

    def __init__(self, noise_channels: int = NOISE_SHAPE[0], widths: tuple[int, int, int] = (32, 48, 80), embed_dim: int = 64):
        super().__init__()
        c1, c2, c3 = widths
        self.count_embedding = nn.Embedding(len(COUNT_WORDS), embed_dim)
        self.color_embedding = nn.Embedding(len(COLORS), embed_dim)
        self.shape_embedding = nn.Embedding(len(SHAPES), embed_dim)
        self.stem = nn.Conv2d(noise_channels + 2, c1, 3, padding=1)  # + 2 coordinate channels
        self.block16 = FiLMBlock(c1, embed_dim)
        self.down8 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.block8 = FiLMBlock(c2, embed_dim)
        self.down4 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.block4 = FiLMBlock(c3, embed_dim)
        self.up8 = nn.Conv2d(c3 + c2, c2, 3, padding=1)
        self.block8_up = FiLMBlock(c2, embed_dim)
        self.up16 = nn.Conv2d(c2 + c1, c1, 3, padding=1)
        self.block16_up = FiLMBlock(c1, embed_dim)
        self.up32 = nn.Conv2d(c1, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, noise: torch.Tensor, counts: torch.Tensor, colors: torch.Tensor,
                shapes: torch.Tensor) -> torch.Tensor:
        e = self.count_embedding(counts) + self.color_embedding(colors) + self.shape_embedding(shapes)
        batch, _, height, width = noise.shape
        ys = torch.linspace(-1, 1, height, device=noise.device)
        xs = torch.linspace(-1, 1, width, device=noise.device)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(batch, 2, height, width)
        h16 = self.block16(self.stem(torch.cat([noise, grid], dim=1)), e)
        h8 = self.block8(self.down8(F.silu(h16)), e)
        h4 = self.block4(self.down4(F.silu(h8)), e)
        u8 = F.interpolate(h4, scale_factor=2.0, mode="nearest")
        u8 = self.block8_up(self.up8(F.silu(torch.cat([u8, h8], dim=1))), e)
        u16 = F.interpolate(u8, scale_factor=2.0, mode="nearest")
        u16 = self.block16_up(self.up16(F.silu(torch.cat([u16, h16], dim=1))), e)
        u32 = F.interpolate(u16, scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.head(F.silu(self.up32(F.silu(u32)))))


def prompt_indices(prompts: Sequence[str], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(count, colour, shape) index tensors for the network's embeddings."""
    scenes = [parse_prompt(p) for p in prompts]
    return (
        torch.tensor([s.count - 1 for s in scenes], device=device),
        torch.tensor([list(COLORS).index(s.color) for s in scenes], device=device),
        torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device),
    )


class ShapesGenerator(Generator):
    """All weights train; ``reference`` runs a frozen copy of the weights it started from."""

    noise_shape = NOISE_SHAPE

    def __init__(
        self,
        weights: str | Path | None = None,
        init: str = "pretrained",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        with torch.random.fork_rng(devices=[]):  # a seeded random init that leaves the global RNG alone
            torch.manual_seed(seed)
            self.net = ShapesUNet()
        if init == "pretrained":
            path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
            if path.exists() and not path.is_file():
                raise ComponentError(f"shapes generator weights {path} is not a file")
            if path.exists():
                self.load_trainable_state_dict(load_weights(path))
            elif weights is not None:
                raise ComponentError(f"shapes generator weights not found: {path} (set weights: or init: random)")
            else:
                warnings.warn(f"no pretrained shapes weights at {path}; starting from a random init", stacklevel=2)
        elif init != "random":
            raise ComponentError(f"shapes generator init must be 'pretrained' or 'random', got {init!r}")
        self.net.to(device)
        self.base = copy.deepcopy(self.net).requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def module(self) -> nn.Module:
        return self.net

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def sample(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise, *prompt_indices(prompts, noise.device))

    @torch.no_grad()
    def reference(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        return self.base(noise, *prompt_indices(prompts, noise.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(0.0, 1.0)  # the latent is the image

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp(0.0, 1.0).to(self.device)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_state_fits(self.net.state_dict(), state, "shapes generator weights")
        self.net.load_state_dict(dict(state))

    def check_prompts(self, prompts: Sequence[str]) -> None:
        check_prompts(prompts)

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ComponentError(f"{path}: not a safetensors file ({error})") from None
