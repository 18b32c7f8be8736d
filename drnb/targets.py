"""Label codings for the fine-tuning head: ordinal (cumulative), one-hot and regression.

Diabetic-retinopathy grades are the integers 0 (no DR) to 4 (proliferative DR).
Three codings are offered:

``"ordinal"``
    The cumulative code of the study's reference code (HealthML/self-supervised-3d-tasks,
    ``KaggleGenerator`` with ``multilabel=True``): grade ``k`` becomes ``k + 1`` leading ones,
    so output ``j`` means "grade >= j". Output 0 ("grade >= 0") is always 1. The head has five
    sigmoid units trained with binary cross-entropy.
``"softmax"``
    A plain one-hot code for a five-way softmax head.
``"regression"``
    The grade itself, as one number, for a head with one linear output trained with mean
    squared error: the grade's order and distances are the target, as quadratic weighted
    kappa weighs them (most of the APTOS 2019 competition's leading entries regressed the
    grade and cut the prediction at thresholds). Its output is a score, not a probability,
    and is decoded by rounding (clipped to 0-4) or by cut points.

Decoding the ordinal code
-------------------------
The reference decodes with ``(p > 0.5).sum(1) - 1``. When every output is below 0.5 (which
includes output 0, which the network is supposed to keep at 1) that gives ``-1``, a grade that
does not exist. ``sklearn.metrics.cohen_kappa_score(..., labels=[0, 1, 2, 3, 4])`` then drops
those images from the confusion matrix without a word, so the reported kappa is computed on
fewer test images than claimed. drnb therefore decodes with the ``"count"`` rule by default:
the grade is the number of outputs 1..4 above 0.5, which is always in 0..4 and ignores output 0.
The reference rule is kept, as ``rule="reference"``, only to reproduce the reference numbers.

Cut points matched to the grade prior
-------------------------------------
A fixed threshold of 0.5 per output suits a network that has learnt the grades well. One
that has only started to (a CPU budget, few labels) ranks images better than it places them:
its outputs hover near the grade prior, so the count rule answers "grade 0" or "grade 1" for
almost every image and kappa sees little of the ranking. :func:`expected_grade` turns the
outputs into one score, and :func:`prior_cut_points` places four cut points on the scores of
images the run may see (its training pool, never the test fold) so that the grades they
receive occur as often as in the labelled subset; :func:`decode_with_cut_points` applies them
to each test image on its own. Kaggle's DR solutions tuned such thresholds on validation
labels; matching the prior needs no labels beyond the subset's grade counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

N_GRADES = 5
TARGETS = ("ordinal", "softmax", "regression")
# The loss each target's head is trained with, in Keras's names (drnb.training.Trainer takes them too).
TARGET_LOSSES = {
    "ordinal": "binary_crossentropy",
    "softmax": "categorical_crossentropy",
    "regression": "mean_squared_error",
}
# The activation of each target's head outputs (drnb.models.build_head's names).
TARGET_ACTIVATIONS = {"ordinal": "sigmoid", "softmax": "softmax", "regression": "linear"}
DECODE_RULES = ("count", "reference")
CUT_POINTS = ("fixed", "prior")  # a profile's choice: the fixed rule (count or argmax), or prior_cut_points
THRESHOLD = 0.5

__all__ = [
    "CUT_POINTS",
    "DECODE_RULES",
    "N_GRADES",
    "TARGETS",
    "TARGET_ACTIVATIONS",
    "TARGET_LOSSES",
    "THRESHOLD",
    "decode",
    "decode_with_cut_points",
    "encode",
    "expected_grade",
    "onehot_encode",
    "output_width",
    "ordinal_decode",
    "ordinal_encode",
    "prior_cut_points",
    "softmax_decode",
    "validate_grades",
]


def _first_bad(valid: np.ndarray) -> int:
    return int(np.flatnonzero(~valid)[0])


def validate_grades(grades, name: str = "grades") -> np.ndarray:
    """Check that ``grades`` holds integer DR grades 0-4 and return them as int64.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer grades in 0..4. Floats are accepted when they are whole numbers (a pandas
        column read with missing values turns into float64); NaN, fractions, booleans,
        strings and values outside 0..4 are rejected.
    name : str
        Parameter name used in the error message.

    Returns
    -------
    numpy.ndarray
        int64 (N,) in 0..4. May be empty.

    Raises
    ------
    ValueError
        If ``grades`` is not 1-D, or names the first row that is not an integer in 0..4.
    """
    arr = np.asarray(grades)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one grade per image), got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    kind = arr.dtype.kind
    if kind in "iu":
        valid = (arr >= 0) & (arr < N_GRADES)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(arr) & (arr == np.floor(arr)) & (arr >= 0) & (arr < N_GRADES)
    elif kind == "O":
        valid = np.array(
            [
                isinstance(v, (int, np.integer, float, np.floating))
                and not isinstance(v, (bool, np.bool_))
                and not pd.isna(v)
                and float(v).is_integer()
                and 0 <= v < N_GRADES
                for v in arr
            ],
            dtype=bool,
        )
    else:  # bool, str, bytes, datetime ...: not a grade
        valid = np.zeros(arr.shape, dtype=bool)
    if not valid.all():
        row = _first_bad(valid)
        raise ValueError(
            f"{name} must be integer grades 0-4; row {row} holds {arr[row]!r} "
            f"({int((~valid).sum())} bad row(s) in all)"
        )
    return arr.astype(np.int64)


def _validate_outputs(probabilities, name: str = "probabilities", unit_interval: bool = True, width: int = N_GRADES):
    arr = np.asarray(probabilities)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(
            f"{name} must have shape (N, {width}), one row of head outputs per image; "
            f"got shape {arr.shape}"
        )
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} must be finite; row {row} holds {arr[row].tolist()}")
    if unit_interval:
        outside = ((arr < 0) | (arr > 1)).any(axis=1)
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{name} must be sigmoid outputs in [0, 1] (logits? apply a sigmoid first); "
                f"row {row} holds {arr[row].tolist()}"
            )
    return arr


def ordinal_encode(grades) -> np.ndarray:
    """Encode grades with the reference's cumulative (ordinal) code.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer grades in 0..4.

    Returns
    -------
    numpy.ndarray
        float32 (N, 5) of 0/1. Grade ``k`` has ones in columns ``0..k``:
        0 -> ``[1, 0, 0, 0, 0]``, 2 -> ``[1, 1, 1, 0, 0]``, 4 -> ``[1, 1, 1, 1, 1]``.
        Column ``j`` means "grade >= j".

    Raises
    ------
    ValueError
        If a grade is not an integer in 0..4 (the message names the row).
    """
    g = validate_grades(grades)
    return (np.arange(N_GRADES)[None, :] <= g[:, None]).astype(np.float32)


def ordinal_decode(probabilities, rule: str = "count") -> np.ndarray:
    """Turn sigmoid outputs of an ordinal head into grades.

    Parameters
    ----------
    probabilities : array-like, shape (N, 5)
        Sigmoid outputs in [0, 1]; column ``j`` estimates P(grade >= j).
    rule : {"count", "reference"}
        ``"count"`` (default): grade = number of outputs 1..4 above 0.5. Output 0
        ("grade >= 0") is always true and is ignored. The result is always in 0..4: all
        outputs below 0.5 give 0, and non-monotone outputs still land in range, e.g.
        ``[.9, .2, .8, .1, .1]`` -> 1 (only output 2 is above 0.5) and
        ``[.1, .9, .9, .1, .1]`` -> 2.

        ``"reference"``: ``(p > 0.5).sum(1) - 1`` exactly as the reference code
        (``transform_multilabel_to_continuous`` in ``self_supervised_3d_tasks/metrics.py``).
        This CAN return -1 (all five outputs below 0.5), and it counts output 0 like the
        others (``[.1, .9, .9, .1, .1]`` -> 1). The reference then passed such -1 grades to
        ``cohen_kappa_score(labels=[0..4])``, which silently drops them. Use it only to
        reproduce reference numbers, and score its output with
        :func:`drnb.metrics.evaluate_predictions`, which counts the -1 rows instead of
        dropping them.

    Returns
    -------
    numpy.ndarray
        int64 (N,): in 0..4 for ``"count"``, in -1..4 for ``"reference"``.

    Raises
    ------
    ValueError
        If ``probabilities`` is not (N, 5), not finite, outside [0, 1], or ``rule`` is unknown.
    """
    if rule not in DECODE_RULES:
        raise ValueError(f"rule must be one of {DECODE_RULES}, got {rule!r}")
    p = _validate_outputs(probabilities)
    above = p > THRESHOLD
    if rule == "count":
        return above[:, 1:].sum(axis=1).astype(np.int64)
    return above.sum(axis=1).astype(np.int64) - 1


def onehot_encode(grades) -> np.ndarray:
    """Encode grades one-hot for a softmax head.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer grades in 0..4.

    Returns
    -------
    numpy.ndarray
        float32 (N, 5) with a single 1 per row, in the column of the grade.
    """
    g = validate_grades(grades)
    return np.eye(N_GRADES, dtype=np.float32)[g]


def softmax_decode(probabilities) -> np.ndarray:
    """Turn softmax outputs (or logits) into grades by argmax.

    Parameters
    ----------
    probabilities : array-like, shape (N, 5)
        Softmax probabilities or logits (any finite values; argmax is the same). Ties go to
        the lower grade.

    Returns
    -------
    numpy.ndarray
        int64 (N,) in 0..4.
    """
    p = _validate_outputs(probabilities, unit_interval=False)
    return np.argmax(p, axis=1).astype(np.int64)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def output_width(target: str) -> int:
    """How many outputs the head for ``target`` has: 5, or 1 for ``"regression"``."""
    _check_target(target)
    return 1 if target == "regression" else N_GRADES


def encode(grades, target: str) -> np.ndarray:
    """Encode grades for the head named by ``target``.

    Parameters
    ----------
    grades : array-like, shape (N,)
        Integer grades in 0..4.
    target : {"ordinal", "softmax", "regression"}
        ``"ordinal"`` -> :func:`ordinal_encode`, ``"softmax"`` -> :func:`onehot_encode`,
        ``"regression"`` -> the grades as numbers.

    Returns
    -------
    numpy.ndarray
        float32 (N, 5), or (N, 1) for ``"regression"``.
    """
    _check_target(target)
    if target == "regression":
        return validate_grades(grades).astype(np.float32)[:, None]
    return ordinal_encode(grades) if target == "ordinal" else onehot_encode(grades)


def decode(probabilities, target: str, rule: str = "count") -> np.ndarray:
    """Decode head outputs into grades for the head named by ``target``.

    Parameters
    ----------
    probabilities : array-like, shape (N, 5), or (N, 1) for ``"regression"``
        Head outputs.
    target : {"ordinal", "softmax", "regression"}
        ``"ordinal"`` -> :func:`ordinal_decode` with ``rule``; ``"softmax"`` ->
        :func:`softmax_decode`; ``"regression"``: the output rounded to the nearest grade,
        clipped to 0-4.
    rule : {"count", "reference"}
        Ordinal decoding rule (see :func:`ordinal_decode`). ``"reference"`` only exists for
        the ordinal head and is refused for the others.

    Returns
    -------
    numpy.ndarray
        int64 (N,); in 0..4 except for ``rule="reference"``, which can give -1.
    """
    _check_target(target)
    if rule not in DECODE_RULES:
        raise ValueError(f"rule must be one of {DECODE_RULES}, got {rule!r}")
    if target == "ordinal":
        return ordinal_decode(probabilities, rule=rule)
    if rule != "count":
        raise ValueError(
            f"rule={rule!r} applies only to target='ordinal'; a softmax head is decoded by argmax, "
            "a regression head by rounding"
        )
    if target == "regression":
        return np.clip(np.rint(expected_grade(probabilities, target)), 0, N_GRADES - 1).astype(np.int64)
    return softmax_decode(probabilities)


def expected_grade(probabilities, target: str) -> np.ndarray:
    """One score per image from the head's outputs: the grade it expects.

    Parameters
    ----------
    probabilities : array-like, shape (N, 5), or (N, 1) for ``"regression"``
        Ordinal sigmoid outputs ("grade >= j", in [0, 1]), softmax probabilities, or the
        regression head's output.
    target : {"ordinal", "softmax", "regression"}

    Returns
    -------
    numpy.ndarray
        float64 (N,): ordinal, the sum of outputs 1-4; softmax, ``sum_k k * p_k`` (both in
        [0, 4]); regression, the output itself (any real number).
    """
    _check_target(target)
    if target == "regression":
        return _validate_outputs(probabilities, "outputs", unit_interval=False, width=1)[:, 0]
    p = _validate_outputs(probabilities)
    if target == "ordinal":
        return p[:, 1:].sum(axis=1)
    return p @ np.arange(N_GRADES, dtype=np.float64)


def prior_cut_points(scores, labelled_grades) -> np.ndarray:
    """Four cut points that give ``scores`` the grade proportions of ``labelled_grades``.

    Parameters
    ----------
    scores : array-like, shape (M,)
        Scores (:func:`expected_grade`) of the images the cut points are fitted on.
    labelled_grades : array-like, shape (L,)
        Grades 0-4 of the labelled training subset: only their proportions are used.

    Returns
    -------
    numpy.ndarray
        float64 (4,), non-decreasing: cut ``j`` is the score quantile at the proportion of
        labelled grades below ``j + 1``.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or not len(scores) or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a non-empty 1-D array of finite numbers; got shape {scores.shape}")
    grades = validate_grades(labelled_grades, "labelled_grades")
    if not len(grades):
        raise ValueError("labelled_grades is empty: the cut points need the labelled subset's grade proportions")
    below = np.cumsum(np.bincount(grades, minlength=N_GRADES))[:-1] / len(grades)
    return np.quantile(scores, below)


def decode_with_cut_points(scores, cut_points) -> np.ndarray:
    """Grade = how many cut points a score exceeds (ties go to the lower grade).

    Parameters
    ----------
    scores : array-like, shape (N,)
    cut_points : array-like, shape (4,), non-decreasing

    Returns
    -------
    numpy.ndarray
        int64 (N,) in 0..4.
    """
    cuts = np.asarray(cut_points, np.float64)
    if cuts.shape != (N_GRADES - 1,) or np.any(np.diff(cuts) < 0):
        raise ValueError(f"cut_points must be {N_GRADES - 1} non-decreasing numbers; got {cuts.tolist()}")
    return (np.asarray(scores, np.float64)[:, None] > cuts[None, :]).sum(axis=1).astype(np.int64)
