"""Dense (partial unfreezing) and gated dense (TAPS) per-task updates next to CP factors: the
same gradient as fine-tuning, isolation between tasks, adapter files, merge, reports, the
straight-through gate and the all-tasks / mixed-batch runners."""

import copy
import json
import struct

import pytest
import torch
from torch import nn

from ftn import CPFactors, DenseDelta, FTNModel, GatedDelta
from ftn.core.adapters import read_adapter
from ftn.core.multitask import forward_all_tasks

from helpers import SmallCNN, fresh_model, randomize_norms, train_steps

UNFROZEN = ["same", "pointwise", "fc"]  # a conv subclass (functional_call), a plain conv, a Linear


def metadata(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"]


def switch_off(model, task, layer):
    with torch.no_grad():
        model.adapted_layers()[layer].tasks[task].score.fill_(0.05)  # τ = 0.1


def test_unfrozen_layers_get_dense_updates_and_their_gradient_equals_fine_tuning(images):
    torch.manual_seed(0)
    plain = randomize_norms(SmallCNN()).eval()
    model = FTNModel(copy.deepcopy(plain), rank=3, unfreeze=UNFROZEN).eval()
    model.add_task("a")
    kinds = {ln: type(layer.tasks["a"]) for ln, layer in model.adapted_layers().items()}
    assert {ln for ln, k in kinds.items() if k is DenseDelta} == set(UNFROZEN)
    assert all(k is CPFactors for ln, k in kinds.items() if ln not in UNFROZEN)
    assert torch.equal(model(images, task="a"), plain(images))  # D = 0 at start

    fine_tuned = dict(plain.named_parameters())
    for name in UNFROZEN:
        fine_tuned[f"{name}.weight"].requires_grad_(True)
    plain(images).pow(2).sum().backward()
    model(images, task="a").pow(2).sum().backward()
    for name in UNFROZEN:
        got = model.adapted_layers()[name].tasks["a"].weight.grad
        torch.testing.assert_close(got, fine_tuned[f"{name}.weight"].grad, rtol=1e-6, atol=1e-7)
        assert got.abs().sum() > 0


def test_training_one_task_leaves_the_others_bit_identical(images):
    model = fresh_model(unfreeze=["pointwise"])
    model.add_task("a", head=nn.Linear(16, 3))
    model.add_task("b", head=nn.Linear(16, 3), gate={"tau": 0.1})
    model.add_task("c", head=nn.Linear(16, 3))
    train_steps(model, "a", images)
    with torch.no_grad():
        before = {t: model(images, task=t) for t in ("a", "c")}
    train_steps(model, "b", images)
    with torch.no_grad():
        assert all(torch.equal(model(images, task=t), y) for t, y in before.items())
        b = model(images, task="b")
    train_steps(model, "a", images)
    with torch.no_grad():
        assert torch.equal(model(images, task="b"), b)


@pytest.mark.parametrize("kind", ["unfreeze", "gated"])
def test_adapter_round_trip_is_bit_identical(kind, images, tmp_path):
    model = fresh_model(unfreeze=["pointwise"] if kind == "unfreeze" else [])
    model.add_task("a", head=nn.Linear(16, 4), gate={"tau": 0.1} if kind == "gated" else None)
    train_steps(model, "a", images)
    if kind == "gated":
        switch_off(model, "a", "grouped")
    with torch.no_grad():
        expected = model(images, task="a")
    path = model.save_task("a", tmp_path / "a.safetensors")
    tensors, _ = read_adapter(path)
    meta = metadata(path)
    assert meta["format_version"] == "2"
    layers = json.loads(meta["layers"])
    if kind == "gated":
        assert layers["grouped"]["rank"] == 0 and "delta.grouped.weight" not in tensors  # off: not stored
        assert layers["pointwise"]["kind"] == "gated" and layers["pointwise"]["options"] == {"tau": 0.1}
        assert "delta.pointwise.score" in tensors
    else:
        assert layers["pointwise"]["kind"] == "dense" and "delta.pointwise.weight" in tensors
        assert "kind" not in layers["stem"] and "delta.stem.0" in tensors

    other = fresh_model()  # no unfreeze in its config: the file says which layers are dense
    assert other.load_task(path) == "a"
    with torch.no_grad():
        assert torch.equal(other(images, task="a"), expected)
    report, loaded = model.parameter_report().tasks["a"], other.parameter_report().tasks["a"]
    assert (loaded.delta, loaded.dense, loaded.layers) == (report.delta, report.dense, report.layers)
    assert other.task_spec("a") == model.task_spec("a")


def test_cp_only_files_keep_format_version_1(images, tmp_path):
    """A task of CP factors only is written exactly as before (version 1, no update kinds), so an
    older ftn reads it, and such files load."""
    model = fresh_model()
    model.add_task("a", head=nn.Linear(16, 4))
    train_steps(model, "a", images)
    path = model.save_task("a", tmp_path / "a.safetensors")
    meta = metadata(path)
    assert meta["format_version"] == "1"
    assert all(set(entry) == {"shape", "modes", "rank", "requested_rank"} for entry in json.loads(meta["layers"]).values())
    other = fresh_model()
    other.load_task(path)
    with torch.no_grad():
        assert torch.equal(other(images, task="a"), model(images, task="a"))


def test_merge_equals_the_unmerged_model_for_dense_and_gated_updates(images):
    model = fresh_model(unfreeze=["pointwise", "same"])
    model.add_task("a", head=nn.Linear(16, 4))
    model.add_task("b", head=nn.Linear(16, 4), gate={"tau": 0.1})
    for task in ("a", "b"):
        train_steps(model, task, images)
    switch_off(model, "b", "stem")
    for task in ("a", "b"):
        merged = model.merge(task).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(images), model(images, task=task), rtol=1e-5, atol=1e-6)
    stem = model.merge("b").backbone.stem
    assert torch.equal(stem.weight, model.adapted_layers()["stem"].base.weight)  # gate off: W itself


def test_parameter_report_counts_dense_updates_and_only_the_gates_switched_on():
    model = fresh_model(unfreeze=["pointwise"])
    model.add_task("a")
    model.add_task("b", gate={"tau": 0.1})
    layers = model.adapted_layers()
    size = {ln: layer.base.weight.numel() for ln, layer in layers.items()}
    cp = sum(layer.tasks["a"].num_params() for ln, layer in layers.items() if ln != "pointwise")
    report = model.parameter_report().tasks
    assert (report["a"].delta, report["a"].dense, report["a"].layers) == (cp + size["pointwise"], size["pointwise"],
                                                                         len(layers))
    assert report["b"].delta == report["b"].dense == sum(size.values()) + len(layers) - 1  # gated: δW + score
    switch_off(model, "b", "grouped")
    switch_off(model, "b", "fc")
    b = model.parameter_report().tasks["b"]
    assert b.layers == len(layers) - 2
    assert b.delta == sum(n for ln, n in size.items() if ln not in ("grouped", "fc")) + len(layers) - 3
    assert "dense ΔW" in str(model.parameter_report())
    # the optimizer still sees every gated layer (a switched-off layer can switch back on)
    names = [n for n, _ in model.named_task_parameters("b") if n.startswith("delta.")]
    assert len(names) == 2 * len(layers) - 1  # pointwise is dense (unfreeze), the rest δW + score


def test_gate_off_gives_exactly_the_frozen_layer_and_the_score_a_straight_through_gradient(images):
    model = fresh_model()
    model.add_task("a", gate={"tau": 0.1})
    layer = model.adapted_layers()["pointwise"]
    gated = layer.tasks["a"]
    with torch.no_grad():
        gated.weight.normal_()
    x = torch.randn(2, 16, 4, 4)
    model.set_task("a")
    assert gated.active and not torch.equal(layer(x), layer.base(x))
    switch_off(model, "a", "pointwise")
    assert not gated.active
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))
    y = layer(x)  # with autograd: the gate stays in the graph
    assert torch.equal(y, layer.base(x))
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    # straight-through: ∂L/∂s = ⟨∂L/∂W', δW⟩, with ∂L/∂W' the gradient of the layer's weight
    w = layer.base.weight.detach().clone().requires_grad_(True)
    (layer._forward_with_weight(x, w) * upstream).sum().backward()
    torch.testing.assert_close(gated.score.grad, (w.grad * gated.weight).sum())
    assert gated.score.grad != 0
    assert gated.weight.grad.abs().sum() == 0  # gate off: δW gets nothing
    model.set_task(None)


def test_all_tasks_pass_and_mixed_batches_support_dense_and_gated_updates(images):
    model = fresh_model(unfreeze=["pointwise"], task_norms=True)
    model.add_task("a", head=nn.Linear(16, 3))
    model.add_task("b", head=nn.Linear(16, 3), gate={"tau": 0.1})
    for task in ("a", "b"):
        train_steps(model, task, images)
    switch_off(model, "b", "grouped")
    with torch.no_grad():
        loop = {t: model(images, task=t) for t in ("a", "b")}
        together = forward_all_tasks(model, images)
        mixed = model.forward_mixed(images, ["a", "b", "b", "a"])
    for t in ("a", "b"):
        torch.testing.assert_close(together[t], loop[t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed["a"], loop["a"][[0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed["b"], loop["b"][[1, 2]], rtol=1e-5, atol=1e-5)


def test_eval_cache_sees_a_gate_switching(images):
    model = fresh_model()
    model.add_task("a", head=nn.Linear(16, 3), gate={"tau": 0.1})
    train_steps(model, "a", images)
    with torch.no_grad():
        on = model(images, task="a")
        for layer in model.adapted_layers().values():
            layer.tasks["a"].score.fill_(0.0)
        off = model(images, task="a")
    assert not torch.equal(on, off)
    with torch.no_grad():  # every gate off: the frozen backbone with the task's norms and head
        for layer in model.adapted_layers().values():
            layer.remove_task("a")
        assert torch.equal(model(images, task="a"), off)


def test_attention_projections_take_dense_and_gated_updates(tmp_path):
    torch.manual_seed(0)
    backbone = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    model = FTNModel(backbone, rank=2, unfreeze=["self_attn.in_proj"]).eval()
    model.add_task("a")
    model.add_task("b", gate={"tau": 0.1})
    x = torch.randn(2, 5, 16)
    for task in ("a", "b"):
        train_steps(model, task, x)
    switch_off(model, "b", "self_attn.out_proj")
    kinds = {ln: layer.tasks["a"].kind for ln, layer in model.adapted_layers().items()}
    assert kinds["self_attn.in_proj"] == "dense" and kinds["self_attn.out_proj"] == "cp"
    for task in ("a", "b"):
        with torch.no_grad():
            expected = model(x, task=task)
            torch.testing.assert_close(model.merge(task).eval()(x), expected, rtol=1e-5, atol=1e-5)
        path = model.save_task(task, tmp_path / f"{task}.safetensors")
        torch.manual_seed(0)
        other = FTNModel(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0).eval(),
                         rank=2).eval()
        other.load_task(path)
        with torch.no_grad():
            assert torch.equal(other(x, task=task), expected)
