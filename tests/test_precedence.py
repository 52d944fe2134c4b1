"""Who decides each setting: neutral schema defaults, the components' recommendations and their precedence,
golden resolved configs of the built-in generators, and runs that cannot work failing in resolve."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from drpo_core import hookimpl
from drpo_core.config import PRECEDENCE, RunConfig, _flatten, resolve_config
from drpo_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "resolved"
PROMPTS = "prompts.path=data/pickscore/train.txt"


def resolved_table(resolved) -> dict:
    """{dotted key: [value, origin]} of a resolved config: what a golden file holds."""
    return {key: [value, resolved.origins[key]] for key, value in _flatten(resolved.to_dict()).items()}


# -- neutral schema defaults ----------------------------------------------------------------------


def test_no_schema_default_names_a_component():
    for section in ("generator", "rankers", "features"):
        assert RunConfig.model_fields[section].is_required(), section
    assert RunConfig.model_fields["kernel"].get_default(call_default_factory=True).name == "laplacian"


@pytest.mark.parametrize("generator", ["sd-turbo", "sdxl-turbo"])
def test_the_toy_recipe_does_not_leak_into_a_named_generator(generator, builtin_registry, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    resolved = resolve_config(flags={"generator": generator, "rankers": "brightness"}, assignments=[PROMPTS],
                              registry=builtin_registry)
    cfg, origins = resolved.config, resolved.origins
    recommended = {"sd-turbo": "latent-mae", "sdxl-turbo": "latent"}[generator]  # SD-Turbo: the paper's latent-MAE
    assert cfg.features.name == recommended and origins["features.name"] == f"generator {generator}"
    assert not cfg.train.single_pass and cfg.train.ema_decay is None and cfg.selection.positive_memory == 0
    assert not any(origin == "default recipe" for origin in origins.values())


# -- golden resolved configs (method.md §6.4) ---------------------------------------------------------


PAPER = {  # method.md §6.4, what the components that exist today decide
    "sd-turbo": {"selection.candidates": 24, "train.lr": 1e-4, "train.mixed_precision": "fp16",
                 "drift.aggregation": "sum", "train.steps": 1000},
    "sdxl-turbo": {"selection.candidates": 16, "train.lr": 1e-5, "train.mixed_precision": "bf16",
                   "drift.aggregation": "mean", "train.steps": 5000},
}
BOTH = {"selection.positives": 8, "selection.negatives": 8, "drift.positive_weight": 3000.0,
        "drift.negative_weight": 3000.0, "drift.ref_positive_weight": 3000.0, "drift.ref_negative_weight": 3000.0,
        "drift.ref_lambda": 0.2, "drift.radii": [0.02, 0.05, 0.2], "kernel.name": "laplacian",
        "train.grad_accum": 8, "train.prompts_per_step": 1}


@pytest.mark.parametrize("generator", ["sd-turbo", "sdxl-turbo"])
def test_golden_resolved_config_of_each_generator(generator, builtin_registry, monkeypatch):
    monkeypatch.chdir(REPO)
    resolved = resolve_config(flags={"generator": generator, "rankers": "brightness"}, assignments=[PROMPTS],
                              registry=builtin_registry)
    table = resolved_table(resolved)
    for key, value in {**BOTH, **PAPER[generator]}.items():
        assert table[key] == [value, f"generator {generator}"], key
    golden = GOLDEN / f"{generator}-brightness.json"
    assert table == json.loads(golden.read_text()), (
        f"the resolved config of --generator {generator} changed: if on purpose, rewrite {golden.name}")


# -- precedence between recommendations ---------------------------------------------------------------


class _Recommenders:
    """Components recommending conflicting settings, and a feature space with a pair recommendation."""

    @hookimpl
    def drpo_register_rankers(self, register):
        from drpo_core.testing import BrightnessRanker

        register("likes-big-k", lambda o, c: BrightnessRanker(),
                 defaults={"selection.candidates": 32, "train.lr": 0.5, "prompts.eval_count": 3})
        register("likes-small-k", lambda o, c: BrightnessRanker(),
                 defaults={"selection.candidates": 20, "prompts.eval_count": 5})

    @hookimpl
    def drpo_register_features(self, register):
        from drpo_core.testing import PixelFeatures

        register("paired", lambda o, c: PixelFeatures(), requires=("latents",),
                 defaults={"drift.ref_lambda": 0.3, "train.lr": 0.25},
                 pair_defaults={"tiny": {"drift.ref_lambda": 0.25, "drift.negative_weight": 2000.0}})
        register("needs-unet", lambda o, c: PixelFeatures(), requires=("sd-unet",))

    @hookimpl
    def drpo_register_generators(self, register):
        from drpo_core.testing import TinyGenerator

        register("tiny-recommending", lambda o, c: TinyGenerator(), provides=("latents",),
                 defaults={"selection.candidates": 24, "features.name": "paired"})


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text) + "prompts: {path: prompts.txt}\n")
    return path


def test_the_stated_order_is_pair_generator_features_rankers_kernel():
    assert PRECEDENCE == ("pair", "generator", "features", "rankers", "kernel")


def test_generator_wins_over_rankers_and_the_conflict_is_listed(isolated_registry, tmp_path):
    isolated_registry.register_module(_Recommenders())
    resolved = resolve_config(recipe(tmp_path, """\
        generator: tiny-recommending
        rankers: [likes-big-k, likes-small-k]
        """))
    cfg, origins = resolved.config, resolved.origins
    assert (cfg.selection.candidates, origins["selection.candidates"]) == (24, "generator tiny-recommending")
    # a feature space the generator recommended brings its own recommendations, above the rankers'
    assert (cfg.features.name, origins["features.name"]) == ("paired", "generator tiny-recommending")
    assert (cfg.train.lr, origins["train.lr"]) == (0.25, "feature paired")
    # between rankers, the first listed wins
    assert (cfg.prompts.eval_count, origins["prompts.eval_count"]) == (3, "ranker likes-big-k")
    conflicts = {c.key: c for c in resolved.conflicts}
    assert set(conflicts) == {"selection.candidates", "train.lr", "prompts.eval_count"}
    assert conflicts["selection.candidates"].overruled == (("ranker likes-big-k", 32), ("ranker likes-small-k", 20))
    assert str(conflicts["train.lr"]) == "train.lr: 0.25 from feature paired (over 0.5 from ranker likes-big-k)"


def test_a_pair_recommendation_wins_over_both_components(isolated_registry, tmp_path):
    isolated_registry.register_module(_Recommenders())
    resolved = resolve_config(recipe(tmp_path, """\
        generator: tiny
        rankers: [tiny-brightness]
        features: paired
        """))
    cfg, origins = resolved.config, resolved.origins
    assert (cfg.drift.ref_lambda, origins["drift.ref_lambda"]) == (0.25, "feature paired with tiny")
    assert (cfg.drift.negative_weight, origins["drift.negative_weight"]) == (2000.0, "feature paired with tiny")
    assert [str(c) for c in resolved.conflicts] == [
        "drift.ref_lambda: 0.25 from feature paired with tiny (over 0.3 from feature paired)"]


def test_the_user_wins_over_every_recommendation(isolated_registry, tmp_path):
    isolated_registry.register_module(_Recommenders())
    resolved = resolve_config(recipe(tmp_path, """\
        generator: tiny
        rankers: [tiny-brightness]
        features: paired
        drift: {ref_lambda: 0.1}
        """), assignments=["train.lr=0.01"])
    assert (resolved.config.drift.ref_lambda, resolved.origins["drift.ref_lambda"]) == (0.1, str(tmp_path / "recipe.yaml"))
    assert (resolved.config.train.lr, resolved.origins["train.lr"]) == (0.01, "--set")


def test_config_show_prints_each_conflict_and_its_winner(isolated_registry, tmp_path):
    from typer.testing import CliRunner

    from drpo_cli.main import app

    isolated_registry.register_module(_Recommenders())
    path = recipe(tmp_path, "generator: tiny-recommending\nrankers: [likes-big-k]\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "recommendations that disagreed" in result.output
    assert "selection.candidates: 24 from generator tiny-recommending (over 32 from ranker likes-big-k)" in result.output


# -- runs that cannot work fail in resolve, naming keys and origins -----------------------------------


def test_a_feature_space_the_generator_cannot_feed(isolated_registry, tmp_path):
    isolated_registry.register_module(_Recommenders())
    with pytest.raises(ConfigError) as error:
        resolve_config(recipe(tmp_path, "generator: tiny\nrankers: [tiny-brightness]\nfeatures: needs-unet\n"))
    assert str(error.value) == (
        "features: 'needs-unet' needs sd-unet from the generator, which 'tiny' does not give (it gives latents, "
        f"images) (features.name from {tmp_path / 'recipe.yaml'}, generator.name from {tmp_path / 'recipe.yaml'})")


def test_the_toy_features_with_a_diffusion_generator(builtin_registry, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"features: 'shapes' needs shapes-world from the generator, which "
                                          r"'sdxl-turbo' does not give .*features.name from --features"):
        resolve_config(flags={"generator": "sdxl-turbo", "rankers": "brightness", "features": "shapes"},
                       assignments=[PROMPTS], registry=builtin_registry)


def test_no_prompts_for_an_online_run(builtin_registry):
    with pytest.raises(ConfigError, match=r"^prompts.path: an online run needs training prompts"):
        resolve_config(flags={"generator": "sd-turbo", "rankers": "brightness"}, registry=builtin_registry)


def test_binary_and_graded_rankers_mixed(builtin_registry, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"^rankers: binary rankers .* cannot be mixed with graded ones in one "
                                          r"run \(rankers.0.name from --set, rankers.1.name from --set\)"):
        resolve_config(flags={"generator": "shapes", "features": "shapes"},
                       assignments=["rankers.0.name=shapes:counting", "rankers.1.name=brightness"],
                       registry=builtin_registry)


def test_more_anchors_than_recommended_candidates(builtin_registry, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as error:
        resolve_config(flags={"generator": "sdxl-turbo", "rankers": "brightness"},
                       assignments=[PROMPTS, "selection.positives=9"], registry=builtin_registry)
    assert str(error.value) == ("selection: positives + negatives (9 + 8) exceed candidates (16) (selection.positives "
                                "from --set, selection.negatives from generator sdxl-turbo, selection.candidates "
                                "from generator sdxl-turbo)")


@pytest.mark.parametrize("missing, message", [
    ("generator", "generator: none named: give --generator NAME"),
    ("rankers", "rankers: none named: give --ranker NAME"),
])
def test_a_component_nobody_named(missing, message, isolated_registry, tmp_path):
    text = {"generator": "generator: tiny\n", "rankers": "rankers: [tiny-brightness]\n"}
    path = recipe(tmp_path, "".join(v for k, v in text.items() if k != missing) + "features: tiny-pixels\n")
    with pytest.raises(ConfigError, match=f"^{message}"):
        resolve_config(path)


def test_the_golden_files_are_valid_yaml_free_of_machine_paths():
    for golden in GOLDEN.iterdir():
        text = golden.read_text()
        assert yaml.safe_load(text) and '"/' not in text  # no absolute path: the golden files hold no machine paths


def test_the_readme_config_show_line_works_as_typed(builtin_registry, monkeypatch):
    import shlex

    from typer.testing import CliRunner

    from drpo_cli.main import app
    from drpo_core import registry as registry_module

    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("drpo config show"))
    args = shlex.split(line.split("#")[0])[1:]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(registry_module, "_default", builtin_registry)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "generator sd-turbo" in result.output and "selection.candidates" in result.output
