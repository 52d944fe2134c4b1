"""Regenerate the golden outputs of the official latent extractors (tests/test_mae_features.py).

Runs the official ``FrozenMAELatentFeatureExtractor`` and ``DirectLatentFeatureExtractor`` of UGVly/DrPO
(``src/drpo/features.py``; HEAD, which matches commit 9ed34b8 for these classes) on a tiny checkpoint in the
released layout and on fixed latents. Nothing of theirs is copied here: their module is imported from a
checkout given on the command line::

    git clone https://github.com/UGVly/DrPO /tmp/DrPO
    python tests/data/mae/make_golden.py /tmp/DrPO/src

It writes, beside this script:

* ``tiny-mae.pth``: the checkpoint (``drpo_mae.testing.write_tiny_checkpoint``: widths 4, 8, 12, 36 (36
  channels: 18 GroupNorm groups), layers 2, 2, 3, 1, flax HWIO kernels, ``module._orig_mod.`` prefixes,
  ``{"state_dict", "metadata": {"model_config"}}``);
* ``golden.safetensors``: ``input`` (2 latents 4x32x32), ``mae/<key>`` for every vector feature of the
  official MAE extractor (block stride 2, patches 2 and 4, input statistics, spatial tokens of layer2 and
  deeper) and ``latent/<key>`` for every feature of the official raw-latent extractor (stride 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from drpo_mae.testing import write_tiny_checkpoint

HERE = Path(__file__).resolve().parent
WIDTHS, LAYERS, SEED = (4, 8, 12, 36), (2, 2, 3, 1), 18
#: raw spatial tokens of these maps are left out to keep the file small (their statistics stay)
SKIP = {"mae/conv1", "mae/layer1"}


def main(upstream_src: str) -> None:
    sys.path.insert(0, upstream_src)
    from drpo.features import DirectLatentFeatureExtractor, FrozenMAELatentFeatureExtractor

    checkpoint = write_tiny_checkpoint(HERE / "tiny-mae.pth", WIDTHS, LAYERS, seed=SEED)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(SEED))
    mae = FrozenMAELatentFeatureExtractor(checkpoint, block_stride=2, patch_pool_sizes=(2, 4),
                                          include_input_sq_mean=True, include_spatial_features=True)
    direct = DirectLatentFeatureExtractor(patch_pool_sizes=(2, 4), include_spatial_features=True, spatial_stride=1)
    out = {"input": latents}
    with torch.no_grad():
        out |= {f"mae/{key}": value for key, value in mae.vector_features(latents).items()}
        out |= {f"latent/{key}": value for key, value in direct.vector_features(latents).items()}
    out = {key: value.contiguous() for key, value in out.items() if key not in SKIP}
    save_file(out, str(HERE / "golden.safetensors"), metadata={"source": "UGVly/DrPO src/drpo/features.py"})
    print(f"{len(out) - 1} golden keys; {sum(v.numel() for v in out.values())} floats")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
