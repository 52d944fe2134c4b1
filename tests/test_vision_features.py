"""The vision feature spaces (method.md §5.2-§5.4) on tiny configs of their real architectures: DINOv2 and
pixel ViT-MAE on images, the teacher UNet on latents (its gradient with and without checkpointing against a
separate copy of the base UNet), their recommendations, and training steps through the real loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drpo_core.config import resolve_config
from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError, PluginError
from drpo_core.interfaces import FeatureContext
from drpo_core.metrics import read_metrics
from drpo_core.registry import Registry
from drpo_core.testing import TinyGenerator
from drpo_core.trainer import Trainer
from drpo_vision_features import TEACHER_SDXL

REGISTRY = Registry().load_entry_points()
BLOCKS = ["down_blocks.1", "mid_block", "up_blocks.0"]  # the tiny UNets have two levels
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build(name: str, **options):
    return REGISTRY.build("feature", name, options, BuildContext())


def images(batch: int = 2, size: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def image_context(batch: int = 2) -> FeatureContext:
    return FeatureContext(["a cat"] * batch, None, TinyGenerator())


def pixels(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """The official preprocessing, written out: bicubic resize, ImageNet normalisation."""
    return (F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False) - MEAN) / STD


def stats(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    patches = hidden[:, 1:]
    var = ((patches - patches.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
    return {"patch_mean": patches.mean(1, keepdim=True), "patch_std": (var + 1e-6).sqrt(), "cls": hidden[:, :1]}


# -- DINOv2 ------------------------------------------------------------------------------------------


def test_dinov2_keys_are_the_official_extractors_on_the_chosen_layers(tiny_vision_dirs):
    from transformers import Dinov2Model

    x = images()
    space = build("dinov2", model=str(tiny_vision_dirs["dinov2"]), layers=[2, 4])
    features = space.features(x, image_context())
    model = Dinov2Model.from_pretrained(tiny_vision_dirs["dinov2"]).eval()
    with torch.no_grad():
        hidden = model(pixel_values=pixels(x), output_hidden_states=True).hidden_states
    expected = {f"layer{layer}_{key}": value for layer in (2, 4) for key, value in stats(hidden[layer]).items()}
    assert list(features) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(features[key], value, atol=1e-5, rtol=1e-5)


def test_dinov2_defaults_are_layers_3_6_9_12_and_errors_are_one_line(tmp_path, tiny_vision_dirs):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=12, num_attention_heads=2, mlp_ratio=1,
                             image_size=16, patch_size=8)).save_pretrained(tmp_path / "deep")
    space = build("dinov2", model=str(tmp_path / "deep"))
    assert space.preprocess.size == 224  # no preprocessor config: the processor's 224
    features = space.features(images(1, 16), image_context(1))
    assert list(features) == [f"layer{n}_{s}" for n in (3, 6, 9, 12) for s in ("patch_mean", "patch_std", "cls")]
    assert all(v.shape == (1, 1, 8) for v in features.values())
    with pytest.raises(PluginError, match=r"layers \[5\] do not exist in .*, which has layers 1..4$"):
        build("dinov2", model=str(tiny_vision_dirs["dinov2"]), layers=[4, 5])
    with pytest.raises(PluginError, match=r"^model 'facebook/dinov2-base' is not in the local Hugging Face cache and "
                                          r"HF_HUB_OFFLINE is set: download it first \(hf download"):
        build("dinov2")
    with pytest.raises(PluginError, match=r"timm backend needs timm: pip install 'drpo\[timm\]'"):
        build("dinov2", backend="timm", model="vit_small_patch14_dinov2")


# -- pixel MAE ------------------------------------------------------------------------------------------


def _token_counts(space) -> list[int]:
    """The number of tokens the first encoder layer sees, per call (a forward hook)."""
    counts: list[int] = []
    space.model.layers[0].register_forward_hook(lambda module, args, output: counts.append(args[0].shape[1]))
    return counts


def test_pixel_mae_sees_every_patch_in_order_and_matches_an_unmasked_encoder(tiny_vision_dirs):
    from transformers import ViTMAEModel

    x = images()
    space = build("pixel-mae", model=str(tiny_vision_dirs["vit-mae"]), layers=[4])
    counts = _token_counts(space)
    features = space.features(x, image_context())
    assert counts == [1 + 16] and space.model.config.mask_ratio == 0
    assert list(features) == ["layer4_patch_mean", "layer4_patch_std", "layer4_cls"]

    # the same encoder with masking removed altogether: the embeddings without random_masking
    model = ViTMAEModel.from_pretrained(tiny_vision_dirs["vit-mae"], mask_ratio=0.0).eval()
    embeddings = model.embeddings
    with torch.no_grad():
        patches = embeddings.patch_embeddings(pixels(x)) + embeddings.position_embeddings[:, 1:]
        cls = (embeddings.cls_token + embeddings.position_embeddings[:, :1]).expand(len(x), -1, -1)
        hidden = torch.cat([cls, patches], dim=1)
        for layer in model.layers:
            hidden = layer(hidden, None)
    for key, value in stats(hidden).items():
        torch.testing.assert_close(features[f"layer4_{key}"], value, atol=1e-5, rtol=1e-5)
    again = space.features(x, image_context())
    assert all(torch.equal(again[key], features[key]) for key in features)


def test_mask_ratio_zero_alone_still_shuffles_the_patches(tiny_vision_dirs):
    """ecosystem.md §6: why the space passes a fixed patch order."""
    from transformers import ViTMAEModel

    model = ViTMAEModel.from_pretrained(tiny_vision_dirs["vit-mae"], mask_ratio=0.0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        restore = model(pixel_values=pixels(images(1))).ids_restore
    assert not torch.equal(restore[0], torch.arange(16))


def test_pixel_mae_official_masking_sees_a_random_quarter_of_the_patches(tiny_vision_dirs):
    space = build("pixel-mae", model=str(tiny_vision_dirs["vit-mae"]), layers=[4], masking="official")
    counts = _token_counts(space)
    x, context = images(), image_context()  # (TinyGenerator() seeds torch's global generator)
    first = space.features(x, context)
    second = space.features(x, context)
    assert counts == [1 + 4, 1 + 4]  # mask_ratio 0.75 of the checkpoint: 4 of 16 patches
    assert not torch.allclose(first["layer4_patch_mean"], second["layer4_patch_mean"])  # a new mask per call
    assert first["layer4_cls"].shape == second["layer4_cls"].shape == (2, 1, 32)


# -- teacher UNet ----------------------------------------------------------------------------------------


@pytest.fixture(params=["sd", "sdxl"])
def adapted(request, tiny_dirs):
    """A tiny generator whose LoRA adapters change the UNet (so a teacher that sees them is caught)."""
    from drpo_diffusers.testing import tiny_generator

    generator = tiny_generator(request.param, tiny_dirs[request.param], gradient_checkpointing=True)
    with torch.no_grad():
        for parameter in generator.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return request.param, generator


def _teacher_inputs(generator) -> tuple[torch.Tensor, FeatureContext]:
    seeded = torch.Generator().manual_seed(3)
    x, noise = (torch.randn(2, *generator.noise_shape, generator=seeded) for _ in range(2))
    return x, FeatureContext(["a red apple", "a blue car"], noise, generator)


def _projection(features: dict[str, torch.Tensor]) -> torch.Tensor:
    seeded = torch.Generator().manual_seed(5)
    return sum((v * torch.randn(v.shape, generator=seeded)).sum() for v in features.values())


def _input_grad(space, x, context) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    features = space.features(x, context)
    _projection(features).backward()
    return {k: v.detach() for k, v in features.items()}, x.grad


def _base_copy_grad(tiny_dir, space, x, context) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference: a separate copy of the base UNet loaded from disk, hooked by hand."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval().requires_grad_(False)
    modules, captured = dict(base.named_modules()), {}
    for name in BLOCKS:
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
    x = x.clone().requires_grad_(True)
    xi = space.feature_noise(x, context)
    base(x + 0.1 * xi, torch.full((2,), 100), **context.generator.unet_conditioning(context.prompts, torch.float32))
    features = {}
    for name in BLOCKS:
        value = captured[name]
        pooled = F.avg_pool2d(value, 4) if min(value.shape[-2:]) >= 4 else F.adaptive_avg_pool2d(value, 1)
        features[name] = pooled.flatten(1).unsqueeze(1)
    _projection(features).backward()
    return {k: v.detach() for k, v in features.items()}, x.grad


def test_teacher_gradient_is_the_base_unets_with_and_without_checkpointing(adapted, tiny_dirs, record_property):
    architecture, generator = adapted
    x, context = _teacher_inputs(generator)
    assert generator._checkpointing and generator.unet.is_gradient_checkpointing
    checkpointed = _input_grad(build("teacher-unet", blocks=BLOCKS), x, context)
    kept = _input_grad(build("teacher-unet", blocks=BLOCKS, checkpointing=False), x, context)
    reference = _base_copy_grad(tiny_dirs[architecture], build("teacher-unet", blocks=BLOCKS), x, context)
    for (features, grad), label in ((checkpointed, "checkpointed"), (kept, "kept")):
        for key in BLOCKS:
            torch.testing.assert_close(features[key], reference[0][key], atol=1e-6, rtol=1e-6)
        difference = float((grad - reference[1]).abs().max())
        record_property(f"{architecture}_{label}_max_abs_grad_diff", difference)
        torch.testing.assert_close(grad, reference[1], atol=1e-6, rtol=1e-6)
    assert float(reference[1].abs().max()) > 1e-3
    # the generator is left as it was: adapters on and trainable, its own checkpointing back
    assert generator._adapters_on() and generator.unet.is_gradient_checkpointing
    assert all(p.requires_grad for p in generator.trainable_parameters()) and generator.trainable_parameters()
    with torch.no_grad():  # and the adapters do change the UNet: a teacher seeing them would differ
        assert not torch.allclose(generator.sample(context.prompts, context.noise),
                                  generator.reference(context.prompts, context.noise))


def test_without_the_teachers_recompute_the_generators_checkpointing_breaks_the_gradient(adapted, tiny_dirs):
    """What the teacher avoids: adapters off for the forward only, the backward recomputes with them on."""
    architecture, generator = adapted
    x, context = _teacher_inputs(generator)
    space = build("teacher-unet", blocks=BLOCKS)
    _, reference = _base_copy_grad(tiny_dirs[architecture], space, x, context)
    x = x.clone().requires_grad_(True)
    modules, captured = dict(generator.unet.named_modules()), {}
    for name in BLOCKS:
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
    generator.unet.disable_adapters()
    generator.unet(x + 0.1 * space.feature_noise(x, context), torch.full((2,), 100),
                   **generator.unet_conditioning(context.prompts))
    generator.unet.enable_adapters()
    loss = _projection({name: space._pool(captured[name]) for name in BLOCKS})
    try:
        loss.backward()
    except torch.utils.checkpoint.CheckpointError:
        return  # torch noticed the recompute differs
    assert not torch.allclose(x.grad, reference, atol=1e-4)


def test_teacher_with_full_fine_tuning_runs_the_reference_copy(tiny_dirs):
    from drpo_diffusers.testing import tiny_generator

    generator = tiny_generator("sdxl", tiny_dirs["sdxl"], lora=False)
    with torch.no_grad():
        for parameter in generator.unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # trained away from the base
    x, context = _teacher_inputs(generator)
    features, grad = _input_grad(build("teacher-unet", blocks=BLOCKS), x, context)
    reference = _base_copy_grad(tiny_dirs["sdxl"], build("teacher-unet", blocks=BLOCKS), x, context)
    torch.testing.assert_close(grad, reference[1], atol=1e-6, rtol=1e-6)
    assert not generator._reference_unet.is_gradient_checkpointing  # as it was
    assert all(p.grad is None for p in generator.unet.parameters())  # the trained UNet took no part


def test_teacher_noise_is_derived_from_each_rows_noise(tiny_dirs):
    space = build("teacher-unet", blocks=BLOCKS)
    generator = TinyGenerator()
    x = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    xi = space.feature_noise(x, FeatureContext(["a", "b", "c"], noise, generator))
    # the same noise (a candidate and its reference sample, in any batch) gets the same xi; other noise another
    again = space.feature_noise(x[[2, 0]] + 1.0, FeatureContext(["z", "y"], noise[[2, 0]], generator))
    assert torch.equal(again, xi[[2, 0]]) and not torch.allclose(xi[0], xi[1])
    assert abs(float(xi.std()) - 1) < 0.1
    salted = build("teacher-unet", blocks=BLOCKS, seed=1).feature_noise(x, FeatureContext(["a"] * 3, noise, generator))
    assert not torch.allclose(salted, xi)
    # rows without noise: their prompt and values decide, deterministically
    plain = space.feature_noise(x, FeatureContext(["a", "b", "c"], None, generator))
    other = space.feature_noise(x, FeatureContext(["a", "b", "d"], None, generator))
    assert torch.equal(plain, space.feature_noise(x, FeatureContext(["a", "b", "c"], None, generator)))
    assert torch.equal(plain[:2], other[:2]) and not torch.allclose(plain[2], other[2])


def test_teacher_stops_after_its_last_block_and_names_missing_ones(tiny_dirs):
    from drpo_diffusers.testing import tiny_generator

    generator = tiny_generator("sd", tiny_dirs["sd"])
    x, context = _teacher_inputs(generator)
    ran = []
    for name in ("up_blocks.0", "up_blocks.1", "conv_out"):
        dict(generator.unet.named_modules())[name].register_forward_hook(lambda *a, name=name: ran.append(name))
    features = build("teacher-unet", blocks=["mid_block", "up_blocks.0"]).features(x, context)
    assert ran == ["up_blocks.0"] and list(features) == ["mid_block", "up_blocks.0"]
    # mid_block: 8 channels at 8x8, pooled 4x4 -> 2x2; up_blocks.0: 8 channels upsampled to 16x16 -> 4x4
    assert features["mid_block"].shape == (2, 1, 8 * 2 * 2) and features["up_blocks.0"].shape == (2, 1, 8 * 4 * 4)
    with pytest.raises(PluginError, match=r"teacher-unet: the UNet has no module 'down_blocks\.2' \(its blocks: "
                                          r"down_blocks\.0, down_blocks\.1, up_blocks\.0, up_blocks\.1, mid_block\)"):
        build("teacher-unet").features(x, context)
    with pytest.raises(PluginError, match="teacher-unet needs a generator with a frozen base UNet"):
        build("teacher-unet", blocks=BLOCKS).features(x, FeatureContext(context.prompts, None, TinyGenerator()))


# -- recommendations -----------------------------------------------------------------------------------


def _resolve(generator: str, features: str | None = None, **extra):
    flags = {"generator": generator, "rankers": "brightness", **({"features": features} if features else {})}
    return resolve_config(flags=flags, assignments=["prompts.path=p.txt"], registry=REGISTRY, **extra)


def test_teacher_unet_brings_the_papers_anchor_weights_for_sdxl_turbo_only():
    resolved = _resolve("sdxl-turbo", "teacher-unet")
    cfg = resolved.config.model_dump()
    for key, value in TEACHER_SDXL.items():
        section, name = key.split(".")
        assert cfg[section][name] == value, key
        assert resolved.origins[key] == "feature teacher-unet with sdxl-turbo", key
    # over the generator's own 3000s: the pair is more specific
    assert any(c.key == "drift.negative_weight" and c.origin == "feature teacher-unet with sdxl-turbo"
               for c in resolved.conflicts)
    sd = _resolve("sd-turbo", "teacher-unet")
    assert sd.config.drift.negative_weight == 3000.0 and sd.config.drift.ref_lambda == 0.2
    with pytest.raises(ConfigError, match=r"features: 'teacher-unet' needs sd-unet from the generator, which 'shapes' "
                                          r"does not give"):
        _resolve("shapes", "teacher-unet")


def test_the_paper_presets_set_the_official_switches_and_say_so():
    sd = _resolve("sd-turbo:paper")
    assert sd.config.generator.options["one_step"] == "official"
    assert sd.origins["generator.one_step"] == "generator sd-turbo:paper"
    assert sd.origins["train.lr"] == "generator sd-turbo"  # the generator's own settings keep their origin
    plain = _resolve("sd-turbo")
    assert "one_step" not in plain.config.generator.options
    changed = {k for k, v in sd.to_dict().items() if plain.to_dict()[k] != v}
    assert changed == {"generator"}

    sdxl = _resolve("sdxl-turbo:paper")
    assert (sdxl.config.features.name, sdxl.origins["features.name"]) == ("pixel-mae", "generator sdxl-turbo:paper")
    assert (sdxl.config.features.options["masking"], sdxl.origins["features.masking"]) == (
        "official", "feature pixel-mae with sdxl-turbo:paper")
    assert _resolve("sdxl-turbo", "pixel-mae").config.features.options == {}  # masking off without the preset
    teacher = _resolve("sdxl-turbo:paper", "teacher-unet")  # the teacher recipe: its anchor weights, no masking key
    assert teacher.config.drift.ref_negative_weight == 5000.0 and teacher.config.features.options == {}
    with pytest.raises(ConfigError, match="unknown variant 'fast' of generator 'sd-turbo': choose one of paper"):
        _resolve("sd-turbo:fast")


def test_config_show_lists_what_the_preset_changed(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from drpo_cli.main import app
    from drpo_core import registry as module

    monkeypatch.setattr(module, "_default", REGISTRY)
    (tmp_path / "p.txt").write_text("a cat\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["config", "show", "--generator", "sdxl-turbo:paper", "--ranker", "brightness",
                                      "--set", "prompts.path=p.txt"])
    assert result.exit_code == 0, result.output
    assert "generator sdxl-turbo:paper set: features.name" in result.output
    assert "feature pixel-mae with sdxl-turbo:paper set: features.masking" in result.output


# -- through the loop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture, features", [("sdxl", {"name": "teacher-unet", "blocks": BLOCKS}),
                                                    ("sd", {"name": "dinov2", "layers": [2, 4]})])
def test_training_steps_with_a_vision_feature_space(tmp_path, tiny_dirs, tiny_vision_dirs, monkeypatch,
                                                    architecture, features):
    from drpo_core import registry as module

    monkeypatch.setattr(module, "_default", REGISTRY)
    if features["name"] == "dinov2":
        features = {**features, "model": str(tiny_vision_dirs["dinov2"])}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\na cat\n")
    config = {
        "generator": {"name": {"sd": "sd-turbo", "sdxl": "sdxl-turbo"}[architecture], "resolution": 32,
                      "model": str(tiny_dirs[architecture]), "lora_rank": 4, "decode_chunk": 2},
        "rankers": ["brightness"], "features": features,
        "selection": {"candidates": 4, "positives": 1, "negatives": 1},
        "train": {"steps": 2, "lr": 1e-2, "mixed_precision": "no", "candidate_chunk": 2},
        "prompts": {"path": str(prompts), "eval_count": 1}, "eval": {"seeds": "0"},
        "log": {"progress": False}, "output_dir": str(tmp_path / "run"),
    }
    trainer = Trainer(resolve_config(base=config, registry=REGISTRY), registry=REGISTRY)
    before = {k: v.clone() for k, v in trainer.generator.trainable_state_dict().items()}
    trainer.train()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss_pref"])) for m in metrics)
    after = trainer.generator.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.generator._adapters_on()
