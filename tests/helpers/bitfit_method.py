"""A baseline added in one file, as a user would: BitFit (Ben Zaken et al., ACL 2022) — per task,
the backbone's biases and the head train; everything else, BatchNorm statistics included, stays
the pretrained network's. Importing this module registers ``method.name=bitfit``; nothing else in
the package is edited (``tests/training/test_new_method.py`` runs it through `ftn train`,
`ftn sweep` and `ftn demo`)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ftn.training.methods import Method, TrainableTask, WithHead, register


@register
class BitFitMethod(Method):
    name = "bitfit"
    label = "BitFit (biases + head)"
    default_lr = 1e-3

    def add_task(self, name: str, head: nn.Module, ranks: dict[str, int] | None = None,
                 spec: dict[str, Any] | None = None) -> TrainableTask:
        self.reject_ranks(ranks)
        backbone = copy.deepcopy(self.pretrained).requires_grad_(False)
        biases = {n: p for n, p in backbone.named_parameters() if n.endswith("bias")}
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
