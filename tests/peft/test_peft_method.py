"""FTN as a PEFT method, used through PEFT's own API only (what a PEFT user's script does):
get_peft_model, a few optimizer steps, save_pretrained / from_pretrained, add / set / delete
adapter, merge_and_unload and print_trainable_parameters, on CNNs (every conv kind, MobileNetV2,
ResNet-18) and on the offline all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import ftn.peft  # noqa: E402  (registers the method)
from ftn import FTNModel  # noqa: E402
from helpers import SmallCNN, needs_minilm, randomize_norms  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils import PeftType  # noqa: E402

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def conv_linear_names(model: nn.Module, head: str) -> list[str]:
    """Every Conv/Linear layer but the head: what FTN adapts in a CNN."""
    return [n for n, m in model.named_modules() if isinstance(m, CONV_LINEAR) and n != head and not n.startswith(head + ".")]


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model, batches, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps on what PEFT marks trainable, towards a fixed random target."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    kwargs = batches
    target = torch.randn_like(_out(model, kwargs), generator=None)
    for _ in range(steps):
        opt.zero_grad()
        loss = (_out(model, kwargs) - target).pow(2).mean()
        loss.backward()
        opt.step()
    model.eval()


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out)


@torch.no_grad()
def outputs(model, inputs) -> torch.Tensor:
    model.eval()
    return _out(model, inputs)


def printed_counts(model, capsys) -> tuple[int, int]:
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    found = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", line)
    assert found, line
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def user_script(make_base, inputs, config_kwargs, tmp_path, capsys):
    """The PEFT user's script, step by step, with what each step must give."""
    torch.manual_seed(0)
    base = make_base()
    reference = copy.deepcopy(base).eval()
    want = outputs(reference, inputs)
    model = get_peft_model(base, ftn.peft.FTNPeftConfig(**config_kwargs))

    # 1. starts exactly at the base model (ΔW = 0, norm copies equal to the pretrained ones)
    start = outputs(model, inputs)
    assert torch.equal(start, want)

    # 2. training changes FTN's factors, the norm copies and modules_to_save only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ftn_factors.default." in n or ".ftn_norms.default." in n
                             or ".modules_to_save.default." in n for n in trainable), sorted(trainable)[:5]
    report = model.base_model.parameter_report()
    before = frozen_state(model.get_base_model())
    train(model, inputs)
    after = frozen_state(model.get_base_model())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".ftn_factors.default." in k or ".ftn_norms.default." in k or ".modules_to_save.default." in k
                           for k in changed), sorted(changed)[:5]
    assert any(".ftn_factors." in k for k in changed)
    trained = outputs(model, inputs)
    assert not torch.allclose(trained, want)

    # 3. print_trainable_parameters counts as ftn's report does
    assert printed_counts(model, capsys) == (report.tasks["default"].total, report.total_stored)

    # 4. save_pretrained / from_pretrained round-trip exactly, onto a fresh base model
    model.save_pretrained(tmp_path / "a")
    torch.manual_seed(1)  # a different random head where the base makes one: the adapter must restore it
    loaded = PeftModel.from_pretrained(make_base(), tmp_path / "a")
    assert loaded.peft_config["default"].peft_type == PeftType("FTN")
    assert torch.equal(outputs(loaded, inputs), trained)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default

    # 5. several tasks on one base: add, switch, delete
    model.add_adapter("b", ftn.peft.FTNPeftConfig(**config_kwargs))
    model.set_adapter("b")
    assert torch.equal(outputs(model, inputs), want)  # a new task starts at the base model
    train(model, inputs, steps=2)
    task_b = outputs(model, inputs)
    assert not torch.allclose(task_b, trained)
    model.set_adapter("default")
    assert torch.equal(outputs(model, inputs), trained)  # task a untouched by training task b
    model.load_adapter(tmp_path / "a", adapter_name="a_again")  # a saved task under another name
    model.set_adapter("a_again")
    assert torch.equal(outputs(model, inputs), trained)
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), want)
    model.set_adapter("b")
    model.delete_adapter("a_again")
    assert "a_again" not in model.peft_config
    assert torch.equal(outputs(model, inputs), task_b)

    # 6. merge_and_unload: a plain model (no ftn or PEFT module left) with the task's outputs
    model.set_adapter("default")
    merged = model.merge_and_unload()
    assert not any(type(m).__module__.startswith(("ftn", "peft")) for m in merged.modules())
    torch.testing.assert_close(outputs(merged, inputs), trained, rtol=1e-5, atol=1e-5)
    return report


def small_cnn() -> nn.Module:
    torch.manual_seed(0)  # the "pretrained" weights: the same every time the base is made
    return randomize_norms(SmallCNN()).eval()


def mobilenet_v2() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.mobilenet_v2(weights=None, num_classes=10)).eval()


def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


@pytest.mark.parametrize("make_base, head, size", [(small_cnn, "fc", 16), (mobilenet_v2, "classifier", 32),
                                                   (resnet18, "fc", 32)], ids=["every-conv-kind", "mobilenet_v2", "resnet18"])
def test_user_script_on_cnn(make_base, head, size, tmp_path, capsys, one_thread):
    targets = conv_linear_names(make_base(), head)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    user_script(make_base, images, dict(r=4, target_modules=targets, modules_to_save=[head]), tmp_path, capsys)


def test_report_equals_ftns_own(one_thread):
    """The same task (rank 8, every conv, task norms, the classifier as head) counted by ftn's
    FTNModel and by the PEFT method: equal ΔW, rank caps (MobileNetV2's depthwise convs), norms
    and head, hence equal trainable totals."""
    torch.manual_seed(0)
    peft_model = get_peft_model(mobilenet_v2(), ftn.peft.FTNPeftConfig(
        r=8, target_modules=conv_linear_names(mobilenet_v2(), "classifier"), modules_to_save=["classifier"]))
    theirs = peft_model.base_model.parameter_report().tasks["default"]
    backbone = mobilenet_v2()
    head = backbone.classifier
    backbone.classifier = nn.Identity()
    model = FTNModel(backbone, rank=8)
    model.add_task("default", head=head)
    ours = model.parameter_report().tasks["default"]
    assert ours.caps and [(c.requested, c.applied) for c in ours.caps] == [(c.requested, c.applied) for c in theirs.caps]
    assert (theirs.delta, theirs.norms, theirs.head, theirs.norm_buffers, theirs.layers) == \
        (ours.delta, ours.norms, ours.head, ours.norm_buffers, ours.layers)
    assert peft_model.get_nb_trainable_parameters()[0] == ours.total


def test_same_math_as_ftn(one_thread):
    """A PEFT adapter and an FTNModel task holding the same factor and norm values compute the
    same function (the PEFT layers run ftn's own wrappers)."""
    torch.manual_seed(0)
    peft_model = get_peft_model(small_cnn(), ftn.peft.FTNPeftConfig(r=3, target_modules=conv_linear_names(small_cnn(), "")))
    model = FTNModel(small_cnn(), rank=3).eval()
    model.add_task("t")
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        theirs = {n.replace(".ftn_factors.default.", ".").replace(".ftn_norms.default.", "."): t
                  for n, t in peft_model.get_base_model().state_dict().items() if ".default." in n}
        for name, t in model.named_task_parameters("t"):
            kind, layer, key = name.split(".", 1)[0], *name.split(".", 1)[1].rsplit(".", 1)
            if kind == "delta":
                t.copy_(theirs[f"{layer}.factors.{key}"])
            else:
                t.copy_(theirs[f"{layer}.{key}"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(peft_model, x), outputs(model.for_task("t"), x), rtol=0, atol=1e-6)


def test_user_script_on_minilm(tmp_path, capsys, one_thread):
    needs_minilm()
    import transformers

    from ftn.settings.text.backbone import minilm_path

    def make_base():
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the new classifier head is expected
        try:
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                str(minilm_path()), num_labels=3, local_files_only=True).eval()
        finally:
            transformers.logging.set_verbosity(verbosity)

    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 5000, (3, 12), generator=g),
              "attention_mask": torch.tensor([[1] * 12, [1] * 8 + [0] * 4, [1] * 5 + [0] * 7])}
    report = user_script(make_base, inputs, dict(r=8, target_modules=["query", "key", "value", "dense"],
                                                  task_type="SEQ_CLS"), tmp_path, capsys)
    # SEQ_CLS made PEFT train and save the classifier; every LayerNorm got a task copy (13 in MiniLM);
    # per layer q, k, v, attention output, intermediate and output, and the pooler's dense
    task = report.tasks["default"]
    assert (report.norm_layers, task.head, report.adapted_layers) == (13, 384 * 3 + 3, 6 * 6 + 1)
