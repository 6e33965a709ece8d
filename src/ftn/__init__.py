"""ftn: Factorized Tensor Networks for parameter-efficient multi-task and multi-domain learning.

One frozen backbone is shared by every task; each task adds low-rank CP factors of ΔW on every
adapted Conv/Linear layer, its own normalisation layers and its own head.
"""

from .core.config import FTNConfig
from .core.cp import cp_num_params, cp_to_tensor, max_efficient_rank
from .core.errors import AdapterFileError, ConfigError, DataError, FTNError, ShapeError, TaskError
from .core.injection import register_wrapper, wrap_layer
from .core.layers import FTNConv, FTNLayer, FTNLinear, TaskContext
from .core.model import FTNModel, TaskModel
from .core.norms import TaskNorm
from .core.report import ParameterReport
from .core.updates import CPFactors, DenseDelta, FactorInit, GatedDelta, TaskUpdate
from .version import __version__

__all__ = [
    "FTNModel",
    "FTNConfig",
    "TaskModel",
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
