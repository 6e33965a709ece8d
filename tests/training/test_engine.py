"""The training engine: resume, checkpoints, non-finite losses, bad labels, data order, schedules."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ftn import DataError, FTNError
from ftn.training.config import DataConfig, TrainConfig
from ftn.training.engine import (EpochBatchSampler, NonFiniteLossError, _lr_factor, _optimizers, load_checkpoint,
                                 train_task)
from ftn.training.setting import Classify, TaskData

from helpers.tiny import bn_head, run, tiny_data, tiny_method


@pytest.mark.parametrize("method", ["ftn", "linear", "full", "lora"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, method):
    """Every method's task state (parameters and buffers, the head's BatchNorm statistics
    included) is checkpointed: a resumed run ends bit-identical."""
    _, task_a, full_result = run(tmp_path / "a", method, head=bn_head)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", method, stop=3, head=bn_head)  # "crash" after step 3; the last checkpoint is at step 2
    _, task_b, resumed = run(tmp_path / "b", method, head=bn_head)
    assert any("running_mean" in k for k in task_a.state_dict())
    state_a, state_b = task_a.state_dict(), task_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert resumed.test == full_result.test and resumed.steps == full_result.steps == 12
    assert (tmp_path / "b" / "checkpoint.pt.prev").exists()
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0] == "step,epoch,loss,lr,seconds" and len(log) > 1


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop=5)  # checkpoints at steps 2 and 4
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    _, _, result = run(tmp_path)
    assert "unreadable" in caplog.text and result.steps == 12


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    data = tiny_data()
    data.train.tensors[0][5] = float("nan")
    # Read where the loop reads anyway: here at a checkpoint (every 2 steps, 6 steps per epoch).
    with pytest.raises(NonFiniteLossError, match=r"loss was nan or inf at a step in (1\.\.2|3\.\.4|5\.\.6);"):
        run(tmp_path / "stop", data=data)
    # Never after the state that loss updated was saved: the checkpoint kept (if any) is finite.
    if (tmp_path / "stop" / "checkpoint.pt").exists():
        state = load_checkpoint(tmp_path / "stop" / "checkpoint.pt")["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    _, _, result = run(tmp_path / "skip", data=data, train=TrainConfig(epochs=1, on_nonfinite="skip", lr=1e-2))
    assert result.skipped_batches == 1


def test_best_validation_epoch_is_kept(tmp_path):
    """The state of the epoch with the best validation score is restored at the end."""
    _, task, result = run(tmp_path, train=TrainConfig(epochs=4, lr=5e-2, recalibrate_bn=False))
    scores = [h["val"]["acc"] for h in result.history]
    assert result.best_epoch == scores.index(max(scores))
    assert result.val["acc"] == max(scores)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ftn_pwned",))


def test_pickle_checkpoint_carrying_code_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": _Evil(), "step": 1}))
    with pytest.raises(FTNError, match="no usable checkpoint.*train.resume=false"):
        load_checkpoint(path)
    assert not Path("/tmp/ftn_pwned").exists()


def test_labels_outside_class_range_are_named(tmp_path):
    x = torch.randn(16, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 7] * 4)
    data = TaskData("digits", TensorDataset(x, y), None, None, Classify(3, "digits"))
    method = tiny_method()
    task = method.add_task("digits", torch.nn.Linear(16, 3))
    with pytest.raises(DataError, match=r"task 'digits' \(train data\): labels \[7\] are outside the class range 0..2"):
        train_task(task, data, TrainConfig(max_steps=2), DataConfig(batch_size=8), tmp_path, progress=False)


def test_batch_order_depends_on_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochBatchSampler(10, 4, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    assert [len(b) for b in full] == [4, 4, 2] and len(sampler) == 3
    sampler.set_epoch(1, skip=4)
    assert list(sampler) == full[1:] and len(sampler) == 2
    sampler.set_epoch(2)
    assert list(sampler) != full
    # A last batch smaller than min_batch (BatchNorm needs 2 samples) is dropped, and counted so.
    small = EpochBatchSampler(9, 4, seed=3, min_batch=2)
    assert [len(b) for b in small] == [4, 4] and len(small) == 2


def test_schedules_warm_up_then_decay():
    cosine = _lr_factor(TrainConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1), 12)
    assert [cosine(0), cosine(1)] == [0.5, 1.0] and cosine(2) == pytest.approx(1.0)
    assert cosine(12) == pytest.approx(0.1)
    linear = _lr_factor(TrainConfig(warmup_steps=2, schedule="poly", poly_power=1.0), 12)
    assert linear(7) == pytest.approx(0.5) and linear(12) == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_runs_multi_tensor_with_the_per_tensor_loops_updates(name):
    """The engine asks for foreach updates (PyTorch's default only on accelerators); on the CPU
    they must equal the per-tensor loop's bit for bit, over the task's real parameter groups
    (body, head at its own rate), with weight decay and momentum."""
    cfg = TrainConfig(optimizer=name, lr=1e-2, head_lr=3e-2, weight_decay=0.05, momentum=0.9)
    finals = []
    for foreach in (True, False):
        task = tiny_method("ftn").add_task("d", bn_head())
        opt = _optimizers(task, cfg)[0]
        assert opt.defaults["foreach"] is True
        for group in opt.param_groups:
            group["foreach"] = foreach
        params = [p for g in opt.param_groups for p in g["params"]]
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        finals.append([p.detach().clone() for p in params])
    assert len(finals[0]) > 10
    assert all(torch.equal(a, b) for a, b in zip(*finals))
