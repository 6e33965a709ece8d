"""What one task adds to one frozen weight: the update kinds an :class:`~ftn.core.layers.FTNLayer` holds.

Each task's entry in ``FTNLayer.tasks`` is one of these modules (the parametrisation, kept apart
from the layer as loralib and PEFT do). They share one small interface, and nothing outside this
module needs to know which kind it has:

- ``delta(shape)``: the dense ΔW added to the frozen W (differentiable);
- ``tensors()``: what ΔW is computed from, compared by value by the eval cache;
- ``stored()``: ``{key: tensor}`` written to adapter files (``delta.<layer>.<key>``) and counted by
  the parameter report; empty when the task need not store anything for the layer;
- ``num_params()``: the numbers in ``stored()``;
- ``parameters_by_key()``: every trainable tensor by the same keys (what an optimizer sees);
- ``rank``: the CP rank, or for dense kinds the rank of the unfolded weight (a full-rank update);
- ``options()``: JSON-able constructor options beyond the shape (adapter-file metadata).

Kinds (``KINDS``):

- ``"cp"`` — :class:`CPFactors`: FTN's rank-R CP factors (``functional.cp_conv`` / ``cp_linear``
  give them a fast backward; the other kinds go through W + ΔW).
- ``"dense"`` — :class:`DenseDelta`: a full dense D, zero at start (partial unfreezing): W + D is
  the same function, and has the same gradient, as fine-tuning the layer, while weight decay on
  D pulls toward the pretrained W instead of toward zero.
- ``"gated"`` — :class:`GatedDelta`: TAPS's ``W + 1[s ≥ τ]·δW`` with one learned score s and a
  straight-through gradient for the indicator; a switched-off layer stores nothing.

A new kind is one subclass of :class:`TaskUpdate` here and one ``KINDS`` entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .cp import cp_num_params, cp_to_tensor

__all__ = ["FactorInit", "TaskUpdate", "CPFactors", "DenseDelta", "GatedDelta", "KINDS", "make_update",
           "full_rank"]


@dataclass(frozen=True)
class FactorInit:
    """How new factors start.

    ``zero_mode`` selects the factor set to exactly zero (default 0: the output mode A), which
    makes ΔW = 0 at initialisation, so a new task starts as the pretrained model. The other
    factors are drawn with ``method``:

    - ``"orthogonal"`` (default, as in the authors' earlier rank-update work): orthonormal columns
      (or rows when d < R), times ``scale``. Each rank-1 term then has unit norm, so the zero
      factor receives well-scaled gradients from the first step.
    - ``"normal"``: N(0, scale² / d_k).
    - ``"uniform"``: U(-scale·√(3/d_k), +scale·√(3/d_k)), the same variance as ``"normal"``.
    """

    method: str = "orthogonal"
    scale: float = 1.0
    zero_mode: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("orthogonal", "normal", "uniform"):
            raise ValueError(f"unknown factor init {self.method!r}; use orthogonal, normal or uniform")


def full_rank(modes: tuple[int, ...]) -> int:
    """The rank of a weight with these modes unfolded as (d₀ × Πd_rest): what a dense update reaches."""
    return min(modes[0], math.prod(modes[1:]))


class TaskUpdate(nn.Module):
    """One task's update of one weight; see the module docstring for the interface."""

    kind: ClassVar[str] = "base"
    rank: int

    def delta(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def stored(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def num_params(self) -> int:
        return sum(t.numel() for t in self.stored().values())

    def parameters_by_key(self) -> dict[str, nn.Parameter]:
        """Every trainable tensor under its adapter-file key (a superset of ``stored()``)."""
        return self.stored()  # type: ignore[return-value]

    def options(self) -> dict[str, Any]:
        return {}


class CPFactors(TaskUpdate):
    """Rank-R CP factors for one task at one layer: ``factors[k]`` has shape (d_k, R)."""

    kind = "cp"

    def __init__(self, modes: tuple[int, ...], rank: int, init: FactorInit = FactorInit(),
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0 <= init.zero_mode < len(modes):
            raise ValueError(f"zero_mode {init.zero_mode} out of range for {len(modes)} modes")
        self.modes = tuple(modes)
        self.rank = int(rank)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, rank, device=device, dtype=dtype)) for d in self.modes
        )
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: FactorInit = FactorInit()) -> None:
        for k, factor in enumerate(self.factors):
            if k == init.zero_mode:
                factor.zero_()
            elif init.method == "orthogonal":
                # Drawn in float32 on CPU: orthogonal_ needs a QR that not every dtype/device has.
                q = torch.empty(factor.shape, dtype=torch.float32)
                nn.init.orthogonal_(q)
                factor.copy_(q.mul_(init.scale))
            elif init.method == "normal":
                factor.normal_(0.0, init.scale / math.sqrt(factor.shape[0]))
            else:
                bound = init.scale * math.sqrt(3.0 / factor.shape[0])
                factor.uniform_(-bound, bound)

    def tensors(self) -> list[Tensor]:
        """``list(self.factors)``, read from the registry directly: ParameterList's indexing costs
        a few µs per factor, which the eval cache pays on every forward."""
        return list(self._modules["factors"]._parameters.values())

    def stored(self) -> dict[str, Tensor]:
        return {str(k): f for k, f in enumerate(self.tensors())}  # delta.<layer>.0, .1, ... (format v1)

    def delta(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Dense ΔW in the layer's weight shape."""
        return cp_to_tensor(list(self.factors), shape)

    def num_params(self) -> int:
        return cp_num_params(self.modes, self.rank)

    def extra_repr(self) -> str:
        return f"modes={self.modes}, rank={self.rank}"


class DenseDelta(TaskUpdate):
    """A dense per-task D (``weight``, the layer's weight shape), zero at start: W + D."""

    kind = "dense"

    def __init__(self, shape: tuple[int, ...], modes: tuple[int, ...], device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank = full_rank(tuple(modes))
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def delta(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        return self.weight

    def tensors(self) -> list[Tensor]:
        return [self.weight]

    def stored(self) -> dict[str, Tensor]:
        return {"weight": self.weight}

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class _StraightThrough(torch.autograd.Function):
    """1[s ≥ τ] forward; the incoming gradient passed to s unchanged backward."""

    @staticmethod
    def forward(ctx, score: Tensor, tau: float) -> Tensor:
        return (score >= tau).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class GatedDelta(DenseDelta):
    """TAPS (Wallingford et al., CVPR 2022): W + 1[s ≥ τ]·δW, δW dense and zero at start, s one
    learned scalar (``score``, default start 1.5τ, just above τ as in the original: every layer starts switched on). The indicator's
    gradient is straight-through (∂gate/∂s = 1), so s learns from the task loss,
    ⟨∂L/∂W, δW⟩, even while the gate is off. A layer whose gate is off stores nothing."""

    kind = "gated"

    def __init__(self, shape: tuple[int, ...], modes: tuple[int, ...], tau: float = 0.1,
                 init_score: float | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(shape, modes, device=device, dtype=dtype)
        self.tau = float(tau)
        start = 1.5 * self.tau if init_score is None else float(init_score)
        self.score = nn.Parameter(torch.tensor(start, device=device, dtype=dtype))

    def gate(self) -> Tensor:
        """1[s ≥ τ] as a 0-d tensor, with the straight-through gradient to s."""
        return _StraightThrough.apply(self.score, self.tau)

    @property
    def active(self) -> bool:
        return bool(self.score.detach() >= self.tau)

    def delta(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        return self.gate() * self.weight

    def tensors(self) -> list[Tensor]:
        return [self.weight, self.score]

    def parameters_by_key(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight, "score": self.score}

    def stored(self) -> dict[str, Tensor]:
        return self.parameters_by_key() if self.active else {}

    def options(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, tau={self.tau}, on={self.active}"


KINDS: dict[str, type[TaskUpdate]] = {"cp": CPFactors, "dense": DenseDelta, "gated": GatedDelta}


def make_update(kind: str, shape: tuple[int, ...], modes: tuple[int, ...], rank: int,
                init: FactorInit = FactorInit(), device: torch.device | None = None,
                dtype: torch.dtype | None = None, **options: Any) -> TaskUpdate:
    """A new update of ``kind`` for a weight of ``shape`` (``rank`` and ``init``: CP only;
    ``options``: the kind's own, e.g. ``tau`` / ``init_score`` for ``"gated"``)."""
    if kind == "cp":
        return CPFactors(modes, rank, init, device=device, dtype=dtype)
    if kind == "dense":
        return DenseDelta(tuple(shape), modes, device=device, dtype=dtype)
    if kind == "gated":
        return GatedDelta(tuple(shape), modes, device=device, dtype=dtype, **options)
    raise ValueError(f"unknown update kind {kind!r}; known: {sorted(KINDS)}")
