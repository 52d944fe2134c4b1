"""Run configuration: layering and origins, YAML parsing, and one clear line for each bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drpo_core import hookimpl
from drpo_core.config import RunConfig, parse_yaml, resolve_config
from drpo_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("generator: tiny\nrankers: [tiny-brightness]\nfeatures: tiny-pixels\nkernel: laplacian\n"
              "prompts: {path: prompts.txt}\n")


class _SoftKernelPlugin:
    """A kernel contributing recommended settings."""

    @hookimpl
    def drpo_register_kernels(self, register):
        from drpo_kernels.kernels import laplacian

        register("soft", lambda o, c: laplacian,
                 defaults={"train.lr": 5e-4, "train.steps": 7, "train.warmup_steps": 3})


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a recipe in a temporary working directory and return its (relative) name."""
    monkeypatch.chdir(tmp_path)

    def write(text: str, name: str = "recipe.yaml") -> str:
        Path(name).write_text(textwrap.dedent(text))
        return name

    return write


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_config(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


# -- layering -------------------------------------------------------------------------------------


def test_layers_and_their_origins(isolated_registry, write):
    isolated_registry.register_module(_SoftKernelPlugin())
    recipe = write(COMPONENTS.replace("kernel: laplacian", "kernel: rbf") + "train: {lr: 3e-4, steps: 10, grad_accum: 2}\n")
    resolved = resolve_config(recipe, flags={"kernel": "soft", "output_dir": "runs/x"},
                              assignments=["train.steps=20", "selection.candidates=20"])
    cfg, origins = resolved.config, resolved.origins
    # schema default < component recommended < YAML < flags < --set
    assert (cfg.train.eps, origins["train.eps"]) == (1e-8, "default")
    assert (cfg.train.warmup_steps, origins["train.warmup_steps"]) == (3, "kernel soft")
    assert (cfg.train.lr, origins["train.lr"]) == (3e-4, recipe)
    assert (cfg.train.grad_accum, origins["train.grad_accum"]) == (2, recipe)
    assert (cfg.kernel.name, origins["kernel.name"]) == ("soft", "--kernel")
    assert (cfg.output_dir, origins["output_dir"]) == ("runs/x", "--output-dir")
    assert (cfg.train.steps, origins["train.steps"]) == (20, "--set")
    assert (cfg.selection.candidates, origins["selection.candidates"]) == (20, "--set")


def test_set_wins_over_flags(isolated_registry, write):
    resolved = resolve_config(write(COMPONENTS), flags={"kernel": "rbf"}, assignments=["kernel.name=cosine"])
    assert (resolved.config.kernel.name, resolved.origins["kernel.name"]) == ("cosine", "--set")


def test_a_flag_keeps_the_files_options_for_the_same_component_only(isolated_registry, write):
    recipe = write("generator: {name: tiny, size: 4}\nrankers: [tiny-brightness]\nfeatures: tiny-pixels\n"
                   "kernel: laplacian\nprompts: {path: prompts.txt}\n")
    assert resolve_config(recipe, flags={"generator": "tiny"}).config.generator.options == {"size": 4}
    with pytest.raises(ConfigError, match="unknown generator 'other'"):
        resolve_config(recipe, flags={"generator": "other"})


def test_scientific_notation_is_a_float():
    assert parse_yaml("lr: 3e-4") == {"lr": 3e-4}
    assert parse_yaml("lr: 1E+2\nsteps: 10\nname: e5") == {"lr": 100.0, "steps": 10, "name": "e5"}


def test_lr_from_yaml_and_set_is_a_float(isolated_registry, write):
    recipe = write(COMPONENTS + "train:\n  lr: 3e-4\n")
    assert isinstance(resolve_config(recipe).config.train.lr, float)
    assert resolve_config(recipe, assignments=["train.lr=2e-5"]).config.train.lr == 2e-5


def test_mixed_precision_no_survives_yaml_booleans(isolated_registry, write):
    # YAML 1.1 reads a bare `no` as false: in a file and in --set it must still mean "no"
    recipe = write(COMPONENTS + "train:\n  mixed_precision: no\n")
    assert resolve_config(recipe).config.train.mixed_precision == "no"
    assigned = resolve_config(recipe, assignments=["train.mixed_precision=bf16", "train.mixed_precision=no"])
    assert assigned.config.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        resolve_config(recipe, assignments=["train.mixed_precision=yes"])


def test_several_rankers_with_weights(isolated_registry, write):
    recipe = write("""\
        generator: tiny
        features: tiny-pixels
        kernel: laplacian
        prompts: {path: prompts.txt}
        rankers:
          - {name: tiny-brightness, weight: 2}
          - name: tiny-broken
            weight: 0.5
            mode: raise
        """)
    rankers = resolve_config(recipe).config.rankers
    assert [(r.name, r.weight, r.options) for r in rankers] == [
        ("tiny-brightness", 2.0, {}), ("tiny-broken", 0.5, {"mode": "raise"})]


def test_ranker_flag_replaces_the_list(isolated_registry, write):
    recipe = write(COMPONENTS.replace("[tiny-brightness]", "[tiny-brightness, tiny-broken]"))
    resolved = resolve_config(recipe, flags={"rankers": "tiny-broken"})
    assert [r.name for r in resolved.config.rankers] == ["tiny-broken"]
    assert resolved.origins["rankers.0.name"] == "--ranker"


def test_resolved_yaml_round_trips(isolated_registry, write):
    resolved = resolve_config(write(COMPONENTS + "train: {lr: 3e-4}\n"))
    again = resolve_config(write(resolved.to_yaml(), "again.yaml"))
    assert again.to_dict() == resolved.to_dict()


# -- one clear line per bad input ---------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(isolated_registry, write):
    recipe = write("seed: 1\ntrain:\n  lr: [1e-4\n  steps: 3\n")
    message = error_of(recipe)
    assert message.startswith(f"{recipe}:4: YAML syntax error")


def test_wrong_type_names_key_file_and_line(isolated_registry, write):
    recipe = write(COMPONENTS + "train:\n  steps: 5\n  lr: fast\n")
    message = error_of(recipe)
    assert message.startswith(f"{recipe}:8: train.lr: ")
    assert "valid number" in message and "'fast'" in message


def test_wrong_type_from_set_names_set(isolated_registry, write):
    assert error_of(write(COMPONENTS), assignments=["train.steps=many"]).startswith("--set: train.steps: ")


def test_unknown_key_suggests_the_closest(isolated_registry, write):
    recipe = write(COMPONENTS + "train:\n  lrr: 0.1\n")
    assert error_of(recipe) == f"{recipe}:7: train.lrr: unknown key (did you mean lr?)"


def test_unknown_top_level_key_suggests_the_closest(isolated_registry, write):
    recipe = write(COMPONENTS + "selction: {candidates: 8}\n")
    assert error_of(recipe) == f"{recipe}:6: selction: unknown key (did you mean selection?)"


def test_component_section_without_name(isolated_registry, write):
    recipe = write("generator: {size: 4}\nrankers: [tiny-brightness]\nfeatures: tiny-pixels\nkernel: laplacian\n")
    assert error_of(recipe) == f"{recipe}:1: generator.name: required field is missing"


def test_offline_source_without_path(isolated_registry, write):
    recipe = write(COMPONENTS + "source:\n  kind: offline\n")
    message = error_of(recipe)
    assert message.startswith(f"{recipe}:6: source")
    assert "source.path is required when source.kind is offline" in message


def test_negative_radius(isolated_registry, write):
    recipe = write(COMPONENTS + "drift:\n  radii: [0.05, -0.2]\n")
    assert error_of(recipe) == f"{recipe}:7: drift.radii: every radius must be positive, got [0.05, -0.2]"


def test_more_anchors_than_candidates(isolated_registry, write):
    recipe = write(COMPONENTS + "selection: {candidates: 8, positives: 5, negatives: 4}\n")
    assert error_of(recipe) == ("selection: positives + negatives (5 + 4) exceed candidates (8) (selection.positives "
                                f"from {recipe}, selection.negatives from {recipe}, selection.candidates from {recipe})")


def test_out_of_range_number_names_the_key(isolated_registry, write):
    recipe = write(COMPONENTS.replace("[tiny-brightness]", "[{name: tiny-brightness, weight: 0}]"))
    message = error_of(recipe)
    assert message.startswith(f"{recipe}:2: rankers.0.weight: ") and "greater than 0" in message


def test_missing_config_file(isolated_registry, write):
    assert error_of("nowhere.yaml") == "config file not found: nowhere.yaml"


def test_unknown_plugin_name_suggests_closest_and_list_plugins(isolated_registry, write):
    message = error_of(write(COMPONENTS.replace("generator: tiny", "generator: tinny")))
    assert message == ("generator: unknown generator 'tinny': did you mean tiny? "
                       "run `drpo list-plugins` to see the installed ones")


def test_unknown_eval_ranker_names_its_section(isolated_registry, write):
    message = error_of(write(COMPONENTS + "eval: {rankers: [tiny-brightnes]}\n"))
    assert message.startswith("eval.rankers.0: unknown ranker 'tiny-brightnes': did you mean tiny-brightness, tiny-broken?")


def test_bad_variant_names_the_section(isolated_registry, write):
    message = error_of(write(COMPONENTS.replace("kernel: laplacian", "kernel: rbf:wide")))
    assert message == "kernel: kernel 'rbf' takes no variant (got 'rbf:wide')"


def test_plugin_options_are_validated_naming_the_plugin_key(isolated_registry, write):
    recipe = write(COMPONENTS.replace("generator: tiny", "generator: {name: tiny, sizee: 3}"))
    assert error_of(recipe) == f"{recipe}: generator.sizee: unknown key (did you mean size?)"


def test_plugin_option_wrong_value_names_the_ranker_index(isolated_registry, write):
    recipe = write(COMPONENTS.replace("[tiny-brightness]", "[tiny-brightness, {name: tiny-broken, mode: 7}]"))
    assert error_of(recipe).startswith(f"{recipe}: rankers.1.mode: Input should be 'nan', 'wrong-count' or 'raise'")


def test_top_level_must_be_a_mapping(isolated_registry, write):
    recipe = write("- generator\n- tiny\n")
    assert error_of(recipe) == f"{recipe}: the top level must be a mapping of sections, got list"


def test_set_without_equals(isolated_registry, write):
    assert error_of(write(COMPONENTS), assignments=["train.lr"]) == "--set expects dotted.key=value, got 'train.lr'"


# -- every recipe in the repository ----------------------------------------------------------------

_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "runs", "node_modules", "__pycache__", ".nox"}


def repository_yaml_files() -> list[Path]:
    files = []
    for path in sorted([*REPO.rglob("*.yaml"), *REPO.rglob("*.yml")]):
        parts = path.relative_to(REPO).parts
        if any(p in _SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        files.append(path)
    return files


def test_the_default_recipe_is_among_the_checked_files():
    assert REPO / "cli" / "drpo_cli" / "default.yaml" in repository_yaml_files()


@pytest.mark.parametrize("path", repository_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_yaml_validates(path, builtin_registry):
    resolved = resolve_config(path, registry=builtin_registry)
    assert isinstance(resolved.config, RunConfig)


def test_validating_recipes_imports_no_heavy_library(tmp_path):
    recipe = tmp_path / "turbo.yaml"
    recipe.write_text("generator: {name: sd-turbo, lora_rank: 8, resolution: 512}\nrankers: [brightness]\n"
                      "features: latent\nkernel: laplacian\nprompts: {path: prompts.txt}\n")
    probe = (
        "import json, sys\nfrom pathlib import Path\nfrom drpo_core.config import resolve_config\n"
        f"for path in [Path({str(recipe)!r}), *map(Path, {[str(p) for p in repository_yaml_files()]!r})]:\n"
        "    resolve_config(path)\n"
        "print(json.dumps([m for m in ('diffusers', 'transformers', 'torch') if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_recommended_settings_of_a_builtin_generator_are_shown_with_their_origin(builtin_registry, write):
    recipe = write("generator: sd-turbo\nrankers: [brightness]\nkernel: laplacian\ntrain: {lr: 2e-5}\n"
                   "prompts: {path: prompts.txt}\n")
    resolved = resolve_config(recipe, registry=builtin_registry)
    assert (resolved.config.features.name, resolved.origins["features.name"]) == ("latent-mae", "generator sd-turbo")
    assert (resolved.config.selection.candidates, resolved.origins["selection.candidates"]) == (
        24, "generator sd-turbo")
    assert (resolved.config.train.lr, resolved.origins["train.lr"]) == (2e-5, recipe)


def test_single_pass_with_candidate_chunks(isolated_registry, write):
    recipe = write(COMPONENTS + "train: {single_pass: true, candidate_chunk: 4}\n")
    message = error_of(recipe)
    assert message.startswith(f"{recipe}:6: train")
    assert "train.single_pass keeps every candidate's graph" in message
