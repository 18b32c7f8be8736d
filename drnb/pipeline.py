"""Input pipelines: cached uint8 arrays -> augmented, batched ``tf.data`` datasets.

Images stay uint8 until they are on the batch (a quarter of the memory traffic of float32),
are gathered by index from one in-memory tensor, and are augmented a whole batch at a time
with ``tf.image`` ops, so the pipeline keeps ahead of the model (see ``benchmarks/``).

Rotation labels: label ``k`` in 0-3 means the image was turned ``k`` quarter turns
counter-clockwise (``tf.image.rot90(image, k)``, the same as ``np.rot90(image, k)``), so
``np.rot90(rotated, -k)`` recovers the image.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# How the pretext shows its images: "all4", every image in its four quarter turns in the same
# batch (RotNet); "random1", each image once per pass in one drawn turn (the reference code).
ROTATION_MODES = ("all4", "random1")


def _rotation_maps(size: tf.Tensor) -> tf.Tensor:
    """Pixel index maps of the four quarter turns.

    Returns
    -------
    tf.Tensor
        int32 (4, size * size): row k lists, for each output pixel in raster order, the input
        pixel that ``tf.image.rot90(image, k)`` puts there.
    """
    grid = tf.reshape(tf.range(size * size, dtype=tf.int32), [size, size, 1])
    return tf.reshape(tf.stack([tf.image.rot90(grid, k) for k in range(4)]), [4, -1])


def _gather_pixels(images: tf.Tensor, maps: tf.Tensor, **gather_options) -> tf.Tensor:
    """Images (B, S, S, C) with pixels picked by index maps over S*S: (B, ..., S*S, C)."""
    shape = tf.shape(images)
    pixels = tf.reshape(images, [shape[0], -1, shape[3]])
    return tf.gather(pixels, maps, axis=1, **gather_options)


def shuffled_positions(count: int, seed: int, batch_size: int) -> tf.data.Dataset:
    """Endless stream of batches of positions 0..count-1, each pass a fresh permutation.

    Pass ``e`` is the argsort of ``stateless_uniform`` keyed by ``(seed, e)``, so the order
    depends on ``seed`` alone. ``Dataset.shuffle(seed=...)`` would mix in TensorFlow's global
    seed, and resetting that per run (``tf.random.set_seed``) clears TensorFlow's kernel
    cache, which every fine-tuning run would pay again. Batch ``b`` holds stream items
    ``b * batch_size`` to ``(b + 1) * batch_size - 1``, so a batch may end one pass and
    start the next; each batch recomputes the one or two permutations it touches (an
    argsort of ``count`` keys, well under a millisecond for a few thousand images).

    Returns
    -------
    tf.data.Dataset
        of int64 (batch_size,) in [0, count).
    """
    if count < 1:
        raise ValueError(f"count={count}: need at least one item to shuffle")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive batch size")
    passes_per_batch = batch_size // count + 2  # passes a batch can touch, counted from its first

    def batch_positions(batch):
        items = batch * batch_size + tf.range(batch_size, dtype=tf.int64)
        first_pass = items[0] // count
        permutations = tf.stack(
            [
                tf.argsort(tf.random.stateless_uniform([count], tf.stack([tf.constant(seed, tf.int64), first_pass + k])), stable=True)
                for k in range(passes_per_batch)
            ]
        )
        return tf.cast(tf.gather_nd(permutations, tf.stack([items // count - first_pass, items % count], axis=1)), tf.int64)

    return tf.data.Dataset.counter().map(batch_positions)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning off: fixed parallelism (the core count) and buffers.

    Deleting an endless iterator while its autotuner runs stalls at random for seconds; the
    training batches run no slower without it. Inference passes read their batches this way
    too: with autotuning on, a pass on a few cores ran slow at random.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def step_seeds(seed: int) -> tf.data.Dataset:
    """Endless stream of int64 (2,) stateless seeds ``(seed, step)``, one per batch."""
    return tf.data.Dataset.counter().map(lambda step: tf.stack([tf.constant(seed, tf.int64), step]))


def rotate_all4(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Every image in all four rotations, in the same batch (Gidaris et al.'s RotNet).

    Parameters
    ----------
    images : tf.Tensor
        (B, S, S, C), square.

    Returns
    -------
    rotated : tf.Tensor
        (4B, S, S, C): image i in rotation k sits at row ``4 * i + k``.
    labels : tf.Tensor
        int32 (4B,) in 0-3.
    """
    shape = tf.shape(images)
    rotated = _gather_pixels(images, _rotation_maps(shape[1]))  # (B, 4, S*S, C)
    labels = tf.tile(tf.range(4, dtype=tf.int32), [shape[0]])
    return tf.reshape(rotated, tf.concat([[-1], shape[1:]], 0)), labels


def rotate_random1(images: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Each image in one random rotation (the reference code's sampling).

    Parameters
    ----------
    images : tf.Tensor
        (B, S, S, C), square.
    seed : tf.Tensor
        int (2,) stateless seed.

    Returns
    -------
    rotated : tf.Tensor
        (B, S, S, C).
    labels : tf.Tensor
        int32 (B,) in 0-3.
    """
    shape = tf.shape(images)
    labels = tf.random.stateless_uniform(shape[:1], seed, 0, 4, dtype=tf.int32)
    maps = tf.gather(_rotation_maps(shape[1]), labels)  # (B, S*S): one turn per image
    return tf.reshape(_gather_pixels(images, maps, batch_dims=1), shape), labels


def _symmetry_maps(size: tf.Tensor, *, transpose: bool, vertical_flip: bool) -> tf.Tensor:
    """Pixel index maps of the flips and turns ``augment`` draws from.

    Returns
    -------
    tf.Tensor
        int32 (K, size * size), K in {2, 4, 8}: row k lists, for each output pixel in raster
        order, the input pixel it copies. Rows: identity and horizontal flip, then those
        combined with a vertical flip (``vertical_flip``), then all of these after a
        transpose (``transpose``); with both, the 8 symmetries of the square.
    """
    grid = tf.reshape(tf.range(size * size, dtype=tf.int32), [size, size])
    maps = []
    for turned in (grid, tf.transpose(grid)) if transpose else (grid,):
        for upright in (turned, tf.reverse(turned, [0])) if vertical_flip else (turned,):
            maps.extend([upright, tf.reverse(upright, [1])])
    return tf.reshape(tf.stack(maps), [len(maps), -1])


def augment(
    images: tf.Tensor,
    seed: tf.Tensor,
    *,
    zoom: float = 0.1,
    vertical_flip: bool = False,
    rot90: bool = False,
    colour: float = 0.1,
) -> tf.Tensor:
    """Random augmentation of a batch, seeded statelessly.

    The pretext must never be shown a change of orientation, so it uses the default
    (horizontal flips, centred zoom, brightness/contrast only); fine-tuning may add vertical
    flips and quarter turns, to which a DR grade is blind. Zoom is centred and pads with
    black, so a rotation-invariant mask stays rotation-invariant.

    The flips and turns are drawn as one element of the square's symmetry group, uniformly:
    a horizontal flip or not; with ``vertical_flip``, the 4 combinations of both flips; with
    ``rot90``, the 8 quarter turns and mirrored quarter turns. They only move pixels, so they
    run as one gather on the dtype given (uint8: a quarter of float32's memory traffic)
    before the cast.

    Parameters
    ----------
    images : tf.Tensor
        uint8 or float32 (B, S, S, 3) in [0, 255], square.
    seed : tf.Tensor
        int (2,) stateless seed.
    zoom : float
        Zoom factor range ``1 +- zoom``.
    vertical_flip, rot90 : bool
        Also flip top-bottom / turn by a random multiple of 90 degrees (and mirror).
    colour : float
        Brightness (fraction of 255) and contrast (fraction of 1) jitter.

    Returns
    -------
    tf.Tensor
        float32 (B, S, S, 3) in [0, 255].
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)  # symmetry, zoom, gain, shift
    shape = tf.shape(images)
    batch, size = shape[0], shape[1:3]
    maps = _symmetry_maps(shape[1], transpose=rot90, vertical_flip=vertical_flip or rot90)
    drawn = tf.random.stateless_uniform([batch], seeds[0], 0, tf.shape(maps)[0], dtype=tf.int32)
    images = tf.reshape(_gather_pixels(images, tf.gather(maps, drawn), batch_dims=1), shape)
    images = tf.cast(images, tf.float32)
    if zoom:
        half = 0.5 / tf.random.stateless_uniform([batch], seeds[1], 1 - zoom, 1 + zoom)
        boxes = tf.stack([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], axis=1)
        images = tf.image.crop_and_resize(images, boxes, tf.range(batch), size, extrapolation_value=0.0)
    if colour:
        inside = tf.cast(tf.reduce_max(images, axis=-1, keepdims=True) > 0, images.dtype)
        gain = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[2], 1 - colour, 1 + colour)
        shift = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[3], -colour, colour) * 255.0
        # Jitter only inside the fundus: a brighter black surround would reveal the mask. The
        # surround is exactly 0, so it stays 0 under the gain and, unshifted, under the clip.
        images = tf.clip_by_value(images * gain + shift * inside, 0.0, 255.0)
    return images


def shown_in_view(batch: tf.Tensor, view: int) -> tf.Tensor:
    """A batch (B, S, S, C) in ``view`` (0-7): mirrored left to right for 4-7, then turned
    ``view % 4`` quarter turns counter-clockwise."""
    return tf.image.rot90(tf.reverse(batch, axis=[2]) if view >= 4 else batch, k=view % 4)


def check_view(view) -> int:
    """``view`` if it names a symmetry of the square (an int 0-7, see :func:`labelled_batches`),
    else ValueError."""
    if not isinstance(view, (int, np.integer)) or view not in range(8):
        raise ValueError(f"view={view!r}: expected 0-3 (quarter turns) or 4-7 (mirrored, then turned)")
    return int(view)


def labelled_batches(
    images: tf.Tensor,
    indices: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    training: bool,
    augment_options: dict | None = None,
    view: int = 0,
) -> tf.data.Dataset:
    """Batches of (image, target) for fine-tuning or evaluation.

    Parameters
    ----------
    images : tf.Tensor
        uint8 (N, S, S, 3): every image of the dataset, in memory.
    indices : numpy.ndarray
        int (M,) rows of ``images`` to use.
    targets : numpy.ndarray
        float32 (M, T) targets for those rows.
    batch_size : int
    seed : int
        Shuffling and augmentation seed: the batches depend on it alone, not on
        TensorFlow's global seed (see :func:`shuffled_positions`).
    training : bool
        Shuffle, repeat forever, drop the last partial batch and augment; otherwise one
        ordered pass.
    view : int in 0..7
        Evaluation only: which symmetry of the square every image is shown in (test-time
        augmentation; drnb's mask is the same under all of them). 0-3: turned anticlockwise
        by ``90 * view`` degrees; 4-7: mirrored left to right, then turned by ``view - 4``
        quarter turns.

    Returns
    -------
    tf.data.Dataset
        of (float32 (B, S, S, 3) in [0, 255], float32 (B, T)).
    """
    view = check_view(view)
    if training and view:
        raise ValueError(f"view={view}: for evaluation only; training batches are augmented at random")
    indices = np.asarray(indices, np.int64)
    targets = np.asarray(targets, np.float32)
    if training:
        dataset = shuffled_positions(len(indices), seed, batch_size).map(
            lambda positions: (tf.gather(indices, positions), tf.gather(targets, positions))
        )
    else:
        dataset = tf.data.Dataset.from_tensor_slices((indices, targets)).batch(batch_size)
    options = augment_options or {}

    if training:
        seeds = step_seeds(seed)
        # augment casts to float32 itself, after the flips and turns done on uint8.
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda batch, step_seed: (augment(tf.gather(images, batch[0]), step_seed, **options), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        def shown(batch_indices):
            return shown_in_view(tf.gather(images, batch_indices), view)

        dataset = dataset.map(
            lambda batch_indices, batch_targets: (tf.cast(shown(batch_indices), tf.float32), batch_targets),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def rotation_batches(
    images: tf.Tensor,
    indices: np.ndarray,
    batch_size: int,
    *,
    mode: str = "all4",
    seed: int = 0,
    training: bool = True,
    augment_options: dict | None = None,
) -> tf.data.Dataset:
    """Batches of (rotated image, rotation label) for the pretext.

    Parameters
    ----------
    images : tf.Tensor
        uint8 (N, S, S, 3).
    indices : numpy.ndarray
        int (M,) rows to use.
    batch_size : int
        Rotated images per batch; in ``all4`` mode a multiple of 4 (``batch_size // 4``
        source images each appear four times).
    mode : {"all4", "random1"}
    training : bool
        Shuffle, repeat and augment (before rotating); otherwise one ordered pass with every
        image in all four rotations, whatever the mode, so held-out accuracy is exact.

    Returns
    -------
    tf.data.Dataset
        of (float32 (B, S, S, 3) in [0, 255], int32 (B,) in 0-3).
    """
    if mode not in ROTATION_MODES:
        raise ValueError(f"rotation mode={mode!r}: expected one of {ROTATION_MODES}")
    if mode == "all4" and batch_size % 4:
        raise ValueError(f"batch_size={batch_size}: the 'all4' rotation mode needs a multiple of 4")
    if (augment_options or {}).get("vertical_flip") or (augment_options or {}).get("rot90"):
        raise ValueError("the rotation pretext cannot use vertical_flip or rot90 augmentation: they change orientation")
    sources_per_batch = batch_size // 4 if (mode == "all4" or not training) else batch_size
    indices = np.asarray(indices, np.int64)
    if training:
        dataset = shuffled_positions(len(indices), seed, max(sources_per_batch, 1)).map(
            lambda positions: tf.gather(indices, positions)
        )
    else:
        dataset = tf.data.Dataset.from_tensor_slices(indices).batch(max(sources_per_batch, 1))
    seeds = step_seeds(seed)
    options = augment_options or {}

    def make_batch(batch_indices, step_seed):
        batch = tf.gather(images, batch_indices)
        if not training:
            rotated, labels = rotate_all4(batch)  # on uint8: the gather moves a quarter of float32's bytes
            return tf.cast(rotated, tf.float32), labels
        augment_seed, rotation_seed = tf.unstack(tf.random.experimental.stateless_split(step_seed, 2))
        batch = augment(batch, augment_seed, **options)
        return rotate_all4(batch) if mode == "all4" else rotate_random1(batch, rotation_seed)

    dataset = tf.data.Dataset.zip((dataset, seeds)).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# How far apart the contrastive pretext's two views of a photograph are drawn: a square crop
# whose side is this share of the image's (anywhere inside it), then every symmetry of the
# square and brightness, contrast and saturation jitter of this size. A grade is blind to all
# of them, so features that ignore them keep what grading needs; crops stay large so that both
# views still show the same lesions (smaller ones learned less on synthetic photographs).
CONTRASTIVE_CROP_SIDE = (0.8, 1.0)
CONTRASTIVE_COLOUR = 0.3


def contrastive_view(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One random view of every photograph of a batch, for the contrastive pretext.

    Parameters
    ----------
    images : tf.Tensor
        uint8 (B, S, S, 3), square.
    seed : tf.Tensor
        int (2,) stateless seed.

    Returns
    -------
    tf.Tensor
        float32 (B, S, S, 3) in [0, 255].
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)  # symmetry and colour, crop side, crop place, saturation
    shape = tf.shape(images)
    batch = shape[0]
    views = augment(images, seeds[0], zoom=0.0, rot90=True, colour=CONTRASTIVE_COLOUR)
    low, high = CONTRASTIVE_CROP_SIDE
    side = tf.random.stateless_uniform([batch, 1], seeds[1], low, high)
    corner = tf.random.stateless_uniform([batch, 2], seeds[2], 0.0, 1.0) * (1.0 - side)
    boxes = tf.concat([corner, corner + side], axis=1)  # (y1, x1, y2, x2)
    views = tf.image.crop_and_resize(views, boxes, tf.range(batch), shape[1:3])
    grey = tf.reduce_mean(views, axis=-1, keepdims=True)
    saturation = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[3], 1 - CONTRASTIVE_COLOUR, 1 + CONTRASTIVE_COLOUR)
    return tf.clip_by_value(grey + saturation * (views - grey), 0.0, 255.0)


def contrastive_batches(
    images: tf.Tensor, indices: np.ndarray, batch_size: int, *, seed: int = 0, training: bool = True
) -> tf.data.Dataset:
    """Batches of two views of each photograph for the contrastive pretext.

    Parameters
    ----------
    images : tf.Tensor
        uint8 (N, S, S, 3).
    indices : numpy.ndarray
        int (M,) rows to use.
    batch_size : int
        Views per batch, even: ``batch_size // 2`` photographs, each twice.
    training : bool
        Shuffle and repeat forever; otherwise one ordered pass (the last batch may be
        smaller). Views are drawn from ``seed`` either way, so a held-out pass is the same
        every time it is scored.

    Returns
    -------
    tf.data.Dataset
        of (float32 (B, S, S, 3) in [0, 255], int32 (B,) zeros): rows ``2i`` and ``2i + 1``
        are the two views of one photograph.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size={batch_size}: the contrastive pretext needs an even number of views, at least 2")
    indices = np.asarray(indices, np.int64)
    pairs = batch_size // 2
    if training:
        dataset = shuffled_positions(len(indices), seed, pairs).map(lambda positions: tf.gather(indices, positions))
    else:
        dataset = tf.data.Dataset.from_tensor_slices(indices).batch(pairs)

    def make_batch(batch_indices, step_seed):
        batch = tf.gather(images, batch_indices)
        first, second = tf.unstack(tf.random.experimental.stateless_split(step_seed, 2))
        views = tf.stack([contrastive_view(batch, first), contrastive_view(batch, second)], axis=1)  # (P, 2, S, S, 3)
        views = tf.reshape(views, tf.concat([[-1], tf.shape(batch)[1:]], 0))
        return views, tf.zeros(tf.shape(views)[:1], tf.int32)

    dataset = tf.data.Dataset.zip((dataset, step_seeds(seed))).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
