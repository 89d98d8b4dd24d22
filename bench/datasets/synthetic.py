"""The embedded ``synthetic`` dataset: street scenes generated from a seed.

Every image is a 128x128 RGB street seen along its axis (one-point perspective):
sky, building facades on both sides (or a hedge), road and sidewalks on the ground
plane, and small objects standing on it (cars, trucks, persons, poles with signs,
trees). ``generate_sample(seed)`` draws one scene from ``np.random.default_rng(seed)``
and nothing else, so a seed always gives the same arrays.

What the classes ask of a model
-------------------------------
Easy, large (about three quarters of all pixels): ``sky``, ``building``, ``road``.
Their colour is jittered per image, but colour, position and texture (windows,
smooth gradient, asphalt) decide them from a patch or two.

Small or thin: ``pole`` (1-3 px wide), ``person`` (8-25 px tall), ``sign``,
``vegetation`` (trees with ragged outlines) and every object boundary.

Classes that need context (deliberately undecidable from one 8x8 patch):

* ``car`` vs ``truck``: drawn by one function with the same colour distribution and
  the same parts at the same *relative* positions (bumper, plate, tail lights, rear
  window, wheels). They differ only in shape and size: a truck is taller than wide
  (height/width 1.05-1.3, world width 0.45-0.55) and a car is wider than tall
  (0.68-0.85, world width 0.30-0.38). Because of perspective, a near car and a far
  truck have similar pixel sizes, so a patch inside the body is classified only by
  relating the object's extent (both height and width) to where it stands.
* ``sidewalk`` vs ``road``: one base colour per image (sidewalk gets a small random
  offset of either sign, so brightness does not decide either). The sidewalk carries
  a tile grid of faint grooves whose period is 12-20 px near the camera, larger than a
  patch, so many sidewalk patches contain no groove at all; the class follows from the
  grid in neighbouring patches, from the curb line, and from the side of the road.
* ``sign`` vs ``building``: posters on facades are drawn by the same function as
  signs (same shapes, sizes and colours) but labelled ``building``. A sign is a plate
  on top of a pole; seen against a facade, a patch of it is told apart from a poster
  only by following the plate down to the pole under it (two hops of context).

The ignore index 255 marks "void" clutter (bins, boxes) on the sidewalk, under 1% of
pixels. Mild lighting (gain, colour cast, horizontal gradient, cast shadows on the
ground, optional blur) and Gaussian noise keep it from being pixel-perfect.

``SyntheticDataset(split, root)`` generates a split once and caches it as one
compressed ``.npz`` under ``root/synthetic-v1/``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.fileio import atomic_write

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "IMAGE_SIZE",
    "VERSION",
    "SPLITS",
    "generate_sample",
    "split_seed",
    "colorize",
    "SyntheticDataset",
]

CLASSES: list[str] = [
    "road",
    "sidewalk",
    "building",
    "pole",
    "sign",
    "vegetation",
    "sky",
    "person",
    "car",
    "truck",
]
# Cityscapes colours for the same classes.
PALETTE: list[tuple[int, int, int]] = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (153, 153, 153),
    (220, 220, 0),
    (107, 142, 35),
    (70, 130, 180),
    (220, 20, 60),
    (0, 0, 142),
    (0, 0, 70),
]
IGNORE_INDEX = 255
IMAGE_SIZE = 128
VERSION = "synthetic-v1"  # bump when generation changes: it names the cache folder

# split -> (first seed, default number of images). Seeds are offset + index.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 2000),
    "val": (10_000_000, 200),
    "test": (20_000_000, 200),
}

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR, TRUCK = range(10)

_H = _W = IMAGE_SIZE
_F = 75.0  # focal length in px; camera height is the world unit
_YY, _XX = np.mgrid[0:_H, 0:_W].astype(np.float32) + 0.5  # pixel centres


def split_seed(split: str, index: int) -> int:
    """Seed of image ``index`` of ``split``: the split's offset plus the index."""
    return SPLITS[split][0] + int(index)


# --------------------------------------------------------------------------- drawing
class _Canvas:
    """Float RGB image, channel-first (3, H, W), plus a label map, painted back to front.

    Colours are (3,) constants or channel-first fields (3, h, w); masks are (h, w).
    Per-channel 2-D masked copies are several times faster than 3-D boolean indexing.
    """

    def __init__(self) -> None:
        self.rgb = np.zeros((3, _H, _W), np.float32)
        self.lab = np.full((_H, _W), IGNORE_INDEX, np.uint8)

    def paint(self, mask: np.ndarray, colour, cls: int, box=None) -> None:
        """Paint ``colour`` and label ``cls`` where ``mask``; ``mask`` covers the whole
        image, or only the window ``box`` = (y0, y1, x0, x1) when given."""
        rgb, lab = self.rgb, self.lab
        if box is not None:
            y0, y1, x0, x1 = box
            rgb, lab = rgb[:, y0:y1, x0:x1], lab[y0:y1, x0:x1]
        for c in range(3):
            np.copyto(rgb[c], colour[c], where=mask)
        np.copyto(lab, np.uint8(cls), where=mask)

    def darken(self, mask: np.ndarray, factor: float, box=None) -> None:
        """Scale the colour where ``mask`` (shadows); labels are kept."""
        rgb = self.rgb
        if box is not None:
            y0, y1, x0, x1 = box
            rgb = rgb[:, y0:y1, x0:x1]
        for c in range(3):
            np.multiply(rgb[c], np.float32(factor), out=rgb[c], where=mask)


def _box(cx: float, cy: float, half_w: float, half_h: float):
    """Clipped integer window around a centre, with its pixel-centre grids (or None)."""
    y0, y1 = max(int(cy - half_h) - 1, 0), min(int(cy + half_h) + 2, _H)
    x0, x1 = max(int(cx - half_w) - 1, 0), min(int(cx + half_w) + 2, _W)
    if y0 >= y1 or x0 >= x1:
        return None
    return (y0, y1, x0, x1), _YY[y0:y1, x0:x1], _XX[y0:y1, x0:x1]


def _frac(x: np.ndarray) -> np.ndarray:
    """x mod 1 (np.mod on floats is much slower)."""
    return x - np.floor(x)


def _field(colour: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Channel-first colour field: a (3,) colour times an (h, w) shading."""
    return colour[:, None, None] * scale[None]


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Roughly unit-variance noise on a (cells+1)^2 grid, bilinearly upsampled to H x W."""
    grid = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0.0, cells, _H, endpoint=False, dtype=np.float32)
    i = t.astype(np.int64)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (H, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    c = np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)
    return np.minimum(np.maximum(c, 0.0), 255.0)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] to RGB in [0, 255]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b], np.float32) * 255.0


def _building_colour(rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # concrete grey
        return _jitter(rng, [rng.uniform(90, 190)] * 3, 10)
    if kind == 1:  # beige / sand
        return _jitter(rng, (190, 170, 130), 30)
    if kind == 2:  # brick
        return _jitter(rng, (150, 80, 60), 30)
    return _hsv(rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.45, 0.85))  # painted


def _vehicle_colour(rng: np.random.Generator) -> np.ndarray:
    """One distribution for cars and trucks alike."""
    if rng.random() < 0.45:  # white / grey / black
        return _jitter(rng, [rng.uniform(25, 235)] * 3, 12)
    return _hsv(rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.3, 0.9))


def _plate_colour(rng: np.random.Generator) -> np.ndarray:
    """One distribution for traffic signs and facade posters alike."""
    base = [(200, 30, 30), (30, 70, 180), (230, 200, 40), (235, 235, 235),
            (30, 140, 60), (240, 130, 30)][rng.integers(6)]
    return _jitter(rng, base, 30)


def _draw_plate(cv: _Canvas, rng, cx: float, cy: float, size: float, cls: int) -> None:
    """A sign face or a poster: rectangle, disc, diamond or triangle, maybe bordered."""
    hw = size / 2.0
    hh = hw * (rng.uniform(0.6, 1.0) if rng.random() < 0.5 else 1.0)
    shape = rng.integers(4)
    face = _plate_colour(rng)
    border = _plate_colour(rng) if rng.random() < 0.5 else None
    b = _box(cx, cy, hw, hh)
    if b is None:
        return
    box, yy, xx = b
    du, dv = (xx - cx) / hw, (yy - cy) / hh
    if shape == 0:
        r = np.maximum(np.abs(du), np.abs(dv))
    elif shape == 1:
        r = np.sqrt(du * du + dv * dv)
    elif shape == 2:
        r = np.abs(du) + np.abs(dv)
    else:  # triangle pointing up
        r = np.maximum(dv, (np.abs(du) * 1.7 - dv) / 1.3 + 0.25)
    if border is not None:
        cv.paint(r <= 1.0, border, cls, box)
        cv.paint(r <= 0.7, face, cls, box)
    else:
        cv.paint(r <= 1.0, face, cls, box)


def _draw_vehicle(cv: _Canvas, rng, cx: float, base: float, w: float, h: float,
                  cls: int) -> None:
    """Rear view of a car or a truck: the same parts at the same relative positions."""
    body_c = _vehicle_colour(rng)
    tyre = _jitter(rng, (28, 28, 30), 8)
    glass = _jitter(rng, (45, 55, 70), 15)
    light = _jitter(rng, (200, 30, 25), 20)
    plate = _jitter(rng, (225, 225, 215), 15)
    b = _box(cx, base - h / 2.0, w / 2.0, h / 2.0)
    if b is None:
        return
    box, yy, xx = b
    au = np.abs(xx - cx) / w  # 0 (centre) .. 0.5 (side)
    v = (base - yy) / h  # 0 (ground) .. 1 (roof)
    r = 0.14  # rounded roof corners, relative
    corner = (v > 1 - r) & (au > 0.5 - r) & (
        ((au - (0.5 - r)) / r) ** 2 + ((v - (1 - r)) / r) ** 2 > 1.0)
    body = (au <= 0.5) & (v >= 0.08) & (v <= 1.0) & ~corner
    cv.paint((v >= 0.0) & (v < 0.1) & (au >= 0.28) & (au <= 0.46), tyre, cls, box)
    cv.paint(body, _field(body_c, 1.0 - 0.12 * np.clip((v - 0.6) / 0.4, 0, 1)), cls, box)
    cv.paint(body & (v < 0.17), body_c * 0.45, cls, box)  # bumper
    cv.paint((v >= 0.66) & (v <= 0.9) & (au <= 0.4), _field(glass, 1.0 + 0.5 * (v - 0.66)),
             cls, box)  # rear window
    cv.paint((v >= 0.38) & (v <= 0.5) & (au >= 0.35) & (au <= 0.46), light, cls, box)
    cv.paint((v >= 0.2) & (v <= 0.3) & (au <= 0.1), plate, cls, box)


def _draw_person(cv: _Canvas, rng, cx: float, base: float, h: float) -> None:
    stride = rng.uniform(0.0, 0.05)
    skin = _jitter(rng, [(235, 200, 170), (190, 140, 100), (120, 80, 55)][rng.integers(3)], 15)
    trousers = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.1, 0.6))
    shirt = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
    hair = _jitter(rng, (50, 35, 25), 20)
    b = _box(cx, base - h / 2.0, h * 0.25, h / 2.0)
    if b is None:
        return
    box, yy, xx = b
    u = (xx - cx) / h
    v = (base - yy) / h
    spread = 0.055 + stride * (0.46 - v)
    legs = (v >= 0) & (v <= 0.46) & (
        (np.abs(u - spread) <= 0.05) | (np.abs(u + spread) <= 0.05))
    torso = (v > 0.42) & (v <= 0.8) & (np.abs(u) <= 0.12 + 0.04 * (v - 0.42))
    arms = (v > 0.5) & (v <= 0.78) & (np.abs(u) > 0.12) & (np.abs(u) <= 0.17)
    head = (u * u + (v - 0.89) ** 2) <= 0.095 ** 2
    cv.paint(legs, trousers, PERSON, box)
    cv.paint(torso | arms, shirt, PERSON, box)
    cv.paint(head, skin, PERSON, box)
    cv.paint(head & (v > 0.91), hair, PERSON, box)


def _draw_tree(cv: _Canvas, rng, cx: float, base: float, s: float, green: np.ndarray,
               leaf: np.ndarray) -> None:
    trunk_h = rng.uniform(0.3, 0.55) * s
    trunk_w = max(rng.uniform(0.04, 0.07) * s, 1.2)
    radius = rng.uniform(0.2, 0.38) * s
    bark = _jitter(rng, (85, 65, 45), 15)
    k1, k2 = rng.integers(3, 7), rng.integers(7, 13)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    cy = base - trunk_h - radius * 0.7
    b = _box(cx, cy + trunk_h / 2, radius * 1.3, radius * 1.3 + trunk_h / 2)
    if b is None:
        return
    box, yy, xx = b
    cv.paint((np.abs(xx - cx) <= trunk_w / 2) & (yy <= base) & (yy >= cy), bark, VEGETATION, box)
    ang = np.arctan2(yy - cy, xx - cx)
    ragged = 1.0 + 0.12 * np.sin(k1 * ang + p1) + 0.07 * np.sin(k2 * ang + p2)
    canopy = (xx - cx) ** 2 + ((yy - cy) / 0.9) ** 2 <= (radius * ragged) ** 2
    y0, y1, x0, x1 = box
    cv.paint(canopy, _field(green, leaf[y0:y1, x0:x1]), VEGETATION, box)


def _shadow(cv: _Canvas, cx: float, base: float, w: float) -> None:
    """Dark patch on the ground under a vehicle (keeps the ground's label)."""
    half_h = max(w * 0.05, 1.0)
    b = _box(cx, base, w * 0.6, half_h)
    if b is not None:
        box, yy, xx = b
        cv.darken((np.abs(xx - cx) <= w * 0.55) & (np.abs(yy - base) <= half_h), 0.55, box)


def _on_ground(rng: np.random.Generator, where: str, a_l, a_r, b_l, b_r) -> float:
    """World lateral position: on the road, or on a random sidewalk (margins in world units)."""
    if where == "road":
        return rng.uniform(-a_l + 0.15, a_r - 0.15)
    side, a, b = (-1, a_l, b_l) if rng.random() < 0.5 else (1, a_r, b_r)
    if where == "curb":
        return side * (a + rng.uniform(0.05, 0.2))
    return side * rng.uniform(a + 0.1, b - 0.08)


# ---------------------------------------------------------------------------- scene
def generate_sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: ``(image uint8 (128, 128, 3), label uint8 (128, 128))``.

    Deterministic: the only randomness is ``np.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    cv = _Canvas()
    yy, xx = _YY, _XX

    # --- camera and street (world unit = camera height; focal length _F px)
    y_h = rng.uniform(40.0, 58.0)  # horizon row
    x_v = rng.uniform(40.0, 88.0)  # vanishing point column
    a_l, a_r = rng.uniform(0.55, 1.0, 2)  # road edges: world X = -a_l, +a_r
    b_l, b_r = a_l + rng.uniform(0.3, 0.75), a_r + rng.uniform(0.3, 0.75)  # facades
    z_end = rng.uniform(9.0, 16.0) if rng.random() < 0.75 else np.inf  # far building

    # --- sky: vertical gradient, maybe clouds
    if rng.random() < 0.7:
        top = _hsv(rng.uniform(0.55, 0.64), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.95))
    else:  # overcast
        top = _jitter(rng, [rng.uniform(150, 215)] * 3, 10)
    bottom = np.minimum(top * rng.uniform(1.05, 1.25) + 15, 255)
    t = np.clip(yy / y_h, 0, 1)[None]
    sky = top[:, None, None] * (1 - t) + bottom[:, None, None] * t
    if rng.random() < 0.5:
        cloud = 0.6 * np.clip(_smooth_noise(rng, 6) - 0.3, 0, 1)[None]
        sky = sky * (1 - cloud) + 235.0 * cloud
    cv.rgb[:] = sky
    cv.lab[:] = SKY

    # --- ground plane: road and sidewalks share one base colour
    ground = yy > y_h
    dy = np.maximum(yy - y_h, 1e-3)  # px below the horizon = px per world unit there
    lat = (xx - x_v) / dy  # world X
    depth = _F / dy  # world Z
    road_c = _jitter(rng, [rng.uniform(70, 150)] * 3, 8)
    walk_c = road_c * np.float32(1 + rng.choice([-1, 1]) * rng.uniform(0.0, 0.07))
    road = ground & (lat >= -a_l) & (lat <= a_r)
    walk = ground & ~road & (lat >= -b_l) & (lat <= b_r)
    cv.paint(road, road_c, ROAD)
    # tile grooves, world period `tile`: in the image tile*dy px across, tile*dy^2/F along
    tile = rng.uniform(12.0, 20.0) / _F
    across, along = tile * dy, tile * dy * dy / _F
    gx = np.abs(_frac(lat / tile + 0.5) - 0.5) * across  # px to the nearest groove
    gz = np.abs(_frac(depth / tile + 0.5) - 0.5) * along
    groove = np.maximum(np.clip(1.0 - gx, 0, 1) * np.clip((across - 3.0) / 3.0, 0, 1),
                        np.clip(1.0 - gz, 0, 1) * np.clip((along - 3.0) / 3.0, 0, 1))
    contrast = rng.uniform(10.0, 22.0)
    cv.paint(walk, walk_c[:, None, None] - contrast * groove[None], SIDEWALK)
    curb_w = rng.uniform(0.04, 0.08)
    curb = walk & (((lat >= -a_l - curb_w) & (lat < -a_l)) | ((lat > a_r) & (lat <= a_r + curb_w)))
    cv.paint(curb, np.minimum(walk_c * 1.25 + 20, 255), SIDEWALK)
    # lane markings (road): dashed centre line, sometimes solid edge lines
    marking = _jitter(rng, (230, 225, 210) if rng.random() < 0.7 else (225, 190, 60), 15)
    centre = (a_r - a_l) / 2.0 + rng.uniform(-0.15, 0.15)
    dash = _frac(depth / rng.uniform(0.8, 1.4)) < 0.5
    cv.paint(road & (np.abs(lat - centre) < 0.035) & dash, marking, ROAD)
    if rng.random() < 0.5:
        edge = road & ((np.abs(lat + a_l - 0.08) < 0.02) | (np.abs(lat - a_r + 0.08) < 0.02))
        cv.paint(edge, marking, ROAD)

    # --- each side: building facades (or a hedge); a far building closes the street
    leaf = 1.0 + 0.15 * _smooth_noise(rng, 24) + 0.12 * _smooth_noise(rng, 60)
    green = _hsv(rng.uniform(0.2, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6))
    facades = []  # (facade mask, world X of the facade, side)
    for side, b_side in ((-1, b_l), (1, b_r)):
        off = np.maximum(side * (xx - x_v), 1e-3)  # px from the vanishing point
        on_side = off > 0.5
        z = _F * b_side / off  # depth of the facade plane seen at this column
        height = 1.0 - (yy - y_h) * b_side / off  # world height on the facade
        visible = on_side & (z < z_end) & (height >= 0)
        if rng.random() < 0.18:  # open side: a hedge
            top_h = rng.uniform(0.5, 1.2) + 0.25 * np.sin(z * rng.uniform(1.0, 3.0))
            cv.paint(visible & (height <= top_h), _field(green, leaf), VEGETATION)
            continue
        # blocks along the street, each with its height, colour and window grid
        n = int(rng.integers(2, 6))
        bounds = np.sort(rng.uniform(1.0, min(z_end, 30.0), n - 1))
        block = np.zeros(z.shape, np.intp)
        for bound in bounds:
            block += z > bound
        hb = rng.uniform(1.6, 5.0, n).astype(np.float32)
        wall = np.stack([_building_colour(rng) for _ in range(n)], 1)  # (3, n)
        glass = np.stack([_jitter(rng, (60, 70, 85) if rng.random() < 0.7 else (200, 180, 120), 20)
                          for _ in range(n)], 1)
        tz, th, phase = rng.uniform((0.5, 0.6, 0.0), (1.2, 1.0, 1.0), (n, 3)).astype(np.float32).T
        hb_px, tz_px = hb[block], tz[block]
        mask = visible & (height <= hb_px)
        cv.paint(mask, [np.take(wall[c], block) for c in range(3)], BUILDING)
        col = _frac(z / tz_px + phase[block])
        row = _frac(height / th[block])
        win = mask & (col > 0.3) & (col < 0.7) & (row > 0.35) & (row < 0.75) & (height > 1.0) \
            & (height < hb_px - 0.3) & (_F * b_side * tz_px / (z * z) > 2.5)  # no aliasing
        cv.paint(win, [np.take(glass[c], block) for c in range(3)], BUILDING)
        facades.append((mask, b_side, side))
    if np.isfinite(z_end):
        s_end = _F / z_end
        hf = rng.uniform(1.5, 6.0)
        far = (xx >= x_v - b_l * s_end) & (xx <= x_v + b_r * s_end) \
            & (yy <= y_h + s_end) & (yy >= y_h - (hf - 1.0) * s_end)
        cv.paint(far, _building_colour(rng), BUILDING)
        wp = rng.uniform(3.0, 5.0)
        win = far & (_frac(xx / wp) < 0.45) & (_frac(yy / wp) < 0.5) & (yy < y_h)
        cv.paint(win, _jitter(rng, (60, 70, 85), 20), BUILDING)

    # --- posters: drawn like signs, labelled building
    for mask, b_side, side in facades:
        for _ in range(rng.integers(0, 4)):
            z, hgt, rel = rng.uniform((1.3, 0.5, 0.2), (6.0, 1.6, 0.3))
            s = _F / z
            cx, cy, size = x_v + side * b_side * s, y_h + (1.0 - hgt) * s, rel * s
            corners = [(int(cy + dv), int(cx + du)) for dv in (-size / 2, size / 2)
                       for du in (-size / 2, size / 2)]
            if size >= 7 and all(0 <= iy < _H and 0 <= ix < _W and mask[iy, ix]
                                 for iy, ix in corners):
                _draw_plate(cv, rng, cx, cy, size, BUILDING)

    # --- objects standing on the ground, drawn far to near: (depth, kind, world X)
    ground_args = (a_l, a_r, b_l, b_r)
    objects = []
    for _ in range(rng.integers(1, 6)):
        objects.append((rng.uniform(1.0, 2.3), "vehicle", _on_ground(rng, "road", *ground_args)))
    for _ in range(rng.integers(1, 5)):
        objects.append((rng.uniform(1.0, 2.5), "pole", _on_ground(rng, "curb", *ground_args)))
    for _ in range(rng.integers(1, 7)):
        where = "road" if rng.random() < 0.15 else "sidewalk"  # some cross the road
        objects.append((rng.uniform(1.0, 2.2), "person", _on_ground(rng, where, *ground_args)))
    for _ in range(rng.integers(0, 3)):
        objects.append((rng.uniform(1.1, 4.0), "tree", _on_ground(rng, "sidewalk", *ground_args)))
    if rng.random() < 0.35:
        objects.append((rng.uniform(1.0, 3.0), "void", _on_ground(rng, "sidewalk", *ground_args)))
    objects.sort(key=lambda o: -o[0])

    for z, kind, lat0 in objects:
        s = _F / z  # px per world unit at this depth
        base, cx = y_h + s, x_v + lat0 * s
        if kind == "vehicle":
            truck = rng.random() < 0.35
            if truck:  # taller than wide, and wider in the world
                w = rng.uniform(0.45, 0.55) * s
                h = w * rng.uniform(1.05, 1.3)
            else:
                w = rng.uniform(0.30, 0.38) * s
                h = w * rng.uniform(0.68, 0.85)
            _shadow(cv, cx, base, w)
            _draw_vehicle(cv, rng, cx, base, w, h, TRUCK if truck else CAR)
        elif kind == "pole":
            ph = rng.uniform(0.8, 1.25) * s
            pw = max(rng.uniform(0.06, 0.09) * s, 3.0)
            metal = _jitter(rng, [rng.uniform(60, 170)] * 3, 12)
            b = _box(cx, base - ph / 2, pw, ph / 2)
            if b is not None:  # a shaded cylinder
                box, ly, lx = b
                across = np.abs(lx - cx) / (pw / 2)
                cv.paint((across <= 1.0) & (ly <= base) & (ly >= base - ph),
                         _field(metal, 1.25 - 0.5 * across), POLE, box)
            if rng.random() < 0.7:
                size = max(rng.uniform(0.2, 0.3) * s, 7.0)
                _draw_plate(cv, rng, cx + rng.uniform(-0.3, 0.3) * size,
                            base - ph + size * 0.35, size, SIGN)
        elif kind == "person":
            _draw_person(cv, rng, cx, base, rng.uniform(0.36, 0.46) * s)
        elif kind == "tree":
            _draw_tree(cv, rng, cx, base, s, green, leaf)
        else:  # void clutter (a bin, a box): label ignored
            w, h = rng.uniform(0.08, 0.14) * s, rng.uniform(0.1, 0.18) * s
            clutter = _jitter(rng, (90, 90, 80), 40)
            b = _box(cx, base - h / 2, w / 2, h / 2)
            if b is not None:
                box, ly, lx = b
                cv.paint((np.abs(lx - cx) <= w / 2) & (ly <= base) & (ly >= base - h),
                         clutter, IGNORE_INDEX, box)

    # --- surface grain, cast shadow, gain and colour cast, gradient, blur, sensor noise
    rough = (cv.lab <= BUILDING).astype(np.float32)  # road, sidewalk, building
    rgb = cv.rgb + rng.standard_normal((_H, _W), dtype=np.float32) * (4.0 * rough)
    if rng.random() < 0.5:  # a building's shadow across the ground
        k, x0 = rng.uniform(-0.15, 0.15), rng.uniform(-a_l, a_r)
        sign = rng.choice([-1.0, 1.0])
        shadow = (cv.lab <= SIDEWALK) & (sign * (lat - x0 - k * depth) > 0)
        rgb *= np.where(shadow, np.float32(rng.uniform(0.6, 0.8)), np.float32(1.0))[None]
    gain = rng.uniform(0.75, 1.15) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    grad = 1.0 + rng.uniform(-0.2, 0.2) * (xx / _W - 0.5)
    rgb *= gain[:, None, None] * grad[None]
    if rng.random() < 0.5:  # [1 2 1] / 4 blur in both directions
        p = np.pad(rgb, ((0, 0), (1, 1), (1, 1)), mode="edge")
        rgb = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25
        rgb = (rgb[:, :, :-2] + 2 * rgb[:, :, 1:-1] + rgb[:, :, 2:]) * 0.25
    rgb += rng.standard_normal((3, _H, _W), dtype=np.float32) * np.float32(rng.uniform(2.0, 6.0))
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(image), cv.lab


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map (H, W) to an RGB image with ``PALETTE``; ignored pixels are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(PALETTE)] = np.asarray(PALETTE, np.uint8)
    return lut[np.asarray(label, np.uint8)]


# --------------------------------------------------------------------------- dataset
class SyntheticDataset(Dataset):
    """A split of the synthetic street scenes, generated once and cached as ``.npz``.

    ``split``: "train" (2000 images by default), "val" (200) or "test" (200); image
    ``i`` is ``generate_sample(split_seed(split, i))``, so a smaller ``size`` is a
    prefix of a larger one. The cache is ``root/synthetic-v1/<split>.npz`` for the
    default size and ``<split>-<size>.npz`` otherwise, holding ``images`` (N, H, W, 3)
    and ``labels`` (N, H, W), written atomically (temporary file + ``os.replace``).
    Items are ``(image uint8 (3, H, W), label int64 (H, W))``.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, split: str, root: Union[str, os.PathLike],
                 size: Optional[int] = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"synthetic: unknown split {split!r}; expected one of "
                             f"{sorted(SPLITS)}")
        default = SPLITS[split][1]
        size = default if size is None else int(size)
        if size <= 0:
            raise ValueError(f"synthetic: size must be positive, got {size}")
        self.split, self.size = split, size
        self.classes = list(CLASSES)
        self.palette = list(PALETTE)
        self.num_classes = len(CLASSES)
        name = f"{split}.npz" if size == default else f"{split}-{size}.npz"
        self.path = Path(root) / VERSION / name
        self.images, self.labels = self._load_or_generate()

    def _load_or_generate(self) -> tuple[np.ndarray, np.ndarray]:
        if self.path.exists():
            try:
                with np.load(self.path) as z:
                    images, labels = z["images"], z["labels"]
                if images.shape == (self.size, _H, _W, 3) and labels.shape == (
                        self.size, _H, _W) and images.dtype == np.uint8 \
                        and labels.dtype == np.uint8:
                    return images, labels
                reason = f"shapes {images.shape}/{labels.shape} do not match"
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
                reason = f"{type(e).__name__}: {e}"
            warnings.warn(f"synthetic: cache {self.path} unusable ({reason}); regenerating",
                          stacklevel=3)
        images = np.empty((self.size, _H, _W, 3), np.uint8)
        labels = np.empty((self.size, _H, _W), np.uint8)
        for i in range(self.size):
            images[i], labels[i] = generate_sample(split_seed(self.split, i))
        self._save(images, labels)
        return images, labels

    def _save(self, images: np.ndarray, labels: np.ndarray) -> None:
        atomic_write(self.path, lambda f: np.savez_compressed(f, images=images, labels=labels))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))
        label = torch.from_numpy(self.labels[index].astype(np.int64))
        return image, label

    def __repr__(self) -> str:
        return f"SyntheticDataset(split={self.split!r}, size={self.size}, path='{self.path}')"
