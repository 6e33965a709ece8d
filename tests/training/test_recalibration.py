"""BatchNorm recalibration on data shaped like DomainNet: a list file sorted by class, 345 classes.

The statistics must be those of the whole training split under the evaluation transform, not of
the first classes in file order (the failure the embedded, shuffled benchmark could not show)."""

import pytest
import torch
from torch import nn

from ftn.settings.classification.fixtures import write_domainnet_fixture
from ftn.settings.classification.setting import ImageDataConfig, build_domain_data
from ftn.training.config import MethodConfig, TrainConfig
from ftn.training.engine import recalibration_loader, train_task
from ftn.training.methods import make_method

CLASSES = 345


@pytest.fixture(scope="module")
def clipart_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("domainnet")
    # 4 images per class: 3 in the train list, 1 in test; the list is grouped by class.
    fixture = write_domainnet_fixture(root, domains=("clipart",), classes=CLASSES, per_class=4, size=16)
    labels = [label for _, label in fixture.lists[("clipart", "train")]]
    assert labels == sorted(labels)  # the layout under test
    cfg = ImageDataConfig(kind="domainnet", root=str(root), domains=["clipart"], image_size=16, augment=True,
                     val_fraction=0.1, batch_size=32, eval_batch_size=64)
    return cfg, build_domain_data(cfg, "clipart", seed=0)


def _all_images(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_recalibration_sample_covers_every_class(clipart_data):
    _, data = clipart_data
    loader = recalibration_loader(data.recal, batch_size=32, max_batches=20, seed=0)
    seen = torch.cat([y for _, y in loader])
    assert len(seen) == 640 < len(data.train)
    assert len(seen.unique()) >= 0.9 * CLASSES  # in file order: the first ~213 classes only
    # Seeded: the same sample every time; another seed, another sample.
    again = torch.cat([y for _, y in recalibration_loader(data.recal, 32, 20, seed=0)])
    other = torch.cat([y for _, y in recalibration_loader(data.recal, 32, 20, seed=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    # When the cap covers the split, every sample is used exactly once.
    full = recalibration_loader(data.recal, batch_size=32, max_batches=10_000, seed=0)
    assert sum(len(y) for _, y in full) == len(data.recal)


def test_recalibration_reads_training_images_with_the_evaluation_transform(clipart_data):
    _, data = clipart_data
    assert len(data.recal) == len(data.train)
    first, again = data.recal[5][0], data.recal[5][0]
    assert torch.equal(first, again)  # no random crop / flip
    assert data.train[5][1] == data.recal[5][1]  # same sample, same label
    assert not all(torch.equal(data.train[5][0], data.train[5][0]) for _ in range(4))  # train is augmented


def test_engine_recalibrates_on_the_whole_split(clipart_data, tmp_path):
    """After training, the domain's BatchNorm statistics match a pass over the whole (shuffled,
    un-augmented) training split; the first BN sees the input, so its statistics are the
    per-channel pixel mean and variance of the split."""
    cfg, data = clipart_data
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method_cfg = MethodConfig(name="ftn")
    method_cfg.ftn.rank = 1
    method = make_method(method_cfg, backbone, torch.device("cpu"))
    task = method.add_task("clipart", nn.Linear(4, data.objective.num_classes))
    train = TrainConfig(max_steps=1, lr=0.0, head_lr=0.0, warmup_steps=0, recalibrate_batches=20, device="cpu")
    train_task(task, data, train, cfg, tmp_path, seed=0, progress=False)
    input_bn = task.batchnorms()[0]
    assert input_bn.num_features == 3

    images = _all_images(data.recal)  # N, 3, H, W
    mean = images.mean(dim=(0, 2, 3))
    var = images.transpose(0, 1).reshape(3, -1).var(dim=1)
    assert torch.allclose(input_bn.running_mean, mean, atol=0.04), (input_bn.running_mean, mean)
    assert torch.allclose(input_bn.running_var, var, rtol=0.1), (input_bn.running_var, var)
