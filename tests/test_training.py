"""The shared training engine: learning happens, freezing freezes, resets do not retrace."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from drnb.distribute import scaled_batch_and_rate, select_strategy
from drnb.models import build_encoder, build_head
from drnb.training import Trainer, cosine_rate


def make_trainer(strategy=None, learning_rate=3e-3):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        encoder = build_encoder("compact", 32)
        head = build_head(encoder.output_shape[-1], 4, hidden=(16,), dropout=0.0)
    return Trainer(encoder, head, loss="sparse_categorical_crossentropy", learning_rate=learning_rate, strategy=strategy)


def constant_batches(n=32, seed=0):
    """Random images whose label is a simple function of the image (its brightest quadrant)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.uniform(0, 60, (n, 32, 32, 3)).astype(np.float32)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 2)
        image[row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] += 180
    return tf.data.Dataset.from_tensors((images, labels.astype(np.int32))).repeat()


def test_loss_falls_over_twenty_steps():
    trainer = make_trainer()
    batches = trainer.batches(constant_batches())
    first = trainer.train(batches, 3).losses[-1]
    trainer.train(batches, 20)
    last = trainer.train(batches, 3).losses[-1]
    assert last < 0.5 * first, (first, last)


def test_warmup_freezes_the_encoder_and_unfreezing_trains_it():
    trainer = make_trainer()
    batches = trainer.batches(constant_batches())
    encoder_before = [w.copy() for w in trainer.encoder.get_weights()]  # includes batch-norm statistics
    head_before = [w.copy() for w in trainer.head.get_weights()]
    trainer.train(batches, 5, phase="head")
    for before, after in zip(encoder_before, trainer.encoder.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(head_before, trainer.head.get_weights()))
    trainer.train(batches, 5, phase="full")
    assert any(not np.array_equal(b, a) for b, a in zip(encoder_before, trainer.encoder.get_weights()))


@pytest.fixture
def mixed_float16():
    """Keras's global policy set to mixed float16 (drnb's default on a GPU) for one test."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_mixed_float16_trains_with_dynamic_loss_scaling(mixed_float16):
    trainer = make_trainer()
    assert all(isinstance(optimizer, keras.optimizers.LossScaleOptimizer) for optimizer in trainer.optimizers.values())
    batches = trainer.batches(constant_batches())
    first = trainer.train(batches, 3).losses[-1]
    trainer.train(batches, 20, rate_at=lambda index: 3e-3)
    last = trainer.train(batches, 3).losses[-1]
    assert np.isfinite(last) and last < 0.5 * first, (first, last)
    full = trainer.optimizers["full"]
    assert int(full.iterations.numpy()) > 0  # steps whose scaled gradients overflowed are skipped, not all
    # The loss scale is optimizer state: a reset restores it with the rest.
    full.dynamic_scale.assign(4.0)
    trainer.reset(learning_rate=1e-3)
    assert float(full.dynamic_scale.numpy()) == full.initial_scale
    assert int(full.iterations.numpy()) == 0 and float(full.learning_rate.numpy()) == pytest.approx(1e-3)


def test_float32_trains_with_plain_adam():
    trainer = make_trainer()
    assert all(type(optimizer) is keras.optimizers.Adam for optimizer in trainer.optimizers.values())


def test_reset_restores_weights_and_optimizer_without_retracing():
    trainer = make_trainer()
    batches = trainer.batches(constant_batches())
    start_encoder, start_head = trainer.encoder.get_weights(), trainer.head.get_weights()
    first = trainer.train(batches, 4)
    step = trainer._step("full")
    traces = step.experimental_get_tracing_count()
    trainer.reset(encoder_weights=start_encoder, head_weights=start_head, learning_rate=1e-3)
    assert int(trainer.optimizers["full"].iterations.numpy()) == 0
    assert float(trainer.optimizers["full"].learning_rate.numpy()) == pytest.approx(1e-3)
    trainer.train(batches, 4)
    assert step.experimental_get_tracing_count() == traces == 1
    assert first.steps == 4


def test_learning_rate_changes_per_phase_without_retracing():
    trainer = make_trainer()
    batches = trainer.batches(constant_batches())
    trainer.train(batches, 1, phase="full")
    traced = dict(trainer._steps)
    trainer.set_learning_rate(1e-4, phase="full")
    assert float(trainer.optimizers["full"].learning_rate.numpy()) == pytest.approx(1e-4)
    assert float(trainer.optimizers["head"].learning_rate.numpy()) == pytest.approx(3e-3)
    trainer.train(batches, 1, phase="full")
    assert trainer._steps == traced
    with pytest.raises(ValueError, match="learning_rate"):
        trainer.set_learning_rate(0.0)


def test_a_rate_per_step_is_set_before_each_step_without_retracing():
    trainer = make_trainer()
    batches = trainer.batches(constant_batches())
    trainer.train(batches, 1)
    traced = dict(trainer._steps)
    seen = []

    def rate_at(index):
        seen.append(index)
        return 1e-3 / (index + 1)

    trainer.train(batches, 4, rate_at=rate_at)
    assert seen == [0, 1, 2, 3]
    assert float(trainer.optimizers["full"].learning_rate.numpy()) == pytest.approx(1e-3 / 4)
    assert trainer._steps == traced


def test_cosine_rate_falls_from_the_base_rate_towards_zero():
    rates = [cosine_rate(step, 4, 2e-3) for step in range(4)]
    assert rates == pytest.approx([2e-3, 2e-3 * (1 + np.cos(np.pi / 4)) / 2, 1e-3, 2e-3 * (1 + np.cos(3 * np.pi / 4)) / 2])
    assert cosine_rate(999, 1000, 1.0) < 1e-5
    with pytest.raises(ValueError, match="position"):
        cosine_rate(4, 4, 1e-3)


def test_bad_phase_and_loss_are_rejected():
    trainer = make_trainer()
    with pytest.raises(ValueError, match="phase"):
        trainer.train(iter([]), 1, phase="encoder")
    with pytest.raises(ValueError, match="loss"):
        Trainer(trainer.encoder, trainer.head, loss="hinge", learning_rate=1e-3)


def test_mirrored_strategy_over_the_cpu_trains_and_scales():
    strategy = select_strategy(devices=["/cpu:0"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert scaled_batch_and_rate(32, 1e-4, strategy) == (32 * strategy.num_replicas_in_sync, 1e-4 * strategy.num_replicas_in_sync)
    trainer = make_trainer(strategy)
    batches = trainer.batches(constant_batches())
    first = trainer.train(batches, 3).losses[-1]
    trainer.train(batches, 15)
    assert trainer.train(batches, 3).losses[-1] < first


def test_default_strategy_without_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert select_strategy().num_replicas_in_sync == 1


def test_inference_passes_read_their_batches_with_autotuning_off(autotune_of_iterated_datasets):
    # With tf.data's autotuning on, an encoding pass ran at random at ~60 % of the speed of
    # the others on 2 cores; encode and predict switch it off, as training batches do.
    trainer = make_trainer()
    images, labels = next(iter(constant_batches()))
    autotune_of_iterated_datasets.clear()
    dataset = tf.data.Dataset.from_tensors((images, labels)).prefetch(tf.data.AUTOTUNE)
    assert trainer.encode(dataset).shape == (32, trainer.encoder.output_shape[-1])
    assert trainer.predict(dataset).shape[0] == 32
    assert autotune_of_iterated_datasets == [False, False]


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy"])
def test_trainer_losses_are_keras_losses_of_the_same_name(loss):
    # The accelerator benchmarks train with Keras's loss of the name drnb.targets.TARGET_LOSSES
    # gives; the Trainer must compute the same thing.
    rng = np.random.default_rng(0)
    if loss == "sparse_categorical_crossentropy":
        targets = rng.integers(0, 4, 6).astype(np.float32)
        outputs = rng.dirichlet(np.ones(4), 6).astype(np.float32)
    elif loss == "categorical_crossentropy":
        targets = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 6)]
        outputs = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    else:
        targets = (rng.uniform(size=(6, 5)) > 0.5).astype(np.float32)
        outputs = rng.uniform(0.05, 0.95, (6, 5)).astype(np.float32)
    trainer = make_trainer()
    trainer.loss_name = loss
    ours = trainer._per_example_loss(tf.constant(targets), tf.constant(outputs)).numpy()
    theirs = np.asarray(keras.losses.get(loss)(targets, outputs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_every_target_has_a_trainer_loss():
    from drnb.targets import TARGET_LOSSES, TARGETS
    from drnb.training import LOSSES

    assert set(TARGET_LOSSES) == set(TARGETS) and set(TARGET_LOSSES.values()) <= set(LOSSES)


@pytest.mark.parametrize("batchnorm", ["batch", "frozen"])
def test_frozen_batchnorm_keeps_its_moving_statistics_while_everything_else_trains(batchnorm):
    with tf.distribute.get_strategy().scope():
        encoder = build_encoder("compact", 32)
        head = build_head(encoder.output_shape[-1], 4, hidden=(16,), dropout=0.0)
    trainer = Trainer(encoder, head, loss="sparse_categorical_crossentropy", learning_rate=3e-3, batchnorm=batchnorm)
    before = {v.path: v.numpy().copy() for v in trainer.encoder.weights}
    trainer.train(trainer.batches(constant_batches()), 5, phase="full")
    after = {v.path: v.numpy() for v in trainer.encoder.weights}
    moving = [path for path in before if "moving_" in path]
    trained = [path for path in before if "kernel" in path]
    assert moving and trained
    assert all(not np.array_equal(before[p], after[p]) for p in trained)
    moving_changed = [not np.array_equal(before[p], after[p]) for p in moving]
    assert all(moving_changed) if batchnorm == "batch" else not any(moving_changed)


def test_an_unknown_batchnorm_mode_is_refused():
    trainer = make_trainer()
    with pytest.raises(ValueError, match="batchnorm='off': expected one of"):
        Trainer(trainer.encoder, trainer.head, loss="mean_squared_error", learning_rate=1e-3, batchnorm="off")


def _nt_xent_reference(projections: np.ndarray, temperature: float) -> np.ndarray:
    """SimCLR's loss written out view by view, for comparison."""
    unit = projections / np.linalg.norm(projections, axis=1, keepdims=True)
    losses = []
    for i in range(len(unit)):
        others = [j for j in range(len(unit)) if j != i]
        logits = np.array([unit[i] @ unit[j] / temperature for j in others])
        partner = others.index(i ^ 1)
        losses.append(np.log(np.exp(logits).sum()) - logits[partner])
    return np.array(losses)


def test_the_contrastive_loss_is_simclrs_view_by_view():
    from drnb.training import nt_xent

    projections = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(nt_xent(tf.constant(projections), 0.2).numpy(), _nt_xent_reference(projections, 0.2), rtol=1e-4)


def test_the_contrastive_loss_is_low_for_told_apart_pairs_and_chance_for_identical_views():
    from drnb.training import nt_xent

    pairs = np.repeat(np.eye(4, dtype=np.float32), 2, axis=0)  # views 2i and 2i+1 identical, pairs orthogonal
    assert nt_xent(tf.constant(pairs), 0.1).numpy().max() < 1e-3
    same = np.ones((8, 3), np.float32)  # nothing told apart: the partner is one of 7 equal choices
    np.testing.assert_allclose(nt_xent(tf.constant(same)).numpy(), np.log(7), rtol=1e-5)
