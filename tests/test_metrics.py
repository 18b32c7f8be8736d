"""Kappa matches the textbook formula, intervals are seeded, and no prediction is dropped."""

import logging

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from drnb.metrics import (
    GRADES,
    bootstrap_kappa_ci,
    evaluate_predictions,
    quadratic_weighted_kappa,
)
from drnb.targets import ordinal_decode

# Small worked example: 8 images.
Y_TRUE = [0, 0, 1, 1, 2, 3, 4, 4]
Y_PRED = [0, 1, 1, 2, 2, 3, 3, 4]


@pytest.fixture(scope="module")
def noisy():
    """300 images predicted right or one grade off, so kappa is high but below 1."""
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=300, p=[0.5, 0.15, 0.2, 0.1, 0.05])
    pred = np.clip(y + rng.choice([-1, 0, 0, 0, 1], size=300), 0, 4)
    return y, pred


def test_kappa_matches_hand_computation():
    # Observed matrix O (rows true grade, columns predicted grade), counted from the lists.
    observed = np.array(
        [
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ]
    )
    rows = observed.sum(axis=1)  # true grade counts      [2, 2, 1, 1, 2]
    cols = observed.sum(axis=0)  # predicted grade counts [1, 2, 2, 2, 1]
    np.testing.assert_array_equal(rows, [2, 2, 1, 1, 2])
    np.testing.assert_array_equal(cols, [1, 2, 2, 2, 1])
    expected = np.outer(rows, cols) / 8  # E_ij = r_i c_j / N
    i, j = np.indices((5, 5))
    weights = (i - j) ** 2  # quadratic; the 1/16 scale cancels in the ratio
    # sum w*O: three one-step disagreements (0->1, 1->2, 4->3) -> 3
    assert (weights * observed).sum() == 3
    # sum w*E = (2*44 + 2*20 + 12 + 20 + 2*44) / 8 = 248 / 8 = 31
    assert (weights * expected).sum() == pytest.approx(31.0)
    hand = 1 - 3 / 31  # = 28/31 = 0.9032...
    assert quadratic_weighted_kappa(Y_TRUE, Y_PRED) == pytest.approx(hand, abs=1e-12)
    assert hand == pytest.approx(0.903225806, abs=1e-9)


def test_perfect_predictions_give_one():
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 4, 2]) == 1.0


def test_kappa_refuses_predictions_outside_grades():
    with pytest.raises(ValueError, match="2 of 8 predictions outside grades 0-4"):
        quadratic_weighted_kappa(Y_TRUE, [0, -1, 1, 2, 2, 3, 5, 4])


def test_kappa_undefined_for_a_single_grade_is_nan():
    assert np.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))


def test_bootstrap_ci_contains_point_and_is_seeded(noisy):
    y, pred = noisy
    point = quadratic_weighted_kappa(y, pred)
    low, high = bootstrap_kappa_ci(y, pred, n_resamples=100, seed=7)
    assert low < point < high
    assert high - low < 0.2
    assert (low, high) == bootstrap_kappa_ci(y, pred, n_resamples=100, seed=7)
    assert (low, high) != bootstrap_kappa_ci(y, pred, n_resamples=100, seed=8)


def test_bootstrap_ci_degenerate_inputs_do_not_crash():
    assert np.isnan(bootstrap_kappa_ci([1, 1, 1, 1], [1, 1, 1, 1], n_resamples=50)).all()
    assert np.isnan(bootstrap_kappa_ci([3], [2], n_resamples=50)).all()
    perfect = np.tile(np.arange(5), 10)
    assert bootstrap_kappa_ci(perfect, perfect, n_resamples=50) == (1.0, 1.0)


def test_bootstrap_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_kappa_ci(Y_TRUE, Y_PRED, confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_kappa_ci(Y_TRUE, Y_PRED, n_resamples=0)


def test_evaluate_counts_invalid_predictions_instead_of_dropping(caplog):
    # The reference decoding gives -1 for an image whose outputs are all below 0.5.
    probabilities = np.array(
        [
            [0.9, 0.1, 0.1, 0.1, 0.1],  # 0
            [0.9, 0.8, 0.1, 0.1, 0.1],  # 1
            [0.2, 0.1, 0.1, 0.1, 0.1],  # -1 under the reference rule
            [0.9, 0.9, 0.9, 0.9, 0.1],  # 3
            [0.4, 0.3, 0.2, 0.1, 0.1],  # -1 under the reference rule
        ]
    )
    y_true = np.array([0, 1, 2, 3, 0])
    pred = ordinal_decode(probabilities, rule="reference")
    np.testing.assert_array_equal(pred, [0, 1, -1, 3, -1])
    # What the reference did: scikit-learn silently leaves the -1 rows out.
    assert confusion_matrix(y_true, pred, labels=list(GRADES)).sum() == 3

    with caplog.at_level(logging.WARNING, logger="drnb.metrics"):
        result = evaluate_predictions(y_true, pred, n_resamples=0)
    assert "2 of 5 predictions are outside grades 0-4" in caplog.text
    assert result["n"] == 5
    assert result["n_invalid_predictions"] == 2
    assert np.array(result["confusion"]).sum() == 5
    # scored as grade 0: row 2 (true 2) -> predicted 0, row 4 (true 0) -> predicted 0
    assert result["confusion"][2][0] == 1
    assert result["confusion"][0][0] == 2
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["qw_kappa"] == pytest.approx(
        quadratic_weighted_kappa(y_true, [0, 1, 0, 3, 0])
    )


def test_evaluate_fields(noisy):
    y, pred = noisy
    result = evaluate_predictions(y, pred, n_resamples=100, seed=1)
    expected_keys = {
        "n", "qw_kappa", "accuracy", "kappa_ci_low", "kappa_ci_high",
        "recall_0", "recall_1", "recall_2", "recall_3", "recall_4",
        "n_invalid_predictions", "confusion",
    }
    assert set(result) == expected_keys
    assert result["n"] == 300 and result["n_invalid_predictions"] == 0
    assert result["kappa_ci_low"] < result["qw_kappa"] < result["kappa_ci_high"]
    confusion = np.array(result["confusion"])
    assert confusion.shape == (5, 5)
    for g in GRADES:
        assert result[f"recall_{g}"] == pytest.approx(confusion[g, g] / confusion[g].sum())


def test_recall_is_nan_for_absent_grade():
    result = evaluate_predictions([0, 0, 1, 2], [0, 1, 1, 2], n_resamples=0)
    assert result["recall_0"] == 0.5
    assert np.isnan(result["recall_3"]) and np.isnan(result["recall_4"])
    assert np.isnan(result["kappa_ci_low"])


def test_bad_pairs_raise():
    with pytest.raises(ValueError, match="y_pred must be 1-D with one prediction"):
        evaluate_predictions([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="y_true is empty"):
        evaluate_predictions([], [])
    with pytest.raises(ValueError, match="y_true.*row 1"):
        quadratic_weighted_kappa([0, 6], [0, 1])
    with pytest.raises(ValueError, match="integer grades"):
        evaluate_predictions([0, 1], [0.0, 0.7])


def test_vectorised_bootstrap_kappa_equals_scikit_learn():
    from sklearn.metrics import cohen_kappa_score

    from drnb.metrics import kappa_of_resamples

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, (50, 40))
    predicted = np.clip(truth + rng.integers(-2, 3, (50, 40)), 0, 4)
    expected = [cohen_kappa_score(t, p, weights="quadratic", labels=range(5)) for t, p in zip(truth, predicted)]
    np.testing.assert_allclose(kappa_of_resamples(truth, predicted), expected, rtol=1e-12, atol=1e-12)
    assert np.isnan(kappa_of_resamples(np.full(6, 2), np.full(6, 2)))


# Referable DR (grade >= 2 against 0-1) from a continuous score.

# A hand-made prediction table: 12 test photographs, their grades and the grader's expected
# grade, with ties across the classes (1.0 and 2.5) so that tie handling is tested too.
TABLE_GRADES = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 0])
TABLE_SCORES = np.array([0.1, 0.4, 1.0, 0.9, 2.5, 1.2, 1.0, 2.2, 2.5, 3.1, 3.9, 0.3])


@pytest.fixture(scope="module")
def scored():
    """400 photographs whose score tracks the grade with noise, rounded so that ties occur."""
    rng = np.random.default_rng(4)
    grades = rng.choice(5, size=400, p=[0.45, 0.15, 0.2, 0.1, 0.1])
    return grades, np.round(grades + rng.normal(0, 1.2, size=400), 1)


def test_referable_auc_equals_scikit_learn_on_a_hand_made_table(scored):
    from sklearn.metrics import roc_auc_score

    from drnb.metrics import auc_of_resamples, referable_auc

    assert referable_auc(TABLE_GRADES, TABLE_SCORES) == pytest.approx(roc_auc_score(TABLE_GRADES >= 2, TABLE_SCORES), abs=1e-9)
    # 5 referable x 7 not: 35 pairs, of which 31 ranked right (4.5 + 6 + 6.5 + 7 + 7: a tie counts half).
    assert referable_auc(TABLE_GRADES, TABLE_SCORES) == pytest.approx(31 / 35, abs=1e-12)
    grades, scores = scored
    assert referable_auc(grades, scores) == pytest.approx(roc_auc_score(grades >= 2, scores), abs=1e-9)
    rng = np.random.default_rng(5)
    rows = rng.integers(0, len(grades), (30, len(grades)))  # resamples, as the bootstrap draws them
    expected = [roc_auc_score(grades[r] >= 2, scores[r]) for r in rows]
    np.testing.assert_allclose(auc_of_resamples(grades[rows], scores[rows]), expected, rtol=0, atol=1e-9)


def test_referable_auc_interval_is_the_kappas_resampling_with_scikit_learns_auc(scored):
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    from drnb.metrics import _BOOTSTRAP_RNG_KW, bootstrap_auc_ci

    grades, scores = scored
    low, high = bootstrap_auc_ci(grades, scores, n_resamples=300, seed=3)
    reference = stats.bootstrap(
        (grades, scores), lambda g, s: roc_auc_score(g >= 2, s), n_resamples=300, paired=True, vectorized=False,
        batch=200, confidence_level=0.95, method="percentile", **{_BOOTSTRAP_RNG_KW: np.random.default_rng(3)},
    ).confidence_interval
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-9)
    assert low < roc_auc_score(grades >= 2, scores) < high
    assert (low, high) == bootstrap_auc_ci(grades, scores, n_resamples=300, seed=3)


def test_operating_point_keeps_the_target_specificity_on_training_scores_and_agrees_with_roc_curve(scored):
    from sklearn.metrics import roc_curve

    from drnb.metrics import operating_point, specificity_threshold

    grades, scores = scored
    train, test = np.arange(len(grades)) < 250, np.arange(len(grades)) >= 250
    threshold = specificity_threshold(scores[train], grades[train] >= 2, 0.9)
    negatives = scores[train][grades[train] < 2]
    assert np.mean(negatives <= threshold) >= 0.9
    assert np.mean(negatives < threshold) < 0.9  # the lowest such threshold: any lower one misses 90 %
    sensitivity, specificity = operating_point(grades[test], scores[test], threshold)
    # roc_curve calls a score >= t positive; "above the threshold" is the curve's point at the
    # lowest of its thresholds that lies above ours.
    fpr, tpr, thresholds = roc_curve(grades[test] >= 2, scores[test], drop_intermediate=False)
    point = np.flatnonzero(thresholds > threshold)[-1]
    assert sensitivity == pytest.approx(tpr[point], abs=1e-9)
    assert specificity == pytest.approx(1 - fpr[point], abs=1e-9)
    # On the hand-made table: the non-referable scores sorted are 0.1 0.3 0.4 0.9 1.0 1.2 2.5;
    # 90 % of 7 asks for 7 at or below, so the threshold is the highest, 2.5.
    assert specificity_threshold(TABLE_SCORES, TABLE_GRADES >= 2, 0.9) == 2.5
    assert specificity_threshold(TABLE_SCORES, TABLE_GRADES >= 2, 0.5) == 0.9  # 4 of 7
    assert operating_point(TABLE_GRADES, TABLE_SCORES, 0.9) == (1.0, pytest.approx(4 / 7))  # every referable above 0.9
    assert operating_point(TABLE_GRADES, TABLE_SCORES, 2.5) == (pytest.approx(2 / 5), 1.0)  # 2.5 itself is not above


def test_the_threshold_never_reads_a_test_grade(scored):
    from drnb.metrics import specificity_threshold

    grades, scores = scored
    train = np.random.default_rng(6).random(len(grades)) < 0.6  # the training pool; the rest is the test fold

    def threshold_of(all_grades):
        # What a run does: only training rows' scores and grades reach the threshold.
        return specificity_threshold(scores[train], all_grades[train] >= 2)

    chosen = threshold_of(grades)
    for seed in range(5):
        shuffled = grades.copy()
        shuffled[~train] = np.random.default_rng(seed).permutation(grades[~train])
        assert threshold_of(shuffled) == chosen
    every_test_referable = np.where(train, grades, 4)
    assert threshold_of(every_test_referable) == chosen
    # The check can fail: shuffling the training grades moves the threshold.
    shuffled = grades.copy()
    shuffled[train] = np.random.default_rng(0).permutation(grades[train])
    assert threshold_of(shuffled) != chosen


def test_one_class_only_is_undefined_with_a_reason_never_a_crash():
    import json

    from drnb.metrics import ONE_CLASS_ONLY, bootstrap_auc_ci, referable_auc, referable_metrics

    healthy = np.array([0, 1, 0, 1, 0])
    scores = np.array([0.2, 1.1, 0.4, 0.9, 0.0])
    assert np.isnan(referable_auc(healthy, scores))
    assert np.isnan(bootstrap_auc_ci(healthy, scores, n_resamples=20)).all()
    figures = referable_metrics(healthy, scores, 0.5, n_resamples=20)
    assert figures["referable_auc"] is None and figures["referable_auc_ci_low"] is None
    assert figures["referable_sensitivity"] is None  # no referable photograph to catch
    assert figures["referable_specificity"] == pytest.approx(3 / 5)  # still defined on the healthy ones
    assert figures["referable_note"].startswith(ONE_CLASS_ONLY) and figures["n_referable"] == 0
    assert json.loads(json.dumps(figures))["referable_auc"] is None  # null in metrics.json
    both = referable_metrics(TABLE_GRADES, TABLE_SCORES, None, n_resamples=0, note="no training scores")
    assert both["referable_auc"] == pytest.approx(31 / 35) and both["referable_note"] == "no training scores"
    assert both["referable_threshold"] is None and both["referable_sensitivity"] is None


def test_referable_bad_inputs_raise():
    from drnb.metrics import referable_auc, specificity_threshold

    with pytest.raises(ValueError, match="one per grade"):
        referable_auc([0, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        referable_auc([0, 2], [0.1, np.nan])
    with pytest.raises(ValueError, match=r"specificity must be a number in \(0, 1\]"):
        specificity_threshold([0.1, 0.2], [False, True], 90)
    with pytest.raises(ValueError, match="booleans"):
        specificity_threshold([0.1, 0.2], [0, 2])
    assert np.isnan(specificity_threshold([0.1, 0.2], [True, True]))  # no non-referable training image
