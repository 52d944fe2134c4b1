"""The ``latent`` feature space: the generator's latents and their pooled statistics (method.md §5.5).

The simplest built-in, so runs work before richer feature spaces are installed. Keys:

* ``latent``: every latent pixel as a C-dimensional particle (optionally strided: it is large);
* ``latent_mean`` / ``latent_std``: channel mean and std over the whole map (one particle);
* ``latent_mean_g`` / ``latent_std_g``: channel mean and std in each cell of a g x g grid (g*g particles).

The paper's ablation found raw latents a weak feature space (method.md §11.6, "Latent"): use it to
get started, not for quality.
"""

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import FeatureSpace

LatentKey = Literal["latent", "latent_mean", "latent_std", "latent_mean_2", "latent_std_2", "latent_mean_4",
                    "latent_std_4"]
KEYS: tuple[LatentKey, ...] = get_args(LatentKey)


class LatentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[LatentKey] = Field(default_factory=lambda: list(KEYS[1:]), min_length=1)
    stride: int = Field(4, ge=1, description="spatial stride of the raw `latent` key")

    @field_validator("stride")
    @classmethod
    def _stride_needs_latent(cls, stride: int, info: ValidationInfo) -> int:
        if "latent" not in info.data.get("keys", KEYS):
            raise ValueError("it strides the raw `latent` key only, which keys does not include")
        return stride


@hookimpl
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    register("latent", _build, options=LatentOptions, requires=("latents",),
             summary="latent pixels and pooled statistics")


def _build(options: LatentOptions, context: BuildContext) -> FeatureSpace:
    from drpo_latent.features import LatentFeatures

    return LatentFeatures(options.keys, options.stride)
