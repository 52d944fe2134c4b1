"""The typed interfaces every drpo component implements (API version 2).

A plugin author learns the whole contract from this module and :mod:`drpo_core.hookspecs`.

Conventions shared by all components:

* **Images** handed to rankers and pixel feature spaces are float tensors ``(B, 3, H, W)`` with
  values in ``[0, 1]`` (RGB). A ranker that wants PIL images converts them itself.
* **Latents** are the generator's own sample space, the tensor its one-step network produces and
  regresses on. For Stable Diffusion generators this is the *scaled* latent (what the UNet sees,
  i.e. ``vae.encode(x).latent_dist.mode() * scaling_factor``); ``decode`` divides by the factor.
  For the toy world the latent *is* the image.
* **Noise** is drawn by the training loop on the CPU (``drpo_core.noise``) from a generator keyed
  by (run seed, global prompt index, candidate) with shape ``Generator.noise_shape``, then moved to
  the generator's device. A generator never draws its own sampling noise, so samples do not
  depend on the device or the number of processes.
* **Particles**: a feature space returns ``{key: (B, T, D)}``: T vectors ("particles") of
  dimension D per input. The drift field pools the particles of the K candidates of one prompt.

Version 2 (this one) gave feature spaces a :class:`FeatureContext`, generators their ``module``,
and declared what the loop used by duck typing before (``Ranker.groups``, ``Generator.export``).
A component whose ``api_version`` differs is refused when it is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

API_VERSION = 2


class Generator(ABC):
    """A one-step text-conditioned generator ``x = G_theta(noise, prompt)``."""

    api_version: ClassVar[int] = API_VERSION
    #: formats ``export`` writes (``drpo export --format``); empty: the generator cannot be exported
    export_formats: ClassVar[tuple[str, ...]] = ()
    #: shape of one noise sample, without the batch dimension
    noise_shape: tuple[int, ...]

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The module that holds the trainable parameters: what distributed training wraps (DDP/FSDP)."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA adapters, or all weights)."""

    @abstractmethod
    def sample(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Latents for ``prompts[i]`` from ``noise[i]``; differentiable when grad is enabled."""

    @abstractmethod
    def reference(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Latents of the frozen base generator on the same noise, without grad."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1]; differentiable when grad is enabled."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [0, 1] (used by the offline and data drift sources), without grad."""

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights, as saved in checkpoints (safetensors-compatible)."""

    @abstractmethod
    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def train(self, mode: bool = True) -> None:
        """Switch dropout/normalisation layers; generators without any may ignore it."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory; generators without it may ignore it."""
        return None

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise :class:`~drpo_core.errors.DrpoError` (one line) if some prompts are ones this generator
        cannot take (a grammar, a length limit): called on a run's prompts before it starts. Accepts all
        by default."""
        return None

    def export(self, out_dir: Path, format: str, fuse: bool = False,
               card: Mapping[str, Any] | None = None) -> Path:
        """Write the trained generator for use outside drpo in one of ``export_formats``."""
        raise NotImplementedError(f"{type(self).__name__} has no export formats")


class Ranker(ABC):
    """A black-box reward. Only the order of scores within a prompt's group is used.

    ``score`` is called under ``torch.no_grad()``. Scores may be any float dtype; the loop keeps
    them in float64 until the order is taken, so compute the final logits in float32 or better
    even on a bf16 backbone (in bf16, PickScore x100 near 22 moves in steps of 0.125: ties everywhere).

    Failures: NaN for an image that could not be scored skips its prompt; an exception (or output that
    is not scores, such as ``None``) skips the batch's prompts; both count against ``train.max_failures``.
    A wrong number of scores stops the run. A ranker that may hang gets ``timeout`` in its config section.
    """

    api_version: ClassVar[int] = API_VERSION
    #: scores are 0/1 correctness (GenEval style): the loop uses the binary rollout. Declare it at
    #: registration too (``provides=("binary",)``), so a run is checked before anything loads.
    binary: ClassVar[bool] = False
    #: the score can be back-propagated through ``score_differentiable``: read by gradient baselines such as
    #: DRaFT (DrPO never does)
    differentiable: ClassVar[bool] = False
    #: the range a working model's scores fall in, on its authors' scale (``drpo doctor`` checks real weights
    #: against it); None: not declared
    score_range: tuple[float, float] | None = None
    #: whether the score depends on the prompt: ``drpo doctor`` then checks that a caption describing a photo
    #: outscores one that does not (for a ranker that ignores it, that the caption changes nothing)
    uses_prompt: bool = True

    @abstractmethod
    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None],
    ) -> torch.Tensor:
        """One float per image, shape ``(B,)``."""

    def groups(self, record: Any) -> list[str]:
        """Groups a held-out prompt record belongs to (``count=3``, ``shape=bar``): evaluation reports
        the score per group too. None by default."""
        return []

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(B,)`` scores that back-propagate to ``images`` when grad is enabled (gradient baselines such as
        DRaFT call it); rankers that declare ``differentiable = True`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} is not differentiable")


@dataclass(frozen=True)
class Units:
    """How ``drpo eval`` reports a ranker's scores: ``scale`` times the raw score, named ``label`` in its
    tables (the paper prints PickScore x100, ImageReward x10, aesthetic raw). Declared once, at the ranker's
    registration (``register(..., units=Units(100))``); a ranker without it is reported raw."""

    scale: float = 1.0
    #: what the table header says; default ``x100`` for a scale of 100, ``raw`` for 1
    label: str = ""
    #: the headline figure is also the mean of the groups' means, each group counting the same (GenEval's
    #: Overall is the mean of its six task accuracies, not of its 553 prompts)
    mean_of_groups: bool = False

    def __str__(self) -> str:
        return self.label or ("raw" if self.scale == 1 else f"x{self.scale:g}")


@dataclass(frozen=True)
class FeatureContext:
    """What the loop knows about the rows of a batch handed to ``FeatureSpace.features``."""

    #: the prompt of each row
    prompts: Sequence[str]
    #: the noise each row was generated from, ``(B, *noise_shape)``; None for rows that were not
    #: generated (offline or real images, remembered samples)
    noise: torch.Tensor | None
    #: the run's generator: feature spaces built on the frozen base (teacher-UNet) use its ``reference``
    generator: Generator


class FeatureSpace(ABC):
    """A frozen feature map phi; differentiable with respect to its input, no trainable weights."""

    api_version: ClassVar[int] = API_VERSION
    #: what ``features`` takes: the generator's latents or decoded images in [0, 1]
    input: ClassVar[Literal["latents", "images"]] = "latents"

    @abstractmethod
    def features(self, x: torch.Tensor, context: FeatureContext) -> dict[str, torch.Tensor]:
        """``{key: (B, T, D)}`` particle sets for a batch of B latents or images."""

    def to(self, device: torch.device | str) -> FeatureSpace:
        return self


@runtime_checkable
class Kernel(Protocol):
    """Pairwise kernel logits between generated particles and targets (larger = closer).

    ``dist`` (B, N, J) are Euclidean distances between ``x`` (B, N, D) and ``targets`` (B, J, D),
    ``scale`` (B, 1, 1) is the weighted mean distance s of the drift field, ``radius`` the
    relative temperature r. Each batch row must be treated on its own: the drift field stacks the
    feature keys of one shape along the batch.
    """

    def __call__(
        self,
        dist: torch.Tensor,
        scale: torch.Tensor,
        radius: float,
        x: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor: ...
