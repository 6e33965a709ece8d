"""Experiment configuration: one schema for every setting, YAML files and ``key=value`` overrides.

An experiment is ``setting`` (classification | dense | text) + ``data`` and ``model`` sections
whose keys depend on the setting (declared by the setting, see :mod:`ftn.training.setting`) +
``method`` and ``train`` sections that are the same everywhere; ``method`` also holds one section
per registered method that declares options (``method.taps.*``, declared by the method, see
:mod:`ftn.training.methods`). Every key is declared with its
default, so a misspelt key in a file or on the command line is an error that suggests the
closest valid key, never a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..core.allocation import check_budget
from ..core.errors import ConfigError, did_you_mean
from ..core.model import FTNConfig
from .methods import METHODS, MethodConfig, method_class
from .settings_registry import SETTINGS, setting_class

__all__ = ["DataConfig", "ModelConfig", "MethodConfig", "TrainConfig", "ExperimentConfig", "SETTINGS",
           "setting_class", "load_config", "apply_overrides", "config_to_dict"]


@dataclass
class DataConfig:
    """Keys every setting has; each setting's ``data`` section extends this."""

    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    train_limit: int | None = None  # at most this many training samples per task
    val_limit: int | None = None
    test_limit: int | None = None


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"
    pretrained: bool = True
    weights_path: str | None = None


#: ``train.compile``'s values: off, a torch.compile mode, or the aot_eager backend.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "aot_eager")


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # stop after this many steps per task (overrides epochs)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # everything but the head
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd
    schedule: str = "cosine"  # cosine | poly ((1 - t)^poly_power; poly_power=1 is linear decay)
    poly_power: float = 0.9
    warmup_steps: int = 0  # linear warm-up before the schedule
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    amp: str = "auto"  # auto (CUDA only) | off | bf16 | fp16
    device: str = "auto"
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    resume: bool = True
    # False: once a run is finished (its results.json written), each task's checkpoint.pt(.prev)
    # is deleted; the adapters, results and logs stay. ``ftn sweep`` sets it: a finished run is
    # never resumed there, and full fine-tuning's checkpoints (weights + optimizer state, per task)
    # would otherwise fill the disk (a 45-run text sweep kept 33 GB of them).
    keep_checkpoints: bool = True
    recalibrate_bn: bool = True
    recalibrate_batches: int = 50
    on_nonfinite: str = "stop"  # stop | skip
    distributed: str = "data"  # under torchrun: data (split each batch) | tasks (one rank per task)
    log_every: int = 10
    # FTN methods: rebuild each adapted depthwise conv's output in the backward instead of keeping
    # it (FTNModel.recompute_depthwise): the same gradients, less activation memory (MobileNetV2
    # 64 px: 0.86× full fine-tuning's tensor peak instead of 0.97×), one more depthwise conv per
    # layer in the backward (+0-2 % of a MobileNetV2 step at 64 px, +9 % at 224 px on the CPU).
    recompute_depthwise: bool = False
    # Backbone weights in channels-last (NHWC) memory format; activations follow. Every method
    # trains about 1.1-1.8× faster on the CPU (docs/performance.md, "CPU, third round"); results
    # equal the default layout's up to float rounding, and files saved either way load either way.
    channels_last: bool = False
    # torch.compile the training step: the loss's forward and backward (one graph pair; FTN's
    # layers trace without graph breaks) and the main optimizer's step (one more graph; its rates
    # become tensors so the schedule never recompiles it; not under fp16's GradScaler): off |
    # default (inductor) | reduce-overhead (inductor + CUDA graphs on CUDA: one launch per step) |
    # max-autotune | aot_eager (traced, not code-generated: for checking a model traces). The
    # first steps pay the compilation (tens of seconds to minutes).
    compile: str = "off"
    # Keep freed memory in the training process (glibc's malloc thresholds raised, see
    # ftn.training.allocator): no page faults on each step's activation buffers. A MobileNetV2
    # 64-px run page-faulted 100 million times without it. False leaves malloc as the process had it.
    keep_freed_memory: bool = True
    # False: the test split is not scored after training (``ftn sweep``'s learning-rate search
    # runs; the chosen run's test split is scored once afterwards from its saved tasks).
    evaluate_test: bool = True


@dataclass
class ExperimentConfig:
    setting: str = "classification"
    name: str = "experiment"
    output_dir: str = "runs/experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)  # the setting's own section (a subclass)
    model: ModelConfig = field(default_factory=ModelConfig)  # idem
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """Give the setting its own ``data`` and ``model`` sections (their defaults) unless set."""
        cls = setting_class(self.setting)
        for key, section in (("data", cls.data_config), ("model", cls.model_config)):
            current = getattr(self, key)
            if type(current) in (DataConfig, ModelConfig):
                setattr(self, key, section())
            elif not isinstance(current, section):
                raise ConfigError(f"the {self.setting} setting's {key} section is {section.__name__}, "
                                  f"got {type(current).__name__}")

    def validate(self) -> ExperimentConfig:
        method_class(self.method.name)  # unknown names fail with the registry's names
        check_choice("train.optimizer", self.train.optimizer, ("adamw", "sgd"))
        check_choice("train.schedule", self.train.schedule, ("cosine", "poly"))
        check_choice("train.amp", self.train.amp, ("auto", "off", "bf16", "fp16"))
        check_choice("train.on_nonfinite", self.train.on_nonfinite, ("stop", "skip"))
        check_choice("train.compile", self.train.compile, COMPILE_MODES)
        check_choice("train.distributed", self.train.distributed, ("data", "tasks"))
        try:
            FTNConfig(**dataclasses.asdict(self.method.ftn))
        except ConfigError as exc:
            raise ConfigError(f"method.ftn: {exc}") from None
        self.method.validate_sections()  # method.<name>.*, each by the method that declares it
        check_choice("method.budget_allocation", self.method.budget_allocation, ("auto", "uniform"))
        check_choice("method.budget_score", self.method.budget_score, ("taylor", "magnitude"))
        check_choice("method.budget_init", self.method.budget_init, ("probe", "fresh"))
        budget = self.method.budget
        if budget is not None:
            if not method_class(self.method.name).supports_budget:
                able = ", ".join(n for n, c in METHODS.items() if c.supports_budget)
                raise ConfigError(f"method.budget is not supported by method {self.method.name!r} "
                                  f"({able}); set method.budget=null")
            try:
                check_budget(budget)
            except ConfigError as exc:
                raise ConfigError(f"method.{exc}") from None
        if not 1.0 <= self.method.budget_warm <= 64:
            raise ConfigError(f"method.budget_warm must be in [1, 64], got {self.method.budget_warm!r}")
        if not 0.0 < self.method.budget_probe <= 1.0:
            raise ConfigError(f"method.budget_probe must be in (0, 1], got {self.method.budget_probe!r}")
        if any(r < 0 for r in self.method.ranks.values()):
            raise ConfigError("method.ranks must be >= 0")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self.data, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1")
        setting_class(self.setting).validate(self)
        return self


def check_choice(key: str, value: str, options: typing.Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {list(options)}, got {value!r}" + did_you_mean(value, options))


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


def _keys(obj: Any) -> list[str]:
    """The keys of a config section: its dataclass fields, then the sections it holds beside
    them (``MethodConfig.sections()``: one per method with options)."""
    extra = obj.sections() if callable(getattr(type(obj), "sections", None)) else {}
    return [f.name for f in fields(obj)] + list(extra)


def _unknown_key(obj: Any, head: str, full_key: str, prefix: str) -> ConfigError:
    names = _keys(obj)
    moved = getattr(type(obj), "moved_keys", {})
    if head in moved:
        return ConfigError(f"config key {full_key!r} is now '{prefix}{moved[head]}'")
    # A key that lives one section further down (method.rank → method.ftn.rank) is named as such.
    nested = [f"{prefix}{name}.{head}" for name in names
              if dataclasses.is_dataclass(getattr(obj, name)) and head in _keys(getattr(obj, name))]
    hint = f" (did you mean {nested[0]!r}?)" if nested else \
        did_you_mean(head, names).replace("mean '", f"mean '{prefix}")
    return ConfigError(f"unknown config key {full_key!r}{hint}; valid keys here: {', '.join(names)}")


def _set(obj: Any, dotted: str, value: Any, full_key: str | None = None) -> None:
    full_key = full_key or dotted
    head, _, rest = dotted.partition(".")
    if head not in _keys(obj):
        raise _unknown_key(obj, head, full_key, full_key[: len(full_key) - len(dotted)])
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
    setattr(obj, head, _coerce(value, typing.get_type_hints(type(obj))[head], full_key))


C = typing.TypeVar("C")


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return key.strip(), value


def apply_overrides(cfg: C, overrides: typing.Iterable[str]) -> C:
    """Apply ``section.key=value`` strings (values parsed as YAML: 3, 1e-3, true, [a, b]) to any
    config dataclass with a ``validate()`` method."""
    for item in overrides:
        key, value = _split(item)
        if key == "setting" and getattr(cfg, "setting", value) != value:
            raise ConfigError("the setting is chosen when the config is loaded (load_config), not changed after")
        _set(cfg, key, value)
    return cfg.validate()  # type: ignore[attr-defined]


def new_config(setting: str = "classification") -> ExperimentConfig:
    """The defaults of ``setting`` (``ExperimentConfig(setting=...)``)."""
    return ExperimentConfig(setting=setting)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Defaults of the setting ← YAML file ← overrides. The setting is the file's ``setting:``
    key (or a ``setting=`` override; classification if neither). Unknown keys fail with the
    closest valid key."""
    overrides = list(overrides)
    data: dict[str, Any] = {}
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
    setting = str(data.get("setting", "classification"))
    for item in overrides:
        key, value = _split(item)
        if key == "setting":
            setting = value
    cfg = new_config(setting)
    for key, value in data.items():
        if key != "setting":
            _set(cfg, str(key), value)
    return apply_overrides(cfg, [o for o in overrides if _split(o)[0] != "setting"])


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data (``config.json``), method sections included: ``load_config`` of
    it written as YAML gives the same config."""
    return _to_dict(cfg)


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key: _to_dict(getattr(obj, key)) for key in _keys(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)
