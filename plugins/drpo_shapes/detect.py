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
3. The shape comes from the bounding box: fill ratio (area / box area) is ~1 for a square, ~0.79
   for a circle and ~0.5 for a triangle, whose mass also sits low in its box (apex up). Elongated
   or oversized components are two objects merged and get no class.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from drpo_core.rules import Detection
from drpo_shapes.world import COLORS

CHROMA_MIN = 0.22  # ~40% object coverage of the weakest (green) colour
MIN_AREA = 16  # the smallest object (a 9 px triangle) covers ~40 pixels
MAX_AREA = 200  # a 12 px square covers 144; anything much bigger is merged objects
MAX_ASPECT = 1.45
SQUARE_FILL = 0.93  # square 1.0; a pixelated 9-12 px circle 0.80-0.88
CIRCLE_FILL = 0.70  # a blurred triangle reaches 0.75, but its mass sits low
TRIANGLE_LOW_MASS = 0.05  # triangles: centroid 0.07-0.16 box heights below the centre; circles ~0

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)
_PALETTE_DIRS = _PALETTE - _PALETTE.mean(axis=1, keepdims=True)
_PALETTE_DIRS /= np.linalg.norm(_PALETTE_DIRS, axis=1, keepdims=True)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel: index into the palette, or -1 for background. ``image`` is ``(H, W, 3)``."""
    chroma = image - image.mean(axis=2, keepdims=True)
    strength = np.linalg.norm(chroma, axis=2)
    labels = np.argmax(chroma @ _PALETTE_DIRS.T, axis=2)
    return np.where(strength >= CHROMA_MIN, labels, -1)


def classify_shape(mask: np.ndarray) -> str | None:
    """``"square"``, ``"circle"``, ``"triangle"`` or ``None`` for a component's boolean mask (cropped)."""
    height, width = mask.shape
    area = int(mask.sum())
    if area > MAX_AREA or max(height, width) > MAX_ASPECT * min(height, width):
        return None
    fill = area / (height * width)
    rows = np.nonzero(mask)[0]
    low_mass = (rows.mean() + 0.5) / height - 0.5
    if fill >= SQUARE_FILL:
        return "square"
    if 0.35 <= fill < 0.8 and low_mass >= TRIANGLE_LOW_MASS:
        return "triangle"
    if fill >= CIRCLE_FILL and abs(low_mass) < TRIANGLE_LOW_MASS:
        return "circle"
    return None


def detect_array(image: np.ndarray) -> dict[str, list[Detection]]:
    """Detections ``{shape: [Detection, ...]}`` (best first) in an ``(H, W, 3)`` array in [0, 1]."""
    labels = colour_labels(image)
    chroma = np.linalg.norm(image - image.mean(axis=2, keepdims=True), axis=2)
    found: dict[str, list[Detection]] = {}
    for index, colour in enumerate(_NAMES):
        components, _ = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        for label, (slice_y, slice_x) in enumerate(ndimage.find_objects(components), start=1):
            # another component of the same colour may poke into this box: keep only this one
            mask = components[slice_y, slice_x] == label
            if mask.sum() < MIN_AREA:
                continue
            shape = classify_shape(mask)
            if shape is None:
                continue
            # confidence: how saturated the object is, relative to a crisp render of its colour
            reference = np.linalg.norm(_PALETTE[index] - _PALETTE[index].mean())
            score = float(min(1.0, chroma[slice_y, slice_x][mask].mean() / reference))
            box = (float(slice_x.start), float(slice_y.start), float(slice_x.stop), float(slice_y.stop))
            found.setdefault(shape, []).append(Detection(score, box, colour))
    return {shape: sorted(d, key=lambda d: d.score, reverse=True) for shape, d in found.items()}


def detect(image) -> dict[str, list[Detection]]:
    """``detect_array`` for a tensor ``(3, H, W)`` in [0, 1] (or an ``(H, W, 3)`` array)."""
    if not isinstance(image, np.ndarray):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return detect_array(np.clip(image, 0.0, 1.0))
