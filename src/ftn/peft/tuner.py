"""`FTNPeftModel`: the PEFT tuner that puts FTN's layers into a model, and the parameter report
of a model that holds FTN adapters."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_pattern_key
from torch import nn

from ..core.cp import max_efficient_rank
from ..core.errors import ConfigError
from ..core.norms import is_norm
from ..core.report import LayerCap, ParameterReport, TaskParameters
from .layers import FTNPeftFactors, FTNPeftLayer, FTNPeftNorm, make_layer

__all__ = ["FTNPeftModel", "parameter_report"]


class FTNPeftModel(BaseTuner):
    """Adds FTN adapters to a model: :class:`~ftn.peft.layers.FTNPeftFactors` on every layer
    ``target_modules`` selects and, with ``task_norms``, :class:`~ftn.peft.layers.FTNPeftNorm` on
    every normalisation layer (except those ``exclude_modules`` or ``modules_to_save`` name).
    Made by ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` from an
    :class:`~ftn.peft.config.FTNPeftConfig`; not constructed directly."""

    prefix: str = "ftn_"
    tuner_layer_cls = FTNPeftLayer
    target_module_mapping: dict[str, list[str]] = {}  # no per-architecture default: name the layers

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        if peft_config.target_modules is None:
            raise ConfigError("FTNPeftConfig needs target_modules: the names (or name suffixes) of the Conv/Linear "
                              "layers to adapt, a regex, or 'all-linear', e.g. target_modules=['query', 'value']")
        return peft_config

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        # Norm layers, found once per added adapter: matching sees names only. Norms inside a
        # modules_to_save copy (or the module it wraps) belong to that module, not to FTN.
        aux = [f"{n}." for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        self.ftn_norm_names = {n for n, m in model.named_modules()
                               if (is_norm(m) or isinstance(m, FTNPeftNorm)) and not n.startswith(tuple(aux))}

    def _check_target_module_exists(self, peft_config: Any, key: str) -> Any:
        found = check_target_module_exists(peft_config, key)
        if (found is None or found is False) and peft_config.task_norms and key in self.ftn_norm_names:
            return True  # not excluded (an excluded module answers a falsy marker object, not False)
        return found

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), current_key),
                                            peft_config.r)
        if isinstance(target, FTNPeftLayer):
            target.update_layer(adapter_name, peft_config, rank)
            return
        if isinstance(parent, nn.MultiheadAttention):
            # It computes with its projections' tensors directly (as ftn's own wrapping knows), so
            # a wrapped out_proj would be silently ignored.
            raise ConfigError(f"FTN cannot adapt {current_key!r} on its own: nn.MultiheadAttention reads its "
                              f"projection weights directly; use ftn.FTNModel for attention layers")
        layer = make_layer(target, current_key)
        layer._active_adapter = adapter_name
        layer.update_layer(adapter_name, peft_config, rank)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, layer, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Keep each adapter in its base layer's dtype, as ftn makes it: PEFT's default upcast of
        # float16/bfloat16 adapters to float32 would feed ftn's conv/linear (and the norm copies)
        # float32 weights beside half-precision inputs and base weights.
        return None

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Only the swap. PEFT's default also copies ``child.weight`` onto a new module without a
        # base_layer, which fails when merge_and_unload unwraps modules_to_save of a container
        # (MobileNetV2's classifier: Dropout + Linear); LoRA overrides it the same way. Our layers
        # need no device move: factors are made on the base weight's device, norms copied from it.
        setattr(parent, child_name, new_module)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``…ftn_factors.<adapter>.factors.0`` → ``…ftn_factors.factors.0`` (PEFT's default only
        removes the adapter name from the last two positions; factors sit one level deeper)."""
        parts = key.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in ("ftn_factors", "ftn_norms") and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2:])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def parameter_report(self) -> ParameterReport:
        """ftn's parameter report of this model (see :func:`parameter_report`)."""
        return parameter_report(self)


def parameter_report(model: nn.Module) -> ParameterReport:
    """ftn's :class:`~ftn.core.report.ParameterReport` of a model holding FTN adapters (a
    ``PeftModel``, its ``base_model`` or a model with the layers injected): the frozen backbone
    (every parameter no adapter owns, including the originals of ``modules_to_save``), and per
    adapter its ΔW factors (``delta``, with rank caps), norm copies (``norms``; running statistics
    apart in ``norm_buffers``) and ``modules_to_save`` copies (``head``). A task's ``total`` is what
    PEFT's ``print_trainable_parameters`` calls trainable while that adapter is the one trained,
    and ``total_stored`` its "all params"."""
    configs = dict(getattr(model, "peft_config", {}) or {})
    # Layer names as in the user's model: below PeftModel.base_model.model (or a tuner's .model).
    if isinstance(getattr(model, "base_model", None), BaseTuner):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FTNPeftFactors)}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, FTNPeftNorm)}
    saved = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    names = list(configs) or sorted({a for m in (*layers.values(), *norms.values()) for a in m.tasks})

    def count(modules: list[nn.Module], buffers: bool = False) -> int:
        seen = {id(t): t for m in modules for t in (m.buffers() if buffers else m.parameters())}
        return sum(t.numel() for t in seen.values())

    per_adapter: set[int] = set()
    tasks = {}
    for name in names:
        own_layers = [m.tasks[name] for m in layers.values() if name in m.tasks]
        own_norms = [m.tasks[name] for m in norms.values() if name in m.tasks]
        heads = [m.modules_to_save[name] for m in saved if name in m.modules_to_save]
        per_adapter.update(id(p) for m in (*own_layers, *own_norms, *heads) for p in m.parameters())
        caps = [LayerCap(ln, m.ftn_requested[name], m.ftn_engine.rank(name), max_efficient_rank(m.ftn_engine.modes))
                for ln, m in layers.items() if name in m.ftn_requested and m.ftn_requested[name] != m.ftn_engine.rank(name)]
        config = configs.get(name)
        tasks[name] = TaskParameters(
            delta=sum(u.num_params() for u in own_layers), norms=count(own_norms), head=count(heads),
            norm_buffers=count(own_norms, buffers=True), rank=getattr(config, "r", None), caps=caps,
            layers=sum(1 for u in own_layers if u.num_params()))
    backbone = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in per_adapter)
    return ParameterReport(backbone=backbone, adapted_layers=len(layers), norm_layers=len(norms), tasks=tasks)
