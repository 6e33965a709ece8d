"""Adaptation methods behind one interface, so that one engine trains and compares them all.

A :class:`Method` owns whatever is shared between domains (FTN: one frozen backbone holding
every domain's factors) and hands out a :class:`DomainModel` per domain: its forward, its
trainable parameters (backbone part and head part, so the head can get its own learning rate),
the BatchNorm layers to recalibrate, and the live tensors that make up the domain's state (for
checkpoints and best-on-val snapshots).

- ``ftn``: FTN ΔW factors + per-domain norms + head on one shared frozen backbone.
- ``full``: full fine-tuning; a complete copy of the backbone per domain.
- ``linear``: linear probe; frozen backbone *including* its BatchNorm statistics, head only.
- ``bn_head``: per-domain norms + head (FTN with rank 0).
- ``lora``: LoRA from Hugging Face PEFT on every non-grouped Conv/Linear, per-domain norms and
  head through ``modules_to_save``; the rank is matched to FTN's ΔW budget unless given.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..adapters import atomic_write_bytes
from ..errors import ConfigError
from ..model import FTNModel
from ..norms import is_norm
from .config import MethodConfig

__all__ = ["DomainModel", "Method", "make_method", "lora_targets", "lora_delta_params", "matched_lora_rank"]


class DomainModel:
    """One domain's model as the engine sees it."""

    def __init__(self, name: str, forward: Callable[[Tensor], Tensor], module: nn.Module,
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

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def train(self) -> None:
        self.module.train()
        for m in self._frozen_modules:  # e.g. the linear probe's backbone keeps its BN statistics
            m.eval()

    def eval(self) -> None:
        self.module.eval()

    @property
    def parameters(self) -> list[nn.Parameter]:
        return self.body_params + self.head_params

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._live_state().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        live = self._live_state()
        if set(live) != set(state):
            raise ConfigError(f"state for domain {self.name!r} does not fit: "
                              f"{sorted(set(live) ^ set(state))[:5]}")
        for k, t in live.items():
            t.copy_(state[k])


class Method:
    name = "base"

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, device: torch.device):
        self.pretrained = backbone
        self.feature_dim = feature_dim
        self.cfg = cfg
        self.device = device
        self.domains: dict[str, DomainModel] = {}

    def add_domain(self, name: str, num_classes: int) -> DomainModel:
        raise NotImplementedError

    def stored_parameters(self) -> int:
        raise NotImplementedError

    def shared_parameters(self) -> int:
        """Parameters stored once whatever the number of domains (the frozen backbone)."""
        return sum(p.numel() for p in self.pretrained.parameters())

    def save_domain(self, name: str, folder: Path, info: dict | None = None) -> Path:
        """Write the domain's own tensors (safetensors); FTN writes a full adapter file instead
        (with ``info``: labels and input preparation)."""
        path = folder / f"{name}.safetensors"
        state = {k: v.cpu().contiguous() for k, v in self.domains[name].state_dict().items()}
        return atomic_write_bytes(path, st_save(state, metadata={"method": self.name, "domain": name}))

    def _head(self, num_classes: int) -> nn.Linear:
        return nn.Linear(self.feature_dim, num_classes).to(self.device)


def _ftn_options(cfg: MethodConfig) -> dict:
    options = dict(rank_pattern=dict(cfg.rank_pattern), exclude=list(cfg.exclude), init=cfg.init,
                   init_scale=cfg.init_scale)
    if cfg.include is not None:
        options["include"] = list(cfg.include)
    return options


class FTNMethod(Method):
    name = "ftn"
    rank: int | None = None  # None: cfg.rank

    def __init__(self, backbone, feature_dim, cfg, device):
        super().__init__(backbone, feature_dim, cfg, device)
        self.model = FTNModel(backbone, rank=max(cfg.rank, 1), **_ftn_options(cfg)).to(device)

    def _domain_rank(self) -> int:
        return self.cfg.rank if self.rank is None else self.rank

    def add_domain(self, name: str, num_classes: int) -> DomainModel:
        self.model.add_task(name, head=self._head(num_classes), rank=self._domain_rank())
        return self._domain_model(name)

    def load_domain(self, path: str | Path) -> str:
        """Add a domain trained earlier (in this or another process) from its adapter file."""
        name = self.model.load_task(path)
        self._domain_model(name)
        return name

    def _domain_model(self, name: str) -> DomainModel:
        model = self.model
        head_ids = {id(p) for p in model.heads[name].parameters()}
        params = model.task_parameters(name)

        def live_state() -> dict[str, Tensor]:
            state = dict(model.named_task_parameters(name))
            for layer_name, norm in model.task_norm_layers().items():
                for key, buf in norm.tasks[name].named_buffers():
                    state[f"norm.{layer_name}.{key}"] = buf
            return state

        domain = DomainModel(name, lambda x: model(x, task=name), model,
                             [p for p in params if id(p) not in head_ids],
                             [p for p in params if id(p) in head_ids], live_state,
                             lambda: model.task_batchnorms(name))
        self.domains[name] = domain
        return domain

    def stored_parameters(self) -> int:
        return self.model.parameter_report().total_stored

    def shared_parameters(self) -> int:
        return self.model.parameter_report().backbone

    def save_domain(self, name: str, folder: Path, info: dict | None = None) -> Path:
        return self.model.save_task(name, folder / f"{name}.safetensors", info=info)


class BNHeadMethod(FTNMethod):
    """Per-domain norms and head only: FTN with rank 0 (no factors anywhere)."""

    name = "bn_head"
    rank = 0


class LinearProbeMethod(Method):
    name = "linear"

    def __init__(self, backbone, feature_dim, cfg, device):
        super().__init__(backbone, feature_dim, cfg, device)
        self.backbone = backbone.to(device).requires_grad_(False).eval()
        self.heads = nn.ModuleDict()

    def add_domain(self, name: str, num_classes: int) -> DomainModel:
        head = self.heads[name] = self._head(num_classes)
        module = nn.Sequential(self.backbone, head)
        domain = DomainModel(name, module, module, [], list(head.parameters()),
                             lambda: dict(head.named_parameters()), lambda: [], frozen_modules=[self.backbone])
        self.domains[name] = domain
        return domain

    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in self.heads.parameters())


class FullFineTuneMethod(Method):
    name = "full"

    def add_domain(self, name: str, num_classes: int) -> DomainModel:
        backbone = copy.deepcopy(self.pretrained).to(self.device).requires_grad_(True)
        head = self._head(num_classes)
        module = nn.Sequential(backbone, head)
        domain = DomainModel(name, module, module, list(backbone.parameters()), list(head.parameters()),
                             lambda: module.state_dict(keep_vars=True),
                             lambda: [m for m in backbone.modules() if isinstance(m, _BatchNorm)])
        self.domains[name] = domain
        return domain

    def stored_parameters(self) -> int:
        return sum(d.num_trainable() for d in self.domains.values())

    def shared_parameters(self) -> int:
        return 0  # nothing is shared: every domain stores a whole network


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


class LoRAMethod(Method):
    name = "lora"

    def __init__(self, backbone, feature_dim, cfg, device):
        super().__init__(backbone, feature_dim, cfg, device)
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("method 'lora' needs Hugging Face PEFT: pip install 'factorized-tensor-networks[peft]'") from None
        if cfg.lora_rank is None:
            probe = FTNModel(copy.deepcopy(backbone), rank=cfg.rank, **_ftn_options(cfg))
            probe.add_task("probe")
            self.lora_rank = matched_lora_rank(backbone, probe.parameter_report().tasks["probe"].delta)
        else:
            self.lora_rank = cfg.lora_rank
        self.lora_alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(self.lora_rank)
        self.backbone_params = sum(p.numel() for p in backbone.parameters())

    def add_domain(self, name: str, num_classes: int) -> DomainModel:
        import peft

        module = nn.Sequential()
        module.add_module("backbone", copy.deepcopy(self.pretrained))
        module.add_module("head", nn.Linear(self.feature_dim, num_classes))
        norms = [n for n, m in module.named_modules() if is_norm(m)]
        config = peft.LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha,
                                 target_modules=lora_targets(module.backbone, "backbone."),
                                 modules_to_save=norms + ["head"])
        model = peft.get_peft_model(module, config).to(self.device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def live_state() -> dict[str, Tensor]:
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            state.update({n: b for n, b in model.named_buffers() if "modules_to_save" in n})
            return state

        domain = DomainModel(
            name, model, model,
            [p for n, p in trainable if ".head." not in n], [p for n, p in trainable if ".head." in n],
            live_state,
            lambda: [m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and "modules_to_save" in n])
        self.domains[name] = domain
        return domain

    def stored_parameters(self) -> int:
        return self.backbone_params + sum(d.num_trainable() for d in self.domains.values())


_METHODS: dict[str, type[Method]] = {m.name: m for m in (FTNMethod, FullFineTuneMethod, LinearProbeMethod,
                                                          BNHeadMethod, LoRAMethod)}


def make_method(cfg: MethodConfig, backbone: nn.Module, feature_dim: int, device: torch.device) -> Method:
    if cfg.name not in _METHODS:
        raise ConfigError(f"unknown method {cfg.name!r}; choose from {sorted(_METHODS)}")
    return _METHODS[cfg.name](backbone, feature_dim, cfg, device)
