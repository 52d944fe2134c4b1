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
