"""Run configuration: a typed schema, YAML loading, layered overrides and their origins.

Layers, lowest first: schema defaults < components' recommended settings < YAML file < CLI flags
< ``--set key=value``. Each component section (``generator``, ``rankers[i]``, ``features``,
``kernel``) carries ``name`` plus the component's own options, validated by the plugin's model so
errors name the plugin's keys. Every error is a :class:`ConfigError` with one line naming the key
(and the file and line when it comes from YAML).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drpo_core.errors import ConfigError, DrpoError
from drpo_core.prompts import EVAL_SPLIT_COUNT, EVAL_SUBSET_COUNT


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ComponentConfig(BaseModel):
    """``name`` (``plugin:variant`` allowed) plus the component's own options."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RankerConfig(ComponentConfig):
    weight: float = Field(1.0, gt=0)


class SelectionConfig(_Strict):
    candidates: int = Field(16, ge=2, description="K: candidates sampled per prompt")
    positives: int = Field(4, ge=1, description="M+: top-ranked candidates used as positive anchors")
    negatives: int = Field(4, ge=1, description="M-: bottom-ranked candidates used as negative anchors")
    combine: Literal["zscore", "rank"] = "zscore"
    rollout_rounds: int = Field(4, ge=1, description="binary rankers: rounds of K no-grad candidates")
    fresh_anchors: bool = Field(False, description="binary rankers: draw the anchors from extra no-grad "
                                                   "rounds, not from copies of the trainable candidates")
    positive_memory: int = Field(0, ge=0, description="binary rankers: correct samples remembered per prompt, "
                                                      "which top up the positives when a rollout finds too few")
    shuffle_scores: bool = Field(False, description="ablation control: permute each prompt's scores at "
                                                    "random, so the ranking carries no information")

    @model_validator(mode="after")
    def _fits(self) -> SelectionConfig:
        if self.positives + self.negatives > self.candidates:
            raise ValueError(
                f"positives + negatives ({self.positives} + {self.negatives}) exceed candidates "
                f"({self.candidates})"
            )
        return self


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
    return [{"name": v} if isinstance(v, str) else v for v in value]


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    seeds: list[int] = Field(default_factory=lambda: [42, 43, 44, 45, 46], min_length=1)
    rankers: list[RankerConfig] = Field(default_factory=list, description="secondary rankers")
    grid_prompts: int = Field(4, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1)

    _seeds = field_validator("seeds", mode="before")(classmethod(lambda cls, v: parse_seeds(v)))
    _rankers = field_validator("rankers", mode="before")(classmethod(lambda cls, v: ranker_list(v)))


class LogConfig(_Strict):
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    sync_timing_every: int = Field(10, ge=1, description="synchronise CUDA for timings every N steps")
    progress: bool = True


class RunConfig(_Strict):
    seed: int = 0
    output_dir: str = "runs/drpo"
    generator: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="shapes"))
    rankers: list[RankerConfig] = Field(
        default_factory=lambda: [RankerConfig(name="shapes:counting")], min_length=1
    )
    features: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="shapes"))
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


class _Loader(yaml.SafeLoader):
    """PyYAML is YAML 1.1, where ``3e-4`` is a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {error.problem or error.context}") from error


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(path.read_text(), str(path))
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
    *parents, leaf = dotted.split(".")
    node: Any = data
    for part in parents:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
            continue
        if isinstance(node.get(part), str) and part in (*COMPONENT_SECTIONS, "rankers"):
            node[part] = {"name": node[part]}  # "generator: shapes" grows into a mapping
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    if isinstance(node, list) and leaf.isdigit():
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
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
    if isinstance(section, str):
        return section
    if isinstance(section, dict):
        return section.get("name")
    return None


@dataclass
class ResolvedConfig:
    config: RunConfig
    #: dotted key -> where its value came from ("default", "file.yaml", "--set", "generator sdxl-turbo")
    origins: dict[str, str] = field(default_factory=dict)
    config_dir: Path = field(default_factory=Path.cwd)

    def to_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_config(
    file: str | Path | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    assignments: list[str] | None = None,
    registry: Any = None,
) -> ResolvedConfig:
    """Build a validated RunConfig from a YAML file (or ``base``), flags and ``--set`` lines."""
    from drpo_core.registry import get_registry, split_reference

    registry = registry or get_registry()
    layers: list[tuple[str, dict[str, Any]]] = []
    text = ""
    if file is not None:
        text = Path(file).read_text() if Path(file).is_file() else ""
        layers.append((str(file), read_yaml(file)))
    elif base is not None:
        layers.append(("default recipe", copy.deepcopy(dict(base))))
    user = _deep_merge({}, layers[0][1]) if layers else {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "rankers":
            value = [{"name": value}]
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

    # recommended settings of the chosen components sit under everything the user wrote
    # a section the user wrote without a name is reported as such below, not as the default component
    chosen = {key: _component_name(user[key]) if key in user else _default_name(key) for key in COMPONENT_SECTIONS}
    rankers = user.get("rankers") or [r.model_dump() for r in RunConfig().rankers]
    rankers = [rankers] if isinstance(rankers, (str, dict)) else rankers
    recommended: list[tuple[str, dict[str, Any]]] = []
    picks = [(s, COMPONENT_SECTIONS[s], n) for s, n in chosen.items()]
    picks += [("rankers", "ranker", _component_name(r)) for r in rankers]
    for section, kind, reference in picks:
        if not reference:
            continue
        spec = _lookup(registry, kind, reference, section)
        layer: dict[str, Any] = {}
        for key, value in spec.recommended(split_reference(reference)[1]).items():
            set_dotted(layer, key, value)
        if layer:
            recommended.append((f"{kind} {reference}", layer))

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, layer in [*recommended, ("", user)]:
        merged = _deep_merge(merged, layer)
        if origin:
            origins.update({key: origin for key in _flatten(layer)})
    for origin, layer in layers:
        origins.update({key: origin for key in _flatten(layer)})

    config = _validate(merged, text, layers[0][0] if layers else "config", origins)
    config_dir = Path(file).resolve().parent if file is not None else Path.cwd()
    _validate_components(config, registry, origins)
    for key in _flatten(config.model_dump(mode="json")):
        origins.setdefault(key, "default")
    return ResolvedConfig(config, origins, config_dir)


def _default_name(section: str) -> str:
    return getattr(RunConfig(), section).name


def _lookup(registry: Any, kind: str, reference: str, section: str) -> Any:
    try:
        return registry.get(kind, reference)
    except DrpoError as error:
        raise ConfigError(f"{section}: {error}") from error


def _validate(data: dict[str, Any], text: str, source: str, origins: dict[str, str]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, RunConfig, text, source, origins)) from None


def validate_model(model: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    """Validate a plugin's options; errors name ``where.key``."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, model, "", "", {}, prefix=where)) from None


def _describe(error: ValidationError, model: type[BaseModel], text: str, source: str,
              origins: dict[str, str], prefix: str = "") -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    dotted = ".".join(([prefix] if prefix else []) + loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(model, loc)
    elif first["type"] == "missing":
        message = "required field is missing"
    elif "input" in first and first["type"] not in ("value_error",):
        message += f" (got {first['input']!r})"
    origin = origins.get(".".join(loc), source) if origins else source
    line = _line_of(text, ".".join(loc)) if text and origin == source else None
    where = f"{origin}:{line}: " if line else (f"{origin}: " if origin and origin != "default" else "")
    return f"{where}{dotted}: {message}"


def _suggestion(model: type[BaseModel], loc: list[str]) -> str:
    """``did you mean ...`` for a misspelled key, looking up the model the key sits in."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            break
        annotation = fields[part].annotation
        current = getattr(annotation, "__args__", (annotation,))[0] if not hasattr(
            annotation, "model_fields") else annotation
    known = list(getattr(current, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _validate_components(config: RunConfig, registry: Any, origins: dict[str, str]) -> None:
    sections = [(s, COMPONENT_SECTIONS[s], getattr(config, s)) for s in COMPONENT_SECTIONS]
    sections += [(f"rankers.{i}", "ranker", r) for i, r in enumerate(config.rankers)]
    sections += [(f"eval.rankers.{i}", "ranker", r) for i, r in enumerate(config.eval.rankers)]
    for where, kind, section in sections:
        _lookup(registry, kind, section.name, where)
        registry.validate_options(kind, section.name, section.options, where)
