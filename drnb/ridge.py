"""A linear head's starting weights in closed form: ridge regression of the grade on frozen features.

Fine-tuning a pretrained encoder under a head that starts at random sends the head's large,
random gradients into the encoder for the first hundreds of steps and distorts the features
it was meant to reuse. Kumar et al. (*Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution*, ICLR 2022) fit the linear head first on the frozen
features (a linear probe) and fine-tune from there ("LP-FT"). A warm-up of a few hundred Adam
steps is the usual stand-in for that fit; on a CPU budget it stops far short of it (on
EyePACS a linear ordinal head warmed up for 3 epochs graded at QWK .16 where this fit reaches
.35 on the same features). For a regression head trained with squared error the fit has a closed
form: ridge regression, with its penalty chosen over a grid by exact leave-one-out (or
leave-group-out) error or correlation, at the cost of one singular value decomposition of
the (M, F) features.

The features are standardised (pooled features of different stages differ in scale by orders
of magnitude) and the fitted weights are folded back, so they apply to the features as the
encoder gives them: ``prediction = features @ weights + bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Penalties searched, on standardised features: from almost none to a prediction near the mean.
RIDGE_PENALTIES = tuple(float(p) for p in np.logspace(-1, 7, 17))


@dataclass(frozen=True)
class RidgeFit:
    """A fitted ridge regression, on the features as they are.

    Attributes
    ----------
    weights : numpy.ndarray
        float64 (F,); 0 for a feature that is constant on the fitted rows.
    bias : float
    penalty : float
        The penalty chosen (on standardised features).
    loo_error : float
        Mean squared leave-one-out (or leave-group-out) error at that penalty.
    """

    weights: np.ndarray
    bias: float
    penalty: float
    loo_error: float

    def predict(self, features) -> np.ndarray:
        """float64 (N,) predictions for float (N, F) ``features``."""
        return np.asarray(features, np.float64) @ self.weights + self.bias


CRITERIA = ("error", "correlation")


def fit_ridge(features, targets, penalties=RIDGE_PENALTIES, groups=None, criterion="error") -> RidgeFit:
    """Ridge regression of ``targets`` on ``features``, penalty chosen on left-out rows or groups.

    The intercept is not penalised. For each penalty the leave-one-out residuals come from
    the full fit, ``r_i / (1 - H_ii)`` with ``H`` the fit's hat matrix (exact for a fixed
    standardisation), so the search costs one SVD. With ``groups``, rows that share a label
    are left out together (``(I - H_gg)^-1 r_g`` for group ``g``): several views of one image
    (its quarter turns) must not stay in the fit that predicts one of them, or the error
    rewards memorising images and the penalty comes out too small.

    ``criterion="correlation"`` chooses the penalty whose left-out predictions correlate
    best with the targets instead of the one with the least squared error. When the outputs
    are graded by their ranking alone (cut points matched to the grade prior), the scale of
    the predictions does not matter, while squared error, which at a few dozen rows prefers
    predictions shrunk towards the mean, rewards the scale.

    Parameters
    ----------
    features : array-like
        float (M, F), M >= 2, finite.
    targets : array-like
        float (M,), finite: the grades.
    penalties : sequence of float
        Positive penalties to choose from, on standardised features.
    groups : array-like, optional
        int (M,): rows with the same label are left out together; default one row at a time.
    criterion : {"error", "correlation"}
        Least mean squared left-out error, or greatest correlation of the left-out
        predictions with the targets.

    Returns
    -------
    RidgeFit
        The penalty with the best criterion (the larger one on a tie); the largest penalty,
        with ``loo_error`` infinite, when no penalty's left-out rows could be scored.

    Raises
    ------
    ValueError
        For arrays of the wrong shape, non-finite values, fewer than 2 rows or 2 groups, or
        a penalty that is not positive.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"features must be (M, F) and targets (M,); got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a ridge fit needs at least 2 rows; got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features and targets must be finite")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: expected one of {list(CRITERIA)}")
    penalties = np.asarray(penalties, np.float64)
    if not len(penalties) or (penalties <= 0).any():
        raise ValueError(f"penalties must be positive numbers; got {penalties.tolist()}")

    blocks = _left_out_blocks(len(y), groups)

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12 * (1 + np.abs(mean)), scale, np.inf)  # a constant feature gets weight 0
    standardised = (x - mean) / scale
    centred = y - y.mean()
    u, singular, vt = thin_svd(standardised)
    projected = u.T @ centred
    best_score, best_penalty, best_error = np.inf, None, np.inf
    for penalty in sorted(penalties, reverse=True):  # a tie goes to the larger penalty
        shrink = singular**2 / (singular**2 + penalty)
        residuals = centred - u @ (shrink * projected)
        left_out = _left_out_residuals(u, shrink, residuals, blocks)
        error = float(np.mean(left_out**2))
        if criterion == "error":
            score = error
        else:  # the left-out predictions' correlation with the targets, negated
            with np.errstate(divide="ignore", invalid="ignore"):
                score = -float(np.corrcoef(centred - left_out, centred)[0, 1])
            score = score if np.isfinite(score) else np.inf
        if score < best_score:
            best_score, best_penalty, best_error = score, float(penalty), error
    if best_penalty is None:  # no penalty could be scored: the largest, nearest the mean
        best_penalty = float(max(penalties))
    coefficients = vt.T @ (singular / (singular**2 + best_penalty) * projected)
    weights = coefficients / scale
    return RidgeFit(weights=weights, bias=float(y.mean() - mean @ weights), penalty=best_penalty, loo_error=best_error)


def thin_svd(x: np.ndarray, *, relative_floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, s, V^T`` of ``x`` with ``x = U diag(s) V^T``, s decreasing, for the ridge fit.

    With many more rows than columns (a fit on every view of a few thousand images: M up to
    8 x 2,900 rows of F = 726 features) it comes from the eigendecomposition of the (F, F)
    Gram matrix, a fraction of the cost of LAPACK's (M, F) SVD. Directions whose squared
    singular value is below ``relative_floor`` times the largest are dropped: their left
    singular vectors cannot be recovered from the Gram matrix, and a ridge fit shrinks them
    to nothing unless its penalty is far below ``relative_floor`` times the largest squared
    singular value (the default penalties, from 0.1 on standardised features, are not).

    Parameters
    ----------
    x : numpy.ndarray
        float64 (M, F).

    Returns
    -------
    u : numpy.ndarray
        float64 (M, K), orthonormal columns.
    s : numpy.ndarray
        float64 (K,), positive, decreasing.
    vt : numpy.ndarray
        float64 (K, F), orthonormal rows.
    """
    rows, columns = x.shape
    if rows < 2 * columns:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
    else:
        eigenvalues, v = np.linalg.eigh(x.T @ x)
        eigenvalues, v = eigenvalues[::-1], v[:, ::-1]  # decreasing
        s = np.sqrt(np.clip(eigenvalues, 0, None))
        u, vt = (x @ v) / np.where(s > 0, s, 1), v.T
    keep = s**2 > relative_floor * (s[0] ** 2 if len(s) else 0)
    return u[:, keep], s[keep], vt[keep]


def _left_out_blocks(count: int, groups) -> list[np.ndarray]:
    """Row indices of the groups left out together, as int arrays (G, size), one per group size."""
    if groups is None:
        return [np.arange(count)[:, None]]
    labels = np.asarray(groups)
    if labels.shape != (count,):
        raise ValueError(f"groups must hold one label per row, shape ({count},); got {labels.shape}")
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    if len(sizes) < 2:
        raise ValueError("groups: a leave-group-out error needs at least 2 groups; got 1")
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(sizes)[:-1])
    return [np.stack([rows for rows in members if len(rows) == size]) for size in np.unique(sizes)]


def _left_out_residuals(u: np.ndarray, shrink: np.ndarray, residuals: np.ndarray, blocks) -> np.ndarray:
    """Each row's residual when its block is left out of the fit: ``(I - H_bb)^-1 r_b``.

    ``H = U diag(shrink) U^T + 1/M`` (the 1/M is the intercept's share). A block whose rows
    cannot be left out (``I - H_bb`` singular) gets infinite residuals.
    """
    left_out = np.empty_like(residuals)
    for block in blocks:
        basis = u[block] * np.sqrt(shrink)  # (G, size, K)
        hat = basis @ basis.transpose(0, 2, 1) + 1 / len(residuals)  # batched matrix products, not an einsum loop
        system = np.eye(block.shape[1]) - hat
        if block.shape[1] == 1:
            with np.errstate(divide="ignore", invalid="ignore"):  # leverage 1: that row cannot be left out
                left_out[block[:, 0]] = residuals[block[:, 0]] / system[:, 0, 0]
            continue
        try:
            left_out[block] = np.linalg.solve(system, residuals[block][..., None])[..., 0]
        except np.linalg.LinAlgError:
            left_out[block] = np.inf
    return left_out
