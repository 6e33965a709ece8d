"""Backbones by name (``torchvision:``, ``timm:``, ``hf:``): feature sizes found without tables,
local weights files and folders, the offline error, and ``ftn train`` / ``ftn predict`` / the
serving stack on timm and Hugging Face backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from ftn import ConfigError, FTNError
from ftn.apps.cli import main
from ftn.core.adapters import read_adapter
from ftn.training.backbones import build_backbone, parse_backbone

from helpers import REPO, needs_minilm
from helpers.serving import png_bytes

timm = pytest.importorskip("timm")


def test_names_choose_the_library():
    assert parse_backbone("resnet18") == ("torchvision", "resnet18")
    assert parse_backbone("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_backbone("timm:convnext_tiny.fb_in1k") == ("timm", "convnext_tiny.fb_in1k")
    assert parse_backbone("hf:/models/My:Model") == ("hf", "/models/My:Model")  # only the first ':' splits
    with pytest.raises(ConfigError, match="unknown backbone source 'tf'"):
        parse_backbone("tf:resnet")
    with pytest.raises(ConfigError, match="names no model"):
        parse_backbone("timm:")
    with pytest.raises(ConfigError, match="timm has no model 'resnet17'.*resnet18"):
        build_backbone("timm:resnet17")
    assert build_backbone("torchvision:resnet18")[1] == build_backbone("resnet18")[1] == 512


@pytest.mark.parametrize("name", ["timm:mobilenetv3_small_100", "timm:test_vit", "timm:test_efficientnet"])
def test_timm_feature_size_is_what_the_model_gives(name):
    torch.manual_seed(0)
    module, dim = build_backbone(name)
    size = module.pretrained_cfg["input_size"][1:]
    with torch.no_grad():
        out = module.eval()(torch.randn(2, 3, *size))
    assert out.shape == (2, dim)
    if name == "timm:mobilenetv3_small_100":
        # A table of num_features would be wrong here: the pooled features pass a 1×1 conv first.
        assert dim == 1024 and module.num_features == 576


def hf_config_folder(path, kind="vit"):
    transformers = pytest.importorskip("transformers")
    config = (transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8) if kind == "vit" else
              transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1], layer_type="basic"))
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,dim", [("vit", 32), ("resnet", 24)])
def test_hf_image_model_from_a_config_folder(tmp_path, kind, dim):
    folder = hf_config_folder(tmp_path / kind, kind)
    torch.manual_seed(0)
    module, found = build_backbone(f"hf:{folder}")
    assert found == dim
    with torch.no_grad():
        assert module(torch.randn(3, 3, 32, 32)).shape == (3, dim)
    with pytest.raises(FTNError, match="cannot load the Hugging Face model in .*config.json"):
        build_backbone(f"hf:{folder}", pretrained=True)  # a config alone has no weights to load


def test_weights_file_or_folder_replace_the_library_weights(tmp_path):
    torch.manual_seed(1)
    trained = timm.create_model("test_efficientnet", num_classes=7)  # as saved after training, classifier included
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "folder").mkdir()
    torch.save(trained.state_dict(), tmp_path / "folder" / "pytorch_model.bin")
    for source in (tmp_path / "w.safetensors", tmp_path / "folder"):
        torch.manual_seed(2)
        module, _ = build_backbone("timm:test_efficientnet", weights_path=source)
        own = module.state_dict()
        assert own and all(torch.equal(own[k], trained.state_dict()[k]) for k in own)
        assert "classifier.weight" not in own
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pt")
    with pytest.raises(FTNError, match="do not fit timm:test_efficientnet"):
        build_backbone("timm:test_efficientnet", weights_path=tmp_path / "other.pt")
    with pytest.raises(FTNError, match="holds none of model.safetensors"):
        build_backbone("timm:test_efficientnet", weights_path=tmp_path / "folder" / ".." / "folder" / "..")
    with pytest.raises(FTNError, match="weights not found"):
        build_backbone("tiny_convnet", weights_path=tmp_path / "missing.pt")


OFFLINE = textwrap.dedent("""
    import json, sys
    from ftn import FTNError
    from ftn.apps.cli import main
    from ftn.training.backbones import build_backbone
    errors = {}
    for name, pretrained in (("timm:resnet18", True), ("hf:sentence-transformers/all-MiniLM-L6-v2", True),
                             ("hf:google/vit-base-patch16-224", False)):
        try:
            build_backbone(name, pretrained=pretrained)
            errors[name] = None
        except FTNError as exc:
            errors[name] = str(exc)
    errors["cli"] = main(["params", "--backbone", "hf:google/vit-base-patch16-224"])
    print(json.dumps(errors))
""")


@pytest.mark.slow
def test_offline_without_a_cache_says_what_to_download_and_where(tmp_path):
    pytest.importorskip("transformers")
    cache = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TORCH_HOME"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cache), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", OFFLINE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert "hf download timm/resnet18.a1_in1k" in errors["timm:resnet18"]
    assert str(cache / "hub") in errors["timm:resnet18"] and "model.weights_path" in errors["timm:resnet18"]
    for name in ("hf:sentence-transformers/all-MiniLM-L6-v2", "hf:google/vit-base-patch16-224"):
        assert f"hf download {name[3:]}" in errors[name] and str(cache / "hub") in errors[name]
    assert errors["cli"] == 2  # the command line prints it as an ftn error, no traceback
    assert "Traceback" not in done.stderr and "hf download google/vit-base-patch16-224" in done.stderr
    assert not any(cache.rglob("*.safetensors"))  # nothing was fetched


def write_config(path, backbone, out, **model):
    lines = [f"  {k}: {v}" for k, v in model.items()]
    path.write_text("\n".join([
        "setting: classification", "name: by_name", f"output_dir: {out}",
        "data:", "  kind: embedded", "  domains: [mnist]", "  image_size: 32", "  train_limit: 16",
        "  val_limit: 8", "  test_limit: 8", "  batch_size: 8",
        "model:", f"  backbone: {backbone}", "  pretrained: false", *lines,
        "method:", "  name: ftn", "  ftn:", "    rank: 2",
        "train:", "  max_steps: 2", "  device: cpu", "  warmup_steps: 0", "  recalibrate_batches: 1", ""]))
    return path


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_train_and_predict_on_a_backbone_by_name(tmp_path, capsys, kind):
    backbone = "timm:test_efficientnet" if kind == "timm" else f"hf:{hf_config_folder(tmp_path / 'vit')}"
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", backbone, out)
    assert main(["train", "--no-progress", "--config", str(config)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["backbone"] == backbone and summary["tasks"]["mnist"]["steps"] == 2
    adapter = out / "adapters" / "mnist.safetensors"
    _, meta = read_adapter(adapter)
    assert meta["layers"]  # layers were adapted
    capsys.readouterr()
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png_bytes(i, size=40))
    # --no-pretrained --seed 0: the same random backbone as train's (seed 0); the fingerprint check
    # in load_task would refuse any other.
    assert main(["predict", "--backbone", backbone, "--no-pretrained", "--seed", "0", "--adapter", str(adapter),
                 "--json", "-k", "2", *map(str, images)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, images))
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["prob"] >= r["top_k"][1]["prob"] for r in results)


@pytest.mark.slow
def test_minilm_by_hf_path_trains_and_the_server_loads_it(tmp_path):
    needs_minilm()
    from ftn.apps.serving.predict import build_model
    from ftn.apps.serving.registry import TaskService
    from ftn.settings.text.backbone import minilm_path

    backbone = f"hf:{minilm_path()}"
    out = tmp_path / "text"
    assert main(["train", "--no-progress", "--config", str(REPO / "configs" / "text_minilm.yaml"),
                 f"model.backbone={backbone}", "data.tasks=[sentiment]", "data.train_limit=8", "data.test_limit=8",
                 "data.max_len=16", "train.max_steps=2", "train.device=cpu", f"output_dir={out}"]) == 0
    adapter = out / "adapters" / "sentiment.safetensors"
    # The same weights as the text setting's own MiniLM: the adapter fits either name.
    from ftn import FTNModel
    from ftn.settings.text.backbone import MeanPooler, load_minilm

    assert FTNModel(MeanPooler(load_minilm()), rank=1).load_task(adapter) == "sentiment"
    model = build_model("all-MiniLM-L6-v2", [adapter])  # the text setting's name: the packaged model, by hf:
    service = TaskService(model, out / "adapters")
    service.load_folder()
    assert list(service.catalog) == ["sentiment"]
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        assert model(ids, mask, task="sentiment").shape == (2, 2)


def test_a_text_encoder_in_the_image_setting_is_refused(tmp_path, capsys):
    needs_minilm()
    config = write_config(tmp_path / "c.yaml", "all-MiniLM-L6-v2", tmp_path / "run")
    assert main(["train", "--no-progress", "--config", str(config)]) == 2
    assert "all-MiniLM-L6-v2 is a text encoder; the classification setting needs an image model" in capsys.readouterr().err
