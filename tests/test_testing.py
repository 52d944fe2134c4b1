"""``drpo_core.testing`` on its own, as a plugin author's tests use it: no built-in plugin imported, and
a training loop that runs on the fakes alone; ``drpo_core`` imports no plugin package at all."""

import json
import subprocess
import sys

import pytest
import torch

from drpo_core import testing
from drpo_core.config import resolve_config
from drpo_core.errors import ConfigError
from drpo_core.metrics import read_metrics
from drpo_core.trainer import Trainer
from drpo_kernels.kernels import laplacian
from tests.conftest import make_registry
from tests.test_trainer import tiny_config


def test_drpo_core_and_its_testing_module_import_no_plugin_package():
    probe = ("import importlib, json, pkgutil, sys\nimport drpo_core\n"
             "for module in pkgutil.iter_modules(drpo_core.__path__):\n"
             "    importlib.import_module('drpo_core.' + module.name)\n"
             "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules if name.startswith('drpo')})))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["drpo_core"]


def test_tiny_laplacian_is_the_builtin_laplacian_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    dist = torch.rand(3, 5, 7, generator=generator) * 4
    scale, x, targets = torch.rand(3, 1, 1, generator=generator) + 0.5, torch.zeros(3, 5, 2), torch.zeros(3, 7, 2)
    for radius in (0.02, 0.05, 0.2):
        assert torch.equal(testing.tiny_laplacian(dist, scale, radius, x, targets),
                           laplacian(dist, scale, radius, x, targets))


def test_the_fakes_alone_run_the_loop_as_the_builtin_kernel_does(tmp_path):
    registry = testing.make_registry()
    assert registry.names("kernel") == ["tiny-laplacian"]
    config = tiny_config(tmp_path / "fakes", kernel="tiny-laplacian", train={"steps": 4})
    fakes = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    summary = fakes.train()
    assert summary["score/tiny-brightness"] > summary["base_score/tiny-brightness"] + 0.02

    builtin_config = tiny_config(tmp_path / "builtin", train={"steps": 4})  # the default kernel, laplacian
    builtin = Trainer(resolve_config(base=builtin_config, registry=make_registry()), registry=make_registry())
    assert builtin.train() == summary
    without_time = [[{k: v for k, v in m.items() if k != "time"} for m in read_metrics(t.run_dir / "metrics.jsonl")]
                    for t in (fakes, builtin)]
    assert without_time[0] == without_time[1]


def test_without_the_builtins_the_default_kernel_is_unknown(tmp_path):
    with pytest.raises(ConfigError, match="^kernel: unknown kernel 'laplacian': did you mean tiny-laplacian?"):
        resolve_config(base=tiny_config(tmp_path), registry=testing.make_registry())


# -- the feature-space contract -------------------------------------------------------------------------


class _Space(testing.FeatureSpace):
    """PixelFeatures with one contract rule broken on request."""

    def __init__(self, broken: str = "", generator: testing.TinyGenerator | None = None):
        self.broken, self.generator = broken, generator
        self.linear = torch.nn.Linear(3, 3)
        self.linear.requires_grad_(broken == "own-weights")

    def features(self, x, context):
        if self.broken == "flat":
            return {"mean": x.mean(dim=(2, 3))}
        if self.broken == "detached":
            x = x.detach()
        mean = x.mean(dim=(2, 3))
        if self.broken in ("own-weights", "generator-weights"):
            mean = self.linear(mean)
        if self.broken == "generator-weights":  # the generator's own trainable net (a shared LoRA UNet)
            mean = mean + self.generator.net.mix(x).mean(dim=(2, 3))
        if self.broken == "random":
            mean = mean + torch.rand_like(mean)
        return {"mean": mean[:, None, :]}


def _contract_case(generator=None):
    generator = generator or testing.TinyGenerator()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, testing.FeatureContext(["a", "b"], None, generator)


@pytest.mark.parametrize("broken, message", [
    ("flat", r"'mean' must be a \(B, T, D\) tensor"),
    ("detached", "'mean' does not depend on the input"),
    ("own-weights", "neither the input nor the generator's trainable parameters"),
    ("random", "'mean' differs between two calls on the same input"),
])
def test_check_feature_space_names_the_broken_rule(broken, message):
    x, context = _contract_case()
    with pytest.raises(AssertionError, match=message):
        testing.check_feature_space(_Space(broken), x, context)


def test_check_feature_space_accepts_the_generators_weights_and_checks_the_declared_input():
    generator = testing.TinyGenerator()
    x, context = _contract_case(generator)
    features = testing.check_feature_space(_Space("generator-weights", generator), x, context, requires=("latents",))
    assert features["mean"].shape == (2, 1, 3)
    testing.check_feature_space(testing.PixelFeatures(), x, context)
    with pytest.raises(AssertionError, match=r"takes latents but its registration requires \('images',\)"):
        testing.check_feature_space(testing.PixelFeatures(), x, context, requires=("images",))


def test_feature_space_cases_come_from_the_registry_and_ask_for_missing_builders(request):
    def build(request):
        return (testing.PixelFeatures(), *_contract_case())

    cases = testing.feature_space_cases({"tiny-pixels": build, "other[a]": build, "other[b]": build},
                                        ["tiny-pixels", "other", "unbuilt"])
    assert [(c.id, c.values[0], c.values[1] is build) for c in cases] == [
        ("tiny-pixels", "tiny-pixels", True), ("other[a]", "other", True), ("other[b]", "other", True),
        ("unbuilt", "unbuilt", False)]
    registry = testing.make_registry()
    testing.check_feature_space_case(request, "tiny-pixels", build, registry)
    with pytest.raises(pytest.fail.Exception, match="feature space 'unbuilt' is registered but has no contract case"):
        testing.check_feature_space_case(request, "unbuilt", None, registry)
