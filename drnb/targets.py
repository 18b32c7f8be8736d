"""What the fine-tuning head predicts, and how its outputs become grades 0 (no DR) to 4.

Targets: ``"ordinal"``, the study's cumulative code (grade k is k + 1 leading ones, output j
meaning "grade >= j"; five sigmoids, binary cross-entropy); ``"softmax"``, one-hot for a
five-way softmax; ``"regression"``, the grade as one number (one linear output, squared
error: the grades' order and distances are what quadratic weighted kappa weighs).

Decoding: the study decodes the ordinal code with ``(p > 0.5).sum(1) - 1``, which gives -1
when every output is low, and scikit-learn's kappa then drops those images silently; drnb
counts outputs 1-4 above 0.5 instead (always 0-4) and keeps the study's rule as
``rule="reference"``. A network trained on few labels ranks images better than it places
them, so ``cut_points="prior"`` cuts one score per image (:func:`expected_grade`) where the
training pool's scores give each grade as often as the labelled subset has it
(:func:`prior_cut_points`): no label beyond the subset's grade counts is needed.
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
    """``grades`` as int64 (N,) in 0..4; ValueError naming the first bad row otherwise.

    Whole floats are accepted (a pandas column with missing values reads as float64); NaN,
    fractions, booleans and strings are not. ``name`` is used in the message.
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
    """Grades (N,) -> float32 (N, 5) cumulative code: grade k has ones in columns 0..k
    (column j means "grade >= j")."""
    g = validate_grades(grades)
    return (np.arange(N_GRADES)[None, :] <= g[:, None]).astype(np.float32)


def ordinal_decode(probabilities, rule: str = "count") -> np.ndarray:
    """Ordinal sigmoid outputs float (N, 5) in [0, 1] -> int64 (N,) grades.

    ``"count"``: the number of outputs 1-4 above 0.5, always in 0..4 (output 0 is ignored).
    ``"reference"``: the study's ``(p > 0.5).sum(1) - 1``, in -1..4; score it with
    :func:`drnb.metrics.evaluate_predictions`, which counts the -1 rows instead of dropping them.
    """
    if rule not in DECODE_RULES:
        raise ValueError(f"rule must be one of {DECODE_RULES}, got {rule!r}")
    p = _validate_outputs(probabilities)
    above = p > THRESHOLD
    if rule == "count":
        return above[:, 1:].sum(axis=1).astype(np.int64)
    return above.sum(axis=1).astype(np.int64) - 1


def onehot_encode(grades) -> np.ndarray:
    """Grades (N,) -> float32 (N, 5) one-hot, for a softmax head."""
    g = validate_grades(grades)
    return np.eye(N_GRADES, dtype=np.float32)[g]


def softmax_decode(probabilities) -> np.ndarray:
    """Softmax outputs or logits float (N, 5) -> int64 (N,) grades by argmax (ties to the lower grade)."""
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
    """Grades (N,) -> the ``target``'s training targets: float32 (N, 5), or (N, 1) for ``"regression"``."""
    _check_target(target)
    if target == "regression":
        return validate_grades(grades).astype(np.float32)[:, None]
    return ordinal_encode(grades) if target == "ordinal" else onehot_encode(grades)


def decode(probabilities, target: str, rule: str = "count") -> np.ndarray:
    """Head outputs (N, 5), or (N, 1) for ``"regression"``, -> int64 (N,) grades by the fixed rule.

    Ordinal: :func:`ordinal_decode` with ``rule``; softmax: argmax; regression: rounded and
    clipped to 0-4. ``rule="reference"`` (which can give -1) exists for the ordinal head only.
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
    """One score per image, float64 (N,): ordinal, the sum of outputs 1-4; softmax,
    ``sum_k k * p_k`` (both in [0, 4]); regression, the output itself (any real)."""
    _check_target(target)
    if target == "regression":
        return _validate_outputs(probabilities, "outputs", unit_interval=False, width=1)[:, 0]
    p = _validate_outputs(probabilities)
    if target == "ordinal":
        return p[:, 1:].sum(axis=1)
    return p @ np.arange(N_GRADES, dtype=np.float64)


def prior_cut_points(scores, labelled_grades) -> np.ndarray:
    """Four non-decreasing cut points, float64 (4,), that give ``scores`` (M,) the grade
    proportions of ``labelled_grades`` (L,): cut j is the scores' quantile at the share of
    labelled grades below j + 1."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or not len(scores) or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a non-empty 1-D array of finite numbers; got shape {scores.shape}")
    grades = validate_grades(labelled_grades, "labelled_grades")
    if not len(grades):
        raise ValueError("labelled_grades is empty: the cut points need the labelled subset's grade proportions")
    below = np.cumsum(np.bincount(grades, minlength=N_GRADES))[:-1] / len(grades)
    return np.quantile(scores, below)


def decode_with_cut_points(scores, cut_points) -> np.ndarray:
    """Scores (N,) and cut points (4,) -> int64 (N,) grades: how many cuts a score exceeds
    (ties go to the lower grade)."""
    cuts = np.asarray(cut_points, np.float64)
    if cuts.shape != (N_GRADES - 1,) or np.any(np.diff(cuts) < 0):
        raise ValueError(f"cut_points must be {N_GRADES - 1} non-decreasing numbers; got {cuts.tolist()}")
    return (np.asarray(scores, np.float64)[:, None] > cuts[None, :]).sum(axis=1).astype(np.int64)
