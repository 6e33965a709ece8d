"""Experiment configuration: typed dataclasses, YAML files and ``key=value`` overrides.

Every key is declared here with its default, so a misspelt key in a file or on the command line
is an error that suggests the closest valid key, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["DataConfig", "ModelConfig", "MethodConfig", "TrainConfig", "ExperimentConfig",
           "load_config", "apply_overrides", "config_to_dict"]

METHODS = ("ftn", "full", "linear", "bn_head", "lora")


@dataclass
class DataConfig:
    kind: str = "embedded"  # embedded | domainnet | imagefolder
    root: str | None = None  # dataset root for domainnet / imagefolder
    domains: list[str] = field(default_factory=lambda: ["mnist", "fashion", "animal", "optdigits"])
    image_size: int = 64
    train_limit: int | None = None  # at most this many training samples per domain
    val_limit: int | None = None
    test_limit: int | None = None
    val_fraction: float = 0.1  # domainnet has no val list: held out from train
    augment: bool = False
    skip_corrupt: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"
    pretrained: bool = True
    weights_path: str | None = None


@dataclass
class MethodConfig:
    name: str = "ftn"  # ftn | full | linear | bn_head | lora
    rank: int = 8  # FTN rank (per domain)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    init: str = "orthogonal"
    init_scale: float = 1.0
    lora_rank: int | None = None  # None: matched to FTN's ΔW budget at `rank`
    lora_alpha: float | None = None  # None: equal to the LoRA rank (scale 1)
    load_adapters: list[str] = field(default_factory=list)  # FTN adapters of earlier domains


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # stop after this many steps per domain (overrides epochs)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    amp: str = "auto"  # auto (CUDA only) | off | bf16 | fp16
    device: str = "auto"
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    resume: bool = True
    recalibrate_bn: bool = True
    recalibrate_batches: int = 50
    on_nonfinite: str = "stop"  # stop | skip
    distributed: str = "data"  # under torchrun: data (split each batch) | domains (one rank per domain)
    log_every: int = 10


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> ExperimentConfig:
        if self.method.name not in METHODS:
            raise ConfigError(f"method.name must be one of {METHODS}, got {self.method.name!r}"
                              + _suggest(self.method.name, METHODS))
        if self.data.kind not in ("embedded", "domainnet", "imagefolder"):
            raise ConfigError(f"data.kind must be embedded, domainnet or imagefolder, got {self.data.kind!r}")
        if self.data.kind != "embedded" and not self.data.root:
            raise ConfigError(f"data.root is required for data.kind={self.data.kind!r}")
        if self.train.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"train.optimizer must be adamw or sgd, got {self.train.optimizer!r}")
        if self.train.amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"train.amp must be auto, off, bf16 or fp16, got {self.train.amp!r}")
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite must be stop or skip, got {self.train.on_nonfinite!r}")
        if self.train.distributed not in ("data", "domains"):
            raise ConfigError(f"train.distributed must be data or domains, got {self.train.distributed!r}")
        if self.method.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {self.method.rank}")
        if not self.data.domains:
            raise ConfigError("data.domains is empty")
        for key in ("batch_size", "eval_batch_size", "image_size"):
            if getattr(self.data, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1")
        return self


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot use {value!r} as {hint}")
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {value!r}: {exc}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], key) for k, v in value.items()}
    return value


def _set(obj: Any, dotted: str, value: Any, full_key: str | None = None) -> None:
    full_key = full_key or dotted
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    if head not in names:
        prefix = full_key[: len(full_key) - len(dotted)]
        raise ConfigError(f"unknown config key {full_key!r}" + _suggest(head, names).replace(
            "mean '", f"mean '{prefix}") + f"; valid keys here: {', '.join(names)}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, full_key)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full_key} is a section; give a mapping or use {full_key}.<key>=...")
        for k, v in value.items():
            _set(current, str(k), v, f"{full_key}.{k}")
        return
    if rest:
        raise ConfigError(f"{full_key!r}: {head!r} is not a section")
    setattr(obj, head, _coerce(value, hints[head], full_key))


C = typing.TypeVar("C")


def apply_overrides(cfg: C, overrides: typing.Iterable[str]) -> C:
    """Apply ``section.key=value`` strings (values parsed as YAML: 3, 1e-3, true, [a, b]) to any
    config dataclass with a ``validate()`` method."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set(cfg, key.strip(), value)
    return cfg.validate()


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                cls: typing.Callable[[], C] = ExperimentConfig) -> C:
    """Defaults ← YAML file ← overrides, for ``cls`` (the classification experiment by default;
    the dense trainer passes its own config class). Unknown keys fail with the closest valid key."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        for key, value in data.items():
            _set(cfg, str(key), value)
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
