"""A grader that sees only the photographs' format: its features and its cross-validated kappa."""

import numpy as np
import pandas as pd
import pytest

from drnb.photo_format import FORMAT_FEATURES, format_features, format_only_kappa, visible_disc_share
from drnb.profiles import resolve_profile


def test_visible_disc_share_is_the_area_of_the_band_a_flat_cut_keeps():
    assert visible_disc_share(1.0) == pytest.approx(1.0)
    assert visible_disc_share(0.0) == pytest.approx(0.0)
    # Against a count of pixel centres of a disc of radius 400 inside |y| <= 0.6 r.
    y, x = np.mgrid[-400:400, -400:400] + 0.5
    inside = x**2 + y**2 <= 400**2
    assert visible_disc_share(0.6) == pytest.approx((inside & (np.abs(y) <= 240)).sum() / inside.sum(), abs=2e-3)


def formatted_table(n=400, seed=0, format_follows_grade=True):
    """Photographs whose camera (size, framing) follows the grade, or is drawn at random."""
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 5, n)
    camera = grades if format_follows_grade else rng.integers(0, 5, n)
    width = np.where(camera >= 2, 3216, 2048) + rng.integers(-8, 8, n)
    height = np.where(camera >= 2, 2136, 1536)
    radius = 700 + 100 * camera + rng.normal(0, 20, n)
    return pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)], "grade": grades, "patient_id": None,
        "width": width, "height": height, "fundus_radius": radius, "fundus_half_extent": np.minimum(radius, height / 2),
    })


def test_format_features_are_read_from_the_preprocessed_tables_columns():
    table = formatted_table(10)
    features = format_features(table)
    assert list(features.columns) == list(FORMAT_FEATURES)
    np.testing.assert_allclose(features["aspect"], table["width"] / table["height"])
    assert features["cut_off_share"].between(0, 1).all()
    with pytest.raises(ValueError, match="fundus_half_extent"):
        format_features(table.drop(columns="fundus_half_extent"))


def test_format_alone_scores_high_where_the_camera_follows_the_grade_and_near_zero_where_it_does_not():
    profile = resolve_profile("smoke", {"repetitions": "3"})
    follows = format_only_kappa(formatted_table(), profile)
    assert len(follows) == 3 and (follows["n_test"] > 0).all() and (follows["n_train"] > follows["n_test"]).all()
    assert follows["qw_kappa"].mean() > 0.8
    unrelated = format_only_kappa(formatted_table(format_follows_grade=False), profile)
    assert abs(unrelated["qw_kappa"].mean()) < 0.15
