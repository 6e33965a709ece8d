"""Hostile inputs to the adapter loader (random bytes, random metadata). The training harness's
crash safety and distributed tests are in tests/harness/."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from ftn import AdapterFileError, FTNModel
from ftn.core.adapters import FORMAT

from helpers import SmallCNN, randomize_norms


def _model():
    torch.manual_seed(0)
    return FTNModel(randomize_norms(SmallCNN()).eval(), rank=2).eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_adapter_loader_random_bytes_never_crash(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    model = _MODEL
    try:
        model.load_task(path, name="fuzz")
    except AdapterFileError:
        pass
    assert "fuzz" not in model.tasks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.sampled_from(["format", "format_version", "task", "layers", "norms", "head",
                                              "config", "task_spec", "backbone_fingerprint", "content_sha256"]),
                            st.one_of(st.text(max_size=30), st.just("{}"), st.just("[]"), st.just("1"),
                                      st.just(FORMAT), st.just('{"stem": {"shape": [8], "rank": 1}}'))),
       keys=st.lists(st.sampled_from(["delta.stem.0", "head.weight", "norm.bn1.weight", "x"]), max_size=3))
def test_adapter_loader_random_metadata_never_half_loads(tmp_path, meta, keys):
    path = tmp_path / "meta.safetensors"
    path.write_bytes(st_save({k: torch.zeros(2, 2) for k in keys}, metadata=meta))
    model = _MODEL
    before = list(model.tasks)
    try:
        name = model.load_task(path, name="fuzz")
    except AdapterFileError:
        assert model.tasks == before
        assert all("fuzz" not in layer.tasks for layer in model.adapted_layers().values())
    else:  # only a complete, valid file may load
        assert name == "fuzz"
        model.remove_task("fuzz")


_MODEL = _model()
