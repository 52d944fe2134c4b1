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

import numpy as np
from scipy import ndimage

from drpo_core.rules import Detection
from drpo_shapes.world import COLORS

CHROMA_MIN = 0.22  # ~40% object coverage of the weakest (green) colour
MIN_AREA = 16  # the smallest object (a 12x4 bar) covers 48 pixels
MAX_AREA = 130  # an 11 px circle covers ~100, a 14x5 bar 70; bigger is merged objects
CIRCLE_ASPECT = 1.35  # a circle's box: width / height within [1/1.35, 1.35]
CIRCLE_FILL = 0.65  # pixelated circles fill 0.80-0.88 of their box
BAR_ASPECT = 1.8  # a bar's box is 2.4-3.5 times wider than tall (a pillar: taller than wide)
BAR_FILL = 0.75  # a bar fills its box; two merged circles fill ~0.6

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
