"""Fundus preprocessing: find the disc, square it without squashing, mask it, cache it.

A network asked which way an image was rotated will take the easiest clue it finds. In raw
photographs that is the frame: black borders wider than tall, circles cut flat at the top
and bottom (APTOS 2019), a camera notch at the rim (IDRiD). So every image is

1. searched for the fundus disc (the bright region against the black surround);
2. cropped to the disc's bounding square and padded with black where the photograph clipped
   it, so the circle is never squashed;
3. resized to ``size`` x ``size``;
4. masked with a shape that looks the same under every 90-degree rotation: the disc circle
   (shrunk by ``margin`` to drop the rim and notch) intersected with a centred square whose
   half-side is the smallest visible half-extent of the fundus. For a full circle the square
   does nothing; for a circle cut flat at top and bottom it cuts the left and right sides by
   the same amount, so the flat edges carry no clue of the orientation;
5. optionally normalised for local colour (Ben Graham's method, Kaggle 2015), the local
   mean taken over the fundus alone so that no halo marks its edges (before the mask).

:func:`preprocess_table` does this for a whole dataset on all cores and caches the result per
(files, parameters) pair: the images (uint8 ``.npy``), each photograph's format before
preprocessing (``.format.npy``) and the rows kept (``.kept.npy``, written last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from drnb.datasets import NPZ_SEPARATOR, read_image
from drnb.files import atomic_path

logger = logging.getLogger(__name__)

CACHE_VERSION = 5  # bump when the preprocessing algorithm changes, so old caches are not reused
# find_fundus searches a thumbnail no larger than this many pixels a side.
FIND_SIDE = 512


@dataclass(frozen=True)
class FundusGeometry:
    """Where the fundus lies in a photograph, in that photograph's pixel coordinates.

    ``radius`` is the full disc's radius; ``half_extent`` the smaller of the visible
    half-width and half-height (equal to ``radius`` for an unclipped disc).
    """

    center_row: float
    center_col: float
    radius: float
    half_extent: float


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of :func:`preprocess_image`; also the cache key, with the files."""

    size: int = 128
    margin: float = 0.03
    ben_graham: bool = False
    threshold: int = 20

    def __post_init__(self):
        if not (isinstance(self.size, (int, np.integer)) and 16 <= self.size <= 2048):
            raise ValueError(f"size={self.size!r}: expected an integer number of pixels in [16, 2048]")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin={self.margin!r}: expected a fraction of the radius in [0, 0.5)")
        if not 0 < self.threshold < 255:
            raise ValueError(f"threshold={self.threshold!r}: expected a grey level in (0, 255)")


def find_fundus(image: np.ndarray, threshold: int = 20) -> FundusGeometry:
    """Locate the fundus disc in a photograph on a dark background.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 (H, W, 3).
    threshold : int
        Grey level (of the brightest channel) above which a pixel counts as fundus.

    Returns
    -------
    FundusGeometry

    Raises
    ------
    ValueError
        When no bright region is found (an all-black image), or the image is (nearly) one
        grey level everywhere (a flat square, not a photograph on a dark background).

    Notes
    -----
    A disc clipped by the frame is assumed to be clipped symmetrically (top and bottom, or
    left and right), as cameras crop; a disc cut on one side only is found off-centre.
    """
    from scipy import ndimage

    # Search a thumbnail of at most FIND_SIDE pixels a side: the disc's extent is needed to a
    # fraction of a percent, and the morphology below on a full 3,000-pixel photograph (APTOS)
    # takes seconds per image instead of milliseconds. Small images are searched as they are.
    stride = max(1, int(np.ceil(max(image.shape[:2]) / FIND_SIDE)))
    brightest = image[::stride, ::stride].max(axis=2)
    foreground = brightest > threshold
    if foreground.any():
        _check_not_constant(brightest)
    # Speckle and noise in the border (common in contrast-enhanced copies) would widen the
    # disc: open the mask, then keep its largest connected region, the fundus.
    opening = max(1, round(min(brightest.shape) / 100))
    foreground = ndimage.binary_opening(foreground, structure=np.ones((2 * opening + 1,) * 2, bool))
    labels, count = ndimage.label(foreground)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        foreground = labels == 1 + int(np.argmax(sizes))
    # A row or column belongs to the fundus when a few percent of it is bright; this ignores
    # what is left of stray pixels and small marks (text wider than that is not ignored).
    rows = np.flatnonzero(foreground.sum(axis=1) > 0.02 * brightest.shape[1])
    cols = np.flatnonzero(foreground.sum(axis=0) > 0.02 * brightest.shape[0])
    if rows.size < 4 or cols.size < 4:
        raise ValueError("no fundus found: the image is (almost) entirely dark")
    # Back to the photograph's pixels: thumbnail pixel i covers rows [i * stride, (i + 1) * stride).
    first_row, end_row = rows[0] * stride, min((rows[-1] + 1) * stride, image.shape[0])
    first_col, end_col = cols[0] * stride, min((cols[-1] + 1) * stride, image.shape[1])
    height = end_row - first_row
    width = end_col - first_col
    return FundusGeometry(
        center_row=(first_row + end_row) / 2,
        center_col=(first_col + end_col) / 2,
        radius=max(height, width) / 2,
        half_extent=min(height, width) / 2,
    )


# A photograph's brightest channel spans more grey levels than this between its 1st and 99th
# percentiles (dark background, bright disc, vessels); one that does not is a flat square,
# such as a 16-bit file decoded with its values clipped to white.
CONSTANT_SPREAD = 8


def _check_not_constant(brightest: np.ndarray) -> None:
    """ValueError when ``brightest`` (uint8 (H, W), each pixel's brightest channel) is
    (nearly) one grey level everywhere: no fundus on a background to find."""
    low, high = np.percentile(brightest, [1, 99])
    if high - low < CONSTANT_SPREAD:
        raise ValueError(
            f"no fundus found: the image is (almost) one grey level everywhere (about {int(np.median(brightest))} "
            f"of 255); expected a bright fundus on a dark background"
        )


def rotation_invariant_mask(size: int, radius_fraction: float, square_fraction: float) -> np.ndarray:
    """Disc of ``radius_fraction * size / 2`` cut by a centred square of half-side ``square_fraction * size / 2``.

    Returns
    -------
    numpy.ndarray
        bool (size, size); identical under ``np.rot90`` by any multiple of 90 degrees and
        under horizontal and vertical flips.
    """
    coordinates = np.arange(size) - (size - 1) / 2
    rows, cols = np.meshgrid(coordinates, coordinates, indexing="ij")
    half = size / 2
    disc = rows**2 + cols**2 <= (radius_fraction * half) ** 2
    square = np.maximum(np.abs(rows), np.abs(cols)) <= square_fraction * half
    return disc & square


def fundus_mask(image: np.ndarray) -> np.ndarray:
    """The retina of a preprocessed image: its pixels that are not black, with the black they enclose.

    Read off the image rather than rebuilt with :func:`rotation_invariant_mask`: where a
    photograph's disc falls short of the mask (the corners of a disc cut flat), the mask holds
    black that is no retina. Enclosed black is kept: dark lesions that Ben Graham's
    normalisation clipped to 0.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 (H, W, 3), black outside the fundus (as :func:`preprocess_image` returns it).

    Returns
    -------
    numpy.ndarray
        bool (H, W); all False for an all-black image.
    """
    from scipy import ndimage

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image has shape {image.shape}; expected an (H, W, 3) preprocessed image")
    return ndimage.binary_fill_holes(image.max(axis=2) > 0)


def ben_graham(image: np.ndarray, sigma: float, fundus: np.ndarray | None = None) -> np.ndarray:
    """Ben Graham's local colour normalisation: ``4 * image - 4 * local_mean(image) + 128``.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 (H, W, 3).
    sigma : float
        Gaussian radius of the local mean, in pixels (Graham used about a thirtieth of the
        disc diameter).
    fundus : numpy.ndarray, optional
        bool (H, W): the pixels the local mean is taken over (the photograph's fundus). The
        mean is a normalised convolution, ``blur(image * fundus) / blur(fundus)``, so the
        black background does not darken it near the rim. Graham blurred the background in,
        which leaves a bright halo along the fundus's edge; where a photograph is cut flat
        (top and bottom) and drnb's mask then cuts all four sides, that halo would mark two
        sides only and give the rotation away. Default: every pixel.

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3), mid-grey where the image is locally flat.
    """
    from scipy import ndimage

    weights = np.ones(image.shape[:2], np.float32) if fundus is None else fundus.astype(np.float32)
    if weights.shape != image.shape[:2]:
        raise ValueError(f"fundus has shape {weights.shape}; expected the image's {image.shape[:2]}")
    pixels = image.astype(np.float32)
    total = ndimage.gaussian_filter(pixels * weights[..., None], sigma=(sigma, sigma, 0), mode="constant")
    coverage = ndimage.gaussian_filter(weights, sigma=sigma, mode="constant")[..., None]
    local_mean = np.where(coverage > 1e-3, total / np.maximum(coverage, 1e-3), pixels)
    return np.clip(4.0 * pixels - 4.0 * local_mean + 128.0, 0, 255).astype(np.uint8)


def preprocess_image(
    image: np.ndarray, config: PreprocessConfig = PreprocessConfig(), geometry: FundusGeometry | None = None
) -> np.ndarray:
    """Crop, square, resize and mask one fundus photograph.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 (H, W, 3) RGB, any size, fundus on a dark background.
    config : PreprocessConfig
    geometry : FundusGeometry, optional
        Where the fundus lies, when already found; default :func:`find_fundus`.

    Returns
    -------
    numpy.ndarray
        uint8 (size, size, 3), disc centred, zero outside the rotation-invariant mask.
    """
    from PIL import Image

    geometry = geometry or find_fundus(image, config.threshold)
    radius = int(np.ceil(geometry.radius))
    top = int(round(geometry.center_row)) - radius
    left = int(round(geometry.center_col)) - radius
    square = np.zeros((2 * radius, 2 * radius, 3), dtype=np.uint8)
    # Copy the part of the bounding square that lies inside the photograph; the rest stays black.
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom = min(top + 2 * radius, image.shape[0])
    src_right = min(left + 2 * radius, image.shape[1])
    square[src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
        src_top:src_bottom, src_left:src_right
    ]
    resized = np.asarray(
        Image.fromarray(square).resize((config.size, config.size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    )
    if config.ben_graham:
        resized = ben_graham(resized, sigma=config.size / 30, fundus=resized.max(axis=2) > config.threshold)
    mask = rotation_invariant_mask(
        config.size,
        radius_fraction=1 - config.margin,
        square_fraction=(geometry.half_extent / geometry.radius) * (1 - config.margin),
    )
    return np.where(mask[..., None], resized, 0).astype(np.uint8)


# What each photograph's file and fundus look like before preprocessing: the camera and
# clinic, not the disease (drnb.photo_format fits a grader on these alone).
FORMAT_COLUMNS = ("width", "height", "fundus_radius", "fundus_half_extent")


def photograph_format(image: np.ndarray, geometry: FundusGeometry) -> tuple[float, float, float, float]:
    """``(width, height, fundus_radius, fundus_half_extent)`` of a photograph, in its pixels."""
    return float(image.shape[1]), float(image.shape[0]), float(geometry.radius), float(geometry.half_extent)


def _preprocess_paths(paths: list[str], config: PreprocessConfig) -> list[tuple[np.ndarray, tuple] | str]:
    # Runs in a worker process: returns (image, format) for a file, or the error message for it.
    results = []
    for path in paths:
        try:
            photograph = read_image(path)
            geometry = find_fundus(photograph, config.threshold)
            results.append((preprocess_image(photograph, config, geometry), photograph_format(photograph, geometry)))
        except ValueError as error:
            message = str(error)
            results.append(message if path in message else f"{path}: {message}")
    return results


def cache_key(table: pd.DataFrame, config: PreprocessConfig) -> str:
    """Hash of the preprocessing parameters and every image file's path, size and mtime.

    A changed, added or removed file, or a changed parameter, gives a new key, so a stale
    cache is never read.
    """
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **asdict(config)}, sort_keys=True).encode())
    for path in table["path"]:
        file_path = path.split(NPZ_SEPARATOR)[0]
        stat = os.stat(file_path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    """``$DRNB_CACHE``, else ``~/.cache/drnb``."""
    return Path(os.environ.get("DRNB_CACHE", Path.home() / ".cache" / "drnb")).expanduser()


def preprocess_table(
    table: pd.DataFrame,
    config: PreprocessConfig = PreprocessConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    drop_unreadable: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Preprocess every image of a dataset table, reading from and writing to the cache.

    Parameters
    ----------
    table : pandas.DataFrame
        A table from :func:`drnb.datasets.load_dataset`.
    config : PreprocessConfig
    cache_dir : path, optional
        Default :func:`default_cache_dir`; ``False``-y strings are not accepted, pass a path.
    workers : int, optional
        Processes to decode with; default all cores.
    drop_unreadable : bool
        Images that cannot be decoded raise a ``ValueError`` (all counted, the first few
        named); with ``drop_unreadable`` they are dropped with a warning instead.
    progress : bool
        Print a progress bar to stderr.

    Returns
    -------
    images : numpy.ndarray
        uint8 (N, size, size, 3).
    table : pandas.DataFrame
        The rows of ``table`` that ``images`` holds, in the same order, index reset, with the
        photographs' :data:`FORMAT_COLUMNS` added (pixels of the file as read).
    """
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(table, config)
    images_path = cache_root / f"fundus_{key}.npy"
    kept_path = cache_root / f"fundus_{key}.kept.npy"
    format_path = cache_root / f"fundus_{key}.format.npy"
    cached = read_cache_entry(images_path, format_path, kept_path, len(table))
    if cached is not None:
        images, formats, kept = cached
        logger.info("preprocessed images read from cache %s", images_path)
        if len(kept) < len(table):
            # The cache was written by a run that dropped unreadable images: same rule again.
            _drop_or_raise_unreadable(table["path"].drop(table.index[kept]).tolist(), len(table), drop_unreadable)
        return images, with_format(table.iloc[kept], formats)

    results = _preprocess_all(table["path"].tolist(), config, workers, progress)
    failures = [result for result in results if isinstance(result, str)]
    if failures:
        _drop_or_raise_unreadable(failures, len(table), drop_unreadable)
    kept = np.array([i for i, result in enumerate(results) if not isinstance(result, str)], dtype=np.int64)
    if kept.size == 0:
        raise ValueError("no image of the dataset could be preprocessed")
    images = np.stack([results[i][0] for i in kept])
    formats = np.array([results[i][1] for i in kept], dtype=np.float64)

    # Written to temporary names and renamed, so an interrupted run never leaves a half cache;
    # the list of kept rows last, as the images and formats are read only with it.
    for path, array in ((images_path, images), (format_path, formats), (kept_path, kept)):
        with atomic_path(path) as temporary:  # ends in .npy, as the cache's names do
            np.save(temporary, array)
    return images, with_format(table.iloc[kept], formats)


def _drop_or_raise_unreadable(failures: list[str], total: int, drop_unreadable: bool) -> None:
    """Raise naming the first few photographs that could not be preprocessed, or, with
    ``drop_unreadable``, warn that they are dropped."""
    message = f"{len(failures)} of {total} image(s) could not be preprocessed, e.g. {failures[:5]}"
    if not drop_unreadable:
        raise ValueError(message + "; drop_unreadable=True (--set drop_unreadable=true) skips them")
    logger.warning("%s; dropping them", message)


def _preprocess_all(paths: list[str], config: PreprocessConfig, workers: int | None, progress: bool) -> list:
    """:func:`_preprocess_paths` over every path, in chunks on ``workers`` processes, in order."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[start : start + 32] for start in range(0, len(paths), 32)]
    results: list = []
    from tqdm import tqdm

    # A plain text bar, updated every few seconds: saved notebooks keep every update.
    bar = tqdm(
        total=len(paths), desc=f"preprocessing {config.size}px", unit="img", disable=not progress,
        file=sys.stderr, mininterval=5, ascii=True,
    )
    if workers > 1 and len(chunks) > 1:
        # Workers only run PIL and NumPy, never TensorFlow, so forking a parent that has
        # TensorFlow loaded is safe; "spawn" would re-run an unguarded user script's main.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
            for chunk_results in pool.map(_preprocess_paths, chunks, [config] * len(chunks)):
                results.extend(chunk_results)
                bar.update(len(chunk_results))
    else:
        for chunk in chunks:
            results.extend(_preprocess_paths(chunk, config))
            bar.update(len(chunk))
    bar.close()
    return results


def find_problems(table: pd.DataFrame, config: PreprocessConfig = PreprocessConfig(), *, workers: int | None = None) -> list[str]:
    """Every photograph preprocessing would refuse, one message each (the file and why).

    The same work :func:`preprocess_table` does (decode every file completely, find its
    fundus, crop and mask it), without caching, so a set with no problem here preprocesses.
    """
    results = _preprocess_all(table["path"].tolist(), config, workers, progress=False)
    return [result for result in results if isinstance(result, str)]


def read_cache_entry(images_path: Path, format_path: Path, kept_path: Path, rows: int):
    """A cache entry's arrays, checked against each other; None when there is none.

    A damaged entry (a file cut short by a full disk or a killed run, or arrays that disagree
    in length) is named in a warning and deleted, so that the caller rebuilds it.

    Returns
    -------
    (images, formats, kept) or None
        uint8 (K, S, S, 3); float (K, 4); int64 (K,) rows of the table, each below ``rows``.
    """
    paths = (images_path, format_path, kept_path)
    if not all(path.exists() for path in paths):
        return None
    try:
        images, formats, kept = (np.load(path, allow_pickle=False) for path in paths)
        if not (len(images) == len(formats) == len(kept)) or (len(kept) and not 0 <= kept.min() <= kept.max() < rows):
            raise ValueError(f"{len(images)} images, {len(formats)} formats and {len(kept)} rows for a table of {rows}")
    except (OSError, ValueError, EOFError) as error:
        logger.warning("preprocessing cache entry %s is damaged (%s); rebuilding it", images_path, error)
        for path in paths:
            path.unlink(missing_ok=True)
        return None
    return images, formats, kept


def with_format(rows: pd.DataFrame, formats: np.ndarray) -> pd.DataFrame:
    """``rows`` (index reset) with :data:`FORMAT_COLUMNS` from ``formats``, float (len(rows), 4)."""
    rows = rows.reset_index(drop=True).copy()
    for column, values in zip(FORMAT_COLUMNS, np.asarray(formats, np.float64).T):
        rows[column] = values
    return rows
