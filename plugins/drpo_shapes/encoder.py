"""A small frozen encoder for the toy world that is count-aware by construction.

The paper's feature spaces are pretrained encoders (latent MAE, DINO) whose activations are
semantic. The toy world's pixel keys are not: they see the shape of an object where one is drawn,
but a wrong *number* of objects only moves global statistics. This encoder is trained once on
renders to say how many objects an image holds, of which colour and shape; its globally pooled
activations then grow with each object it sees, so the drift field can ask for "one more object".

Trained on renders with blur, noise and colour jitter (the generator's samples are blurrier than
renders), then frozen. ``drpo toy encoder`` reproduces ``weights/encoder.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drpo_shapes.world import COLORS, SHAPES, Scene, render_batch

ENCODER_WEIGHTS = Path(__file__).parent / "weights" / "encoder.safetensors"
MAX_COUNT = 5  # one more than the grammar, so "four" and "too many" differ


class CountEncoder(nn.Module):
    """32x32 image -> spatial map (64, 4, 4) -> pooled embedding (64) -> count, colour, shape logits."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 32, 3, padding=1),
            nn.Conv2d(32, 48, 3, stride=2, padding=1),
            nn.Conv2d(48, width, 3, stride=2, padding=1),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        ])
        self.count_head = nn.Linear(width, MAX_COUNT + 1)
        self.color_head = nn.Linear(width, len(COLORS))
        self.shape_head = nn.Linear(width, len(SHAPES))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x

    @staticmethod
    def embed(cells: torch.Tensor) -> torch.Tensor:
        """The pooled embedding the heads read (and the ``enc`` feature key)."""
        return cells.mean(dim=(2, 3))  # over a fixed 4x4 grid: it adds up the objects seen

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding = self.embed(self.spatial(x))
        return embedding, self.count_head(embedding), self.color_head(embedding), self.shape_head(embedding)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (sigma 0-1.2), pixel noise and per-channel jitter: renders that look like samples."""
    batch = images.shape[0]
    sigma = torch.rand(batch, generator=generator) * 1.2
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, 5), separable
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    zero = torch.zeros(())  # the start of sum(): exact, and a tensor for the type checker
    rows = sum((kernels[:, i, None, None, None] * padded[:, :, :, i:i + images.shape[3]] for i in range(5)), zero)
    blurred = sum((kernels[:, i, None, None, None] * rows[:, :, i:i + images.shape[2], :] for i in range(5)), zero)
    noise = torch.randn(images.shape, generator=generator) * torch.rand(batch, 1, 1, 1, generator=generator) * 0.05
    jitter = (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return (blurred + noise + jitter).clamp(0.0, 1.0)


def render_training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` renders of random scenes with 1-5 objects (five placed freely: the world's grid holds four) and their
    (count, colour, shape) labels."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, MAX_COUNT + 1, n)
    colors = rng.integers(0, len(COLORS), n)
    shapes = rng.integers(0, len(SHAPES), n)
    names = list(COLORS)
    scenes = [Scene(int(c), names[k], SHAPES[s]) for c, k, s in zip(counts, colors, shapes, strict=True)]
    images = render_batch(scenes, [seed * n + i for i in range(n)])
    return images, torch.from_numpy(counts), torch.from_numpy(colors), torch.from_numpy(shapes)


def train_encoder(steps: int = 1500, batch_size: int = 128, renders: int = 12000, seed: int = 0,
                  log: Callable[[str], object] = print) -> CountEncoder:
    """Fit the encoder's three heads with cross-entropy (AdamW, lr 2e-3, cosine)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, counts, colors, shapes = render_training_set(renders, seed)
    model = CountEncoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        index = torch.randint(0, renders, (batch_size,), generator=generator)
        _, count_logits, color_logits, shape_logits = model(augment(images[index], generator))
        loss = (F.cross_entropy(count_logits, counts[index]) + F.cross_entropy(color_logits, colors[index])
                + F.cross_entropy(shape_logits, shapes[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def heldout_accuracy(model: CountEncoder, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Accuracy of each head on fresh augmented renders (a seed the training set never used)."""
    images, counts, colors, shapes = render_training_set(n, seed)
    _, count_logits, color_logits, shape_logits = model(augment(images, torch.Generator().manual_seed(seed)))
    return {"count": (count_logits.argmax(1) == counts).float().mean().item(),
            "color": (color_logits.argmax(1) == colors).float().mean().item(),
            "shape": (shape_logits.argmax(1) == shapes).float().mean().item()}


def load_encoder(path: str | Path = ENCODER_WEIGHTS) -> CountEncoder:
    from safetensors.torch import load_file

    model = CountEncoder()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
