"""`FTNPeftConfig`: an FTN adapter's settings in PEFT's form (saved as ``adapter_config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..core.config import FTNConfig
from ..core.errors import ConfigError
from ..core.updates import FactorInit
from .registry import peft_type

__all__ = ["FTNPeftConfig"]


@dataclass
class FTNPeftConfig(PeftConfig):
    """An FTN adapter (one FTN task) for PEFT.

    Args:
        r: CP rank of ΔW on every targeted Conv/Linear layer.
        target_modules: the Conv1d/2d/3d and Linear layers to adapt, in PEFT's form: a list of
            names (a name matches itself and every module whose name ends in ``.<name>``), a
            regular expression matched against whole module names, or ``"all-linear"``.
        exclude_modules: modules never adapted (same forms); excluded norm layers keep no copy.
        rank_pattern: ``{pattern: rank}`` overriding ``r`` per layer, matched as PEFT does
            (a regular expression matching the end of the module name, first match wins);
            rank 0 leaves the layer unadapted for this adapter.
        task_norms: give the adapter its own trainable copy of every normalisation layer
            (BatchNorm with its own running statistics, LayerNorm, GroupNorm, RMSNorm), as FTN
            does; the pretrained norms stay frozen (BatchNorm always in eval mode).
        modules_to_save: modules trained and saved whole per adapter (a task's head).
        init, init_scale, zero_mode: how factors start (:class:`ftn.core.updates.FactorInit`);
            the ``zero_mode`` factor starts at zero, so ΔW = 0 and the adapter starts exactly at
            the base model.
        rank_cap: lower a layer's rank where its factors would hold as many numbers as a dense
            ΔW (depthwise convs); the parameter report lists every cap.
        fast_backward: how training back-propagates into the factors
            (:attr:`ftn.core.layers.FTNLayer.fast_backward`): None chooses per layer.
    """

    r: int = field(default=8, metadata={"help": "CP rank of ΔW on each targeted layer"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Conv/Linear module names (or suffixes), a regex, or 'all-linear'"})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names (or suffixes) or a regex never adapted"})
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "{pattern: rank} per layer (PEFT's matching); 0 = not adapted"})
    task_norms: bool = field(default=True, metadata={"help": "a per-adapter copy of every norm layer"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained and saved whole per adapter, e.g. the head"})
    init: str = field(default="orthogonal", metadata={"help": "orthogonal, normal or uniform"})
    init_scale: float = field(default=1.0, metadata={"help": "scale of the factors that do not start at zero"})
    zero_mode: int = field(default=0, metadata={"help": "the factor that starts at zero (0: output mode)"})
    rank_cap: bool = field(default=True, metadata={"help": "cap ranks where factors outgrow a dense ΔW"})
    fast_backward: Optional[bool] = field(
        default=None, metadata={"help": "None: per layer; True: thin-contraction backward; False: autograd"})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "only these layer indices (PEFT's meaning)"})
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "the name of the layer list for layers_to_transform"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict {{pattern: rank}}, got {self.rank_pattern!r}")
        if self.fast_backward is not None and not isinstance(self.fast_backward, bool):
            raise ConfigError(f"fast_backward must be true, false or null, got {self.fast_backward!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string")
        # The values ftn's own config accepts, checked by it (ConfigError naming the bad one).
        self.ftn_config()

    def ftn_config(self) -> FTNConfig:
        """These settings as ftn's :class:`~ftn.core.config.FTNConfig` (validated)."""
        return FTNConfig(rank=self.r, rank_pattern=dict(self.rank_pattern), task_norms=self.task_norms,
                         init=self.init, init_scale=self.init_scale, zero_mode=self.zero_mode,
                         rank_cap=self.rank_cap)

    @property
    def factor_init(self) -> FactorInit:
        return self.ftn_config().factor_init
