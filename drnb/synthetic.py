"""Seeded synthetic fundus photographs: the embedded default dataset for demos and tests.

These images are drawings, not data. They imitate the look of a colour fundus photograph
closely enough to exercise the whole pipeline (a rotation pretext task, grading, metrics,
plots) without downloading anything, but they make NO claim about real eyes: lesion shapes,
counts and colours are rough caricatures of the International Clinical DR scale, and a model
that does well here has learned nothing about real retinopathy.

What is drawn, and why
----------------------
* A circular field (radius ``FIELD_RADIUS_FRACTION * size``) on black, optionally cut flat at
  the top and bottom like many APTOS 2019 photographs.
* An orange-red background whose illumination falls off radially; the light comes from a
  different side in every photograph (the camera's, below), so brightness says nothing about
  which way is up. As in real eyes, only the anatomy does: the disc on the nasal side, the
  macula temporal to it and a little lower, the arcades opening towards the macula, left and
  right eyes mirrored. A rotation pretext task has to read the anatomy to be learned.
* A bright yellowish optic disc on the right half for a right eye and on the left half for a
  left eye, and a darker macula near the centre, slightly below the disc's height.
* A superior and an inferior vascular arcade (a vein and an artery each) leaving the disc and
  arching around the macula, with a few branches; veins are thicker and darker than arteries,
  and each vessel gets its own random curvature so the arcades are never mirror images.
* Lesions that accumulate with the grade, in counts that overlap between neighbouring grades:

  ===== ==================================================================================
  grade lesions
  ===== ==================================================================================
  0     none
  1     one to a few faint microaneurysms (tiny dark-red dots)
  2     more microaneurysms, blot haemorrhages, clusters of hard exudates (yellow-white)
  3     many haemorrhages in all four quadrants, more exudates, venous beading
  4     all of grade 3, plus new vessels at the disc and a boat-shaped preretinal haemorrhage
  ===== ==================================================================================

* A camera's faults, drawn per photograph: focus blur, illumination that falls off towards
  one side and the rim, exposure, and sensor noise. With the faint early lesions they make
  grading as uncertain as it is on real photographs at 64-128 px, so that more labels help.
* Label noise: ``LABEL_NOISE`` of the photographs show the lesions of a neighbouring grade
  (graders disagree by one grade on real photographs); the grade counts stay as asked.

All random choices come from a ``numpy.random.Generator``, and the anatomy and the camera are
drawn from it before any lesion, so the same generator state gives the same eye at every
grade (only the lesions differ). The background is vectorised NumPy arithmetic; vessels and
lesions are drawn with ``PIL.ImageDraw``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from drnb.checks import check_integer
from drnb.files import atomic_path, write_text_atomically
from drnb.targets import N_GRADES

APTOS_GRADE_COUNTS = (1805, 370, 999, 193, 295)
"""Images per grade (0-4) in the APTOS 2019 ``train.csv``: the default class balance."""

FIELD_RADIUS_FRACTION = 0.46
MAX_CLIP = 0.3
MIN_SIZE = 16
# Clipped images get a clip drawn uniformly from this range: below 0.1 the cut is barely
# visible, and MAX_CLIP is the most APTOS-like photographs lose.
_RANDOM_CLIP_RANGE = (0.1, MAX_CLIP)
# Share of photographs drawn with the lesions of a grade next to their label's.
LABEL_NOISE = 0.08
# Bump when the drawing changes, so write_synthetic_dataset regenerates cached datasets.
_GENERATOR_VERSION = 3


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _check_fraction(value, name: str, maximum: float) -> float:
    """Return ``value`` as a float in [0, maximum], or raise ValueError naming ``name``."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, {maximum}], got {value!r}") from None
    if not 0.0 <= as_float <= maximum:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, {maximum}], got {value!r}")
    return as_float


def _check_grade_weights(grade_weights) -> np.ndarray:
    """Return the weights as float64 (5,), or raise ValueError saying what is wrong."""
    try:
        weights = np.asarray(grade_weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"grade_weights must be {N_GRADES} non-negative numbers, got {grade_weights!r}"
        ) from None
    if weights.shape != (N_GRADES,):
        raise ValueError(
            f"grade_weights must have one weight per grade 0-{N_GRADES - 1} "
            f"(length {N_GRADES}), got shape {weights.shape}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"grade_weights must be finite and non-negative, got {weights.tolist()}")
    if weights.sum() == 0:
        raise ValueError("grade_weights must not all be zero")
    return weights


# --------------------------------------------------------------------------------------------
# Pixel grid, cached per image size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelGrid:
    """Coordinates and masks that depend only on the image size (cached, read-only)."""

    x: np.ndarray  # float32 (1, size): pixel-centre x coordinates
    y: np.ndarray  # float32 (size, 1): pixel-centre y coordinates
    squared_radius: np.ndarray  # float32 (size, size): (distance from centre / field radius)**2
    field_alpha: np.ndarray  # uint8 (size, size): 255 inside the field, anti-aliased rim, 0 out
    texture_basis: np.ndarray  # float32 (size, _TEXTURE_CELLS): smooth bumps for upsampling


_TEXTURE_CELLS = 7


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> _PixelGrid:
    """Build the size-dependent arrays once per size; every image of that size shares them."""
    centre = size / 2.0
    field_radius = FIELD_RADIUS_FRACTION * size
    coords = np.arange(size, dtype=np.float32) + 0.5
    offset = (coords - centre) / field_radius
    squared_radius = offset[None, :] ** 2 + offset[:, None] ** 2
    # One pixel of anti-aliasing at the rim; the corners are exactly 0.
    field = np.clip(field_radius * (1.0 - np.sqrt(squared_radius)) + 0.5, 0.0, 1.0)
    # Gaussian bumps, rows normalised: basis @ coarse @ basis.T is a smooth upsampling of a
    # coarse noise grid, far cheaper than an image resize.
    cell_centres = np.linspace(0.0, size, _TEXTURE_CELLS, dtype=np.float32)
    cell_width = size / (_TEXTURE_CELLS - 1)
    basis = np.exp(-0.5 * ((coords[:, None] - cell_centres[None, :]) / (0.6 * cell_width)) ** 2)
    basis /= basis.sum(axis=1, keepdims=True)
    grid = _PixelGrid(
        x=coords[None, :].copy(),
        y=coords[:, None].copy(),
        squared_radius=squared_radius,
        field_alpha=(field * 255.0 + 0.5).astype(np.uint8),
        texture_basis=basis.astype(np.float32),
    )
    for array in vars(grid).values():
        array.setflags(write=False)
    return grid


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Where the landmarks of one synthetic eye lie, in pixels."""

    size: int
    centre: float
    field_radius: float
    disc_xy: tuple[float, float]
    disc_radius: float
    macula_xy: tuple[float, float]
    temporal_sign: float  # +1 if the temporal side (macula) is towards +x, i.e. a left eye


@dataclass(frozen=True)
class _Vessel:
    """One main vessel: its centre line and its width where it leaves the disc."""

    points: np.ndarray  # float64 (K, 2) of (x, y) pixels
    width: float
    is_vein: bool


def _place_anatomy(size: int, eye: str, rng: np.random.Generator) -> _Anatomy:
    """Draw the disc and macula positions for one eye, with jitter."""
    centre = size / 2.0
    # Right eye: disc on the right, so the temporal side (macula, far end of the arcades) is left.
    temporal_sign = -1.0 if eye == "right" else 1.0
    disc_x = centre - temporal_sign * size * rng.uniform(0.22, 0.29)
    # About mid-height, so that the bright disc does not light one half more than the other.
    disc_y = centre + size * rng.uniform(-0.045, 0.045)
    # The fovea lies about 2.5 disc diameters temporal to the disc and 0.3-0.5 of one below it:
    # with the disc's side, what tells which way is up.
    macula_x = centre + temporal_sign * size * rng.uniform(-0.03, 0.04)
    macula_y = disc_y + size * rng.uniform(0.035, 0.06)
    return _Anatomy(
        size=size,
        centre=centre,
        field_radius=FIELD_RADIUS_FRACTION * size,
        disc_xy=(disc_x, disc_y),
        disc_radius=size * rng.uniform(0.055, 0.07),
        macula_xy=(macula_x, macula_y),
        temporal_sign=temporal_sign,
    )


def _box(size: int, x: float, y: float, half_width: float) -> tuple[slice, slice]:
    """Row and column slices of the square of half-width ``half_width`` around (x, y)."""
    return (
        slice(max(0, int(y - half_width)), min(size, int(y + half_width) + 2)),
        slice(max(0, int(x - half_width)), min(size, int(x + half_width) + 2)),
    )


def _background(anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Fundus background: tone, uneven illumination, choroidal texture, macula and disc.

    Returns
    -------
    numpy.ndarray
        float32 (3, size, size), channel-first RGB, roughly in [0, 1] (not yet clipped).
    """
    size = anatomy.size
    grid = _pixel_grid(size)
    red = rng.uniform(0.72, 0.95)
    tone = np.array(
        [red, red * rng.uniform(0.30, 0.46), red * rng.uniform(0.07, 0.17)], dtype=np.float32
    )
    radial_falloff = rng.uniform(0.25, 0.55)
    texture_strength = rng.uniform(0.02, 0.06)
    coarse = rng.normal(0.0, 1.0, size=(_TEXTURE_CELLS, _TEXTURE_CELLS)).astype(np.float32)
    texture = grid.texture_basis @ coarse @ grid.texture_basis.T
    illumination = (
        1.0 - radial_falloff * grid.squared_radius + texture_strength * texture
    )
    image = tone[:, None, None] * illumination  # (3, size, size)

    # Macula: a soft dark patch; macular pigment absorbs green and blue more than red.
    macula_x, macula_y = anatomy.macula_xy
    sigma = size * rng.uniform(0.05, 0.075)
    depth = rng.uniform(0.25, 0.45) * np.array([0.7, 1.0, 1.0], dtype=np.float32)
    rows, cols = _box(size, macula_x, macula_y, 3.0 * sigma)
    weight = np.exp(
        ((grid.x[:, cols] - macula_x) ** 2 + (grid.y[rows] - macula_y) ** 2) * (-0.5 / sigma**2)
    )
    image[:, rows, cols] *= 1.0 - depth[:, None, None] * weight

    # Optic disc: a vertically oval, sharp-edged pale disc with a faint halo and a brighter cup
    # displaced temporally.
    disc_x, disc_y = anatomy.disc_xy
    disc_radius = anatomy.disc_radius
    rows, cols = _box(size, disc_x, disc_y, 3.0 * disc_radius)
    dx = (grid.x[:, cols] - disc_x) / disc_radius
    dy = (grid.y[rows] - disc_y) / (1.12 * disc_radius)
    distance_squared = dx * dx + dy * dy
    alpha = np.clip((1.1 - np.sqrt(distance_squared)) * 4.0, 0.0, 1.0) * rng.uniform(0.8, 0.95)
    alpha += 0.25 * np.exp(distance_squared * (-1.0 / 1.6**2)) * (1.0 - alpha)
    disc_colour = np.array(
        [1.0, rng.uniform(0.78, 0.9), rng.uniform(0.45, 0.62)], dtype=np.float32
    )[:, None, None]
    region = image[:, rows, cols]
    region += (disc_colour - region) * alpha
    cup_dx = dx - 0.25 * anatomy.temporal_sign
    cup = rng.uniform(0.4, 0.7) * np.exp((cup_dx * cup_dx + dy * dy) * (-1.0 / 0.45**2))
    cup_colour = np.array([1.0, 0.97, 0.85], dtype=np.float32)[:, None, None]
    region += (cup_colour - region) * cup
    image[:, rows, cols] = region
    return image


def _random_walks(
    starts: np.ndarray, headings: np.ndarray, n_steps: int, step: float, turn_sd: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paths that wander from ``starts`` with heading noise ``turn_sd`` (radians per step).

    Parameters
    ----------
    starts : float64 (B, 2) of (x, y)
    headings : float64 (B,), initial directions in radians (image coordinates, y down)

    Returns
    -------
    numpy.ndarray
        float64 (B, n_steps + 1, 2) of (x, y); callers may use a prefix of each path.
    """
    angles = headings[:, None] + np.cumsum(rng.normal(0.0, turn_sd, (len(headings), n_steps)), 1)
    paths = np.empty((len(headings), n_steps + 1, 2))
    paths[:, 0] = starts
    paths[:, 1:, 0] = starts[:, None, 0] + step * np.cumsum(np.cos(angles), axis=1)
    paths[:, 1:, 1] = starts[:, None, 1] + step * np.cumsum(np.sin(angles), axis=1)
    return paths


def _random_signs(count: int, rng: np.random.Generator) -> np.ndarray:
    """float64 (count,) of -1.0 or +1.0 with equal chance."""
    return np.where(rng.random(count) < 0.5, -1.0, 1.0)


def _draw_tapered(
    draw: ImageDraw.ImageDraw,
    points: list[list[float]],
    start_width: float,
    end_width: float,
    fill: tuple[int, int, int],
    chunk: int,
) -> None:
    """Draw a polyline whose width steps down from ``start_width`` to ``end_width`` (pixels).

    Each chunk of a few points is one ``joint="curve"`` line, so bends have no gaps;
    consecutive chunks share an end point.
    """
    n_chunks = max(1, -(-(len(points) - 1) // chunk))
    for index in range(n_chunks):
        part = points[index * chunk : (index + 1) * chunk + 1]
        if len(part) < 2:
            break
        fraction = index / (n_chunks - 1) if n_chunks > 1 else 0.0
        width = start_width + (end_width - start_width) * fraction
        draw.line([tuple(p) for p in part], fill=fill, width=max(1, round(width)), joint="curve")


def _draw_vessels(
    draw: ImageDraw.ImageDraw, anatomy: _Anatomy, rng: np.random.Generator
) -> list[_Vessel]:
    """Draw the arcades, their branches and the nasal vessels as transmittance.

    Each of the four arcade vessels gets its own length, height, peak position and wobble,
    so the superior and inferior arcades are never mirror images.

    Returns
    -------
    list of _Vessel
        The four arcade vessels: superior vein, superior artery, inferior vein, inferior artery.
    """
    size = anatomy.size
    vein_width = max(1.0, size * rng.uniform(0.011, 0.015))
    artery_width = max(1.0, vein_width * rng.uniform(0.6, 0.75))
    # Transmittance 0-255: veins (deoxygenated) absorb more than arteries.
    vein_fill = tuple(int(v) for v in np.array([160, 105, 120]) * rng.uniform(0.93, 1.05))
    artery_fill = tuple(int(v) for v in np.array([205, 165, 170]) * rng.uniform(0.96, 1.04))

    # Each arcade runs a temporal length ``reach``; its distance from the horizontal raphe
    # follows (s/p) exp(1 - s/p) of the fraction s of that length: it leaves the disc steeply,
    # peaks at s = p, then sinks slowly towards the raphe without reaching it.
    n_points = 20
    reach = size * rng.uniform(0.40, 0.52, (4, 1))
    height = size * rng.uniform(0.16, 0.23, (4, 1))
    peak_at = rng.uniform(0.28, 0.42, (4, 1))
    along = np.linspace(0.0, 1.0, n_points)[None, :]
    profile = (along / peak_at) * np.exp(1.0 - along / peak_at)
    wobble = rng.uniform(0.03, 0.09, (4, 1)) * np.sin(
        rng.uniform(4.0, 10.0, (4, 1)) * along + rng.uniform(0.0, 2 * math.pi, (4, 1))
    )
    downwards = np.array([-1.0, -1.0, 1.0, 1.0])[:, None]  # superior pair, then inferior pair
    paths = np.empty((4, n_points, 2))
    paths[..., 0] = anatomy.disc_xy[0] + anatomy.temporal_sign * reach * along
    paths[..., 1] = anatomy.disc_xy[1] + downwards * height * profile * (1.0 + wobble)
    is_vein = [True, False, True, False]
    vessels = [
        _Vessel(paths[k], vein_width if is_vein[k] else artery_width, is_vein[k]) for k in range(4)
    ]

    # Branches leave at random points along each arcade, turned 0.4-1 rad either way.
    n_branches = rng.integers(2, 5, size=4)
    owner = np.repeat(np.arange(4), n_branches)
    at = rng.uniform(0.2, 0.85, size=len(owner))
    index = (at * (n_points - 1)).astype(int)
    starts = paths[owner, index]
    tangents = paths[owner, index + 1] - starts
    headings = np.arctan2(tangents[:, 1], tangents[:, 0]) + _random_signs(len(owner), rng) * (
        rng.uniform(0.4, 1.0, len(owner))
    )
    to_macula = np.asarray(anatomy.macula_xy) - starts
    towards_macula = np.cos(headings) * to_macula[:, 0] + np.sin(headings) * to_macula[:, 1] > 0
    # The centre of the macula is avascular: branches heading towards it stay short.
    n_steps = np.where(
        towards_macula, rng.integers(2, 4, len(owner)), rng.integers(4, 8, len(owner))
    )
    walks = _random_walks(starts, headings, 7, size * 0.035, 0.25, rng)

    # Nasal vessels: shorter, leaving the disc above and below towards the near rim.
    n_nasal = int(rng.integers(2, 5))
    nasal_angle = math.pi if anatomy.temporal_sign > 0 else 0.0
    nasal_headings = nasal_angle - anatomy.temporal_sign * _random_signs(n_nasal, rng) * (
        rng.uniform(0.3, 1.1, n_nasal)
    )
    nasal_is_vein = rng.random(n_nasal) < 0.5
    nasal_steps = rng.integers(4, 7, n_nasal)
    nasal_walks = _random_walks(
        np.tile(anatomy.disc_xy, (n_nasal, 1)), nasal_headings, 6, size * 0.035, 0.2, rng
    )

    # Branches first, so that the arcades are drawn over their roots.
    for walk, steps, vessel_index, fraction in zip(walks, n_steps, owner, at):
        vessel = vessels[vessel_index]
        width = max(1.0, 0.7 * vessel.width * (1.0 - 0.6 * fraction))
        fill = vein_fill if vessel.is_vein else artery_fill
        _draw_tapered(draw, walk[: steps + 1].tolist(), width, 1.0, fill, chunk=4)
    for walk, steps, vein in zip(nasal_walks, nasal_steps, nasal_is_vein):
        width = 0.7 * (vein_width if vein else artery_width)
        fill = vein_fill if vein else artery_fill
        _draw_tapered(draw, walk[: steps + 1].tolist(), width, 1.0, fill, chunk=4)
    for vessel in vessels:
        fill = vein_fill if vessel.is_vein else artery_fill
        end_width = max(1.0, 0.4 * vessel.width)
        _draw_tapered(draw, vessel.points.tolist(), vessel.width, end_width, fill, chunk=5)
    return vessels


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LesionLoad:
    """How many of each lesion a grade gets, as [low, high) ranges for ``rng.integers``."""

    microaneurysms: tuple[int, int] = (0, 0)
    blots_anywhere: tuple[int, int] = (0, 0)
    blots_per_quadrant: tuple[int, int] = (0, 0)
    flame_haemorrhages: tuple[int, int] = (0, 0)
    exudate_clusters: tuple[int, int] = (0, 0)
    beaded_veins: tuple[int, int] = (0, 0)
    new_vessel_fronds: tuple[int, int] = (0, 0)
    preretinal_haemorrhages: tuple[int, int] = (0, 0)


_LESION_LOAD_BY_GRADE = {
    0: _LesionLoad(),
    1: _LesionLoad(microaneurysms=(1, 5)),
    2: _LesionLoad(microaneurysms=(3, 12), blots_anywhere=(1, 5), exudate_clusters=(0, 3)),
    3: _LesionLoad(
        microaneurysms=(8, 20),
        blots_per_quadrant=(2, 6),
        flame_haemorrhages=(1, 5),
        exudate_clusters=(1, 4),
        beaded_veins=(0, 3),
    ),
    4: _LesionLoad(
        microaneurysms=(12, 25),
        blots_per_quadrant=(5, 9),
        flame_haemorrhages=(3, 7),
        exudate_clusters=(2, 5),
        beaded_veins=(1, 3),
        new_vessel_fronds=(1, 3),
        preretinal_haemorrhages=(1, 2),
    ),
}

# Transmittance (0-255) of dark-red lesions: blood absorbs green and blue far more than red.
# Every channel stays below 255, which is how the lesion mask finds them.
_MICROANEURYSM_FILL = (150, 80, 95)  # faint: the earliest sign, and the hardest to see
_HAEMORRHAGE_FILL = (140, 60, 75)
_PRERETINAL_FILL = (95, 25, 35)
_NEW_VESSEL_FILL = (150, 90, 105)
_EXUDATE_RGB = (255, 237, 153)  # yellow-white


def _ellipse_polygons(
    centres: np.ndarray, rx: np.ndarray, ry: np.ndarray, angles: np.ndarray,
    n_vertices: int = 10, half: bool = False, vertex_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Vertices of rotated ellipses, or with ``half`` of their lower halves (a boat shape).

    Parameters
    ----------
    centres : float64 (N, 2) of (x, y); rx, ry, angles : float64 (N,), pixels and radians.
    vertex_scale : float64 (N, n_vertices), optional
        Multiplies each vertex's distance from the centre, for irregular outlines.

    Returns
    -------
    numpy.ndarray
        float64 (N, n_vertices, 2) of (x, y).
    """
    t = np.linspace(0.0, math.pi, n_vertices) if half else np.linspace(
        0.0, 2 * math.pi, n_vertices, endpoint=False
    )
    along = rx[:, None] * np.cos(t)
    across = ry[:, None] * np.sin(t)  # positive = down in image coordinates
    if vertex_scale is not None:
        along = along * vertex_scale
        across = across * vertex_scale
    cos_a, sin_a = np.cos(angles)[:, None], np.sin(angles)[:, None]
    polygons = np.empty((len(centres), n_vertices, 2))
    polygons[..., 0] = centres[:, None, 0] + along * cos_a - across * sin_a
    polygons[..., 1] = centres[:, None, 1] + along * sin_a + across * cos_a
    return polygons


def _points_in_field(
    anatomy: _Anatomy, count: int, rng: np.random.Generator, max_radius_fraction: float = 0.88,
    quadrants: np.ndarray | None = None,
) -> np.ndarray:
    """Points uniform over the field, away from its rim: float64 (count, 2) of (x, y).

    ``quadrants`` (int (count,), values 0-3) confines each point to that quarter of the field.
    """
    radius = anatomy.field_radius * max_radius_fraction * np.sqrt(rng.random(count))
    sector = 0.0 if quadrants is None else quadrants
    angle = (sector + rng.random(count) * (4.0 if quadrants is None else 1.0)) * (math.pi / 2)
    return anatomy.centre + np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _points_near_macula(
    anatomy: _Anatomy, count: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Points scattered around the macula, pulled inside the field: float64 (count, 2)."""
    points = np.asarray(anatomy.macula_xy) + rng.normal(0.0, spread * anatomy.size, (count, 2))
    offset = points - anatomy.centre
    distance = np.linalg.norm(offset, axis=1, keepdims=True)
    limit = 0.88 * anatomy.field_radius
    return anatomy.centre + offset * np.minimum(1.0, limit / np.maximum(distance, 1e-9))


def _dot_boxes(centres: np.ndarray, radii: np.ndarray) -> list[list[float]]:
    """Bounding boxes [x0, y0, x1, y1] of circles, for ``ImageDraw.ellipse``."""
    return np.concatenate([centres - radii[:, None], centres + radii[:, None]], axis=1).tolist()


def _draw_lesions(
    dark: ImageDraw.ImageDraw,
    bright: ImageDraw.ImageDraw,
    anatomy: _Anatomy,
    grade: int,
    vessels: list[_Vessel],
    rng: np.random.Generator,
) -> None:
    """Draw the lesions of ``grade``: dark ones as RGB transmittance on ``dark``, hard
    exudates as opacity (0-255) on ``bright``."""
    load = _LESION_LOAD_BY_GRADE[grade]
    size = anatomy.size

    def count(low_high: tuple[int, int]) -> int:
        low, high = low_high
        return int(rng.integers(low, high)) if high > low else 0

    # Microaneurysms: mostly at the posterior pole, some anywhere.
    n_microaneurysms = count(load.microaneurysms)
    n_central = round(0.7 * n_microaneurysms)
    centres = np.vstack(
        [
            _points_near_macula(anatomy, n_central, 0.13, rng),
            _points_in_field(anatomy, n_microaneurysms - n_central, rng),
        ]
    )
    radii = np.maximum(0.75, size * rng.uniform(0.004, 0.008, n_microaneurysms))
    for box in _dot_boxes(centres, radii):
        dark.ellipse(box, fill=_MICROANEURYSM_FILL)

    # Blot haemorrhages with ragged outlines; at grade 3+ a quota per quadrant guarantees all
    # four quadrants (the first criterion of the 4-2-1 rule for severe NPDR).
    low, high = load.blots_per_quadrant
    per_quadrant = rng.integers(low, high, 4) if high > low else np.zeros(4, dtype=int)
    blot_centres = np.vstack(
        [
            _points_in_field(anatomy, count(load.blots_anywhere), rng, 0.8),
            _points_in_field(
                anatomy, int(per_quadrant.sum()), rng, 0.85, np.repeat(np.arange(4), per_quadrant)
            ),
        ]
    )
    if len(blot_centres):
        n_blots, n_vertices = len(blot_centres), 10
        radius = size * rng.uniform(0.01, 0.024, n_blots)
        blots = _ellipse_polygons(
            blot_centres,
            radius,
            radius * rng.uniform(0.6, 1.0, n_blots),
            rng.uniform(0.0, math.pi, n_blots),
            n_vertices=n_vertices,
            # Per-vertex radius noise gives the ragged outline of a blot.
            vertex_scale=rng.uniform(0.7, 1.15, (n_blots, n_vertices)),
        )
        for polygon in blots.reshape(n_blots, -1).tolist():
            dark.polygon(polygon, fill=_HAEMORRHAGE_FILL)

    # Flame haemorrhages: thin streaks along the nerve fibres, roughly radial to the disc.
    n_flames = count(load.flame_haemorrhages)
    if n_flames:
        centres = _points_in_field(anatomy, n_flames, rng, 0.8)
        along_fibres = np.arctan2(
            centres[:, 1] - anatomy.disc_xy[1], centres[:, 0] - anatomy.disc_xy[0]
        )
        flames = _ellipse_polygons(
            centres,
            size * rng.uniform(0.02, 0.035, n_flames),
            size * rng.uniform(0.005, 0.009, n_flames),
            along_fibres + rng.normal(0.0, 0.2, n_flames),
            n_vertices=12,
        )
        for polygon in flames.reshape(n_flames, -1).tolist():
            dark.polygon(polygon, fill=_HAEMORRHAGE_FILL)

    # Hard exudates: yellow-white specks in clusters near the macula, some in a ring
    # (a circinate pattern around a leaking point).
    n_clusters = count(load.exudate_clusters)
    if n_clusters:
        cluster_centres = _points_near_macula(anatomy, n_clusters, 0.1, rng)
        is_ring = rng.random(n_clusters) < 0.35
        ring_radius = size * rng.uniform(0.025, 0.045, n_clusters)
        owner = np.repeat(np.arange(n_clusters), rng.integers(4, 12, n_clusters))
        theta = rng.uniform(0.0, 2 * math.pi, len(owner))
        on_ring = ring_radius[owner, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        scattered = rng.normal(0.0, size * 0.018, (len(owner), 2))
        specks = cluster_centres[owner] + np.where(is_ring[owner, None], on_ring, scattered)
        radii = np.maximum(0.6, size * rng.uniform(0.003, 0.009, len(owner)))
        opacity = rng.integers(170, 240, len(owner))
        for box, alpha in zip(_dot_boxes(specks, radii), opacity.tolist()):
            bright.ellipse(box, fill=alpha)

    # Venous beading: beads wider than the vein, evenly spaced along part of its length.
    veins = [vessel for vessel in vessels if vessel.is_vein]
    n_beaded = min(len(veins), count(load.beaded_veins))
    for vein_index in rng.permutation(len(veins))[:n_beaded].tolist():
        vein = veins[vein_index]
        t_start = rng.uniform(0.15, 0.4)
        t_stop = t_start + rng.uniform(0.25, 0.45)
        arc_length = np.sum(np.linalg.norm(np.diff(vein.points, axis=0), axis=1))
        n_beads = max(2, int((t_stop - t_start) * arc_length / max(2.5 * vein.width, 3.0)))
        bead_t = np.linspace(t_start, t_stop, n_beads)
        t_points = np.linspace(0.0, 1.0, len(vein.points))
        beads = np.stack(
            [np.interp(bead_t, t_points, vein.points[:, 0]),
             np.interp(bead_t, t_points, vein.points[:, 1])],
            axis=1,
        )
        for box in _dot_boxes(beads, vein.width * rng.uniform(0.85, 1.1, n_beads)):
            dark.ellipse(box, fill=_HAEMORRHAGE_FILL)

    # New vessels at the disc: fine, tortuous loops leaving the disc margin.
    n_fronds = count(load.new_vessel_fronds)
    if n_fronds:
        n_lines = int(rng.integers(3, 6, n_fronds).sum())
        angles = rng.uniform(0.0, 2 * math.pi, n_lines)
        starts = np.asarray(anatomy.disc_xy) + 0.8 * anatomy.disc_radius * np.stack(
            [np.cos(angles), np.sin(angles)], axis=1
        )
        n_steps = rng.integers(8, 16, n_lines)
        walks = _random_walks(starts, angles, 15, size * 0.012, 0.9, rng)
        for walk, steps in zip(walks, n_steps):
            dark.line(
                [tuple(p) for p in walk[: steps + 1].tolist()], fill=_NEW_VESSEL_FILL, width=1,
                joint="curve",
            )

    # Preretinal haemorrhage: a boat shape, flat on top where the blood settles under gravity.
    n_preretinal = count(load.preretinal_haemorrhages)
    if n_preretinal:
        boats = _ellipse_polygons(
            _points_in_field(anatomy, n_preretinal, rng, 0.6),
            size * rng.uniform(0.06, 0.1, n_preretinal),
            size * rng.uniform(0.04, 0.065, n_preretinal),
            rng.normal(0.0, 0.08, n_preretinal),
            n_vertices=16,
            half=True,
        )
        for polygon in boats.reshape(n_preretinal, -1).tolist():
            dark.polygon(polygon, fill=_PRERETINAL_FILL)


# --------------------------------------------------------------------------------------------
# The camera
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Camera:
    """One photograph's faults: focus blur (Gaussian radius, pixels), a multiplicative
    illumination field (float32 (size, size), around 1), and sensor noise (its standard
    deviation in 0-255 and the seed of its generator)."""

    blur: float
    illumination: np.ndarray
    noise: float
    noise_seed: int


def _draw_camera(anatomy: _Anatomy, rng: np.random.Generator) -> _Camera:
    """Draw a photograph's faults; always the same number of draws, so the lesions that follow
    come from the same generator state whatever the camera did."""
    size = anatomy.size
    grid = _pixel_grid(size)
    blur = size / 320.0 * rng.uniform(1.0, 4.0)
    # Light falling off towards a random side (so that no side is brighter on average: which
    # way is up must be read off the anatomy), towards the rim, and an exposure of the whole
    # photograph.
    side = rng.uniform(0.0, 2 * math.pi)
    tilt = rng.uniform(0.0, 0.25)
    rim = rng.uniform(0.0, 0.35)
    exposure = rng.uniform(0.75, 1.15)
    along = (np.cos(side) * (grid.x - anatomy.centre) + np.sin(side) * (grid.y - anatomy.centre)) / anatomy.field_radius
    illumination = exposure * (1.0 - tilt * along - rim * grid.squared_radius)
    noise = rng.uniform(2.0, 9.0)
    return _Camera(blur, illumination.astype(np.float32), noise, int(rng.integers(2**31)))


def _photograph(image: Image.Image, camera: _Camera) -> Image.Image:
    """``image`` as ``camera`` takes it: blurred, unevenly lit and noisy (RGB, 0-255)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(camera.blur)), np.float32)
    noise = np.random.default_rng(camera.noise_seed).normal(0.0, camera.noise, blurred.shape)
    taken = blurred * camera.illumination[:, :, None] + noise
    return Image.fromarray(np.clip(taken + 0.5, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def make_fundus(
    grade: int,
    size: int = 128,
    rng: np.random.Generator | None = None,
    *,
    eye: str | None = None,
    clip: float = 0.0,
    return_lesion_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic fundus photograph of a given DR grade.

    Parameters
    ----------
    grade : int
        DR grade on the International Clinical scale, 0 (none) to 4 (proliferative).
    size : int, default 128
        Width and height of the square image in pixels, at least 16.
    rng : numpy.random.Generator, optional
        Source of all randomness. ``None`` uses a fresh, unseeded generator. The anatomy is
        drawn before the lesions, so generators in the same state give the same eye at every
        grade.
    eye : {"left", "right", None}, default None
        Which eye: the optic disc lies on the right half for a right eye and on the left half
        for a left eye. ``None`` picks one at random.
    clip : float in [0, 0.3], default 0.0
        Share of the field's diameter cut off, half at the top and half at the bottom, by
        blacking out whole rows (as in APTOS 2019 photographs cut flat). 0 keeps the circle.
    return_lesion_mask : bool, default False
        Also return a mask of lesion pixels.

    Returns
    -------
    image : numpy.ndarray
        uint8 (size, size, 3), RGB in 0-255; exactly 0 outside the field and in clipped rows.
    lesion_mask : numpy.ndarray
        bool (size, size), True where a lesion was drawn (before the blur), inside the visible
        field only. All False for grade 0. Only returned when ``return_lesion_mask`` is True.

    Raises
    ------
    ValueError
        If ``grade``, ``size``, ``eye`` or ``clip`` is out of range, or ``rng`` is not a
        ``numpy.random.Generator``.
    """
    grade = check_integer(grade, "grade", 0, N_GRADES - 1)
    size = check_integer(size, "size", MIN_SIZE)
    clip = _check_fraction(clip, "clip", MAX_CLIP)
    if eye not in ("left", "right", None):
        raise ValueError(f"eye must be 'left', 'right' or None (random), got {eye!r}")
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
        )

    # Draw the eye even when it is given, so that the rest of the image does not depend on
    # whether the caller chose the eye.
    random_eye = "right" if rng.random() < 0.5 else "left"
    anatomy = _place_anatomy(size, eye or random_eye, rng)
    background = _background(anatomy, rng)

    # Vessels and dark lesions absorb light: they are drawn as transmittance layers that
    # multiply the background, so their contrast follows the uneven illumination. Lesions get
    # their own layers so that the lesion mask can be read off them.
    channels = (np.clip(background, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    image = Image.merge("RGB", [Image.fromarray(channel) for channel in channels])
    vessel_layer = Image.new("RGB", (size, size), (255, 255, 255))
    vessels = _draw_vessels(ImageDraw.Draw(vessel_layer), anatomy, rng)
    camera = _draw_camera(anatomy, rng)
    lesion_layer = Image.new("RGB", (size, size), (255, 255, 255))
    exudate_layer = Image.new("L", (size, size), 0)
    if grade > 0:
        _draw_lesions(
            ImageDraw.Draw(lesion_layer), ImageDraw.Draw(exudate_layer), anatomy, grade, vessels,
            rng,
        )
        # A haemorrhage over a vessel hides it rather than adding to it: take the darker layer.
        vessel_layer = ImageChops.darker(vessel_layer, lesion_layer)
    image = ImageChops.multiply(image, vessel_layer)
    if grade >= 2:  # the only grades with hard exudates
        image = Image.composite(Image.new("RGB", (size, size), _EXUDATE_RGB), image, exudate_layer)
    photograph = _photograph(image, camera)

    # The field edge is applied after the camera so that it stays crisp (one pixel of
    # anti-aliasing) and the corners and clipped rows are exactly black.
    field_alpha = _pixel_grid(size).field_alpha
    if clip > 0:
        field_alpha = field_alpha.copy()
        row_offset = np.abs(np.arange(size) + 0.5 - anatomy.centre)
        field_alpha[row_offset > anatomy.field_radius * (1.0 - clip)] = 0
    result = np.array(
        Image.composite(photograph, Image.new("RGB", (size, size)), Image.fromarray(field_alpha))
    )
    if not return_lesion_mask:
        return result
    # Every lesion fill has red transmittance below 255, and every exudate some opacity.
    lesion_mask = (np.asarray(lesion_layer.getchannel("R")) < 255) | (np.asarray(exudate_layer) > 0)
    return result, lesion_mask & (field_alpha >= 128)


def _largest_remainder_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Split ``n`` into per-grade counts proportional to ``weights`` (Hamilton's method).

    Each grade gets the floor of its quota, and the images left over go one each to the
    grades with the largest fractional remainders (ties: the lower grade first).

    Returns
    -------
    numpy.ndarray
        int64 (5,), summing to ``n``.
    """
    quotas = n * weights / weights.sum()
    counts = np.floor(quotas).astype(np.int64)
    left_over = n - int(counts.sum())
    by_remainder = np.argsort(-(quotas - counts), kind="stable")
    counts[by_remainder[:left_over]] += 1
    return counts


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: a child of ``seed`` that does not depend on n."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _iter_fundus_images(
    n: int, size: int, seed: int, weights: np.ndarray, clipped_share: float
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(grade, image)`` for images 0..n-1 of a seeded synthetic dataset.

    Each image has its own child generator. Its first draw is a sort key: ranking the keys
    is a seeded uniform shuffle of the largest-remainder grade list, and because each key
    belongs to its image, an image's grade mostly stays put as ``n`` changes. Its next draws
    decide the clip and whether its lesions are a neighbouring grade's (:func:`drawn_grade`),
    and the rest draw the image; so image i depends only on (seed, i, grade).
    """
    shuffle_keys = np.array([_image_rng(seed, index).random() for index in range(n)])
    grades = np.empty(n, dtype=np.int64)
    grades[np.argsort(shuffle_keys, kind="stable")] = np.repeat(
        np.arange(N_GRADES), _largest_remainder_counts(n, weights)
    )
    for index in range(n):
        rng = _image_rng(seed, index)
        rng.random()  # the shuffle key, drawn above
        # Both draws are always made, so the image does not depend on clipped_share
        # except through whether it is clipped.
        is_clipped = rng.random() < clipped_share
        clip_if_clipped = rng.uniform(*_RANDOM_CLIP_RANGE)
        clip = clip_if_clipped if is_clipped else 0.0
        drawn = drawn_grade(int(grades[index]), rng)
        yield int(grades[index]), make_fundus(drawn, size, rng, clip=clip)


def drawn_grade(label: int, rng: np.random.Generator) -> int:
    """The grade whose lesions a photograph labelled ``label`` shows: ``label``, or with
    probability :data:`LABEL_NOISE` a neighbouring grade (two draws, always made)."""
    mislabelled = rng.random() < LABEL_NOISE
    step = 1 if rng.random() < 0.5 else -1
    if not mislabelled:
        return label
    return label + step if 0 <= label + step < N_GRADES else label - step


def _check_dataset_args(n, size, seed, grade_weights, clipped_share):
    """Validate the shared arguments of the dataset functions; return them normalised."""
    return (
        check_integer(n, "n", 1),
        check_integer(size, "size", MIN_SIZE),
        check_integer(seed, "seed", 0),
        _check_grade_weights(grade_weights),
        _check_fraction(clipped_share, "clipped_share", 1.0),
    )


def make_fundus_images(
    n: int,
    size: int = 128,
    seed: int = 0,
    grade_weights: Sequence[float] = APTOS_GRADE_COUNTS,
    clipped_share: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a seeded set of synthetic fundus photographs with a given class balance.

    Parameters
    ----------
    n : int
        Number of images, at least 1.
    size : int, default 128
        Width and height in pixels, at least 16.
    seed : int, default 0
        Non-negative seed; image i is drawn from its own child seed ``(seed, i)``.
    grade_weights : sequence of 5 non-negative floats, default APTOS_GRADE_COUNTS
        Relative share of grades 0-4. Counts follow it as closely as possible
        (largest-remainder allocation); the order is a seeded shuffle.
    clipped_share : float in [0, 1], default 0.3
        Expected share of images cut flat at top and bottom (see ``make_fundus``'s ``clip``);
        a clipped image gets a clip drawn uniformly from [0.1, 0.3].

    Returns
    -------
    images : numpy.ndarray
        uint8 (n, size, size, 3), RGB in 0-255.
    grades : numpy.ndarray
        int64 (n,), in 0-4.

    Raises
    ------
    ValueError
        If any argument is out of range (see Parameters).

    Notes
    -----
    Image i depends only on ``seed``, ``i`` and its grade: the same (seed, i) gives the same
    eye, illumination and clip whatever ``n``. Its grade can change with ``n``, since exact
    class counts for every ``n`` cannot also fix every image's grade; most grades do persist.
    """
    n, size, seed, weights, clipped_share = _check_dataset_args(
        n, size, seed, grade_weights, clipped_share
    )
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    grades = np.empty(n, dtype=np.int64)
    for index, (grade, image) in enumerate(
        _iter_fundus_images(n, size, seed, weights, clipped_share)
    ):
        images[index] = image
        grades[index] = grade
    return images, grades


def write_synthetic_dataset(
    directory: str | os.PathLike,
    n: int = 500,
    size: int = 256,
    seed: int = 0,
    grade_weights: Sequence[float] = APTOS_GRADE_COUNTS,
    clipped_share: float = 0.3,
) -> pathlib.Path:
    """Write a synthetic dataset in the APTOS 2019 layout, unless it is already there.

    Writes ``directory/train_images/<id_code>.png`` (id codes ``syn00000``, ``syn00001``, ...),
    ``directory/train.csv`` with columns ``id_code,diagnosis``, and last
    ``directory/synthetic.json`` recording the parameters. If ``synthetic.json`` already holds
    the same parameters and every listed image exists, nothing is written.

    Parameters
    ----------
    directory : str or os.PathLike
        Where to write; created if missing.
    n, size, seed, grade_weights, clipped_share
        As in ``make_fundus_images`` (here ``size`` defaults to 256 and ``n`` to 500).

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    ValueError
        If any argument is out of range.

    Notes
    -----
    ``synthetic.json`` is removed before and written after everything else, each file going
    through a temporary name, so an interrupted run is never taken for a complete one.
    Images from an earlier, larger ``n`` are left in place but are not listed in train.csv.
    """
    n, size, seed, weights, clipped_share = _check_dataset_args(
        n, size, seed, grade_weights, clipped_share
    )
    directory = pathlib.Path(directory)
    image_dir = directory / "train_images"
    manifest_path = directory / "synthetic.json"
    csv_path = directory / "train.csv"
    parameters = {
        "generator": "drnb.synthetic",
        "generator_version": _GENERATOR_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
        "grade_weights": weights.tolist(),
        "clipped_share": clipped_share,
    }
    id_codes = [f"syn{index:05d}" for index in range(n)]

    if manifest_path.is_file() and csv_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == parameters and all(
            (image_dir / f"{id_code}.png").is_file() for id_code in id_codes
        ):
            return directory

    manifest_path.unlink(missing_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    grades = []
    for id_code, (grade, image) in zip(
        id_codes, _iter_fundus_images(n, size, seed, weights, clipped_share)
    ):
        with atomic_path(image_dir / f"{id_code}.png") as partial_path:
            # Level 1 writes about 2.5x faster than the default for files ~30% larger.
            Image.fromarray(image).save(partial_path, format="PNG", compress_level=1)
        grades.append(grade)

    with atomic_path(csv_path) as partial_csv, open(partial_csv, "x", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id_code", "diagnosis"])
        writer.writerows(zip(id_codes, grades))
    write_text_atomically(manifest_path, json.dumps(parameters, indent=2) + "\n")
    return directory
