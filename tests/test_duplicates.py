"""Near-duplicate photographs: found by fingerprint, grouped, kept within one fold."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from drnb.duplicates import (
    duplicate_groups,
    duplicate_table,
    find_duplicates,
    fingerprints,
    near_duplicate_pairs,
    photograph_groups,
    split_groups,
)
from drnb.preprocessing import PreprocessConfig, preprocess_image
from drnb.profiles import resolve_profile
from drnb.splits import assign_folds, split_holdout
from drnb.synthetic import make_fundus_images

THRESHOLD = resolve_profile("quick").duplicate_threshold
CONFIG = PreprocessConfig(size=128)


def resave_jpeg(photo: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resize(photo: np.ndarray, factor: float) -> np.ndarray:
    height, width = photo.shape[:2]
    return np.asarray(Image.fromarray(photo).resize((int(width * factor), int(height * factor)), Image.Resampling.LANCZOS))


def brighten(photo: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(photo.astype(np.float32) * factor, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photographs():
    # 400 px, so that the smallest copy (x0.45: 180 px) is still larger than quick's 128 px:
    # a copy shrunk to just above the target size keeps less of the photograph's detail than
    # its original (from 320 px, one copy of 24 matched .969 against the .97 threshold).
    photos, grades = make_fundus_images(24, size=400, seed=3)
    return photos, grades


def crop(photo: np.ndarray, share: float) -> np.ndarray:
    height, width = photo.shape[:2]
    rows, cols = int(height * share), int(width * share)
    return photo[rows : height - rows, cols : width - cols]


# The changes the module docstring and the README say a copy survives.
COPIES = {
    "jpeg quality 60": lambda photo: resave_jpeg(photo, 60),
    "resized x0.45": lambda photo: resize(photo, 0.45),
    "resized x1.7": lambda photo: resize(photo, 1.7),
    "cropped by 2 %": lambda photo: crop(photo, 0.02),
    "brightened by 15 %": lambda photo: brighten(photo, 1.15),
}


@pytest.mark.parametrize(
    "size, graham", [(128, True), (128, False), (224, False)], ids=["quick", "128px-plain", "paper"]
)  # quick's preprocessing, and paper's
def test_resaved_copies_are_near_duplicates_and_other_eyes_are_not(photographs, size, graham):
    photos, _ = photographs
    config = PreprocessConfig(size=size, ben_graham=graham)
    originals = fingerprints(np.stack([preprocess_image(photo, config) for photo in photos]))
    for name, copy in COPIES.items():
        copied = fingerprints(np.stack([preprocess_image(copy(photo), config) for photo in photos[:6]]))
        similarity = (originals[:6] * copied).sum(axis=1)
        assert similarity.min() >= THRESHOLD, f"{name}: {similarity.round(3)}"
    between = originals @ originals.T
    np.fill_diagonal(between, -1)
    assert between.max() < THRESHOLD
    assert near_duplicate_pairs(originals, THRESHOLD).empty


def test_fingerprints_are_unit_length_and_a_uniform_image_matches_nothing():
    images = np.zeros((3, 96, 96, 3), np.uint8)
    images[0] = np.random.default_rng(0).integers(0, 255, (96, 96, 3))
    images[1] = 120  # uniform: no structure to compare
    images[2] = images[0]
    prints = fingerprints(images)
    assert prints.dtype == np.float32 and prints.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(prints, axis=1), [1, 0, 1], atol=1e-5)
    assert near_duplicate_pairs(prints, THRESHOLD)[["first", "second"]].values.tolist() == [[0, 2]]
    # Sides that are not a multiple of the fingerprint's (28 px RetinaMNIST, 100 px) work too,
    # and so does an empty set.
    assert fingerprints(images[:, :28, :28]).shape[0] == fingerprints(images[:, :100, :100]).shape[0] == 3
    assert fingerprints(images[:0, :100, :100]).shape == (0, fingerprints(images[:1, :100, :100]).shape[1])
    with pytest.raises(ValueError, match="square"):
        fingerprints(np.zeros((2, 32, 40, 3), np.uint8))


def test_pairs_are_listed_once_each_with_their_similarity():
    angles = np.array([0.0, 0.9, 0.05, 2.0, 0.92])
    prints = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    pairs = near_duplicate_pairs(prints, 0.99)
    assert pairs[["first", "second"]].values.tolist() == [[0, 2], [1, 4]]
    np.testing.assert_allclose(pairs["similarity"], np.cos([0.05, 0.02]), rtol=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(prints, 0)
    assert find_duplicates(np.zeros((4, 32, 32, 3), np.uint8), 0).empty  # 0: the search is off


def test_groups_join_pairs_transitively():
    pairs = pd.DataFrame({"first": [0, 3, 1], "second": [3, 5, 2], "similarity": 1.0})
    assert duplicate_groups(6, pairs).tolist() == [0, 1, 1, 0, 4, 0]


def test_split_groups_merge_linked_patients_and_leave_the_rest_unchanged():
    no_pairs = pd.DataFrame({"first": [], "second": [], "similarity": []})
    patients = np.array(["a", "a", "b", "c", "d"], dtype=object)
    images = np.array(["a1", "a2", "b1", "c1", "d1"], dtype=object)
    assert split_groups(None, images, no_pairs) is None
    assert split_groups(patients, images, no_pairs).tolist() == patients.tolist()
    linked = pd.DataFrame({"first": [1, 3], "second": [2, 4], "similarity": 1.0})
    assert split_groups(patients, images, linked).tolist() == ["a", "a", "a", "c", "c"]
    assert split_groups(None, images, linked).tolist() == ["a1", "a2", "a2", "c1", "c1"]


def test_duplicates_share_a_fold_that_an_image_by_image_split_would_separate(photographs):
    photos, grades = photographs
    images = np.stack([preprocess_image(photo, CONFIG) for photo in photos])
    images = np.concatenate([images, [preprocess_image(resave_jpeg(photos[i], 70), CONFIG) for i in (2, 5, 9)]])
    grades = np.concatenate([grades, grades[[2, 5, 9]]])
    ids = np.array([f"img{i}" for i in range(len(images))], dtype=object)
    pairs = find_duplicates(images, THRESHOLD)
    assert pairs[["first", "second"]].values.tolist() == [[2, 24], [5, 25], [9, 26]]
    table = pd.DataFrame({"image_id": ids, "grade": grades})
    assert duplicate_table(table, pairs)["first_image"].tolist() == ["img2", "img5", "img9"]

    ungrouped = assign_folds(grades, n_folds=5, seed=0)
    assert any(ungrouped[a] != ungrouped[b] for a, b in ((2, 24), (5, 25), (9, 26)))  # the test has teeth
    grouped = assign_folds(grades, patient_ids=split_groups(None, ids, pairs), n_folds=5, seed=0)
    assert all(grouped[a] == grouped[b] for a, b in ((2, 24), (5, 25), (9, 26)))


def test_profiles_check_the_threshold():
    assert resolve_profile("quick", {"duplicate_threshold": "0"}).duplicate_threshold == 0
    with pytest.raises(ValueError, match="duplicate_threshold"):
        resolve_profile("quick", {"duplicate_threshold": "0.2"})


def test_finetune_session_keeps_each_duplicate_pair_in_one_fold():
    from drnb.finetune import FinetuneSession

    images, grades = make_fundus_images(60, size=32, seed=2)
    images = np.concatenate([images, images[[3, 4, 7]]])  # three photographs filed twice
    grades = np.concatenate([grades, grades[[3, 4, 7]]])
    table = pd.DataFrame(
        {"image_id": [f"img{i}" for i in range(len(images))], "path": "", "grade": grades, "patient_id": None, "split": None}
    )
    lines = []
    session = FinetuneSession(images, table, resolve_profile("smoke"), log=lines.append)
    assert session.duplicate_pairs[["first", "second"]].values.tolist() == [[3, 60], [4, 61], [7, 62]]
    assert any("3 near-duplicate pair(s)" in line for line in lines)
    for repetition in range(session.profile.repetitions):
        test = set(session.split(repetition).test)
        assert all((a in test) == (b in test) for a, b in ((3, 60), (4, 61), (7, 62)))
    off = FinetuneSession(images, table, resolve_profile("smoke", {"duplicate_threshold": "0"}), log=lines.append)
    assert off.patient_ids is None and off.duplicate_pairs.empty
    # The reference split deals rows into folds as the study's code did: no groups, no search.
    reference = FinetuneSession(images, table, resolve_profile("smoke", {"split_mode": "reference"}), log=lines.append)
    assert reference.patient_ids is None and reference.duplicate_pairs.empty


def test_pretext_holds_out_a_patients_eyes_and_twin_photographs_together(tmp_path, monkeypatch):
    from drnb.pretext import train_pretext

    images, grades = make_fundus_images(60, size=32, seed=2)
    images = np.concatenate([images, images[[3, 4, 7]]])  # three photographs filed twice
    patients = [f"patient{i // 2}" for i in range(60)] + [None] * 3  # two eyes each; the copies unknown
    table = pd.DataFrame({"image_id": [f"img{i}" for i in range(63)], "grade": np.concatenate([grades, grades[[3, 4, 7]]]), "patient_id": patients})
    groups, pairs = photograph_groups(images, table, THRESHOLD)
    assert pairs[["first", "second"]].values.tolist() == [[3, 60], [4, 61], [7, 62]]
    assert groups[60] == groups[3] == groups[2] == "patient patient1" and groups[62] == groups[6] == "patient patient3"
    with pytest.raises(ValueError, match="63 images but 62 table rows"):
        photograph_groups(images, table.iloc[:62], THRESHOLD)

    monkeypatch.setattr("drnb.pretext.HOLDOUT_FRACTION", 0.3)  # enough held out that pairs could be parted
    profile = resolve_profile("smoke", {"pretext_epochs": "1"})
    together = [(2 * k, 2 * k + 1) for k in range(30)] + [(3, 60), (4, 61), (7, 62)]
    _, image_by_image = split_holdout(63, 0.3, profile.seed)
    assert any((a in image_by_image) != (b in image_by_image) for a, b in together)  # the test has teeth
    result = train_pretext(images, profile, tmp_path, table=table, log=lambda line: None)
    held = set(result.heldout_indices.tolist())
    assert len(held) >= round(0.3 * 63)
    assert all((a in held) == (b in held) for a, b in together)
    assert json.loads((tmp_path / "metrics.json").read_text())["heldout_grouped"] is True


def test_photograph_groups_keep_numeric_patients_apart_from_image_ids():
    images, _ = make_fundus_images(5, size=32, seed=4)
    # Patient 1 owns images 0 and 1; image "1" has no patient; patient ids are numbers.
    table = pd.DataFrame({"image_id": ["0", "2", "1", "3", "4"], "patient_id": [1, 1, None, 3, 3]})
    groups, pairs = photograph_groups(images, table, THRESHOLD)
    assert pairs.empty
    assert all(isinstance(group, str) for group in groups)
    assert groups[0] == groups[1] != groups[2] == "image 1" and groups[3] == groups[4] != groups[0]
    folds = assign_folds(np.zeros(5, np.int64), patient_ids=groups, n_folds=2, seed=0)  # sortable: no TypeError
    assert folds[0] == folds[1] and folds[3] == folds[4]
    assert photograph_groups(images, table.assign(patient_id=None), THRESHOLD)[0] is None
