"""A programmatic detector for the toy world: colour thresholding, connected components, and a
shape classifier from the component's bounding box. Not differentiable, by design: it plays the
role of GenEval's black-box detector.

Steps for one image:

1. The background is neutral grey, so a pixel belongs to an object when its *chroma* (the length of
   its RGB vector minus its grey component) is large; its colour is the palette colour whose chroma
   direction is closest (cosine). Blending with the grey background keeps that direction, so
   anti-aliased or blurry edges still get the right colour.
2. Each colour's mask is split into 8-connected components; tiny ones (< ``MIN_AREA`` pixels) are
   noise and are dropped.
3. The shape comes from the bounding box: a circle is about as wide as tall and fills ~0.8 of
   its box; a bar is at least twice as wide as tall, a pillar twice as tall as wide, and both fill
   their box. Anything else (two objects merged into one component, a smear) gets no class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from drpo_geneval.rules import Detection
from drpo_shapes.world import COLORS

if TYPE_CHECKING:
    import torch

CHROMA_MIN = 0.22  # ~40% object coverage of the weakest (green) colour
MIN_AREA = 16  # the smallest object (a 7 px circle) covers about 38 pixels
MAX_AREA = 130  # a 10 px circle covers ~80, a 12x4 bar 48; bigger is merged objects
CIRCLE_ASPECT = 1.35  # a circle's box: width / height within [1/1.35, 1.35]
CIRCLE_FILL = 0.65  # pixelated circles fill 0.80-0.88 of their box
BAR_ASPECT = 1.8  # a bar's box is 2.5-3 times wider than tall (a pillar: taller than wide)
BAR_FILL = 0.75  # a bar fills its box; two merged circles fill ~0.6

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)
_PALETTE_DIRS = _PALETTE - _PALETTE.mean(axis=1, keepdims=True)
_PALETTE_DIRS /= np.linalg.norm(_PALETTE_DIRS, axis=1, keepdims=True)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def colour_labels(images: np.ndarray) -> np.ndarray:
    """Per pixel: index into the palette, or -1 for background. ``images`` is ``(..., H, W, 3)``."""
    chroma = images - images.mean(axis=-1, keepdims=True)
    strength = np.linalg.norm(chroma, axis=-1)
    labels = np.argmax(chroma @ _PALETTE_DIRS.T, axis=-1)
    return np.where(strength >= CHROMA_MIN, labels, -1)


def classify_shape(mask: np.ndarray) -> str | None:
    """``"circle"``, ``"bar"``, ``"pillar"`` or ``None`` for a component's boolean mask (cropped to its box)."""
    height, width = mask.shape
    area = int(mask.sum())
    if area > MAX_AREA:
        return None
    fill = area / (height * width)
    if max(width, height) <= CIRCLE_ASPECT * min(width, height) and fill >= CIRCLE_FILL:
        return "circle"
    if width >= BAR_ASPECT * height and fill >= BAR_FILL:
        return "bar"
    if height >= BAR_ASPECT * width and fill >= BAR_FILL:
        return "pillar"
    return None


def detect_batch(images: np.ndarray) -> list[dict[str, list[Detection]]]:
    """Detections ``{shape: [Detection, ...]}`` (best first) of each ``(H, W, 3)`` image of a ``(B, H, W, 3)``
    array in [0, 1].

    One connected-component pass labels every colour mask of every image at once: a (B, colours, H, W)
    stack whose structure connects pixels within a plane only, so each plane is labelled as on its own.
    """
    masks = colour_labels(images)[:, None] == np.arange(len(_NAMES))[None, :, None, None]
    structure = np.zeros((3, 3, 3, 3), dtype=bool)
    structure[1, 1] = _EIGHT_CONNECTED
    components, _ = ndimage.label(masks, structure=structure)
    chroma = np.linalg.norm(images - images.mean(axis=-1, keepdims=True), axis=-1)
    found: list[dict[str, list[Detection]]] = [{} for _ in range(len(images))]
    for label, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        image_index, colour_index, slice_y, slice_x = box[0].start, box[1].start, box[2], box[3]
        # another component of the same colour may poke into this box: keep only this one
        mask = components[image_index, colour_index, slice_y, slice_x] == label
        if mask.sum() < MIN_AREA:
            continue
        shape = classify_shape(mask)
        if shape is None:
            continue
        # confidence: how saturated the object is, relative to a crisp render of its colour
        reference = np.linalg.norm(_PALETTE[colour_index] - _PALETTE[colour_index].mean())
        score = float(min(1.0, chroma[image_index, slice_y, slice_x][mask].mean() / reference))
        box_xy = (float(slice_x.start), float(slice_y.start), float(slice_x.stop), float(slice_y.stop))
        found[image_index].setdefault(shape, []).append(Detection(score, box_xy, _NAMES[colour_index]))
    return [{shape: sorted(d, key=lambda d: d.score, reverse=True) for shape, d in image.items()} for image in found]


def detect_array(image: np.ndarray) -> dict[str, list[Detection]]:
    """Detections ``{shape: [Detection, ...]}`` (best first) in an ``(H, W, 3)`` array in [0, 1]."""
    return detect_batch(image[None])[0]


def as_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Tensors ``(..., 3, H, W)`` as arrays ``(..., H, W, 3)`` (arrays as they are), clipped to [0, 1]."""
    if not isinstance(images, np.ndarray):
        images = images.detach().float().cpu().movedim(-3, -1).numpy()
    return np.clip(images, 0.0, 1.0)


def detect(images: torch.Tensor | np.ndarray) -> dict[str, list[Detection]] | list[dict[str, list[Detection]]]:
    """``detect_array`` for a tensor ``(3, H, W)`` in [0, 1] (or an ``(H, W, 3)`` array); ``detect_batch``
    for a batch ``(B, 3, H, W)``."""
    array = as_array(images)
    return detect_batch(array) if array.ndim == 4 else detect_array(array)
