"""Run configuration: a typed schema, YAML loading, layered overrides and their origins.

Layers, lowest first: neutral schema defaults < the chosen components' recommended settings < YAML
file (or the embedded default recipe) < CLI flags < ``--set key=value``. No schema default names a
component: the generator, the rankers and the feature space come from the user or, for the feature
space and kernel, from a component's recommendation.

When recommendations disagree, the more specific one wins (``PRECEDENCE``): a recommendation for a
pair of components (a feature space's settings for one generator), then the generator's, the feature
space's, the rankers' in list order, the kernel's. ``ResolvedConfig.conflicts`` lists each
disagreement and its winner; ``drpo config show`` prints them.

Each component section (``generator``, ``rankers[i]``, ``features``, ``kernel``) carries ``name``
plus the component's own options, validated once here by the plugin's model, so errors name the
plugin's keys. A run that cannot work (no prompts for an online source, a feature space whose input
the generator cannot give, more anchors than candidates, ...) fails here, before any model loads.
Every error is a :class:`ConfigError` with one line naming the keys and where their values came from.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.functional_serializers import model_serializer

from drpo_core.context import LOCAL_PATH
from drpo_core.errors import ConfigError, DrpoError
from drpo_core.prompts import EVAL_SPLIT_COUNT, EVAL_SUBSET_COUNT, prompt_format
from drpo_core.registry import ComponentSpec, Registry, get_registry, split_reference
from drpo_core.validation import describe, validate_model

#: every section is strict: a YAML ``true`` is not the number 1, ``"5"`` is not 5 (a float still takes
#: an int); and every float is finite: ``.inf`` and ``.nan`` are refused wherever a number goes
_RULES = ConfigDict(strict=True, allow_inf_nan=False)
#: what ``train.device`` may name (whether this machine has it is checked before a run: drpo_core.preflight)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, **_RULES)


def _a_name(value: str | None, what: str) -> str | None:
    """A path that was given must name something: an empty string would mean the working directory."""
    if value is not None and not value.strip():
        raise ValueError(f"must name a {what} (got {value!r})")
    return value


class ComponentConfig(BaseModel):
    """``name`` (``plugin:variant`` allowed) plus the component's own options."""

    model_config = ConfigDict(extra="allow", **_RULES)
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RankerConfig(ComponentConfig):
    weight: float = Field(1.0, gt=0)
    timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="seconds one call of the ranker may take: the ranker is then built and called in a "
                    "worker process, which is ended when a call passes it (none: in this process, no limit)")

    @model_serializer(mode="wrap")
    def _without_unset_timeout(self, handler: Any) -> Any:
        data = handler(self)  # a ranker section reads as written: no `timeout: null` in saved configs
        if isinstance(data, dict) and data.get("timeout") is None:
            data.pop("timeout", None)
        return data


def ranker_timeout(value: Any, where: str) -> float | None:
    """A ranker section's ``timeout`` given outside a recipe (``drpo eval`` and ``drpo doctor`` take it as
    ``--set rankers.NAME.timeout=SECONDS``), checked as a recipe's is; errors name ``where.timeout``."""
    section = validate_model(RankerConfig, {"name": where, "timeout": value}, where)
    return typing.cast(RankerConfig, section).timeout


class SelectionConfig(_Strict):
    candidates: int = Field(16, ge=2, description="K: candidates sampled per prompt")
    positives: int = Field(8, ge=1, description="M+: top-ranked candidates used as positive anchors")
    negatives: int = Field(8, ge=1, description="M-: bottom-ranked candidates used as negative anchors")
    combine: Literal["zscore", "rank"] = "zscore"
    rollout_rounds: int = Field(4, ge=1, description="binary rankers: rounds of K no-grad candidates")
    fresh_anchors: bool = Field(False, description="binary rankers: draw the anchors from extra no-grad "
                                                   "rounds, not from copies of the trainable candidates")
    positive_memory: int = Field(0, ge=0, description="binary rankers: correct samples remembered per prompt, "
                                                      "which top up the positives when a rollout finds too few")
    shuffle_scores: bool = Field(False, description="ablation control: permute each prompt's scores at "
                                                    "random, so the ranking carries no information")



class DriftConfig(_Strict):
    radii: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.2], min_length=1)
    positive_weight: float = Field(3000.0, gt=0)
    negative_weight: float = Field(3000.0, gt=0)
    ref_lambda: float = Field(0.2, ge=0, description="lambda: weight of the reference-drift loss")
    ref_positive_weight: float = Field(3000.0, gt=0)
    ref_negative_weight: float = Field(3000.0, gt=0)
    ref_radii: list[float] | None = None
    aggregation: Literal["sum", "mean"] = "sum"
    key_weights: dict[str, float] = Field(
        default_factory=dict,
        description="weights of the preference loss per feature key, by name prefix (default 1)")

    @field_validator("key_weights")
    @classmethod
    def _not_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = [prefix for prefix, weight in weights.items() if weight < 0]
        if negative:
            raise ValueError(f"must be >= 0 (0 turns a key off), got {negative[0]}: {weights[negative[0]]}")
        return weights

    @field_validator("radii", "ref_radii")
    @classmethod
    def _positive(cls, radii: list[float] | None) -> list[float] | None:
        if radii is not None and any(r <= 0 for r in radii):
            raise ValueError(f"every radius must be positive, got {radii}")
        return radii


class SourceConfig(_Strict):
    kind: Literal["online", "offline", "data"] = "online"
    path: str | None = Field(None, description="offline: JSONL of chosen/rejected pairs; data: JSONL of images "
                                                "(the Python API may pass a sampler instead)")

    _path_named = field_validator("path")(classmethod(lambda cls, v: _a_name(v, "file")))

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind == "offline" and not self.path:
            raise ValueError("source.path is required when source.kind is offline")
        return self


class PromptsConfig(_Strict):
    path: str | None = Field(None, description="prompt file (.txt, GenEval .jsonl, Parti .tsv) or pkg://")
    format: Literal["auto", "text", "geneval", "parti"] = "auto"
    eval_path: str | None = Field(None, description="held-out prompts; default: split from path")
    eval_count: int | Literal["auto", "all"] = Field(
        "auto", description="held-out prompts evaluated. With eval_path: a seeded subset of that many distinct "
        f"prompts of the file, in file order (auto: {EVAL_SUBSET_COUNT}; all: the whole file); without: that "
        f"many distinct prompts split from path, never trained on (auto: {EVAL_SPLIT_COUNT})")
    shuffle: bool = True

    _paths_named = field_validator("path", "eval_path")(classmethod(lambda cls, v: _a_name(v, "file")))

    @field_validator("eval_count", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        bad_text = isinstance(value, str) and value not in ("auto", "all") and not value.strip().isdigit()
        if bad_text or isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError(f"must be a non-negative integer, auto or all, got {value!r}")
        return value

    @model_validator(mode="after")
    def _all_needs_a_file(self) -> PromptsConfig:
        if self.eval_count == "all" and self.eval_path is None:
            raise ValueError("eval_count: all needs prompts.eval_path (held out from path, every prompt "
                             "would leave none to train on)")
        return self


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of trainable weights (off); when on, "
                                     "evaluation, sampling and export use the EMA weights")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    candidate_chunk: int | None = Field(None, ge=1, description="candidates per grad chunk (memory)")
    single_pass: bool = Field(False, description="sample the candidates with grad and keep their graph through "
                              "the ranking: one generator pass instead of two, for small generators whose "
                              "activations for all K candidates fit (not with candidate_chunk)")
    gradient_checkpointing: bool = True
    failure_window: int = Field(20, ge=1)
    max_failures: int = Field(10, ge=1, description="failed prompts per window before stopping")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` (in a file or in --set train.mixed_precision=no) as false
        return "no" if value is False else value

    @field_validator("betas", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # YAML has lists; strict tuples want tuples

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"unknown device {value!r} (use {DEVICE_NAMES})")
        return value

    @model_validator(mode="after")
    def _one_pass_or_chunks(self) -> TrainConfig:
        if self.single_pass and self.candidate_chunk is not None:
            raise ValueError("train.single_pass keeps every candidate's graph; it cannot be combined with "
                             "train.candidate_chunk")
        return self


class CheckpointConfig(_Strict):
    every: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1)


def parse_seeds(value: Any) -> Any:
    """``"42-46"`` or ``"1,5,9"`` -> a list of ints; lists pass through."""
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        return value
    seeds: list[int] = []
    for part in value.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"seeds must look like 42-46 or 1,5,9, got {value!r}")
        seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    return seeds


def ranker_list(value: Any) -> Any:
    """``rankers: pickscore`` or a list of names / mappings -> a list of mappings."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        return value  # validation names the problem
    return [{"name": v} if isinstance(v, str) else v for v in value]


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    seeds: list[int] = Field(default_factory=lambda: [42, 43, 44, 45, 46], min_length=1)
    rankers: list[RankerConfig] = Field(default_factory=list, description="secondary rankers")
    grid_prompts: int = Field(4, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1)

    _seeds = field_validator("seeds", mode="before")(classmethod(lambda cls, v: parse_seeds(v)))
    _rankers = field_validator("rankers", mode="before")(classmethod(lambda cls, v: ranker_list(v)))


#: tracker -> (the module it needs, how to install it)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", 'pip install "drpo[tracking]"'),
                    "wandb": ("wandb", 'pip install "drpo[wandb]"')}


class LogConfig(_Strict):
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="log the per-step and evaluation metrics to these too (see drpo_core.tracking)")
    sync_timing_every: int = Field(10, ge=1, description="synchronise CUDA for timings every N steps")
    progress: bool = True

    @field_validator("trackers")
    @classmethod
    def _installed(cls, trackers: list[str]) -> list[str]:
        for name in trackers:
            module, install = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"{name} is not installed: {install}")
        return trackers


class RunConfig(_Strict):
    # ge/le: the seed seeds Python's, NumPy's (32 bits) and torch's generators
    seed: int = Field(0, ge=0, le=2**32 - 1)
    output_dir: str = "runs/drpo"
    # no default names a component: the user names them, or a component recommends one (resolve_config)
    generator: ComponentConfig
    rankers: list[RankerConfig] = Field(min_length=1)
    features: ComponentConfig
    kernel: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="laplacian"))
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("generator", "features", "kernel", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    _rankers = field_validator("rankers", mode="before")(classmethod(lambda cls, v: ranker_list(v)))
    _output_named = field_validator("output_dir")(classmethod(lambda cls, v: _a_name(v, "directory")))


COMPONENT_SECTIONS = {"generator": "generator", "features": "feature", "kernel": "kernel"}
FLAG_NAMES = {"generator": "--generator", "rankers": "--ranker", "features": "--features",
              "kernel": "--kernel", "output_dir": "--output-dir"}


def resolve_path(path: str | Path, base_dir: Path) -> Path:
    """A user path: ``pkg://package/file`` is a file shipped inside a Python package; a relative
    path is taken from the working directory when it exists there, else from the config's folder."""
    text = str(path)
    if text.startswith("pkg://"):
        from importlib.resources import files

        package, _, inner = text.removeprefix("pkg://").partition("/")
        try:
            return Path(str(files(package).joinpath(inner)))
        except ModuleNotFoundError as error:
            raise ConfigError(f"{text}: package {package!r} is not installed") from error
    candidate = Path(text).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base_dir / candidate


# -- YAML --------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """PyYAML is YAML 1.1, where ``3e-4`` is a string; read it as the float everyone means. A key given
    twice in one mapping is refused (PyYAML would keep the last one and drop the first silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges keys that the mapping may override
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML refuses it itself
                continue
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text; ``source`` names it in errors (a file, whose errors get ``:line``, or ``--set key``)."""
    in_file = not source.startswith("--set")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}" if mark and in_file else source
        raise ConfigError(f"{where}: YAML syntax error: {error.problem or error.context}") from error
    except _DuplicateKey as error:
        where = f"{source}:{error.line}" if in_file else source
        first = f" (first at line {error.first})" if in_file else ""
        raise ConfigError(f"{where}: duplicated key {error.key!r}{first}") from None


def read_config_text(path: str | Path) -> str:
    """A config file's text: one ``ConfigError`` line when it is missing, not a file, or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file is not a file: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (bad byte at column {column}): save the file as UTF-8") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = parse_yaml(read_config_text(path), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _line_of(text: str, dotted: str) -> int | None:
    """The 1-based line of a dotted key in YAML text, for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted.split("."):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# -- layering ----------------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 3e-4)``; values are YAML literals."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    return key.strip(), parse_yaml(raw, f"--set {key}") if raw.strip() else None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b]...`` for ``"a.b...."``; list entries are addressed by index (``rankers.0.weight``),
    and the index one past the end adds an entry. A path that cannot exist is one ``ConfigError``."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"--set {dotted}: {where} is a list: address an entry by index, e.g. {where}.0")
            index = int(part)
            if index > len(node):
                raise ConfigError(f"--set {dotted}: {where} has {len(node)} entries (index {len(node)} adds one)")
            if index == len(node):
                node.append({})
            key: Any = index
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"--set {dotted}: {where} is not a section (it holds {node!r})")
        if last:
            node[key] = value
            return
        child = node[key] if (isinstance(node, list) or key in node) else None
        if key in COMPONENT_SECTIONS and isinstance(child, str):
            child = {"name": child}  # "generator: shapes" grows into a mapping
        elif key == "rankers" and isinstance(node, dict):
            child = ranker_list(child) if child is not None else []
        elif child is None:
            child = [] if parts[depth + 1].isdigit() else {}
        node[key] = child
        node = child


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "rankers": [{"name": "x"}]}`` -> ``{"a.b": 1, "rankers.0.name": "x"}`` (lists of
    sections are entered, lists of values are leaves)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return {k: v for i, item in enumerate(data) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: data}


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _component_name(section: Any) -> str | None:
    """The name a component section gives, if it gives one (anything else fails validation, with its origin)."""
    if isinstance(section, dict):
        section = section.get("name")
    return section if isinstance(section, str) else None


#: who wins when recommendations disagree, most specific first ("pair" = a recommendation for two components)
PRECEDENCE = ("pair", "generator", "features", "rankers", "kernel")
_KIND_OF = {"generator": "generator", "features": "feature", "rankers": "ranker", "kernel": "kernel"}


@dataclass(frozen=True)
class Conflict:
    """Two recommendations of one key that disagree: ``value`` from ``origin`` won over ``overruled``."""

    key: str
    value: Any
    origin: str
    overruled: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        lost = ", ".join(f"{v!r} from {o}" for o, v in self.overruled)
        return f"{self.key}: {self.value!r} from {self.origin} (over {lost})"


@dataclass
class ResolvedConfig:
    config: RunConfig
    #: dotted key -> where its value came from ("default", "file.yaml", "--set", "generator sdxl-turbo")
    origins: dict[str, str] = field(default_factory=dict)
    config_dir: Path = field(default_factory=Path.cwd)
    #: recommendations that disagreed, and who won
    conflicts: list[Conflict] = field(default_factory=list)
    #: each component section's options, validated by its plugin ("generator", "rankers.0", "eval.rankers.1")
    options: dict[str, Any] = field(default_factory=dict)
    #: section -> the registry entry of its component
    specs: dict[str, ComponentSpec] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def portable_yaml(self) -> str:
        """The config with relative paths made absolute: a recipe that works from any directory
        (saved as the run's ``config.yaml``)."""
        data = self.to_dict()
        for dotted in ("prompts.path", "prompts.eval_path", "source.path"):
            section, key = dotted.split(".")
            data[section][key] = self._absolute(data[section][key])
        for where, spec in self.specs.items():
            options = _section_data(data, where)
            fields = getattr(spec.options, "model_fields", {})
            for key, info in fields.items():
                if is_local_path(info) and isinstance(options.get(key), str):
                    options[key] = self._absolute(options[key], only_existing=True)
        return yaml.safe_dump(data, sort_keys=False)

    def _absolute(self, path: str | None, only_existing: bool = False) -> str | None:
        if path is None or path.startswith("pkg://"):
            return path
        resolved = resolve_path(path, self.config_dir)
        if only_existing and not resolved.exists():
            return path  # a hub id, not a path
        return str(resolved.resolve())


def is_local_path(info: Any) -> bool:
    """A field annotated ``LocalPath``, also inside ``LocalPath | None`` (where pydantic keeps no metadata)."""
    if LOCAL_PATH in info.metadata:
        return True
    return any(LOCAL_PATH in getattr(arg, "__metadata__", ()) for arg in typing.get_args(info.annotation))


def _section_data(data: dict[str, Any], where: str) -> dict[str, Any]:
    node: Any = data
    for part in where.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def names_a_component(flags: Mapping[str, Any] | None, assignments: list[str] | None) -> bool:
    """Whether the command line names a component: then the embedded default recipe does not apply.

    ``--set`` names one when it sets a section (``features=latent``), a name (``generator.name=...``,
    ``rankers.1.name=...``) or a ranker entry (``rankers.1=...``); setting a component's options
    (``features.exclude=[cnn]``, ``rankers.0.weight=2``) adjusts the components the default names."""
    if any((flags or {}).get(key) for key in ("generator", "rankers", "features", "kernel")):
        return True
    sections = ("generator", "rankers", "features", "kernel")
    for line in assignments or []:
        parts = parse_assignment(line)[0].split(".")
        if parts[0] not in sections:
            continue
        inner = parts[2:] if parts[0] == "rankers" and len(parts) > 1 and parts[1].isdigit() else parts[1:]
        if inner in ([], ["name"]):
            return True
    return False


def resolve_config(
    file: str | Path | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    base_origin: str = "config",
    flags: Mapping[str, Any] | None = None,
    assignments: list[str] | None = None,
    registry: Registry | None = None,
) -> ResolvedConfig:
    """Build a validated RunConfig from a YAML file (or ``base``, named ``base_origin`` in messages),
    flags and ``--set`` lines, under the chosen components' recommendations."""
    registry = registry or get_registry()
    layers: list[tuple[str, dict[str, Any]]] = []
    text = ""
    if file is not None:
        text = read_config_text(file)
        layers.append((str(file), read_yaml(file)))
    elif base is not None:
        layers.append((base_origin, copy.deepcopy(dict(base))))
    user = _deep_merge({}, layers[0][1]) if layers else {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "rankers":  # --ranker, repeatable: one name or several, in order
            value = ranker_list(list(value) if isinstance(value, (list, tuple)) else value)
        elif key in COMPONENT_SECTIONS:
            # the file's options still apply to the same component, not to another one
            old = user.get(key)
            kept = old if isinstance(old, dict) and old.get("name") == value else {}
            value = {**kept, "name": value}
        layers.append((FLAG_NAMES[key], {key: value}))
        user[key] = copy.deepcopy(value)
    set_layer: dict[str, Any] = {}
    for line in assignments or []:
        key, value = parse_assignment(line)
        set_dotted(user, key, value)
        set_dotted(set_layer, key, value)
    if set_layer:
        layers.append(("--set", set_layer))
    origins: dict[str, str] = {}
    for origin, layer in layers:
        origins.update({key: origin for key in _flatten(_sections(layer))})

    recommended, rec_origins, conflicts, specs = _recommendations(user, origins, registry)
    merged = _deep_merge(recommended, user)
    origins = {**rec_origins, **origins}
    config = _validate(merged, text, layers[0][0] if layers else "config", origins)
    config_dir = Path(file).resolve().parent if file is not None else Path.cwd()
    for key in _flatten(config.model_dump(mode="json")):
        origins.setdefault(key, "default")
    resolved = ResolvedConfig(config, origins, config_dir, conflicts)
    _validate_components(resolved, registry)
    _check_feasible(resolved)
    _check_effective(resolved, _flatten(recommended))
    return resolved


def _sections(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer with component shorthands (``features: latent``, ``rankers: [x]``) written as sections."""
    out = dict(layer)
    for key in COMPONENT_SECTIONS:
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    if isinstance(out.get("rankers"), (str, dict, list)):
        out["rankers"] = ranker_list(out["rankers"])
    evaluation = out.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("rankers"), (str, dict, list)):
        out["eval"] = {**evaluation, "rankers": ranker_list(evaluation["rankers"])}
    return out


def _recommendations(user: dict[str, Any], origins: dict[str, str], registry: Registry
                     ) -> tuple[dict[str, Any], dict[str, str], list[Conflict], dict[str, ComponentSpec]]:
    """The chosen components' recommended settings, merged by ``PRECEDENCE``: (settings as a nested dict,
    their origins, the conflicts, the specs of the chosen components)."""
    chosen: dict[str, str] = {}  # section ("generator", "rankers.0", ...) -> name[:variant]
    for section in ("generator", "features", "kernel"):
        if section in user:
            name = _component_name(user[section])
            if name:  # a section without a name fails validation below, with its file and line
                chosen[section] = name
    rankers = user.get("rankers")
    rankers = [rankers] if isinstance(rankers, (str, dict)) else rankers if isinstance(rankers, list) else []
    chosen.update({f"rankers.{i}": name for i, name in enumerate(map(_component_name, rankers)) if name})
    while True:  # a feature space or kernel nobody named may be recommended by another component
        specs = {where: _lookup(registry, _KIND_OF[where.split(".")[0]], name, where) for where, name in chosen.items()}
        winners, conflicts = _settle(_proposals(chosen, specs))
        unnamed = [s for s in ("features", "kernel") if s not in chosen and f"{s}.name" in winners]
        if not unnamed:
            break
        chosen.update({section: winners[f"{section}.name"][1] for section in unnamed})
    if "kernel" not in chosen:  # the schema's neutral kernel has no recommendations of its own to add
        chosen["kernel"] = RunConfig.model_fields["kernel"].get_default(call_default_factory=True).name
        specs["kernel"] = _lookup(registry, "kernel", chosen["kernel"], "kernel")
    nested: dict[str, Any] = {}
    for key, (_, value) in winners.items():
        set_dotted(nested, key, value)
    return nested, {key: origin for key, (origin, _) in winners.items()}, conflicts, specs


def _proposals(chosen: dict[str, str], specs: dict[str, ComponentSpec]) -> list[tuple[str, dict[str, Any]]]:
    """(origin, {dotted key: value}) of every recommendation, most specific first."""
    pairs, singles = [], []
    for where, reference in chosen.items():
        section, spec = where.split(".")[0], specs[where]
        name, variant = split_reference(reference)
        label = f"{_KIND_OF[section]} {name}"
        for other in chosen.values():
            if other == reference:
                continue
            other_name = split_reference(other)[0]
            # settings for one variant of the other component ("sdxl-turbo:paper") win over its plain name's
            if other != other_name and spec.recommended_with(other):
                pairs.append((f"{label} with {other}", spec.recommended_with(other)))
            if spec.recommended_with(other_name):
                pairs.append((f"{label} with {other_name}", spec.recommended_with(other_name)))
        rank, recommended = PRECEDENCE.index(section), spec.recommended(variant)
        if variant is not None:  # what the variant changes is named after it (a preset: "generator sd-turbo:paper")
            plain = spec.recommended(None)
            changed = {key: value for key, value in recommended.items() if key not in plain or plain[key] != value}
            singles.append((rank, f"{label}:{variant}", changed))
            recommended = {key: value for key, value in recommended.items() if key not in changed}
        singles.append((rank, label, recommended))
    singles.sort(key=lambda item: item[0])  # stable: rankers keep their list order
    return [*pairs, *[(label, recs) for _, label, recs in singles]]


def _settle(proposals: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, tuple[str, Any]], list[Conflict]]:
    """The first proposal of each key wins (proposals come most specific first); disagreements are kept."""
    winners: dict[str, tuple[str, Any]] = {}
    overruled: dict[str, list[tuple[str, Any]]] = {}
    for origin, recs in proposals:
        for key, value in recs.items():
            if key not in winners:
                winners[key] = (origin, value)
            elif winners[key][1] != value:
                overruled.setdefault(key, []).append((origin, value))
    conflicts = [Conflict(key, winners[key][1], winners[key][0], tuple(lost)) for key, lost in overruled.items()]
    return winners, conflicts


def _lookup(registry: Registry, kind: str, reference: str, section: str) -> ComponentSpec:
    try:
        return registry.get(kind, reference)
    except DrpoError as error:
        raise ConfigError(f"{section}: {error}") from error


def _validate(data: dict[str, Any], text: str, source: str, origins: dict[str, str]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        # what the user wrote wrong comes first; then which component nobody named
        errors = sorted(error.errors(), key=lambda e: e["type"] == "missing" and len(e["loc"]) == 1)
        first = errors[0]
        if first["type"] == "missing" and len(first["loc"]) == 1:
            raise ConfigError(_none_named(str(first["loc"][0]), data)) from None
        raise ConfigError(_describe(error, first, text, source, origins)) from None


def _none_named(section: str, data: dict[str, Any]) -> str:
    if section == "features":
        return (f"features: none named, and generator {_component_name(data.get('generator'))!r} recommends none: "
                "give --features NAME (see `drpo list-plugins`)")
    flag = "--ranker" if section == "rankers" else f"--{section}"
    return (f"{section}: none named: give {flag} NAME, `{section}:` in a recipe, or run `drpo train` with no "
            "component flags for the embedded default")


def _describe(error: ValidationError, first: Any, text: str, source: str, origins: dict[str, str]) -> str:
    loc, message = describe(error, RunConfig, first)
    dotted = ".".join(loc)
    origin = _origin_of(origins, dotted)
    if origin is _MIXED:  # a rule across keys of several origins: name each key the message names
        keys = [key for key in dict.fromkeys(re.findall(r"[a-z_]+(?:\.[a-z_0-9]+)+", message)) if key in origins]
        named = f" ({', '.join(f'{key} from {origins[key]}' for key in keys)})" if keys else ""
        return f"{dotted}: {message}{named}"
    origin = origin or source
    line = _line_of(text, dotted) if text and origin == source else None
    where = f"{origin}:{line}: " if line else (f"{origin}: " if origin and origin != "default" else "")
    return f"{where}{dotted}: {message}"


_MIXED = "several origins"


def _origin_of(origins: dict[str, str], dotted: str) -> str | None:
    """Where the value at ``dotted`` came from: its own origin, else that of the nearest enclosing key
    that has one (``train.betas`` for ``train.betas.0``), else the one origin of a section's values
    (an error about a whole section); ``_MIXED`` when those differ, None when nothing is known."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in origins:
            return origins[prefix]
        found = {origin for key, origin in origins.items() if key.startswith(prefix + ".")}
        if found:
            return found.pop() if len(found) == 1 else _MIXED
    return None


def _validate_components(resolved: ResolvedConfig, registry: Registry) -> None:
    """Every component exists and its options are valid: validated once, kept in ``resolved.options``."""
    config = resolved.config
    sections = [(s, COMPONENT_SECTIONS[s], getattr(config, s)) for s in COMPONENT_SECTIONS]
    sections += [(f"rankers.{i}", "ranker", r) for i, r in enumerate(config.rankers)]
    sections += [(f"eval.rankers.{i}", "ranker", r) for i, r in enumerate(config.eval.rankers)]
    for where, kind, section in sections:
        resolved.specs[where] = _lookup(registry, kind, section.name, where)
        try:
            resolved.options[where] = registry.validate_options(kind, section.name, section.options, where)
        except ConfigError as error:
            origin = resolved.origins.get(str(error).split(":", 1)[0])
            raise ConfigError(f"{origin}: {error}" if origin and origin != "default" else str(error)) from None


def _check_feasible(resolved: ResolvedConfig) -> None:
    """Settings that each validate but cannot work together: one line naming the keys and their origins."""
    cfg, origin = resolved.config, resolved.origins

    def named(*keys: str) -> str:
        return ", ".join(f"{key} from {origin.get(key, 'default')}" for key in keys)

    sel = cfg.selection
    if sel.positives + sel.negatives > sel.candidates:
        raise ConfigError(f"selection: positives + negatives ({sel.positives} + {sel.negatives}) exceed candidates "
                          f"({sel.candidates}) ({named('selection.positives', 'selection.negatives', 'selection.candidates')})")
    if cfg.source.kind == "online" and not cfg.prompts.path:  # source.kind named when chosen, not by default
        keys = ["prompts.path"] + (["source.kind"] if origin.get("source.kind", "default") != "default" else [])
        raise ConfigError("prompts.path: an online run needs training prompts: set prompts.path in a recipe or "
                          f"--set prompts.path=FILE ({named(*keys)})")
    generator, features = resolved.specs["generator"], resolved.specs["features"]
    missing = [need for need in features.requires if need not in generator.provides]
    if missing:
        raise ConfigError(f"features: {features.name!r} needs {', '.join(missing)} from the generator, which "
                          f"{generator.name!r} does not give (it gives {', '.join(generator.provides) or 'nothing declared'}) "
                          f"({named('features.name', 'generator.name')})")
    _check_prompt_formats(resolved, named)
    ranker_sections = {**{f"rankers.{i}": r for i, r in enumerate(cfg.rankers)},
                       **{f"eval.rankers.{i}": r for i, r in enumerate(cfg.eval.rankers)}}
    for where, section in ranker_sections.items():
        spec = resolved.specs[where]
        if "timeout" in spec.requires and section.timeout is None:
            raise ConfigError(f"{where}.timeout: ranker {spec.name!r} needs a timeout (seconds one score call may "
                              f"take, retries included), e.g. --set {where}.timeout=120 ({named(where + '.name')})")
    binary = {i: "binary" in resolved.specs[f"rankers.{i}"].provides for i in range(len(cfg.rankers))}
    if len(set(binary.values())) > 1:
        keys = [f"rankers.{i}.name" for i in binary]
        raise ConfigError("rankers: binary rankers (0/1 correctness) cannot be mixed with graded ones in one run "
                          f"({named(*keys)})")


#: a ranker's ``requires`` entry -> the prompt format whose records carry what it scores against
PROMPT_REQUIREMENTS = {"geneval-prompts": "geneval"}


def _check_prompt_formats(resolved: ResolvedConfig, named: Callable[..., str]) -> None:
    """A ranker that scores against each prompt's metadata (GenEval's clauses) needs prompt files that carry it:
    refused here, not after the models have loaded and every batch has failed. Training rankers read the
    training and the evaluation prompts, evaluation rankers the evaluation prompts."""
    prompts = resolved.config.prompts
    held_out = ("prompts.eval_path", prompts.eval_path) if prompts.eval_path else ("prompts.path", prompts.path)
    files = {"rankers": [("prompts.path", prompts.path), held_out], "eval.rankers": [held_out]}
    for where, spec in resolved.specs.items():
        read = [(key, path) for key, path in files.get(where.rsplit(".", 1)[0], []) if path is not None]
        for wanted in [PROMPT_REQUIREMENTS[need] for need in spec.requires if need in PROMPT_REQUIREMENTS]:
            for key, path in read:
                found = prompt_format(path, prompts.format)
                if found != wanted:
                    raise ConfigError(f"{key}: ranker {spec.name!r} scores against {wanted} prompt records (their "
                                      f"metadata), but {path} is read as {found} ({named(key, where + '.name')})")


def _dumped(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _check_effective(resolved: ResolvedConfig, recommended: dict[str, Any]) -> None:
    """A setting changed from its default that this run would ignore: one line instead of a silent no-op.
    A component's recommended value is never refused (a recipe may serve several kinds of run)."""
    cfg = resolved.config
    online = cfg.source.kind == "online"
    binary = "binary" in resolved.specs["rankers.0"].provides  # one kind for all: checked by _check_feasible
    anchors = {"offline": "chosen/rejected pairs", "data": "real images"}.get(cfg.source.kind)
    not_ranked = f"source.kind {cfg.source.kind} takes its anchors from {anchors}, not from ranking"
    unused: dict[str, str] = {}  # key -> why this run ignores it ("": it does not)
    for key in ("rollout_rounds", "fresh_anchors", "positive_memory"):
        unused[f"selection.{key}"] = not_ranked if not online else "" if binary else "it is for binary rankers only"
    unused["selection.shuffle_scores"] = "" if online else not_ranked
    combine = not_ranked if not online else "binary rankers combine by product" if binary else ""
    unused["selection.combine"] = combine
    unused.update({f"rankers.{i}.weight": combine for i in range(len(cfg.rankers))})
    unused.update({f"eval.rankers.{i}.weight": "evaluation reports each ranker's own mean"
                   for i in range(len(cfg.eval.rankers))})
    if not cfg.eval.every:
        unused["eval.early_stopping_patience"] = "it counts the evaluations every eval.every steps, and eval.every is 0"
    defaults = _flatten({name: _dumped(info.get_default(call_default_factory=True))
                         for name, info in RunConfig.model_fields.items() if not info.is_required()})
    values = _flatten(resolved.to_dict())
    for key, why in unused.items():
        default = 1.0 if key.endswith(".weight") else defaults[key]
        if why and values[key] != default and recommended.get(key, default) != values[key]:
            raise ConfigError(f"{key}: {values[key]!r} would change nothing: {why} "
                              f"({key} from {resolved.origins.get(key, 'default')}; remove it)")
