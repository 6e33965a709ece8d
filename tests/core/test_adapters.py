"""Adapter files: exact round trips, every mismatch refused with a message, atomic saves."""

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from ftn import AdapterFileError, FTNModel, TaskError
from ftn.core.adapters import FORMAT_VERSION, read_adapter
from ftn.core.io import atomic_write_bytes

from helpers import SmallCNN, fresh_model, randomize_norms, train_steps


@pytest.fixture
def trained(images, tmp_path):
    model = fresh_model()
    model.add_task("a", head=nn.Linear(16, 4))
    train_steps(model, "a", images)
    path = model.save_task("a", tmp_path / "a.safetensors")
    return model, path


def rewrite(path, mutate_meta=None, mutate_tensors=None):
    """Re-save an adapter with edited metadata/tensors (checksum kept consistent unless asked)."""
    from ftn.core.adapters import tensor_digest

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    tensors, _ = read_adapter(path)
    if mutate_tensors:
        mutate_tensors(tensors)
    meta["content_sha256"] = tensor_digest(tensors)
    if mutate_meta:
        mutate_meta(meta)
    path.write_bytes(st_save(tensors, metadata=meta))


def test_round_trip_is_exact_in_a_new_model(trained, images):
    model, path = trained
    with torch.no_grad():
        expected = model(images, task="a")
    other = fresh_model()
    assert other.load_task(path) == "a"
    with torch.no_grad():
        assert torch.equal(other(images, task="a"), expected)
    for (n1, p1), (n2, p2) in zip(model.named_task_parameters("a"), other.named_task_parameters("a")):
        assert n1 == n2 and torch.equal(p1, p2)
    for n1, n2 in zip(model.task_norm_layers().values(), other.task_norm_layers().values()):
        for b1, b2 in zip(n1.tasks["a"].buffers(), n2.tasks["a"].buffers()):
            assert torch.equal(b1, b2)  # BatchNorm running statistics survive the trip
    other.load_task(path, name="again")
    assert other.tasks == ["a", "again"]


def test_file_holds_no_pickle_and_expected_metadata(trained):
    _, path = trained
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:16]  # not a pickle/zip checkpoint
    _, meta = read_adapter(path)
    assert meta["task"] == "a" and meta["head"]["type"] == "Linear"
    assert meta["layers"]["stem"]["rank"] == 3 and meta["layers"]["stem"]["shape"] == [8, 3, 3, 3]
    assert len(meta["backbone_fingerprint"]) == 64


def test_duplicate_name_refused(trained):
    model, path = trained
    with pytest.raises(TaskError, match="already exists"):
        model.load_task(path)


def test_other_backbone_weights_refused(trained):
    _, path = trained
    other = fresh_model(seed=1)
    with pytest.raises(AdapterFileError, match="other weights"):
        other.load_task(path)
    assert other.tasks == []
    other.load_task(path, check_fingerprint=False)  # explicit override
    assert other.tasks == ["a"]


def test_other_shapes_refused(trained):
    _, path = trained
    torch.manual_seed(0)
    wider = FTNModel(SmallCNN(width=16), rank=3)
    with pytest.raises(AdapterFileError, match="other layer shapes.*stem"):
        wider.load_task(path)
    assert wider.tasks == [] and all(not layer.tasks for layer in wider.adapted_layers().values())


def test_missing_and_extra_layers_refused(trained):
    _, path = trained
    fewer = fresh_model(exclude=["fc"])
    with pytest.raises(AdapterFileError, match=r"not adapted in this model \(fc\)"):
        fewer.load_task(path)
    more_model = fresh_model()
    more_model.add_task("b")
    path_b = more_model.save_task("b", path.with_name("b.safetensors"))
    fewer_file = fresh_model(exclude=["fc"])
    fewer_file.add_task("c")
    path_c = fewer_file.save_task("c", path.with_name("c.safetensors"))
    with pytest.raises(AdapterFileError, match=r"not in the file \(fc\)"):
        fresh_model().load_task(path_c)
    fresh_model().load_task(path_b)


def test_truncated_corrupt_and_foreign_files_refused(trained, tmp_path):
    _, path = trained
    raw = path.read_bytes()
    cases = {
        "empty": b"",
        "short": raw[:5],
        "truncated_header": raw[:40],
        "truncated_data": raw[:-10],
        "garbage": b"\xff" * 200,
    }
    for label, data in cases.items():
        p = tmp_path / f"{label}.safetensors"
        p.write_bytes(data)
        with pytest.raises(AdapterFileError, match="truncated|corrupt|not an adapter"):
            fresh_model().load_task(p)
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    p = tmp_path / "flipped.safetensors"
    p.write_bytes(bytes(flipped))
    with pytest.raises(AdapterFileError, match="checksum"):
        fresh_model().load_task(p)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(st_save({"w": torch.zeros(2)}))
    with pytest.raises(AdapterFileError, match="not an ftn adapter"):
        fresh_model().load_task(foreign)
    with pytest.raises(AdapterFileError, match="not found"):
        fresh_model().load_task(tmp_path / "missing.safetensors")


def test_newer_format_refused(trained):
    _, path = trained
    rewrite(path, mutate_meta=lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(AdapterFileError, match=f"format v{FORMAT_VERSION + 1}.*upgrade"):
        fresh_model().load_task(path)


def test_misshaped_factor_and_custom_head(trained, tmp_path):
    model, path = trained

    def bad_factor(t):
        t["delta.stem.0"] = torch.zeros(8, 2)

    rewrite(path, mutate_tensors=bad_factor)
    with pytest.raises(AdapterFileError, match=r"delta.stem.0 should have shape \(8, 3\)"):
        fresh_model().load_task(path)

    model.add_task("mlp", head=nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)))
    p = model.save_task("mlp", tmp_path / "mlp.safetensors")
    other = fresh_model()
    with pytest.raises(AdapterFileError, match="custom head"):
        other.load_task(p, check_fingerprint=False)
    with pytest.raises(AdapterFileError, match="does not fit"):
        other.load_task(p, head=nn.Linear(16, 2), check_fingerprint=False)
    other.load_task(p, head=nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)), check_fingerprint=False)
    assert "mlp" in other.tasks


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary file left behind


# ---------------------------------------------------------------------------- metadata bombs
# The checksum covers the tensors only, so a file can declare anything in its metadata: every
# declared size must be checked against the tensors the file holds before anything is built.

def spy_linear_builds(monkeypatch):
    """Record the weight size of every Linear built off the meta device (a bomb would build
    a huge one before finding out the file does not fit)."""
    built = []
    original = nn.Linear.reset_parameters

    def spy(self):
        if self.weight.device.type != "meta":
            built.append(self.weight.numel())
        return original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    return built


@pytest.mark.parametrize("label, head, message", [
    ("huge", {"out_features": 4_000_000}, r"declares Linear weight \(4000000, 16\).*head tensors are weight \(4, 16\)"),
    ("1e11", {"out_features": 1e11}, r"out_features must be an integer in 1\.\.2147483647, got 100000000000\.0"),
    ("beyond_int32", {"in_features": 10**12}, r"in_features must be an integer in 1\.\.2147483647"),
    ("negative", {"out_features": -4}, r"out_features must be an integer .* got -4"),
    ("float", {"out_features": 4.0}, r"out_features must be an integer .* got 4\.0"),
    ("string", {"in_features": "16"}, r"in_features must be an integer .* got '16'"),
    ("bool_bias", {"bias": "yes"}, r"bias must be true or false"),
    ("mismatched", {"out_features": 5}, r"declares Linear weight \(5, 16\), bias \(5,\) but the file's head tensors "
                                        r"are weight \(4, 16\), bias \(4,\)"),
    ("identity", {"type": "Identity"}, r"declares Identity with no tensors but the file's head tensors are weight"),
])
def test_declared_head_sizes_are_checked_before_anything_is_built(trained, monkeypatch, label, head, message):
    _, path = trained

    def bomb(meta):
        meta["head"] = json.dumps({**json.loads(meta["head"]), **head})

    rewrite(path, mutate_meta=bomb)
    model = fresh_model()
    built = spy_linear_builds(monkeypatch)
    with pytest.raises(AdapterFileError, match=message):
        model.load_task(path)
    assert model.tasks == [] and not model.heads and all(not layer.tasks for layer in model.adapted_layers().values())
    assert built == []  # not even the legitimate 16 x 4 head: refused from the header alone
    with pytest.raises(AdapterFileError, match=message):
        read_adapter(path)


@pytest.mark.parametrize("field, value, message", [
    ("rank", 1e11, r"layer stem's rank must be an integer"),
    ("rank", -3, r"layer stem's rank must be an integer .* got -3"),
    ("rank", 5, r"delta.stem.0 should have shape \(8, 5\), got \(8, 3\)"),  # declared rank vs the tensors
    ("requested_rank", "8", r"requested_rank must be an integer"),
    ("shape", [8, 3, 3, 3.5], r"layer stem's weight shape must be an integer"),
    ("shape", 7, r"layer stem has no valid weight shape"),
    ("options", [], r"corrupt update kind or options"),
])
def test_declared_layer_entries_are_checked(trained, field, value, message):
    _, path = trained

    def bomb(meta):
        layers = json.loads(meta["layers"])
        layers["stem"][field] = value
        meta["layers"] = json.dumps(layers)

    rewrite(path, mutate_meta=bomb)
    model = fresh_model()
    with pytest.raises(AdapterFileError, match=message):
        model.load_task(path)
    assert model.tasks == []


def test_header_tensor_shapes_must_match_their_bytes(trained, tmp_path):
    """A header may claim a tensor far larger than its bytes: refused from the header."""
    _, path = trained
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["head.weight"]["shape"] = [4, 1_000_000_000]
    text = json.dumps(header).encode()
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(AdapterFileError,
                       match=r"tensor .head.weight. declares shape \(4, 1000000000\) \(16000000000 bytes\) but holds 256"):
        fresh_model().load_task(bomb)


def test_check_adapter_reads_the_header_only(trained, tmp_path):
    """What a server does for a task it does not load yet: every check but the checksum, from
    the header; the byte cost of loading it from the declared shapes."""
    from ftn.core.adapters import check_adapter, read_adapter_header

    model, path = trained
    other = fresh_model()
    header = check_adapter(other, path)
    tensors, _ = read_adapter(path)
    assert header.shapes == {k: tuple(t.shape) for k, t in tensors.items()}
    assert header.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert other.tasks == []
    flipped = bytearray(path.read_bytes())
    flipped[-3] ^= 0xFF  # a tensor byte: the header is intact, the checksum is not
    p = tmp_path / "flipped.safetensors"
    p.write_bytes(bytes(flipped))
    assert read_adapter_header(p).meta["task"] == "a"
    with pytest.raises(AdapterFileError, match="checksum"):
        other.load_task(p)
    with pytest.raises(AdapterFileError, match="other weights"):
        check_adapter(fresh_model(seed=1), path)


def test_plain_state_files_are_checked_against_the_task_before_loading(tmp_path):
    from ftn.core.adapters import read_state

    reference = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    good = tmp_path / "good.safetensors"
    good.write_bytes(st_save({"w": torch.ones(3, 2), "b": torch.ones(3)}))
    assert torch.equal(read_state(good, reference)["w"], torch.ones(3, 2))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save({"w": torch.ones(3000, 2), "x": torch.ones(1)}))
    with pytest.raises(AdapterFileError, match=r"does not fit this task: missing b; unexpected x; mis-shaped w"):
        read_state(bad, reference)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        read_state(tmp_path / "junk.safetensors", reference)
