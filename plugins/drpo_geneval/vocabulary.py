"""GenEval's vocabulary: its 80 object names (COCO's, three renamed), colours, tags, and how a detector's
labels map onto the names."""

from __future__ import annotations

from collections.abc import Mapping

#: GenEval's ``object_names.txt``, in its order (COCO's 80 thing classes; GenEval calls COCO's "mouse",
#: "remote" and "keyboard" "computer mouse", "tv remote" and "computer keyboard")
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: the colours GenEval's CLIP classifier chooses from, in its order
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: the zero-shot templates of each colour (``{c}`` colour, ``{cls}`` object name); their embeddings are averaged
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
#: GenEval's sub-tasks, as the ``tag`` of its metadata
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: other spellings of the names in detectors' label lists (COCO's own, VOC-style, a known typo)
ALIASES: Mapping[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
    "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier",
    "brocolli": "broccoli", "cellphone": "cell phone", "doughnut": "donut",
}


def geneval_name(label: str) -> str | None:
    """The GenEval name of a detector label (``"potted_plant"``, ``"mouse"``), or None when it is none."""
    text = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    text = ALIASES.get(text, text)
    return text if text in OBJECT_NAMES else None


def map_labels(id2label: Mapping[int, str]) -> dict[int, str]:
    """``{label id: GenEval name}`` for a detector's labels. Every one of the 80 names must be claimed by
    exactly one label; labels naming none of them (a panoptic model's stuff classes) are left out. Raises
    ``ValueError`` naming what is missing or claimed twice."""
    mapping: dict[int, str] = {}
    claimed: dict[str, list[str]] = {}
    for index, label in sorted(id2label.items()):
        name = geneval_name(str(label))
        if name is not None:
            mapping[int(index)] = name
            claimed.setdefault(name, []).append(str(label))
    missing = [name for name in OBJECT_NAMES if name not in claimed]
    twice = {name: labels for name, labels in claimed.items() if len(labels) > 1}
    if missing or twice:
        problems = []
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            problems.append(f"no label for {len(missing)} of GenEval's 80 objects ({shown})")
        if twice:
            problems.append("several labels for " + ", ".join(f"{n} ({', '.join(ls)})" for n, ls in twice.items()))
        raise ValueError("; ".join(problems))
    return mapping
