"""The pixels of a synthetic scene: background texture, objects, shadows and noise, rendered
block by block (any block in any order gives the same pixels)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from shapely.geometry import box

from retrain_lib.devtools.synthetic_plan import (
    DARK,
    REGIONS,
    SHADOW_DARKEN,
    SUN,
    SUPERSAMPLE,
    TAG_NOISE,
    TAG_TEXTURE,
    Placement,
    SceneSpec,
)

__all__ = ["render_block", "salts"]


def dark_colour() -> tuple[float, ...]:
    """Shadows and markings: RGB, then the NIR value."""
    return (*DARK, 0.05)


def _hash01(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """A uniform value in [0, 1) for each lattice point; a pure function of its inputs."""
    h = (iy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        ix.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(salt)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _value_noise(row0: int, col0: int, h: int, w: int, cell: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1] over global pixel positions, so blocks join seamlessly."""
    gx = (np.arange(col0, col0 + w) + 0.5) / cell
    gy = (np.arange(row0, row0 + h) + 0.5) / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    lat_x = np.arange(ix[0], ix[-1] + 2)
    lat_y = np.arange(iy[0], iy[-1] + 2)
    lattice = _hash01(lat_y[:, None], lat_x[None, :], salt)
    lx = ix - ix[0]
    # Interpolate along columns on the few lattice rows, then along rows.
    rows = lattice[:, lx] * (1 - fx) + lattice[:, lx + 1] * fx
    ly = iy - iy[0]
    noise: np.ndarray = rows[ly] * (1 - fy)[:, None] + rows[ly + 1] * fy[:, None]
    return noise


def salts(seed: int) -> tuple[int, int, int]:
    state = np.random.SeedSequence([seed, TAG_TEXTURE]).generate_state(3, np.uint64)
    return int(state[0]), int(state[1]), int(state[2])


def _background(spec: SceneSpec, row0: int, col0: int, h: int, w: int,
                salts: tuple[int, int, int]) -> np.ndarray:
    region = REGIONS[spec.region]
    coarse = _value_noise(row0, col0, h, w, 160.0, salts[0])
    medium = _value_noise(row0, col0, h, w, 28.0, salts[1])
    fine = _value_noise(row0, col0, h, w, 5.0, salts[2])
    base = np.array([*region.base, region.nir[0]], np.float32)[: spec.bands]
    light = np.array([*region.light, region.nir[1]], np.float32)[: spec.bands]
    patch = np.array([*region.patch, region.nir[2]], np.float32)[: spec.bands]
    img = np.empty((h, w, spec.bands), np.float32)
    img[:] = light - base
    img *= coarse[..., None]
    img += base
    # Soft-edged patches: tree canopy in vegetated land, gravel in arid land.
    blob = np.clip((0.8 * medium + 0.2 * fine - region.patch_threshold) / 0.1, 0, 1)
    img += (patch - img) * blob[..., None]
    img *= (1 + region.fine_amplitude * (fine - 0.5))[..., None]
    return img


def _rect(u: np.ndarray, v: np.ndarray, half_l: float, half_w: float) -> np.ndarray:
    inside: np.ndarray = (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
    return inside


def _shade(p: Placement, u: np.ndarray, v: np.ndarray,
           channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage mask and colour of an object at local coordinates (u along, v across)."""
    length, width = p.length, p.width
    inside = _rect(u, v, length / 2, width / 2)
    body = np.asarray(p.body[:channels], np.float32)
    accent = np.asarray(p.accent[:channels], np.float32)
    dark = np.asarray(dark_colour()[:channels], np.float32)
    colour = np.broadcast_to(body, (*u.shape, channels)).copy()
    mark = np.zeros(u.shape, bool)
    kind = p.kind
    if kind == "outline":
        inside &= ~_rect(u, v, length / 2 - 1.5, width / 2 - 1.5)
    elif kind == "windshield":
        # Bright hood | dark windshield | bright roof | dark rear window: a bold pattern,
        # so a small detector can learn it quickly; uniform "patch" decoys lack it.
        mark = ((u >= 0.08 * length) & (u <= 0.34 * length) & (np.abs(v) <= 0.42 * width)) | (
            (u >= -0.44 * length) & (u <= -0.28 * length) & (np.abs(v) <= 0.40 * width))
    elif kind == "cab":
        # Coloured cab with a windshield, a dark gap, and a trailer with two roof rails.
        colour[u >= 0.28 * length] = accent
        rails = (u <= 0.18 * length) & (u >= -0.46 * length) & (
            np.abs(np.abs(v) - 0.26 * width) <= 0.06 * width + 0.3)
        colour[rails] = body + (dark - body) * 0.55
        mark = (((u >= 0.21 * length) & (u <= 0.28 * length))
                | ((u >= 0.38 * length) & (u <= 0.47 * length) & (np.abs(v) <= 0.42 * width)))
    elif kind == "plus":
        core = _rect(u, v, 0.36 * length, 0.36 * width)
        mark = core & ((np.abs(u) <= 0.8) | (np.abs(v) <= 0.8))
    elif kind == "windows":
        side = (np.abs(v) >= 0.2 * width) & (np.abs(v) <= 0.4 * width)
        panes = (u >= -0.42 * length) & (u <= 0.34 * length) & (np.mod(u, 3.0) < 1.8)
        front = (u >= 0.40 * length) & (u <= 0.47 * length) & (np.abs(v) <= 0.4 * width)
        mark = (side & panes) | front
    elif kind == "ring":
        radius = np.hypot(u, v)
        mark = (radius >= 0.18 * length) & (radius <= 0.31 * length)
    elif kind == "split":
        colour[u > 0] = accent
        mark = np.abs(u) <= 0.7
    elif kind == "dot":
        mark = np.hypot(u, v) <= 0.22 * min(length, width)
    elif kind == "bars":
        step = length / 6
        mark = (np.mod(u + length / 2, step) < 1.4) & (np.abs(u) <= 0.45 * length)
    # "patch" decoys stay uniform: the body without any marking.
    colour[mark] = dark
    return inside, colour


def _downsample(values: np.ndarray, factor: int) -> np.ndarray:
    h, w = values.shape[0] // factor, values.shape[1] // factor
    mean: np.ndarray = values.reshape(h, factor, w, factor, *values.shape[2:]).mean(axis=(1, 3))
    return mean


def _draw(img: np.ndarray, p: Placement, row0: int, col0: int) -> None:
    """Composite one object (anti-aliased by supersampling) onto a block in place."""
    h, w, channels = img.shape
    minx, miny, maxx, maxy = p.footprint()
    x_lo, x_hi = max(col0, math.floor(minx)), min(col0 + w, math.ceil(maxx))
    y_lo, y_hi = max(row0, math.floor(miny)), min(row0 + h, math.ceil(maxy))
    if x_lo >= x_hi or y_lo >= y_hi:
        return
    s = SUPERSAMPLE
    xs = x_lo + (np.arange((x_hi - x_lo) * s, dtype=np.float32) + 0.5) / s
    ys = y_lo + (np.arange((y_hi - y_lo) * s, dtype=np.float32) + 0.5) / s
    dx, dy = xs[None, :] - np.float32(p.cx), ys[:, None] - np.float32(p.cy)
    c, sn = np.float32(math.cos(p.angle)), np.float32(math.sin(p.angle))
    sub = img[y_lo - row0:y_hi - row0, x_lo - col0:x_hi - col0]
    u, v = dx * c + dy * sn, -dx * sn + dy * c
    if p.kind == "shadow":
        cover = _downsample(_rect(u, v, p.length / 2, p.width / 2).astype(np.float32), s)
        sub *= (1 - 0.55 * cover)[..., None]
        return
    if p.casts_shadow:
        su = (dx - SUN[0]) * c + (dy - SUN[1]) * sn
        sv = -(dx - SUN[0]) * sn + (dy - SUN[1]) * c
        cover = _downsample(_rect(su, sv, p.length / 2, p.width / 2).astype(np.float32), s)
        sub *= (1 - SHADOW_DARKEN * cover)[..., None]
    inside, colour = _shade(p, u, v, channels)
    alpha = _downsample(inside.astype(np.float32), s)
    premultiplied = _downsample(colour * inside[..., None], s)
    sub *= (1 - alpha)[..., None]
    sub += premultiplied


def render_block(spec: SceneSpec, placements: Sequence[Placement], tree: Any,
                  salts: tuple[int, int, int], block_size: int, brow: int,
                  bcol: int) -> np.ndarray:
    """One block as a (bands, rows, cols) array of the scene's dtype."""
    row0, col0 = brow * block_size, bcol * block_size
    h = min(block_size, spec.height - row0)
    w = min(block_size, spec.width - col0)
    img = _background(spec, row0, col0, h, w, salts)
    for index in sorted(tree.query(box(col0, row0, col0 + w, row0 + h)).tolist()):
        _draw(img, placements[index], row0, col0)
    rng = np.random.default_rng([spec.seed, TAG_NOISE, brow, bcol])
    # Sensor noise: mostly brightness, a little per channel. In place: blocks stay small.
    noise = rng.standard_normal((h, w, 1), dtype=np.float32)
    noise *= np.float32(0.012)
    img += noise
    noise = rng.standard_normal((h, w, spec.bands), dtype=np.float32)
    noise *= np.float32(0.006)
    img += noise
    del noise
    top = 255 if spec.dtype == "uint8" else 4095
    img *= np.float32(top)
    np.rint(img, out=img)
    np.clip(img, 1, top, out=img)
    out = img.astype(spec.dtype)
    del img
    b = spec.nodata_border
    if b:
        rows = np.arange(row0, row0 + h)
        cols = np.arange(col0, col0 + w)
        invalid = ((rows < b) | (rows >= spec.height - b))[:, None] | (
            (cols < b) | (cols >= spec.width - b))[None, :]
        out[invalid] = 0
    return np.ascontiguousarray(out.transpose(2, 0, 1))


