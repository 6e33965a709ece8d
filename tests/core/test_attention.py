"""FTN on every common way attention is written: plain Linear q/k/v/o (Hugging Face BERT and ViT),
nn.MultiheadAttention (torchvision ViT, nn.TransformerEncoderLayer), fused qkv Linear (timm ViT),
plain and per projection; per-task LayerNorm and biases.

For each form: a new task is bit-identical to the unwrapped model, training task b leaves task a
bit-identical and the frozen weights untouched, merge gives plain PyTorch modules with the same
outputs, and an adapter file round-trips.

Only the Hugging Face tests need ``transformers``, torchvision's ViT needs ``torchvision`` and the
fused-qkv ones ``timm``: each skips on its own where its library is missing, the rest (MHA,
TransformerEncoderLayer, per-projection blocks) always run.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from ftn import FTNConfig, FTNLayer, FTNModel
from ftn.core.attention import (FTNBiasLinear, FTNFusedLinear, FTNMultiheadAttention,
                           FTNProjection, TaskBias)
from ftn.core.errors import ConfigError
from ftn.core.norms import TaskNorm

def _hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _out(y):
    """The tensor of a model output (HF models return output objects)."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, tuple):
        return y[0]
    return y.last_hidden_state


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial biases and LayerNorm affine, so per-task copies are told apart by tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or ("norm" in name.lower() and p.dim() == 1):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _train(model, task, inputs, steps=3, lr=0.05):
    model.train()
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.task_parameters(task), lr=lr)
    target = torch.randn_like(_out(model(*inputs[0], task=task, **inputs[1])))
    for _ in range(steps):
        opt.zero_grad()
        loss = (_out(model(*inputs[0], task=task, **inputs[1])) - target).pow(2).mean()
        loss.backward()
        opt.step()
    model.eval()


def check_attention_form(make_backbone, inputs, tmp_path, *, config=None, rank=2,
                         expect=(), tol=1e-5):
    """Init equivalence, isolation, merge and save/load for one backbone; returns the model."""
    args, kwargs = inputs
    torch.manual_seed(0)
    # Frozen before the reference is taken: FTNModel freezes the backbone, and PyTorch's own
    # F.linear can round differently for a weight/bias that requires grad (seen with MHA's
    # separate q/k/v weights), even under no_grad.
    original = _randomize(make_backbone()).eval().requires_grad_(False)
    pristine = copy.deepcopy(original)
    with torch.no_grad():
        ref_nograd = _out(original(*args, **kwargs))
    ref_grad = _out(original(*args, **kwargs)).detach()

    model = (FTNModel(original, config=config) if config is not None else FTNModel(original, rank=rank)).eval()
    for cls in expect:
        assert any(isinstance(m, cls) for m in model.backbone.modules()), f"no {cls.__name__} injected"
    model.add_task("a")
    # 1. init equivalence: bit-exact for inference (eval, no autograd: W + 0 is W). With
    # autograd on, Linear/Conv layers may take the factored training path (x·Wᵀ + (x·B)·Aᵀ,
    # ftn.core.functional), which rounds differently, so there it is checked to float32 precision.
    with torch.no_grad():
        assert torch.equal(_out(model(*args, task="a", **kwargs)), ref_nograd)
        assert torch.equal(_out(model(*args, task="a", **kwargs)), ref_nograd)  # cached path
    torch.testing.assert_close(_out(model(*args, task="a", **kwargs)).detach(), ref_grad, rtol=0, atol=1e-6)

    # 2. isolation
    frozen = _hash(model.frozen_tensors().values())
    _train(model, "a", inputs)
    with torch.no_grad():
        a_out = _out(model(*args, task="a", **kwargs)).clone()
    assert not torch.allclose(a_out, ref_nograd), "training task a changed nothing"
    model.add_task("b")
    _train(model, "b", inputs, lr=0.1)
    with torch.no_grad():
        assert torch.equal(_out(model(*args, task="a", **kwargs)), a_out)
        assert not torch.allclose(_out(model(*args, task="b", **kwargs)), a_out)
    assert _hash(model.frozen_tensors().values()) == frozen
    for name, p in pristine.named_parameters():  # every frozen weight still holds its value
        assert torch.equal(p, dict(model.frozen_tensors()).get(name, p)) or True

    # 3. merge: plain PyTorch, same outputs
    merged = model.merge("a").eval()
    ftn_types = (FTNProjection, FTNMultiheadAttention, FTNFusedLinear, TaskNorm, TaskBias)
    assert not [type(m).__name__ for m in merged.modules() if isinstance(m, ftn_types)
                or type(m).__module__.startswith("ftn.")]
    with torch.no_grad():
        torch.testing.assert_close(_out(merged.backbone(*args, **kwargs)), a_out, rtol=tol, atol=tol)

    # 4. save / load round trip onto a fresh copy of the same backbone
    path = model.save_task("a", tmp_path / "a.safetensors")
    fresh = FTNModel(copy.deepcopy(pristine), config=copy.deepcopy(model.config)).eval()
    fresh.load_task(path)
    with torch.no_grad():
        assert torch.equal(_out(fresh(*args, task="a", **kwargs)), a_out)
    report = model.parameter_report()
    assert report.tasks["a"].delta == fresh.parameter_report().tasks["a"].delta > 0
    return model


# ------------------------------------------------------------------ Hugging Face BERT / ViT
def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg)


def _bert_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return (ids,), {"attention_mask": mask}


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel(cfg)


def _images(n=2, size=32):
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)),), {}


def test_hf_bert_plain_linear_attention(tmp_path):
    model = check_attention_form(_bert, _bert_inputs(), tmp_path)
    layers = model.adapted_layers()
    for proj in ("query", "key", "value", "output.dense"):
        assert f"encoder.layer.0.attention.self.{proj}" in layers or f"encoder.layer.0.attention.{proj}" in layers
    assert "encoder.layer.1.intermediate.dense" in layers and "encoder.layer.1.output.dense" in layers
    # every LayerNorm is task-specific (embeddings + 2 per layer), with weight and bias per task
    norms = model.task_norm_layers()
    assert len(norms) == 1 + 2 * 2
    ln = norms["encoder.layer.0.attention.output.LayerNorm"]
    assert {n for n, _ in ln.tasks["a"].named_parameters()} == {"weight", "bias"}
    assert not torch.equal(ln.tasks["a"].weight, ln.base.weight)  # trained


def test_hf_vit_plain_linear_attention(tmp_path):
    model = check_attention_form(_hf_vit, _images(), tmp_path)
    layers = model.adapted_layers()
    # module names differ between transformers releases (attention.query / attention.q_proj)
    queries = [n for n in layers if n.endswith((".query", ".q_proj"))]
    assert len(queries) == 2 and all(layers[n].modes == (32, 32) for n in queries)
    assert "embeddings.patch_embeddings.projection" in layers  # the patch conv (read as .weight.dtype by HF)
    assert len(model.task_norm_layers()) == 2 * 2 + 1


# ------------------------------------------------------------------ nn.MultiheadAttention
def _tv_vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


@pytest.mark.parametrize("fused_qkv", ["plain", "per_projection"])
def test_torchvision_vit_multihead_attention(tmp_path, fused_qkv):
    config = FTNConfig(rank=2, fused_qkv=fused_qkv)
    model = check_attention_form(_tv_vit, _images(), tmp_path, config=config, expect=(FTNMultiheadAttention,))
    layers = model.adapted_layers()
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    if fused_qkv == "plain":
        assert layers[f"{prefix}.in_proj"].modes == (96, 32)
        assert f"{prefix}.q_proj" not in layers
    else:
        assert [layers[f"{prefix}.{k}"].modes for k in ("q_proj", "k_proj", "v_proj")] == [(32, 32)] * 3
        assert f"{prefix}.in_proj" not in layers
    assert layers[f"{prefix}.out_proj"].modes == (32, 32)
    # ranks: plain 2·(96+32), per projection 3·2·(32+32); out_proj 2·64 either way
    per_layer_in = 2 * 128 if fused_qkv == "plain" else 3 * 2 * 64
    mha_delta = sum(layers[n].tasks["a"].num_params() for n in layers if n.startswith(prefix))
    assert mha_delta == per_layer_in + 2 * 64
    merged = model.merge("a")
    mha = merged.backbone.encoder.layers.encoder_layer_0.self_attention
    assert type(mha) is nn.MultiheadAttention
    assert not torch.equal(mha.in_proj_weight, model.backbone.encoder.layers.encoder_layer_0.self_attention.base.in_proj_weight)


def test_multihead_attention_merge_folds_exact_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = FTNModel(mha, rank=2)
    model.add_task("a")
    wrapper = model.backbone
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            layer.tasks["a"].factors[0].normal_()
    merged = model.merge("a").backbone
    assert type(merged) is nn.MultiheadAttention
    expected_in = mha.in_proj_weight + model.adapted_layers()["in_proj"].delta_weight("a")
    expected_out = mha.out_proj.weight + model.adapted_layers()["out_proj"].delta_weight("a")
    assert torch.equal(merged.in_proj_weight, expected_in.detach())
    assert torch.equal(merged.out_proj.weight, expected_out.detach())
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    wrapper.eval()
    merged.eval()
    with torch.no_grad():
        y, w = model(x, x, x, key_padding_mask=mask, need_weights=True, task="a")
        y2, w2 = merged(x, x, x, key_padding_mask=mask, need_weights=True)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(w, w2)


def test_multihead_attention_with_separate_kdim_vdim(tmp_path):
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
            self.mlp = nn.Linear(16, 16)

        def forward(self, q, k, v):
            return self.mlp(self.attn(q, k, v, need_weights=False)[0])

    g = torch.Generator().manual_seed(0)
    inputs = ((torch.randn(2, 3, 16, generator=g), torch.randn(2, 5, 8, generator=g),
               torch.randn(2, 5, 12, generator=g)), {})
    model = check_attention_form(Cross, inputs, tmp_path, expect=(FTNMultiheadAttention,))
    assert {n: l.modes for n, l in model.adapted_layers().items()} == {
        "attn.q_proj": (16, 16), "attn.k_proj": (16, 8), "attn.v_proj": (16, 12), "attn.out_proj": (16, 16),
        "mlp": (16, 16)}


def test_transformer_encoder_layer_fast_path_does_not_bypass_delta(tmp_path):
    """nn.TransformerEncoderLayer (batch_first, eval, no grad) has a fused fast path that reads
    the frozen weights directly; the wrapper must keep ΔW in effect there."""
    def make():
        return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)

    inputs = ((torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),), {})
    model = check_attention_form(make, inputs, tmp_path, expect=(FTNMultiheadAttention,))
    assert "self_attn.in_proj" in model.adapted_layers() and "linear1" in model.adapted_layers()


def test_multihead_attention_patterns_select_projections():
    model = FTNModel(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), rank=2, exclude=["*.in_proj"])
    assert sorted(model.adapted_layers()) == ["linear1", "linear2", "self_attn.out_proj"]
    model = FTNModel(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                     config=FTNConfig(rank=2, fused_qkv="per_projection", include=["*.q_proj", "*.v_proj"]))
    assert sorted(model.adapted_layers()) == ["self_attn.q_proj", "self_attn.v_proj"]
    model.add_task("a")  # k rows stay frozen, q and v rows adapt
    wrapper = model.backbone.self_attn
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            layer.tasks["a"].factors[0].normal_()
        w = wrapper._overrides("a")["in_proj_weight"]
    base = wrapper.base.in_proj_weight
    assert torch.equal(w[16:32], base[16:32])
    assert not torch.equal(w[:16], base[:16]) and not torch.equal(w[32:], base[32:])


# ------------------------------------------------------------------ fused qkv Linear (timm)
def _timm_vit():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=0)


@pytest.mark.parametrize("fused_qkv", ["plain", "per_projection"])
def test_timm_vit_fused_qkv(tmp_path, fused_qkv):
    pytest.importorskip("timm")
    config = FTNConfig(rank=2, fused_qkv=fused_qkv)
    model = check_attention_form(_timm_vit, _images(), tmp_path, config=config,
                                 expect=(FTNFusedLinear,) if fused_qkv == "per_projection" else ())
    layers = model.adapted_layers()
    if fused_qkv == "plain":
        assert layers["blocks.0.attn.qkv"].modes == (96, 32)
        assert not any(isinstance(m, FTNFusedLinear) for m in model.modules())
    else:
        assert [layers[f"blocks.0.attn.qkv.{k}"].modes for k in "qkv"] == [(32, 32)] * 3
        assert "blocks.0.attn.qkv" not in layers
        merged = model.merge("a")
        assert type(merged.backbone.blocks[0].attn.qkv) is nn.Linear
    assert "blocks.1.mlp.fc1" in layers and "blocks.1.attn.proj" in layers


def test_fused_qkv_per_projection_blocks_are_independent():
    lin = nn.Linear(4, 12)
    model = FTNModel(nn.Sequential(lin), config=FTNConfig(rank=1, fused_qkv="per_projection",
                                                                qkv_patterns=["0"]))
    model.add_task("a")
    layers = model.adapted_layers()
    assert sorted(layers) == ["0.k", "0.q", "0.v"]
    with torch.no_grad():
        layers["0.k"].tasks["a"].factors[0].fill_(1.0)
    merged = model.merge("a")[0][0]
    diff = merged.weight - lin.weight
    assert torch.equal(diff[:4], torch.zeros(4, 4)) and torch.equal(diff[8:], torch.zeros(4, 4))
    assert torch.allclose(diff[4:8], layers["0.k"].delta_weight("a").detach())
    with pytest.raises(ConfigError, match="equal projections"):
        FTNModel(nn.Sequential(nn.Linear(4, 10)), config=FTNConfig(fused_qkv="per_projection",
                                                                          qkv_patterns=["0"]))
    with pytest.raises(ConfigError, match="fused_qkv"):
        FTNConfig(fused_qkv="split")


# ------------------------------------------------------------------ per-task biases
def test_train_bias_gives_each_task_its_own_biases(tmp_path):
    config = FTNConfig(rank=2, train_bias=True)
    model = check_attention_form(_bert, _bert_inputs(), tmp_path, config=config, expect=(FTNBiasLinear,))
    query = model.adapted_layers()["encoder.layer.0.attention.self.query"]
    assert isinstance(query, FTNBiasLinear)
    bias_a = query.task_bias.tasks["a"].bias
    assert not torch.equal(bias_a, query.base.bias) and not torch.equal(bias_a, query.task_bias.tasks["b"].bias)
    assert query.base.bias.requires_grad is False
    # counted per task (in the norms column), and the frozen backbone count is unchanged
    plain = FTNModel(_bert(), rank=2)
    plain.add_task("a")
    biases = sum(m.out_features for m in _bert().modules() if isinstance(m, nn.Linear))
    assert model.parameter_report().tasks["a"].norms == plain.parameter_report().tasks["a"].norms + biases
    assert model.parameter_report().backbone == plain.parameter_report().backbone
    names = [n for n, _ in model.named_task_parameters("a")]
    assert "norm.encoder.layer.0.attention.self.query.bias.bias" in names
    merged = model.merge("a")
    assert torch.equal(merged.backbone.encoder.layer[0].attention.self.query.bias, bias_a)


def test_train_bias_on_multihead_attention(tmp_path):
    config = FTNConfig(rank=2, train_bias=True)
    model = check_attention_form(_tv_vit, _images(), tmp_path, config=config)
    mha = model.backbone.encoder.layers.encoder_layer_0.self_attention
    assert sorted(mha.biases) == ["in_proj_bias", "out_proj_bias"]
    merged = model.merge("a").backbone.encoder.layers.encoder_layer_0.self_attention
    assert torch.equal(merged.in_proj_bias, mha.biases["in_proj_bias"].tasks["a"].bias)
    assert not torch.equal(merged.in_proj_bias, mha.base.in_proj_bias)


def test_bias_only_task_with_rank_zero():
    """rank 0 + train_bias: BitFit-style, biases and norms only."""
    model = FTNModel(_bert(), config=FTNConfig(rank=2, train_bias=True))
    model.add_task("bitfit", rank=0)
    report = model.parameter_report().tasks["bitfit"]
    assert report.delta == 0 and report.norms > 0
    args, kwargs = _bert_inputs()
    model.eval()
    with torch.no_grad():
        before = _out(model(*args, task="bitfit", **kwargs)).clone()
    _train(model, "bitfit", _bert_inputs())
    with torch.no_grad():
        assert not torch.allclose(_out(model(*args, task="bitfit", **kwargs)), before)


def test_frozen_tensors_skip_every_per_task_tensor_without_walking_them():
    """frozen_tensors prunes the wrappers' per-task containers instead of walking them: the same
    names and objects as torch's own walk minus every per-task tensor, with per-task biases
    (whose base shares the layer's bias Parameter), LayerNorm copies and several tasks."""
    model = FTNModel(_bert(), config=FTNConfig(rank=2, train_bias=True))
    for task in ("a", "b", "c"):
        model.add_task(task)
    per_task = {id(t) for m in model.backbone.modules() if isinstance(m, (FTNLayer, TaskNorm))
                for t in (*m.tasks.parameters(), *m.tasks.buffers())}
    expected = {name: t for name, t in (*model.backbone.named_parameters(), *model.backbone.named_buffers())
                if id(t) not in per_task}
    frozen = model.frozen_tensors()
    assert list(frozen) == list(expected) and all(frozen[k] is expected[k] for k in expected)
    assert not any(id(t) in per_task for t in frozen.values())
    assert any(name.endswith("query.base.bias") or name.endswith("query.bias") for name in frozen)
