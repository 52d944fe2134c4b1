"""The ``latent-mae`` feature space: the paper's default for SD-Turbo (method.md §5.1).

The ResNet-style MAE encoder of *Generative Modeling via Drifting* ("MAE-256": basic blocks [3, 4, 6, 3],
GroupNorm, stride-1 stem, a GroupNorm after each stage), run directly on the generator's latents (no VAE
decode). It was trained on SD-VAE latents of ImageNet (32x32x4); on SD-Turbo's 512 px latents (64x64)
its stage maps are 64, 32, 16 and 8 pixels wide.

Keys, for each map (``conv1``, ``layer1``..``layer4``, ``layerK_blkB`` = after block B of stage K):

* ``{map}_mean`` / ``{map}_std``: channel mean and std over the map (1 particle);
* ``{map}_mean_P`` / ``{map}_std_P``: mean and std inside each non-overlapping P x P patch ((H/P)(W/P)
  particles: with layer4 at 8x8, 16 for P=2 and 4 for P=4);
* ``{map}``: every position (H*W particles); ``norm_x``: the latents' channel RMS.

Default keys: the paper's six, ``layer4_mean, layer4_std, layer4_mean_2, layer4_std_2, layer4_mean_4,
layer4_std_4`` (1, 1, 16, 16, 4, 4 particles per 512 px image); SD-Turbo's recommendation sums their
losses (``drift.aggregation: sum``), as the official code does.

Weights: the released checkpoint (asset ``latent-mae-256``: ``drpo assets fetch latent-mae-256``), or any
checkpoint of the same layout through ``weights`` (``.pth`` read with ``weights_only=True``, or
``.safetensors``). The layout is documented in ``drpo_mae.encoder``; ``drpo_mae.testing`` writes tiny ones.

Precision: latents are cast to the checkpoint's dtype (fp32) as in the official code; under the run's
mixed precision the convolutions run in it (the official trainer also ran the extractor under autocast).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drpo_core import hookimpl
from drpo_core.context import BuildContext, LocalPath
from drpo_core.hookspecs import Register, RegisterAsset
from drpo_core.interfaces import FeatureSpace

#: the paper's SD-Turbo keys (``DEFAULT_MAE_FEATURE_KEYS`` of the official code)
PAPER_KEYS = ("layer4_mean", "layer4_std", "layer4_mean_2", "layer4_std_2", "layer4_mean_4", "layer4_std_4")
ASSET = "latent-mae-256"
#: the released checkpoint (method.md §5.1); ModelScope serves a repository's files under resolve/<revision>/
LATENT_MAE_256 = {
    "url": "https://www.modelscope.cn/models/jiangzhou130v1/drpo-mae-latent-256/resolve/master/mae_latent_256_torch.pth",
    "sha256": "4810249905d2882a41d5a0fe97ebac995af8918dbe121daa9871e5bc605445b1",
    "licence": "not stated",
    # a PyTorch export (by the DrPO authors) of MAE-256 from Hugging Face Goodeat/drifting
    "summary": "latent-MAE weights (MAE-256 of Generative Modeling via Drifting)",
}
#: what the generator must hand over: its latents, from a 4-channel Stable Diffusion VAE
REQUIRES = ("latents", "sd-vae-latents")


class LatentMAEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: LocalPath | None = Field(
        None, description=f"checkpoint (.pth, .pt or .safetensors) in the released layout; default: asset {ASSET}")
    keys: list[str] = Field(default_factory=lambda: list(PAPER_KEYS), min_length=1,
                            description="MAP_mean, MAP_std, MAP_mean_P, MAP_std_P, MAP (MAP: conv1, layerK, "
                                        "layerK_blkB), norm_x")

    @field_validator("keys")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        from drpo_mae.features import check_key

        for key in keys:
            check_key(key)
        if len(set(keys)) != len(keys):
            raise ValueError("keys repeat")
        return keys


@hookimpl
def drpo_register_assets(register: RegisterAsset) -> None:
    register(ASSET, **LATENT_MAE_256)


@hookimpl
def drpo_register_features(register: Register[FeatureSpace]) -> None:
    register("latent-mae", _build, options=LatentMAEOptions, requires=REQUIRES,
             summary="latent-MAE encoder statistics of the latents (the paper's SD-Turbo default)")


def _build(options: LatentMAEOptions, context: BuildContext) -> FeatureSpace:
    from drpo_core import assets
    from drpo_mae.encoder import LatentMAEEncoder
    from drpo_mae.features import LatentMAEFeatures

    weights = assets.option_or_asset(options.weights, assets.Asset(name=ASSET, **LATENT_MAE_256), context.config_dir,
                                     "features.weights", "set features.weights to a local copy")
    encoder = LatentMAEEncoder.load(weights)
    return LatentMAEFeatures(encoder, options.keys, weights).to(context.device)
