"""Procedural indoor-like scenes with exact dense labels, written in the NYUD multi-task layout.

No real dense multi-task data (NYUD-v2 etc.) can be fetched on our machines, so this module renders
small synthetic rooms whose four NYUD tasks (semantic segmentation, depth, surface normals, edges)
are known *exactly* for every pixel. The renderer is a vectorised numpy ray caster: one ray per
pixel centre, analytic intersections with every primitive for all pixels at once, a z-buffer, then
texturing and Lambertian shading of the visible surface only.

World frame: metres, ``y`` up, the floor is the plane ``y = 0``; the room spans
``x_min <= x <= x_max``, ``z <= z_max`` (back wall at ``z = z_max``, side walls at ``x_min`` and
``x_max``), walls ``wall_height`` tall, and there is **no ceiling**: rays that pass over the walls
hit nothing and become "void" (label 255, depth 0, normal 0), which exercises the ignore/invalid
paths of losses and metrics just as real NYUD holes do.

Camera frame (for normals): the OpenCV convention, ``x`` right, ``y`` down, ``z`` forward. Normals
are unit vectors in this frame and face the camera (``n · ray < 0``); e.g. the floor normal of a
camera with pitch ``p`` (looking down) and no roll is ``(0, -cos p, -sin p)``. Depth is the
z-depth (distance along the optical axis), not the ray length, as for Kinect depth maps.

Classes (``CLASS_NAMES``): 0 floor, 1 wall, 2 box, 3 sphere, 4 cylinder, 5 rug, 6 picture; 255 is
void. A rug is a rectangle painted on the floor and a picture a rectangle on the back wall: they
give label boundaries with no depth or normal change, which a purely geometric edge detector
would miss.

Edges: every visible face of every primitive gets its own *surface id* (box faces, cylinder side
vs. cap, each wall, rug, picture...). A pixel pair (4-neighbourhood) whose surface ids differ is a
boundary; for our convex primitives and planes this is exactly the union of label boundaries,
instance boundaries, depth discontinuities (occlusions) and normal creases (box edges, wall
corners, cylinder rims). Each boundary is drawn one pixel thick on its *nearer* side (smaller
depth, void counting as infinitely far; ties go to the left/upper pixel), which is where an
occluding contour physically lies.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.errors import ConfigError

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "Material",
    "SceneSpec",
    "SceneSample",
    "sample_scene",
    "render_scene",
    "generate_scene",
    "write_nyud_layout",
]

CLASS_NAMES: tuple[str, ...] = ("floor", "wall", "box", "sphere", "cylinder", "rug", "picture")
IGNORE_INDEX = 255

FLOOR, WALL, BOX, SPHERE, CYLINDER, RUG, PICTURE = range(7)

# Owner ids of the fixed surfaces; objects follow from _FIRST_OBJECT on. A surface id is
# owner * _FACES + face, so every face of every primitive is distinct (a box has 6 faces).
_OWNER_FLOOR, _OWNER_BACK, _OWNER_LEFT, _OWNER_RIGHT, _OWNER_RUG, _OWNER_PICTURE = range(6)
_FIRST_OBJECT = 6
_FACES = 8

# Texture patterns.
PLAIN, CHECKER, STRIPES, NOISE = range(4)
_NOISE_GRID = 16

# Rays start at the camera; intersections closer than this are rejected so that rounding can never
# make a surface occlude itself.
_EPS = 1e-6


@dataclass(frozen=True)
class Material:
    """Albedo of one surface: two colours mixed by a pattern evaluated in surface coordinates.

    ``scale`` is in pattern cells per metre, so textures keep their physical size and shrink with
    distance like real ones (a useful monocular depth cue). ``angle`` rotates stripes/checkers.
    """

    pattern: int
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    scale: float
    angle: float = 0.0
    noise: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one scene; rendering is a pure function of this and the size.

    Array layouts (one row per object): ``boxes`` ``(K, 6)`` = centre x, centre z, half sizes
    (hx, hy, hz), yaw in radians (boxes rest on the floor, so centre y = hy); ``spheres`` ``(K, 4)``
    = centre (x, y, z), radius; ``cylinders`` ``(K, 4)`` = axis x, axis z, radius, height (vertical
    axis, base on the floor). ``rug`` = (x0, x1, z0, z1) on the floor and ``picture`` =
    (x0, x1, y0, y1) on the back wall, or ``None``. ``materials`` is indexed by owner id: floor,
    back, left, right wall, rug, picture, then boxes, spheres, cylinders in that order.
    """

    camera_position: tuple[float, float, float]
    yaw: float
    pitch: float
    fov_deg: float
    room: tuple[float, float, float, float]  # x_min, x_max, z_max, wall_height
    light_dir: tuple[float, float, float]  # unit vector pointing towards the light
    ambient: float
    void_color: tuple[float, float, float]
    boxes: np.ndarray
    spheres: np.ndarray
    cylinders: np.ndarray
    rug: tuple[float, float, float, float] | None
    picture: tuple[float, float, float, float] | None
    materials: tuple[Material, ...]
    noise_seed: int
    pixel_noise: float = 2.0  # std of additive Gaussian noise, in 8-bit grey levels

    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation; its columns are the camera's right, down, forward axes."""
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        forward = np.array([sy * cp, -sp, cy * cp])
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)  # right x down = forward: a proper rotation (det +1)
        return np.stack([right, down, forward], axis=1)

    def intrinsics(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels, square pixels, ``fov_deg`` being the horizontal FOV."""
        fx = (width / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)
        return fx, fx, width / 2.0, height / 2.0


@dataclass(frozen=True)
class SceneSample:
    """One rendered scene. ``edge`` is float32 in {0, 1}; void pixels have semseg 255, depth 0
    and normal (0, 0, 0)."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    semseg: np.ndarray  # uint8 (H, W)
    depth: np.ndarray  # float32 (H, W), metres, 0 = invalid
    normals: np.ndarray  # float32 (H, W, 3), camera frame, unit or 0
    edge: np.ndarray  # float32 (H, W)
    intrinsics: tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------
# Scene sampling


def _random_color(rng: np.random.Generator, lo: float = 0.15, hi: float = 0.95) -> tuple[float, float, float]:
    r, g, b = (float(c) for c in rng.uniform(lo, hi, size=3))
    return r, g, b


def _random_material(rng: np.random.Generator, scale_range: tuple[float, float]) -> Material:
    pattern = int(rng.choice(4, p=[0.2, 0.3, 0.25, 0.25]))
    a = _random_color(rng)
    # The second colour is a shifted version of the first so that patterns stay readable but do
    # not dominate object boundaries.
    r, g, bl = (float(np.clip(c + rng.uniform(-0.35, 0.35), 0.05, 1.0)) for c in a)
    b = (r, g, bl)
    noise = rng.random((_NOISE_GRID, _NOISE_GRID)) if pattern == NOISE else None
    return Material(
        pattern=pattern,
        color_a=a,
        color_b=b,
        scale=float(rng.uniform(*scale_range)),
        angle=float(rng.uniform(0.0, math.pi)),
        noise=noise,
    )


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    """Draw a random room, camera, light and 1–10 objects (deterministic given ``rng``).

    Objects are placed in the camera's horizontal field of view, at 1.5 m or more from the camera
    (so the camera is never inside one) and inside the room.
    """
    width = rng.uniform(4.0, 7.0)
    x_min, x_max = -width / 2.0, width / 2.0
    z_max = rng.uniform(4.0, 8.0)
    wall_height = rng.uniform(2.4, 3.2)
    cam = (float(rng.uniform(-0.25, 0.25) * width), float(rng.uniform(1.0, 1.7)), 0.0)
    yaw = math.radians(rng.uniform(-20.0, 20.0))
    pitch = math.radians(rng.uniform(5.0, 25.0))
    fov = float(rng.uniform(55.0, 65.0))

    footprints: list[tuple[float, float, float]] = []  # (x, z, radius) of objects on the floor

    def place(radius: float, margin: float | None = None) -> tuple[float, float]:
        # A point at a random bearing inside ~80 % of the horizontal FOV, clipped into the room.
        # A few retries avoid most interpenetrating objects (the z-buffer would cope, but the
        # intersections look unlike real furniture); the last draw is kept if none fits.
        margin = radius if margin is None else margin
        for _ in range(8):
            phi = yaw + rng.uniform(-0.8, 0.8) * math.radians(fov) / 2.0
            rho = rng.uniform(1.5, 0.9 * z_max)
            x = float(np.clip(cam[0] + rho * math.sin(phi), x_min + margin, x_max - margin))
            z = float(np.clip(rho * math.cos(phi), 1.0 + margin, z_max - margin))
            if all((x - fx) ** 2 + (z - fz) ** 2 > (radius + fr) ** 2 for fx, fz, fr in footprints):
                break
        footprints.append((x, z, radius))
        return x, z

    n_box, n_sph, n_cyl = int(rng.integers(1, 5)), int(rng.integers(0, 4)), int(rng.integers(0, 4))
    boxes = np.zeros((n_box, 6))
    for k in range(n_box):
        hx, hy, hz = rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.8), rng.uniform(0.15, 0.6)
        # The footprint radius is the half-diagonal: the box may be rotated by any yaw.
        x, z = place(math.hypot(hx, hz))
        boxes[k] = (x, z, hx, hy, hz, rng.uniform(-math.pi / 4, math.pi / 4))
    spheres = np.zeros((n_sph, 4))
    for k in range(n_sph):
        r = rng.uniform(0.12, 0.45)
        if n_box and rng.random() < 0.3:
            # Sometimes a ball sits on top of a box: objects then occlude each other vertically too.
            b = boxes[rng.integers(n_box)]
            spheres[k] = (b[0], 2.0 * b[3] + r, b[1], r)
        else:
            x, z = place(r)
            spheres[k] = (x, r, z, r)
    cylinders = np.zeros((n_cyl, 4))
    for k in range(n_cyl):
        r, h = rng.uniform(0.1, 0.35), rng.uniform(0.3, 1.6)
        x, z = place(r)
        cylinders[k] = (x, z, r, h)

    rug = None
    if rng.random() < 0.5:
        phi = yaw + rng.uniform(-0.5, 0.5) * math.radians(fov) / 2.0
        rho = rng.uniform(2.0, 0.7 * z_max)  # a rug may lie under objects: no footprint check
        x, z = cam[0] + rho * math.sin(phi), rho * math.cos(phi)
        hx, hz = rng.uniform(0.4, 1.2), rng.uniform(0.3, 1.0)
        rug = (x - hx, x + hx, z - hz, z + hz)
    picture = None
    if rng.random() < 0.5:
        pw = rng.uniform(0.4, 1.4)
        px = rng.uniform(x_min + pw, x_max - pw)
        py0 = rng.uniform(0.9, 1.5)
        picture = (px - pw / 2, px + pw / 2, py0, py0 + rng.uniform(0.4, 0.9))

    wall_mat = _random_material(rng, (1.0, 4.0))
    materials = [_random_material(rng, (1.0, 4.0)), wall_mat, wall_mat, wall_mat]
    materials += [_random_material(rng, (2.0, 8.0)), _random_material(rng, (4.0, 12.0))]
    materials += [_random_material(rng, (3.0, 10.0)) for _ in range(n_box + n_sph + n_cyl)]

    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.0), rng.uniform(-0.8, -0.1)])
    light /= np.linalg.norm(light)
    return SceneSpec(
        camera_position=cam,
        yaw=yaw,
        pitch=pitch,
        fov_deg=fov,
        room=(x_min, x_max, z_max, wall_height),
        light_dir=(float(light[0]), float(light[1]), float(light[2])),
        ambient=float(rng.uniform(0.25, 0.45)),
        void_color=_random_color(rng, 0.05, 0.3),
        boxes=boxes,
        spheres=spheres,
        cylinders=cylinders,
        rug=rug,
        picture=picture,
        materials=tuple(materials),
        noise_seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------------
# Ray casting. Every function takes the ray origin o (3,) and unnormalised directions d (N, 3)
# whose camera-frame z component is 1, so the ray parameter t *is* the z-depth. Misses are inf.


def _ry(theta: np.ndarray) -> np.ndarray:
    """Rotations about the world y axis, shape (K, 3, 3)."""
    c, s = np.cos(theta), np.sin(theta)
    z, o = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _hit_boxes(o: np.ndarray, d: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in each box's own frame. Returns t (K, N) and the entry face (K, N): face
    ``2 * axis + (d_local[axis] > 0)``, whose outward local normal is ``-sign(d_local[axis])``."""
    rot = _ry(boxes[:, 5])  # local -> world
    centre = np.stack([boxes[:, 0], boxes[:, 3], boxes[:, 1]], axis=1)  # (K, 3)
    half = boxes[:, 2:5]
    o_l = np.einsum("kji,kj->ki", rot, o[None] - centre)  # R^T (o - c)
    d_l = np.matmul(d[None], rot)  # rows: (R^T d)^T = d^T R, (K, N, 3)

    def slab(a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Entry/exit parameters of slab ``a`` and the face entered through it. One axis at a
        # time on contiguous (K, N) arrays: reducing a length-3 trailing axis is several times
        # slower in numpy than these elementwise operations.
        da = d_l[..., a]
        oa, ha = o_l[:, a : a + 1], half[:, a : a + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / da
            t1 = (-ha - oa) * inv
            t2 = (ha - oa) * inv
        # fmin/fmax drop the NaN of a ray lying exactly in a slab plane (0 * inf).
        return np.fmin(t1, t2), np.fmax(t1, t2), 2 * a + (da > 0)

    t_near, t_far, face = slab(0)
    for a in (1, 2):
        lo, hi, f = slab(a)
        later = lo > t_near  # the ray enters this slab last: that is the face it comes through
        t_near = np.where(later, lo, t_near)
        face = np.where(later, f, face)
        t_far = np.minimum(t_far, hi)
    hit = (t_near <= t_far) & (t_near > _EPS)
    return np.where(hit, t_near, np.inf), face


def _hit_spheres(o: np.ndarray, d: np.ndarray, spheres: np.ndarray) -> np.ndarray:
    """Nearest root of |o + t d - c|^2 = r^2 (the camera is outside every sphere). (K, N)."""
    oc = o[None] - spheres[:, :3]  # (K, 3)
    a = np.einsum("ni,ni->n", d, d)[None]
    b = 2.0 * (oc @ d.T)  # (K, N)
    c = (np.einsum("ki,ki->k", oc, oc) - spheres[:, 3] ** 2)[:, None]
    disc = b * b - 4.0 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2.0 * a)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cylinders(o: np.ndarray, d: np.ndarray, cyl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertical capped cylinders standing on the floor. Returns t (K, N) and face (K, N): 0 side,
    1 top cap. The bottom cap lies on the floor, which the camera (above the floor) never sees."""
    ox = o[0] - cyl[:, 0:1]
    oz = o[2] - cyl[:, 1:2]
    r, h = cyl[:, 2:3], cyl[:, 3:4]
    dx, dy, dz = d[None, :, 0], d[None, :, 1], d[None, :, 2]
    a = dx * dx + dz * dz
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - r * r
    disc = b * b - 4.0 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2.0 * a)
        y = o[1] + t_side * dy
        side_ok = (disc >= 0) & (t_side > _EPS) & (y >= 0.0) & (y <= h)
        t_cap = (h - o[1]) / dy
        px, pz = ox + t_cap * dx, oz + t_cap * dz
        cap_ok = (t_cap > _EPS) & (px * px + pz * pz <= r * r)
    t_side = np.where(side_ok, t_side, np.inf)
    t_cap = np.where(cap_ok, t_cap, np.inf)
    return np.minimum(t_side, t_cap), (t_cap < t_side).astype(np.int64)


def _hit_plane(o: np.ndarray, d: np.ndarray, axis: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter and hit point for the plane ``p[axis] = value`` (inf/garbage on a miss)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - o[axis]) / d[:, axis]
    t = np.where(t > _EPS, t, np.inf)
    return t, o[None] + np.where(np.isfinite(t), t, 0.0)[:, None] * d


class _ZBuffer:
    """Nearest hit so far per pixel: ray parameter, owner (primitive) and surface id."""

    def __init__(self, n: int) -> None:
        self.t = np.full(n, np.inf)
        self.owner = np.full(n, -1, dtype=np.int64)
        self.sid = np.full(n, -1, dtype=np.int64)

    def add(self, t: np.ndarray, owner: int, face: np.ndarray | int = 0) -> None:
        closer = t < self.t
        self.t[closer] = t[closer]
        self.owner[closer] = owner
        self.sid[closer] = owner * _FACES + (face[closer] if isinstance(face, np.ndarray) else face)


# --------------------------------------------------------------------------------------------
# Shading


def _pattern(mat: Material, uv: np.ndarray) -> np.ndarray:
    """Pattern value in [0, 1] at surface coordinates ``uv`` (M, 2) in metres."""
    if mat.pattern == PLAIN:
        return np.zeros(len(uv))
    c, s = math.cos(mat.angle), math.sin(mat.angle)
    u = (uv[:, 0] * c - uv[:, 1] * s) * mat.scale
    v = (uv[:, 0] * s + uv[:, 1] * c) * mat.scale
    if mat.pattern == CHECKER:
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    if mat.pattern == STRIPES:
        return (np.floor(u) % 2).astype(np.float64)
    # Value noise: bilinear interpolation of a periodic random grid.
    g = mat.noise
    assert g is not None
    n = g.shape[0]
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    i0, j0 = u0.astype(np.int64) % n, v0.astype(np.int64) % n
    i1, j1 = (i0 + 1) % n, (j0 + 1) % n
    top = g[i0, j0] * (1 - fu) + g[i1, j0] * fu
    bot = g[i0, j1] * (1 - fu) + g[i1, j1] * fu
    return top * (1 - fv) + bot * fv


def _surface_geometry(
    spec: SceneSpec, owner: int, face: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """World normal (M, 3) and texture coordinates (M, 2) of hit points ``p`` (M, 3) on ``owner``."""
    m = len(p)
    n = np.zeros((m, 3))
    if owner in (_OWNER_FLOOR, _OWNER_RUG):
        n[:, 1] = 1.0
        return n, p[:, [0, 2]]
    if owner in (_OWNER_BACK, _OWNER_PICTURE):
        n[:, 2] = -1.0
        return n, p[:, [0, 1]]
    if owner in (_OWNER_LEFT, _OWNER_RIGHT):
        n[:, 0] = 1.0 if owner == _OWNER_LEFT else -1.0
        return n, p[:, [2, 1]]
    k = owner - _FIRST_OBJECT
    nb, ns = len(spec.boxes), len(spec.spheres)
    if k < nb:
        bx = spec.boxes[k]
        rot = _ry(np.array([bx[5]]))[0]
        pl = (p - np.array([bx[0], bx[3], bx[1]])) @ rot  # world -> local: R^T (p - c)
        axis = face // 2
        sign = np.where(face % 2 == 1, -1.0, 1.0)  # entered while moving +axis => normal -axis
        nl = np.zeros((m, 3))
        nl[np.arange(m), axis] = sign
        # The two local coordinates spanning the face; (axis+1, axis+2) mod 3 keeps them in-plane.
        uv = np.stack([pl[np.arange(m), (axis + 1) % 3], pl[np.arange(m), (axis + 2) % 3]], 1)
        return nl @ rot.T, uv
    k -= nb
    if k < ns:
        sp = spec.spheres[k]
        n = (p - sp[:3]) / sp[3]
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        # Arc-length coordinates so the texture keeps its size in metres.
        uv = np.stack([np.arctan2(n[:, 2], n[:, 0]) * sp[3], np.arcsin(np.clip(n[:, 1], -1, 1)) * sp[3]], 1)
        return n, uv
    cy = spec.cylinders[k - ns]
    rx, rz = p[:, 0] - cy[0], p[:, 2] - cy[1]
    side = face == 0
    n[side, 0], n[side, 2] = rx[side] / cy[2], rz[side] / cy[2]
    n[side] /= np.linalg.norm(n[side], axis=1, keepdims=True)
    n[~side, 1] = 1.0
    uv = np.where(side[:, None], np.stack([np.arctan2(rz, rx) * cy[2], p[:, 1]], 1), np.stack([rx, rz], 1))
    return n, uv


def _edges(sid: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """One-pixel boundaries between different surface ids, drawn on the nearer side."""
    z = np.where(sid >= 0, depth, np.inf)
    edge = np.zeros(sid.shape, dtype=bool)
    for a, b, za, zb, ea, eb in (
        (sid[:, :-1], sid[:, 1:], z[:, :-1], z[:, 1:], edge[:, :-1], edge[:, 1:]),
        (sid[:-1], sid[1:], z[:-1], z[1:], edge[:-1], edge[1:]),
    ):
        diff = a != b
        a_near = za <= zb
        ea |= diff & a_near  # views into ``edge``: updated in place
        eb |= diff & ~a_near
    return edge


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise ConfigError(f"size must be an int or (height, width), got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h < 2 or w < 2:
        raise ConfigError(f"image size must be at least 2x2, got {h}x{w}")
    return h, w


def render_scene(spec: SceneSpec, size: int | Sequence[int] = (64, 64)) -> SceneSample:
    """Render ``spec`` at ``size`` = (height, width) (or an int for square images)."""
    h, w = _size(size)
    fx, fy, cx, cy = spec.intrinsics(h, w)
    rot = spec.rotation()
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    d_cam = np.stack([(jj - cx) / fx, (ii - cy) / fy, np.ones_like(jj)], -1).reshape(-1, 3)
    d = d_cam @ rot.T
    o = np.asarray(spec.camera_position, dtype=np.float64)
    x_min, x_max, z_max, wall_h = spec.room

    zb = _ZBuffer(h * w)
    t, p = _hit_plane(o, d, 1, 0.0)
    zb.add(np.where((p[:, 0] >= x_min) & (p[:, 0] <= x_max) & (p[:, 2] <= z_max), t, np.inf), _OWNER_FLOOR)
    t, p = _hit_plane(o, d, 2, z_max)
    ok = (p[:, 0] >= x_min) & (p[:, 0] <= x_max) & (p[:, 1] >= 0) & (p[:, 1] <= wall_h)
    zb.add(np.where(ok, t, np.inf), _OWNER_BACK)
    for owner, x in ((_OWNER_LEFT, x_min), (_OWNER_RIGHT, x_max)):
        t, p = _hit_plane(o, d, 0, x)
        zb.add(np.where((p[:, 2] <= z_max) & (p[:, 1] >= 0) & (p[:, 1] <= wall_h), t, np.inf), owner)

    owner = _FIRST_OBJECT
    if len(spec.boxes):
        ts, faces = _hit_boxes(o, d, spec.boxes)
        for k in range(len(ts)):
            zb.add(ts[k], owner + k, faces[k])
        owner += len(ts)
    if len(spec.spheres):
        ts = _hit_spheres(o, d, spec.spheres)
        for k in range(len(ts)):
            zb.add(ts[k], owner + k)
        owner += len(ts)
    if len(spec.cylinders):
        ts, faces = _hit_cylinders(o, d, spec.cylinders)
        for k in range(len(ts)):
            zb.add(ts[k], owner + k, faces[k])

    valid = zb.owner >= 0
    t_hit = np.where(valid, zb.t, 0.0)
    p = o[None] + t_hit[:, None] * d

    # Decals: same geometry as the surface below, different label, surface id and material.
    for rect, base, new, ax in ((spec.rug, _OWNER_FLOOR, _OWNER_RUG, 2), (spec.picture, _OWNER_BACK, _OWNER_PICTURE, 1)):
        if rect is not None:
            inside = (zb.owner == base) & (p[:, 0] >= rect[0]) & (p[:, 0] <= rect[1])
            inside &= (p[:, ax] >= rect[2]) & (p[:, ax] <= rect[3])
            zb.owner[inside] = new
            zb.sid[inside] = new * _FACES

    cls_of_owner = np.array(
        [FLOOR, WALL, WALL, WALL, RUG, PICTURE]
        + [BOX] * len(spec.boxes)
        + [SPHERE] * len(spec.spheres)
        + [CYLINDER] * len(spec.cylinders),
        dtype=np.uint8,
    )
    semseg = np.full(h * w, IGNORE_INDEX, dtype=np.uint8)
    semseg[valid] = cls_of_owner[zb.owner[valid]]

    normals_w = np.zeros((h * w, 3))
    albedo = np.zeros((h * w, 3))
    face = zb.sid % _FACES
    for own in np.unique(zb.owner[valid]):
        m = zb.owner == own
        n_o, uv = _surface_geometry(spec, int(own), face[m], p[m])
        normals_w[m] = n_o
        mat = spec.materials[own]
        pat = _pattern(mat, uv)[:, None]
        albedo[m] = np.asarray(mat.color_a) * (1.0 - pat) + np.asarray(mat.color_b) * pat

    light = np.asarray(spec.light_dir)
    shade = spec.ambient + (1.0 - spec.ambient) * np.clip(normals_w @ light, 0.0, None)
    rgb = albedo * shade[:, None]
    # The void gets a vertical gradient, like a dim ceiling, rather than a flat colour.
    grad = np.repeat(np.linspace(0.7, 1.0, h), w)
    rgb[~valid] = np.asarray(spec.void_color)[None] * grad[~valid, None]
    noise_rng = np.random.default_rng(spec.noise_seed)
    rgb = rgb * 255.0 + noise_rng.normal(0.0, spec.pixel_noise, size=rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(h, w, 3)

    normals = (normals_w @ rot).astype(np.float32).reshape(h, w, 3)  # world -> camera: R^T n
    depth = t_hit.astype(np.float32).reshape(h, w)
    edge = _edges(zb.sid.reshape(h, w), depth).astype(np.float32)
    return SceneSample(
        image=image,
        semseg=semseg.reshape(h, w),
        depth=depth,
        normals=normals,
        edge=edge,
        intrinsics=(fx, fy, cx, cy),
    )


def generate_scene(seed: int, index: int = 0, size: int | Sequence[int] = (64, 64)) -> SceneSample:
    """Scene number ``index`` of the family ``seed``. Each (seed, index) pair has its own random
    stream, so a scene does not depend on which others are generated, nor on worker count."""
    return render_scene(sample_scene(np.random.default_rng([int(seed), int(index)])), size)


# --------------------------------------------------------------------------------------------
# NYUD layout


_SUBDIRS = ("images", "segmentation", "depth", "normals", "edge", "gt_sets")


def _write_one(args: tuple[str, str, int, int, tuple[int, int]]) -> None:
    root, sample_id, seed, index, size = args
    s = generate_scene(seed, index, size)
    r = Path(root)
    # 4:4:4 chroma: the default 4:2:0 subsampling smears the small, saturated textures of 64×64
    # scenes (mean error ~8 grey levels instead of ~2).
    Image.fromarray(s.image).save(r / "images" / f"{sample_id}.jpg", quality=95, subsampling=0)
    Image.fromarray(s.semseg).save(r / "segmentation" / f"{sample_id}.png")
    np.save(r / "depth" / f"{sample_id}.npy", s.depth)
    np.save(r / "normals" / f"{sample_id}.npy", s.normals)
    np.save(r / "edge" / f"{sample_id}.npy", s.edge)


def write_nyud_layout(
    root: str | os.PathLike[str],
    n_train: int,
    n_val: int,
    size: int | Sequence[int] = (64, 64),
    seed: int = 0,
    workers: int = 2,
    *,
    start_method: str | None = None,
) -> Path:
    """Render ``n_train + n_val`` scenes into ``root`` in the NYUD multi-task layout.

    Files: ``images/<id>.jpg`` (RGB, JPEG quality 95, 4:4:4), ``segmentation/<id>.png`` (uint8, 255 =
    void), ``depth/<id>.npy`` (float32 H×W, metres, 0 = invalid), ``normals/<id>.npy`` (float32
    H×W×3, camera frame), ``edge/<id>.npy`` (float32 H×W in {0, 1}), ``gt_sets/train.txt`` and
    ``gt_sets/val.txt`` (one id per line) and ``classes.json`` (class names, ignore index, and
    ``"zero_is_void": false``: unlike the real NYUD PNGs, label 0 here is a class, "floor").

    Ids are ``"%06d"`` of the scene index; training scenes are 0..n_train-1 and validation scenes
    follow, scene ``i`` being :func:`generate_scene(seed, i, size) <generate_scene>`, so the output
    is identical for any ``workers``. ``workers > 1`` renders in a process pool; ``start_method``
    defaults to ``"fork"`` on Linux (the children only run numpy/PIL, so inheriting the parent's
    state is safe, and it avoids re-importing torch, which ``import ftn`` pulls in, in every
    worker) and to ``"spawn"`` elsewhere.
    """
    if n_train < 0 or n_val < 0:
        raise ConfigError(f"n_train and n_val must be >= 0, got {n_train}, {n_val}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    hw = _size(size)
    r = Path(root)
    for sub in _SUBDIRS:
        (r / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n_train + n_val)]
    jobs = [(str(r), sid, int(seed), i, hw) for i, sid in enumerate(ids)]
    if workers == 1 or len(jobs) < 2 * workers:
        for job in jobs:
            _write_one(job)
    else:
        if start_method is None:
            start_method = "fork" if sys.platform.startswith("linux") else "spawn"
        if start_method not in mp.get_all_start_methods():
            raise ConfigError(f"start_method {start_method!r} is not available here: {mp.get_all_start_methods()}")
        with mp.get_context(start_method).Pool(workers) as pool:
            # Chunks amortise the IPC; the order of completion does not matter (files are named).
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))):
                pass
    (r / "gt_sets" / "train.txt").write_text("".join(f"{s}\n" for s in ids[:n_train]))
    (r / "gt_sets" / "val.txt").write_text("".join(f"{s}\n" for s in ids[n_train:]))
    meta = {
        "classes": list(CLASS_NAMES),
        "ignore_index": IGNORE_INDEX,
        "zero_is_void": False,
        "generator": "ftn.settings.dense.scenes",
        "seed": int(seed),
        "size": list(hw),
        "normals_frame": "camera, OpenCV axes (x right, y down, z forward), facing the camera",
        "depth": "z-depth in metres, 0 = invalid",
    }
    (r / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return r
