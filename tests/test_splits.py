"""Splits are stratified, nested, disjoint, grouped by patient, seeded; the reference split
reproduces its flaw."""

import logging
from itertools import combinations

import numpy as np
import pytest

from drnb.splits import (
    RepetitionSplit,
    assign_folds,
    make_repetition_split,
    make_splits,
    split_holdout,
    validate_fraction,
)

FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)
# Grade mix close to EyePACS: 73.5 % no DR, 2 % proliferative.
COUNTS = (735, 70, 150, 25, 20)


def imbalanced_grades(counts=COUNTS, seed=0):
    grades = np.repeat(np.arange(5), counts)
    return np.random.default_rng(seed).permutation(grades)


@pytest.fixture(scope="module")
def grades():
    return imbalanced_grades()


@pytest.fixture(scope="module")
def splits(grades):
    return make_splits(grades, FRACTIONS)


@pytest.fixture(scope="module")
def patient_data():
    """400 images of 200 patients (two eyes each); the eyes mostly share a grade."""
    rng = np.random.default_rng(3)
    patient_grade = rng.choice(5, size=200, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    second_eye = np.clip(patient_grade + rng.choice([-1, 0, 0, 0, 1], size=200), 0, 4)
    grades = np.stack([patient_grade, second_eye], axis=1).reshape(-1)
    patients = np.repeat([f"p{i:03d}" for i in range(200)], 2)
    return grades, patients


def test_folds_are_stratified(grades):
    folds = assign_folds(grades, n_folds=5, seed=0)
    assert folds.dtype == np.int64
    assert set(np.unique(folds)) == set(range(5))
    overall = np.bincount(grades, minlength=5) / len(grades)
    for k in range(5):
        in_fold = grades[folds == k]
        share = np.bincount(in_fold, minlength=5) / len(in_fold)
        np.testing.assert_allclose(share, overall, atol=0.01)


def test_reference_chunks_are_not_stratified_by_the_same_measure(grades):
    # The stratification check above can fail: the reference's round-robin chunks of
    # unsorted data miss the overall grade mix by more than the tolerance.
    ref = make_splits(grades, FRACTIONS, mode="reference")
    overall = np.bincount(grades, minlength=5) / len(grades)
    worst = max(
        np.abs(np.bincount(grades[s.test], minlength=5) / len(s.test) - overall).max()
        for s in ref
    )
    assert worst > 0.01


def test_test_folds_partition_all_rows(grades, splits):
    assert all(isinstance(s, RepetitionSplit) for s in splits)
    assert [s.repetition for s in splits] == list(range(5))
    all_test = np.concatenate([s.test for s in splits])
    assert len(all_test) == len(grades)
    np.testing.assert_array_equal(np.sort(all_test), np.arange(len(grades)))


def test_subsets_are_nested_across_fractions(splits):
    for s in splits:
        assert s.fractions == FRACTIONS
        for small, large in zip(FRACTIONS, FRACTIONS[1:]):
            assert set(s.train[small]) < set(s.train[large])


def test_train_is_disjoint_from_test_and_validation(grades, splits):
    for s in splits:
        assert len(s.validation) > 0
        assert not set(s.test) & set(s.validation)
        for rows in s.train.values():
            assert rows.dtype == np.int64
            assert not set(rows) & set(s.test)
            assert not set(rows) & set(s.validation)
        # 100 % is all training candidates: test + validation + train[1.0] is every row.
        everything = np.concatenate([s.test, s.validation, s.train[1.0]])
        np.testing.assert_array_equal(np.sort(everything), np.arange(len(grades)))


def test_validation_is_about_validation_fraction_of_pool_and_stratified(grades, splits):
    for s in splits:
        pool = len(grades) - len(s.test)
        assert abs(len(s.validation) - 0.1 * pool) <= 5
        share = np.bincount(grades[s.validation], minlength=5) / len(s.validation)
        np.testing.assert_allclose(share, np.bincount(grades) / len(grades), atol=0.02)
        assert all(np.array_equal(s.validation_for(f), s.validation) for f in FRACTIONS)


def test_fraction_takes_per_grade_share_of_candidates(grades, splits):
    for s in splits:
        candidates = np.bincount(grades[s.train[1.0]], minlength=5)
        for f in FRACTIONS:
            taken = np.bincount(grades[s.train[f]], minlength=5)
            expected = np.maximum(1, np.floor(f * candidates + 0.5)).astype(int)
            np.testing.assert_array_equal(taken, expected)


def test_subsets_differ_across_repetitions(splits):
    for f in FRACTIONS:
        for a, b in combinations(splits, 2):
            assert not np.array_equal(a.train[f], b.train[f]), (f, a.repetition, b.repetition)


def test_every_grade_present_at_five_percent(grades, splits):
    for s in splits:
        assert set(grades[s.train[0.05]]) == {0, 1, 2, 3, 4}


def test_same_seed_same_splits_other_seed_other_splits(grades, splits):
    again = make_splits(grades, FRACTIONS)
    for a, b in zip(splits, again):
        np.testing.assert_array_equal(a.test, b.test)
        np.testing.assert_array_equal(a.validation, b.validation)
        for f in FRACTIONS:
            np.testing.assert_array_equal(a.train[f], b.train[f])
    other = make_splits(grades, FRACTIONS, seed=1)
    assert not np.array_equal(splits[0].test, other[0].test)
    single = make_repetition_split(grades, 2, FRACTIONS)
    np.testing.assert_array_equal(single.train[0.05], splits[2].train[0.05])


def test_arrays_are_read_only(splits):
    with pytest.raises(ValueError):
        splits[0].train[0.05][0] = 0


def test_patients_never_cross_sides(patient_data):
    grades, patients = patient_data
    grouped = make_splits(grades, (0.05, 1.0), patient_ids=patients)
    folds = assign_folds(grades, patient_ids=patients)
    for pid in np.unique(patients):
        assert len(set(folds[patients == pid])) == 1
    for s in grouped:
        test_p = set(patients[s.test])
        val_p = set(patients[s.validation])
        train_p = set(patients[s.train[1.0]])
        assert not test_p & val_p
        assert not test_p & train_p
        assert not val_p & train_p
    np.testing.assert_array_equal(
        np.sort(np.concatenate([s.test for s in grouped])), np.arange(len(grades))
    )


def test_without_patient_ids_eyes_do_get_separated(patient_data):
    # Shows the grouping test above can fail: an ungrouped split puts the two eyes of
    # some patients on different sides.
    grades, patients = patient_data
    s = make_repetition_split(grades, 0, (1.0,))
    assert set(patients[s.test]) & set(patients[s.train[1.0]])


def test_reference_mode_four_identical_subsets_out_of_five(grades):
    ref = make_splits(grades, FRACTIONS, mode="reference")
    for f in (0.05, 0.10, 0.25):
        subsets = [tuple(s.train[f]) for s in ref]
        assert len(set(subsets)) == 2
        assert len(set(subsets[1:])) == 1  # repetitions 1-4 share one training set
        assert subsets[0] != subsets[1]
    assert len({tuple(s.train[1.0]) for s in ref}) == 5
    # drnb's stratified split: five different subsets at 5 %.
    strat = make_splits(grades, FRACTIONS)
    assert len({tuple(s.train[0.05]) for s in strat}) == 5


def test_reference_mode_layout(grades):
    n = len(grades)
    rows = np.arange(n)
    ref = make_splits(grades, FRACTIONS, mode="reference", validation_fraction=0.05)
    for s in ref:
        np.testing.assert_array_equal(s.test, rows[s.repetition :: 5])
    s = ref[2]
    pool = np.concatenate([rows[i::5] for i in (0, 1, 3, 4)])
    n_train = int(len(pool) * (0.05 * 0.95))
    n_val = int(len(pool) * 0.05)
    np.testing.assert_array_equal(s.train[0.05], np.sort(pool[:n_train]))
    np.testing.assert_array_equal(
        s.validation_for(0.05), np.sort(pool[n_train : n_train + n_val])
    )
    assert not np.array_equal(s.validation_for(0.05), s.validation_for(1.0))
    np.testing.assert_array_equal(s.validation, s.validation_for(1.0))


def test_zero_validation_fraction_gives_empty_validation(grades):
    s = make_repetition_split(grades, 0, (0.5, 1.0), validation_fraction=0)
    assert s.validation.size == 0
    assert len(s.train[1.0]) == len(grades) - len(s.test)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), "0.1", True])
def test_bad_fraction_raises(grades, bad):
    with pytest.raises(ValueError, match="fraction"):
        validate_fraction(bad)
    with pytest.raises(ValueError, match="fraction"):
        make_splits(grades, (0.05, bad))


def test_percentage_hint():
    with pytest.raises(ValueError, match="percentage"):
        validate_fraction(5)


@pytest.mark.parametrize(
    ("bad_grades", "row"),
    [([0, 1, 5, 2, 3], 2), ([0, 1, 2, -1, 3], 3), ([0, 1.5, 2, 3, 4], 1),
     ([0, 1, 2, 3, float("nan")], 4), (["0", "1", "2", "3", "4"], 0)],
)
def test_bad_grades_raise_naming_row(bad_grades, row):
    with pytest.raises(ValueError, match=f"grades.*row {row}"):
        assign_folds(bad_grades * 4)
    with pytest.raises(ValueError, match=f"grades.*row {row}"):
        make_splits(bad_grades * 4, (0.5,))


def test_other_bad_arguments_raise(grades):
    with pytest.raises(ValueError, match="repetition"):
        make_repetition_split(grades, 5, FRACTIONS)
    with pytest.raises(ValueError, match="n_folds"):
        make_splits(grades, FRACTIONS, n_folds=1)
    with pytest.raises(ValueError, match="validation_fraction"):
        make_splits(grades, FRACTIONS, validation_fraction=0.5)
    with pytest.raises(ValueError, match="mode"):
        make_splits(grades, FRACTIONS, mode="random")
    with pytest.raises(ValueError, match="repetitions"):
        make_splits(grades, FRACTIONS, repetitions=6)
    with pytest.raises(ValueError, match="patient_ids"):
        make_splits(grades, FRACTIONS, patient_ids=np.arange(10))
    with pytest.raises(ValueError, match="patient_ids row 1"):
        make_splits(grades, FRACTIONS, patient_ids=[0, None] + list(range(len(grades) - 2)))
    with pytest.raises(ValueError, match="fractions"):
        make_splits(grades, 0.5)


def test_rare_grade_falls_back_with_warning(caplog):
    grades = imbalanced_grades(counts=(60, 20, 15, 3, 2))
    with caplog.at_level(logging.WARNING, logger="drnb.splits"):
        result = make_splits(grades, (0.1, 1.0))
    assert "grade 4 has 2 row(s)" in caplog.text
    np.testing.assert_array_equal(
        np.sort(np.concatenate([s.test for s in result])), np.arange(len(grades))
    )
    for s in result:
        present = set(grades[s.train[1.0]])
        assert set(grades[s.train[0.1]]) == present  # every grade the pool allows


def test_fewer_rows_than_folds_raises():
    with pytest.raises(ValueError, match="fewer than n_folds"):
        make_splits([0, 1, 2, 3], (1.0,))
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds([0, 1, 2, 3], n_folds=5)



def test_pretext_holdout_keeps_every_group_on_one_side():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 4, 400)  # patients with one to three photographs
    groups = np.repeat([f"patient{k}" for k in range(len(sizes))], sizes)[rng.permutation(sizes.sum())]
    n_images = len(groups)
    train, held = split_holdout(n_images, 0.1, seed=3, groups=groups)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n_images))
    assert not set(groups[train]) & set(groups[held])
    target = round(0.1 * n_images)
    assert target <= len(held) < target + 3  # whole groups until the share is reached
    again, held_again = split_holdout(n_images, 0.1, seed=3, groups=groups)
    assert np.array_equal(held, held_again) and np.array_equal(train, again)
    assert not np.array_equal(held, split_holdout(n_images, 0.1, seed=4, groups=groups)[1])


def test_pretext_holdout_without_groups_is_image_by_image():
    train, held = split_holdout(101, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 91
    assert not set(train) & set(held)
    one_group_each = np.arange(101).astype(str)
    assert len(split_holdout(101, 0.1, seed=0, groups=one_group_each)[1]) == 10
    assert len(split_holdout(101, 0.0, seed=0, groups=one_group_each)[1]) == 0


def test_pretext_holdout_refuses_bad_groups():
    with pytest.raises(ValueError, match="3 group ids for 4 images"):
        split_holdout(4, 0.25, seed=0, groups=["a", "a", "b"])
    for seed in range(4):  # whichever group comes first, one holds 9 of the 10 images
        with pytest.raises(ValueError, match="takes (9|10): expected fewer than half"):
            split_holdout(10, 0.4, seed=seed, groups=["a"] * 9 + ["b"])
