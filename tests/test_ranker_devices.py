"""A ranker's own ``device`` (``ModelRunOptions.device``, the README's ``{name: pickscore, device: "cuda:1"}``) is
checked against the machine before anything loads, by every command that builds a ranker: one line, exit 2, the
key named. Torch's own "not compiled with CUDA" assertion, where a plugin picks a device itself, is one line too.

The machine is made CPU-only (``available_devices``), so the lines are the same on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drpo_cli.main import app
from drpo_core import devices as devices_module
from drpo_core import hookimpl
from drpo_core.context import BuildContext, ModelRunOptions
from drpo_core.errors import ComponentError
from drpo_core.registry import NO_CUDA
from drpo_core.testing import BrightnessRanker
from tests.conftest import TINY_RUN

NO_GPU = "is not available: torch sees no CUDA GPU on this machine (available: cpu)"


def _build_on_device(options, context):
    """As a real ranker does: its weights go to its device (torch refuses CUDA in a CPU-only build)."""
    if (options.device or context.device).startswith("cuda"):
        raise AssertionError(NO_CUDA)
    return BrightnessRanker()


class _DevicePlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("on-device", _build_on_device, options=ModelRunOptions)


@pytest.fixture
def cpu_only(isolated_registry, monkeypatch, tmp_path):
    isolated_registry.register_module(_DevicePlugin())
    monkeypatch.setattr(devices_module, "available_devices", lambda: ["cpu"])
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a warm sunset\na cold lake\na red apple\n")
    return isolated_registry


@pytest.mark.parametrize(("args", "recipe", "line"), [
    (["config", "validate", "r.yaml"], 'rankers: [{name: on-device, device: "cuda:1"}]',
     f"r.yaml: rankers.0.device: cuda:1 {NO_GPU}"),
    (["train", "-c", "r.yaml", "--output-dir", "run"], 'rankers: [{name: on-device, device: "cuda:1"}]',
     f"r.yaml: rankers.0.device: cuda:1 {NO_GPU}"),
    (["train", "-c", "r.yaml", "--output-dir", "run", "--set", "eval.rankers=[{name: on-device, device: cuda}]"],
     "rankers: on-device", f"--set: eval.rankers.0.device: cuda {NO_GPU}"),
    (["eval", "--generator", "tiny", "--ranker", "on-device", "--set", "rankers.on-device.device=cuda:1",
      "--prompts", "prompts.txt", "--device", "cpu"], None, f"rankers.on-device.device: cuda:1 {NO_GPU}"),
    (["doctor", "on-device", "--set", "rankers.on-device.device=cuda", "--device", "cpu"], None,
     f"rankers.on-device.device: cuda {NO_GPU}"),
    (["serve-ranker", "on-device", "--device", "cuda"], None, f"--device: cuda {NO_GPU}"),
    (["serve-ranker", "on-device", "--device", "cpu", "--set", "device=cuda:1"], None,
     f"--set device: cuda:1 {NO_GPU}"),
])
def test_a_ranker_device_the_machine_lacks_is_one_line_and_exit_2(cpu_only, args, recipe, line):
    if recipe is not None:
        Path("r.yaml").write_text(TINY_RUN + recipe + "\n")
    result = CliRunner().invoke(app, args)
    assert (result.exit_code, result.output.strip()) == (2, f"Error: {line}"), result.output
    assert not Path("run").exists()  # refused before the run directory was made


def test_a_ranker_device_the_machine_has_is_valid(cpu_only):
    Path("r.yaml").write_text(TINY_RUN + "rankers: [{name: on-device, device: cpu}]\n")
    result = CliRunner().invoke(app, ["config", "validate", "r.yaml"])
    assert result.exit_code == 0, result.output


def test_torch_refusing_cuda_while_building_is_one_line_naming_the_ranker(cpu_only):
    with pytest.raises(ComponentError) as error:  # the run's device, not the ranker's option: not preflighted
        cpu_only.build("ranker", "on-device", {}, BuildContext(device="cuda"), "rankers.0")
    assert str(error.value) == ("rankers.0: ranker 'on-device' asked for a CUDA device, but this torch was built "
                                "without CUDA (set its device to cpu)")


def test_other_assertion_errors_of_a_factory_are_not_relabelled(isolated_registry):
    class _Plugin:
        @hookimpl
        def drpo_register_rankers(self, register):
            register("asserts", lambda options, context: _assert_shape(torch.ones(1)))

    isolated_registry.register_module(_Plugin())
    with pytest.raises(AssertionError, match="^expected 2 values, got 1$"):
        isolated_registry.build("ranker", "asserts", {}, BuildContext())


def _assert_shape(values):
    if len(values) != 2:  # an AssertionError of the plugin's own (pytest rewrites a test module's asserts)
        raise AssertionError(f"expected 2 values, got {len(values)}")
