"""The feature-space contract (``drpo_core.testing.check_feature_space``) over every registered feature space.

The cases come from the registry: a newly registered feature space fails here until it gets a builder
below (``name`` or ``name[case]`` -> ``(space, x, context)``), on tiny configs of its real architecture.
"""

from __future__ import annotations

import pytest
import torch

from drpo_core.context import BuildContext
from drpo_core.interfaces import FeatureContext, FeatureSpace
from drpo_core.registry import Registry
from drpo_core.testing import TinyGenerator, check_feature_space_case, feature_space_cases

Case = tuple[FeatureSpace, torch.Tensor, FeatureContext]
REGISTRY = Registry().load_entry_points()  # the built-in plugins (conftest: DRPO_LOAD_PLUGINS="")
TEACHER_BLOCKS = ["down_blocks.1", "mid_block", "up_blocks.0"]  # the tiny UNets have two levels


def _build(name: str, options: dict) -> FeatureSpace:
    return REGISTRY.build("feature", name, options, BuildContext())


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _context(batch: int = 2, noise: torch.Tensor | None = None, generator=None) -> FeatureContext:
    return FeatureContext([f"prompt {i % 2}" for i in range(batch)], noise, generator or TinyGenerator())


def latent_case(request) -> Case:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return _build("latent", {"keys": ["latent", "latent_mean", "latent_std_2"], "stride": 2}), x, _context()


def shapes_case(request) -> Case:
    return _build("shapes", {}), _images(32), _context()


def dinov2_case(request) -> Case:
    dirs = request.getfixturevalue("tiny_vision_dirs")
    return _build("dinov2", {"model": str(dirs["dinov2"]), "layers": [2, 4]}), _images(40), _context()


def pixel_mae_case(request) -> Case:
    dirs = request.getfixturevalue("tiny_vision_dirs")
    return _build("pixel-mae", {"model": str(dirs["vit-mae"]), "layers": [4]}), _images(40), _context()


def teacher_case(architecture: str):
    def build(request) -> Case:
        from drpo_diffusers.testing import tiny_generator

        generator = tiny_generator(architecture, request.getfixturevalue("tiny_dirs")[architecture])
        with torch.no_grad():  # adapters that change the UNet: the teacher must not see them
            for parameter in generator.trainable_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
        seeded = torch.Generator().manual_seed(1)
        x, noise = (torch.randn(2, *generator.noise_shape, generator=seeded) for _ in range(2))
        space = _build("teacher-unet", {"blocks": TEACHER_BLOCKS})
        return space, x, _context(noise=noise, generator=generator)

    return build


def latent_mae_case(request) -> Case:
    from drpo_mae.testing import write_tiny_checkpoint

    path = request.getfixturevalue("tmp_path") / "mae.safetensors"
    write_tiny_checkpoint(path)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    return _build("latent-mae", {"weights": str(path)}), x, _context()


BUILDERS = {
    "latent": latent_case,
    "latent-mae": latent_mae_case,
    "shapes": shapes_case,
    "dinov2": dinov2_case,
    "pixel-mae": pixel_mae_case,
    "teacher-unet[sd]": teacher_case("sd"),
    "teacher-unet[sdxl]": teacher_case("sdxl"),
}


@pytest.mark.parametrize("name, builder", feature_space_cases(BUILDERS, REGISTRY.names("feature")))
def test_every_registered_feature_space_keeps_the_contract(request, name, builder):
    check_feature_space_case(request, name, builder, REGISTRY)
