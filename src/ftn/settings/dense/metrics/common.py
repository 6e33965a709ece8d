"""What the dense meters and losses share: the ignore label and the shapes they accept.

Maps come as (H, W), (N, H, W) or (N, 1, H, W) (a batch of single-channel maps) and vector
fields as (3, H, W) or (N, 3, H, W); these helpers bring both to one layout and check that a
prediction and its target agree.
"""

from __future__ import annotations

from torch import Tensor

from ....core.errors import ShapeError

__all__ = ["IGNORE_INDEX", "map_shape", "same_maps", "vector_maps"]

#: Label of pixels no loss or metric counts (semantic void, augmentation padding of edges).
IGNORE_INDEX = 255


def map_shape(x: Tensor, name: str) -> Tensor:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    if x.dim() == 2:
        return x[None]
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ShapeError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")


def same_maps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    p, t = map_shape(pred, "prediction"), map_shape(target, "target")
    if p.shape != t.shape:
        raise ShapeError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return p, t


def vector_maps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(3, H, W) or (N, 3, H, W) pairs -> (N, 3, H, W)."""
    p = pred[None] if pred.dim() == 3 else pred
    t = target[None] if target.dim() == 3 else target
    if p.dim() != 4 or p.shape[1] != 3 or p.shape != t.shape:
        raise ShapeError(
            f"normals must both be (N, 3, H, W) or (3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return p, t
