"""``FTNModel.adapted_layers()`` / ``task_norm_layers()`` come from a walk of the backbone kept
while its module tree is unchanged (``ftn.core.model._LayerIndex``). After every way of
changing the tree they must equal a fresh walk, and a training forward must not walk the tree."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from ftn import FTNModel
from ftn.core.layers import FTNConv, FTNLayer, TaskContext
from ftn.core.norms import TaskNorm

from helpers import SmallCNN


def _walk(model):
    """What the lists must be: a fresh walk, in the walk's order."""
    layers = {m.layer_name: m for m in model.backbone.modules() if isinstance(m, FTNLayer)}
    norms = {m.layer_name: m for m in model.backbone.modules() if isinstance(m, TaskNorm)}
    return layers, norms


def _assert_fresh(model):
    layers, norms = _walk(model)
    got_layers, got_norms = model.adapted_layers(), model.task_norm_layers()
    assert list(got_layers) == list(layers) and list(got_norms) == list(norms)
    assert all(a is b for a, b in zip(got_layers.values(), layers.values()))
    assert all(a is b for a, b in zip(got_norms.values(), norms.values()))


def _model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = FTNModel(backbone, rank=2)
    model.add_task("a")
    return model


def _new_layer(model, name="extra"):
    return FTNConv(nn.Conv2d(8, 8, 1), model.context, name)


def _insert(model):
    model.backbone.insert(3, _new_layer(model))  # Sequential.insert writes _modules directly


def _delete(model):
    del model.backbone[3]  # Sequential.__delitem__ rebuilds _modules


def _direct_write(model):
    model.backbone[3]._modules["0"] = _new_layer(model)  # no setattr, no hook


def _rename(model):
    model.backbone[0].layer_name = "renamed"


def _retype(model):
    class Watched(FTNConv):
        pass

    model.backbone[0].__class__ = Watched  # still a wrapper; the lists must still match a walk


def _swap_in_plain(model):
    model.backbone[3][0] = nn.Conv2d(8, 8, 3, padding=1)  # a wrapper replaced by a plain conv


def _moved(model):
    model.to(torch.float64)


def _module_list(model):
    model.backbone.append(nn.ModuleList([_new_layer(model, "listed")]))


CHANGES = {
    "add_task": lambda model: model.add_task("b"),
    "remove_task": lambda model: model.remove_task("a"),
    "setattr": lambda model: setattr(model.backbone, "3", nn.Sequential(_new_layer(model))),
    "insert": _insert,
    "delitem": _delete,
    "direct _modules write": _direct_write,
    "delattr": lambda model: delattr(model.backbone[3], "0"),
    "rename": _rename,
    "class changed": _retype,
    "wrapper swapped for a plain conv": _swap_in_plain,
    "to(float64)": _moved,
    "module list appended": _module_list,
    "backbone replaced": lambda model: setattr(model, "backbone", nn.Sequential(_new_layer(model, "only"))),
    "merge (does not change the model)": lambda model: model.merge("a"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_layer_lists_match_a_fresh_walk_after_each_change(change):
    model = _model()
    _assert_fresh(model)  # fills the index
    before = [(name, id(layer)) for name, layer in model.adapted_layers().items()]
    CHANGES[change](model)
    _assert_fresh(model)
    if change not in ("add_task", "remove_task", "to(float64)", "merge (does not change the model)", "class changed"):
        after = [(name, id(layer)) for name, layer in model.adapted_layers().items()]
        assert after != before, "the change did not change the layers"


def test_returned_dicts_are_the_callers_own():
    model = _model()
    layers = model.adapted_layers()
    layers.clear()
    model.task_norm_layers().clear()
    _assert_fresh(model)
    assert model.adapted_layers()


def test_copies_walk_their_own_tree():
    model = _model()
    _assert_fresh(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _assert_fresh(clone)
        assert not set(map(id, clone.adapted_layers().values())) & set(map(id, model.adapted_layers().values()))


def test_training_forward_and_task_loads_do_not_walk_the_tree(monkeypatch):
    # Python-work guard: once indexed, a training forward reads the index (no walk of the
    # backbone), and so does adding or removing a task (four and two walks before); the lists
    # read after such a change walk it once (the task's modules changed the tree).
    model = FTNModel(SmallCNN(), rank=2)
    model.add_task("a")
    model.train()
    x = torch.randn(2, 3, 16, 16)
    model(x, task="a").sum().backward()
    walks = []
    modules = nn.Module.modules

    def counting(self):
        if self is model.backbone:
            walks.append(1)
        return modules(self)

    monkeypatch.setattr(nn.Module, "modules", counting)
    for _ in range(3):
        model(x, task="a").sum().backward()
    assert walks == []
    model.add_task("b")
    assert walks == []
    model.adapted_layers(), model.task_norm_layers()
    assert len(walks) == 1
    model(x, task="b").sum().backward()
    model.remove_task("b")
    assert len(walks) == 1
