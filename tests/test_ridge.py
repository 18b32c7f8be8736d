"""The closed-form ridge fit that starts a linear regression head."""

import numpy as np
import pytest

from drnb.ridge import RIDGE_PENALTIES, fit_ridge


def _problem(rows=40, width=6, seed=0):
    rng = np.random.default_rng(seed)
    # Features on very different scales, as pooled features of different stages are.
    features = rng.normal(0, 1, (rows, width)) * np.logspace(-3, 2, width) + 5
    grades = features @ (rng.normal(0, 1, width) / np.logspace(-3, 2, width)) + rng.normal(0, 0.5, rows)
    return features, grades


def _penalised_fit(design, targets, penalty):
    """Least squares on [1, design] with the penalty on the weights only, by the normal equations."""
    full = np.column_stack([np.ones(len(design)), design])
    penalty_matrix = penalty * np.eye(full.shape[1])
    penalty_matrix[0, 0] = 0
    return np.linalg.solve(full.T @ full + penalty_matrix, full.T @ targets)


def test_fit_equals_the_normal_equations_on_standardised_features_folded_back():
    features, grades = _problem()
    fit = fit_ridge(features, grades, penalties=[3.0])
    mean, scale = features.mean(0), features.std(0)
    solution = _penalised_fit((features - mean) / scale, grades, 3.0)
    np.testing.assert_allclose(fit.predict(features), solution[0] + ((features - mean) / scale) @ solution[1:], rtol=1e-9)
    np.testing.assert_allclose(fit.weights, solution[1:] / scale, rtol=1e-8)


def test_leave_one_out_error_matches_refitting_without_each_row():
    features, grades = _problem(rows=25)
    standardised = (features - features.mean(0)) / features.std(0)
    for penalty in (0.1, 10.0):
        fit = fit_ridge(features, grades, penalties=[penalty])
        errors = []
        for row in range(len(grades)):
            keep = np.arange(len(grades)) != row
            solution = _penalised_fit(standardised[keep], grades[keep], penalty)
            errors.append((grades[row] - solution[0] - standardised[row] @ solution[1:]) ** 2)
        assert fit.loo_error == pytest.approx(np.mean(errors), rel=1e-8)


def test_leave_group_out_error_matches_refitting_without_each_group():
    features, grades = _problem(rows=24)
    standardised = (features - features.mean(0)) / features.std(0)
    groups = np.array([0, 0, 1, 1, 1, 2] * 4) + np.repeat([0, 3, 6, 9], 6)  # sizes 1, 2 and 3 mixed
    for penalty in (0.1, 10.0):
        fit = fit_ridge(features, grades, penalties=[penalty], groups=groups)
        errors = []
        for group in np.unique(groups):
            out = groups == group
            solution = _penalised_fit(standardised[~out], grades[~out], penalty)
            errors.extend((grades[out] - solution[0] - standardised[out] @ solution[1:]) ** 2)
        assert fit.loo_error == pytest.approx(np.mean(errors), rel=1e-8)
    # One label per row is leave-one-out; the default.
    np.testing.assert_allclose(
        fit_ridge(features, grades, groups=np.arange(24)).loo_error, fit_ridge(features, grades).loo_error, rtol=1e-10
    )


def test_copies_of_a_row_left_out_apart_reward_memorising_them():
    # Four copies of each row: leaving one copy out keeps three in the fit, so the error of a
    # nearly unpenalised fit looks small; leaving all four out shows it is not.
    features, grades = _problem(rows=30, width=20, seed=3)
    grades = np.random.default_rng(3).normal(0, 1, 30)  # noise: nothing to learn
    copies, images = np.tile(features, (4, 1)), np.tile(np.arange(30), 4)
    by_row = fit_ridge(copies, np.tile(grades, 4))
    by_image = fit_ridge(copies, np.tile(grades, 4), groups=images)
    assert by_image.penalty >= 100 * by_row.penalty
    assert by_image.loo_error > by_row.loo_error


def test_the_penalty_with_the_lowest_leave_one_out_error_is_chosen():
    features, grades = _problem()
    errors = {penalty: fit_ridge(features, grades, penalties=[penalty]).loo_error for penalty in RIDGE_PENALTIES}
    fit = fit_ridge(features, grades)
    assert fit.penalty == min(errors, key=errors.get)
    assert fit.loo_error == pytest.approx(min(errors.values()))
    # Pure noise is best predicted by (nearly) its mean: a penalty thousands of times larger.
    for seed in range(1, 4):
        noise = np.random.default_rng(seed).normal(0, 1, len(grades))
        assert fit_ridge(features, noise).penalty >= 1000 * fit.penalty


def test_more_features_than_rows_and_a_constant_feature_are_fitted():
    rng = np.random.default_rng(2)
    features = rng.normal(0, 1, (12, 50))
    features[:, 3] = 7.0
    grades = features[:, 0] * 2 + 1
    fit = fit_ridge(features, grades)
    assert fit.weights[3] == 0 and np.isfinite(fit.weights).all()
    assert np.corrcoef(fit.predict(features), grades)[0, 1] > 0.9


@pytest.mark.parametrize(
    "features, targets, penalties, message",
    [
        (np.ones((5, 2)), np.ones(4), RIDGE_PENALTIES, "targets"),
        (np.ones((1, 2)), np.ones(1), RIDGE_PENALTIES, "at least 2 rows"),
        (np.full((3, 2), np.nan), np.ones(3), RIDGE_PENALTIES, "finite"),
        (np.ones((3, 2)), np.ones(3), [0.0], "positive"),
    ],
)
def test_bad_input_is_refused(features, targets, penalties, message):
    with pytest.raises(ValueError, match=message):
        fit_ridge(features, targets, penalties)


def test_groups_must_label_every_row_and_hold_two_groups():
    features, grades = _problem(rows=6)
    with pytest.raises(ValueError, match=r"one label per row, shape \(6,\)"):
        fit_ridge(features, grades, groups=np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 groups"):
        fit_ridge(features, grades, groups=np.zeros(6))


def test_the_correlation_criterion_picks_the_penalty_whose_left_out_predictions_rank_best():
    features, grades = _problem(rows=30, width=10, seed=4)
    standardised = (features - features.mean(0)) / features.std(0)
    groups = np.repeat(np.arange(15), 2)
    correlations = {}
    for penalty in RIDGE_PENALTIES:
        predictions = np.empty(30)
        for group in range(15):
            out = groups == group
            solution = _penalised_fit(standardised[~out], grades[~out], penalty)
            predictions[out] = solution[0] + standardised[out] @ solution[1:]
        correlations[penalty] = np.corrcoef(predictions, grades)[0, 1]
    fit = fit_ridge(features, grades, groups=groups, criterion="correlation")
    assert fit.penalty == max(correlations, key=correlations.get)
    with pytest.raises(ValueError, match="criterion='kappa': expected one of"):
        fit_ridge(features, grades, criterion="kappa")


@pytest.mark.parametrize("rows, width", [(200, 12), (9, 12)])  # from the Gram matrix; LAPACK's SVD when not tall
def test_thin_svd_reconstructs_the_matrix_and_drops_directions_it_does_not_span(rows, width):
    from drnb.ridge import thin_svd

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (rows, width)) * np.logspace(-2, 2, width)
    x[:, 5] = 0  # a constant feature, standardised
    x[:, 7] = 2 * x[:, 3]  # and a copy: rank width - 2
    u, s, vt = thin_svd(x)
    rank = min(rows, width - 2)
    assert s.shape == (rank,) and np.all(np.diff(s) <= 0) and s[-1] > 0
    np.testing.assert_allclose(u @ np.diag(s) @ vt, x, atol=1e-9 * np.abs(x).max())
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(vt @ vt.T, np.eye(rank), atol=1e-9)
    # Singular values agree to a tolerance relative to the largest one (the backward error of
    # any SVD), not to themselves: the smallest differs between BLAS builds in its 9th digit.
    np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False)[:rank], rtol=0, atol=1e-9 * s[0])
