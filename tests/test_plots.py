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

    import keras

    # 64 px: the last stage's maps are 2 x 2, so a heat map can show where (at 32 px, 1 x 1).
    # Seeded: with some random weights every image's map is all zero (the ReLU cuts it all).
    keras.utils.set_random_seed(1)
    encoder = build_encoder("compact", 64, feature_stages=feature_stages)
    head = build_head(encoder.output_shape[-1], 5, hidden=(8,), activation="sigmoid")
    model = stack(encoder, head)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    maps = grad_cam(model, images, "ordinal")
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert maps.reshape(3, -1).std(axis=1).max() > 0
    # Grad-CAM rebuilds the head's input as the earlier stages' features, then the last
    # stage's maps pooled again: that must be the encoder's own output, in its order.
    last_maps = keras.Model(encoder.inputs, encoder.get_layer("global_pool").input)(images.astype(np.float32), training=False)
    features = np.asarray(encoder(images.astype(np.float32), training=False))
    rebuilt = np.concatenate([features[:, : features.shape[1] - last_maps.shape[-1]], np.asarray(last_maps).mean(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(rebuilt, features, rtol=1e-5, atol=1e-6)


def test_grad_cam_of_a_regression_head_weighs_the_last_maps_by_the_heads_weights():
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    encoder = build_encoder("compact", 64, feature_stages="all")
    head = build_head(encoder.output_shape[-1], 1, hidden=(), activation="linear")
    model = stack(encoder, head)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    maps = grad_cam(model, images, "regression")
    # A linear head's score is w . features: each last-stage map's Grad-CAM weight is its
    # head weight over the map's area (average pooling).
    last_maps = np.asarray(keras.Model(encoder.inputs, encoder.get_layer("global_pool").input)(images.astype(np.float32), training=False))
    weights = np.asarray(head.get_weights()[0])[-last_maps.shape[-1]:, 0]
    expected = np.maximum((last_maps * weights).sum(axis=-1), 0)
    assert expected.reshape(2, -1).max(axis=1).min() > 0
    expected = np.asarray(tf.image.resize(expected[..., None], (64, 64)))[..., 0]
    np.testing.assert_allclose(maps, expected / expected.reshape(2, -1).max(axis=1)[:, None, None], rtol=1e-4, atol=1e-5)
