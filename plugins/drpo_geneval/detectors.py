"""Object detectors for the GenEval ranker: pictures in, ``{GenEval name: [Detection, ...]}`` out.

* ``mask2former`` (default): transformers' Mask2Former for COCO instance segmentation, GenEval's architecture.
  Its instances are computed here as mmdet computes them for GenEval (the 100 best query-class pairs by class
  probability; mask logits upsampled bilinearly to the picture; score = class probability x the mean mask
  probability inside the mask; box = the mask's extent), not with the image processor's
  ``post_process_instance_segmentation``: that drops everything under ``threshold=0.5`` by default (GenEval
  counts from 0.3), rounds scores, upsamples binary masks from a fixed 384 px by nearest neighbour and returns
  masks without boxes. transformers' checkpoint is not mmdet's: scores and counts are close to GenEval's, not
  bit-identical.
* ``owlv2``: OWLv2 open-vocabulary detection, queried with "a photo of a {name}" for each of the 80 names;
  boxes only (the colour of an object is then classified on its box, as GenEval does without masks). Its
  scores are calibrated differently: tune ``threshold`` and ``counting_threshold``.
* ``module:function``: ``function(options, context)`` returns any object with this module's ``Detector``
  interface.

Each detector's labels are mapped onto GenEval's names when it loads (:func:`drpo_geneval.vocabulary.map_labels`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from drpo_core.errors import PluginError
from drpo_geneval.rules import Detection
from drpo_geneval.vocabulary import OBJECT_NAMES, map_labels

if TYPE_CHECKING:
    from PIL import Image

    from drpo_core.context import BuildContext
    from drpo_geneval.options import GenevalOptions

Found = dict[str, list[Detection]]
#: instances mmdet's Mask2Former keeps per image before any threshold (its test_cfg max_per_image)
MAX_PER_IMAGE = 100


class Detector(Protocol):
    def detect(self, pictures: Sequence[Image.Image], min_score: float) -> list[Found]:
        """Per picture, the detections scoring above ``min_score`` by GenEval name, with boxes ``(x0, y0, x1,
        y1)`` in the picture's pixels and, where the detector has them, boolean masks of the picture's size."""
        ...


@contextlib.contextmanager
def own_precision(device: torch.device) -> Iterator[None]:
    """The models run in their own dtype: the run's autocast does not apply."""
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        yield


def boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` boxes ``(x0, y0, x1, y1)`` around boolean masks ``(N, H, W)``: first to one past the last
    covered column and row (mmdet's ``mask2bbox``); zeros for an empty mask."""
    columns, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)

    def extent(covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = covered.shape[1]
        first = covered.int().argmax(dim=1)
        last = size - covered.flip(1).int().argmax(dim=1)
        empty = ~covered.any(dim=1)
        return first.masked_fill(empty, 0), last.masked_fill(empty, 0)

    (x0, x1), (y0, y1) = extent(columns), extent(rows)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: dict[int, str],
              input_size: tuple[int, int], valid_size: tuple[int, int], picture_size: tuple[int, int],
              min_score: float, max_per_image: int = MAX_PER_IMAGE) -> Found:
    """Mask2Former's instances of one picture (mmdet's instance post-processing).

    ``class_logits`` (Q, C+1) with "no object" last, ``mask_logits`` (Q, h, w) over the padded model input of
    ``input_size``, of which ``valid_size`` (top left) holds the resized picture of ``picture_size`` (H, W).
    """
    probs = class_logits.float().softmax(dim=-1)[:, :-1]
    num_classes = probs.shape[1]
    top, flat = probs.flatten().topk(min(max_per_image, probs.numel()))
    # a score is the class probability times a mask probability <= 1: only these can pass min_score
    hopeful = top > min_score
    top, flat = top[hopeful], flat[hopeful]
    found: Found = {}
    if not len(top):
        return found
    queries, classes = flat // num_classes, flat % num_classes
    masks = F.interpolate(mask_logits[queries].float()[None], size=input_size, mode="bilinear", align_corners=False)
    masks = masks[..., :valid_size[0], :valid_size[1]]
    masks = F.interpolate(masks, size=picture_size, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top * mask_scores
    known = torch.tensor([int(c) in labels for c in classes.tolist()], dtype=torch.bool, device=scores.device)
    keep = ((scores > min_score) & known).nonzero().flatten()
    if not len(keep):
        return found
    kept_masks = binary[keep]
    boxes = boxes_of_masks(kept_masks).tolist()
    kept_masks_np = kept_masks.cpu().numpy()
    for j, (score, label) in enumerate(zip(scores[keep].tolist(), classes[keep].tolist(), strict=True)):
        box = (boxes[j][0], boxes[j][1], boxes[j][2], boxes[j][3])
        found.setdefault(labels[label], []).append(Detection(score, box, None, kept_masks_np[j]))
    return found


class Mask2FormerDetector:
    """transformers' ``Mask2FormerForUniversalSegmentation`` with its (PIL) image processor."""

    def __init__(self, model: Any, processor: Any, labels: dict[int, str], device: torch.device, dtype: torch.dtype,
                 batch_size: int) -> None:
        self.model, self.processor, self.labels = model, processor, labels
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def detect(self, pictures: Sequence[Image.Image], min_score: float) -> list[Found]:
        out: list[Found] = []
        for start in range(0, len(pictures), self.batch_size):
            chunk = list(pictures[start:start + self.batch_size])
            inputs = self.processor(images=chunk, return_tensors="pt")
            pixels = inputs["pixel_values"]
            with own_precision(self.device):
                outputs = self.model(pixel_values=pixels.to(self.device, self.dtype))
            input_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
            for i, picture in enumerate(chunk):
                out.append(instances(outputs.class_queries_logits[i], outputs.masks_queries_logits[i], self.labels,
                                     input_size, _valid_size(inputs, i, input_size),
                                     (picture.height, picture.width), min_score))
        return out


def _valid_size(inputs: Any, index: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the resized picture inside the padded input (the processor's ``pixel_mask``)."""
    mask = inputs.get("pixel_mask")
    if mask is None:
        return input_size
    valid = mask[index].bool()
    return int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())


class Owlv2Detector:
    """transformers' ``Owlv2ForObjectDetection`` queried with GenEval's 80 names; boxes, no masks."""

    QUERY = "a photo of a {name}"

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.model, self.processor = model, processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.queries = [self.QUERY.format(name=name) for name in OBJECT_NAMES]

    def detect(self, pictures: Sequence[Image.Image], min_score: float) -> list[Found]:
        out: list[Found] = []
        for start in range(0, len(pictures), self.batch_size):
            chunk = list(pictures[start:start + self.batch_size])
            # OWLv2's text tower takes 16 tokens: pad (and cut) every query to that
            inputs = self.processor(text=[self.queries] * len(chunk), images=chunk, return_tensors="pt",
                                    padding="max_length", truncation=True)
            inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            with own_precision(self.device):
                outputs = self.model(**inputs)
            outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
            sizes = [(p.height, p.width) for p in chunk]
            results = self.processor.image_processor.post_process_object_detection(
                outputs, threshold=min_score, target_sizes=sizes)
            for result, (height, width) in zip(results, sizes, strict=True):
                found: Found = {}
                for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                             result["boxes"].tolist(), strict=True):
                    x0, y0, x1, y1 = (min(max(v, 0.0), float(limit)) for v, limit in zip(box, (width, height) * 2,
                                                                                        strict=True))
                    found.setdefault(OBJECT_NAMES[label], []).append(Detection(float(score), (x0, y0, x1, y1)))
                out.append(found)
        return out


# ------------------------------------------------------------------------------------------ loading


def load_detector(options: GenevalOptions, context: BuildContext, device: torch.device,
                  dtype: torch.dtype) -> Detector:
    if options.detector == "mask2former":
        return _load_mask2former(options, context, device, dtype)
    if options.detector == "owlv2":
        return _load_owlv2(options, context, device, dtype)
    return _load_custom(options, context)


def _load_mask2former(options: GenevalOptions, context: BuildContext, device: torch.device,
                      dtype: torch.dtype) -> Detector:
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from drpo_clip_rankers.common import freeze, load_pretrained

    source = options.detector_source()
    model = load_pretrained("geneval", "detector_model", Mask2FormerForUniversalSegmentation.from_pretrained, source,
                            context, dtype=dtype)
    processor = load_pretrained("geneval", "detector_model", Mask2FormerImageProcessorPil.from_pretrained, source,
                                context)
    return Mask2FormerDetector(freeze(model, device, dtype), processor, _labels(model, source), device, dtype,
                               options.batch_size)


def _load_owlv2(options: GenevalOptions, context: BuildContext, device: torch.device, dtype: torch.dtype) -> Detector:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from drpo_clip_rankers.common import freeze, load_pretrained

    source = options.detector_source()
    model = load_pretrained("geneval", "detector_model", Owlv2ForObjectDetection.from_pretrained, source, context,
                            dtype=dtype)
    processor = load_pretrained("geneval", "detector_model", Owlv2Processor.from_pretrained, source, context)
    return Owlv2Detector(freeze(model, device, dtype), processor, device, dtype, options.batch_size)


def _labels(model: Any, source: str) -> dict[int, str]:
    """The model's labels mapped to GenEval's names; one line when they do not cover the 80 objects."""
    try:
        return map_labels(model.config.id2label)
    except ValueError as error:
        raise PluginError(f"ranker 'geneval': detector_model {source!r} does not detect GenEval's objects: {error} "
                          "(a COCO instance-segmentation model is needed)") from None


def _load_custom(options: GenevalOptions, context: BuildContext) -> Detector:
    module_name, _, attribute = options.detector.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise PluginError(f"ranker 'geneval': detector {options.detector!r} cannot be imported: {error}") from None
    detector = factory(options, context)
    if not callable(getattr(detector, "detect", None)):
        raise PluginError(f"ranker 'geneval': detector {options.detector!r} returned {type(detector).__name__}, "
                          "which has no detect(pictures, min_score) method")
    return detector
