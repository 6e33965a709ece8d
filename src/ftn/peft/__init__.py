"""FTN as a PEFT method: ``import ftn.peft`` registers it with Hugging Face PEFT.

After the import, PEFT's own API trains, saves, loads, switches and merges FTN adapters::

    import ftn.peft
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, ftn.peft.FTNPeftConfig(r=8, target_modules=["query", "value"]))
    ...                                     # train: only FTN's factors and norm copies learn
    model.save_pretrained("out")            # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "out")

Each PEFT adapter is one FTN task: rank-``r`` CP factors of ΔW on every targeted Conv/Linear
layer and, with ``task_norms`` (the default), its own copy of every normalisation layer. The
math is ftn's own: each targeted layer runs an :class:`~ftn.core.layers.FTNConv` /
:class:`~ftn.core.layers.FTNLinear` (norms: :class:`~ftn.core.norms.TaskNorm`) whose per-task
entries are the adapter's weights (:mod:`ftn.peft.layers`). See docs/peft.md.

PEFT is an optional dependency (the ``peft`` extra); nothing in ftn's core imports this module.
"""

from __future__ import annotations

import importlib.metadata

from ..core.errors import FTNError

MIN_PEFT = (0, 21)


def check_peft() -> None:
    """FTNError unless PEFT >= MIN_PEFT is installed (register_peft_method and the state-dict hooks
    used here are from that version on)."""
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        version = None
    numbers = []
    for part in (version or "0").split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    if version is None or tuple(numbers) < MIN_PEFT:
        found = f"peft {version} is installed" if version else "peft is not installed"
        raise FTNError(f"ftn.peft needs peft >= {'.'.join(map(str, MIN_PEFT))} ({found}): "
                       f"pip install 'factorized-tensor-networks[peft]'")


check_peft()

from .config import FTNPeftConfig  # noqa: E402  (after the version check: a clear error first)
from .layers import FTNPeftFactors, FTNPeftLayer, FTNPeftNorm  # noqa: E402
from .registry import PEFT_NAME, register  # noqa: E402
from .tuner import FTNPeftModel, parameter_report  # noqa: E402

register(FTNPeftConfig, FTNPeftModel)

__all__ = ["FTNPeftConfig", "FTNPeftModel", "FTNPeftLayer", "FTNPeftFactors", "FTNPeftNorm", "parameter_report", "check_peft",
           "PEFT_NAME", "register"]
