"""``train.compile``: the step's forward and backward traced as one graph pair, with no graph break
in any setting's FTN model, and training through it gives eager training's parameters."""

from __future__ import annotations

import pytest
import torch

from ftn.core.errors import ConfigError
from ftn.training.config import TrainConfig, load_config
from ftn.training.runner import build

from helpers.tiny import run, tiny_overrides


def test_compiled_training_equals_eager(tmp_path):
    # aot_eager: dynamo's trace and AOTAutograd's forward/backward split, run without inductor's
    # code generation (which needs minutes of compiling on a 2-core CPU; see benchmarks).
    cfg = dict(epochs=1, max_steps=4, checkpoint_every=0, lr=1e-2, recalibrate_bn=False)
    _, eager, eager_result = run(tmp_path / "eager", train=TrainConfig(**cfg))
    torch._dynamo.reset()
    _, compiled, compiled_result = run(tmp_path / "compiled", train=TrainConfig(**cfg, compile="aot_eager"))
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert compiled_result.steps == eager_result.steps == 4


def test_the_optimizer_step_compiles_once_over_a_changing_schedule(tmp_path):
    # The rates are tensors the schedule fills (warm-up then cosine: a new rate every step), so
    # the step compiles to one graph beside the loss's and never recompiles.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = TrainConfig(epochs=1, max_steps=6, warmup_steps=2, checkpoint_every=0, lr=1e-2, recalibrate_bn=False,
                      compile="aot_eager")
    run(tmp_path, train=cfg)
    assert counters["stats"]["unique_graphs"] == 2  # the loss (forward + backward) and the optimizer step
    assert not counters["recompiles"]


@pytest.mark.parametrize("first, second", [("off", "aot_eager"), ("aot_eager", "off")])
def test_resuming_across_compile_settings_continues_the_same_run(tmp_path, first, second):
    # A checkpoint holds float rates without train.compile and tensor rates with it; a resume
    # with the other setting converts them and ends where an uninterrupted run ends.
    cfg = dict(epochs=2, checkpoint_every=2, lr=1e-2, recalibrate_bn=False)
    _, reference, _ = run(tmp_path / "ref", train=TrainConfig(**cfg))
    torch._dynamo.reset()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop=4, train=TrainConfig(**cfg, compile=first))
    torch._dynamo.reset()
    _, resumed, result = run(tmp_path / "run", train=TrainConfig(**cfg, compile=second))
    a, b = reference.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert result.steps == 12


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=fast"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["classification", "dense", "text"])
def test_every_settings_ftn_step_traces_without_graph_breaks(tmp_path, setting):
    config, overrides = tiny_overrides(setting, tmp_path)
    cfg = load_config(config, [*overrides, "method.name=ftn", f"output_dir={tmp_path / 'out'}"])
    setting_obj, method = build(cfg, torch.device("cpu"))
    name = setting_obj.tasks()[0]
    data = setting_obj.data(name)
    model = method.add_task(name, setting_obj.head(data))
    model.train()
    batch = data.collate([data.train[i] for i in range(2)]) if data.collate else \
        torch.utils.data.default_collate([data.train[i] for i in range(2)])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda b: data.objective.loss(model, b))(batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
