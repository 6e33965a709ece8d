"""Files ftn writes get the mode any new file gets: 0o666 less the umask (a server running as
another user of a shared adapter folder must be able to read them)."""

import os
import stat

import pytest
from torch import nn

from ftn import FTNModel
from ftn.core.io import atomic_write_bytes


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_uses_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    # Replacing an existing file: the same mode, the new content, no temporary file left.
    atomic_write_bytes(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_adapter_files_are_readable_by_others_under_the_usual_umask(tmp_path, umask):
    umask(0o022)
    model = FTNModel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), rank=1)
    model.add_task("a")
    path = model.save_task("a", tmp_path / "a.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
