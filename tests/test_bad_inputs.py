"""A battery of bad inputs (issue 17): each ends in one line on stderr naming the problem, exit code 2,
no traceback, and leaves every file that was there byte-identical.

``CASES`` is the table: (id, class, command line, files to create, expected substring of the line).
Files are created in a fresh working directory; a value is text, bytes, or a setup function's name
from ``SETUPS`` (a tiny run copied in, tampered checkpoints, images). The battery runs in-process
with Typer's runner (fast); ``test_one_per_class_in_a_subprocess`` runs one case of each class
through the real ``drpo`` console script. ``python tests/test_bad_inputs.py --markdown`` prints the
table as Markdown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DRPO, TINY_RUN

TINY = "rankers: tiny-brightness\n" + TINY_RUN  # train: stays on line 7, which the file:line cases name
# the toy world with the built-in plugins alone (usable from the console script), made fast
TOY = """\
generator: shapes
rankers: shapes:counting
features: shapes
selection: {candidates: 4, positives: 1, negatives: 1}
train: {steps: 1, prompts_per_step: 1, device: cpu}
eval: {seeds: [0], grid_prompts: 0}
log: {progress: false}
"""
PROMPTS = "a warm sunset\na cold lake\na red apple\n"
FAKE_RUN = {"run/config.yaml": "seed: 0\n", "run/run.json": '{"start_time": "then"}\n',
            "run/metrics.jsonl": '{"step": 1}\n'}
# the default recipe's run directory
DEFAULT_RUN = {f"runs/toy-counting/{name}": text for name, text in
               [("config.yaml", "seed: 0\n"), ("run.json", "{}\n"), ("metrics.jsonl", '{"step": 1}\n')]}
LONG_PROMPT = "two green bars " * 400
TRAIN = ["train", "--set", "train.steps=1"]  # the embedded default (toy world), one step
RESUME = ["train", "--resume", "latest", "--output-dir", "run"]


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # the class of issue 17 it belongs to
    args: list[str]
    expect: str  # a substring of the one line, after "Error: "
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: str | None = None  # a name in SETUPS
    script: bool = False  # built-in plugins only: also run through the console script, in a subprocess
    run: str = "tiny"  # the run a checkpoint setup tampers with: "tiny" (the fakes) or "toy" (built-ins)


def toy(*lines: str) -> str:
    return TOY + "".join(line + "\n" for line in lines)


def tiny(*lines: str) -> str:
    return TINY + "".join(line + "\n" for line in lines)


CASES = [
    # -- files that are not what they claim --------------------------------------------------------------
    Case("config-not-utf8", "files", ["train", "-c", "bad.yaml"], "bad.yaml:2: not UTF-8",
         {"bad.yaml": b"seed: 1\ntrain: {steps: \xff}\n"}, script=True),
    Case("validate-not-utf8", "files", ["config", "validate", "bad.yaml"], "bad.yaml:1: not UTF-8",
         {"bad.yaml": b"\xfe\xff\x00s\x00e\x00e\x00d"}),
    Case("config-is-png", "files", ["config", "show", "-c", "a.png"], "a.png:1: not UTF-8",
         {"a.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}),
    Case("config-is-directory", "files", ["train", "-c", "conf"], "config file is not a file: conf",
         {"conf/x": ""}),
    Case("config-missing", "files", ["train", "-c", "nope.yaml"], "config file not found: nope.yaml"),
    Case("config-yaml-syntax", "files", ["train", "-c", "bad.yaml"], "bad.yaml:3: YAML syntax error",
         {"bad.yaml": "seed: 1\ntrain: {steps: 1\n"}),
    Case("config-top-level-list", "files", ["train", "-c", "bad.yaml"], "the top level must be a mapping",
         {"bad.yaml": "- generator\n- rankers\n"}),
    Case("weights-not-safetensors", "files", ["train", "-c", "w.yaml"], "junk.bin: not a safetensors file",
         {"w.yaml": toy("generator: {name: shapes, weights: junk.bin}").replace("generator: shapes\n", ""),
          "junk.bin": "these are not weights\n"}, script=True),
    Case("weights-empty", "files", ["train", "-c", "w.yaml"], "empty.safetensors: not a safetensors file",
         {"w.yaml": toy("generator: {name: shapes, weights: empty.safetensors}").replace("generator: shapes\n", ""),
          "empty.safetensors": b""}),
    Case("weights-a-directory", "files", ["train", "-c", "w.yaml"], "shapes generator weights wdir is not a file",
         {"w.yaml": toy("generator: {name: shapes, weights: wdir}").replace("generator: shapes\n", ""),
          "wdir/x": ""}),
    Case("weights-wrong-shape", "files", ["train", "-c", "w.yaml"], "1 resized tensors, e.g. block16.conv1.bias is (33,)",
         {"w.yaml": toy("generator: {name: shapes, weights: resized.safetensors}").replace("generator: shapes\n", "")},
         setup="shapes_weights_resized"),
    Case("weights-wrong-keys", "files", ["train", "-c", "w.yaml"], "shapes generator weights do not fit the network: 1 missing",
         {"w.yaml": toy("generator: {name: shapes, weights: other.safetensors}").replace("generator: shapes\n", "")},
         setup="shapes_weights_other"),
    Case("checkpoint-tensor-wrong-shape", "files", RESUME, "trainable.safetensors: tiny generator weights do not fit the network: 0 missing, 0 unexpected, 1 resized", setup="ckpt_resized"),
    Case("checkpoint-tensor-missing", "files", RESUME, "do not fit the network: 1 missing", setup="ckpt_missing_tensor"),
    Case("checkpoint-tensor-extra", "files", RESUME, "do not fit the network: 0 missing, 1 unexpected", setup="ckpt_extra_tensor"),
    Case("checkpoint-ema-wrong-shape", "files", RESUME, "EMA tensor ema.0 has shape (7,)",
         setup="ckpt_ema_resized"),
    Case("state-json-missing-prompts", "files", RESUME, "state.json: missing 'prompts'", setup="state_no_prompts"),
    Case("state-json-missing-step", "files", RESUME, "state.json: expected an object with 'step'",
         setup="state_no_step"),
    Case("state-json-step-not-int", "files", RESUME, "state.json: 'step' must be a non-negative integer",
         setup="state_step_text"),
    Case("state-json-not-json", "files", RESUME, "state.json: not valid JSON", setup="state_not_json"),
    Case("state-json-prompts-damaged", "files", RESUME, "prompt stream state", setup="state_prompts_damaged"),
    Case("toy-checkpoint-tensor-wrong-shape", "files", RESUME, "shapes generator weights do not fit the network",
         setup="ckpt_resized", script=True, run="toy"),
    Case("state-json-missing-metrics-lines", "files", RESUME, "state.json: missing 'metrics_lines'",
         setup="state_no_metrics_lines"),
    Case("optimizer-state-empty", "files", RESUME, "optimizer.pt does not fit", setup="ckpt_optimizer_empty"),
    Case("optimizer-state-garbage", "files", RESUME, "optimizer.pt: cannot read", setup="ckpt_optimizer_garbage"),
    Case("rng-state-damaged", "files", RESUME, "rng.pt", setup="ckpt_rng_damaged"),
    Case("manifest-bad-json", "files", ["eval", "m.jsonl", "--ranker", "brightness"], "m.jsonl:2: bad JSON",
         {"m.jsonl": '{"prompt": "a", "file": "a.png"}\n{"prompt": "b", "file": \n'}, setup="images", script=True),
    Case("manifest-row-without-file", "files", ["eval", "m.jsonl", "--ranker", "brightness"],
         'm.jsonl:1: missing "file" key', {"m.jsonl": '{"prompt": "a", "image": "a.png"}\n'}),
    Case("manifest-file-not-a-string", "files", ["eval", "m.jsonl", "--ranker", "brightness"],
         'm.jsonl:1: "file" must be a string', {"m.jsonl": '{"prompt": "a", "file": 5}\n'}),
    Case("manifest-image-missing", "files", ["eval", "m.jsonl", "--ranker", "brightness"],
         "m.jsonl:2: image not found", {"m.jsonl": '{"prompt": "a", "file": "a.png"}\n{"prompt": "b", "file": "b.png"}\n'},
         setup="images"),
    Case("manifest-image-unreadable", "files", ["eval", "m.jsonl", "--ranker", "brightness"], "cannot read image",
         {"m.jsonl": '{"prompt": "a", "file": "a.png"}\n{"prompt": "b", "file": "notes.png"}\n',
          "notes.png": "not an image\n"}, setup="images"),
    Case("manifest-empty", "files", ["eval", "m.jsonl", "--ranker", "brightness"], "m.jsonl: no images listed",
         {"m.jsonl": "\n"}),
    Case("manifest-missing", "files", ["eval", "m.jsonl", "--ranker", "brightness"], "manifest not found: m.jsonl"),
    Case("manifest-a-directory", "files", ["eval", "m.jsonl", "--ranker", "brightness"],
         "manifest is not a file: m.jsonl", {"m.jsonl/x": ""}),
    Case("manifest-not-utf8", "files", ["eval", "m.jsonl", "--ranker", "brightness"], "m.jsonl:1: not UTF-8",
         {"m.jsonl": b'{"prompt": "\xff", "file": "a.png"}\n'}),
    # -- paths -----------------------------------------------------------------------------------------------
    Case("output-dir-is-a-file", "paths", [*TRAIN, "--output-dir", "out.txt"], "output directory out.txt is a file",
         {"out.txt": "keep me\n"}, script=True),
    Case("output-dir-inside-a-file", "paths", [*TRAIN, "--output-dir", "out.txt/run"],
         "output directory out.txt/run: out.txt is a file", {"out.txt": "keep me\n"}),
    Case("output-dir-empty", "paths", [*TRAIN, "--output-dir", ""], "--output-dir: output_dir: must name a directory"),
    Case("output-dir-blank-set", "paths", [*TRAIN, "--set", "output_dir=' '"], "--set: output_dir: must name a directory"),
    Case("output-dir-not-writable", "paths", [*TRAIN, "--output-dir", "/proc/drpo-run"],
         "cannot create output directory /proc/drpo-run"),
    Case("existing-run", "paths", ["train", "-c", "t.yaml", "--output-dir", "run"], "run already holds a run",
         {"t.yaml": TINY, "prompts.txt": PROMPTS, **FAKE_RUN}),
    Case("existing-default-run", "paths", [*TRAIN], "runs/toy-counting already holds a run", DEFAULT_RUN),
    Case("existing-run-invalid-config", "paths", [*TRAIN, "--set", "train.lr=fast", "--output-dir", "run"],
         "--set: train.lr: Input should be a valid number", FAKE_RUN),
    Case("existing-run-dry-run", "paths", [*TRAIN, "--dry-run", "--output-dir", "run"], "run already holds a run",
         FAKE_RUN),
    Case("prompts-a-directory", "paths", [*TRAIN, "--set", "prompts.path=pdir"], "prompt path is not a file: pdir",
         {"pdir/a.txt": PROMPTS}),
    Case("prompts-missing", "paths", [*TRAIN, "--set", "prompts.path=nope.txt"], "prompt file not found"),
    Case("prompts-empty", "paths", [*TRAIN, "--set", "prompts.path=empty.txt"], "empty.txt: no prompts found",
         {"empty.txt": ""}),
    Case("prompts-only-comments", "paths", [*TRAIN, "--set", "prompts.path=c.txt"], "c.txt: no prompts found",
         {"c.txt": "# one\n\n# two\n"}),
    Case("prompts-unknown-suffix", "paths", [*TRAIN, "--set", "prompts.path=p.csv"], "cannot tell the prompt format",
         {"p.csv": "two red bars\n"}),
    Case("prompts-path-empty", "paths", [*TRAIN, "--set", "prompts.path=''"], "prompts.path: must name a file"),
    Case("eval-prompts-missing", "paths", [*TRAIN, "--set", "prompts.eval_path=nope.txt"], "prompt file not found"),
    Case("prompts-none-left-to-train", "paths", ["train", "-c", "t.yaml"], "leaves none to train on",
         {"t.yaml": TINY, "prompts.txt": "only one\n"}),
    # (the toy recipe's memory of correct samples is for ranked anchors: set back to its default first)
    Case("offline-pairs-missing", "paths", [*TRAIN, "--set", "source.kind=offline", "--set", "source.path=p.jsonl",
                                            "--set", "selection.positive_memory=0"],
         "source.path: offline pairs file not found"),
    Case("sample-prompts-directory", "paths", ["sample", "--prompts", "pdir", "--out", "o"],
         "prompt path is not a file: pdir", {"pdir/a.txt": PROMPTS}),
    Case("sample-out-is-a-file", "paths", ["sample", "--prompts", "p.txt", "--out", "o.txt"],
         "--out o.txt is a file", {"p.txt": "two red bars\n", "o.txt": "keep\n"}),
    Case("resume-missing-dir", "paths", ["train", "--resume", "nope"], "--resume nope: not a run or checkpoint"),
    Case("resume-not-a-run", "paths", ["train", "--resume", "latest", "--output-dir", "d"], "d holds no config.yaml",
         {"d/x.txt": ""}),
    # -- --set into lists and sections of the wrong type -----------------------------------------------------
    Case("set-list-index-past-end", "set", [*TRAIN, "--set", "rankers.3.weight=2"],
         "--set rankers.3.weight: rankers has 1 entries", script=True),
    Case("set-list-by-name", "set", [*TRAIN, "--set", "rankers.first.weight=2"],
         "--set rankers.first.weight: rankers is a list"),
    Case("set-into-a-value", "set", [*TRAIN, "--set", "train.lr.max=2"], "--set train.lr.max: train.lr is not a section"),
    Case("set-section-to-a-number", "set", [*TRAIN, "--set", "train=3"], "--set: train: Input should be"),
    Case("set-rankers-to-a-number", "set", ["train", "-c", "t.yaml", "--set", "rankers=5"],
         "--set: rankers: Input should be a valid list", {"t.yaml": TINY, "prompts.txt": PROMPTS}),
    Case("set-without-value", "set", [*TRAIN, "--set", "train.lr"], "--set expects dotted.key=value"),
    Case("set-without-key", "set", [*TRAIN, "--set", "=3"], "--set expects dotted.key=value"),
    Case("set-bad-yaml", "set", [*TRAIN, "--set", "train.betas=[0.9"], "--set train.betas: YAML syntax error"),
    Case("set-new-eval-ranker-without-name", "set", [*TRAIN, "--set", "eval.rankers.0.weight=2"],
         "--set: eval.rankers.0.name: required field is missing"),
    Case("yaml-rankers-a-number", "set", ["train", "-c", "r.yaml"], "r.yaml:1: rankers: Input should be a valid list",
         {"r.yaml": "rankers: 5\ngenerator: tiny\nfeatures: tiny-pixels\n"}),
    Case("yaml-train-a-number", "set", ["train", "-c", "r.yaml"], "r.yaml:5: train: Input should be a valid dictionary",
         {"r.yaml": "generator: tiny\nrankers: tiny-brightness\nfeatures: tiny-pixels\nkernel: tiny-laplacian\ntrain: 3\n"}),
    Case("yaml-rankers-numbers", "set", ["train", "-c", "r.yaml"], "rankers.0: Input should be",
         {"r.yaml": "rankers: [1, 2]\ngenerator: tiny\nfeatures: tiny-pixels\n"}),
    Case("yaml-generator-a-list", "set", ["train", "-c", "r.yaml"], "generator: Input should be",
         {"r.yaml": "rankers: tiny-brightness\ngenerator: [tiny, shapes]\nfeatures: tiny-pixels\n"}),
    Case("yaml-then-set-into-number", "set", ["train", "-c", "r.yaml", "--set", "train.steps=1"],
         "--set train.steps: train is not a section (it holds 3)",
         {"r.yaml": "generator: tiny\nrankers: tiny-brightness\nfeatures: tiny-pixels\ntrain: 3\n"}),
    # -- values the schema let through -----------------------------------------------------------------------
    Case("lr-inf", "values", [*TRAIN, "--set", "train.lr=.inf"], "--set: train.lr: Input should be a finite number",
         script=True),
    Case("ref-lambda-inf", "values", [*TRAIN, "--set", "drift.ref_lambda=.inf"], "drift.ref_lambda: Input should be a finite"),
    Case("lr-nan", "values", [*TRAIN, "--set", "train.lr=.nan"], "train.lr: Input should be a finite number"),
    Case("radius-inf", "values", [*TRAIN, "--set", "drift.radii=[0.1, .inf]"], "--set: drift.radii.1: Input should be a finite"),
    Case("betas-nan", "values", [*TRAIN, "--set", "train.betas=[.nan, 0.9]"], "--set: train.betas.0: Input should be a finite"),
    Case("max-grad-norm-inf", "values", [*TRAIN, "--set", "train.max_grad_norm=.inf"], "train.max_grad_norm: Input should be a finite"),
    Case("ranker-weight-inf", "values", [*TRAIN, "--set", "rankers.0.weight=.inf"], "--set: rankers.0.weight: Input should be a finite"),
    Case("ema-decay-nan", "values", [*TRAIN, "--set", "train.ema_decay=.nan"], "--set: train.ema_decay: Input should be a finite"),
    Case("key-weight-inf", "values", [*TRAIN, "--set", "drift.key_weights={enc: .inf}"],
         "--set: drift.key_weights.enc: Input should be a finite"),
    Case("yaml-lr-inf", "values", ["train", "-c", "t.yaml"], "t.yaml:7: train.lr: Input should be a finite number",
         {"t.yaml": TINY.replace("device: cpu}", "device: cpu, lr: .inf}"), "prompts.txt": PROMPTS}),
    Case("plugin-option-inf", "values", ["train", "-c", "s.yaml", "--set", "generator.lora_alpha=.inf"],
         "--set: generator.lora_alpha: must be a finite number", {"s.yaml": "generator: sd-turbo\nrankers: brightness\nprompts: {path: prompts.txt}\n", "prompts.txt": PROMPTS}),
    Case("seed-beyond-64-bits", "values", [*TRAIN, "--set", "seed=18446744073709551616"], "--set: seed: Input should be less than or equal to 4294967295"),
    Case("seed-beyond-32-bits", "values", [*TRAIN, "--set", "seed=4294967296"], "seed: Input should be less than or equal to 4294967295"),
    Case("seed-negative", "values", [*TRAIN, "--set", "seed=-1"], "--set: seed: Input should be greater than or equal to 0"),
    Case("steps-true", "values", [*TRAIN, "--set", "train.steps=true"], "--set: train.steps: Input should be a valid integer"),
    Case("candidates-true", "values", [*TRAIN, "--set", "selection.candidates=true"], "selection.candidates: Input should be a valid integer"),
    Case("checkpoint-every-yes", "values", [*TRAIN, "--set", "checkpoint.every=yes"], "checkpoint.every: Input should be a valid integer"),
    Case("steps-float", "values", [*TRAIN, "--set", "train.steps=1.5"], "train.steps: Input should be a valid integer"),
    Case("eval-seeds-bool", "values", [*TRAIN, "--set", "eval.seeds=[true]"], "--set: eval.seeds.0: Input should be a valid integer"),
    Case("lr-true", "values", [*TRAIN, "--set", "train.lr=true"], "train.lr: Input should be a valid number"),
    Case("plugin-option-bool-as-int", "values", ["train", "-c", "t.yaml", "--set", "generator.size=true"],
         "generator.size: expected a number, got a boolean", {"t.yaml": TINY, "prompts.txt": PROMPTS}),
    Case("key-weight-negative", "values", [*TRAIN, "--set", "drift.key_weights={enc: -1}"],
         "--set: drift.key_weights: must be >= 0 (0 turns a key off), got enc: -1.0"),
    Case("key-weights-unmatched", "values", ["train", "-c", "t.yaml", "--set", "drift.key_weights={cellz: 2, mean: 1}"],
         "drift.key_weights: 'cellz' matches no feature key", {"t.yaml": TINY, "prompts.txt": PROMPTS}),
    Case("key-weights-unmatched-toy", "values", [*TRAIN, "--set", "drift.key_weights={pixels: 2}"],
         "drift.key_weights: 'pixels' matches no feature key of 'shapes'"),
    # -- devices ---------------------------------------------------------------------------------------------
    Case("device-cuda-without-gpu", "devices", [*TRAIN, "--set", "train.device=cuda"], "train.device: cuda",
         script=True),
    Case("device-unknown", "devices", [*TRAIN, "--set", "train.device=tpu"], "train.device: unknown device 'tpu'"),
    Case("device-cuda-index-too-high", "devices", [*TRAIN, "--set", "train.device=cuda:7"], "train.device: cuda:7"),
    Case("device-cuda-bad-index", "devices", [*TRAIN, "--set", "train.device=cuda:x"], "unknown device 'cuda:x'"),
    Case("device-mps-on-linux", "devices", [*TRAIN, "--set", "train.device=mps"], "train.device: mps is not available"),
    Case("sample-device-unknown", "devices", ["sample", "--prompts", "p.txt", "--out", "o", "--device", "tpu"],
         "--device: unknown device 'tpu'", {"p.txt": "two red bars\n"}),
    # -- features and prompts a component cannot take --------------------------------------------------------
    Case("exclude-every-key", "features", ["train", "-c", "x.yaml"], "features: exclude removes every feature key",
         {"x.yaml": toy("").replace("features: shapes", "features: {name: shapes, exclude: [patch, pool, color, edge, cnn, enc]}")},
         script=True),
    Case("exclude-empty-prefix", "features", ["train", "-c", "x.yaml"], "features: exclude removes every feature key",
         {"x.yaml": toy("").replace("features: shapes", "features: {name: shapes, exclude: ['']}")}),
    Case("prompt-outside-grammar", "features", [*TRAIN, "--set", "prompts.path=p.txt"],
         "'a purple elephant' is not a shapes prompt", {"p.txt": "two red bars\na purple elephant\nthree blue circles\n"},
         script=True),
    Case("prompt-outside-grammar-long", "features", [*TRAIN, "--set", "prompts.path=p.txt"], "is not a shapes prompt",
         {"p.txt": f"two red bars\n{LONG_PROMPT}\nthree blue circles\n"}),
    Case("eval-prompt-outside-grammar", "features", [*TRAIN, "--set", "prompts.eval_path=e.txt"], "'one red square'",
         {"e.txt": "one red square\n"}),
    Case("sample-prompt-outside-grammar", "features", ["sample", "--prompts", "p.txt", "--out", "o"],
         "'a purple elephant' is not a shapes prompt", {"p.txt": "a purple elephant\n"}),
    # -- config validate says what train says ----------------------------------------------------------------
    Case("validate-mixed-rankers", "validate", ["config", "validate", "m.yaml"], "binary rankers",
         {"m.yaml": TOY.replace("rankers: shapes:counting", "rankers: [shapes:counting, brightness]")}),
    Case("validate-duplicated-section", "validate", ["config", "validate", "d.yaml"],
         "d.yaml:8: duplicated key 'selection' (first at line 4)", {"d.yaml": TOY + "selection: {candidates: 8}\n"},
         script=True),
    Case("validate-duplicated-nested-key", "validate", ["config", "validate", "d.yaml"],
         "d.yaml:8: duplicated key 'steps' (first at line 6)",
         {"d.yaml": TOY.replace("train: {steps: 1, prompts_per_step: 1, device: cpu}",
                                "train:\n  steps: 1\n  prompts_per_step: 1\n  steps: 2")}),
    Case("train-duplicated-section", "validate", ["train", "-c", "d.yaml"], "d.yaml:8: duplicated key 'train' (first at line 5)",
         {"d.yaml": TOY + "train: {steps: 2}\n"}),
    Case("set-duplicated-key", "validate", [*TRAIN, "--set", "train={steps: 1, steps: 2}"],
         "--set train: duplicated key 'steps'"),
    Case("validate-prompts-missing", "validate", ["config", "validate", "v.yaml"], "prompt file not found",
         {"v.yaml": TOY + "prompts: {path: nope.txt}\n"}),
    Case("validate-device", "validate", ["config", "validate", "v.yaml"], "train.device: cuda:7",
         {"v.yaml": TOY.replace("device: cpu", "device: cuda:7")}),
    Case("validate-set", "validate", ["config", "validate", "--set", "train.lr=.inf"], "--set: train.lr"),
    Case("validate-output-dir-a-file", "validate", ["config", "validate", "--output-dir", "out.txt"],
         "output directory out.txt is a file", {"out.txt": "keep me\n"}),
    Case("validate-exclude-every-key", "validate", ["config", "validate", "x.yaml"],
         "features: exclude removes every feature key",
         {"x.yaml": toy("").replace("features: shapes", "features: {name: shapes, exclude: ['']}")}),
    # -- origins ---------------------------------------------------------------------------------------------
    Case("origin-set-without-recipe", "origins", ["train", "--set", "train.lr=fast"],
         "--set: train.lr: Input should be a valid number", script=True),
    Case("origin-set-seed", "origins", ["train", "--set", "seed=abc"], "--set: seed: Input should be a valid integer"),
    Case("origin-set-feasibility", "origins", ["train", "--set", "selection.candidates=4"],
         "selection.candidates from --set"),
    Case("origin-set-section", "origins", ["train", "--set", "selection={candidates: x}"],
         "--set: selection.candidates: Input should be a valid integer"),
    Case("origin-set-plugin-option", "origins", ["train", "--set", "features.encoder=maybe"],
         "--set: features.encoder: Input should be a valid boolean"),
    Case("origin-file-line", "origins", ["train", "-c", "t.yaml"], "t.yaml:7: train.lr: Input should be a valid number",
         {"t.yaml": TINY.replace("device: cpu}", "device: cpu, lr: fast}"), "prompts.txt": PROMPTS}),
    Case("origin-set-rule-across-keys", "origins", ["train", "--set", "train.candidate_chunk=2"],
         "(train.single_pass from default recipe, train.candidate_chunk from --set)"),
    Case("origin-set-list-entry", "origins", ["train", "--set", "log.trackers=[tensorboard, x]"],
         "--set: log.trackers.1: Input should be 'tensorboard' or 'wandb'"),
    Case("origin-flag", "origins", ["train", "--generator", "tinyy", "-c", "t.yaml"], "generator: unknown generator 'tinyy'",
         {"t.yaml": TINY, "prompts.txt": PROMPTS}),
    Case("origin-resume-set", "origins", RESUME + ["--set", "train.lr=1"], "--set train.lr: --resume accepts only",
         setup="run"),
    Case("origin-sample-set", "origins", ["sample", "--prompts", "p.txt", "--out", "o", "--set", "generator.init=maybe"],
         "generator.init: Input should be", {"p.txt": "two red bars\n"}),
]


# -- setups: files that need code to make -----------------------------------------------------------------


def _checkpoint(cwd: Path) -> Path:
    return cwd / "run" / "checkpoints" / (cwd / "run" / "checkpoints" / "latest").read_text().strip()


def _edit_trainable(cwd: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = _checkpoint(cwd) / "trainable.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_state(cwd: Path, edit: Callable[[dict], None]) -> None:
    path = _checkpoint(cwd) / "state.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _save_in_checkpoint(cwd: Path, name: str, obj: object) -> None:
    import torch

    torch.save(obj, _checkpoint(cwd) / name)


def _shapes_weights(cwd: Path, name: str, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import save_file

    from drpo_shapes.generator import ShapesUNet

    tensors = {k: v.contiguous() for k, v in ShapesUNet().state_dict().items()}
    edit(tensors)
    save_file(tensors, str(cwd / name))


def _images(cwd: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(cwd / "a.png")


def _weight_keys(tensors: dict) -> list[str]:
    return sorted(key for key in tensors if not key.startswith(("ema.", "memory.")))


def _resize_first(tensors: dict) -> None:
    key = _weight_keys(tensors)[0]
    tensors[key] = tensors[key].new_zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])


SETUPS: dict[str, Callable[[Path], None]] = {
    "run": lambda cwd: None,  # the run alone
    "ckpt_resized": lambda cwd: _edit_trainable(cwd, _resize_first),
    "ckpt_missing_tensor": lambda cwd: _edit_trainable(cwd, lambda t: t.pop(_weight_keys(t)[0])),
    "ckpt_extra_tensor": lambda cwd: _edit_trainable(cwd, lambda t: t.update({"extra.weight": t["ema.0"].clone()})),
    "ckpt_ema_resized": lambda cwd: _edit_trainable(cwd, lambda t: t.update({"ema.0": t["ema.0"].new_zeros(7)})),
    "state_no_prompts": lambda cwd: _edit_state(cwd, lambda m: m["state"].pop("prompts")),
    "state_no_step": lambda cwd: _edit_state(cwd, lambda m: m.pop("step")),
    "state_no_metrics_lines": lambda cwd: _edit_state(cwd, lambda m: m["state"].pop("metrics_lines")),
    "state_step_text": lambda cwd: _edit_state(cwd, lambda m: m.update(step="one")),
    "state_not_json": lambda cwd: (_checkpoint(cwd) / "state.json").write_text("{step: 1"),
    "state_prompts_damaged": lambda cwd: _edit_state(cwd, lambda m: m["state"]["prompts"].pop("position")),
    "ckpt_optimizer_empty": lambda cwd: _save_in_checkpoint(cwd, "optimizer.pt", {}),
    "ckpt_optimizer_garbage": lambda cwd: (_checkpoint(cwd) / "optimizer.pt").write_bytes(b"garbage"),
    "ckpt_rng_damaged": lambda cwd: _save_in_checkpoint(cwd, "rng.pt", {"python": [3]}),
    "shapes_weights_resized": lambda cwd: _shapes_weights(cwd, "resized.safetensors", _resize_first),
    "shapes_weights_other": lambda cwd: _shapes_weights(cwd, "other.safetensors", lambda t: t.pop(sorted(t)[0])),
    "images": _images,
}
RUN_SETUPS = {name for name in SETUPS if name.startswith(("ckpt_", "state_")) or name == "run"}


def prepare(case: Case, cwd: Path, runs: dict[str, Path]) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    if case.setup in RUN_SETUPS:
        shutil.copytree(runs[case.run], cwd / "run")
    for name, content in case.files.items():
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        SETUPS[case.setup](cwd)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root``: its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes_and_builtins():
    """The built-in plugins and the tiny fakes, as the process-wide registry."""
    from drpo_core import registry as registry_module
    from drpo_core.testing import fakes_plugin

    previous = registry_module._default
    registry = registry_module.Registry().load_entry_points()
    registry.register_module(fakes_plugin)
    registry_module.set_registry(registry)
    yield registry
    registry_module.set_registry(previous)


def _finished_run(root: Path, recipe: str, *extra: str) -> Path:
    """A finished one-step run of ``recipe`` in ``root/run``, to tamper with."""
    from typer.testing import CliRunner

    from drpo_cli.main import app

    (root / "t.yaml").write_text(recipe)
    (root / "prompts.txt").write_text(PROMPTS)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["train", "-c", "t.yaml", "--output-dir", "run", *extra])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fakes_and_builtins) -> dict[str, Path]:
    """Finished runs to tamper with: ``tiny`` (the fakes, with an EMA) at once, ``toy`` when first asked."""
    class Runs(dict):
        def __missing__(self, name: str) -> Path:
            assert name == "toy"
            self[name] = _finished_run(tmp_path_factory.mktemp("toy-run"), TOY)
            return self[name]

    return Runs(tiny=_finished_run(tmp_path_factory.mktemp("tiny-run"), TINY, "--set", "train.ema_decay=0.5"))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


# -- the battery ------------------------------------------------------------------------------------------


def test_the_battery_is_big_and_distinct():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({(tuple(case.args), tuple(case.files.items()), case.setup, case.run) for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, tmp_path, monkeypatch, fakes_and_builtins, runs):
    from rich.console import Console
    from typer.testing import CliRunner

    import drpo_cli.main as cli_main

    if case.id == "output-dir-not-writable" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(cli_main, "console", Console(width=200, no_color=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the device cases assume no GPU
    monkeypatch.chdir(tmp_path)
    prepare(case, tmp_path, runs)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli_main.app, case.args)
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    line = one_error_line(result.stderr)
    assert case.expect in line
    assert len(line) < 500, "long input is shortened"
    assert snapshot(tmp_path) == before, "a refused command changes nothing"


# -- one case of each class through the real console script ----------------------------------------------

SCRIPT_CASES = [case for case in CASES if case.script]


def test_every_class_runs_through_the_console_script():
    assert {case.kind for case in SCRIPT_CASES} == {case.kind for case in CASES}


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[case.id for case in SCRIPT_CASES])
def test_through_the_console_script(case, tmp_path, runs):
    drpo = DRPO
    assert drpo, "the drpo console script is not installed next to this Python"
    prepare(case, tmp_path, runs)
    before = snapshot(tmp_path)
    env = {**os.environ, "DRPO_LOAD_PLUGINS": "", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "COLUMNS": "200"}
    result = subprocess.run([drpo, *case.args], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 2, result.stderr[-3000:]
    assert case.expect in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_a_refused_run_leaves_the_existing_run_byte_identical(tmp_path):
    """The data-loss case through the console script: an existing run's files stay as they were, whether
    the new run's config is valid or not."""
    drpo = DRPO
    env = {**os.environ, "DRPO_LOAD_PLUGINS": "", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, text in FAKE_RUN.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    for extra in ([], ["--set", "train.lr=fast"]):
        result = subprocess.run([drpo, *TRAIN, "--output-dir", "run", *extra], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        one_error_line(result.stderr)
        assert snapshot(tmp_path) == before


# -- the rules behind some of the lines ------------------------------------------------------------------


def test_duplicated_keys_are_refused_at_any_level_but_merge_keys_still_work():
    from drpo_core.config import parse_yaml
    from drpo_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^r.yaml:1: duplicated key 'a' \(first at line 1\)$"):
        parse_yaml("{a: 1, a: 2}", "r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml:4: duplicated key 'x' \(first at line 3\)$"):
        parse_yaml("rankers:\n  - name: a\n    x: 1\n    x: 2\n", "r.yaml")
    assert parse_yaml("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n")["run"] == {"x": 3, "y": 2}


def test_the_toy_feature_keys_known_without_a_model_are_the_ones_it_gives():
    import torch

    from drpo_core.interfaces import FeatureContext
    from drpo_shapes import feature_keys
    from drpo_shapes.features import ShapesFeatures

    for encoder in (True, False):
        given = ShapesFeatures(encoder=encoder).features(torch.rand(1, 3, 32, 32), FeatureContext(["x"], None, None))
        assert sorted(given) == sorted(feature_keys(encoder))


def test_a_prompt_outside_the_grammar_is_shortened():
    from drpo_shapes.world import PromptError, check_prompts

    with pytest.raises(PromptError) as caught:
        check_prompts(["two red bars", LONG_PROMPT, "one blue pillar", "purple"])
    assert str(caught.value).startswith("'two green bars two green bars two green bars two green bars two ")
    assert "... (6000 chars)' is not a shapes prompt (and 1 more of 4 prompts): expected" in str(caught.value)
    assert len(str(caught.value)) < 250 and isinstance(caught.value, ValueError)


def test_validate_notes_a_run_in_the_output_dir_and_accepts_a_runs_own_config(tmp_path, monkeypatch, runs):
    """A run's saved config.yaml validates (it reruns from anywhere); validate notes that train would not
    start a new run in that folder."""
    from typer.testing import CliRunner

    from drpo_cli.main import app

    monkeypatch.chdir(tmp_path)
    shutil.copytree(runs["tiny"], "run")
    result = CliRunner().invoke(app, ["config", "validate", "run/config.yaml", "--output-dir", "run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "run/config.yaml with the flags: valid",  # --output-dir
        "note: `drpo train` would not start a new run there: run already holds a run (config.yaml, run.json, "
        "metrics.jsonl, checkpoints): continue it with `drpo train --resume latest --output-dir run` (add --set "
        "train.steps=N to run longer), or choose another --output-dir"]


def markdown() -> str:
    rows = ["| # | class | input | the one line (contains) |", "|---|---|---|---|"]
    for number, case in enumerate(CASES, start=1):
        files = ", ".join(case.files) + (f" ({case.setup})" if case.setup else "")
        command = " ".join(f"'{a}'" if (not a or " " in a) else a for a in case.args)
        shown = f"`drpo {command}`" + (f" with {files}" if files else "")
        rows.append(f"| {number} | {case.kind} | {shown.replace('|', '&#124;')} | "
                    f"`Error: ...{case.expect.replace('|', '&#124;')}...` |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown(), end="")
