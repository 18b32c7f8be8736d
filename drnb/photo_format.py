"""What the photographs' format alone predicts: a grader that never looks at the retina.

APTOS 2019's photographs come from several clinics and cameras, in proportions that differ
between grades, so a file's size, its aspect and how the camera framed the fundus carry part
of the grade. A logistic regression on those properties alone, cross-validated under the
sweep's own folds, is a floor that any grader's kappa should be read against: what a model
could score without learning anything about retinopathy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from drnb.metrics import quadratic_weighted_kappa
from drnb.splits import make_repetition_split

# Read before preprocessing (drnb.preprocessing.FORMAT_COLUMNS), in the photograph's pixels.
FORMAT_FEATURES = ("width", "height", "aspect", "cut_off_share", "fundus_radius")


def visible_disc_share(half_extent_ratio) -> np.ndarray:
    """Share of a disc's area inside a centred band of half-width ``half_extent_ratio`` radii.

    A photograph cut flat at top and bottom keeps the band ``|y| <= h`` of its fundus disc of
    radius 1; the area inside it is ``2 (asin h + h sqrt(1 - h^2))`` of the disc's ``pi``.

    Parameters
    ----------
    half_extent_ratio : array-like
        float in [0, 1]: the visible half-height over the disc's radius (1: a whole disc).

    Returns
    -------
    numpy.ndarray
        float in [0, 1].
    """
    h = np.clip(np.asarray(half_extent_ratio, np.float64), 0, 1)
    return 2 * (np.arcsin(h) + h * np.sqrt(1 - h**2)) / np.pi


def format_features(table: pd.DataFrame) -> pd.DataFrame:
    """The :data:`FORMAT_FEATURES` of every photograph of a preprocessed table.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`drnb.preprocessing.preprocess_table`: ``width, height, fundus_radius,
        fundus_half_extent`` in pixels.

    Returns
    -------
    pandas.DataFrame
        float columns ``width, height, aspect`` (width / height), ``cut_off_share`` (the share
        of the fundus disc outside the frame, in [0, 1]) and ``fundus_radius``.
    """
    missing = [column for column in ("width", "height", "fundus_radius", "fundus_half_extent") if column not in table]
    if missing:
        raise ValueError(f"table has no {missing} column(s): expected the table drnb.preprocessing.preprocess_table returns")
    return pd.DataFrame(
        {
            "width": table["width"].astype(float),
            "height": table["height"].astype(float),
            "aspect": table["width"] / table["height"],
            "cut_off_share": 1 - visible_disc_share(table["fundus_half_extent"] / table["fundus_radius"]),
            "fundus_radius": table["fundus_radius"].astype(float),
        }
    )


def format_only_kappa(table: pd.DataFrame, profile, patient_ids=None) -> pd.DataFrame:
    """Quadratic weighted kappa of a logistic regression on the photographs' format alone.

    Each repetition fits on the labelled images the sweep's 100 % runs train on and scores
    its test fold (:func:`drnb.splits.make_repetition_split` with the profile's folds, seed,
    validation share and split mode), so the floor is read on the same images as the table.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`drnb.preprocessing.preprocess_table` (``grade`` and the format columns).
    profile : drnb.profiles.Profile
    patient_ids : numpy.ndarray, optional
        The groups no split may cut (:func:`drnb.duplicates.photograph_groups`).

    Returns
    -------
    pandas.DataFrame
        One row per repetition: ``repetition, n_train, n_test, qw_kappa``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = format_features(table).to_numpy()
    grades = table["grade"].to_numpy(np.int64)
    rows = []
    for repetition in range(profile.repetitions):
        split = make_repetition_split(
            grades, repetition, (1.0,), patient_ids=patient_ids, n_folds=profile.folds, seed=profile.seed,
            validation_fraction=profile.validation_fraction, mode=profile.split_mode,
        )
        train = split.train[1.0]
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(features[train], grades[train])
        kappa = quadratic_weighted_kappa(grades[split.test], model.predict(features[split.test]))
        rows.append({"repetition": repetition, "n_train": len(train), "n_test": len(split.test), "qw_kappa": kappa})
    return pd.DataFrame(rows)
