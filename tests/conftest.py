"""Fixtures shared across the suite (each defined once, here), and markers by folder. Plain helpers
(networks, model builders) are in ``helpers/``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SmallCNN, randomize_norms

TESTS = Path(__file__).resolve().parent
#: tests/<folder>/ mirrors src/ftn/<folder>/; each folder is a marker (``pytest -m core``).
FOLDER_MARKERS = ("core", "training", "settings", "apps", "docs", "peft")


@pytest.fixture
def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return randomize_norms(SmallCNN()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: on a busy 2-core machine OpenMP's
    barrier between two threads costs milliseconds per op (a 1×32×16×24 BatchNorm: 8 ms with 2
    threads, 0.01 ms with 1). The setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def nyud_scenes(tmp_path_factory):
    """Procedural scenes in the NYUD multi-task layout, written once per distinct layout a test asks
    for: ``nyud_scenes(n_train=4, n_val=2, size=(32, 48), seed=0)``."""
    from ftn.settings.dense import write_nyud_layout

    made: dict[tuple, Path] = {}

    def make(n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (32, 48), seed: int = 0) -> Path:
        key = (n_train, n_val, tuple(size), seed)
        if key not in made:
            made[key] = write_nyud_layout(tmp_path_factory.mktemp("nyud") / "data", n_train=n_train, n_val=n_val,
                                          size=size, seed=seed, workers=1)
        return made[key]

    return make


@pytest.fixture(scope="session")
def scenes(nyud_scenes) -> Path:
    """The default small NYUD layout: 4 train and 2 val scenes of 32×48."""
    return nyud_scenes()


def pytest_collection_modifyitems(config, items):
    """Mark each test by the folder it is in (tests/<folder>/ mirrors src/ftn/<folder>/):
    ``pytest -m core`` runs the library's tests alone (torch + safetensors)."""
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
