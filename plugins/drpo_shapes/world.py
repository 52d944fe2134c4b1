"""The toy world: flat-coloured shapes on a plain background, and the prompts that describe them.

A prompt names a count, a colour and a shape ("three blue circles"). ``render`` draws a random
layout that matches it (each object in its own cell of a 2x2 grid), seeded, as a float tensor
``(3, 32, 32)`` in [0, 1]. The metadata of a prompt follows GenEval's counting rows: the requested
objects are an ``include`` clause (with the colour as an attribute) and one more object of the same
class is an ``exclude`` clause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from drpo_core.errors import DrpoError

if TYPE_CHECKING:
    import torch

SIZE = 32
#: the background is a neutral grey, so every object pixel is recognisable by its chroma alone
BACKGROUND = (0.12, 0.12, 0.12)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
#: Shapes that differ in coarse layout (round, wide, tall), which a small generator learns in minutes.
#: Squares and triangles were tried first: after 900 pretraining steps the generator drew the same
#: round blobs for every shape, so those prompts could never be right and DrPO had nothing to rank.
SHAPES = ("circle", "bar", "pillar")
COUNT_WORDS = ("one", "two", "three", "four")
#: (width, height) ranges in pixels: a circle 7-10 px across, a bar 10-12 x 4, a pillar its transpose
SIZES = {"circle": ((7, 10), None), "bar": ((10, 12), (4, 4)), "pillar": ((4, 4), (10, 12))}
GAP = 2  # free pixels kept between objects, so they never touch
CELLS_PER_SIDE, CELL = 2, SIZE // 2  # objects sit in the cells of a 2x2 grid, one per cell
SUPERSAMPLE = 4  # draw at 4x and average: anti-aliased edges, like a generator's


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: ``count`` objects of one colour and shape."""

    count: int
    color: str
    shape: str

    @property
    def prompt(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{COUNT_WORDS[self.count - 1]} {self.color} {self.shape}{plural}"


def all_scenes() -> list[Scene]:
    return [Scene(n, c, s) for n in range(1, len(COUNT_WORDS) + 1) for c in COLORS for s in SHAPES]


def all_prompts() -> list[str]:
    """Every prompt of the grammar (4 counts x 4 colours x 3 shapes = 48), in a fixed order."""
    return [scene.prompt for scene in all_scenes()]


class PromptError(DrpoError, ValueError):
    """A prompt outside the world's grammar: a bad input, one line."""


GRAMMAR = f"'<{'|'.join(COUNT_WORDS)}> <{'|'.join(COLORS)}> <{'|'.join(SHAPES)}>[s]', e.g. 'three blue circles'"


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; :class:`PromptError` (a ``ValueError``) naming the grammar when it is not one."""
    words = prompt.strip().lower().split()
    if len(words) == 3 and words[0] in COUNT_WORDS and words[1] in COLORS:
        count = COUNT_WORDS.index(words[0]) + 1
        shape = words[2][:-1] if count > 1 and words[2].endswith("s") else words[2]
        if shape in SHAPES and (count > 1) == words[2].endswith("s"):
            return Scene(count, words[1], shape)
    raise PromptError(f"{shorten(prompt)!r} is not a shapes prompt: expected {GRAMMAR}")


def check_prompts(prompts: Sequence[str]) -> None:
    """Every prompt parses; else one :class:`PromptError` naming the first that does not, and how many."""
    bad = []
    for prompt in prompts:
        try:
            parse_prompt(prompt)
        except PromptError:
            bad.append(prompt)
    if bad:
        others = f" (and {len(bad) - 1} more of {len(prompts)} prompts)" if len(bad) > 1 else ""
        raise PromptError(f"{shorten(bad[0])!r} is not a shapes prompt{others}: expected {GRAMMAR}")


def shorten(text: str, width: int = 80) -> str:
    """``text`` cut to ``width`` characters for a message, marking the cut."""
    return text if len(text) <= width else f"{text[:width - 13]}... ({len(text)} chars)"


def prompt_metadata(prompt: str) -> dict[str, Any]:
    """GenEval-style metadata: exactly ``count`` objects of the colour, and not ``count + 1``."""
    scene = parse_prompt(prompt)
    return {
        "tag": "counting",
        "prompt": scene.prompt,
        "include": [{"class": scene.shape, "count": scene.count, "color": scene.color}],
        "exclude": [{"class": scene.shape, "count": scene.count + 1}],
    }


Box = tuple[int, int, int, int]  # x0, y0, width, height in pixels


def layout(scene: Scene, seed: int) -> list[Box]:
    """Boxes for the scene's objects: each in its own cell of a 2x2 grid, at a random place inside it.

    Objects keep one pixel from their cell's border, so neighbours are ``GAP`` apart. Bigger objects
    placed freely (rejection sampling) were tried first: four bars or pillars fitted in so few layouts
    that the base generator never drew several four-object prompts (0/64), and smaller objects placed
    freely still left three at 0/64 (docs/toy-world.md).
    """
    rng = np.random.default_rng([seed, scene.count, list(COLORS).index(scene.color), SHAPES.index(scene.shape)])
    if scene.count > CELLS_PER_SIDE**2:  # more objects than cells (the encoder's "too many" renders)
        return _free_layout(scene, rng)
    boxes = []
    for cell in rng.permutation(CELLS_PER_SIDE**2)[: scene.count]:
        row, col = divmod(int(cell), CELLS_PER_SIDE)
        boxes.append(_place(*_size(scene.shape, rng), col * CELL, row * CELL, CELL, rng))
    return boxes


def _size(shape: str, rng: np.random.Generator) -> tuple[int, int]:
    widths, heights = SIZES[shape]
    width = int(rng.integers(widths[0], widths[1] + 1))
    return width, width if heights is None else int(rng.integers(heights[0], heights[1] + 1))


def _place(width: int, height: int, x: int, y: int, extent: int, rng: np.random.Generator) -> Box:
    """A box of this size anywhere inside the square at (x, y), one pixel from its border."""
    return (x + int(rng.integers(1, extent - width)), y + int(rng.integers(1, extent - height)), width, height)


def _free_layout(scene: Scene, rng: np.random.Generator) -> list[Box]:
    """Non-overlapping boxes anywhere in the image, by rejection sampling."""
    while True:
        boxes: list[Box] = []
        for _ in range(200):
            box = _place(*_size(scene.shape, rng), 0, 0, SIZE, rng)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == scene.count:
                    return boxes


def _apart(a: Box, b: Box) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return ax + aw + GAP <= bx or bx + bw + GAP <= ax or ay + ah + GAP <= by or by + bh + GAP <= ay


def _shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """A boolean ``(height*S, width*S)`` mask of the shape, sampled at pixel-fraction centres."""
    if shape in ("bar", "pillar"):
        return np.ones((height * SUPERSAMPLE, width * SUPERSAMPLE), dtype=bool)
    if shape == "circle":
        n = width * SUPERSAMPLE
        u = (np.arange(n) + 0.5) / n  # coordinates in [0, 1] inside the object's box
        y, x = np.meshgrid(u, u, indexing="ij")
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_array(scene: Scene, seed: int) -> np.ndarray:
    """The scene as a float32 array ``(32, 32, 3)`` in [0, 1]."""
    big = SIZE * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for x0, y0, width, height in layout(scene, seed):
        mask = _shape_mask(scene.shape, width, height)
        region = canvas[y0 * SUPERSAMPLE :, x0 * SUPERSAMPLE :][: mask.shape[0], : mask.shape[1]]
        region[mask] = COLORS[scene.color]
    return canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))


def render(prompt_or_scene: str | Scene, seed: int) -> torch.Tensor:
    """A random image matching the prompt: float tensor ``(3, 32, 32)`` in [0, 1]."""
    import torch

    scene = parse_prompt(prompt_or_scene) if isinstance(prompt_or_scene, str) else prompt_or_scene
    return torch.from_numpy(render_array(scene, seed)).permute(2, 0, 1).contiguous()


def render_batch(prompts: Sequence[str | Scene], seeds: Sequence[int]) -> torch.Tensor:
    """``render`` for each (prompt, seed) pair: ``(B, 3, 32, 32)``."""
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"render_batch got {len(prompts)} prompts but {len(seeds)} seeds")
    return torch.stack([render(p, s) for p, s in zip(prompts, seeds, strict=True)])
