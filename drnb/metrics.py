"""Scores for DR grading: quadratic weighted kappa, its bootstrap interval, and a summary;
and the screening question: referable DR (grade 2 or worse) against grades 0-1, as ROC AUC of
the grader's continuous score with its bootstrap interval, and sensitivity and specificity at
an operating point chosen on training images (:func:`referable_metrics`).

Every test image counts. The reference code decoded its ordinal head with
``(p > 0.5).sum(1) - 1``, which gives -1 when every output is below 0.5, and
``cohen_kappa_score(labels=[0..4])`` silently drops such rows. Here
:func:`quadratic_weighted_kappa` refuses predictions outside 0..4, and
:func:`evaluate_predictions` counts them (``n_invalid_predictions``) and scores them as
grade 0 ("no DR", the reading of "no output above threshold"), so nothing disappears.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from numbers import Real

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, recall_score, roc_auc_score

from drnb.checks import check_integer
from drnb.targets import N_GRADES, validate_grades

logger = logging.getLogger(__name__)

GRADES = tuple(range(N_GRADES))
INVALID_PREDICTION_GRADE = 0
# Referable DR: moderate non-proliferative or worse, the photographs a screening programme sends
# to an ophthalmologist (Gulshan et al., JAMA 2016).
REFERABLE_GRADE = 2
# The specificity the operating point is chosen for, on training images.
REFERABLE_SPECIFICITY = 0.9
ONE_CLASS_ONLY = "undefined: one class only"

__all__ = [
    "GRADES",
    "INVALID_PREDICTION_GRADE",
    "ONE_CLASS_ONLY",
    "REFERABLE_GRADE",
    "REFERABLE_SPECIFICITY",
    "bootstrap_auc_ci",
    "bootstrap_auc_difference_ci",
    "bootstrap_kappa_ci",
    "bootstrap_kappa_difference_ci",
    "evaluate_predictions",
    "operating_point",
    "quadratic_weighted_kappa",
    "referable",
    "referable_auc",
    "referable_metrics",
    "specificity_threshold",
]

# scipy >= 1.15 takes ``rng``; older releases call the same argument ``random_state``.
_BOOTSTRAP_RNG_KW = (
    "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
)


def _integer_predictions(y_pred, n: int) -> np.ndarray:
    arr = np.asarray(y_pred)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(
            f"y_pred must be 1-D with one prediction per y_true row ({n}), got shape {arr.shape}"
        )
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(arr) & (arr == np.floor(arr))
        if not whole.all():
            row = int(np.flatnonzero(~whole)[0])
            raise ValueError(
                f"y_pred must hold integer grades (decode head outputs first, see "
                f"drnb.targets.decode); row {row} holds {arr[row]!r}"
            )
        return arr.astype(np.int64)
    raise ValueError(f"y_pred must hold integer grades, got dtype {arr.dtype}")


def _checked_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate lengths and types; y_true in 0..4, y_pred any integers."""
    t = validate_grades(y_true, name="y_true")
    if len(t) == 0:
        raise ValueError("y_true is empty; scores need at least one test image")
    p = _integer_predictions(y_pred, len(t))
    return t, p


def _outside(p: np.ndarray) -> np.ndarray:
    return (p < 0) | (p >= N_GRADES)


def _kappa_undefined(t: np.ndarray, p: np.ndarray) -> bool:
    # Expected disagreement is zero exactly when both sides are one and the same grade.
    return bool(np.all(t == t[0]) and np.all(p == t[0]))


def _kappa(t: np.ndarray, p: np.ndarray) -> float:
    if _kappa_undefined(t, p):
        return float("nan")
    return float(cohen_kappa_score(t, p, labels=list(GRADES), weights="quadratic"))


_QUADRATIC_WEIGHTS = (np.arange(len(GRADES))[:, None] - np.arange(len(GRADES))[None, :]) ** 2


def kappa_of_resamples(t: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Quadratic weighted kappa of many resamples at once, for the bootstrap.

    The same formula as scikit-learn's ``cohen_kappa_score(weights="quadratic",
    labels=range(5))`` (``1 - sum(W * observed) / sum(W * expected)``, tested equal to it),
    vectorised over resamples: calling scikit-learn once per resample made the bootstrap
    the slowest step of a fine-tuning run. NaN where kappa is undefined.
    """
    t = np.moveaxis(np.asarray(t), axis, -1)
    p = np.moveaxis(np.asarray(p), axis, -1)
    grades = np.arange(len(GRADES))
    true_onehot = (t[..., None] == grades).astype(np.float64)
    pred_onehot = (p[..., None] == grades).astype(np.float64)
    observed = np.einsum("...ni,...nj->...ij", true_onehot, pred_onehot)
    expected = np.einsum("...i,...j->...ij", true_onehot.sum(-2), pred_onehot.sum(-2)) / t.shape[-1]
    disagreement = (_QUADRATIC_WEIGHTS * observed).sum((-2, -1))
    chance = (_QUADRATIC_WEIGHTS * expected).sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(chance > 0, 1 - disagreement / np.where(chance > 0, chance, 1), np.nan)


def quadratic_weighted_kappa(y_true, y_pred) -> float:
    """Quadratic weighted Cohen's kappa over the five grades.

    ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
    labels=[0, 1, 2, 3, 4])``, after checking that every prediction is a grade, because
    scikit-learn silently ignores rows whose label is not in ``labels``.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades, integers 0..4.
    y_pred : array-like, shape (N,)
        Predicted grades, integers 0..4.

    Returns
    -------
    float
        Kappa in [-1, 1]; 1.0 for perfect agreement. NaN when it is undefined: every true
        and every predicted grade is the same single grade (zero expected disagreement).

    Raises
    ------
    ValueError
        If the lengths differ, the inputs are empty or not integers, ``y_true`` is not in
        0..4, or predictions fall outside 0..4 (the message says how many; score decoded
        reference outputs with :func:`evaluate_predictions`, which counts them).
    """
    t, p = _checked_pair(y_true, y_pred)
    bad = _outside(p)
    if bad.any():
        raise ValueError(
            f"y_pred has {int(bad.sum())} of {len(p)} predictions outside grades 0-4 "
            f"(first at row {int(np.flatnonzero(bad)[0])}: {int(p[bad][0])}); scikit-learn "
            f"would drop them silently. Use evaluate_predictions to count and score them."
        )
    return _kappa(t, p)


def bootstrap_kappa_ci(
    y_true, y_pred, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the quadratic weighted kappa.

    ``scipy.stats.bootstrap`` over (true, predicted) pairs resampled together
    (``paired=True``), ``method="percentile"``, with a generator seeded by ``seed``: the
    same inputs and seed give the same interval.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades, integers 0..4.
    y_pred : array-like, shape (N,)
        Predicted grades, integers 0..4.
    confidence : float
        Confidence level in (0, 1).
    n_resamples : int
        Number of bootstrap resamples, >= 1.
    seed : int
        Seed (>= 0) of the resampling.

    Returns
    -------
    tuple of float
        ``(low, high)``. ``(nan, nan)`` when kappa is undefined on the data (a single grade
        on both sides, or fewer than two images) or on some resample (a resample that draws
        one grade only on both sides), since a percentile of undefined values is undefined.
        When every resample gives the same kappa (e.g. perfect predictions) the interval
        has zero width, e.g. ``(1.0, 1.0)``.

    Raises
    ------
    ValueError
        As :func:`quadratic_weighted_kappa`, or on a bad ``confidence``, ``n_resamples`` or
        ``seed``.
    """
    _check_confidence(confidence)
    check_integer(n_resamples, "n_resamples", 1)
    check_integer(seed, "seed", 0)
    point = quadratic_weighted_kappa(y_true, y_pred)  # validates the pair
    t, p = _checked_pair(y_true, y_pred)
    if len(t) < 2 or np.isnan(point):
        return float("nan"), float("nan")
    return _percentile_interval((t, p), kappa_of_resamples, n_resamples, seed, confidence)


def _check_confidence(confidence) -> None:
    """ValueError unless ``confidence`` is a number in (0, 1)."""
    if isinstance(confidence, (bool, np.bool_)) or not isinstance(confidence, Real):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def bootstrap_kappa_difference_ci(
    y_true, first, second, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``kappa(y_true, first) - kappa(y_true, second)``.

    Images are resampled with both predictions (paired), so the interval measures how much
    one grader beats the other on the same images, not how much either varies alone.

    Parameters
    ----------
    y_true, first, second : array-like, shape (N,)
        True grades and two graders' predicted grades, integers 0..4.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` where a resample leaves kappa undefined.
    """
    data = tuple(np.asarray(a) for a in (y_true, first, second))
    return _percentile_interval(
        data,
        lambda y, a, b, axis=-1: kappa_of_resamples(y, a, axis) - kappa_of_resamples(y, b, axis),
        n_resamples,
        seed,
        confidence,
    )


def _percentile_interval(data: tuple, statistic, n_resamples: int, seed: int, confidence: float) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` over ``data``'s arrays resampled together (paired), percentile
    method, seeded: the same inputs and seed give the same interval; (nan, nan) when undefined."""
    with warnings.catch_warnings():
        # A zero-width interval (all resamples equal) is a valid answer for the percentile
        # method; scipy warns about it because BCa would fail there.
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        try:
            result = stats.bootstrap(
                data,
                statistic,
                n_resamples=int(n_resamples),
                vectorized=True,
                batch=200,  # bounds the one-hot arrays at 200 x N x 5
                paired=True,
                confidence_level=float(confidence),
                method="percentile",
                **{_BOOTSTRAP_RNG_KW: np.random.default_rng(int(seed))},
            )
        except ValueError:  # too few images, or a degenerate resample
            return float("nan"), float("nan")
    low = float(result.confidence_interval.low)
    high = float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        return float("nan"), float("nan")
    return low, high


def evaluate_predictions(y_true, y_pred, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Score predicted grades against true grades, counting every test image.

    Predictions outside 0..4 (``-1`` from the reference decoding rule,
    ``drnb.targets.ordinal_decode(..., rule="reference")``) are counted in
    ``n_invalid_predictions``, logged, and scored as grade 0
    (:data:`INVALID_PREDICTION_GRADE`), so every image stays in every score.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades, integers 0..4.
    y_pred : array-like, shape (N,)
        Predicted grades, integers (any value; outside 0..4 counts as invalid).
    n_resamples : int
        Bootstrap resamples for the kappa interval; 0 skips it (NaN bounds).
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``n`` (int), ``qw_kappa`` (float, NaN if undefined), ``accuracy`` (float in [0, 1]),
        ``kappa_ci_low`` / ``kappa_ci_high`` (float, see :func:`bootstrap_kappa_ci`),
        ``recall_0`` .. ``recall_4`` (float, NaN for a grade absent from ``y_true``),
        ``n_invalid_predictions`` (int), ``confusion`` (5x5 nested list of int, rows = true
        grade, columns = predicted grade, from ``sklearn.metrics.confusion_matrix``).
        Plain Python types, ready for JSON.

    Raises
    ------
    ValueError
        If the lengths differ, the inputs are empty, ``y_true`` is not in 0..4, ``y_pred``
        is not integer, or ``n_resamples`` is negative.
    """
    t, p = _checked_pair(y_true, y_pred)
    check_integer(n_resamples, "n_resamples", 0)
    invalid = _outside(p)
    n_invalid = int(invalid.sum())
    if n_invalid:
        logger.warning(
            "%d of %d predictions are outside grades 0-4; they are scored as grade %d",
            n_invalid,
            len(p),
            INVALID_PREDICTION_GRADE,
        )
    scored = np.where(invalid, INVALID_PREDICTION_GRADE, p)
    labels = list(GRADES)
    recalls = recall_score(t, scored, labels=labels, average=None, zero_division=np.nan)
    if n_resamples:
        ci_low, ci_high = bootstrap_kappa_ci(t, scored, n_resamples=n_resamples, seed=seed)
    else:
        ci_low, ci_high = float("nan"), float("nan")
    result = {
        "n": int(len(t)),
        "qw_kappa": quadratic_weighted_kappa(t, scored),
        "accuracy": float(accuracy_score(t, scored)),
        "kappa_ci_low": ci_low,
        "kappa_ci_high": ci_high,
    }
    for g, r in zip(GRADES, recalls):
        result[f"recall_{g}"] = float(r)
    result["n_invalid_predictions"] = n_invalid
    result["confusion"] = confusion_matrix(t, scored, labels=labels).tolist()
    return result


def referable(grades) -> np.ndarray:
    """Whether each grade is referable DR: bool (N,), True for grades 2-4 (:data:`REFERABLE_GRADE`).

    Raises
    ------
    ValueError
        If ``grades`` are not integer grades 0..4 (see :func:`drnb.targets.validate_grades`).
    """
    return validate_grades(grades, name="y_true") >= REFERABLE_GRADE


def _checked_scores(scores, n: int | None = None, name: str = "scores") -> np.ndarray:
    """``scores`` as float64 (N,), finite, of length ``n`` when given."""
    arr = np.asarray(scores)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a 1-D array of numbers, one per image; got shape {arr.shape}, dtype {arr.dtype}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries; expected one per grade ({n})")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite; row {row} holds {arr[row]!r}")
    return arr


def _checked_flags(flags, n: int) -> np.ndarray:
    arr = np.asarray(flags)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"referable must be 1-D with one flag per score ({n}), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise ValueError(f"referable must hold booleans (or 0/1), got dtype {arr.dtype}")


def auc_of_resamples(grades: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC of referable DR against grades 0-1, for many resamples at once (the bootstrap).

    The Mann-Whitney form, ``(rank sum of the referable - n1 (n1 + 1) / 2) / (n1 n0)`` with
    average ranks for ties, which equals scikit-learn's ``roc_auc_score`` (tested), vectorised
    over resamples as :func:`kappa_of_resamples` is. NaN where a resample holds one class only.
    """
    positive = np.moveaxis(np.asarray(grades), axis, -1) >= REFERABLE_GRADE
    ranks = stats.rankdata(np.moveaxis(np.asarray(scores, np.float64), axis, -1), axis=-1)
    n_positive = positive.sum(-1)
    n_negative = positive.shape[-1] - n_positive
    above = np.where(positive, ranks, 0.0).sum(-1) - n_positive * (n_positive + 1) / 2
    pairs = n_positive * n_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, above / np.where(pairs > 0, pairs, 1), np.nan)


def referable_auc(y_true, scores) -> float:
    """ROC AUC of ``scores`` for referable DR (grade >= 2) against grades 0-1.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades, integers 0..4.
    scores : array-like, shape (N,)
        The grader's continuous score (higher: more severe), e.g.
        :func:`drnb.targets.expected_grade` of the head's outputs; any finite reals.

    Returns
    -------
    float
        ``sklearn.metrics.roc_auc_score`` in [0, 1]; NaN when ``y_true`` holds one class only.
    """
    positive = referable(y_true)
    scores = _checked_scores(scores, len(positive))
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def bootstrap_auc_ci(y_true, scores, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`referable_auc`: the kappa's resampling
    (:func:`bootstrap_kappa_ci`: images resampled with their score, paired, seeded).

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` when the data or some resample hold one class only.
    """
    _check_confidence(confidence)
    check_integer(n_resamples, "n_resamples", 1)
    check_integer(seed, "seed", 0)
    if np.isnan(referable_auc(y_true, scores)):  # validates both
        return float("nan"), float("nan")
    data = (validate_grades(y_true, name="y_true"), _checked_scores(scores))
    return _percentile_interval(data, auc_of_resamples, n_resamples, seed, confidence)


def bootstrap_auc_difference_ci(
    y_true, first, second, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``referable_auc(y_true, first) - referable_auc(y_true,
    second)``, images resampled with both graders' scores (paired), as
    :func:`bootstrap_kappa_difference_ci` does for kappa.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades, integers 0..4.
    first, second : array-like, shape (N,)
        Two graders' continuous scores of the same images.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` where a resample holds one class only.
    """
    grades = validate_grades(y_true, name="y_true")
    data = (grades, _checked_scores(first, len(grades), "first"), _checked_scores(second, len(grades), "second"))
    return _percentile_interval(
        data,
        lambda y, a, b, axis=-1: auc_of_resamples(y, a, axis) - auc_of_resamples(y, b, axis),
        n_resamples,
        seed,
        confidence,
    )


def specificity_threshold(scores, referable_flags, specificity: float = REFERABLE_SPECIFICITY) -> float:
    """The operating point: the lowest threshold at which at least ``specificity`` of the
    non-referable images score at or below it (an image is called referable when its score is
    above the threshold).

    Give it training images only, never the test fold: the threshold is then fixed before any
    test grade is read, so the specificity measured on the test fold may fall below the target.
    Only the non-referable images' scores decide it; the referable flags of the others are not used.

    Parameters
    ----------
    scores : array-like, shape (M,)
        The grader's continuous scores of training images, finite.
    referable_flags : array-like of bool, shape (M,)
        Whether each training image is referable (grade >= 2).
    specificity : float in (0, 1]
        The share of non-referable images the threshold must keep below or at it.

    Returns
    -------
    float
        The ``ceil(specificity * m)``-th smallest of the ``m`` non-referable scores; NaN when
        there is no non-referable image.
    """
    if isinstance(specificity, (bool, np.bool_)) or not isinstance(specificity, Real) or not 0.0 < float(specificity) <= 1.0:
        raise ValueError(f"specificity must be a number in (0, 1], got {specificity!r}")
    scores = _checked_scores(scores)
    negatives = np.sort(scores[~_checked_flags(referable_flags, len(scores))])
    if not len(negatives):
        return float("nan")
    # The small tolerance keeps 0.9 * 30 = 27.000000000000004 from asking for a 28th score.
    count = max(math.ceil(float(specificity) * len(negatives) - 1e-9), 1)
    return float(negatives[count - 1])


def operating_point(y_true, scores, threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity for referable DR when a score above ``threshold`` is called referable.

    Returns
    -------
    (sensitivity, specificity) : tuple of float or None
        Shares in [0, 1] of referable images called referable and of the others called not;
        None for a class ``y_true`` does not hold.
    """
    positive = referable(y_true)
    scores = _checked_scores(scores, len(positive))
    called = scores > float(threshold)
    sensitivity = float(called[positive].mean()) if positive.any() else None
    specificity = float((~called[~positive]).mean()) if (~positive).any() else None
    return sensitivity, specificity


def referable_metrics(
    y_true, scores, threshold: float | None = None, *, n_resamples: int = 1000, seed: int = 0, note: str = ""
) -> dict:
    """Referable DR (grade >= 2 against 0-1) on a test fold: AUC, its interval, the operating point.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        True grades of the test images, integers 0..4.
    scores : array-like, shape (N,)
        The grader's continuous scores of the same images (:func:`drnb.targets.expected_grade`).
    threshold : float, optional
        From :func:`specificity_threshold` on training images; None (or NaN) leaves the
        sensitivity and specificity empty, with ``note`` saying why.
    n_resamples : int
        Bootstrap resamples for the AUC interval (:func:`bootstrap_auc_ci`); 0 skips it.
    seed : int
        Seed of the bootstrap.
    note : str
        Why there is no threshold, kept in ``referable_note`` when ``threshold`` is None.

    Returns
    -------
    dict
        ``n_referable``, ``n_non_referable`` (int); ``referable_auc``, ``referable_auc_ci_low``,
        ``referable_auc_ci_high``, ``referable_threshold``, ``referable_sensitivity``,
        ``referable_specificity`` (float, or None where undefined: JSON null);
        ``referable_target_specificity`` (:data:`REFERABLE_SPECIFICITY`); ``referable_note``
        (str, empty when everything is defined, else why not: :data:`ONE_CLASS_ONLY` when the
        test images hold one class).
    """
    positive = referable(y_true)
    scores = _checked_scores(scores, len(positive))
    check_integer(n_resamples, "n_resamples", 0)
    notes = []
    auc = referable_auc(y_true, scores)
    if np.isnan(auc):
        notes.append(f"{ONE_CLASS_ONLY} ({int(positive.sum())} referable, {int((~positive).sum())} not)")
        low = high = float("nan")
    elif n_resamples:
        low, high = bootstrap_auc_ci(y_true, scores, n_resamples=n_resamples, seed=seed)
        if np.isnan(low):
            notes.append("AUC interval undefined: some resample drew one class only")
    else:
        low = high = float("nan")
    defined = threshold is not None and np.isfinite(threshold)
    sensitivity, specificity = operating_point(y_true, scores, threshold) if defined else (None, None)
    if not defined:
        missing = "no non-referable training image" if threshold is not None else "no threshold given"
        notes.append(note or f"no operating point: {missing}")
    return {
        "n_referable": int(positive.sum()),
        "n_non_referable": int((~positive).sum()),
        "referable_auc": _or_none(auc),
        "referable_auc_ci_low": _or_none(low),
        "referable_auc_ci_high": _or_none(high),
        "referable_target_specificity": REFERABLE_SPECIFICITY,
        "referable_threshold": float(threshold) if defined else None,
        "referable_sensitivity": sensitivity,
        "referable_specificity": specificity,
        "referable_note": "; ".join(notes),
    }


def _or_none(value: float) -> float | None:
    """``value``, or None for NaN: JSON's null, which says "undefined" where NaN is not JSON."""
    return None if np.isnan(value) else float(value)
