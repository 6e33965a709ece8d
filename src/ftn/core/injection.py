"""Model surgery: which wrapper replaces which module, and the replacing itself.

The one table of layer types is :data:`WRAPPERS`: module type → factory. A factory gets the
module and a :class:`Site` (its name, the shared :class:`~ftn.core.layers.TaskContext`, the
:class:`~ftn.core.config.FTNConfig`, and whether the include/exclude patterns select it) and returns
the wrapper, or None to leave the module as it is. Supporting a new layer type is one wrapper
class plus one :func:`register_wrapper` call, in ftn or in user code; nothing else looks at types.

A wrapper is any module that keeps the original as ``.base`` and has ``merged_module(task)``,
the plain PyTorch module that :meth:`~ftn.core.model.FTNModel.merge` puts in its place. Both the
surgery and the merge go through :func:`replace_modules`, which swaps modules on their parents
(as PEFT's ``_replace_module`` does): every reference to a module shared by two parents gets the
same replacement, and a replaced module's children are not visited (the wrapper owns them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .attention import FTNBiasLinear, FTNFusedLinear, FTNMultiheadAttention
from .config import FTNConfig
from .layers import FTNConv, FTNLinear, TaskContext
from .norms import NORM_TYPES, TaskNorm

__all__ = ["Site", "WRAPPERS", "register_wrapper", "wrapper_factory", "inject", "replace_modules",
           "wrap_layer", "matches"]


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the shell-style globs (``fnmatch``, case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Site:
    """Where a module sits: what a factory needs to choose and build its wrapper."""

    name: str  # as backbone.named_modules() prints it; "<root>" for the backbone itself
    context: TaskContext
    config: FTNConfig
    chosen: bool  # selected by include/exclude

    def selected(self, name: str) -> bool:
        """Whether include/exclude select ``name`` (for wrappers that name their own parts)."""
        return _selected(self.config, name)


def _selected(cfg: FTNConfig, name: str) -> bool:
    return (cfg.include is None or matches(name, cfg.include)) and not matches(name, cfg.exclude)


Factory = Callable[[nn.Module, Site], "nn.Module | None"]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    opaque: bool


WRAPPERS: dict[type, _Entry] = {}


def register_wrapper(module_type: type | tuple[type, ...], factory: Factory, *, opaque: bool = False) -> None:
    """Wrap modules of ``module_type`` (and its subclasses, unless a subclass has its own entry)
    with ``factory(module, site)``. ``opaque``: the type reads its children's tensors directly
    (``nn.MultiheadAttention`` reads ``out_proj.weight``), so they are never wrapped one by one,
    even where the factory leaves the module itself alone."""
    for t in module_type if isinstance(module_type, tuple) else (module_type,):
        if not isinstance(t, type) or not issubclass(t, nn.Module):
            raise TypeError(f"register_wrapper needs nn.Module subclasses, got {t!r}")
        WRAPPERS[t] = _Entry(factory, opaque)


def wrapper_factory(module: nn.Module) -> _Entry | None:
    """The entry of the most specific registered class of ``module`` (its MRO order)."""
    for cls in type(module).__mro__:
        if cls in WRAPPERS:
            return WRAPPERS[cls]
    return None


# ---------------------------------------------------------------------------- the built-in types
def _conv(module: nn.Module, site: Site) -> nn.Module | None:
    return FTNConv(module, site.context, site.name) if site.chosen else None


def _linear(module: nn.Linear, site: Site) -> nn.Module | None:
    cfg = site.config
    if cfg.fused_qkv == "per_projection" and matches(site.name, cfg.qkv_patterns):
        # q/k/v blocks are named <layer>.q/.k/.v; selecting the fused layer selects all three,
        # unless a block is excluded by name.
        fused = FTNFusedLinear(module, site.context, site.name,
                               lambda n: site.selected(n) or (site.chosen and not matches(n, cfg.exclude)),
                               train_bias=cfg.train_bias)
        return fused if fused.parts else None
    if not site.chosen:
        return None
    if cfg.train_bias and module.bias is not None:
        return FTNBiasLinear(module, site.context, site.name)
    return FTNLinear(module, site.context, site.name)


def _multihead_attention(module: nn.MultiheadAttention, site: Site) -> nn.Module | None:
    # Its projections are named <name>.in_proj (or .q_proj/.k_proj/.v_proj) and <name>.out_proj;
    # the patterns select them one by one.
    mha = FTNMultiheadAttention(module, site.context, site.name, site.selected,
                                per_projection=site.config.fused_qkv == "per_projection",
                                train_bias=site.config.train_bias)
    return mha if mha.parts else None


def _norm(module: nn.Module, site: Site) -> nn.Module | None:
    return TaskNorm(module, site.context, site.name) if site.config.task_norms else None


register_wrapper((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv)
register_wrapper(nn.Linear, _linear)
register_wrapper(nn.MultiheadAttention, _multihead_attention, opaque=True)
register_wrapper(NORM_TYPES, _norm)


# ---------------------------------------------------------------------------- surgery
def replace_modules(root: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None],
                    skip_children: Callable[[nn.Module], bool] = lambda m: False) -> nn.Module:
    """Swap modules of ``root`` on their parents, in place; returns ``root`` or its replacement.

    ``replacement(name, module)`` is asked once per module (the first name it is found under) in
    pre-order; None keeps it. Children of a replaced module, or of one ``skip_children`` names,
    are not visited."""
    modules = dict(root.named_modules(remove_duplicate=False))
    new: dict[int, nn.Module] = {}
    seen: set[int] = set()
    closed: list[str] = []  # prefixes whose subtree is done
    for name, module in modules.items():
        if any(name.startswith(p) for p in closed) or id(module) in seen:
            continue
        seen.add(id(module))
        wrapper = replacement(name, module)
        if wrapper is not None:
            new[id(module)] = wrapper
        if wrapper is not None or skip_children(module):
            closed.append(f"{name}." if name else "")
    # Replace every reference, so a module used at two places gets one shared replacement.
    for name, module in modules.items():
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        child_module = parent._modules.get(child)
        if child_module is not None and id(child_module) in new:
            parent._modules[child] = new[id(child_module)]
    return new.get(id(root), root)


def inject(backbone: nn.Module, context: TaskContext, config: FTNConfig) -> nn.Module:
    """Replace every registered module type of ``backbone`` by its wrapper (in place)."""
    def wrap(name: str, module: nn.Module) -> nn.Module | None:
        entry = wrapper_factory(module)
        if entry is None:
            return None
        site = Site(name or "<root>", context, config, chosen=_selected(config, name))
        return entry.factory(module, site)

    def opaque(module: nn.Module) -> bool:
        entry = wrapper_factory(module)
        return entry is not None and entry.opaque

    return replace_modules(backbone, wrap, opaque)


def wrap_layer(module: nn.Module, context: TaskContext | None = None, name: str = "",
               config: FTNConfig | None = None) -> nn.Module:
    """The wrapper of one module on its own (tests, benchmarks): what :func:`inject` would put
    there with ``config`` (default settings), the module selected."""
    entry = wrapper_factory(module)
    wrapper = None
    if entry is not None:
        site = Site(name or type(module).__name__, context if context is not None else TaskContext(),
                    config if config is not None else FTNConfig(), chosen=True)
        wrapper = entry.factory(module, site)
    if wrapper is None:
        raise TypeError(f"cannot adapt {type(module).__name__}: no wrapper is registered for it "
                        f"(see ftn.core.injection.register_wrapper)")
    return wrapper
