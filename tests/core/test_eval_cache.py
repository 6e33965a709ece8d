"""The eval cache (ftn.core.cache) never serves an old weight.

Each test fills the caches with an eval forward under ``no_grad``, changes the model in one of
the ways training code does (optimizer steps — fused ones do not bump version counters —,
``p.data`` writes as in a hand-written EMA, ``copy_``, ``load_state_dict``, ``.to()``,
BatchNorm statistics updates), runs the cached forward again and compares it with a forward
under autograd, which never reads a cache. Covered for FTN conv/linear layers, for
``nn.MultiheadAttention`` (per-projection parts, frozen rows, per-task biases) and for the
all-tasks pass.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import ftn.core.cache
from ftn import FTNConfig, FTNModel
from ftn.core.attention import FTNMultiheadAttention
from ftn.core.cache import EvalCache, EvalCachedModule, invalidate_eval_caches
from ftn.core.multitask import forward_all_tasks

from helpers import SmallCNN, randomize_norms


def _fused_adamw_works() -> bool:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    try:
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "adamw_foreach_false": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
}
MUTATIONS = [*OPTIMIZERS, "data_add", "copy_no_grad", "load_state_dict", "to_float64"]


def _param(kind):
    if kind == "adamw_fused" and not _fused_adamw_works():
        return pytest.param(kind, marks=pytest.mark.skip(reason="AdamW(fused=True) is not supported on CPU here"))
    return kind


PARAMS = [_param(k) for k in MUTATIONS]


# ------------------------------------------------------------------ models
def _perturb(model, task, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.task_parameters(task):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _cnn_model():
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(SmallCNN()), rank=2)
    model.add_task("a")
    _perturb(model, "a", 1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model.eval(), ((x,), {}), ["a"]


def _attention_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    config = FTNConfig(rank=2, fused_qkv="per_projection", train_bias=True,
                             exclude=["*.k_proj"])  # k rows stay frozen inside the packed weight
    model = FTNModel(layer, config=config)
    model.add_task("a")
    _perturb(model, "a", 1)
    assert any(isinstance(m, FTNMultiheadAttention) for m in model.modules())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    return model.eval(), ((x,), {}), ["a"]


def _stackable_backbone():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))


def _multitask_model():
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(_stackable_backbone()), rank=2)
    for i, name in enumerate(("t0", "t1")):
        model.add_task(name, head=nn.Linear(8, 4))
        _perturb(model, name, i + 1)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    return model.eval(), ((x,), {}), ["t0", "t1"]


def _as_dtype(inputs, model):
    dtype = next(model.parameters()).dtype
    args, kwargs = inputs
    return tuple(a.to(dtype) for a in args), kwargs


def _per_task(model, inputs, tasks):
    """What the cached path must give: the plain forward under autograd (no cache is read)."""
    args, kwargs = _as_dtype(inputs, model)
    with torch.enable_grad():
        return {t: model(*args, task=t, **kwargs).detach() for t in tasks}


def _loop(model, inputs, tasks):
    args, kwargs = _as_dtype(inputs, model)
    with torch.no_grad():
        return {t: model(*args, task=t, **kwargs) for t in tasks}


def _all_tasks(model, inputs, tasks):
    (x,), _ = _as_dtype(inputs, model)
    with torch.no_grad():
        return forward_all_tasks(model, x, tasks, fallback=False)


# ------------------------------------------------------------------ changes
def _mutate(kind, model, inputs, task):
    params = model.task_parameters(task)
    if kind in OPTIMIZERS:
        # A step taken in eval mode (frozen norms): no train() call in between to clear anything.
        opt = OPTIMIZERS[kind](params)
        args, kwargs = inputs
        with torch.enable_grad():
            model(*args, task=task, **kwargs).square().mean().backward()
        opt.step()
        return
    g = torch.Generator().manual_seed(7)
    if kind == "data_add":  # a hand-written update / EMA: bypasses the version counter
        for p in params:
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    elif kind == "copy_no_grad":
        with torch.no_grad():
            for p in params:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    elif kind == "load_state_dict":
        ids = {id(p) for p in params}
        names = {n for n, p in model.named_parameters() if id(p) in ids}
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k in names else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    elif kind == "to_float64":
        model.to(torch.float64)
    else:  # pragma: no cover
        raise ValueError(kind)


def _check(build, run, kind, reference=_per_task, mutated_task=None):
    model, inputs, tasks = build()
    before = run(model, inputs, tasks)  # fills the caches
    assert run(model, inputs, tasks).keys() == before.keys()  # and reads them
    _mutate(kind, model, inputs, mutated_task or tasks[0])
    got = run(model, inputs, tasks)
    expected = reference(model, inputs, tasks)
    changed = False
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5, msg=lambda m: f"task {t}: {m}")
        changed |= (before[t].dtype != expected[t].dtype
                    or not torch.allclose(before[t], expected[t], rtol=1e-3, atol=1e-3))
    assert changed, "the change did not move the output: the test would prove nothing"


@pytest.mark.parametrize("kind", PARAMS)
def test_conv_and_linear_layers_see_every_change(kind):
    _check(_cnn_model, _loop, kind)


@pytest.mark.parametrize("kind", PARAMS)
def test_multihead_attention_sees_every_change(kind):
    _check(_attention_model, _loop, kind)


@pytest.mark.parametrize("kind", PARAMS)
def test_all_tasks_pass_sees_every_change(kind):
    _check(_multitask_model, _all_tasks, kind)


def test_all_tasks_pass_sees_batchnorm_statistics_updated_in_train_mode():
    # BatchNorm updates running_mean / running_var in place without bumping their versions.
    def update_statistics(model, inputs, tasks):
        model.train()
        with torch.no_grad():
            model(*inputs[0], task="t1")
        model.eval()

    model, inputs, tasks = _multitask_model()
    before = _all_tasks(model, inputs, tasks)
    update_statistics(model, inputs, tasks)
    got, expected = _all_tasks(model, inputs, tasks), _per_task(model, inputs, tasks)
    assert not torch.allclose(before["t1"], expected["t1"], atol=1e-3)
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the frozen base weight
def _base_weights(model):
    return [layer.base.weight for layer in model.adapted_layers().values()]


@pytest.mark.parametrize("build,run", [(_cnn_model, _loop), (_attention_model, _loop),
                                       (_multitask_model, _all_tasks)], ids=["layers", "attention", "all_tasks"])
def test_frozen_weight_changes(build, run):
    model, inputs, tasks = build()
    run(model, inputs, tasks)
    with torch.no_grad():  # an in-place write that bumps the version counter is seen
        for w in _base_weights(model):
            w.mul_(1.5)
    _assert_fresh(model, inputs, tasks, run)
    # An optimizer step on an unfrozen backbone is seen too, fused or not (step hook).
    weights = _base_weights(model)
    for w in weights:
        w.requires_grad_(True)
        w.grad = torch.ones_like(w)
    (torch.optim.AdamW(weights, lr=0.05, fused=True) if _fused_adamw_works()
     else torch.optim.SGD(weights, lr=0.05)).step()
    _assert_fresh(model, inputs, tasks, run)
    # The documented gap: a .data write to the frozen weight needs invalidate_eval_caches().
    for w in weights:
        w.data.mul_(0.5)
    invalidate_eval_caches()
    _assert_fresh(model, inputs, tasks, run)


def _assert_fresh(model, inputs, tasks, run):
    got, expected = run(model, inputs, tasks), _per_task(model, inputs, tasks)
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ reuse and housekeeping
def test_cache_is_reused_and_copies_start_empty():
    model, inputs, tasks = _attention_model()
    layers = [m for m in model.modules() if isinstance(m, EvalCachedModule)]
    _loop(model, inputs, tasks)
    assert all(len(m._eval_cache) for m in layers)
    wrapper = next(m for m in layers if isinstance(m, FTNMultiheadAttention))
    with torch.no_grad():
        assert wrapper._overrides("a") is wrapper._overrides("a")  # a hit: the same dict
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any(len(m._eval_cache) for m in clone.modules() if isinstance(m, EvalCachedModule))
        torch.testing.assert_close(_loop(clone, inputs, tasks)["a"], _loop(model, inputs, tasks)["a"])
    model.train()  # entering training frees the cached dense weights
    assert not any(len(m._eval_cache) for m in layers)


def test_entries_are_checked_by_value_identity_dtype_shape_and_strides():
    # torch.equal(zeros(float32), zeros(float64)) is True: the cache compares dtypes itself.
    cache, calls = EvalCache(), []

    def get(exact, tracked):
        with torch.no_grad():
            return cache.get("k", lambda: calls.append(1) or len(calls), exact=exact, tracked=tracked)

    a, w = torch.zeros(3), torch.ones(4, 2)
    assert get([a], [w]) == get([a], [w]) == 1  # unchanged: a hit
    a.data.add_(1.0)  # no version bump
    assert get([a], [w]) == 2
    assert get([a.clone()], [w]) == 3  # another tensor, even with the same values
    b = a.double()
    assert get([b], [w]) == 4 and get([b], [w]) == 4
    b.data = b.data.float()  # same object, same values, other dtype
    assert get([b], [w]) == 5
    assert get([b], [w.clone()]) == 6  # another frozen tensor with the same values
    v = w.t().contiguous().t()  # same values and shape, other strides
    assert get([b], [v]) == 7 and get([b], [v]) == 7
    with torch.enable_grad():
        assert cache.get("k", lambda: -1, exact=[b], tracked=[v]) == -1  # never cached with autograd


@pytest.mark.parametrize("kind", PARAMS)
def test_all_tasks_pass_with_checks_batched_per_pass(kind, monkeypatch):
    # On accelerators the values are compared once per pass for the whole model (one device
    # sync) instead of at each lookup; run that code path on the CPU.
    monkeypatch.setattr(ftn.core.cache, "_batched", lambda device: True)
    _check(_multitask_model, _all_tasks, kind)


def test_batched_checks_run_once_per_pass(monkeypatch):
    monkeypatch.setattr(ftn.core.cache, "_batched", lambda device: True)
    model, inputs, tasks = _multitask_model()
    _all_tasks(model, inputs, tasks)  # builds
    group = model.context.checks
    calls = []
    check = ftn.core.cache.CheckGroup.check
    monkeypatch.setattr(ftn.core.cache.CheckGroup, "check", lambda self, key: calls.append(key) or check(self, key))
    compared = []
    same = ftn.core.cache._Exact.same_values
    monkeypatch.setattr(ftn.core.cache._Exact, "same_values",
                        lambda self, ts: (ts and compared.append(1)) or same(self, ts))
    _all_tasks(model, inputs, tasks)
    # one batched comparison per cache key in the pass, none per lookup
    assert calls and len(calls) == len(set(calls)) and compared == []
    per_pass = len(calls)
    assert len(group._caches) > 0
    for p in model.task_parameters("t1"):
        p.data.mul_(1.5)
    got, expected = _all_tasks(model, inputs, tasks), _per_task(model, inputs, tasks)
    assert len(calls) == 2 * per_pass and compared  # the batch differed: each entry compared on its own
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5)


def test_a_pass_over_one_task_compares_only_that_tasks_entries(monkeypatch):
    """On a GPU the per-task loop once got slower as T grew: the batched check of a pass with
    task a compares task a's entries only, not every task's, so a loop over T tasks costs T
    checks of one task each instead of T checks of T tasks."""
    monkeypatch.setattr(ftn.core.cache, "_batched", lambda device: True)
    torch.manual_seed(0)
    model = FTNModel(randomize_norms(SmallCNN()), rank=2)
    tasks = ["a", "b", "c"]
    for i, t in enumerate(tasks):
        model.add_task(t)
        _perturb(model, t, i + 1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval()
    first = _loop(model, ((x,), {}), tasks)  # builds every task's entries
    calls = []
    check = ftn.core.cache.CheckGroup.check
    monkeypatch.setattr(ftn.core.cache.CheckGroup, "check", lambda self, key: calls.append(key) or check(self, key))
    group = model.context.checks
    with torch.no_grad():
        out = model(x, task="b")
    assert calls == ["b"]
    entries = [e for c in group._caches for e in c._entries.values()]
    trusted = [e for c in group._caches for k, e in c._entries.items() if e.trusted == group.scope]
    assert trusted and len(trusted) == sum(1 for c in group._caches if "b" in c._entries) < len(entries)
    torch.testing.assert_close(out, first["b"], rtol=0, atol=0)


def test_eval_fast_path_serves_the_cache_without_rebuilding(monkeypatch):
    # Unmerged inference: a hit goes from the wrapper's forward straight to the conv,
    # with every check of the entry, and gives the output of the uncached forward.
    from ftn.core.layers import FTNLayer

    model, inputs, tasks = _cnn_model()
    first = _loop(model, inputs, tasks)  # builds
    calls = []
    task_weight = FTNLayer.task_weight
    monkeypatch.setattr(FTNLayer, "task_weight", lambda self, t: calls.append((self.layer_name, t)) or task_weight(self, t))
    again = _loop(model, inputs, tasks)
    assert calls == []  # every adapted layer was served by the fast path
    torch.testing.assert_close(again["a"], first["a"], rtol=0, atol=0)
    torch.testing.assert_close(again["a"], _per_task(model, inputs, tasks)["a"], rtol=1e-5, atol=1e-5)
    layer = next(iter(model.adapted_layers().values()))
    layer.tasks["a"].factors[0].data.mul_(2.0)  # no version bump: only the value check sees it
    calls.clear()  # (the reference forward under autograd called it for the non-plain layer)
    _loop(model, inputs, tasks)
    assert calls == [(layer.layer_name, "a")]  # that layer missed and rebuilt; the others hit


def test_unmerged_eval_runs_the_plain_modules_and_still_sees_every_change(monkeypatch):
    # Eval without autograd runs the task's backbone as plain modules with the cached W + ΔW
    # (no wrapper forward at all), after one check of every entry per pass.
    from ftn.core.layers import FTNLayer
    from ftn.core.norms import TaskNorm

    model, inputs, tasks = _multitask_model()
    first = _loop(model, inputs, tasks)

    def refuse(self, x):
        raise AssertionError("a wrapper ran in the eval fast path")

    with monkeypatch.context() as patch:
        patch.setattr(FTNLayer, "forward", refuse)
        patch.setattr(TaskNorm, "forward", refuse)
        again = _loop(model, inputs, tasks)
        for t in tasks:
            torch.testing.assert_close(again[t], first[t], rtol=0, atol=0)
        _mutate("data_add", model, inputs, "t0")  # no version bump: the values are compared
        changed = _loop(model, inputs, tasks)
    expected = _per_task(model, inputs, tasks)
    for t in tasks:
        torch.testing.assert_close(changed[t], expected[t], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed["t0"], first["t0"], rtol=1e-3, atol=1e-3)
    # A hook on a wrapper is honoured: that forward goes through the wrappers again.
    seen = []
    layer = next(iter(model.adapted_layers().values()))
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(m))
    _loop(model, inputs, tasks)
    assert seen == [layer, layer]
    handle.remove()
    # A child swapped in a container is seen too.
    model.backbone[2] = nn.Tanh()
    swapped = _loop(model, inputs, tasks)
    expected = _per_task(model, inputs, tasks)
    for t in tasks:
        torch.testing.assert_close(swapped[t], expected[t], rtol=1e-5, atol=1e-5)


class _Skip(nn.Module):
    """A block whose forward reads a plain attribute (as torchvision's InvertedResidual reads
    ``use_res_connect``): the eval view copies such containers and must see it change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = True

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.skip else y


def _skip_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Skip(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = FTNModel(randomize_norms(backbone), rank=2)
    model.add_task("t0")
    _perturb(model, "t0", 1)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    return model.eval(), ((x,), {}), ["t0"]


def _replace_factor(model):
    update = model.backbone[0].tasks["t0"]
    update.factors[0] = nn.Parameter(update.factors[0].detach() + 0.5)


def _replace_norm(model):
    norm = model.backbone[1]
    copy_ = copy.deepcopy(norm.tasks["t0"])
    with torch.no_grad():
        copy_.weight.mul_(3.0)
    norm.tasks["t0"] = copy_


def _replace_bias(model):
    base = model.backbone[0].base
    base.bias = nn.Parameter(base.bias.detach() + 1.0)


def _set_padding(model):
    base = model.backbone[3].conv.base
    base.padding = (2, 2)
    base.dilation = (2, 2)


STRUCTURAL = {
    "container_attribute": lambda model: setattr(model.backbone[3], "skip", False),
    "factor_replaced": _replace_factor,
    "norm_copy_replaced": _replace_norm,
    "base_bias_replaced": _replace_bias,
    "base_padding_and_dilation": _set_padding,
    "base_replaced": lambda model: setattr(model.backbone[0], "base", nn.Conv2d(3, 8, 3, padding=1)),
    "train_mode_of_a_norm_copy": lambda model: model.backbone[1].tasks["t0"].train(),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURAL))
def test_unmerged_eval_sees_changes_to_what_the_view_copies_or_reads(kind):
    # The eval view runs shallow copies of the containers and each base conv with the cached
    # W + ΔW: a changed attribute, a replaced tensor or module must give the uncached output.
    model, inputs, tasks = _skip_model()
    before = _loop(model, inputs, tasks)
    _loop(model, inputs, tasks)  # served by the view
    STRUCTURAL[kind](model)
    got = _loop(model, inputs, tasks)
    expected = _per_task(model, inputs, tasks)
    torch.testing.assert_close(got["t0"], expected["t0"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before["t0"], expected["t0"], rtol=1e-3, atol=1e-3), "the change moved nothing"


def test_eval_view_refused_input_gets_ftns_error():
    # A wrongly shaped input fails in the plain modules; the wrappers then name the problem.
    from ftn.core.errors import ShapeError

    model, inputs, tasks = _multitask_model()
    _loop(model, inputs, tasks)
    with torch.no_grad(), pytest.raises(ShapeError, match="expects input of shape"):
        model(torch.randn(2, 5, 12, 12), task="t0")
    with torch.no_grad():  # and the view still serves the next good input
        torch.testing.assert_close(model(*inputs[0], task="t0"), _loop(model, inputs, tasks)["t0"])
    assert model._plain_views["t0"] is not ftn.core.model._PlainBackbone.UNSUPPORTED


def test_eval_view_does_not_swallow_a_bug(monkeypatch):
    # An exception that no wrong input causes (a bug in the view) propagates as it is instead
    # of being hidden behind the wrappers' path.
    model, inputs, tasks = _multitask_model()
    _loop(model, inputs, tasks)

    def broken(self, x):
        raise AttributeError("a bug in the eval view")

    monkeypatch.setattr(ftn.core.model._ConvWithWeight, "forward", broken)
    with pytest.raises(AttributeError, match="a bug in the eval view"):
        _loop(model, inputs, tasks)


def test_eval_view_failing_where_the_wrappers_do_not_warns_and_falls_back(monkeypatch):
    # A torch error in the view on an input the wrappers accept is the view's fault: the
    # output is the wrappers', a warning says so, and the task keeps the wrappers' path.
    model, inputs, tasks = _multitask_model()
    expected = _per_task(model, inputs, tasks)
    _loop(model, inputs, tasks)

    def broken(self, x):
        raise RuntimeError("view-only failure")

    monkeypatch.setattr(ftn.core.model._ConvWithWeight, "forward", broken)
    with pytest.warns(RuntimeWarning, match="view-only failure"):
        got = _loop(model, inputs, tasks)
    for t in tasks:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5)
    assert model._plain_views["t0"] is ftn.core.model._PlainBackbone.UNSUPPORTED
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the view is not tried again
        again = _loop(model, inputs, tasks)
    torch.testing.assert_close(again["t0"], expected["t0"], rtol=1e-5, atol=1e-5)


def test_eval_views_start_empty_in_copies():
    # A copy's views would run the original's modules: copies rebuild their own.
    model, inputs, tasks = _multitask_model()
    _loop(model, inputs, tasks)
    assert model._plain_views
    clone = copy.deepcopy(model)
    assert not clone._plain_views
    restored = pickle.loads(pickle.dumps(model))
    assert not restored.__dict__.get("_plain_views")
    with torch.no_grad():
        clone.backbone[0].tasks["t0"].factors[0].mul_(2.0)  # the copy only
    torch.testing.assert_close(_loop(model, inputs, tasks)["t0"], _per_task(model, inputs, tasks)["t0"])
    torch.testing.assert_close(_loop(clone, inputs, tasks)["t0"], _per_task(clone, inputs, tasks)["t0"])
    torch.testing.assert_close(_loop(restored, inputs, tasks)["t0"], _per_task(restored, inputs, tasks)["t0"])


def test_eval_view_keeps_no_dense_weight_the_caches_dropped():
    # A server bounds the dense W + ΔW it keeps with clear_cache(task); the eval view must not
    # keep them alive behind its back, nor a removed task's view at all.
    import gc
    import weakref

    model, inputs, tasks = _multitask_model()
    _loop(model, inputs, tasks)
    _loop(model, inputs, tasks)
    layers = list(model.adapted_layers().values())
    weights = [weakref.ref(layer._eval_cache._entries["t0"].value) for layer in layers]
    for layer in layers:
        layer.clear_cache("t0")
    gc.collect()
    assert all(w() is None for w in weights)
    torch.testing.assert_close(_loop(model, inputs, tasks)["t0"], _per_task(model, inputs, tasks)["t0"])
    model.remove_task("t1")
    assert "t1" not in model._plain_views


def test_eval_view_layers_answer_attribute_reads_like_the_wrappers():
    # Model code reads its layers' attributes directly (Hugging Face ViT: projection.weight.dtype,
    # others in_channels or kernel_size): the view's layers answer as the wrappers do.
    model, inputs, tasks = _multitask_model()
    _loop(model, inputs, tasks)
    wrapper = model.backbone[0]
    plain = model._plain_views["t0"].module[0]
    with torch.no_grad(), model.using_task("t0"):
        torch.testing.assert_close(plain.weight, wrapper.weight, rtol=0, atol=0)
    for name in ("bias", "in_channels", "kernel_size", "stride", "padding", "groups"):
        assert getattr(plain, name) is getattr(wrapper.base, name), name
    with pytest.raises(AttributeError):
        plain.no_such_attribute
