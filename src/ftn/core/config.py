"""`FTNConfig`: the model-wide settings, validated once, here, when the config is made.

Everything that reads a setting (:mod:`ftn.core.injection` for the surgery, :class:`~ftn.core.model.FTNModel`
for ranks and initialisation) trusts these values and does not check them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, TaskError
from .updates import FactorInit

__all__ = ["FTNConfig", "FUSED_QKV_MODES", "validate_task_name"]

FUSED_QKV_MODES = ("plain", "per_projection")


@dataclass
class FTNConfig:
    """Model-wide settings. Patterns are shell-style globs (``fnmatch``) over module names as
    ``backbone.named_modules()`` prints them, e.g. ``"layer4.*"`` or ``"*.downsample.0"``."""

    rank: int = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)  # first matching glob wins; 0 = skip
    include: list[str] | None = None  # None: every Conv/Linear
    exclude: list[str] = field(default_factory=list)
    task_norms: bool = True
    init: str = "orthogonal"
    init_scale: float = 1.0
    zero_mode: int = 0  # which factor starts at zero (0 = output mode A)
    rank_cap: bool = True  # cap a layer's rank where the factors would outgrow a dense ΔW
    # Transformers (see docs/transformers.md): how a packed q/k/v weight (a `qkv` Linear matching
    # `qkv_patterns`, or nn.MultiheadAttention's in_proj_weight) is factorized: "plain" = one
    # A·Bᵀ over the whole (3E × E) matrix, "per_projection" = one A·Bᵀ each for q, k and v.
    fused_qkv: str = "plain"
    qkv_patterns: list[str] = field(default_factory=lambda: ["*.qkv", "*.qkv_proj", "*.Wqkv"])
    train_bias: bool = False  # each task also gets its own copy of every adapted Linear's bias
    # Partial unfreezing: adapted layers matching these globs get a dense per-task update W + D
    # (D zero at start: the same function and gradient as fine-tuning the layer) instead of CP ΔW.
    unfreeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        for pattern, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be an integer >= 0, got {value!r}")
        for key in ("include", "exclude", "qkv_patterns", "unfreeze"):
            value = getattr(self, key)
            if value is None and key == "include":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{key} must be a list of glob strings, got {value!r}")
        self.factor_init  # validates init / zero_mode
        if self.fused_qkv not in FUSED_QKV_MODES:
            raise ConfigError(f"fused_qkv must be one of {FUSED_QKV_MODES}, got {self.fused_qkv!r}")
        for key in ("task_norms", "rank_cap", "train_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")

    @property
    def factor_init(self) -> FactorInit:
        try:
            return FactorInit(self.init, self.init_scale, self.zero_mode)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def validate_task_name(name: Any) -> str:
    """A task name is a non-empty printable string without '.' (it becomes part of parameter
    and adapter-file keys, where '.' separates path components)."""
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        raise TaskError(f"task names must be non-empty printable strings without '.', got {name!r}")
    return name
