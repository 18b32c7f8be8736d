"""Shared fixtures: fundus-like drawings and image files in the layouts drnb reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _draw_fundus(
    height: int,
    width: int,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
    clip: float | None = None,
    colour: tuple[int, int, int] = (200, 100, 40),
) -> np.ndarray:
    """A bright, radially shaded disc on black, like a fundus photograph.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    center : (row, col), optional
        Disc centre in pixel coordinates (pixel centres at i + 0.5); default the image centre.
    radius : float, optional
        Disc radius in pixels; default 0.45 of the smaller side.
    clip : float, optional
        Rows farther than ``clip`` pixels from the centre row are blacked out, as in a
        photograph cut flat at the top and bottom (APTOS 2019).
    colour : (r, g, b)
        Colour at the disc centre; it darkens to 60 % towards the rim, never below 30.

    Returns
    -------
    numpy.ndarray
        uint8 (height, width, 3); exactly 0 outside the disc and in clipped rows.
    """
    center_row, center_col = center if center is not None else (height / 2, width / 2)
    radius = radius if radius is not None else 0.45 * min(height, width)
    rows, cols = np.mgrid[:height, :width]
    distance = np.hypot(rows + 0.5 - center_row, cols + 0.5 - center_col)
    inside = distance <= radius
    if clip is not None:
        inside &= np.abs(rows + 0.5 - center_row) <= clip
    shade = 1.0 - 0.4 * np.clip(distance / radius, 0.0, 1.0)
    image = np.clip(np.asarray(colour, dtype=np.float64) * shade[..., None], 30, 255).astype(np.uint8)
    return np.where(inside[..., None], image, 0).astype(np.uint8)


@pytest.fixture
def draw_fundus():
    """Function ``draw_fundus(height, width, center=None, radius=None, clip=None, colour=...)``.

    Returns a uint8 (height, width, 3) bright disc on black (see ``_draw_fundus``).
    """
    return _draw_fundus


def _write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> Path:
    """Save a uint8 (H, W, 3) array with PIL, the format taken from the suffix; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(path, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(path)
    return path


@pytest.fixture
def write_image():
    """Function ``write_image(path, image)``: save a uint8 (H, W, 3) array as PNG or JPEG by suffix."""
    return _write_image


@pytest.fixture
def write_fundus():
    """Function ``write_fundus(path, height=48, width=64, **draw_kwargs)``: draw a disc and save it.

    Returns the path. Small sizes keep the tests fast; ``draw_kwargs`` go to ``draw_fundus``.
    """

    def write(path: str | Path, height: int = 48, width: int = 64, **draw_kwargs) -> Path:
        return _write_image(path, _draw_fundus(height, width, **draw_kwargs))

    return write


@pytest.fixture
def isolated_drnb_dirs(tmp_path, monkeypatch):
    """Point ``$DRNB_DATA`` and ``$DRNB_CACHE`` into ``tmp_path``, so nothing reads or writes the
    real data or cache folders. Returns ``(data_root, cache_root)``; neither exists yet.
    """
    data_root, cache_root = tmp_path / "drnb-data", tmp_path / "drnb-cache"
    monkeypatch.setenv("DRNB_DATA", str(data_root))
    monkeypatch.setenv("DRNB_CACHE", str(cache_root))
    return data_root, cache_root


def _benchmark_script(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def benchmark_module():
    """``benchmarks/run_benchmarks.py`` as a module."""
    return _benchmark_script("run_benchmarks")


@pytest.fixture(scope="session")
def study_module():
    """``benchmarks/accelerator_study.py`` as a module."""
    return _benchmark_script("accelerator_study")


@pytest.fixture(scope="session")
def tiny_fundus_set():
    """80 synthetic 32-px photographs: images uint8 (80, 32, 32, 3), grades int (80,) in 0-4,
    and their dataset table (no files, no patients)."""
    import pandas as pd

    from drnb.synthetic import make_fundus_images

    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    return images, grades, table


@pytest.fixture
def linear_settings():
    """``--set`` values that make the smoke profile evaluate both methods linearly alone, as
    quick's linear protocol does: a ridge-fitted regression head on frozen features, no epoch,
    cut points by the prior."""
    return {
        "methods": "rotation,scratch", "bootstrap_resamples": "10", "calibration_images": "40", "target": "regression",
        "finetune_hidden": "", "head_init": "ridge", "test_time_turns": "4", "cut_points": "prior",
        "warmup_epochs": "0", "finetune_epochs": "0", "validation_fraction": "0",
        "recalibrate_batchnorm": "true", "protocols": "linear",
    }


@pytest.fixture
def autotune_of_iterated_datasets(monkeypatch):
    """A list that records, for every ``tf.data.Dataset`` iterated from now on in the test,
    whether its tf.data autotuning was enabled (``None``: the default, on)."""
    import tensorflow as tf

    recorded = []
    iterate = tf.data.Dataset.__iter__

    def recording_iter(dataset):
        recorded.append(dataset.options().autotune.enabled)
        return iterate(dataset)

    monkeypatch.setattr(tf.data.Dataset, "__iter__", recording_iter)
    return recorded
