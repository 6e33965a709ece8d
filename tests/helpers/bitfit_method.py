"""A baseline added in one file, as a user would: BitFit (Ben Zaken et al., ACL 2022) — per task,
the backbone's biases and the head train; everything else, BatchNorm statistics included, stays
the pretrained network's. Its one option, ``method.bitfit.norm_biases``, says whether the norm
layers' biases (BatchNorm/LayerNorm β) train too, or only those of the convs and Linears.
Importing this module registers ``method.name=bitfit`` and its ``method.bitfit.*`` section;
nothing else in the package is edited (``tests/training/test_new_method.py`` runs it through
`ftn train`, `ftn sweep` and `ftn demo`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from ftn.core.norms import is_norm
from ftn.training.methods import Method, TrainableTask, WithHead, register


@dataclass
class BitFitConfig:
    """``method.bitfit``: which biases train."""

    norm_biases: bool = True  # False: only the biases of convs and Linears


@register
class BitFitMethod(Method):
    name = "bitfit"
    label = "BitFit (biases + head)"
    default_lr = 1e-3
    options = BitFitConfig

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        backbone = copy.deepcopy(self.pretrained).requires_grad_(False)
        options = self.cfg.bitfit
        norms = {n for n, m in backbone.named_modules() if is_norm(m)}
        biases = {n: p for n, p in backbone.named_parameters() if n.endswith("bias")
                  and (options.norm_biases or n.rpartition(".")[0] not in norms)}
        for p in biases.values():
            p.requires_grad_(True)
        module = WithHead(backbone, head).to(self.device)

        def live_state() -> dict[str, Any]:
            return {**{f"bias.{n}": p for n, p in biases.items()},
                    **{f"head.{k}": v for k, v in head.state_dict(keep_vars=True).items()}}

        task = TrainableTask(name, module, module, list(biases.values()), list(head.parameters()), live_state,
                             lambda: [], frozen_modules=[backbone])
        self.tasks[name] = task
        return task

    def info(self) -> dict[str, Any]:
        return {"norm_biases": self.cfg.bitfit.norm_biases,
                "body_parameters": {n: sum(p.numel() for p in t.body_params) for n, t in self.tasks.items()}}
