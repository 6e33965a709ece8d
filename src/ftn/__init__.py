"""ftn: Factorized Tensor Networks for parameter-efficient multi-task and multi-domain learning.

One frozen backbone is shared by every task; each task adds low-rank CP factors of ΔW on every
adapted Conv/Linear layer, its own normalisation layers and its own head.
"""

from .core.config import FTNConfig
from .core.cp import cp_num_params, cp_to_tensor, max_efficient_rank
from .core.errors import AdapterFileError, ConfigError, DataError, FTNError, ShapeError, TaskError
from .core.injection import register_wrapper, wrap_layer
from .core.layers import FTNConv, FTNLayer, FTNLinear, TaskContext
from .core.model import FTNModel, SingleTaskView
from .core.norms import TaskNorm
from .core.report import ParameterReport
from .core.updates import CPFactors, DenseDelta, FactorInit, GatedDelta, TaskUpdate
from .version import __version__

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
    # A renamed export fails naming its new spelling. ImportError, not AttributeError: for
    # ``from ftn import TaskModel`` Python replaces an AttributeError by a message of its own.
    if name == "TaskModel":
        raise ImportError("ftn.TaskModel was renamed: use ftn.SingleTaskView (what FTNModel.for_task returns)")
    raise AttributeError(f"module 'ftn' has no attribute {name!r}")
