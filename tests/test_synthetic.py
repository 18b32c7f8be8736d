"""Tests for drnb.synthetic: the seeded synthetic fundus images behind demos and tests."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from drnb.synthetic import (
    APTOS_GRADE_COUNTS,
    FIELD_RADIUS_FRACTION,
    make_fundus,
    make_fundus_images,
    write_synthetic_dataset,
)

IMAGES_PER_GRADE = 20
MASK_SIZE = 96


@pytest.fixture(scope="module")
def lesion_masks_by_grade():
    """bool (IMAGES_PER_GRADE, MASK_SIZE, MASK_SIZE) lesion masks for each grade 0-4.

    Each grade uses the same seeds, so the eyes are the same and only the lesions differ.
    """
    masks = {}
    for grade in range(5):
        masks[grade] = np.stack(
            [
                make_fundus(
                    grade, MASK_SIZE, np.random.default_rng(seed), return_lesion_mask=True
                )[1]
                for seed in range(IMAGES_PER_GRADE)
            ]
        )
    return masks


def _outside_field(size: int, margin: float = 1.0) -> np.ndarray:
    """bool (size, size): pixels more than ``margin`` px outside the circular field."""
    offset = np.arange(size) + 0.5 - size / 2
    distance = np.hypot(offset[None, :], offset[:, None])
    return distance > FIELD_RADIUS_FRACTION * size + margin


# --- shape, dtype, field ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 64, 128])
def test_image_shape_dtype_and_mask(size):
    image, mask = make_fundus(3, size, np.random.default_rng(0), return_lesion_mask=True)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == bool
    assert make_fundus(3, size, np.random.default_rng(0)).shape == (size, size, 3)
    assert make_fundus(3, size).shape == (size, size, 3)  # rng=None: unseeded


def test_outside_the_field_is_black_and_inside_is_not():
    images, _ = make_fundus_images(10, 64, seed=2, clipped_share=0.0)
    outside = _outside_field(64)
    assert outside[0, 0] and outside[-1, -1]  # the corners are outside
    assert np.all(images[:, outside] == 0)
    centre_patch = images[:, 28:36, 28:36]
    assert np.all(centre_patch.max(axis=-1) > 20)


def test_lesion_mask_stays_inside_the_field(lesion_masks_by_grade):
    outside = _outside_field(MASK_SIZE, margin=0.0)
    assert not lesion_masks_by_grade[4][:, outside].any()


def test_which_way_is_up_cannot_be_read_off_the_light():
    # Real photographs are lit from any side; up is the anatomy's. Paired over 200 photographs,
    # the top half's mean brightness minus the bottom half's is within noise of 0 (|t| < 3),
    # and so is the left half's minus the right half's.
    images, _ = make_fundus_images(200, 64, seed=5, clipped_share=0.0)
    brightness = images.astype(float).sum(axis=-1)
    for first, second in ((brightness[:, :32], brightness[:, 32:]), (brightness[:, :, :32], brightness[:, :, 32:])):
        difference = first.mean(axis=(1, 2)) - second.mean(axis=(1, 2))
        t = difference.mean() / (difference.std(ddof=1) / np.sqrt(len(difference)))
        assert abs(t) < 3, f"halves differ in brightness: t = {t:.2f}"


# --- seeding -----------------------------------------------------------------------------------


def test_same_seed_same_images_and_different_seed_different_images():
    first, first_grades = make_fundus_images(6, 48, seed=11)
    again, again_grades = make_fundus_images(6, 48, seed=11)
    other, _ = make_fundus_images(6, 48, seed=12)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_grades, again_grades)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(
        make_fundus(2, 48, np.random.default_rng(4)), make_fundus(2, 48, np.random.default_rng(4))
    )
    assert not np.array_equal(
        make_fundus(2, 48, np.random.default_rng(4)), make_fundus(2, 48, np.random.default_rng(5))
    )


def test_image_i_does_not_depend_on_n():
    # Exact class counts for every n cannot also fix every image's grade, so an image may
    # change grade with n; where its grade is the same, it must be the same image.
    short_images, short_grades = make_fundus_images(10, 48, seed=3)
    long_images, long_grades = make_fundus_images(20, 48, seed=3)
    same_grade = short_grades == long_grades[:10]
    assert same_grade.sum() >= 5
    np.testing.assert_array_equal(short_images[same_grade], long_images[:10][same_grade])


def test_same_generator_state_gives_the_same_eye_at_every_grade(lesion_masks_by_grade):
    # Away from the lesions (allowing for the blur), a grade-4 image is the grade-0 image.
    for seed in range(3):
        healthy = make_fundus(0, MASK_SIZE, np.random.default_rng(seed))
        diseased = make_fundus(4, MASK_SIZE, np.random.default_rng(seed))
        near_lesion = ndimage.binary_dilation(lesion_masks_by_grade[4][seed], iterations=6)  # the focus blur spreads them
        np.testing.assert_array_equal(healthy[~near_lesion], diseased[~near_lesion])
        assert not np.array_equal(healthy, diseased)


# --- lesions and grades ------------------------------------------------------------------------


def test_grade_0_has_no_lesions(lesion_masks_by_grade):
    assert not lesion_masks_by_grade[0].any()


def test_lesion_load_rises_strictly_with_grade(lesion_masks_by_grade):
    mean_lesion_pixels = [
        lesion_masks_by_grade[grade].sum(axis=(1, 2)).mean() for grade in range(5)
    ]
    assert all(low < high for low, high in zip(mean_lesion_pixels, mean_lesion_pixels[1:])), (
        mean_lesion_pixels
    )
    assert all(mask.any() for mask in lesion_masks_by_grade[1])  # every grade-1 eye shows a lesion


def test_lesions_darken_or_brighten_the_image(lesion_masks_by_grade):
    # The mask marks real, visible changes: lesion pixels differ from the healthy eye.
    healthy = make_fundus(0, MASK_SIZE, np.random.default_rng(0)).astype(int)
    diseased = make_fundus(3, MASK_SIZE, np.random.default_rng(0)).astype(int)
    mask = lesion_masks_by_grade[3][0]
    changed = np.abs(diseased - healthy).sum(axis=-1) > 30
    assert changed[mask].mean() > 0.5


def test_grade_counts_follow_the_weights():
    assert APTOS_GRADE_COUNTS == (1805, 370, 999, 193, 295)  # APTOS 2019 train.csv, 3662 images
    # APTOS quotas for n=50: 24.64, 5.05, 13.64, 2.64, 4.03 -> floors 24, 5, 13, 2, 4 (48), and
    # the two left over go to the largest remainders, grades 0 (.645) and 2 (.640).
    _, grades = make_fundus_images(50, 16, seed=0)
    assert grades.dtype == np.int64 and grades.shape == (50,)
    np.testing.assert_array_equal(np.bincount(grades, minlength=5), [25, 5, 14, 2, 4])
    assert not np.all(np.diff(grades) >= 0)  # shuffled, not sorted by grade

    _, grades = make_fundus_images(8, 16, seed=1, grade_weights=(2, 0, 1, 0, 1))
    np.testing.assert_array_equal(np.bincount(grades, minlength=5), [4, 0, 2, 0, 2])


def test_clip_blacks_out_top_and_bottom_rows_inside_the_circle():
    size, clip = 128, 0.2
    radius, centre = FIELD_RADIUS_FRACTION * size, size / 2
    row_offset = np.abs(np.arange(size) + 0.5 - centre)
    cut_rows = (row_offset > radius * (1 - clip) + 1) & (row_offset < radius - 2)
    kept_rows = row_offset < radius * (1 - clip) - 1
    assert cut_rows[:20].any() and cut_rows[-20:].any()
    for seed in range(3):
        clipped = make_fundus(1, size, np.random.default_rng(seed), clip=clip)
        whole = make_fundus(1, size, np.random.default_rng(seed), clip=0.0)
        assert np.all(clipped[cut_rows] == 0)
        assert np.all(whole[cut_rows].max(axis=(1, 2)) > 0)  # those rows were inside the circle
        np.testing.assert_array_equal(clipped[kept_rows], whole[kept_rows])


def test_clipped_share_sets_how_many_images_are_cut():
    size = 32
    # Inside the circle, and cut by any clip >= 0.1 (the smallest random clip).
    top_row = int(size / 2 - FIELD_RADIUS_FRACTION * size * 0.95)
    none, _ = make_fundus_images(20, size, seed=0, clipped_share=0.0)
    every, _ = make_fundus_images(20, size, seed=0, clipped_share=1.0)
    assert np.all(none[:, top_row].max(axis=(1, 2)) > 0)
    assert np.all(every[:, top_row] == 0)


@pytest.mark.parametrize("grade", [0, 2])
def test_disc_is_on_the_matching_half_for_each_eye(grade):
    size = 128
    for seed in range(8):
        for eye in ("left", "right"):
            image = make_fundus(grade, size, np.random.default_rng(seed), eye=eye)
            # Smooth over about a disc diameter so small bright specks (exudates) cannot win.
            brightness = ndimage.uniform_filter(image.astype(float).sum(axis=-1), size=9)
            _, column = np.unravel_index(np.argmax(brightness), brightness.shape)
            on_right = column >= size / 2
            assert on_right == (eye == "right"), (seed, eye, column)


# --- dataset on disk ---------------------------------------------------------------------------


def test_write_synthetic_dataset_layout_and_idempotence(tmp_path):
    directory = write_synthetic_dataset(tmp_path / "syn", n=12, size=32, seed=7)
    assert directory == tmp_path / "syn"
    table = pd.read_csv(directory / "train.csv")
    assert list(table.columns) == ["id_code", "diagnosis"]
    assert table["id_code"].tolist() == [f"syn{index:05d}" for index in range(12)]
    images, grades = make_fundus_images(12, 32, seed=7)
    np.testing.assert_array_equal(table["diagnosis"].to_numpy(), grades)
    with Image.open(directory / "train_images" / "syn00003.png") as png:
        assert png.mode == "RGB" and png.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(png), images[3])  # PNG is lossless

    files = sorted(path for path in directory.rglob("*") if path.is_file())
    assert len(files) == 12 + 2  # the images, train.csv, synthetic.json
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    write_synthetic_dataset(directory, n=12, size=32, seed=7)
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes


def test_write_synthetic_dataset_redoes_an_incomplete_or_different_dataset(tmp_path):
    directory = write_synthetic_dataset(tmp_path, n=4, size=16, seed=0)
    manifest = directory / "synthetic.json"

    (directory / "train_images" / "syn00002.png").unlink()  # a file lost since
    write_synthetic_dataset(directory, n=4, size=16, seed=0)
    assert (directory / "train_images" / "syn00002.png").is_file()

    manifest.unlink()  # an interrupted run writes the manifest last, so it is missing
    write_synthetic_dataset(directory, n=4, size=16, seed=0)
    assert manifest.is_file()

    write_synthetic_dataset(directory, n=6, size=16, seed=0)  # other parameters
    assert len(pd.read_csv(directory / "train.csv")) == 6


def test_an_interrupted_rewrite_is_not_taken_for_complete(tmp_path, monkeypatch):
    import drnb.synthetic as synthetic

    directory = write_synthetic_dataset(tmp_path, n=4, size=16, seed=0)
    real_make_fundus = synthetic.make_fundus
    calls = []

    def make_fundus_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user stopped the run
        return real_make_fundus(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_fundus", make_fundus_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(directory, n=4, size=16, seed=1)
    assert not (directory / "synthetic.json").exists()
    monkeypatch.undo()

    write_synthetic_dataset(directory, n=4, size=16, seed=1)
    images, _ = make_fundus_images(4, 16, seed=1)
    with Image.open(directory / "train_images" / "syn00003.png") as png:
        np.testing.assert_array_equal(np.asarray(png), images[3])


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda: make_fundus(5), "grade"),
        (lambda: make_fundus(-1), "grade"),
        (lambda: make_fundus(1.5), "grade"),
        (lambda: make_fundus(0, size=15), "size"),
        (lambda: make_fundus(0, clip=0.31), "clip"),
        (lambda: make_fundus(0, clip=-0.01), "clip"),
        (lambda: make_fundus(0, eye="both"), "eye"),
        (lambda: make_fundus(0, rng=42), "rng"),
        (lambda: make_fundus_images(0), "n"),
        (lambda: make_fundus_images(3, size=8), "size"),
        (lambda: make_fundus_images(3, seed=-1), "seed"),
        (lambda: make_fundus_images(3, grade_weights=(1, -1, 1, 1, 1)), "grade_weights"),
        (lambda: make_fundus_images(3, grade_weights=(0, 0, 0, 0, 0)), "grade_weights"),
        (lambda: make_fundus_images(3, grade_weights=(1, 1, 1, 1)), "grade_weights"),
        (lambda: make_fundus_images(3, clipped_share=1.5), "clipped_share"),
        (lambda: make_fundus_images(3, grade_weights=("a", 1, 1, 1, 1)), "grade_weights"),
        (lambda: write_synthetic_dataset("unused", n=0), "n"),
        (lambda: write_synthetic_dataset("unused", clipped_share=-0.1), "clipped_share"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_parameter(call, parameter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not in the checkout
    with pytest.raises(ValueError, match=parameter):
        call()
    assert not (tmp_path / "unused").exists()


def test_a_few_photographs_show_the_lesions_of_a_neighbouring_grade():
    from drnb.synthetic import LABEL_NOISE, drawn_grade

    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(5), 2000)
    drawn = np.array([drawn_grade(int(label), rng) for label in labels])
    assert drawn.min() == 0 and drawn.max() == 4
    assert set(np.abs(drawn - labels).tolist()) == {0, 1}  # one grade off at most
    assert abs((drawn != labels).mean() - LABEL_NOISE) < 0.015
