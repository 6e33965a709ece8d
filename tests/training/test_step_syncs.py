"""A training step reads nothing back to the host: on a GPU a read (`.item()`, `int(t)`, a branch
on a value) waits for every queued kernel, each step. Data checks run on the batch as the loader
gives it, before it moves to the device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftn.core.errors import DataError
from ftn.core.opcount import count_ops
from ftn.training.setting import Classify


def test_the_classification_loss_reads_no_value_on_the_host():
    torch.manual_seed(0)
    head = nn.Linear(8, 5)
    objective = Classify(5, task="t")
    batch = (torch.randn(4, 8), torch.tensor([0, 4, 2, 1]))
    _, count = count_ops(lambda: objective.loss(head, batch).backward())
    assert count.ops > 0 and count.host_syncs == 0, dict(count.syncs)


def test_labels_are_checked_on_the_host_batch_with_a_clear_error():
    objective = Classify(5, task="t")
    objective.check((torch.randn(2, 8), torch.tensor([0, 4])), "train")  # fine
    with pytest.raises(DataError, match=r"task 't' \(train data\): labels \[7\] are outside the class range 0..4"):
        objective.check((torch.randn(2, 8), torch.tensor([7, 1])), "train")
