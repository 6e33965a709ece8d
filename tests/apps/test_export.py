"""``ftn export`` and :func:`ftn.core.export.export_task`: the merged task as an ONNX file (run in
onnxruntime) and a ``torch.export`` program (``torch.export.load``), equal to the merged PyTorch
model on several batch sizes; one task per file; refused cases with a message."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ftn import ConfigError, FTNError, FTNModel, TaskError
from ftn.apps.cli import main
from ftn.apps.export import FORMAT_NAMES
from ftn.core.export import FORMATS, MergedTask, export_task

from helpers import SmallCNN, randomize_norms, train_steps
from helpers.serving import SERVER_ARGS, make_adapters, tiny_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
BATCHES = (1, 3, 8)


def run_onnx(path, *inputs, names=("input",)):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])


def run_program(path, *inputs):
    with torch.no_grad():
        return torch.export.load(str(path)).module()(*inputs)


def two_task_model(backbone: nn.Module, dim: int) -> FTNModel:
    """Two trained-looking tasks (factors, norms and heads all moved) on one backbone."""
    model = FTNModel(backbone, rank=3).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for i, name in enumerate(("a", "b")):
        model.add_task(name, head=nn.Linear(dim, 5 + i))
        train_steps(model, name, images, steps=2)
    return model


def small_cnn():
    torch.manual_seed(0)
    return randomize_norms(SmallCNN()).eval(), 16


def timm_efficientnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=0).eval(), 256


@pytest.mark.parametrize("make", [small_cnn, timm_efficientnet], ids=["small_cnn", "timm"])
@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_exported_file_equals_the_merged_model_on_any_batch(tmp_path, make, fmt):
    model = two_task_model(*make())
    path = export_task(model, "b", [torch.randn(2, 3, 32, 32)], tmp_path / f"b{FORMATS[fmt]}", fmt,
                       metadata={"ftn.task": "b"})
    merged = model.merge("b").eval()
    g = torch.Generator().manual_seed(5)
    for n in BATCHES:
        x = torch.randn(n, 3, 32, 32, generator=g)
        got = run_onnx(path, x) if fmt == "onnx" else run_program(path, x)
        with torch.no_grad():
            want, other = merged(x), model(x, task="a")
            assert torch.allclose(want, model(x, task="b"), atol=1e-5)  # merged = the FTN model's task b
        assert got.shape == (n, 6) and other.shape == (n, 5)  # task b's head, not a's
        assert (got - want).abs().max().item() < 1e-4
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(path))
        assert {p.key: p.value for p in proto.metadata_props}["ftn.task"] == "b"
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_cli_exports_one_task_per_file_and_checks_it(tmp_path, capsys):
    folder = tmp_path / "adapters"
    folder.mkdir()
    make_adapters(folder, ["cats", "dogs"])
    base = ["export", *SERVER_ARGS[:-2], "--adapter", str(folder)]  # tiny_convnet, --no-pretrained, --seed 0
    assert main([*base, "--format", "onnx"]) == 2
    assert "2 tasks (cats, dogs); an exported file holds one: choose it with --task" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx")) and not list(folder.glob("*.onnx"))
    assert main([*base, "--format", "onnx", "--task", "mice"]) == 2
    assert "no task 'mice'" in capsys.readouterr().err

    model = tiny_model()
    for p in sorted(folder.glob("*.safetensors")):
        model.load_task(p)
    model.eval()
    assert main([*base, "--format", "torch-export", "--task", "dogs", "-o", str(tmp_path / "dogs.bin")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    out = tmp_path / "out"  # made by the first export ("out/" names a folder), reused by the second
    for fmt in FORMAT_NAMES:
        assert main([*base, "--format", fmt, "--task", "dogs", "-o", f"{out}/"]) == 0
        printed = capsys.readouterr().out
        path = out / f"dogs{FORMATS[fmt]}"
        assert f"wrote {path}" in printed and "checked on a batch of 3: max |file - merged model|" in printed
        merged = MergedTask(model.merge("dogs")).eval()
        for n in BATCHES:
            x = torch.randn(n, 3, 16, 16)
            got = run_onnx(path, x) if fmt == "onnx" else run_program(path, x)
            with torch.no_grad():
                assert (got - merged(x)).abs().max().item() < 1e-4
    import onnx

    info = json.loads({p.key: p.value for p in onnx.load(str(out / "dogs.onnx")).metadata_props}["ftn.info"])
    assert info["labels"][0] == "dogs-class0" and info["input"]["size"] == 16


class Branchy(nn.Module):
    """A forward that depends on tensor values: no exported graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y if y.sum() > 0 else -y


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).reshape(2, -1)[:, :4]


class QR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return torch.linalg.qr(self.fc(x.mean((2, 3)).repeat(1, 4)).reshape(-1, 2, 2)).R.reshape(x.shape[0], 4)


@pytest.mark.parametrize("backbone,fmt,why", [
    (Branchy, "onnx", "data-dependent control flow"),
    (Branchy, "torch-export", "data-dependent control flow"),
    (FixedBatch, "torch-export", "fixes the batch size"),
    (QR, "onnx", "operator aten.linalg_qr has no ONNX translation"),
])
def test_models_that_cannot_be_exported_are_refused_with_the_reason(tmp_path, backbone, fmt, why):
    torch.manual_seed(0)
    model = FTNModel(backbone(), rank=1).eval()
    model.add_task("t", head=nn.Identity())
    target = tmp_path / "t.out"
    with pytest.raises(FTNError, match=f"cannot export task 't' as {fmt}: .*{why}"):
        export_task(model, "t", [torch.randn(2, 3, 8, 8)], target, fmt)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_bad_requests_are_refused(tmp_path, monkeypatch):
    model = tiny_model()
    model.add_task("t", head=nn.Linear(64, 2))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="at least 2 examples"):
        export_task(model, "t", [x[:1]], tmp_path / "t.pt2", "torch-export")  # batch 1 would be fixed
    with pytest.raises(ConfigError, match="format must be one of"):
        export_task(model, "t", [x], tmp_path / "t.tflite", "tflite")
    with pytest.raises(TaskError):
        export_task(model, "nope", [x], tmp_path / "t.pt2", "torch-export")
    import ftn.core.export as export

    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(FTNError, match=r"needs onnxscript: pip install 'factorized-tensor-networks\[export\]'"):
        export_task(model, "t", [x], tmp_path / "t.onnx", "onnx")
    assert not list(tmp_path.iterdir())
    assert set(FORMAT_NAMES) == set(FORMATS)


@pytest.mark.slow
def test_text_task_exports_with_dynamic_batch_and_length(tmp_path, capsys):
    from helpers import needs_minilm

    needs_minilm()
    from ftn.settings.text.backbone import MeanPooler, load_minilm

    torch.manual_seed(0)
    model = FTNModel(MeanPooler(load_minilm()), rank=2).eval()  # as the text setting builds it
    model.add_task("t", head=nn.Linear(384, 3))
    with torch.no_grad():
        for _, p in model.named_task_parameters("t"):
            p.add_(torch.randn_like(p) * 0.02)
    adapter = model.save_task("t", tmp_path / "t.safetensors")
    # The text setting's backbone by its config name: ftn builds the packaged MiniLM as hf:<folder>.
    assert main(["export", "--backbone", "all-MiniLM-L6-v2", "--adapter", str(adapter), "--format", "torch-export",
                 "-o", str(tmp_path / "t.pt2")]) == 0
    assert "inputs input_ids, attention_mask" in capsys.readouterr().out
    merged = MergedTask(model.merge("t")).eval()
    for n, length in ((1, 5), (3, 16), (8, 9)):
        ids, mask = torch.randint(0, 30000, (n, length)), torch.ones(n, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        with torch.no_grad():
            assert (run_program(tmp_path / "t.pt2", ids, mask) - merged(ids, mask)).abs().max().item() < 1e-4
