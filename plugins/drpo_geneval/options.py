"""The ``geneval`` ranker's options (a pydantic model, ``extra="forbid"``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from drpo_core.context import LocalPath, ModelRunOptions

#: the detector closest to GenEval's (Mask2Former Swin-S, COCO instance segmentation; GenEval runs mmdet's
#: checkpoint of the same architecture, whose scores differ slightly)
MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
OWLV2 = "google/owlv2-base-patch16-ensemble"
#: the colour classifier: OpenAI's CLIP ViT-L/14, the weights of open_clip's "ViT-L-14 openai" GenEval uses
CLIP_VIT_L = "openai/clip-vit-large-patch14"
DETECTOR_MODELS = {"mask2former": MASK2FORMER, "owlv2": OWLV2}


class GenevalOptions(ModelRunOptions):
    detector: str = Field("mask2former", description="mask2former (COCO instance segmentation, GenEval's "
                          "architecture), owlv2 (open vocabulary, boxes only), or module:function returning a "
                          "detector of your own (drpo_geneval.detectors.Detector)")
    detector_model: LocalPath | None = Field(None, description="hub id or local directory of the detector; default: "
                                             f"{MASK2FORMER} (mask2former) or {OWLV2} (owlv2)")
    clip_model: LocalPath = Field(CLIP_VIT_L, description="hub id or local directory of the CLIP model (and processor) "
                                  "that classifies colours")
    threshold: float = Field(0.3, ge=0, lt=1, description="detections scoring above it count (GenEval: 0.3)")
    counting_threshold: float = Field(0.9, ge=0, lt=1, description="the threshold for counting prompts (GenEval: 0.9)")
    max_objects: int = Field(16, ge=1, description="detections kept per class, best first (GenEval: 16)")
    max_overlap: float = Field(1.0, gt=0, le=1, description="drop a detection whose box overlaps a better one of "
                               "its class by this IoU or more; 1.0: off (GenEval)")
    position_threshold: float = Field(0.1, ge=0, description="share of the boxes' sizes a centre offset must exceed "
                                      "(GenEval: 0.1)")
    background: str = Field("#999", description="colour behind an object's mask when its colour is classified "
                            "(GenEval: #999)")
    batch_size: int = Field(8, ge=1, description="images per detector forward pass (crops: 4x this per CLIP pass)")

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, value: str) -> str:
        module, colon, attribute = value.partition(":")
        if value not in DETECTOR_MODELS and not (colon and module and attribute):
            raise ValueError(f"unknown detector {value!r}: use {', '.join(DETECTOR_MODELS)} or module:function")
        return value

    @field_validator("background")
    @classmethod
    def _a_colour(cls, value: str) -> str:
        from PIL import ImageColor

        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a colour (#999, #808080, gray)") from None
        return value

    def hub_models(self, variant: str | None) -> dict[str, str]:
        """``{option: model}`` the ranker loads when it is built for ``variant`` (checked in the cache before
        any model loads): the detector, and CLIP for the tasks with colours (the others load it only if a
        colour clause ever comes)."""
        models = {"detector_model": self.detector_source()} if self.detector in DETECTOR_MODELS else {}
        if variant in (None, "colors", "color_attr"):
            models["clip_model"] = self.clip_model
        return models

    def detector_source(self) -> str:
        """The detector model to load: ``detector_model``, else the backend's default."""
        return self.detector_model or DETECTOR_MODELS.get(self.detector, "")
