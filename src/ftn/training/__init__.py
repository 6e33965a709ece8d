"""Training on top of the core: one config schema, one method registry, one engine, for the
classification, dense and text settings."""

from .config import ExperimentConfig, apply_overrides, load_config
from .engine import TaskResult, evaluate, train_task
from .methods import METHODS, Method, TrainableTask, make_method, register
from .runner import evaluate_tasks, run_experiment, run_experiments
from .setting import Classify, Objective, Setting, TaskData

__all__ = ["ExperimentConfig", "load_config", "apply_overrides", "TaskData", "TaskResult", "evaluate",
           "train_task", "TrainableTask", "Method", "METHODS", "register", "make_method", "run_experiment",
           "run_experiments", "evaluate_tasks", "Setting", "Objective", "Classify"]
