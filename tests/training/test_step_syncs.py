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


class _Unchecked(Classify):
    def check(self, batch, split):  # the label check reads the host batch; not what is counted here
        pass


def _task_and_config(steps, on_nonfinite):
    from ftn.training.config import TrainConfig
    from helpers.tiny import tiny_method

    task = tiny_method().add_task("d", nn.Linear(16, 3))
    return task, TrainConfig(epochs=1, max_steps=steps, log_every=1000, lr=1e-2, recalibrate_bn=False,
                             on_nonfinite=on_nonfinite)


def _syncs_of_a_run(tmp_path, steps, on_nonfinite):
    from ftn.training.config import DataConfig
    from ftn.training.engine import train_task
    from helpers.tiny import tiny_data

    data = tiny_data()
    data.objective = _Unchecked(3, "d")
    task, cfg = _task_and_config(steps, on_nonfinite)
    _, count = count_ops(lambda: train_task(task, data, cfg, DataConfig(batch_size=4, eval_batch_size=16),
                                            tmp_path / f"{on_nonfinite}{steps}", progress=False))
    return count.host_syncs


def _optimizer_reads_per_step():
    """torch's AdamW reads its CPU step counters (host memory even on a GPU: no device sync)."""
    from ftn.training.engine import _optimizers

    task, cfg = _task_and_config(1, "stop")
    optimizers = _optimizers(task, cfg)
    for p in task.parameters:
        p.grad = torch.zeros_like(p)
    for o in optimizers:
        o.step()  # the first step makes the state
    _, count = count_ops(lambda: [o.step() for o in optimizers])
    return count.host_syncs


@pytest.mark.parametrize("on_nonfinite, per_step", [("stop", 0), ("skip", 1)])
def test_the_engines_step_reads_the_loss_only_when_it_must(tmp_path, on_nonfinite, per_step):
    """Same evaluations, 4 or 12 steps: the difference is what each step reads back, beyond the
    optimizer's own step counters. The default (stop on a NaN/inf loss) reads nothing per step;
    skipping a bad batch must decide each step."""
    extra = _syncs_of_a_run(tmp_path, 12, on_nonfinite) - _syncs_of_a_run(tmp_path, 4, on_nonfinite)
    counters = _optimizer_reads_per_step()
    assert counters > 0
    assert extra == 8 * (counters + per_step)

