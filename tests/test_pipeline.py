"""Rotations and augmentation in the input graph."""

import numpy as np
import pytest
import tensorflow as tf

from drnb.pipeline import augment, contrastive_batches, labelled_batches, rotate_all4, rotate_random1, rotation_batches, shuffled_positions, without_autotune
from drnb.preprocessing import rotation_invariant_mask


@pytest.fixture
def asymmetric_images():
    """uint8 (6, 16, 16, 3) images with no rotational symmetry (random noise)."""
    return np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


def test_all4_holds_each_image_in_four_rotations_labelled_0_to_3(asymmetric_images):
    rotated, labels = rotate_all4(tf.constant(asymmetric_images))
    assert rotated.shape == (24, 16, 16, 3)
    assert labels.numpy().tolist() == [0, 1, 2, 3] * 6
    for row in range(24):
        source, k = divmod(row, 4)
        # Rotating back by the label recovers the original image.
        np.testing.assert_array_equal(np.rot90(rotated[row].numpy(), -labels[row].numpy()), asymmetric_images[source])
        assert k == labels[row]


def test_random1_label_undoes_the_rotation(asymmetric_images):
    rotated, labels = rotate_random1(tf.constant(asymmetric_images), tf.constant([3, 7]))
    labels = labels.numpy()
    assert set(labels) <= {0, 1, 2, 3}
    for image, rotation, label in zip(asymmetric_images, rotated.numpy(), labels):
        np.testing.assert_array_equal(np.rot90(rotation, -label), image)


def test_random1_draws_every_rotation():
    images = tf.zeros((400, 4, 4, 3))
    _, labels = rotate_random1(images, tf.constant([1, 2]))
    counts = np.bincount(labels.numpy(), minlength=4)
    assert (counts > 60).all(), counts


def test_rotation_batches_all4_training_batches_are_whole_groups_of_four(asymmetric_images):
    dataset = rotation_batches(tf.constant(asymmetric_images), np.arange(6), 8, mode="all4", seed=0,
                               augment_options={"zoom": 0.0, "colour": 0.0})
    images, labels = next(iter(dataset))
    assert images.shape == (8, 16, 16, 3)
    assert labels.numpy().tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # Without zoom and colour jitter the only augmentation is a horizontal flip: rotating each
    # rotated copy back gives the same (possibly mirrored) source image for all four copies.
    group = images.numpy()[:4]
    restored = [np.rot90(group[k], -k) for k in range(4)]
    for copy in restored[1:]:
        np.testing.assert_allclose(copy, restored[0])


def test_rotation_batches_evaluation_covers_every_image_in_every_rotation(asymmetric_images):
    dataset = rotation_batches(tf.constant(asymmetric_images), np.arange(6), 8, mode="random1", training=False)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in dataset])
    assert np.bincount(labels).tolist() == [6, 6, 6, 6]


@pytest.mark.parametrize("option", ["vertical_flip", "rot90"])
def test_pretext_refuses_orientation_changing_augmentation(asymmetric_images, option):
    with pytest.raises(ValueError, match=option):
        rotation_batches(tf.constant(asymmetric_images), np.arange(6), 8, augment_options={option: True})


def test_all4_needs_a_batch_multiple_of_four(asymmetric_images):
    with pytest.raises(ValueError, match="batch_size"):
        rotation_batches(tf.constant(asymmetric_images), np.arange(6), 6, mode="all4")


def test_augmentation_keeps_a_rotation_invariant_mask_rotation_invariant():
    mask = rotation_invariant_mask(32, 0.95, 0.7)
    images = np.where(mask[None, ..., None], 200.0, 0.0).astype(np.float32).repeat(8, axis=0)
    augmented = augment(tf.constant(images), tf.constant([5, 9]), zoom=0.2, colour=0.1).numpy()
    for image in augmented:
        support = image.max(axis=-1) > 0
        for k in (1, 2, 3):
            # Bilinear zoom may shift the edge by a pixel; the shape must not favour a direction.
            assert np.mean(support != np.rot90(support, k)) < 0.02
        assert image[0, 0].max() == 0  # the black surround stays black under colour jitter


def test_labelled_batches_evaluation_is_one_ordered_pass():
    images = tf.constant(np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(3, axis=3))
    targets = np.eye(5, dtype=np.float32)
    batches = list(labelled_batches(images, np.array([4, 2, 0]), targets[[4, 2, 0]], 2, seed=0, training=False))
    values = np.concatenate([b[0].numpy()[:, 0, 0, 0] for b in batches])
    assert values.tolist() == [4.0, 2.0, 0.0]


def test_evaluation_batches_show_every_image_in_one_of_the_eight_views(asymmetric_images):
    images = asymmetric_images[:3].astype(np.uint8)
    targets = np.eye(3, dtype=np.float32)
    shown = []
    for view in range(8):
        batches = labelled_batches(tf.constant(images), np.arange(3), targets, 2, seed=0, training=False, view=view)
        shown.append(np.concatenate([b[0].numpy() for b in batches]))
        source = images[:, :, ::-1] if view >= 4 else images  # 4-7: mirrored left to right first
        np.testing.assert_array_equal(shown[-1], np.rot90(source, view % 4, axes=(1, 2)).astype(np.float32))
    assert len({view.tobytes() for view in shown}) == 8  # an asymmetric image looks different in each
    with pytest.raises(ValueError, match="view=1: for evaluation only"):
        labelled_batches(tf.constant(images), np.arange(3), targets, 2, seed=0, training=True, view=1)
    for bad in (8, 1.0):
        with pytest.raises(ValueError, match=f"view={bad!r}: expected 0-3"):
            labelled_batches(tf.constant(images), np.arange(3), targets, 2, seed=0, training=False, view=bad)


def test_quarter_turn_augmentation_turns_each_image_like_np_rot90(asymmetric_images):
    images = np.repeat(asymmetric_images[:1], 64, axis=0).astype(np.float32)
    augmented = augment(tf.constant(images), tf.constant([3, 7]), zoom=0.0, colour=0.0, rot90=True).numpy()
    source = images[0]
    candidates = [np.rot90(image, k) for image in (source, source[:, ::-1]) for k in range(4)]
    matched = [next(i for i, c in enumerate(candidates) if np.array_equal(c, out)) for out in augmented]
    assert set(k % 4 for k in matched) == {0, 1, 2, 3}  # every quarter turn drawn, none invented


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, {(0, False), (0, True)}),  # the pretext's: a horizontal flip or not, never a turn
        ({"vertical_flip": True}, {(0, False), (0, True), (2, False), (2, True)}),
        ({"rot90": True}, {(k, mirrored) for k in range(4) for mirrored in (False, True)}),
    ],
)
def test_augmentation_draws_exactly_the_symmetries_its_options_allow(asymmetric_images, options, expected):
    # (k, mirrored): the output is np.rot90 by k of the source, or of its left-right mirror.
    images = np.repeat(asymmetric_images[:1], 400, axis=0)
    augmented = augment(tf.constant(images), tf.constant([2, 11]), zoom=0.0, colour=0.0, **options).numpy()
    source = images[0].astype(np.float32)
    candidates = {(k, mirrored): np.rot90(source[:, ::-1] if mirrored else source, k) for k in range(4) for mirrored in (False, True)}
    drawn = [next(key for key, candidate in candidates.items() if np.array_equal(candidate, out)) for out in augmented]
    assert set(drawn) == expected
    counts = np.array([drawn.count(key) for key in expected])
    assert counts.min() >= 400 / len(expected) / 2  # each drawn about equally often, none starved


def test_augmentation_gives_the_same_float_images_from_uint8_and_float32(asymmetric_images):
    images = np.repeat(asymmetric_images[:1], 8, axis=0)
    seed = tf.constant([4, 1])
    from_uint8 = augment(tf.constant(images), seed, rot90=True).numpy()
    from_float = augment(tf.constant(images.astype(np.float32)), seed, rot90=True).numpy()
    assert from_uint8.dtype == np.float32
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-3)


def test_shuffled_positions_gives_a_new_permutation_every_pass():
    stream = shuffled_positions(7, seed=3, batch_size=3).take(7)  # 21 items: three passes, batches straddling them
    passes = np.concatenate([batch.numpy() for batch in stream]).reshape(3, 7)
    for one_pass in passes:
        assert sorted(one_pass.tolist()) == list(range(7))  # each item once per pass
    assert len({tuple(one_pass) for one_pass in passes}) == 3


@pytest.mark.parametrize("count, batch_size", [(7, 3), (3, 8), (5, 5)])
def test_shuffled_positions_are_the_per_pass_permutations_keyed_by_seed_and_pass(count, batch_size):
    expected = np.concatenate(
        [tf.argsort(tf.random.stateless_uniform([count], tf.constant([4, e], tf.int64)), stable=True).numpy() for e in range(20)]
    )
    batches = [batch.numpy() for batch in shuffled_positions(count, seed=4, batch_size=batch_size).take(5)]
    assert all(batch.shape == (batch_size,) for batch in batches)
    np.testing.assert_array_equal(np.concatenate(batches), expected[: 5 * batch_size])


@pytest.mark.parametrize("count, batch_size, message", [(0, 4, "count=0"), (4, 0, "batch_size=0")])
def test_shuffled_positions_rejects_empty_sets_and_batches(count, batch_size, message):
    with pytest.raises(ValueError, match=message):
        shuffled_positions(count, seed=1, batch_size=batch_size)


def _training_order(seed):
    images = tf.constant(np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1).repeat(3, axis=3))
    targets = np.arange(12, dtype=np.float32)[:, None]
    batches = labelled_batches(images, np.arange(12), targets, 4, seed=seed, training=True)
    return np.concatenate([target.numpy()[:, 0] for _, target in batches.take(6)])


def test_training_order_depends_on_the_run_seed_and_not_on_tensorflows_global_seed():
    tf.random.set_seed(1)
    first = _training_order(seed=5)
    tf.random.set_seed(99)  # another global seed, as any earlier code may have set
    assert np.array_equal(_training_order(seed=5), first)
    assert not np.array_equal(_training_order(seed=6), first)


def test_rotation_batches_order_does_not_depend_on_tensorflows_global_seed(asymmetric_images):
    def first_batches():
        dataset = rotation_batches(tf.constant(asymmetric_images), np.arange(len(asymmetric_images)), 8, seed=4)
        return np.concatenate([images.numpy() for images, _ in dataset.take(3)])

    tf.random.set_seed(2)
    first = first_batches()
    tf.random.set_seed(77)
    assert np.array_equal(first_batches(), first)


def test_trainer_iterators_run_without_autotuning():
    dataset = shuffled_positions(5, seed=0, batch_size=2)
    assert dataset.options().autotune.enabled is not False
    assert without_autotune(dataset).options().autotune.enabled is False


def test_contrastive_batches_hold_two_views_of_each_photograph_side_by_side():
    black = np.zeros((16, 16, 3), np.uint8)  # stays black under every crop, turn and colour change
    bright = np.full((16, 16, 3), 200, np.uint8)
    images = tf.constant(np.stack([black, bright]))
    views, targets = next(iter(contrastive_batches(images, np.array([0, 1, 1, 1]), 8, seed=3, training=False)))
    assert views.shape == (8, 16, 16, 3) and views.dtype == tf.float32 and targets.shape == (8,)
    dark = views.numpy().reshape(8, -1).max(axis=1) == 0
    assert dark.tolist() == [True, True] + [False] * 6  # views 2i and 2i + 1 show photograph i
    assert 0 <= views.numpy().min() and views.numpy().max() <= 255
    training, _ = next(iter(contrastive_batches(images, np.array([0, 1, 1, 1]), 8, seed=3)))
    pairs = (training.numpy().reshape(8, -1).max(axis=1) == 0).reshape(4, 2)
    assert pairs.sum() == 2 and (pairs.all(axis=1) == pairs.any(axis=1)).all()  # shuffled, still side by side


def test_contrastive_views_differ_and_an_evaluation_pass_is_the_same_every_time(asymmetric_images):
    images = tf.constant(asymmetric_images)
    rows = np.arange(len(asymmetric_images))
    first = np.concatenate([views.numpy() for views, _ in contrastive_batches(images, rows, 4, seed=1, training=False)])
    again = np.concatenate([views.numpy() for views, _ in contrastive_batches(images, rows, 4, seed=1, training=False)])
    assert len(first) == 2 * len(rows) and np.array_equal(first, again)
    assert not np.allclose(first[0::2], first[1::2])  # a photograph's two views are not the same picture
    with pytest.raises(ValueError, match="even number of views"):
        contrastive_batches(images, rows, 5)
