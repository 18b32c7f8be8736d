"""Tests for drnb.preprocessing: the disc is found, centred, squared and masked so that the
frame carries no clue of a rotation; the cache is hit only for the same files and parameters.

Geometry is checked on discs drawn with NumPy whose centre and radius are known: one on a
wide black border (IDRiD), one cut flat at top and bottom (APTOS 2019), one off-centre.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import drnb.preprocessing as preprocessing
from drnb.datasets import load_dataset, read_image
from drnb.preprocessing import (
    FIND_SIDE,
    PreprocessConfig,
    ben_graham,
    cache_key,
    find_fundus,
    fundus_mask,
    preprocess_image,
    preprocess_table,
    rotation_invariant_mask,
)
from drnb.synthetic import make_fundus

GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

# name -> (height, width, center (row, col), radius, clip): discs with known geometry.
LAYOUTS = {
    "wide_border": (170, 256, (85, 128), 80, None),  # IDRiD: black left and right of the disc
    "clipped_rows": (150, 200, (75, 100), 95, 70),  # APTOS: cut flat, black rows above and below
    "clipped_frame": (140, 200, (70, 100), 95, None),  # APTOS: cut flat by the photograph's edge
    "off_centre": (200, 300, (70, 200), 50, None),
    "odd_sizes": (151, 203, (75.5, 101.5), 95, 70),
}


def marked_fundus(draw_fundus, height, width, center, radius, clip):
    """A drawn disc with a green spot at its centre and a blue spot half a radius to its right."""
    image = draw_fundus(height, width, center=center, radius=radius, clip=clip)
    rows, cols = np.mgrid[:height, :width]
    for colour, offset in ((GREEN, 0.0), (BLUE, radius / 2)):
        spot = np.hypot(rows + 0.5 - center[0], cols + 0.5 - center[1] - offset) <= 0.08 * radius
        image[spot] = colour
    return image


def spot_centre(image: np.ndarray, channel: int) -> np.ndarray:
    """(row, col) mean of the pixels where ``channel`` is bright and red is dark."""
    pixels = (image[..., channel] > 180) & (image[..., 0] < 80)
    assert pixels.any()
    return np.argwhere(pixels).mean(axis=0)


def support(image: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels not black in every channel."""
    return image.max(axis=2) > 0


def assert_rotation_invariant(mask: np.ndarray) -> None:
    for k in (1, 2, 3):
        np.testing.assert_array_equal(np.rot90(mask, k), mask, err_msg=f"differs after rot90 k={k}")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_find_fundus_recovers_the_drawn_disc(draw_fundus, layout):
    height, width, (center_row, center_col), radius, clip = LAYOUTS[layout]
    geometry = find_fundus(draw_fundus(height, width, center=(center_row, center_col), radius=radius, clip=clip))
    assert geometry.center_row == pytest.approx(center_row, abs=1)
    assert geometry.center_col == pytest.approx(center_col, abs=1)
    assert geometry.radius == pytest.approx(radius, abs=1)
    visible = min(radius, clip or radius, center_row, height - center_row)
    assert geometry.half_extent == pytest.approx(visible, abs=1)


@pytest.mark.parametrize(
    "height, width, center, radius, clip",
    [
        (2136, 3216, (1068, 1608), 1200, 1068),  # APTOS's largest: cut flat top and bottom
        (1736, 2416, (868, 1208), 850, None),  # a full disc with black left and right
        (1050, 1050, (525, 525), 520, None),  # square, just over FIND_SIDE
    ],
)
def test_find_fundus_on_large_photographs_is_accurate_to_a_thumbnail_pixel(draw_fundus, height, width, center, radius, clip):
    # Large photographs are searched on a thumbnail: the geometry may be off by one thumbnail
    # pixel (``stride`` photograph pixels), under half a pixel of a 224 px output.
    stride = int(np.ceil(max(height, width) / FIND_SIDE))
    assert stride > 1
    geometry = find_fundus(draw_fundus(height, width, center=center, radius=radius, clip=clip))
    assert geometry.center_row == pytest.approx(center[0], abs=stride)
    assert geometry.center_col == pytest.approx(center[1], abs=stride)
    assert geometry.radius == pytest.approx(radius, abs=stride)
    assert geometry.half_extent == pytest.approx(min(radius, clip or radius, center[0]), abs=stride)


def test_find_fundus_ignores_stray_bright_pixels_in_the_border(draw_fundus):
    image = draw_fundus(425, 640, center=(212.5, 320), radius=200)  # IDRiD's downsized shape
    clean = find_fundus(image)
    # A small mark in a corner and sparse salt noise over the whole border: each row and column
    # they touch is bright over less than 2 % of its length, the rule's threshold.
    image[5:10, 3:12] = 255
    noise = np.random.default_rng(0).random(image.shape[:2]) < 0.003
    image[noise & ~image.any(axis=2)] = 255
    assert find_fundus(image) == clean


def test_find_fundus_ignores_a_band_of_speckle_beside_the_disc(draw_fundus):
    # Like the contrast-enhanced EyePACS copy: a fifth of the border pixels in the disc's rows
    # are speckle of grey level 30-90.
    image = draw_fundus(224, 224, center=(112, 112), radius=75)
    rng = np.random.default_rng(0)
    speckle = (rng.random((224, 224)) < 0.2) & ~image.any(axis=2)
    speckle[:40] = speckle[185:] = False
    image[speckle] = rng.integers(30, 90, size=(int(speckle.sum()), 1), dtype=np.uint8)
    geometry = find_fundus(image)
    assert geometry.radius == pytest.approx(75, abs=3)
    assert geometry.half_extent == pytest.approx(75, abs=3)


@pytest.mark.parametrize("size", [32, 65, 128])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_output_is_a_centred_masked_square(draw_fundus, layout, size):
    height, width, center, radius, clip = LAYOUTS[layout]
    image = marked_fundus(draw_fundus, height, width, center, radius, clip)
    out = preprocess_image(image, PreprocessConfig(size=size))
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert not corner.any()
    middle = (size - 1) / 2
    np.testing.assert_allclose(np.argwhere(support(out)).mean(axis=0), [middle, middle], atol=1.0)
    # The support is exactly the documented mask: the disc fills it, nothing lies outside it.
    geometry = find_fundus(image)
    mask = rotation_invariant_mask(size, 0.97, 0.97 * geometry.half_extent / geometry.radius)
    np.testing.assert_array_equal(support(out), mask)
    # Inside the mask every pixel keeps the disc's brightness (drawn at 30-255): no black holes.
    assert out[mask].max(axis=-1).min() >= 25


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_disc_centre_lands_at_the_centre_without_squashing(draw_fundus, layout):
    height, width, center, radius, clip = LAYOUTS[layout]
    size = 128
    out = preprocess_image(marked_fundus(draw_fundus, height, width, center, radius, clip), PreprocessConfig(size=size))
    middle = (size - 1) / 2
    # The green spot marks the disc centre; the blue one lies half a radius to its right,
    # so it lands a quarter of the output to the right whatever the aspect of the photograph.
    np.testing.assert_allclose(spot_centre(out, 1), [middle, middle], atol=1.5)
    np.testing.assert_allclose(spot_centre(out, 2), [middle, middle + size / 4], atol=1.5)


@pytest.mark.parametrize("layout", ["clipped_rows", "clipped_frame", "odd_sizes"])
def test_clipped_disc_support_carries_no_clue_of_rotation(draw_fundus, layout):
    height, width, center, radius, clip = LAYOUTS[layout]
    image = draw_fundus(height, width, center=center, radius=radius, clip=clip)
    for size in (32, 64, 97):
        out = preprocess_image(image, PreprocessConfig(size=size))
        nonzero = support(out)
        assert_rotation_invariant(nonzero)
        # The flat cut is not hidden by accident: the mask is smaller than the full circle.
        assert nonzero.sum() < rotation_invariant_mask(size, 0.97, 1.0).sum()


def test_rotated_photograph_gives_the_rotated_output(draw_fundus):
    # Preprocessing commutes with a quarter turn of a square photograph: the frame adds nothing.
    image = marked_fundus(draw_fundus, 160, 160, (80, 80), 75, 55)
    out = preprocess_image(image, PreprocessConfig(size=64))
    for k in (1, 2, 3):
        turned = preprocess_image(np.ascontiguousarray(np.rot90(image, k)), PreprocessConfig(size=64))
        np.testing.assert_array_equal(support(turned), support(out))
        np.testing.assert_allclose(
            spot_centre(turned, 2), spot_centre(np.rot90(out, k), 2), atol=1.0, err_msg=f"k={k}"
        )


@pytest.mark.parametrize(
    ("radius_fraction", "square_fraction"), [(1.0, 1.0), (0.97, 0.7), (0.9, 0.5), (0.6, 0.9)]
)
@pytest.mark.parametrize("size", [16, 33, 64])
def test_rotation_invariant_mask_is_invariant(size, radius_fraction, square_fraction):
    mask = rotation_invariant_mask(size, radius_fraction, square_fraction)
    assert mask.shape == (size, size) and mask.dtype == bool
    assert mask.any() and not mask[0, 0]
    assert_rotation_invariant(mask)
    np.testing.assert_array_equal(mask[::-1], mask)
    np.testing.assert_array_equal(mask[:, ::-1], mask)


def test_mask_of_a_clipped_disc_is_cut_on_all_four_sides():
    size = 64
    mask = rotation_invariant_mask(size, 0.97, 0.6)
    half_side = 0.6 * size / 2
    for line in (mask[size // 2], mask[:, size // 2]):
        assert line.sum() == pytest.approx(2 * half_side, abs=1)


@pytest.mark.parametrize("layout", ["wide_border", "clipped_rows", "odd_sizes"])
@pytest.mark.parametrize("graham", [False, True])
def test_fundus_mask_is_the_retina_with_its_dark_lesions(draw_fundus, layout, graham):
    height, width, center, radius, clip = LAYOUTS[layout]
    config = PreprocessConfig(size=63, ben_graham=graham)
    geometry = find_fundus(draw_fundus(height, width, center=center, radius=radius, clip=clip))
    image = preprocess_image(draw_fundus(height, width, center=center, radius=radius, clip=clip), config, geometry)
    cut = rotation_invariant_mask(63, 1 - config.margin, geometry.half_extent / geometry.radius * (1 - config.margin))
    np.testing.assert_array_equal(fundus_mask(image), cut)
    # A black blot inside (a lesion Ben Graham clipped to 0) stays; black reaching in from the
    # rim (a disc that falls short of the mask) goes.
    image[20:26, 30:36] = 0
    image[:, :8] = 0
    np.testing.assert_array_equal(fundus_mask(image), cut & (np.arange(63) >= 8))
    assert not fundus_mask(np.zeros((16, 16, 3), np.uint8)).any()
    with pytest.raises(ValueError, match="preprocessed"):
        fundus_mask(np.zeros((16, 16), np.uint8))


def test_margin_shrinks_the_disc(draw_fundus):
    image = draw_fundus(170, 256, center=(85, 128), radius=80)
    small = support(preprocess_image(image, PreprocessConfig(size=64, margin=0.2)))
    large = support(preprocess_image(image, PreprocessConfig(size=64, margin=0.0)))
    assert small.sum() < large.sum() and not (small & ~large).any()


def test_ben_graham_changes_the_inside_and_keeps_the_outside_black(draw_fundus):
    image = marked_fundus(draw_fundus, *LAYOUTS["clipped_rows"])
    plain = preprocess_image(image, PreprocessConfig(size=64))
    graham = preprocess_image(image, PreprocessConfig(size=64, ben_graham=True))
    assert graham.shape == plain.shape and graham.dtype == np.uint8
    inside = support(plain)
    assert not graham[~inside].any()
    assert np.abs(graham[inside].astype(int) - plain[inside]).mean() > 10
    # Locally flat regions become mid-grey.
    flat = ben_graham(np.full((32, 32, 3), 90, np.uint8), sigma=2)
    assert (np.abs(flat.astype(int) - 128) <= 1).all()


def test_ben_graham_leaves_no_halo_along_a_flat_cut_that_would_give_the_rotation_away(draw_fundus):
    # A resized photograph cut flat at top and bottom, as preprocess_image holds it before masking.
    size, sigma = 64, 64 / 30
    square = draw_fundus(size, size, center=(32, 32), radius=32, clip=22)
    mask = rotation_invariant_mask(size, 0.97, 22 / 32 * 0.97)

    def rotation_cue(image):  # how much the masked image differs from itself turned a quarter
        masked = np.where(mask[..., None], image, 0).astype(int)
        return np.abs(masked - np.rot90(masked))[mask].mean()  # grey levels per pixel inside the mask

    over_fundus = ben_graham(square, sigma, fundus=square.max(axis=2) > 20)
    over_everything = ben_graham(square, sigma)  # Graham's own: the black rows blurred in
    assert rotation_cue(over_everything) > 8  # a saturated band along the cut edges only
    assert rotation_cue(over_fundus) < 1.5
    assert np.abs(over_fundus[mask].astype(int) - 128).mean() < 4  # the smooth shading is flattened
    with pytest.raises(ValueError, match="fundus has shape"):
        ben_graham(square, sigma, fundus=np.ones((3, 3), bool))


@pytest.mark.parametrize(
    "image",
    [np.zeros((60, 80, 3), np.uint8), np.full((60, 80, 3), 15, np.uint8)],
    ids=["black", "below_threshold"],
)
def test_dark_image_raises(image):
    with pytest.raises(ValueError, match="no fundus found"):
        preprocess_image(image)


@pytest.mark.parametrize(
    "changes", [{"size": 8}, {"size": 64.0}, {"margin": 0.5}, {"margin": -0.1}, {"threshold": 0}, {"threshold": 255}]
)
def test_config_rejects_values_out_of_range(changes):
    name = next(iter(changes))
    with pytest.raises(ValueError, match=name):
        PreprocessConfig(**changes)


# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grade", "clip"), [(0, 0.0), (2, 0.25), (4, 0.15)])
def test_synthetic_images_preprocess_cleanly(grade, clip):
    image = make_fundus(grade, 96, np.random.default_rng(grade), clip=clip)
    out = preprocess_image(image, PreprocessConfig(size=48))
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    nonzero = support(out)
    assert not nonzero[0, 0] and not nonzero[-1, -1]
    assert_rotation_invariant(nonzero)
    np.testing.assert_allclose(np.argwhere(nonzero).mean(axis=0), [23.5, 23.5], atol=1.0)
    full_disc = rotation_invariant_mask(48, 0.97, 0.97).sum()
    if clip:
        assert nonzero.sum() < 0.97 * full_disc
    else:
        assert nonzero.sum() >= 0.95 * full_disc


def test_synthetic_dataset_through_preprocess_table(tmp_path):
    table = load_dataset("synthetic", tmp_path / "syn", synthetic_images=5, synthetic_size=48, seed=2)
    images, kept = preprocess_table(table, PreprocessConfig(size=32), cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    pd.testing.assert_frame_equal(kept[table.columns], table)
    for image in images:
        assert_rotation_invariant(support(image))


# --------------------------------------------------------------------------------------------
# preprocess_table and its cache
# --------------------------------------------------------------------------------------------


def write_table(root: Path, write_image, draw_fundus, colours) -> pd.DataFrame:
    """An APTOS layout whose image i is a disc of the colour ``colours[i]``; returns its table."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(len(colours))]
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{n},{i % 5}\n" for i, n in enumerate(ids)))
    for image_id, colour in zip(ids, colours):
        write_image(root / "train_images" / f"{image_id}.png", draw_fundus(40, 56, colour=colour))
    return load_dataset("aptos2019", root)


COLOURS = [(200, 60, 40), (120, 200, 40), (60, 90, 220)]


@pytest.fixture
def counted_reads(monkeypatch):
    """Paths passed to drnb.preprocessing.read_image, in order (the real reader still runs)."""
    paths: list[str] = []
    real = preprocessing.read_image

    def counting(path):
        paths.append(path)
        return real(path)

    monkeypatch.setattr(preprocessing, "read_image", counting)
    return paths


def forbid_reads(monkeypatch):
    def fail(path):
        raise AssertionError(f"decoded {path} although the cache should have been hit")

    monkeypatch.setattr(preprocessing, "read_image", fail)


def run(table, cache_dir, size=32, **kwargs):
    return preprocess_table(table, PreprocessConfig(size=size), cache_dir=cache_dir, workers=1, progress=False, **kwargs)


def test_preprocess_table_keeps_rows_and_images_aligned(tmp_path, write_image, draw_fundus):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    images, kept = run(table, tmp_path / "cache")
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    pd.testing.assert_frame_equal(kept[table.columns], table)
    for image, colour in zip(images, COLOURS):
        assert np.argmax(image[16, 16]) == np.argmax(colour)


def test_preprocess_table_records_each_photographs_format_before_preprocessing(tmp_path, write_image, draw_fundus):
    root = tmp_path / "data"
    (root / "train.csv").parent.mkdir(parents=True)
    (root / "train.csv").write_text("id_code,diagnosis\nwide,0\nclipped,1\n")
    write_image(root / "train_images" / "wide.png", draw_fundus(40, 64, radius=18))
    write_image(root / "train_images" / "clipped.png", draw_fundus(60, 50, radius=22, clip=12))
    table = load_dataset("aptos2019", root)
    for _ in range(2):  # made, then read from the cache
        _, kept = run(table, tmp_path / "cache")
        assert kept[["width", "height"]].to_numpy().tolist() == [[64, 40], [50, 60]]
        np.testing.assert_allclose(kept["fundus_radius"], [18, 22], atol=1.5)
        np.testing.assert_allclose(kept["fundus_half_extent"], [18, 12], atol=1.5)


@pytest.mark.parametrize("damaged", ["fundus_*[0-9a-f].npy", "fundus_*.kept.npy", "fundus_*.format.npy"])
def test_a_truncated_cache_file_is_named_and_rebuilt(tmp_path, write_image, draw_fundus, damaged, caplog):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    cache = tmp_path / "cache"
    images, kept = run(table, cache)
    (path,) = cache.glob(damaged)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a disk that filled up, a killed copy
    with caplog.at_level(logging.WARNING, logger="drnb.preprocessing"):
        rebuilt, rebuilt_kept = run(table, cache)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "rebuilding" in warnings[0]
    np.testing.assert_array_equal(rebuilt, images)
    pd.testing.assert_frame_equal(rebuilt_kept, kept)
    assert path.read_bytes() == data  # the entry is whole again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drnb.preprocessing"):
        run(table, cache)
    assert not caplog.records  # and read as it is from then on


def test_cache_miss_then_hit(tmp_path, write_image, draw_fundus, counted_reads, monkeypatch):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    cache = tmp_path / "cache"
    images, kept = run(table, cache)
    assert counted_reads == table["path"].tolist()
    assert len(list(cache.glob("fundus_*.npy"))) == 3  # images, photograph formats and kept rows

    forbid_reads(monkeypatch)
    cached_images, cached_kept = run(table, cache)
    np.testing.assert_array_equal(cached_images, images)
    pd.testing.assert_frame_equal(cached_kept, kept)


def test_changed_file_is_a_cache_miss(tmp_path, write_image, draw_fundus, counted_reads):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    cache = tmp_path / "cache"
    before, _ = run(table, cache)
    key = cache_key(table, PreprocessConfig(size=32))

    changed = Path(table["path"][1])
    write_image(changed, draw_fundus(40, 56, colour=(250, 250, 250)))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert cache_key(table, PreprocessConfig(size=32)) != key

    counted_reads.clear()
    after, _ = run(table, cache)
    assert len(counted_reads) == 3
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert not np.array_equal(after[1], before[1])  # the new content, not the stale cache
    assert (after[1][16, 16] > 200).all()


def test_touched_file_is_a_cache_miss(tmp_path, write_image, draw_fundus, counted_reads):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    cache = tmp_path / "cache"
    run(table, cache)
    path = table["path"][0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    counted_reads.clear()
    run(table, cache)
    assert len(counted_reads) == 3


def test_changed_parameter_or_rows_is_a_cache_miss(tmp_path, write_image, draw_fundus, counted_reads, monkeypatch):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    cache = tmp_path / "cache"
    run(table, cache, size=32)
    counted_reads.clear()
    images, _ = run(table, cache, size=48)
    assert images.shape == (3, 48, 48, 3)
    assert len(counted_reads) == 3
    counted_reads.clear()
    subset, kept = run(table.iloc[[2, 0]], cache, size=32)
    assert counted_reads == [table["path"][2], table["path"][0]]
    assert kept["image_id"].tolist() == ["img2", "img0"]

    base = PreprocessConfig(size=32)
    keys = {cache_key(table, base)}
    for changes in ({"size": 33}, {"margin": 0.05}, {"ben_graham": True}, {"threshold": 30}):
        keys.add(cache_key(table, PreprocessConfig(**{**base.__dict__, **changes})))
    assert len(keys) == 5

    forbid_reads(monkeypatch)  # both earlier results are still cached side by side
    assert run(table, cache, size=48)[0].shape == (3, 48, 48, 3)
    assert run(table, cache, size=32)[0].shape == (3, 32, 32, 3)


def test_unreadable_image_fails_naming_the_file(tmp_path, write_image, draw_fundus):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    bad = Path(table["path"][1])
    bad.write_bytes(b"garbage, not a png" * 10)
    with pytest.raises(ValueError) as error:
        run(table, tmp_path / "cache")
    message = str(error.value)
    assert "1 of 3" in message
    assert str(bad) in message
    assert "drop_unreadable=True (--set drop_unreadable=true)" in message and "--drop-unreadable" not in message
    assert not list(tmp_path.glob("cache/*.npy"))  # nothing cached for a failed run


def test_dark_image_fails_naming_the_file(tmp_path, write_image, draw_fundus):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    dark = Path(table["path"][2])
    write_image(dark, np.zeros((40, 56, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(dark)) + ".*no fundus found"):
        run(table, tmp_path / "cache")


def test_drop_unreadable_drops_with_a_warning_and_stays_aligned(tmp_path, write_image, draw_fundus, caplog):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    bad = Path(table["path"][1])
    bad.write_bytes(b"garbage, not a png" * 10)
    with caplog.at_level(logging.WARNING, logger="drnb.preprocessing"):
        images, kept = run(table, tmp_path / "cache", drop_unreadable=True)
    assert kept["image_id"].tolist() == ["img0", "img2"]
    assert kept["grade"].tolist() == [0, 2]
    assert list(kept.index) == [0, 1]
    assert images.shape == (2, 32, 32, 3)
    for image, colour in zip(images, [COLOURS[0], COLOURS[2]]):
        assert np.argmax(image[16, 16]) == np.argmax(colour)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0]

    cached_images, cached_kept = run(table, tmp_path / "cache", drop_unreadable=True)
    np.testing.assert_array_equal(cached_images, images)
    pd.testing.assert_frame_equal(cached_kept, kept)


def test_cache_does_not_drop_rows_silently(tmp_path, write_image, draw_fundus):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS)
    bad = Path(table["path"][1])
    bad.write_bytes(b"garbage, not a png" * 10)
    run(table, tmp_path / "cache", drop_unreadable=True)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        run(table, tmp_path / "cache")


def test_nothing_readable_is_an_error(tmp_path, write_image, draw_fundus):
    table = write_table(tmp_path / "data", write_image, draw_fundus, COLOURS[:1])
    Path(table["path"][0]).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no image"):
        run(table, tmp_path / "cache", drop_unreadable=True)


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DRNB_CACHE", str(tmp_path / "elsewhere"))
    assert preprocessing.default_cache_dir() == tmp_path / "elsewhere"


def test_worker_processes_give_the_serial_result(tmp_path, write_image, draw_fundus):
    # More than one chunk of 32 paths, so two processes share the work.
    colours = [COLOURS[i % 3] for i in range(34)]
    table = write_table(tmp_path / "data", write_image, draw_fundus, colours)
    Path(table["path"][33]).write_bytes(b"garbage")
    serial, serial_kept = run(table, tmp_path / "serial", drop_unreadable=True)
    parallel, parallel_kept = preprocess_table(
        table, PreprocessConfig(size=32), cache_dir=tmp_path / "parallel", workers=2, progress=False,
        drop_unreadable=True,
    )
    np.testing.assert_array_equal(parallel, serial)
    pd.testing.assert_frame_equal(parallel_kept, serial_kept)
    assert len(serial_kept) == 33


def test_a_16_bit_png_preprocesses_as_its_8_bit_original(tmp_path, draw_fundus):
    """A 16-bit greyscale PNG is scaled, not clipped to a white square."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(draw_fundus(60, 80)).convert("L"))
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    config = PreprocessConfig(size=32)
    eight, sixteen = (preprocess_image(read_image(str(tmp_path / name)), config) for name in ("eight.png", "sixteen.png"))
    assert find_fundus(read_image(str(tmp_path / "sixteen.png"))) == find_fundus(read_image(str(tmp_path / "eight.png")))
    assert np.abs(eight.astype(float) - sixteen.astype(float)).mean() <= 0.01 * 255


@pytest.mark.parametrize("level", [255, 128, 40])
def test_a_flat_photograph_is_refused_like_a_black_one(level):
    flat = np.full((48, 64, 3), level, np.uint8)
    flat[::7, ::5] -= np.uint8(2)  # sensor noise of a couple of grey levels is still flat
    with pytest.raises(ValueError, match="one grey level everywhere"):
        find_fundus(flat)
