"""Encoders, heads, saving and loading."""

import keras
import numpy as np
import pytest

from drnb.models import build_encoder, build_head, leaf_layers, precision_policy, recalibrate_batchnorm, stack
from drnb.pretext import load_encoder, save_atomically


def test_compact_encoder_maps_images_to_features():
    encoder = build_encoder("compact", 32)
    features = encoder(np.zeros((2, 32, 32, 3), np.float32))
    assert features.shape[0] == 2 and len(features.shape) == 2
    assert isinstance(encoder.get_layer("global_pool"), keras.layers.GlobalAveragePooling2D)


def test_densenet121_builds_without_weights():
    encoder = build_encoder("densenet121", 32)
    assert encoder.output_shape == (None, 1024)


def test_all_stages_concatenate_each_stages_pooled_maps_last_stage_last():
    encoder = build_encoder("compact", 32, feature_stages="all")
    assert encoder.output_shape == (None, 80 + 136 + 212 + 298)
    ends = [encoder.get_layer(f"stage{stage}_layer2_concat").output for stage in range(4)]
    maps = keras.Model(encoder.inputs, ends)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = np.concatenate([np.asarray(m).mean(axis=(1, 2)) for m in maps(images, training=False)], axis=1)
    np.testing.assert_allclose(np.asarray(encoder(images, training=False)), expected, rtol=1e-5, atol=1e-6)
    # The same weights as the last-stage encoder: one pretext encoder serves either way of pooling.
    last = build_encoder("compact", 32)
    assert [w.shape for w in last.weights] == [w.shape for w in encoder.weights]
    last.set_weights(encoder.get_weights())
    np.testing.assert_allclose(np.asarray(last(images, training=False)), expected[:, -298:], rtol=1e-5, atol=1e-6)


def test_densenet121_all_stages_pool_its_four_dense_blocks():
    encoder = build_encoder("densenet121", 32, feature_stages="all")
    assert encoder.output_shape == (None, 256 + 512 + 1024 + 1024)
    last = build_encoder("densenet121", 32)
    assert [w.shape for w in last.weights] == [w.shape for w in encoder.weights]
    last.set_weights(encoder.get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(last(images, training=False)), np.asarray(encoder(images, training=False))[:, -1024:], rtol=1e-4, atol=1e-5
    )
    features = np.asarray(encoder(images, training=False))
    assert (features[:, :-1024] >= 0).all()  # the blocks are pooled after their ReLU, as the last one is


def test_all_stages_of_a_one_stage_encoder_are_its_last():
    from drnb.models import compact_densenet

    assert compact_densenet(32, growth_rates=(16,), feature_stages="all").output_shape == (None, 32 + 3 * 16)


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(keras.applications, "DenseNet121", offline)
    with pytest.raises(RuntimeError, match="ImageNet weights"):
        build_encoder("densenet121", 32, weights="imagenet")


@pytest.mark.parametrize(
    "arguments",
    [{"name": "resnet"}, {"name": "compact", "weights": "imagenet"}, {"name": "compact", "feature_stages": "middle"}],
)
def test_bad_encoder_arguments_raise(arguments):
    with pytest.raises(ValueError):
        build_encoder(image_size=32, **arguments)


def test_reference_heads_have_the_published_layers():
    pretext = build_head(64, 4, hidden=(2048, 1024), dropout=0.5)
    dense = [layer.units for layer in pretext.layers if isinstance(layer, keras.layers.Dense)]
    assert dense == [2048, 1024, 4]
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in pretext.layers) == 2
    assert pretext.layers[-1].dtype_policy.compute_dtype == "float32"


@pytest.mark.parametrize("feature_stages", ["last", "all"])
def test_saved_encoder_reloads_and_predicts_identically(tmp_path, feature_stages):
    encoder = build_encoder("compact", 32, feature_stages=feature_stages)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    path = tmp_path / "encoder.keras"
    save_atomically(encoder, path)
    reloaded = load_encoder(path)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), encoder.predict(images, verbose=0), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.keras"]  # no temporary file left


def test_an_encoder_file_with_code_in_it_is_refused(tmp_path):
    """Keras's safe_mode stays on: a saved Lambda layer (arbitrary Python) is not run on load."""
    inputs = keras.Input((8, 8, 3))
    planted = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = tmp_path / "encoder.keras"
    planted.save(path)
    with pytest.raises(ValueError, match="Lambda"):
        load_encoder(path)


def test_missing_encoder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="02_rotation_pretext"):
        load_encoder(tmp_path / "encoder.keras")


def test_stacked_classifier_outputs_probabilities():
    encoder = build_encoder("compact", 32)
    model = stack(encoder, build_head(encoder.output_shape[-1], 5, hidden=(8,), activation="sigmoid"))
    outputs = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert outputs.shape == (2, 5) and (outputs >= 0).all() and (outputs <= 1).all()


def test_precision_policy_is_mixed_float16_when_asked_or_on_an_accelerator():
    assert precision_policy("on", accelerator=False) == "mixed_float16"
    assert precision_policy("auto", accelerator=True) == "mixed_float16"
    assert precision_policy("auto", accelerator=False) == "float32"
    assert precision_policy("off", accelerator=True) == "float32"
    with pytest.raises(ValueError, match="mixed_precision='fp16'"):
        precision_policy("fp16", accelerator=True)


def test_leaf_layers_open_nested_models():
    encoder = build_encoder("compact", 32)
    head = build_head(encoder.output_shape[-1], 5, hidden=(8,))
    leaves = leaf_layers(stack(encoder, head))
    assert not any(isinstance(layer, keras.Model) for layer in leaves)
    assert len(leaves) == len(leaf_layers(encoder)) + len(leaf_layers(head)) + 1  # the classifier's own input
    assert sum(isinstance(layer, keras.layers.Dropout) for layer in leaves) == 1


def test_profile_heads_follow_the_profile():
    from drnb.models import grade_head, rotation_head
    from drnb.profiles import resolve_profile

    paper = resolve_profile("paper")
    rotation = rotation_head(64, paper)
    assert rotation.output_shape == (None, 4) and rotation.name == "rotation_head"
    assert [layer.units for layer in rotation.layers if isinstance(layer, keras.layers.Dense)] == [2048, 1024, 4]
    grades = grade_head(64, paper)
    assert grades.output_shape == (None, 5) and grades.layers[-1].activation.__name__ == "sigmoid"
    assert [layer.units for layer in grades.layers if isinstance(layer, keras.layers.Dense)] == [1024, 5]
    softmax = grade_head(64, resolve_profile("smoke", {"target": "softmax", "finetune_hidden": "8,4"}))
    assert softmax.layers[-1].activation.__name__ == "softmax"
    assert [layer.units for layer in softmax.layers if isinstance(layer, keras.layers.Dense)] == [8, 4, 5]
    regression = grade_head(64, resolve_profile("quick"))  # one linear output, on the features themselves
    assert regression.output_shape == (None, 1) and regression.layers[-1].activation.__name__ == "linear"
    assert [layer.units for layer in regression.layers if isinstance(layer, keras.layers.Dense)] == [1]


def _batch_norms(model):
    return [layer for layer in leaf_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def test_recalibrated_batchnorm_predicts_as_it_trains_on_one_batch():
    """With one batch, inference with the re-estimated statistics equals a training-mode pass."""
    keras.utils.set_random_seed(0)
    encoder = build_encoder("compact", 32, feature_stages="all")
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    weights_before = [w.numpy() for w in encoder.trainable_weights]
    training_mode = np.asarray(encoder(images, training=True))
    # A fresh encoder's moving statistics are 0 and 1: its inference features are another thing.
    assert not np.allclose(np.asarray(encoder(images, training=False)), training_mode, atol=1e-2)
    momenta = [norm.momentum for norm in _batch_norms(encoder)]

    assert recalibrate_batchnorm(encoder, [images]) == 1
    np.testing.assert_allclose(np.asarray(encoder(images, training=False)), training_mode, rtol=1e-3, atol=1e-4)
    assert [norm.momentum for norm in _batch_norms(encoder)] == momenta
    for before, after in zip(weights_before, encoder.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_recalibrated_batchnorm_averages_the_statistics_of_every_batch():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9)(inputs))
    batches = [np.random.default_rng(seed).normal(seed, 1 + seed, (16, 3)).astype(np.float32) for seed in range(3)]
    assert recalibrate_batchnorm(model, iter(batches)) == 3
    norm = _batch_norms(model)[0]
    np.testing.assert_allclose(np.asarray(norm.moving_mean), np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.moving_variance), np.mean([b.var(0) for b in batches], axis=0), rtol=1e-4)
    assert norm.momentum == 0.9


def test_recalibrating_a_model_without_batchnorm_changes_nothing():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert recalibrate_batchnorm(model, [np.ones((4, 3), np.float32)]) == 0


def test_encoder_blocks_account_for_every_layer_and_weight_pooled_features_last():
    from drnb.models import encoder_blocks

    encoder = build_encoder("compact", 32, feature_stages="all")
    blocks = encoder_blocks(encoder)
    assert blocks["layers"].sum() == len(encoder.layers) and blocks["weights"].sum() == encoder.count_params()
    assert list(blocks.index[-1:]) == ["pooling"] and blocks["output"].iloc[-1] == (encoder.output_shape[-1],)
    assert list(blocks.index).index("stage0") < list(blocks.index).index("stage3")
