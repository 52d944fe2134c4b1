"""Every accepted option does something: its effect read back, or it is refused in one line where this run
would ignore it (the audit of the run schema and the built-in plugins' options)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drpo_core.config import resolve_config
from drpo_core.errors import ConfigError, PluginError
from drpo_core.metrics import StepTimer, read_metrics
from drpo_core.trainer import Trainer
from tests.conftest import make_registry
from tests.test_trainer import _BinaryPlugin, tiny_config


def resolve(config: dict, *plugins, assignments=()):
    return resolve_config(base=config, base_origin="recipe.yaml", assignments=list(assignments),
                          registry=make_registry(*plugins))


# -- the loop's options ------------------------------------------------------------------------------------------


def test_schedule_warmup_keep_last_grid_prompts_and_sync_timing_take_effect(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, train={"steps": 6, "lr": 0.1, "warmup_steps": 2, "schedule": "cosine"},
                         checkpoint={"every": 1, "keep_last": 2}, eval={"grid_prompts": 0},
                         log={"sync_timing_every": 4})
    registry = make_registry()
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    synced = []
    monkeypatch.setattr(StepTimer, "start_step", lambda self, sync=False: synced.append(sync))
    trainer.train()
    assert synced == [True, False, False, False, True, False]  # CUDA is synchronised for timing every 4th step
    # metrics.jsonl gives the rate each step's update used: warmup 0.05, 0.1, then a cosine over the 4 left
    lrs = [m["lr"] for m in read_metrics(trainer.run_dir / "metrics.jsonl")]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.0853553, 0.05, 0.0146447], abs=1e-6)
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == [
        "latest", "step-000005", "step-000006"]
    assert not list(trainer.run_dir.glob("grid-*.png"))


def test_the_optimizer_gets_betas_eps_and_weight_decay(tmp_path):
    config = tiny_config(tmp_path, train={"lr": 0.02, "betas": [0.5, 0.6], "eps": 1e-3, "weight_decay": 0.3})
    registry = make_registry()
    group = Trainer(resolve_config(base=config, registry=registry), registry=registry).optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.02, (0.5, 0.6), 1e-3, 0.3)


# -- settings this run would ignore ---------------------------------------------------------------------------------

GRADED, BINARY = {}, {"rankers": ["bright-enough"]}


@pytest.mark.parametrize(("sections", "assignment", "message"), [
    (GRADED, "selection.rollout_rounds=2", "it is for binary rankers only"),
    (GRADED, "selection.fresh_anchors=true", "it is for binary rankers only"),
    (GRADED, "selection.positive_memory=4", "it is for binary rankers only"),
    (BINARY, "selection.combine=rank", "binary rankers combine by product"),
    (BINARY, "rankers.0.weight=2", "binary rankers combine by product"),
    ({"source": {"kind": "offline", "path": "pairs.jsonl"}}, "selection.shuffle_scores=true",
     "source.kind offline takes its anchors from chosen/rejected pairs, not from ranking"),
    ({"source": {"kind": "data"}}, "selection.combine=rank",
     "source.kind data takes its anchors from real images, not from ranking"),
    ({"eval": {"rankers": ["tiny-brightness"]}}, "eval.rankers.0.weight=2",
     "evaluation reports each ranker's own mean"),
    (GRADED, "eval.early_stopping_patience=2", "it counts the evaluations every eval.every steps, and eval.every is 0"),
])
def test_a_setting_this_run_ignores_is_refused_in_one_line(tmp_path, sections, assignment, message):
    key, _, value = assignment.partition("=")
    with pytest.raises(ConfigError) as error:
        resolve(tiny_config(tmp_path, **sections), _BinaryPlugin(), assignments=[assignment])
    text = str(error.value)
    assert text.startswith(f"{key}: ") and f"would change nothing: {message} ({key} from --set; remove it)" in text
    assert "\n" not in text


@pytest.mark.parametrize(("sections", "assignment"), [
    (GRADED, "selection.combine=rank"),
    (GRADED, "rankers.0.weight=2"),
    (BINARY, "selection.rollout_rounds=2"),
    (BINARY, "selection.positive_memory=4"),
    (GRADED, "selection.rollout_rounds=4"),  # the default value is harmless anywhere
    ({"prompts": {"eval_count": 0}}, "prompts.eval_count=3"),
    ({"prompts": {"eval_path": "held-out.txt"}}, "prompts.eval_count=3"),  # a subset of the eval file
    ({"eval": {"every": 2}}, "eval.early_stopping_patience=2"),
])
def test_the_same_settings_where_they_apply_are_accepted(tmp_path, sections, assignment):
    resolve(tiny_config(tmp_path, **sections), _BinaryPlugin(), assignments=[assignment])


def test_a_components_recommendation_is_never_refused(tmp_path):
    from drpo_core import hookimpl

    class Recommends:
        @hookimpl
        def drpo_register_rankers(self, register):  # recommends a held-out count
            from drpo_core.testing import BrightnessRanker

            register("splitter", lambda o, c: BrightnessRanker(), defaults={"prompts.eval_count": 3})

    config = tiny_config(tmp_path, rankers=["splitter"], prompts={"eval_path": "held-out.txt"})
    del config["prompts"]["eval_count"]
    assert resolve(config, Recommends()).config.prompts.eval_count == 3


def test_shapes_weights_with_a_random_init_and_latent_stride_without_its_key_are_refused(tmp_path):
    import drpo_latent
    import drpo_shapes

    shapes = {**tiny_config(tmp_path), "generator": {"name": "shapes", "init": "random", "weights": "base.safetensors"},
              "features": "shapes", "rankers": ["shapes:counting"]}
    with pytest.raises(ConfigError, match=r"^recipe.yaml: generator.init: random ignores the weights option"):
        resolve(shapes, drpo_shapes)
    latent = {**tiny_config(tmp_path), "features": {"name": "latent", "stride": 2}}
    with pytest.raises(ConfigError, match=r"^recipe.yaml: features.stride: it strides the raw `latent` key only"):
        resolve(latent, drpo_latent)
    resolve({**latent, "features": {"name": "latent", "stride": 2, "keys": ["latent"]}}, drpo_latent)


@pytest.mark.parametrize("encoder", [True, False])
def test_shapes_feature_exclude_prefixes_must_match_a_key(tmp_path, encoder):
    import drpo_shapes
    from drpo_core.interfaces import FeatureContext
    from drpo_shapes.features import ShapesFeatures

    images = torch.rand(2, 3, 32, 32)
    keys = ShapesFeatures(encoder=encoder).features(images, FeatureContext(["a", "b"], None, None))
    assert sorted(keys) == sorted(drpo_shapes.feature_keys(encoder))

    def features(**options):
        return {**tiny_config(tmp_path, prompts={"eval_count": 8}), "generator": "shapes",
                "rankers": ["shapes:counting"], "features": {"name": "shapes", "encoder": encoder, **options}}

    resolve(features(exclude=["edge", "cnn", "patch4@0,"]), drpo_shapes)
    with pytest.raises(ConfigError, match=r"^recipe.yaml: features.exclude: 'cnm' matches no key \(keys: patch8"):
        resolve(features(exclude=["edge", "cnm"]), drpo_shapes)
    if not encoder:
        with pytest.raises(ConfigError, match=r"features.exclude: 'enc' matches no key"):
            resolve(features(exclude=["enc"]), drpo_shapes)
    with pytest.raises(ConfigError, match=r"features.exclude: it removes the random CNN's keys \(cnn1-3\), so its seed"):
        resolve(features(seed=3, exclude=["cnn"]), drpo_shapes)


# -- the diffusers generator's options --------------------------------------------------------------------------------


@pytest.fixture
def diffusers_registry(monkeypatch):
    from drpo_core import registry as module
    from drpo_core.registry import Registry

    monkeypatch.setattr(module, "_default", Registry().load_entry_points())
    return module._default


@pytest.mark.parametrize("on", [True, False])
def test_train_gradient_checkpointing_turns_the_unets_on_and_off(tmp_path, tiny_dirs, diffusers_registry, on):
    config = {**tiny_config(tmp_path, selection={"candidates": 4, "positives": 1, "negatives": 1},
                            train={"gradient_checkpointing": on, "mixed_precision": "no"}),
              "generator": {"name": "sd-turbo", "model": str(tiny_dirs["sd"]), "resolution": 32, "lora_rank": 4},
              "rankers": ["brightness"], "features": "latent", "kernel": "laplacian"}
    trainer = Trainer(resolve_config(base=config))
    assert trainer.generator.unet.is_gradient_checkpointing is on


def test_the_generators_own_gradient_checkpointing_option_points_to_train(tiny_dirs, diffusers_registry):
    with pytest.raises(ConfigError, match=r"^--set: generator.gradient_checkpointing: set train.gradient_checkpointing instead"):
        resolve_config(base={"generator": {"name": "sd-turbo", "model": str(tiny_dirs["sd"])},
                             "rankers": ["brightness"], "prompts": {"path": "p.txt"}},
                       assignments=["generator.gradient_checkpointing=false"])


def test_variant_loads_the_variant_files(tmp_path, tiny_dirs):
    from drpo_diffusers.testing import tiny_generator

    model = tmp_path / "tiny-sd"
    shutil.copytree(tiny_dirs["sd"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.bias"] += 1.0
    save_file(state, weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    plain = tiny_generator("sd", model).unet.conv_in.bias
    variant = tiny_generator("sd", model, variant="fp16").unet.conv_in.bias
    assert torch.allclose(variant, plain + 1.0)


def test_revision_picks_the_hub_revision_and_is_refused_for_a_local_directory(tmp_path, tiny_dirs, monkeypatch):
    import huggingface_hub.constants

    from drpo_diffusers.testing import tiny_generator

    # a hub cache holding two revisions of "drpo-test/tiny-sd" (offline: nothing is downloaded)
    repo = tmp_path / "hub" / "models--drpo-test--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_dirs["sd"], repo / "snapshots" / commit)
    weights = repo / "snapshots" / ("b" * 40) / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.bias"] += 1.0
    save_file(state, weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    main = tiny_generator("sd", "drpo-test/tiny-sd").unet.conv_in.bias
    v2 = tiny_generator("sd", "drpo-test/tiny-sd", revision="v2").unet.conv_in.bias
    assert torch.allclose(v2, main + 1.0)

    with pytest.raises(PluginError, match=r"revision 'v2': model .* is a local directory, which has no revisions"):
        tiny_generator("sd", Path(tiny_dirs["sd"]), revision="v2")


def test_dtype_vae_slicing_and_tiling_reach_the_pipeline(tiny_dirs):
    from drpo_diffusers.testing import tiny_generator

    plain = tiny_generator("sd", tiny_dirs["sd"])
    tuned = tiny_generator("sd", tiny_dirs["sd"], dtype="bf16", vae_slicing=True, vae_tiling=True)
    assert (plain.unet.dtype, plain.vae.use_slicing, plain.vae.use_tiling) == (torch.float32, False, False)
    assert (tuned.unet.dtype, tuned.vae.use_slicing, tuned.vae.use_tiling) == (torch.bfloat16, True, True)
    sliced = tiny_generator("sd", tiny_dirs["sd"], vae_slicing=True)
    latents = torch.randn(3, *plain.noise_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(sliced.decode(latents), plain.decode(latents), atol=1e-5)
