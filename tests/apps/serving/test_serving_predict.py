"""Labels and input preparation in adapter files, the shared preprocessing, and `ftn predict`."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from PIL import Image
from torch import nn

from ftn import AdapterFileError, ConfigError, DataError, FTNModel
from ftn.core.adapters import read_adapter
from ftn.apps.cli import main
from ftn.apps.serving.predict import InputSpec, decode_image, preprocess, top_k

from helpers import REPO, SmallCNN, randomize_norms
from helpers.serving import SERVER_ARGS, make_adapters, png_bytes, tiny_model


def small_model():
    torch.manual_seed(0)
    return FTNModel(randomize_norms(SmallCNN()), rank=2).eval()


def rewrite_metadata(path, **changes):
    """Rewrite a safetensors header's metadata in place (to fake old or tampered files)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for key, value in changes.items():
        if value is None:
            header["__metadata__"].pop(key, None)
        else:
            header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_labels_and_input_round_trip_and_survive_resave(tmp_path):
    model = small_model()
    model.add_task("a", head=nn.Linear(16, 3))
    info = {"labels": ["cat", "dog", "eel"], "input": {"size": 32, "channels": 1}, "outputs": {"kind": "classification"}}
    model.save_task("a", tmp_path / "a.safetensors", info=info)
    other = small_model()
    other.load_task(tmp_path / "a.safetensors")
    got = other.task_info("a")
    assert got["labels"] == ["cat", "dog", "eel"]
    assert got["input"] == {"size": 32, "channels": 1, "mean": [0.0] * 3, "std": [1.0] * 3, "resize": "stretch",
                            "crop_ratio": 1.0}
    other.save_task("a", tmp_path / "b.safetensors")  # no info given: the loaded one is kept
    assert read_adapter(tmp_path / "b.safetensors")[1]["info"] == got
    other.remove_task("a")
    other.add_task("a", head=nn.Linear(16, 3))
    with pytest.raises(Exception):
        other.task_info("nope")
    assert other.task_info("a") == {}  # removing a task forgets its info


def test_adapter_without_info_still_loads(tmp_path):
    model = small_model()
    model.add_task("a", head=nn.Linear(16, 3))
    path = model.save_task("a", tmp_path / "a.safetensors", info={"labels": ["x", "y", "z"]})
    rewrite_metadata(path, info=None)  # as written before labels travelled with adapters
    other = small_model()
    assert other.load_task(path) == "a" and other.task_info("a") == {}
    assert InputSpec.from_info({}, 96) == InputSpec(size=96)  # fallback: ImageNet eval transform


def test_wrong_label_count_is_refused_at_save_and_at_load(tmp_path):
    model = small_model()
    model.add_task("a", head=nn.Linear(16, 3))
    path = tmp_path / "a.safetensors"
    with pytest.raises(ConfigError, match="2 labels given but the head has 3 outputs"):
        model.save_task("a", path, info={"labels": ["x", "y"]})
    assert not path.exists()
    with pytest.raises(ConfigError, match="input.size"):
        model.save_task("a", path, info={"input": {"size": "big"}})
    with pytest.raises(ConfigError, match="unknown task info"):
        model.save_task("a", path, info={"lables": ["x", "y", "z"]})
    model.save_task("a", path, info={"labels": ["x", "y", "z"]})
    rewrite_metadata(path, info=json.dumps({"labels": ["x", "y"]}))
    other = small_model()
    with pytest.raises(AdapterFileError, match="task info does not fit the head: 2 labels"):
        other.load_task(path)
    assert other.tasks == []  # nothing half-added
    rewrite_metadata(path, info="{not json")
    with pytest.raises(AdapterFileError, match="corrupt task info"):
        other.load_task(path)


def test_preprocess_matches_the_embedded_training_pipeline():
    from ftn.settings.classification.multidomain import MultiDomainDataset, load_multidomain

    ds = MultiDomainDataset("fashion", "test", image_size=32)
    x, _ = ds.as_tensors()
    raw = load_multidomain()["domains"]["fashion"]["splits"]["test"]["images"][:4]
    spec = InputSpec(size=32, channels=1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="stretch")
    for i, img in enumerate(raw):
        buf = __import__("io").BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        served = preprocess(decode_image(buf.getvalue()), spec)
        assert served.shape == (3, 32, 32)
        torch.testing.assert_close(served, ds[i][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(served, x[i], atol=1e-4, rtol=0)


def test_preprocess_center_crop_matches_folder_evaluation_transform():
    from ftn.settings.classification.setting import _image_transforms

    img = decode_image(png_bytes(3, size=50))
    spec = InputSpec(size=24, resize="center_crop", crop_ratio=1.14)
    torch.testing.assert_close(preprocess(img, spec), _image_transforms(24, False)["test"](img.convert("RGB")))


def test_decode_image_refuses_garbage_and_huge_images():
    with pytest.raises(DataError, match="not an image"):
        decode_image(b"definitely not a png")
    with pytest.raises(DataError, match="empty"):
        decode_image(b"")
    truncated = png_bytes(1, size=64)[:200]
    with pytest.raises(DataError):
        decode_image(truncated)
    with pytest.raises(DataError, match="limit is 100 pixels"):
        decode_image(png_bytes(1, size=11), max_pixels=100)


def test_top_k_labels_and_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    rows = top_k(logits, ["a", "b", "c"], k=2)
    assert [p["label"] for p in rows[0]] == ["b", "c"] and rows[1][0]["label"] == "a"
    assert rows[0][0]["prob"] == pytest.approx(torch.softmax(logits[0], 0)[1].item(), abs=1e-6)
    assert len(top_k(logits, None, k=10)[0]) == 3 and top_k(logits, None)[0][0]["label"] == "1"
    with pytest.raises(Exception, match="2 labels but its head gives 3"):
        top_k(logits, ["a", "b"])


def test_ftn_predict_prints_labels_matching_the_model(tmp_path, capsys):
    paths = make_adapters(tmp_path / "adapters", ["alpha", "beta"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(png_bytes(i))
    assert main(["predict", *SERVER_ARGS, "--adapter", str(paths["alpha"]), "--adapter", str(paths["beta"]),
                 str(images), "--json", "-k", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["image"].rsplit("/", 1)[-1]) for r in results] == [
        (t, f"img{i}.png") for t in ("alpha", "beta") for i in range(3)]
    model = tiny_model()
    for t in ("alpha", "beta"):
        model.load_task(paths[t])
    spec = InputSpec.from_info(model.task_info("alpha"))
    x = torch.stack([preprocess(decode_image((images / f"img{i}.png").read_bytes()), spec) for i in range(3)])
    for r, i in zip(results, [0, 1, 2, 0, 1, 2]):
        with torch.no_grad():
            expected = top_k(model(x[i:i + 1], task=r["task"]), model.task_info(r["task"])["labels"], 2)[0]
        assert r["top_k"] == expected
    assert main(["predict", *SERVER_ARGS, "--adapter", str(paths["alpha"]), str(images / "img0.png")]) == 0
    assert capsys.readouterr().out.startswith(f"{images / 'img0.png'}  [alpha]  alpha-class")
    (images / "bad.png").write_bytes(b"garbage")
    assert main(["predict", *SERVER_ARGS, "--adapter", str(paths["alpha"]), str(images / "bad.png")]) == 2
    assert "not an image" in capsys.readouterr().err


def test_ftn_train_writes_labels_and_input_into_adapters(tmp_path, capsys):
    args = ["model.backbone=tiny_convnet", "model.pretrained=false", "data.image_size=16", "data.train_limit=16",
            "data.val_limit=8", "data.test_limit=8", "train.max_steps=1", "data.batch_size=8",
            "data.domains=[fashion]", f"output_dir={tmp_path}", "train.recalibrate_bn=false"]
    config = REPO / "configs" / "embedded_mobilenetv2_ftn.yaml"
    assert main(["train", "--no-progress", "--config", str(config), *args]) == 0
    info = read_adapter(tmp_path / "adapters" / "fashion.safetensors")[1]["info"]
    assert info["labels"][:2] == ["t-shirt/top", "trouser"] and len(info["labels"]) == 10
    assert info["input"]["size"] == 16 and info["input"]["channels"] == 1 and info["input"]["resize"] == "stretch"
    assert info["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_ftn_predict_writes_dense_prediction_images(tmp_path, capsys):
    from ftn.settings.dense.model import DenseHeads, build_encoder, build_head

    torch.manual_seed(0)  # what `ftn predict --no-pretrained --seed 0` does before building
    encoder = build_encoder("mobilenet_v2", pretrained=False, output_stride=16)
    head = {"aspp_channels": 8, "low_channels": 4, "decoder_channels": 8}
    model = FTNModel(encoder, rank=2)
    for task in ("semseg", "depth"):  # as the dense setting builds them: DenseHeads({task: decoder})
        model.add_task(task, head=DenseHeads({task: build_head(encoder, task, 3, **head)}))
    model.eval()
    for task, labels in (("semseg", ["floor", "wall", "box"]), ("depth", ["depth (m)"])):
        model.save_task(task, tmp_path / f"{task}.safetensors", info={
            "labels": labels, "input": {"channels": 3, "resize": "none", "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225]},
            "outputs": {"kind": "dense", "task": task, "num_classes": 3, "head": head, "layout": "dict",
                        "encoder": {"backbone": "mobilenet_v2", "output_stride": 16}}})
    (tmp_path / "scene.png").write_bytes(png_bytes(5, size=40))
    out = tmp_path / "out"
    assert main(["predict", "--backbone", "mobilenet_v2", "--no-pretrained", "--threads", "1",
                 "--adapter", str(tmp_path / "semseg.safetensors"), "--adapter", str(tmp_path / "depth.safetensors"),
                 str(tmp_path / "scene.png"), "--output-dir", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["output"] for r in results] == [str(out / "semseg" / "scene.png"), str(out / "depth" / "scene.png")]
    seg, depth = Image.open(out / "semseg" / "scene.png"), Image.open(out / "depth" / "scene.png")
    assert seg.size == depth.size == (40, 40) and seg.mode == "P" and depth.mode == "L"
    x = preprocess(decode_image(png_bytes(5, size=40)),
                   InputSpec(size=None, resize="none", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    with torch.no_grad():
        expected = model(x[None], task="semseg")["semseg"][0].argmax(0)
    assert torch.equal(torch.from_numpy(__import__("numpy").array(seg)).long(), expected)


@pytest.mark.parametrize("head, message", [
    ({"type": "Linear", "in_features": 64, "out_features": 4_000_000, "bias": True},
     r"declares Linear weight \(4000000, 64\), bias \(4000000,\) but the file's head tensors are weight \(5, 64\)"),
    ({"type": "Linear", "in_features": 64, "out_features": 1e11, "bias": True}, r"out_features must be an integer"),
])
def test_ftn_predict_refuses_a_metadata_bomb_before_building_its_head(tmp_path, capsys, monkeypatch, head, message):
    """The head's declared size is not covered by the checksum: `ftn predict` must refuse it from
    the header, with a message, instead of allocating it."""
    paths = make_adapters(tmp_path / "adapters", ["alpha"])
    rewrite_metadata(paths["alpha"], head=json.dumps(head))
    (tmp_path / "img.png").write_bytes(png_bytes(0))
    built = []
    original = nn.Linear.reset_parameters
    monkeypatch.setattr(nn.Linear, "reset_parameters",
                        lambda self: (built.append(self.weight.numel()) if self.weight.device.type != "meta" else None,
                                      original(self))[1])
    assert main(["predict", *SERVER_ARGS, "--adapter", str(paths["alpha"]), str(tmp_path / "img.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftn predict: error: ") and re.search(message, err)
    assert not [n for n in built if n >= 4_000_000]


@pytest.mark.parametrize("recipe, message", [
    ({"decoder_channels": 1_000_000}, r"the head in the file does not fit the given head"),
    ({"decoder_channels": "wide"}, r"dense head recipe cannot be built: TypeError"),
    ({"no_such_option": 1}, r"dense head recipe cannot be built: TypeError"),
])
def test_a_dense_head_recipe_is_checked_on_the_meta_device_before_it_is_built(tmp_path, recipe, message):
    """A dense adapter's decoder is built from its info (not covered by the checksum): a recipe
    declaring a huge decoder is compared with the file's head tensors on the meta device first."""
    from ftn.apps.serving.predict import build_model, inspect_adapter, load_adapter
    from ftn.settings.dense.model import DenseHeads, build_encoder, build_head

    torch.manual_seed(0)
    encoder = build_encoder("mobilenet_v2", pretrained=False, output_stride=16)
    head = {"aspp_channels": 8, "low_channels": 4, "decoder_channels": 8}
    model = FTNModel(encoder, rank=1, include=["encoder.high.17.*"])
    model.add_task("depth", head=DenseHeads({"depth": build_head(encoder, "depth", 1, **head)}))
    outputs = {"kind": "dense", "task": "depth", "num_classes": 1, "head": head, "layout": "dict",
               "encoder": {"backbone": "mobilenet_v2", "output_stride": 16}}
    path = model.save_task("depth", tmp_path / "depth.safetensors", info={"outputs": outputs})
    torch.manual_seed(0)  # the same random backbone
    fresh = build_model("mobilenet_v2", [path], pretrained=False)
    assert load_adapter(fresh, path) == "depth"  # the untouched file loads
    fresh.remove_task("depth")
    info = json.loads(json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
                      ["__metadata__"]["info"])
    info["outputs"]["head"] = {**head, **recipe}
    rewrite_metadata(path, info=json.dumps(info))
    for attempt in (lambda: load_adapter(fresh, path), lambda: inspect_adapter(fresh, path)):
        with pytest.raises(AdapterFileError, match=message):
            attempt()
        assert fresh.tasks == []
