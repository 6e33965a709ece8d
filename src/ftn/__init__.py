"""ftn: Factorized Tensor Networks for parameter-efficient multi-task and multi-domain learning.

One frozen backbone is shared by every task; each task adds low-rank CP factors of ΔW on every
adapted Conv/Linear layer, its own normalisation layers and its own head.
"""

from .config import FTNConfig
from .cp import cp_num_params, cp_to_tensor, max_efficient_rank
from .errors import AdapterFileError, ConfigError, DataError, FTNError, ShapeError, TaskError
from .injection import register_wrapper, wrap_layer
from .layers import FTNConv, FTNLayer, FTNLinear, TaskContext
from .model import FTNModel, TaskModel
from .norms import TaskNorm
from .report import ParameterReport
from .updates import CPFactors, DenseDelta, FactorInit, GatedDelta, TaskUpdate
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
