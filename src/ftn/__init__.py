"""ftn: Factorized Tensor Networks for parameter-efficient multi-task and multi-domain learning.

One frozen backbone is shared by every task; each task adds low-rank CP factors of ΔW on every
adapted Conv/Linear layer, its own normalisation layers and its own head.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .version import __version__

# Every public name and the module that defines it, imported on first use (PEP 562): `import ftn`
# and the `ftn` command's help then answer without importing torch (seconds on a loaded machine);
# `from ftn import FTNModel` and `ftn.FTNModel` work as before.
_EXPORTS = {
    "FTNConfig": ".core.config",
    "cp_num_params": ".core.cp", "cp_to_tensor": ".core.cp", "max_efficient_rank": ".core.cp",
    "AdapterFileError": ".core.errors", "ConfigError": ".core.errors", "DataError": ".core.errors",
    "FTNError": ".core.errors", "ShapeError": ".core.errors", "TaskError": ".core.errors",
    "register_wrapper": ".core.injection", "wrap_layer": ".core.injection",
    "FTNConv": ".core.layers", "FTNLayer": ".core.layers", "FTNLinear": ".core.layers", "TaskContext": ".core.layers",
    "FTNModel": ".core.model", "SingleTaskView": ".core.model",
    "TaskNorm": ".core.norms",
    "ParameterReport": ".core.report",
    "CPFactors": ".core.updates", "DenseDelta": ".core.updates", "FactorInit": ".core.updates",
    "GatedDelta": ".core.updates", "TaskUpdate": ".core.updates",
}
_SUBPACKAGES = ("core", "training", "settings", "apps", "version")

if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports
    from .core.config import FTNConfig
    from .core.cp import cp_num_params, cp_to_tensor, max_efficient_rank
    from .core.errors import AdapterFileError, ConfigError, DataError, FTNError, ShapeError, TaskError
    from .core.injection import register_wrapper, wrap_layer
    from .core.layers import FTNConv, FTNLayer, FTNLinear, TaskContext
    from .core.model import FTNModel, SingleTaskView
    from .core.norms import TaskNorm
    from .core.report import ParameterReport
    from .core.updates import CPFactors, DenseDelta, FactorInit, GatedDelta, TaskUpdate

__all__ = [
    "FTNModel",
    "FTNConfig",
    "SingleTaskView",
    "register_wrapper",
    "wrap_layer",
    "FTNLayer",
    "FTNConv",
    "FTNLinear",
    "CPFactors",
    "DenseDelta",
    "GatedDelta",
    "TaskUpdate",
    "FactorInit",
    "TaskContext",
    "TaskNorm",
    "ParameterReport",
    "cp_to_tensor",
    "cp_num_params",
    "max_efficient_rank",
    "FTNError",
    "TaskError",
    "ShapeError",
    "AdapterFileError",
    "ConfigError",
    "DataError",
    "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in _SUBPACKAGES:  # `import ftn; ftn.core.model`, as when the package imported them
        return import_module(f".{name}", __name__)
    # A renamed export fails naming its new spelling. ImportError, not AttributeError: for
    # ``from ftn import TaskModel`` Python replaces an AttributeError by a message of its own.
    if name == "TaskModel":
        raise ImportError("ftn.TaskModel was renamed: use ftn.SingleTaskView (what FTNModel.for_task returns)")
    raise AttributeError(f"module 'ftn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
