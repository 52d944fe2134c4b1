"""The ``latent`` feature space: the generator's latents and their pooled statistics (method.md §5.5).

The official ``DirectLatentFeatureExtractor`` (the paper's "Latent" ablation row), on the latents as the
generator produces them. Keys (C = latent channels):

* ``latent``: every latent pixel as a C-dimensional particle (H*W per image; ``stride`` s keeps every
  s-th row and column, the official ``DRPO_LATENT_SPATIAL_STRIDE``, 1 by default);
* ``latent_mean`` / ``latent_std``: channel mean and std over the whole map (one particle each);
* ``latent_norm``: channel root mean square ``sqrt(mean(x^2))`` (one particle);
* ``latent_mean_p`` / ``latent_std_p``: channel mean and std inside each non-overlapping p x p patch
  ((H/p)(W/p) particles: 1024 for p=2 on the 64x64 latents of 512 px images), any p that divides H and W.

Default keys: the official default set without ``latent`` (``latent_mean, latent_std, latent_mean_2,
latent_std_2, latent_mean_4, latent_std_4``). The official set adds ``latent``, 4096 particles per image
at 512 px: the drift field's distance matrix then holds K*4096 x (K+16)*4096 entries per prompt (tens of
GB at K=24), so it is opt-in (``keys: [latent, ...]``, or a ``stride``).

The paper's ablation puts raw latents below the base model (method.md §11.6, "Latent" PickScore 20.52 vs
21.88): use this space to get started or for toy worlds, not for quality (``latent-mae`` for SD-Turbo).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import FeatureSpace

#: the official default keys (``DEFAULT_LATENT_FEATURE_KEYS``) minus ``latent``; see the module docstring
DEFAULT_KEYS = ("latent_mean", "latent_std", "latent_mean_2", "latent_std_2", "latent_mean_4", "latent_std_4")
KEY_PATTERN = re.compile(r"latent(_norm|_(mean|std)(_[1-9][0-9]*)?)?")


class LatentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(default_factory=lambda: list(DEFAULT_KEYS), min_length=1,
                            description="latent, latent_mean, latent_std, latent_norm, latent_mean_P, latent_std_P")
    stride: int = Field(1, ge=1, description="spatial stride of the raw `latent` key (official default 1)")

    @field_validator("keys")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        unknown = [key for key in keys if not KEY_PATTERN.fullmatch(key)]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}: use latent, latent_mean, latent_std, latent_norm, "
                             "latent_mean_P or latent_std_P (P: patch size)")
        if len(set(keys)) != len(keys):
            raise ValueError("keys repeat")
        return keys

    @field_validator("stride")
    @classmethod
    def _stride_needs_latent(cls, stride: int, info: ValidationInfo) -> int:
        if "latent" not in info.data.get("keys", DEFAULT_KEYS):
            raise ValueError("it strides the raw `latent` key only, which keys does not include")
        return stride


@hookimpl
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    register("latent", _build, options=LatentOptions, requires=("latents",),
             summary="latent pixels and patch statistics (the paper's weak raw-latent ablation)")


def _build(options: LatentOptions, context: BuildContext) -> FeatureSpace:
    from drpo_latent.features import LatentFeatures

    return LatentFeatures(options.keys, options.stride)

