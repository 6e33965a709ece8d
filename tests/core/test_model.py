"""FTNModel: isolation, no forgetting, merge, tasks API, errors, norms, parameter accounting."""

import pytest
import torch
import torchvision
from torch import nn

from ftn import ConfigError, FTNLayer, FTNModel, ShapeError, TaskError, cp_num_params
from ftn.training.backbones import build_backbone, strip_classifier
from ftn.core.norms import TaskNorm

from helpers import SmallCNN, randomize_norms, tensor_hash, train_steps


def test_init_is_bit_identical_to_pretrained_backbone(small_cnn, images):
    expected = small_cnn(images)
    model = FTNModel(small_cnn, rank=4).eval()
    assert torch.equal(model(images), expected)  # no task: the frozen backbone
    model.add_task("a")
    assert torch.equal(model(images, task="a"), expected)
    with torch.no_grad():
        assert torch.equal(model(images, task="a"), expected)  # cached path too


def test_training_changes_only_the_task(small_cnn, images):
    model = FTNModel(small_cnn, rank=4)
    model.add_task("a", head=nn.Linear(16, 3))
    model.add_task("b", head=nn.Linear(16, 3))
    frozen_before = tensor_hash(model.frozen_tensors().values())
    b_before = tensor_hash(p for _, p in model.named_task_parameters("b"))
    b_buffers = tensor_hash(t for n in model.task_norm_layers().values() for t in n.tasks["b"].buffers())
    a_buffers = tensor_hash(t for n in model.task_norm_layers().values() for t in n.tasks["a"].buffers())
    model.train()
    out = model(images, task="a")
    out.square().mean().backward()
    a_params = {id(p) for p in model.task_parameters("a")}
    for name, p in model.named_parameters():
        if id(p) in a_params:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"{name} received a gradient"
    train_steps(model, "a", images)
    assert tensor_hash(model.frozen_tensors().values()) == frozen_before
    assert tensor_hash(p for _, p in model.named_task_parameters("b")) == b_before
    assert tensor_hash(t for n in model.task_norm_layers().values() for t in n.tasks["b"].buffers()) == b_buffers
    # task a's BatchNorm statistics did move
    assert tensor_hash(t for n in model.task_norm_layers().values() for t in n.tasks["a"].buffers()) != a_buffers


def test_training_task_b_leaves_task_a_bit_identical(small_cnn, images):
    model = FTNModel(small_cnn, rank=3)
    model.add_task("a", head=nn.Linear(16, 2))
    train_steps(model, "a", images)
    with torch.no_grad():
        a_before = model(images, task="a")
    model.add_task("b", head=nn.Linear(16, 5))
    train_steps(model, "b", images)
    with torch.no_grad():
        assert torch.equal(model(images, task="a"), a_before)
        assert not torch.allclose(model(images, task="b")[:, :2], a_before)


def test_task_parameters_are_exactly_factors_norms_and_head(small_cnn):
    model = FTNModel(small_cnn, rank=2)
    head = nn.Linear(16, 3)
    model.add_task("a", head=head)
    model.add_task("b")
    params = model.task_parameters("a")
    ids = {id(p) for p in params}
    assert len(ids) == len(params)
    expected = {id(p) for layer in model.adapted_layers().values() for p in layer.tasks["a"].parameters()}
    expected |= {id(p) for n in model.task_norm_layers().values() for p in n.tasks["a"].parameters()}
    expected |= {id(p) for p in head.parameters()}
    assert ids == expected
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in model.frozen_tensors().values())


def test_merge_gives_plain_model_with_same_outputs(small_cnn, images):
    model = FTNModel(small_cnn, rank=3)
    model.add_task("a", head=nn.Linear(16, 4))
    train_steps(model, "a", images)
    merged = model.merge("a").eval()
    modules = list(merged.modules())
    assert not any(type(m).__module__.startswith("ftn") for m in modules)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images, task="a"), rtol=1e-4, atol=1e-5)
    # merging does not alter the multi-task model
    assert isinstance(model.backbone.stem, FTNLayer)


def test_merge_torchvision_models():
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        backbone, dim = build_backbone(name)
        randomize_norms(backbone)
        x = torch.randn(2, 3, 32, 32)
        model = FTNModel(backbone, rank=4).eval()
        model.add_task("t", head=nn.Linear(dim, 3))
        with torch.no_grad():
            for layer in model.adapted_layers().values():
                layer.tasks["t"].factors[0].normal_(0, 0.01)
            torch.testing.assert_close(model.merge("t").eval()(x), model(x, task="t"), rtol=1e-3, atol=1e-4)


def test_forward_tasks_and_context_manager(small_cnn, images):
    model = FTNModel(small_cnn, rank=2).eval()
    model.add_task("a", head=nn.Linear(16, 2))
    model.add_task("b", head=nn.Linear(16, 3))
    out = model.forward_tasks({"a": images, "b": images[:2]})
    assert out["a"].shape == (4, 2) and out["b"].shape == (2, 3)
    with model.using_task("b"):
        assert model.active_task == "b"
        torch.testing.assert_close(model(images[:2]), out["b"])
    assert model.active_task is None
    model.set_task("a")
    torch.testing.assert_close(model(images), out["a"])
    assert model.tasks == ["a", "b"]
    model.remove_task("a")
    assert model.tasks == ["b"] and model.active_task is None
    assert all("a" not in layer.tasks for layer in model.adapted_layers().values())


def test_clear_errors(small_cnn, images):
    model = FTNModel(small_cnn, rank=2)
    model.add_task("a", head=nn.Linear(16, 2))
    with pytest.raises(TaskError, match="unknown task 'zzz'; known tasks: 'a'"):
        model(images, task="zzz")
    with pytest.raises(TaskError, match="already exists"):
        model.add_task("a")
    with pytest.raises(TaskError, match="no task selected"):
        model(images)
    with pytest.raises(TaskError, match="without '.'"):
        model.add_task("a.b")
    with pytest.raises(TaskError):
        model.forward_tasks({"a": images, "nope": images})
    with pytest.raises(ShapeError, match=r"stem.*\(N, 3, H, W\)"):
        model(torch.randn(2, 5, 16, 16), task="a")
    with pytest.raises(ConfigError, match="unknown FTNModel option"):
        FTNModel(SmallCNN(), rank=2, rnak_pattern={})
    with pytest.raises(ConfigError, match="nothing to adapt"):
        FTNModel(SmallCNN(), include=["nothing*"])
    with pytest.raises(ConfigError):
        FTNModel(SmallCNN(), rank=0)


def test_include_exclude_and_rank_pattern(small_cnn):
    model = FTNModel(small_cnn, rank=3, exclude=["fc"], rank_pattern={"point*": 1, "grouped": 0})
    assert "fc" not in model.adapted_layers()
    model.add_task("a")
    layers = model.adapted_layers()
    assert layers["pointwise"].rank("a") == 1
    assert layers["grouped"].rank("a") == 0 and "a" not in layers["grouped"].tasks
    assert layers["stem"].rank("a") == 3
    model.add_task("b", rank=5, rank_pattern={"stem": 2})  # task-level pattern replaces the model's
    assert layers["stem"].rank("b") == 2 and layers["pointwise"].rank("b") == 5
    only = FTNModel(SmallCNN(), include=["stem", "fc"])
    assert sorted(only.adapted_layers()) == ["fc", "stem"]


def test_rank_cap_on_depthwise_is_reported(small_cnn):
    model = FTNModel(small_cnn, rank=8)
    model.add_task("a")
    depthwise = model.adapted_layers()["depthwise"]  # modes (8, 1, 9): dense 72, cap rank 3
    assert depthwise.rank("a") == 3
    report = model.parameter_report()
    caps = {c.layer: c for c in report.tasks["a"].caps}
    assert caps["depthwise"].requested == 8 and caps["depthwise"].applied == 3
    assert "rank cap [a] depthwise: requested 8, applied 3" in str(report)
    uncapped = FTNModel(SmallCNN(), rank=8, rank_cap=False)
    uncapped.add_task("a")
    assert uncapped.adapted_layers()["depthwise"].rank("a") == 8


def test_parameter_report_equals_counted_parameters(small_cnn):
    model = FTNModel(small_cnn, rank=3)
    model.add_task("a", head=nn.Linear(16, 4))
    model.add_task("b", rank=1)
    report = model.parameter_report()
    for task in ("a", "b"):
        counted = sum(p.numel() for p in model.task_parameters(task))
        assert report.tasks[task].total == counted
        formula = sum(cp_num_params(layer.modes, layer.rank(task)) for layer in model.adapted_layers().values())
        assert report.tasks[task].delta == formula
    assert report.tasks["a"].head == 16 * 4 + 4
    assert report.backbone == sum(p.numel() for p in SmallCNN().parameters())
    assert report.paper_total == report.backbone + report.tasks["a"].delta + report.tasks["b"].delta
    assert report.total_stored == sum(p.numel() for p in model.parameters())


def test_resnet34_rank40_six_tasks_matches_paper():
    backbone, _ = strip_classifier(torchvision.models.resnet34(weights=None))
    model = FTNModel(backbone, rank=40)
    assert len(model.adapted_layers()) == 36
    for t in range(6):
        model.add_task(f"d{t}")
    report = model.parameter_report()
    assert report.backbone == 21_284_672
    assert report.per_task_delta == 656_280
    assert report.paper_total == 25_222_352
    assert all(not t.caps for t in report.tasks.values())


def test_task_norms_isolated_and_base_frozen_in_train_mode(small_cnn, images):
    model = FTNModel(small_cnn, rank=2)
    norms = model.task_norm_layers()
    assert set(norms) == {"bn1", "bn2", "gn", "ln"}
    model.train()
    assert all(not n.base.training for n in norms.values())
    base_stats = tensor_hash(n.base.running_mean for n in norms.values() if hasattr(n.base, "running_mean"))
    model(images)  # no task: frozen backbone in eval semantics even in train mode
    assert tensor_hash(n.base.running_mean for n in norms.values() if hasattr(n.base, "running_mean")) == base_stats


def test_recalibrate_norms_recomputes_statistics(small_cnn):
    model = FTNModel(small_cnn, rank=2).eval()
    model.add_task("a")
    data = [(torch.randn(8, 3, 16, 16) * 3 + 1, 0) for _ in range(3)]
    used = model.recalibrate_norms("a", data)
    assert used == 3
    bn1 = model.task_norm_layers()["bn1"].tasks["a"]
    # The stem is frozen and ΔW = 0, so bn1 sees stem(x): check against the exact batch mean.
    with torch.no_grad():
        feats = torch.cat([small_cnn.stem(x) for x, _ in data])
    torch.testing.assert_close(bn1.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn1.momentum == 0.1 and not model.training  # settings and mode restored
    base = model.task_norm_layers()["bn1"].base
    assert not torch.allclose(base.running_mean, bn1.running_mean)
    with pytest.raises(Exception, match="no batches"):
        model.recalibrate_norms("a", [])
    torch.testing.assert_close(bn1.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_shared_module_gets_one_wrapper():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    backbone = nn.Sequential(conv, nn.ReLU(), conv)
    model = FTNModel(backbone, rank=2)
    assert model.backbone[0] is model.backbone[2]
    assert len(model.adapted_layers()) == 1


def test_multihead_attention_is_adapted_through_its_own_wrapper():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Linear(8, 8)

        def forward(self, x):
            return self.mlp(self.attn(x, x, x)[0])

    model = FTNModel(Block(), rank=2)
    # MHA reads in_proj_weight / out_proj.weight directly, so it gets a wrapper of its own
    # (ftn.core.attention.FTNMultiheadAttention) that exposes both projections as adapted layers.
    assert list(model.adapted_layers()) == ["attn.in_proj", "attn.out_proj", "mlp"]
    model.add_task("a")
    x = torch.randn(2, 5, 8)
    assert model(x, task="a").shape == (2, 5, 8)
