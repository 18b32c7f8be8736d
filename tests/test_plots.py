"""Figures drawn from run files."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import pandas as pd  # noqa: E402

from drnb.plots import plot_learning_curves  # noqa: E402


def test_learning_curves_join_the_epochs_the_accuracy_was_scored_at():
    # pretext_eval_every=2 over 4 epochs: history.csv leaves the accuracy empty at epochs 1 and 3.
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "loss": [1.2, 0.9, 0.7, 0.6], "heldout_rotation_accuracy": [np.nan, 0.5, np.nan, 0.9]}
    )
    figure = plot_learning_curves(history)
    loss_epochs, _ = figure.axes[0].lines[0].get_data()
    accuracy_epochs, accuracy = figure.axes[1].lines[0].get_data()
    assert list(loss_epochs) == [1, 2, 3, 4]
    assert list(accuracy_epochs) == [2, 4] and list(accuracy) == [0.5, 0.9]


@pytest.mark.parametrize("feature_stages", ["last", "all"])
def test_grad_cam_explains_the_last_stage_whatever_is_pooled(feature_stages):
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    encoder = build_encoder("compact", 32, feature_stages=feature_stages)
    model = stack(encoder, build_head(encoder.output_shape[-1], 5, hidden=(8,), activation="sigmoid"))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    maps = grad_cam(model, images, "ordinal")
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert np.allclose(maps.reshape(3, -1).max(axis=1), 1) or not maps.any()
