"""Label codings round-trip, and decoding always gives a grade (except the reference rule)."""

import numpy as np
import pytest

from drnb.metrics import quadratic_weighted_kappa
from drnb.targets import (
    N_GRADES,
    decode,
    decode_with_cut_points,
    encode,
    expected_grade,
    onehot_encode,
    ordinal_decode,
    ordinal_encode,
    output_width,
    prior_cut_points,
    softmax_decode,
    validate_grades,
)

ALL_GRADES = np.arange(N_GRADES)


def test_ordinal_code_is_cumulative():
    code = ordinal_encode(ALL_GRADES)
    assert code.dtype == np.float32
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(code, expected)


@pytest.mark.parametrize("rule", ["count", "reference"])
def test_ordinal_round_trip_every_grade(rule):
    np.testing.assert_array_equal(ordinal_decode(ordinal_encode(ALL_GRADES), rule=rule), ALL_GRADES)
    # soft but confident outputs decode the same way
    soft = np.where(ordinal_encode(ALL_GRADES) == 1, 0.8, 0.2)
    np.testing.assert_array_equal(ordinal_decode(soft, rule=rule), ALL_GRADES)


def test_onehot_round_trip_every_grade():
    code = onehot_encode(ALL_GRADES)
    assert code.dtype == np.float32
    np.testing.assert_array_equal(code, np.eye(5, dtype=np.float32))
    np.testing.assert_array_equal(softmax_decode(code), ALL_GRADES)


def test_all_outputs_below_half_is_grade_zero_but_reference_gives_minus_one():
    low = np.full((3, 5), 0.1)
    np.testing.assert_array_equal(ordinal_decode(low), [0, 0, 0])
    np.testing.assert_array_equal(ordinal_decode(low, rule="reference"), [-1, -1, -1])


def test_non_monotone_outputs_stay_in_range():
    p = np.array([[0.9, 0.2, 0.8, 0.1, 0.1], [0.1, 0.9, 0.9, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1, 0.9]])
    # count rule: outputs 1..4 above 0.5 -> 1 (output 2), 2 (outputs 1, 2), 1 (output 4)
    np.testing.assert_array_equal(ordinal_decode(p), [1, 2, 1])
    # reference rule counts output 0 too and subtracts one: 2-1, 2-1, 1-1
    np.testing.assert_array_equal(ordinal_decode(p, rule="reference"), [1, 1, 0])


def test_count_rule_always_in_range_on_random_outputs():
    p = np.random.default_rng(0).uniform(size=(2000, 5))
    g = ordinal_decode(p)
    assert g.dtype == np.int64
    assert g.min() >= 0 and g.max() <= 4
    assert ordinal_decode(p, rule="reference").min() == -1  # the reference rule does not


def test_encode_decode_dispatch():
    grades = np.array([4, 0, 2])
    np.testing.assert_array_equal(encode(grades, "ordinal"), ordinal_encode(grades))
    np.testing.assert_array_equal(encode(grades, "softmax"), onehot_encode(grades))
    for target in ("ordinal", "softmax", "regression"):
        np.testing.assert_array_equal(decode(encode(grades, target), target), grades)
    np.testing.assert_array_equal(
        decode(np.full((1, 5), 0.2), "ordinal", rule="reference"), [-1]
    )


def test_softmax_decode_accepts_logits():
    np.testing.assert_array_equal(softmax_decode([[-3.0, 2.0, 0.5, -1.0, 7.0]]), [4])


def test_regression_target_is_the_grade_and_decodes_by_rounding_into_0_4():
    np.testing.assert_array_equal(encode([0, 3, 4], "regression"), [[0.0], [3.0], [4.0]])
    assert encode([0, 3], "regression").dtype == np.float32
    assert output_width("regression") == 1 and output_width("ordinal") == 5
    outputs = np.array([[-0.7], [0.49], [0.51], [2.6], [9.0]])
    np.testing.assert_array_equal(decode(outputs, "regression"), [0, 0, 1, 3, 4])
    np.testing.assert_array_equal(expected_grade(outputs, "regression"), outputs[:, 0])  # scores, unclipped
    with pytest.raises(ValueError, match=r"shape \(N, 1\)"):
        decode(np.zeros((2, 5)), "regression")
    with pytest.raises(ValueError, match="finite"):
        expected_grade([[np.nan]], "regression")
    with pytest.raises(ValueError, match="rule='reference' applies only"):
        decode(outputs, "regression", rule="reference")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="target"):
        encode([0, 1], "poisson")
    with pytest.raises(ValueError, match="target"):
        decode(np.zeros((1, 5)), "poisson")
    with pytest.raises(ValueError, match="rule"):
        ordinal_decode(np.zeros((1, 5)), rule="argmax")
    with pytest.raises(ValueError, match="rule='reference' applies only"):
        decode(np.zeros((1, 5)), "softmax", rule="reference")
    with pytest.raises(ValueError, match=r"probabilities must have shape \(N, 5\)"):
        ordinal_decode(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ordinal_decode([[0.0, 2.5, -1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        softmax_decode([[0.0, np.nan, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="grades.*row 1"):
        ordinal_encode([0, 7])
    with pytest.raises(ValueError, match="grades.*row 0"):
        onehot_encode([True, False])


def test_validate_grades_accepts_whole_floats():
    np.testing.assert_array_equal(validate_grades([0.0, 4.0, 2.0]), [0, 4, 2])
    assert validate_grades(np.array([1, 2], dtype=np.uint8)).dtype == np.int64


def test_expected_grade_of_ordinal_and_softmax_outputs():
    ordinal = np.array([[1.0, 0.9, 0.5, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(expected_grade(ordinal, "ordinal"), [1.5, 0.0])
    softmax = np.array([[0.0, 0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(expected_grade(softmax, "softmax"), [1.5, 4.0])


def test_prior_cut_points_reproduce_the_labelled_grade_proportions():
    rng = np.random.default_rng(0)
    labelled = np.repeat(np.arange(5), [500, 130, 290, 50, 30])
    scores = rng.normal(size=20_000) * 0.2 + 0.4  # a network that hovers near the prior
    cuts = prior_cut_points(scores, labelled)
    decoded = decode_with_cut_points(rng.normal(size=20_000) * 0.2 + 0.4, cuts)
    np.testing.assert_allclose(np.bincount(decoded, minlength=5) / 20_000, np.bincount(labelled) / len(labelled), atol=0.01)
    # the fixed count rule would call nearly all of them grade 0: scores below 0.5 per output
    assert np.all(np.diff(cuts) >= 0)


def test_cut_points_keep_a_ranking_that_the_fixed_rule_hides():
    grades = np.repeat(np.arange(5), 40)
    scores = 0.3 + 0.02 * grades + np.random.default_rng(1).normal(0, 0.005, len(grades))  # ranks right, all < .5
    ordinal = np.column_stack([np.ones(len(grades)), np.tile(scores[:, None] / 4, 4)])
    assert quadratic_weighted_kappa(grades, decode(ordinal, "ordinal")) == 0  # every image "grade 0"
    matched = decode_with_cut_points(expected_grade(ordinal, "ordinal"), prior_cut_points(expected_grade(ordinal, "ordinal"), grades))
    assert quadratic_weighted_kappa(grades, matched) > 0.95


def test_ties_go_to_the_lower_grade_and_constant_scores_give_grade_0():
    cuts = prior_cut_points(np.full(10, 0.7), [0, 1, 2, 3, 4])
    assert decode_with_cut_points(np.full(3, 0.7), cuts).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "scores, grades, message",
    [([], [0, 1], "non-empty"), ([0.1, np.nan], [0, 1], "finite"), ([0.1, 0.2], [], "empty"), ([0.1], [5], "row 0")],
)
def test_prior_cut_points_reject_bad_input(scores, grades, message):
    with pytest.raises(ValueError, match=message):
        prior_cut_points(scores, grades)


def test_decode_with_cut_points_rejects_decreasing_cuts():
    with pytest.raises(ValueError, match="non-decreasing"):
        decode_with_cut_points([0.5], [0.1, 0.3, 0.2, 0.4])
