"""Adaptation methods behind one interface, so that one engine trains and compares them all.

A :class:`Method` owns whatever is shared between tasks (FTN: one frozen backbone holding every
task's factors) and hands out a :class:`TaskModel` per task: its forward, its trainable
parameters (body and head, so the head can get its own learning rate), the BatchNorm layers to
recalibrate, and the live tensors that make up the task's state (for checkpoints and
best-on-validation snapshots). Heads come from the setting (a Linear for classification and
text, DeepLabv3+ decoders for dense), so every method works in every setting.

- ``ftn``: FTN ΔW factors + per-task norms + head on one shared frozen backbone.
- ``full``: full fine-tuning; a complete copy of the backbone per task.
- ``linear``: linear probe; frozen backbone *including* its BatchNorm statistics, head only.
- ``norm_head``: per-task norms (BatchNorm or LayerNorm) + head (FTN with rank 0).
- ``lora``: LoRA from Hugging Face PEFT on every non-grouped Conv/Linear, per-task norms and
  head through ``modules_to_save``; the rank is matched to FTN's ΔW budget unless given.
- ``taps``: TAPS (Wallingford et al., CVPR 2022): every adapted layer W + 1[s ≥ τ]·δW with a
  learned gate per layer and task, plus a penalty on the parameters of the layers switched on
  (``method.taps.*``); per-task norms and head as FTN.
- ``ftn_unfreeze``: FTN with partial unfreezing; ``method.ftn.unfreeze`` (the primary interface,
  for ``ftn`` too) or, when empty, the last block of the backbone (:func:`last_block_patterns`).

A new baseline is one class here with ``@register``; ``method.name=<its name>`` then works in
every setting, ``ftn train``, ``ftn eval`` and the demos. :class:`MethodConfig` is the config's
``method`` section.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..adapters import atomic_write_bytes
from ..errors import ConfigError, did_you_mean
from ..model import FTNConfig, FTNModel
from ..norms import is_norm
from ..updates import GatedDelta

__all__ = ["MethodConfig", "TAPSConfig", "TaskModel", "Method", "METHODS", "register", "method_class", "make_method", "WithHead",
           "ftn_delta_budget", "lora_targets", "lora_delta_params", "matched_lora_rank"]


@dataclass
class TAPSConfig:
    """``method.taps``: TAPS's gate threshold τ, penalty weight λ and initial score (None: 2τ)."""

    tau: float = 0.1
    penalty: float = 1.0  # λ in λ·Σ_l (n_l / N)·1[s_l ≥ τ]
    init_score: float | None = None
    # The scores' own learning rate (None: train.lr, as the weights). Under AdamW a score moves by
    # about its learning rate per step, so with s₀ = 2τ a gate can only close after ~τ / lr steps:
    # a short schedule at a fine-tuning rate closes none (the embedded sweep's TAPS kept 52/52 on).
    score_lr: float | None = None

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ConfigError(f"method.taps.tau must be > 0, got {self.tau!r}")
        if self.score_lr is not None and not self.score_lr > 0:
            raise ConfigError(f"method.taps.score_lr must be > 0 (or null), got {self.score_lr!r}")
        if not self.penalty >= 0:
            raise ConfigError(f"method.taps.penalty must be >= 0, got {self.penalty!r}")


@dataclass
class MethodConfig:
    """The ``method`` section of an experiment config."""

    name: str = "ftn"  # a key of METHODS: ftn | full | linear | norm_head | lora | taps | ftn_unfreeze
    # FTN's options as the core declares them (rank, rank_pattern, include, exclude, init, ...);
    # ftn.rank is also the budget LoRA is matched to.
    ftn: FTNConfig = field(default_factory=FTNConfig)
    ranks: dict[str, int] = field(default_factory=dict)  # per-task rank, e.g. {edge: 16}
    lora_rank: int | None = None  # None: matched to FTN's ΔW budget at ftn.rank
    lora_alpha: float | None = None  # None: equal to the LoRA rank (scale 1)
    load_adapters: list[str] = field(default_factory=list)  # tasks trained earlier (FTN adapter files)
    taps: TAPSConfig = field(default_factory=TAPSConfig)
    # A ΔW parameter budget per task instead of a rank (docs/allocation.md): a number of
    # parameters, or a fraction in (0, 1) of the backbone's; None = use the rank.
    budget: int | float | None = None
    budget_allocation: str = "auto"  # auto (importance probe + knapsack) | uniform (largest single rank)
    budget_warm: float = 3.0  # the probe's rank: this many times the uniform rank of the budget (capped)
    budget_probe: float = 0.25  # the probe trains this fraction of the task's steps
    budget_score: str = "taylor"  # taylor (EMA of |a_r·∂L/∂a_r|) | magnitude (‖a‖‖b‖‖c‖/‖W‖)
    budget_init: str = "probe"  # probe (start from the kept components, norms, head) | fresh

    def rank_of(self, task: str) -> int:
        return self.ranks.get(task, self.ftn.rank)


class TaskModel:
    """One task's model as the engine sees it. ``regularizer``, when set, is a term the engine
    adds to every training loss (TAPS's sparsity penalty). ``extra_groups`` are optimizer groups
    of their own (``{"params": [...], "lr": float}``, e.g. TAPS's scores), beside the body and
    head groups; their parameters are in neither of those lists."""

    def __init__(self, name: str, forward: Callable[..., Any], module: nn.Module,
                 body_params: list[nn.Parameter], head_params: list[nn.Parameter],
                 live_state: Callable[[], dict[str, Tensor]], batchnorms: Callable[[], list[_BatchNorm]],
                 frozen_modules: Iterable[nn.Module] = (), regularizer: Callable[[], Tensor] | None = None) -> None:
        self.name = name
        self.forward = forward
        self.module = module
        self.body_params = body_params
        self.head_params = head_params
        self._live_state = live_state
        self.batchnorms = batchnorms
        self._frozen_modules = list(frozen_modules)
        self.regularizer = regularizer
        self.extra_groups: list[dict[str, Any]] = []

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
_ALIASES = {"bn_head": "norm_head", "ln_head": "norm_head"}  # deprecated names


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name=<cls.name>``."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name in _ALIASES:
        warnings.warn(f"method {name!r} is now called {_ALIASES[name]!r}", DeprecationWarning, stacklevel=2)
        name = _ALIASES[name]
    if name not in METHODS:
        raise ConfigError(f"method.name must be one of {sorted(METHODS)}, got {name!r}" + did_you_mean(name, METHODS))
    return METHODS[name]


def make_method(cfg: MethodConfig, backbone: nn.Module, device: torch.device) -> Method:
    return method_class(cfg.name)(backbone, cfg, device)


class Method:
    name: ClassVar[str] = "base"
    supports_budget: ClassVar[bool] = False  # method.budget chooses its ranks (ftn, lora)

    def __init__(self, backbone: nn.Module, cfg: MethodConfig, device: torch.device) -> None:
        self.pretrained = backbone
        self.backbone_params = _count(backbone)  # before any method changes it
        self.cfg = cfg
        self.device = device
        self.tasks: dict[str, TaskModel] = {}

    def add_task(self, name: str, head: nn.Module) -> TaskModel:
        raise NotImplementedError

    def load_task(self, name: str, head: nn.Module, path: str | Path) -> TaskModel:
        """Add a task trained earlier from the file :meth:`save_task` wrote."""
        task = self.add_task(name, head)
        task.load_state_dict(st_load(str(path), device=str(self.device)))
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
    supports_budget = True
    rank: int | None = None  # None: method.ranks / method.ftn.rank

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.model = FTNModel(backbone, config=ftn_options(cfg)).to(device)

    def add_task(self, name: str, head: nn.Module, rank: int | None = None,
                 ranks: dict[str, int] | None = None, spec: dict[str, Any] | None = None) -> TaskModel:
        """The task at ``rank`` (default: the config's), or at per-layer ``ranks`` chosen for a
        budget (``spec`` records how, see ``FTNModel.task_spec``)."""
        if ranks is not None:
            self.model.add_task_with_ranks(name, {n: (r, r) for n, r in ranks.items()}, head.to(self.device),
                                           spec=spec)
            return self._task_model(name)
        if rank is None:
            rank = self.cfg.rank_of(name) if self.rank is None else self.rank
        self.model.add_task(name, head=head.to(self.device), rank=rank)
        return self._task_model(name)

    def remove_task(self, name: str) -> None:
        self.model.remove_task(name)
        self.tasks.pop(name, None)

    def load_task(self, name: str, head: nn.Module, path: str | Path) -> TaskModel:
        self.model.load_task(path, name=name, head=head.to(self.device))
        return self._task_model(name)

    def _task_model(self, name: str) -> TaskModel:
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

        task = TaskModel(name, lambda *x: model(*x, task=name), model,
                         [p for p in params if id(p) not in head_ids],
                         [p for p in params if id(p) in head_ids], live_state,
                         lambda: model.task_batchnorms(name))
        self.tasks[name] = task
        return task

    def info(self) -> dict[str, Any]:
        info = {"rank": self.rank if self.rank is not None else self.cfg.ftn.rank, "ranks": dict(self.cfg.ranks)}
        if self.model.config.unfreeze:
            info["unfreeze"] = list(self.model.config.unfreeze)
        return info

    def shared_parameters(self) -> int:
        return self.model.parameter_report().backbone

    def task_parameters(self, name: str) -> int:
        return self.model.parameter_report().tasks[name].total

    def save_task(self, name: str, folder: Path, info: dict[str, Any] | None = None) -> Path:
        return self.model.save_task(name, folder / f"{name}.safetensors", info=info)


@register
class NormHeadMethod(FTNMethod):
    """Per-task norms (BatchNorm, LayerNorm, GroupNorm) and head only: FTN with rank 0."""

    name = "norm_head"
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

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.unfreeze = list(cfg.ftn.unfreeze) or last_block_patterns(self.model)
        self.model.config.unfreeze = self.unfreeze


@register
class TAPSMethod(FTNMethod):
    """TAPS (Wallingford et al., CVPR 2022) on the FTN machinery: every adapted layer is
    W + 1[s ≥ τ]·δW (:class:`ftn.updates.GatedDelta`, δW dense and zero at start, s one learned
    score per layer and task, straight-through gradient), per-task norms and head as FTN, and
    the training loss gets λ·Σ_l (n_l / N)·1[s_l ≥ τ] (n_l: the layer's weight size, N: their
    sum), whose straight-through gradient λ·n_l/N pushes every score down, most for the largest
    layers. Layers matching ``method.ftn.unfreeze`` are dense and always on. Only the layers
    switched on are stored (adapter file, parameter report)."""

    name = "taps"

    def add_task(self, name: str, head: nn.Module) -> TaskModel:
        taps = self.cfg.taps
        self.model.add_task(name, head=head.to(self.device), gate={"tau": taps.tau, "init_score": taps.init_score})
        task = self._task_model(name)
        task.regularizer = lambda: taps.penalty * self.gated_fraction(name)
        if taps.score_lr is not None:
            scores = {id(g.score) for g in self.gates(name).values()}
            task.extra_groups.append({"params": [p for p in task.body_params if id(p) in scores], "lr": taps.score_lr})
            task.body_params = [p for p in task.body_params if id(p) not in scores]
        return task

    def gates(self, name: str) -> dict[str, GatedDelta]:
        return {ln: layer.tasks[name] for ln, layer in self.model.adapted_layers().items()
                if name in layer.tasks and isinstance(layer.tasks[name], GatedDelta)}

    def gated_fraction(self, name: str) -> Tensor:
        """Σ_l (n_l / N)·1[s_l ≥ τ] over the task's gated layers: the fraction of their weights
        switched on, with the straight-through gradient n_l / N for each score."""
        gates = list(self.gates(name).values())
        total = sum(g.weight.numel() for g in gates)
        if not total:
            return torch.zeros((), device=self.device)
        return sum(g.gate() * (g.weight.numel() / total) for g in gates)

    def info(self) -> dict[str, Any]:
        report = self.model.parameter_report()
        tasks = {}
        for name in self.tasks:
            gates = self.gates(name)
            on = [ln for ln, g in gates.items() if g.active]
            tasks[name] = {"adapted_layers": len(on), "gated_layers": len(gates),
                           "adapted_parameters": sum(gates[ln].num_params() for ln in on),
                           "delta_parameters": report.tasks[name].delta}
        return {"tau": self.cfg.taps.tau, "penalty": self.cfg.taps.penalty, "score_lr": self.cfg.taps.score_lr,
                "tasks": tasks}


@register
class LinearProbeMethod(Method):
    name = "linear"

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        self.backbone = backbone.to(device).requires_grad_(False).eval()

    def add_task(self, name: str, head: nn.Module) -> TaskModel:
        module = WithHead(self.backbone, head.to(self.device))
        task = TaskModel(name, module, module, [], list(head.parameters()),
                         lambda: head.state_dict(keep_vars=True), lambda: [], frozen_modules=[self.backbone])
        self.tasks[name] = task
        return task


@register
class FullFineTuneMethod(Method):
    name = "full"

    def add_task(self, name: str, head: nn.Module) -> TaskModel:
        backbone = copy.deepcopy(self.pretrained).requires_grad_(True)
        module = WithHead(backbone, head).to(self.device)
        task = TaskModel(name, module, module, list(backbone.parameters()), list(head.parameters()),
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
    supports_budget = True  # the LoRA rank closest to the budget (uniform only)

    def __init__(self, backbone, cfg, device):
        super().__init__(backbone, cfg, device)
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("method 'lora' needs Hugging Face PEFT: pip install 'factorized-tensor-networks[peft]'") from None
        if cfg.lora_rank is None and cfg.budget is not None:  # the same ΔW budget as FTN's
            count = cfg.budget if cfg.budget >= 1 else int(cfg.budget * self.backbone_params)
            self.lora_rank = matched_lora_rank(backbone, int(count))
        elif cfg.lora_rank is None:
            self.lora_rank = matched_lora_rank(backbone, ftn_delta_budget(backbone, ftn_options(cfg)))
        else:
            self.lora_rank = cfg.lora_rank
        self.lora_alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(self.lora_rank)

    def info(self) -> dict[str, Any]:
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}

    def add_task(self, name: str, head: nn.Module) -> TaskModel:
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

        task = TaskModel(
            name, model, model,
            [p for n, p in trainable if ".head." not in n], [p for n, p in trainable if ".head." in n],
            live_state,
            lambda: [m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and "modules_to_save" in n
                     and ".head." not in n])
        self.tasks[name] = task
        return task
