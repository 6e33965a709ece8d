"""SHA-256 of named tensors: the checksum of an adapter file's content and the fingerprint of a
frozen backbone. Kept apart from :mod:`ftn.core.adapters` so the model can fingerprint its backbone
without depending on the file format."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Mapping

from torch import Tensor

__all__ = ["tensor_digest"]


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
        data = t.detach().cpu().contiguous()
        # The raw bytes without NumPy (not a core dependency): the buffer of a contiguous CPU tensor.
        digest.update(ctypes.string_at(data.data_ptr(), data.nbytes) if data.nbytes else b"")
    return digest.hexdigest()
