"""Cross-validation splits with nested labelled fractions.

The study fine-tunes on 5, 10, 25, 50 and 100 % of the labelled images and repeats each
experiment on the five folds of a 5-fold cross-validation. One repetition ``r`` is described
by a :class:`RepetitionSplit`: a test fold, a validation split for model selection, and one
labelled training subset per fraction.

Two modes build it.

``mode="stratified"`` (drnb's split)
    1. :func:`assign_folds` gives every row a fold with ``StratifiedKFold`` (shuffled, seeded
       by ``seed``), or ``StratifiedGroupKFold`` when patient ids are given, so that all
       images of a patient share a fold. The folds are the same for every repetition, so
       the five test folds partition the data. Repetition ``r`` tests on fold ``r``.
    2. The *pool* is every other row. A validation split of about ``validation_fraction``
       of the pool is carved out stratified by grade (grouped by patient when ids are
       given): fold 0 of a ``StratifiedKFold`` / ``StratifiedGroupKFold`` with
       ``round(1 / validation_fraction)`` splits, seeded by ``seed + r``.
    3. The rest of the pool are the *training candidates*. Fraction ``f`` takes, per grade
       ``g``, ``round(f * n_g)`` candidates (rounded half up, at least 1 when ``n_g > 0``)
       from a per-grade random permutation seeded by ``seed + r``, always a *prefix* of that
       permutation. Subsets are therefore nested (5 % ⊂ 10 % ⊂ 25 % ⊂ 50 % ⊂ 100 %),
       keep the grade mix of the candidates, contain every grade the candidates contain,
       and differ between repetitions. Fraction 1.0 is all training candidates.

    **Fractions are fractions of the training candidates** (the pool minus the validation
    split), not of the whole dataset: with 5 folds and ``validation_fraction=0.1``, "100 %"
    is 0.8 * 0.9 = 72 % of all rows.

``mode="reference"`` (the study's public code, kept to measure its flaw)
    Rebuilds the split of HealthML/self-supervised-3d-tasks (``CvDataKaggle`` in
    ``self_supervised_3d_tasks/test_data_backend.py`` with ``make_cross_validation``,
    ``chunkify`` and ``get_data_generators_internal`` in
    ``self_supervised_3d_tasks/data/make_data_generator.py``):

    * the rows, in file order, are dealt into ``n_folds`` chunks round-robin
      (``chunk i = rows[i::n_folds]``): not stratified, not shuffled (the study's csv,
      ``labels_shuffled.csv``, was shuffled once on disk, so pass rows in that order);
    * repetition ``r`` tests on chunk ``r``; the pool is the other chunks concatenated in
      chunk order (chunk 0 first, or chunk 1 when ``r == 0``);
    * fraction ``f`` trains on the first ``int(len(pool) * f * (1 - validation_fraction))``
      rows of the pool and validates on the next ``int(len(pool) * validation_fraction)``
      rows (with ``validation_fraction == 0``: on all the remaining rows, as the reference's
      ``if val_split:`` branch does). The validation split therefore depends on the
      fraction; see :meth:`RepetitionSplit.validation_for`.

    Because the training subset is a prefix of the pool and the pool starts with chunk 0
    for every ``r >= 1``, four of the five repetitions train (and validate) on exactly the
    same images at every fraction whose training prefix fits in one chunk (5, 10 and 25 %
    with five folds); only the test fold changes. The reference ignores patients and
    ``seed``. The study's configuration (``configs/finetune/rotation_2d.json``) used
    ``val_split=0.05``, see :data:`REFERENCE_VALIDATION_FRACTION`.

The rotation pretext holds out a share of the images, grades unseen, to measure rotation
accuracy: :func:`split_holdout`, grouped the same way (patients and near duplicates).

Grades with fewer rows than the number of parts
-----------------------------------------------
Stratifying needs every grade in every part. When a grade present in the data has fewer
rows than ``n_folds`` (or than ``round(1 / validation_fraction)`` in the pool, for the
validation carve), the parts are drawn unstratified (``KFold``, or ``KFold`` over patients)
and a ``logging`` warning says which grade forced it. A ``ValueError`` is raised only when
there are fewer rows (patients) than parts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from drnb.checks import check_integer
from drnb.targets import N_GRADES, validate_grades

logger = logging.getLogger(__name__)

MODES = ("stratified", "reference")
REFERENCE_VALIDATION_FRACTION = 0.05

__all__ = [
    "MODES",
    "REFERENCE_VALIDATION_FRACTION",
    "RepetitionSplit",
    "assign_folds",
    "make_repetition_split",
    "make_splits",
    "split_holdout",
    "validate_fraction",
]


def _frozen(indices) -> np.ndarray:
    arr = np.sort(np.asarray(indices, dtype=np.int64))
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class RepetitionSplit:
    """Row indices of one cross-validation repetition.

    All index arrays are int64, sorted ascending and read-only; they index the rows of the
    ``grades`` passed to :func:`make_repetition_split` / :func:`make_splits`.

    Attributes
    ----------
    repetition : int
        Repetition number, in ``range(n_folds)``; also the test fold.
    test : numpy.ndarray
        int64 (n_test,) rows of the test fold.
    validation : numpy.ndarray
        int64 (n_val,) rows for model selection, carved from the training pool; empty when
        ``validation_fraction == 0``. In ``mode="stratified"`` it is the same for every
        fraction. In ``mode="reference"`` the validation split depends on the fraction and
        this is the one of the largest fraction; use :meth:`validation_for`.
    train : dict of float to numpy.ndarray
        Fraction (in (0, 1], ascending keys) -> int64 rows of the labelled training subset.
    validation_by_fraction : dict of float to numpy.ndarray
        Fraction -> validation rows used with that fraction (the same array for every
        fraction in ``mode="stratified"``).
    mode : {"stratified", "reference"}
        How the split was built.

    Notes
    -----
    Instances compare by identity (``eq=False``): NumPy arrays have no single truth value.
    """

    repetition: int
    test: np.ndarray
    validation: np.ndarray
    train: dict[float, np.ndarray]
    validation_by_fraction: dict[float, np.ndarray] = field(default_factory=dict)
    mode: str = "stratified"

    @property
    def fractions(self) -> tuple[float, ...]:
        """The fractions with a training subset, ascending."""
        return tuple(self.train)

    def validation_for(self, fraction) -> np.ndarray:
        """Validation rows to use when training on ``fraction``.

        Parameters
        ----------
        fraction : float
            One of :attr:`fractions`.

        Returns
        -------
        numpy.ndarray
            int64 (n_val,) sorted row indices.
        """
        f = validate_fraction(fraction)
        if f not in self.validation_by_fraction:
            raise ValueError(f"fraction={f} has no split here; available: {list(self.train)}")
        return self.validation_by_fraction[f]


def validate_fraction(fraction) -> float:
    """Check a labelled fraction and return it as a float.

    Parameters
    ----------
    fraction : float
        Share of the training candidates to label, ``0 < fraction <= 1`` (0.05 for 5 %).

    Returns
    -------
    float
        ``fraction`` as a Python float.

    Raises
    ------
    ValueError
        If ``fraction`` is not a real number in (0, 1] (a percentage such as 5 is refused).
    """
    if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, Real):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not (0.0 < f <= 1.0):
        hint = " (a percentage? pass 0.05 for 5 %)" if 1.0 < f <= 100.0 else ""
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}{hint}")
    return f


def _check_validation_fraction(validation_fraction) -> float:
    if isinstance(validation_fraction, (bool, np.bool_)) or not isinstance(
        validation_fraction, Real
    ):
        raise ValueError(
            f"validation_fraction must be a number in [0, 0.5), got {validation_fraction!r}"
        )
    v = float(validation_fraction)
    if not (0.0 <= v < 0.5):
        raise ValueError(f"validation_fraction must be in [0, 0.5), got {validation_fraction!r}")
    return v


def _check_fractions(fractions) -> list[float]:
    if isinstance(fractions, (str, bytes)) or not np.iterable(fractions):
        raise ValueError(
            f"fractions must be a sequence of fractions in (0, 1], e.g. (0.05, 0.1, 1.0); "
            f"got {fractions!r}"
        )
    checked = sorted({validate_fraction(f) for f in fractions})
    if not checked:
        raise ValueError("fractions must hold at least one fraction in (0, 1]")
    return checked


def _check_patient_ids(patient_ids, n_rows: int) -> np.ndarray | None:
    if patient_ids is None:
        return None
    ids = np.asarray(patient_ids)
    if ids.ndim != 1 or len(ids) != n_rows:
        raise ValueError(
            f"patient_ids must be 1-D with one id per row of grades ({n_rows}), "
            f"got shape {ids.shape}"
        )
    missing = np.asarray(pd.isna(ids), dtype=bool)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"patient_ids row {row} is missing ({int(missing.sum())} missing in all); pass "
            f"patient_ids=None when the dataset has no patient ids, or fill the gaps with "
            f"one id per image"
        )
    return ids


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _split_parts(
    grades: np.ndarray, groups: np.ndarray | None, n_parts: int, seed: int, what: str
) -> np.ndarray:
    """Part id (0..n_parts-1) per row, stratified by grade and grouped when possible."""
    n_units = len(grades) if groups is None else len(np.unique(groups))
    unit = "rows" if groups is None else "patients"
    if n_units < n_parts:
        raise ValueError(f"{what} needs at least {n_parts} {unit}, got {n_units}")
    present, counts = np.unique(grades, return_counts=True)
    parts = np.empty(len(grades), dtype=np.int64)
    if counts.min() >= n_parts:
        if groups is None:
            cv = StratifiedKFold(n_splits=n_parts, shuffle=True, random_state=seed)
            splits = cv.split(np.zeros(len(grades)), grades)
        else:
            cv = StratifiedGroupKFold(n_splits=n_parts, shuffle=True, random_state=seed)
            splits = cv.split(np.zeros(len(grades)), grades, groups)
        for k, (_, held_out) in enumerate(splits):
            parts[held_out] = k
        return parts
    rare = int(present[np.argmin(counts)])
    logger.warning(
        "%s: grade %d has %d row(s), fewer than the %d parts; stratification needs at least "
        "%d per grade, so the parts are drawn without stratifying by grade",
        what,
        rare,
        int(counts.min()),
        n_parts,
        n_parts,
    )
    kfold = KFold(n_splits=n_parts, shuffle=True, random_state=seed)
    if groups is None:
        for k, (_, held_out) in enumerate(kfold.split(grades)):
            parts[held_out] = k
        return parts
    # Unstratified and grouped: deal whole patients into the parts.
    unique, inverse = np.unique(groups, return_inverse=True)
    part_of_group = np.empty(len(unique), dtype=np.int64)
    for k, (_, held_out) in enumerate(kfold.split(unique)):
        part_of_group[held_out] = k
    return part_of_group[inverse.reshape(-1)]


def assign_folds(grades, patient_ids=None, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Assign every row to a cross-validation fold, stratified by grade.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer DR grades 0..4.
    patient_ids : array-like, shape (N,), optional
        Patient of each row. When given, all rows of a patient get the same fold
        (``StratifiedGroupKFold``); otherwise ``StratifiedKFold`` is used.
    n_folds : int
        Number of folds, >= 2.
    seed : int
        Seed of the shuffle (``random_state``), >= 0.

    Returns
    -------
    numpy.ndarray
        int64 (N,) fold id in ``0..n_folds-1``.

    Raises
    ------
    ValueError
        On bad grades (names the first bad row), ``n_folds < 2``, fewer rows (patients) than
        ``n_folds``, or patient ids of the wrong length or with gaps.

    Notes
    -----
    If a grade has fewer than ``n_folds`` rows, the folds are drawn without stratification
    (``KFold``, or ``KFold`` over patients) and a warning is logged.
    """
    g = validate_grades(grades)
    n_folds = check_integer(n_folds, "n_folds", 2)
    seed = check_integer(seed, "seed", 0)
    ids = _check_patient_ids(patient_ids, len(g))
    if len(g) == 0:
        raise ValueError("grades is empty; cross-validation needs at least n_folds rows")
    return _split_parts(g, ids, n_folds, seed, what="n_folds")


def _stratified_split(
    grades: np.ndarray,
    ids: np.ndarray | None,
    folds: np.ndarray,
    repetition: int,
    fractions: list[float],
    seed: int,
    validation_fraction: float,
) -> RepetitionSplit:
    rep_seed = seed + repetition
    test = np.flatnonzero(folds == repetition)
    pool = np.flatnonzero(folds != repetition)
    if validation_fraction > 0:
        n_parts = round(1.0 / validation_fraction)
        parts = _split_parts(
            grades[pool],
            None if ids is None else ids[pool],
            n_parts,
            rep_seed,
            what="validation_fraction",
        )
        validation = pool[parts == 0]
        candidates = pool[parts != 0]
    else:
        validation = pool[:0]
        candidates = pool

    # One permutation per grade; every fraction takes a prefix of it, so subsets nest.
    rng = np.random.default_rng(rep_seed)
    permuted = [rng.permutation(candidates[grades[candidates] == g]) for g in range(N_GRADES)]
    train = {}
    for f in fractions:
        chosen = []
        for rows in permuted:
            n_g = len(rows)
            if n_g == 0:
                continue
            k = n_g if f == 1.0 else min(n_g, max(1, math.floor(f * n_g + 0.5)))
            chosen.append(rows[:k])
        train[f] = _frozen(np.concatenate(chosen))
    validation = _frozen(validation)
    return RepetitionSplit(
        repetition=repetition,
        test=_frozen(test),
        validation=validation,
        train=train,
        validation_by_fraction={f: validation for f in fractions},
        mode="stratified",
    )


def _reference_split(
    n_rows: int,
    n_folds: int,
    repetition: int,
    fractions: list[float],
    validation_fraction: float,
) -> RepetitionSplit:
    rows = np.arange(n_rows, dtype=np.int64)
    chunks = [rows[i::n_folds] for i in range(n_folds)]  # reference ``chunkify``
    test = chunks[repetition]
    pool = np.concatenate([chunks[i] for i in range(n_folds) if i != repetition])
    train, validation_by_fraction = {}, {}
    for f in fractions:
        # Same arithmetic and truncation as ``CvDataKaggle.get_dataset`` followed by
        # ``get_data_generators_internal``.
        n_train = int(len(pool) * (f * (1 - validation_fraction)))
        if n_train == 0:
            raise ValueError(
                f"fraction={f} leaves no training rows in mode='reference' "
                f"(pool of {len(pool)} rows, validation_fraction={validation_fraction})"
            )
        if validation_fraction > 0:
            n_val = int(len(pool) * validation_fraction)
            val = pool[n_train : n_train + n_val]
        else:
            val = pool[n_train:]
        train[f] = _frozen(pool[:n_train])
        validation_by_fraction[f] = _frozen(val)
    return RepetitionSplit(
        repetition=repetition,
        test=_frozen(test),
        validation=validation_by_fraction[fractions[-1]],
        train=train,
        validation_by_fraction=validation_by_fraction,
        mode="reference",
    )


def _checked_common(grades, fractions, patient_ids, n_folds, seed, validation_fraction, mode):
    g = validate_grades(grades)
    mode = _check_mode(mode)
    n_folds = check_integer(n_folds, "n_folds", 2)
    seed = check_integer(seed, "seed", 0)
    checked_fractions = _check_fractions(fractions)
    validation_fraction = _check_validation_fraction(validation_fraction)
    ids = _check_patient_ids(patient_ids, len(g))
    if len(g) < n_folds:
        raise ValueError(f"grades has {len(g)} rows, fewer than n_folds={n_folds}")
    if mode == "reference" and ids is not None:
        logger.warning(
            "mode='reference' ignores patient_ids: the reference split does not group by "
            "patient, so a patient's images can land on both sides"
        )
        ids = None
    return g, checked_fractions, ids, n_folds, seed, validation_fraction, mode


def _check_repetition(repetition, n_folds: int) -> int:
    return check_integer(repetition, "repetition", 0, n_folds - 1)  # repetition r tests on fold r


def make_repetition_split(
    grades,
    repetition: int,
    fractions,
    *,
    patient_ids=None,
    n_folds: int = 5,
    seed: int = 0,
    validation_fraction: float = 0.1,
    mode: str = "stratified",
) -> RepetitionSplit:
    """Build the test fold, validation split and nested training subsets of one repetition.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer DR grades 0..4, one per image, in file order.
    repetition : int
        Repetition, in ``range(n_folds)``; it tests on fold ``repetition``.
    fractions : sequence of float
        Labelled fractions in (0, 1], e.g. ``(0.05, 0.1, 0.25, 0.5, 1.0)``. In
        ``mode="stratified"`` they are fractions of the training candidates (the pool minus
        the validation split); in ``mode="reference"`` fractions of the pool, of which the
        reference trains on ``f * (1 - validation_fraction)``.
    patient_ids : array-like, shape (N,), optional
        Patient of each image. In ``mode="stratified"`` no patient is split between test,
        validation and training. ``mode="reference"`` ignores them (with a warning).
    n_folds : int
        Number of folds, >= 2.
    seed : int
        Seed (>= 0) of the folds; the validation carve and the per-grade permutations of
        repetition ``r`` use ``seed + r``. Ignored by ``mode="reference"``.
    validation_fraction : float
        Share of the pool held out for model selection, in [0, 0.5); 0 gives an empty
        validation split in ``mode="stratified"``.
    mode : {"stratified", "reference"}
        See the module docstring.

    Returns
    -------
    RepetitionSplit
        Sorted int64 row indices; test, validation and every training subset are disjoint.

    Raises
    ------
    ValueError
        On bad grades, fractions, repetition, ``n_folds``, ``validation_fraction``, mode or
        patient ids, or when the data are too small to split.
    """
    g, fr, ids, n_folds, seed, vf, mode = _checked_common(
        grades, fractions, patient_ids, n_folds, seed, validation_fraction, mode
    )
    repetition = _check_repetition(repetition, n_folds)
    if mode == "reference":
        return _reference_split(len(g), n_folds, repetition, fr, vf)
    folds = _split_parts(g, ids, n_folds, seed, what="n_folds")
    return _stratified_split(g, ids, folds, repetition, fr, seed, vf)


def make_splits(
    grades,
    fractions,
    *,
    repetitions: int = 5,
    patient_ids=None,
    n_folds: int = 5,
    seed: int = 0,
    validation_fraction: float = 0.1,
    mode: str = "stratified",
) -> list[RepetitionSplit]:
    """Build the splits of repetitions ``0..repetitions-1`` (see :func:`make_repetition_split`).

    Parameters
    ----------
    grades, fractions, patient_ids, n_folds, seed, validation_fraction, mode
        As for :func:`make_repetition_split`.
    repetitions : int
        Number of repetitions, ``1 <= repetitions <= n_folds``. With ``repetitions ==
        n_folds`` the test folds partition the rows.

    Returns
    -------
    list of RepetitionSplit
        One per repetition, in order; the folds are computed once and shared.
    """
    g, fr, ids, n_folds, seed, vf, mode = _checked_common(
        grades, fractions, patient_ids, n_folds, seed, validation_fraction, mode
    )
    repetitions = check_integer(repetitions, "repetitions", 1)
    if repetitions > n_folds:
        raise ValueError(
            f"repetitions must be at most n_folds={n_folds} (one test fold each), "
            f"got {repetitions}"
        )
    if mode == "reference":
        return [_reference_split(len(g), n_folds, r, fr, vf) for r in range(repetitions)]
    folds = _split_parts(g, ids, n_folds, seed, what="n_folds")
    return [_stratified_split(g, ids, folds, r, fr, seed, vf) for r in range(repetitions)]


def split_holdout(n_images: int, fraction: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_images)`` into (train, held-out) index arrays, int64.

    Parameters
    ----------
    n_images : int
    fraction : float
        Share of the images to hold out, in [0, 0.5).
    seed : int
    groups : array-like of shape (n_images,), optional
        Images of one group (a patient's eyes, near-duplicate photographs) land on the same
        side: whole groups are held out, in seeded order, until at least ``fraction`` of the
        images are. Without groups, image by image.
    """
    rng = np.random.default_rng(seed)
    n_holdout = int(round(fraction * n_images))
    if groups is None:
        order = rng.permutation(n_images)
        return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)), sort=False)
    if len(codes) != n_images:
        raise ValueError(f"{len(codes)} group ids for {n_images} images: expected one per image")
    if n_holdout == 0:
        return np.arange(n_images, dtype=np.int64), np.zeros(0, np.int64)
    group_order = rng.permutation(len(uniques))
    covered = np.cumsum(np.bincount(codes, minlength=len(uniques))[group_order])
    n_groups = int(np.searchsorted(covered, n_holdout)) + 1
    held = np.isin(codes, group_order[:n_groups])
    if 2 * held.sum() >= n_images:
        raise ValueError(
            f"holding out {fraction:.0%} of {n_images} images by whole groups ({len(uniques)} of them) takes "
            f"{held.sum()}: expected fewer than half; give the images smaller groups (patient ids) or more images"
        )
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)
