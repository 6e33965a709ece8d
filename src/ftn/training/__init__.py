"""Training on top of the core: configuration, methods, the engine and the experiment runner."""

from .config import ExperimentConfig, apply_overrides, load_config
from .engine import DomainData, DomainResult, evaluate, train_domain
from .methods import DomainModel, Method, make_method
from .runner import build_domain_data, run_experiment

__all__ = ["ExperimentConfig", "load_config", "apply_overrides", "DomainData", "DomainResult", "evaluate",
           "train_domain", "DomainModel", "Method", "make_method", "build_domain_data", "run_experiment"]
