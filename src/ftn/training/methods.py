"""Adaptation methods behind one interface, so that one engine trains and compares them all.

A :class:`Method` owns whatever is shared between tasks (FTN: one frozen backbone holding every
task's factors) and hands out a :class:`TrainableTask` per task: its forward, its trainable
parameters (body and head, so the head can get its own learning rate), the BatchNorm layers to
recalibrate, and the live tensors that make up the task's state (for checkpoints and
best-on-validation snapshots). Heads come from the setting (a Linear for classification and
text, DeepLabv3+ decoders for dense), so every method works in every setting.

- ``ftn``: FTN ΔW factors + per-task norms + head on one shared frozen backbone.
- ``full``: full fine-tuning; a complete copy of the backbone per task.
- ``linear``: linear probe; frozen backbone *including* its BatchNorm statistics, head only.
- ``norm_head``: per-task norms (BatchNorm or LayerNorm) + head (FTN with rank 0).
- ``lora``: LoRA from Hugging Face PEFT on every non-grouped Conv/Linear, per-task norms and
  head through ``modules_to_save``; the rank is matched to FTN's ΔW budget unless given
  (``method.lora.*``).
- ``taps``: TAPS (Wallingford et al., CVPR 2022): every adapted layer W + 1[s ≥ τ]·δW with a
  learned gate per layer and task, plus a penalty on the parameters of the layers switched on
  (``method.taps.*``); per-task norms and head as FTN.
- ``ftn_unfreeze``: FTN with partial unfreezing; ``method.ftn.unfreeze`` (the primary interface,
  for ``ftn`` too) or, when empty, the last block of the backbone (:func:`last_block_patterns`).

A new baseline is one class with ``@register`` (here or in any module imported before the config
is read): its class attributes say everything the rest of the system needs — ``label`` (tables),
``default_lr`` / ``default_head_lr`` (the rate the demos and ``ftn sweep``'s grid start from),
``full_size_update`` (a dense update per layer: the text and dense demos start it from full
fine-tuning's settings), ``supports_budget``, ``options`` (a dataclass of its own settings, read as
``method.<its name>.*``) — and ``method.name=<its name>`` then works in every setting,
``ftn train``, ``ftn eval``, ``ftn sweep`` and the demos. :class:`MethodConfig` is the config's
``method`` section: the keys every method shares plus each registered method's options section.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.io import atomic_write_bytes
from ..core.adapters import read_state
from ..core.allocation import budget_count
from ..core.errors import ConfigError, did_you_mean
from ..core.model import FTNConfig, FTNModel
from ..core.norms import is_norm, task_batchnorms
from ..core.updates import GatedDelta

__all__ = ["MethodConfig", "TAPSConfig", "LoRAConfig", "ProximalScoreSGD", "TrainableTask", "Method", "METHODS", "register", "method_class", "make_method", "WithHead",
           "ftn_delta_budget", "lora_targets", "lora_delta_params", "matched_lora_rank"]


@dataclass
class TAPSConfig:
    """``method.taps``: TAPS as its authors run it (Wallingford et al., CVPR 2022; their
    ``models/taps_net.py`` and ``train_sequential.py``), with the step-dependent defaults scaled to
    the schedule instead of fixed for 30 epochs (``docs/baselines.md``).

    - a gate per layer, open while its score s ≥ τ (straight-through gradient to s);
    - scores start just above τ (the original: 0.15 for τ = 0.1, so ``init_score`` = 1.5τ);
    - the penalty is an L1 term on the scores themselves, λ·mean_l |s_l| (the original's
      λ·Σ|s|/L). It pushes a score down only while it is positive, so a closed gate is not
      pushed towards −∞: the task loss's straight-through gradient ⟨∂L/∂W, δW⟩ can reopen it.
      ``weighting=params`` weighs each layer by its share of the gated weights instead
      (λ·Σ_l (n_l/N)·|s_l|: closes large layers first; not the original);
    - the penalty starts after ``warmup`` of the task's steps (the original: 2 of 30 epochs);
    - the scores have their own SGD with momentum 0.9 and no weight decay (the original trains
      everything with SGD, momentum 0.9, weight decay 0). Under SGD a score moves in proportion
      to its gradient, so λ sets how far the penalty pushes, not only its direction (under AdamW
      every score moves by about the learning rate per step whatever λ is);
    - ``score_lr`` None: chosen from the schedule so that the penalty alone at λ = 1 would move a
      score of an average layer by ``score_travel`` over the penalised steps (the original's
      30 epochs move it 2-20 by the same measure; 2 is its low end). A schedule of 50 steps then
      closes gates as one of 1,000 does, instead of never.
    """

    tau: float = 0.1
    penalty: float = 1.0  # λ
    init_score: float | None = None  # None: 1.5τ (just above τ, as the original's 0.15 for τ = 0.1)
    weighting: str = "uniform"  # uniform: λ·mean_l |s_l| (the original) | params: λ·Σ_l (n_l / N)·|s_l|
    warmup: float = 0.1  # fraction of the task's steps trained before the penalty starts
    score_lr: float | None = None  # None: from the schedule and score_travel (see above)
    score_momentum: float = 0.9
    score_travel: float = 2.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Called on every config's validation too: overrides set the fields after construction."""
        if not self.tau > 0:
            raise ConfigError(f"method.taps.tau must be > 0, got {self.tau!r}")
        if self.score_lr is not None and not self.score_lr > 0:
            raise ConfigError(f"method.taps.score_lr must be > 0 (or null: from the schedule), got {self.score_lr!r}")
        if not self.penalty >= 0:
            raise ConfigError(f"method.taps.penalty must be >= 0, got {self.penalty!r}")
        if self.weighting not in ("uniform", "params"):
            raise ConfigError(f"method.taps.weighting must be 'uniform' or 'params', got {self.weighting!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"method.taps.warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not 0 <= self.score_momentum < 1:
            raise ConfigError(f"method.taps.score_momentum must be in [0, 1), got {self.score_momentum!r}")
        if not self.score_travel > 0:
            raise ConfigError(f"method.taps.score_travel must be > 0, got {self.score_travel!r}")
        if self.init_score is not None and not self.init_score >= self.tau:
            raise ConfigError(f"method.taps.init_score ({self.init_score}) must be >= tau ({self.tau}): "
                              "every gate starts open")

    @property
    def start(self) -> float:
        return 1.5 * self.tau if self.init_score is None else self.init_score


@dataclass
class LoRAConfig:
    """``method.lora``: the LoRA rank and scale."""

    rank: int | None = None  # None: matched to FTN's ΔW budget at method.ftn.rank (or to method.budget)
    alpha: float | None = None  # None: equal to the LoRA rank (scale 1)

    def validate(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"method.lora.rank must be >= 1 (or null: matched to FTN's budget), got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"method.lora.alpha must be > 0 (or null: the rank), got {self.alpha!r}")


@dataclass(init=False, eq=False)
class MethodConfig:
    """The ``method`` section of an experiment config: the keys below, which every method reads
    (or may), plus one section per registered method that declares ``options``, under the
    method's name (``method.taps.penalty``, ``method.lora.rank``). The sections are attributes,
    not dataclass fields, because methods register after this class exists (a user's baseline in
    its own module); :meth:`sections` lists them, and the config loader, ``config_to_dict`` and
    equality read them from there. They pickle as attributes, so a spawned worker gets them (and,
    by importing a section's module, the method that declared it).
    """

    name: str = "ftn"  # a key of METHODS: ftn | full | linear | norm_head | lora | taps | ftn_unfreeze
    # FTN's options as the core declares them (rank, rank_pattern, include, exclude, init, ...);
    # ftn.rank is also the budget LoRA is matched to.
    ftn: FTNConfig = field(default_factory=FTNConfig)
    ranks: dict[str, int] = field(default_factory=dict)  # per-task rank, e.g. {edge: 16}
    load_adapters: list[str] = field(default_factory=list)  # tasks trained earlier (FTN adapter files)
    # A ΔW parameter budget per task instead of a rank (docs/allocation.md): a number of
    # parameters, or a fraction in (0, 1) of the backbone's; None = use the rank.
    budget: int | float | None = None
    budget_allocation: str = "auto"  # auto (importance probe + knapsack) | uniform (ranks R and R + 1 spending the budget)
    budget_warm: float = 3.0  # the probe's rank: this many times the uniform rank of the budget (capped)
    budget_probe: float = 0.25  # the probe trains this fraction of the task's steps
    budget_score: str = "taylor"  # taylor (EMA of |a_r·∂L/∂a_r|) | magnitude (‖a‖‖b‖‖c‖/‖W‖)
    budget_init: str = "probe"  # probe (start from the kept components, norms, head) | fresh

    # Keys that moved into a method's section: the loader's error names the new spelling.
    moved_keys: ClassVar[dict[str, str]] = {"lora_rank": "lora.rank", "lora_alpha": "lora.alpha"}

    def __init__(self, **values: Any) -> None:
        """Keyword arguments: the keys above and method sections (``taps=TAPSConfig(...)``);
        what is not given takes its default."""
        for f in fields(self):
            if f.name in values:
                setattr(self, f.name, values.pop(f.name))
            else:
                setattr(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)
        for key, section in self.sections().items():
            if key in values:
                given = values.pop(key)
                if not isinstance(given, type(section)):
                    raise ConfigError(f"method.{key} is a {type(section).__name__}, got {type(given).__name__}")
                setattr(self, key, given)
        if values:
            raise TypeError(f"MethodConfig got unknown keys {sorted(values)}; sections: {sorted(self.sections())}")

    def __getattr__(self, key: str) -> Any:
        # Only reached for a missing attribute: the section of a method registered after this
        # config was made gets its defaults.
        cls = METHODS.get(key) if not key.startswith("_") else None
        if cls is None or cls.options is None:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {key!r}")
        section = self.__dict__[key] = cls.options()
        return section

    def sections(self) -> dict[str, Any]:
        """Each registered method's options section, by method name (created at its defaults
        for a method registered after this config was made)."""
        return {name: getattr(self, name) for name, cls in METHODS.items() if cls.options is not None}

    def validate_sections(self) -> None:
        """Each section's own checks (its ``validate()``, when it has one)."""
        for section in self.sections().values():
            check = getattr(section, "validate", None)
            if check is not None:
                check()

    def __repr__(self) -> str:
        values = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)]
        values += [f"{key}={section!r}" for key, section in self.sections().items()]
        return f"{type(self).__name__}({', '.join(values)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return (all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))
                and self.sections() == other.sections())  # type: ignore[attr-defined]

    def rank_of(self, task: str) -> int:
        return self.ranks.get(task, self.ftn.rank)


class TrainableTask:
    """One task's model as the engine sees it.

    - ``extra_groups`` are optimizer groups of their own (``{"params": [...], "lr": float}``),
      beside the body and head groups; their parameters are in neither of those lists. A group
      with ``"optimizer": factory`` gets the optimizer ``factory(params, lr)`` of its own, outside
      gradient clipping (TAPS's scores).
    - ``on_schedule(total_steps, lr_factor)``, when set, is called by the engine before it builds
      the optimizers, with the task's step count and the learning-rate schedule's factor per step
      (TAPS sets its warm-up and its scores' rate from them).
    """

    def __init__(self, name: str, forward: Callable[..., Any], module: nn.Module,
                 body_params: list[nn.Parameter], head_params: list[nn.Parameter],
                 live_state: Callable[[], dict[str, Tensor]], batchnorms: Callable[[], list[_BatchNorm]],
                 frozen_modules: Iterable[nn.Module] = ()) -> None:
        self.name = name
        self.forward = forward
        self.module = module
        self.body_params = body_params
        self.head_params = head_params
        self._live_state = live_state
        self.batchnorms = batchnorms
        self._frozen_modules = list(frozen_modules)
        self.extra_groups: list[dict[str, Any]] = []
        self.on_schedule: Callable[[int, Callable[[int], float]], None] | None = None

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def train(self) -> None:
        self.module.train()
        for m in self._frozen_modules:  # e.g. the linear probe's backbone keeps its BN statistics
            m.eval()

    def eval(self) -> None:
        self.module.eval()

    @property
    def parameters(self) -> list[nn.Parameter]:
        return self.body_params + self.head_params + [p for g in self.extra_groups for p in g["params"]]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._live_state().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        live = self._live_state()
        if set(live) != set(state):
            raise ConfigError(f"state for task {self.name!r} does not fit: "
                              f"{sorted(set(live) ^ set(state))[:5]}")
        for k, t in live.items():
            t.copy_(state[k])


class WithHead(nn.Module):
    """``head(backbone(*inputs))``: a backbone with any number of inputs, and a head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *inputs: Any) -> Any:
        return self.head(self.backbone(*inputs))


def _batchnorms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


METHODS: dict[str, type[Method]] = {}
_RENAMED = {"bn_head": "norm_head", "ln_head": "norm_head"}  # former names: an error names the new one


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name=<cls.name>`` (and its ``options``
    as ``method.<cls.name>.*``)."""
    if cls.options is not None:
        if not (isinstance(cls.options, type) and is_dataclass(cls.options)):
            raise TypeError(f"{cls.__name__}.options must be a dataclass, got {cls.options!r}")
        if hasattr(MethodConfig, cls.name) or cls.name in MethodConfig.__dataclass_fields__:
            raise TypeError(f"method {cls.name!r} cannot have options: method.{cls.name} is a key of every method")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name in _RENAMED:
        raise ConfigError(f"method {name!r} is now called {_RENAMED[name]!r}: set method.name={_RENAMED[name]}")
    if name not in METHODS:
        raise ConfigError(f"method.name must be one of {sorted(METHODS)}, got {name!r}" + did_you_mean(name, METHODS))
    return METHODS[name]


def make_method(cfg: MethodConfig, backbone: nn.Module, device: torch.device) -> Method:
    return method_class(cfg.name)(backbone, cfg, device)


class Method:
    """A way to adapt one frozen backbone to many tasks; see the module docstring. Subclasses set
    the class attributes below and implement :meth:`add_task`."""

    name: ClassVar[str] = "base"
    label: ClassVar[str] = ""  # its name in tables and plots ("": ``name``)
    # The learning rate the demos train it with and ``ftn sweep``'s default grid is centred on
    # (None: the config's ``train.lr``), and its head's (None: the demos' head rate).
    default_lr: ClassVar[float | None] = None
    default_head_lr: ClassVar[float | None] = None
    # A full-size update per layer (full fine-tuning, TAPS's δW): settings whose demos have a
    # single-task variant start it from full fine-tuning's settings instead of FTN's.
    full_size_update: ClassVar[bool] = False
    supports_budget: ClassVar[bool] = False  # method.budget chooses its ranks (ftn, ftn_unfreeze, lora)
    # A dataclass of this method's own settings, its config section ``method.<name>``
    # (``self.cfg.<name>``); a ``validate()`` on it is run with the config's. None: no section.
    options: ClassVar[type | None] = None

    def __init__(self, backbone: nn.Module, cfg: MethodConfig, device: torch.device) -> None:
        self.pretrained = backbone
        self.backbone_params = _count(backbone)  # before any method changes it
        self.cfg = cfg
        self.device = device
        self.tasks: dict[str, TrainableTask] = {}
        # The FTNModel holding the tasks' factorized updates (FTN and the methods built on it),
        # for what works on factors: budgets, recomputation; None for the other methods.
        self.factorized: FTNModel | None = None

    @classmethod
    def display_name(cls) -> str:
        return cls.label or cls.name

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        """Add task ``name`` with its ``head``; ``ranks`` (per-layer ranks chosen for a budget,
        ``spec`` recording how) only for methods with ``supports_budget`` and a factorized model."""
        raise NotImplementedError

    def remove_task(self, name: str) -> None:
        self.tasks.pop(name, None)

    def reject_ranks(self, ranks: dict[str, int] | None) -> None:
        if ranks is not None:
            raise ConfigError(f"method {self.name!r} takes no per-layer ranks")

    def load_task(self, name: str, head: nn.Module, path: str | Path) -> TrainableTask:
        """Add a task trained earlier from the file :meth:`save_task` wrote."""
        task = self.add_task(name, head)
        try:  # keys and shapes checked from the file's header before a tensor is read
            task.load_state_dict(read_state(path, task.state_dict(), self.device))
        except Exception:
            self.remove_task(name)
            raise
        return task

    def save_task(self, name: str, folder: Path, info: dict[str, Any] | None = None) -> Path:
        """Write the task's own tensors (safetensors); FTN writes a full adapter file instead
        (with ``info``: labels, input preparation and outputs, read by ``ftn predict`` / ``ftn serve``)."""
        path = folder / f"{name}.safetensors"
        state = {k: v.cpu().contiguous() for k, v in self.tasks[name].state_dict().items()}
        return atomic_write_bytes(path, st_save(state, metadata={"method": self.name, "task": name}))

    def info(self) -> dict[str, Any]:
        """What a results file should say about this method's set-up (e.g. the LoRA rank)."""
        return {}

    def shared_parameters(self) -> int:
        """Parameters stored once whatever the number of tasks (the frozen backbone)."""
        return self.backbone_params

    def task_parameters(self, name: str) -> int:
        """Parameters stored for task ``name`` on top of the shared ones."""
        return self.tasks[name].num_trainable()

    def stored_parameters(self) -> int:
        return self.shared_parameters() + sum(self.task_parameters(t) for t in self.tasks)


def ftn_options(cfg: MethodConfig) -> FTNConfig:
    return FTNConfig(**asdict(cfg.ftn))


def ftn_delta_budget(backbone: nn.Module, config: FTNConfig | None = None, rank: int | None = None) -> int:
    """FTN's ΔW parameters for one task at ``rank`` (default: the config's) on ``backbone``:
    the budget LoRA and the other baselines are matched to. The backbone is not changed."""
    probe = FTNModel(copy.deepcopy(backbone), config=config or FTNConfig())
    probe.add_task("probe", rank=rank)
    return probe.parameter_report().tasks["probe"].delta


@register
class FTNMethod(Method):
    name = "ftn"
    label = "FTN"
    default_lr = 3e-3
    supports_budget = True
    rank: ClassVar[int | None] = None  # None: method.ranks / method.ftn.rank

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.model = self.factorized = FTNModel(backbone, config=ftn_options(cfg)).to(device)

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        """The task at the config's rank, or at per-layer ``ranks`` chosen for a budget (``spec``
        records how, see ``FTNModel.task_spec``)."""
        if ranks is not None:
            self.model.add_task_with_ranks(name, {n: (r, r) for n, r in ranks.items()}, head.to(self.device),
                                           spec=spec)
            return self._trainable_task(name)
        rank = self.cfg.rank_of(name) if self.rank is None else self.rank
        self.model.add_task(name, head=head.to(self.device), rank=rank)
        return self._trainable_task(name)

    def remove_task(self, name: str) -> None:
        self.model.remove_task(name)
        super().remove_task(name)

    def load_task(self, name: str, head: nn.Module, path: str | Path) -> TrainableTask:
        self.model.load_task(path, name=name, head=head.to(self.device))
        return self._trainable_task(name)

    def _trainable_task(self, name: str) -> TrainableTask:
        model = self.model
        head_ids = {id(p) for p in model.heads[name].parameters()}
        params = model.task_parameters(name)

        def live_state() -> dict[str, Tensor]:
            state = dict(model.named_task_parameters(name))
            for layer_name, norm in model.task_norm_layers().items():
                for key, buf in norm.tasks[name].named_buffers():
                    state[f"norm.{layer_name}.{key}"] = buf
            state.update({f"head.{k}": b for k, b in model.heads[name].named_buffers()})  # e.g. decoder BNs
            return state

        task = TrainableTask(name, lambda *x: model(*x, task=name), model,
                             [p for p in params if id(p) not in head_ids],
                             [p for p in params if id(p) in head_ids], live_state,
                             lambda: task_batchnorms(model, name))
        self.tasks[name] = task
        return task

    def info(self) -> dict[str, Any]:
        """``rank`` / ``ranks``: the configured rank and per-task ranks (what a task without a
        budget asks for); ``tasks``: per task, what it actually got — ``delta_parameters`` (the
        ΔW it stores), ``budget`` (ΔW parameters, None without one) and ``ranks``
        (:func:`task_rank_summary`). :func:`delta_used` reads the ΔW back for a table."""
        info: dict[str, Any] = {"rank": self.rank if self.rank is not None else self.cfg.ftn.rank,
                                "ranks": dict(self.cfg.ranks)}
        if self.model.config.unfreeze:
            info["unfreeze"] = list(self.model.config.unfreeze)
        report = self.model.parameter_report()
        info["tasks"] = {name: {"delta_parameters": report.tasks[name].delta, "budget": report.tasks[name].budget,
                                "ranks": task_rank_summary(self.model, name)}
                         for name in self.tasks if name in report.tasks}
        return info

    def shared_parameters(self) -> int:
        return self.model.parameter_report().backbone

    def task_parameters(self, name: str) -> int:
        return self.model.parameter_report().tasks[name].total

    def save_task(self, name: str, folder: Path, info: dict[str, Any] | None = None) -> Path:
        return self.model.save_task(name, folder / f"{name}.safetensors", info=info)


def task_rank_summary(model: FTNModel, task: str) -> dict[str, Any]:
    """The CP ranks task ``task`` got over the model's adapted layers (0: not adapted; layers
    with a dense update, e.g. unfrozen ones, are counted in ``dense_layers`` instead):
    ``min``, ``max``, ``mean`` and ``counts`` (``{"rank": number of layers}``)."""
    ranks, dense = [], 0
    for layer in model.adapted_layers().values():
        update = layer.tasks[task] if task in layer.tasks else None
        if update is not None and update.kind != "cp":
            dense += 1
        else:
            ranks.append(layer.rank(task))
    counts: dict[str, int] = {}
    for r in sorted(ranks):
        counts[str(r)] = counts.get(str(r), 0) + 1
    out: dict[str, Any] = {"min": min(ranks, default=0), "max": max(ranks, default=0),
                           "mean": round(sum(ranks) / len(ranks), 3) if ranks else 0.0, "counts": counts}
    if dense:
        out["dense_layers"] = dense
    return out


def delta_used(method_info: dict[str, Any]) -> int | None:
    """The ΔW parameters a run's tasks actually stored, mean over its tasks (rounded), from its
    ``method_info`` (``results.json``; a sweep group's ``method_info``); None where the method
    does not report them per task (LoRA, full fine-tuning, results written before they were)."""
    tasks = (method_info or {}).get("tasks") or {}
    values = [t.get("delta_parameters") for t in tasks.values() if isinstance(t, dict)]
    if not values or any(not isinstance(v, int) for v in values):
        return None
    return round(sum(values) / len(values))


@register
class NormHeadMethod(FTNMethod):
    """Per-task norms (BatchNorm, LayerNorm, GroupNorm) and head only: FTN with rank 0."""

    name = "norm_head"
    label = "BN + head"
    supports_budget = False
    rank = 0


def last_block_patterns(model: FTNModel) -> list[str]:
    """Globs for the adapted layers of the backbone's last block: from the root, go down while
    only one child holds adapted layers, then take the last child that does (ResNet: ``layer4``;
    torchvision MobileNetV2: ``features.18``; a plain Sequential of convs: its last conv)."""
    names = list(model.adapted_layers())

    def holds(prefix: str) -> bool:
        return any(n == prefix or n.startswith(prefix + ".") for n in names)

    module, prefix, children = model.backbone, "", []
    while True:
        children = [(c, m) for c, m in module.named_children() if holds(prefix + c)]
        if len(children) != 1:
            break
        module, prefix = children[0][1], f"{prefix}{children[0][0]}."
    last = prefix + children[-1][0] if children else prefix.rstrip(".")
    return [last, f"{last}.*"]


@register
class FTNUnfreezeMethod(FTNMethod):
    """FTN with partial unfreezing: dense per-task updates on ``method.ftn.unfreeze``, or on the
    backbone's last block (:func:`last_block_patterns`) when that is empty; CP ΔW elsewhere."""

    name = "ftn_unfreeze"
    label = "FTN + last block unfrozen"

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.unfreeze = list(cfg.ftn.unfreeze) or last_block_patterns(self.model)
        self.model.config.unfreeze = self.unfreeze


class ProximalScoreSGD(torch.optim.Optimizer):
    """SGD with momentum for TAPS's scores, with the L1 penalty λ·Σ_l w_l·|s_l| applied as its
    proximal step (soft-thresholding towards 0) after ``warmup_steps``.

    Why not the penalty's subgradient in the loss, as the original writes it: with momentum, a
    constant push of λ·w_l overshoots 0 and oscillates around it with an amplitude that grows
    with λ; over a short schedule, at a large λ, scores end above τ at random and gates reopen
    that the penalty should keep shut (measured: 0 of 6 on at λ = 3, 6 of 6 on at λ = 30). The
    proximal step minimises the same objective without the overshoot: it shrinks a score by
    lr·λ·w_l/(1 − μ) per step (the subgradient's distance per step once momentum has built up,
    so λ trades against the task gradient as in the original) and stops at 0. A score at 0 is
    closed but not pushed further: the task gradient ⟨∂L/∂W, δW⟩ can reopen it."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, penalty: float,
                 weights: list[float], warmup_steps: int) -> None:
        if len(weights) != len(params):
            raise ValueError("one penalty weight per score")
        super().__init__([{"params": list(params), "weights": list(weights)}],
                         {"lr": lr, "momentum": momentum, "penalty": penalty, "warmup_steps": warmup_steps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        # One multi-tensor op per term over all the scores (one per adapted layer), not a few
        # scalar ops per score: on a GPU each would be a kernel launch. The arithmetic is the
        # per-score loop's: buf = μ·buf + g; s -= lr·buf; s = sign(s)·max(|s| − shrink, 0).
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            params, weights = group["params"], group["weights"]
            for p in params:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                fresh = [p for p in with_grad if "momentum_buffer" not in self.state[p]]
                old = [p for p in with_grad if "momentum_buffer" in self.state[p]]
                if fresh:
                    for p, buf in zip(fresh, torch._foreach_clone([p.grad.detach() for p in fresh])):
                        self.state[p]["momentum_buffer"] = buf
                if old:
                    bufs = [self.state[p]["momentum_buffer"] for p in old]
                    torch._foreach_mul_(bufs, mu)
                    torch._foreach_add_(bufs, [p.grad for p in old])
                torch._foreach_sub_(with_grad, torch._foreach_mul([self.state[p]["momentum_buffer"]
                                                                    for p in with_grad], lr))
            if group["penalty"]:
                due = [(p, w) for p, w in zip(params, weights) if self.state[p]["step"] > group["warmup_steps"]]
                if due:
                    scores = [p for p, _ in due]
                    shrink = [lr * group["penalty"] * w / (1 - mu) for _, w in due]
                    kept = torch._foreach_abs(scores)
                    torch._foreach_sub_(kept, shrink)
                    torch._foreach_clamp_min_(kept, 0)
                    torch._foreach_mul_(kept, torch._foreach_sign(scores))
                    torch._foreach_copy_(scores, kept)


@register
class TAPSMethod(FTNMethod):
    """TAPS (Wallingford et al., CVPR 2022) on the FTN machinery: every adapted layer is
    W + 1[s ≥ τ]·δW (:class:`ftn.core.updates.GatedDelta`, δW dense and zero at start, s one learned
    score per layer and task, straight-through gradient), per-task norms and head as FTN, and the
    scores minimise the task loss + λ·Σ_l w_l·|s_l| after the warm-up (:class:`TAPSConfig`:
    w_l = 1/L as the original, or n_l/N) with their own optimizer
    (:class:`ProximalScoreSGD`). Layers matching ``method.ftn.unfreeze`` are dense and always on.
    Only the layers switched on are stored (adapter file, parameter report)."""

    name = "taps"
    label = "TAPS"
    options = TAPSConfig
    # Its updates are dense and gated, not ranked: a ΔW budget has no ranks to choose here
    # (the per-layer ranks a budget yields are refused by add_task).
    supports_budget = False
    default_lr = 5e-4  # its updates are dense like full fine-tuning's: full fine-tuning's rate
    full_size_update = True

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.score_lrs: dict[str, float] = {}  # per task: the scores' rate used (chosen from the schedule)

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        taps = self.cfg.taps
        self.model.add_task(name, head=head.to(self.device), gate={"tau": taps.tau, "init_score": taps.start})
        task = self._trainable_task(name)
        gates = list(self.gates(name).values())
        ids = {id(g.score) for g in gates}
        task.body_params = [p for p in task.body_params if id(p) not in ids]
        weights = self.penalty_weights(name)
        warmup = {"steps": 0}

        def make_optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            return ProximalScoreSGD(params, lr=lr, momentum=taps.score_momentum, penalty=taps.penalty,
                                    weights=weights, warmup_steps=warmup["steps"])

        group: dict[str, Any] = {"params": [g.score for g in gates], "lr": taps.score_lr or 0.0,
                                 "optimizer": make_optimizer}
        task.extra_groups.append(group)

        def on_schedule(total_steps: int, lr_factor: Callable[[int], float]) -> None:
            warmup["steps"] = int(round(taps.warmup * total_steps))
            if taps.score_lr is None:
                group["lr"] = self.auto_score_lr(len(gates), total_steps, warmup["steps"], lr_factor)
            self.score_lrs[name] = group["lr"]

        task.on_schedule = on_schedule
        return task

    def penalty_weights(self, name: str) -> list[float]:
        """w_l per gated layer: 1/L (the original's Σ|s|/L), or n_l/N with ``weighting=params``."""
        sizes = [g.weight.numel() for g in self.gates(name).values()]
        if self.cfg.taps.weighting == "params":
            return [n / sum(sizes) for n in sizes]
        return [1 / len(sizes)] * len(sizes) if sizes else []

    def penalty(self, name: str) -> float:
        """λ·Σ_l w_l·|s_l|: the penalty the scores' optimizer minimises (reported, not backpropagated)."""
        gates = list(self.gates(name).values())
        return self.cfg.taps.penalty * sum(w * abs(float(g.score.detach()))
                                           for w, g in zip(self.penalty_weights(name), gates))

    def auto_score_lr(self, layers: int, total_steps: int, warmup_steps: int, lr_factor: Callable[[int], float]) -> float:
        """The scores' rate at which the penalty alone at λ = 1 moves the score of a layer of
        average weight (1/L) by ``score_travel`` over the penalised steps: under SGD with momentum
        μ a constant gradient g moves a parameter by lr·g/(1 − μ) per step once the momentum has
        built up, and the rate follows the schedule's factor f(t)."""
        taps = self.cfg.taps
        summed = sum(lr_factor(t) for t in range(warmup_steps, total_steps))
        if not layers or summed <= 0:
            return 0.0
        return taps.score_travel * layers * (1 - taps.score_momentum) / summed

    def gates(self, name: str) -> dict[str, GatedDelta]:
        return {ln: layer.tasks[name] for ln, layer in self.model.adapted_layers().items()
                if name in layer.tasks and isinstance(layer.tasks[name], GatedDelta)}

    def info(self) -> dict[str, Any]:
        report = self.model.parameter_report()
        tasks = {}
        for name in self.tasks:
            gates = self.gates(name)
            on = [ln for ln, g in gates.items() if g.active]
            tasks[name] = {"adapted_layers": len(on), "gated_layers": len(gates),
                           "adapted_parameters": sum(gates[ln].num_params() for ln in on),
                           "delta_parameters": report.tasks[name].delta,
                           "score_lr": self.score_lrs.get(name), "penalty_value": self.penalty(name),
                           "scores": {ln: round(float(g.score.detach()), 5) for ln, g in gates.items()}}
        taps = self.cfg.taps
        return {"tau": taps.tau, "penalty": taps.penalty, "weighting": taps.weighting, "warmup": taps.warmup,
                "init_score": taps.start, "score_lr": taps.score_lr, "score_momentum": taps.score_momentum,
                "score_travel": taps.score_travel, "tasks": tasks}


@register
class LinearProbeMethod(Method):
    name = "linear"
    label = "linear probe"
    default_lr = default_head_lr = 1e-2  # its only parameters are the head

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.backbone = backbone.to(device).requires_grad_(False).eval()

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        module = WithHead(self.backbone, head.to(self.device))
        task = TrainableTask(name, module, module, [], list(head.parameters()),
                             lambda: head.state_dict(keep_vars=True), lambda: [], frozen_modules=[self.backbone])
        self.tasks[name] = task
        return task


@register
class FullFineTuneMethod(Method):
    name = "full"
    label = "full fine-tuning"
    default_lr = 5e-4
    full_size_update = True

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        backbone = copy.deepcopy(self.pretrained).requires_grad_(True)
        module = WithHead(backbone, head).to(self.device)
        task = TrainableTask(name, module, module, list(backbone.parameters()), list(head.parameters()),
                             lambda: module.state_dict(keep_vars=True), lambda: _batchnorms(backbone))
        self.tasks[name] = task
        return task

    def shared_parameters(self) -> int:
        return 0  # nothing is shared: every task stores a whole network


def lora_targets(module: nn.Module, prefix: str) -> list[str]:
    # PEFT's conv LoRA needs the rank divisible by `groups`; grouped/depthwise convs are skipped.
    return [f"{prefix}{n}" for n, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1]


def lora_delta_params(backbone: nn.Module, rank: int) -> int:
    """LoRA parameters at ``rank`` as PEFT builds them: A is a conv C_in→R with the layer's
    kernel, B a 1×1 conv R→C_out; for Linear R·(in + out)."""
    total = 0
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        elif isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
    return total


def matched_lora_rank(backbone: nn.Module, budget: int) -> int:
    """The LoRA rank whose ΔW parameter count is closest to ``budget``."""
    per_rank = lora_delta_params(backbone, 1)
    return max(1, round(budget / per_rank)) if per_rank else 1


@register
class LoRAMethod(Method):
    name = "lora"
    label = "LoRA (PEFT)"
    default_lr = 3e-3
    supports_budget = True  # the LoRA rank closest to the budget (uniform only)
    options = LoRAConfig

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("method 'lora' needs Hugging Face PEFT: pip install 'factorized-tensor-networks[peft]'") from None
        lora = cfg.lora
        if lora.rank is None and cfg.budget is not None:  # the same ΔW budget as FTN's
            self.lora_rank = matched_lora_rank(backbone, budget_count(cfg.budget, self.backbone_params))
        elif lora.rank is None:
            self.lora_rank = matched_lora_rank(backbone, ftn_delta_budget(backbone, ftn_options(cfg)))
        else:
            self.lora_rank = lora.rank
        self.lora_alpha = lora.alpha if lora.alpha is not None else float(self.lora_rank)

    def info(self) -> dict[str, Any]:
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        import peft

        module = WithHead(copy.deepcopy(self.pretrained), head)
        norms = [n for n, m in module.backbone.named_modules(prefix="backbone") if is_norm(m)]
        # PEFT's modules_to_save refuses containers (the dense setting's head is a ModuleDict of
        # decoders). The head is this task's own module anyway, so a container is simply left
        # trainable, and its buffers (decoder BatchNorms) are saved with the task.
        own_head = isinstance(head, (nn.ModuleDict, nn.ModuleList))
        config = peft.LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha,
                                 target_modules=lora_targets(module.backbone, "backbone."),
                                 modules_to_save=norms + ([] if own_head else ["head"]))
        model = peft.get_peft_model(module, config).to(self.device)
        if own_head:
            model.get_base_model().head.requires_grad_(True)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def live_state() -> dict[str, Tensor]:
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            state.update({n: b for n, b in model.named_buffers()
                          if "modules_to_save" in n or (own_head and ".head." in n)})
            return state

        task = TrainableTask(
            name, model, model,
            [p for n, p in trainable if ".head." not in n], [p for n, p in trainable if ".head." in n],
            live_state,
            lambda: [m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and "modules_to_save" in n
                     and ".head." not in n])
        self.tasks[name] = task
        return task
