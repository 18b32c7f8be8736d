"""The training engine shared by the pretext and fine-tuning: traced once, reused many times.

Tracing a Keras model's training graph is the largest fixed cost on a CPU, paid at the first
``fit`` and again after every ``compile``. Freezing an encoder the
Keras way (``trainable = False`` then ``compile``) pays it again at every warm-up -> unfreeze
switch, and a new model per repetition pays it again per repetition. :class:`Trainer`
instead traces two ``tf.function`` steps per model shape, once per process:

- ``head`` step: encoder called in inference mode (batch norm uses its moving statistics and
  is not updated), gradients for the head only;
- ``full`` step: everything trains; batch norm normalises each batch by its own statistics
  and updates its moving ones (``batchnorm="batch"``, Keras's ``fit``), or keeps normalising
  by the moving statistics it starts with (``batchnorm="frozen"``), so a head fitted on the
  frozen encoder's features meets the same features at the first step.

Between runs, :meth:`Trainer.reset` assigns new weights and restores the optimizers'
variables (step counter, moments, learning rate) to their starting values; nothing is
retraced. It runs under any ``tf.distribute`` strategy (see :mod:`drnb.distribute`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from drnb.models import leaf_layers, stack
from drnb.pipeline import without_autotune

logger = logging.getLogger(__name__)

# Keras's names for them (drnb.targets.TARGET_LOSSES gives a fine-tuning target's).
LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mean_squared_error", "nt_xent")
# Temperature of the contrastive loss: similarities are cosines in [-1, 1], divided by it.
CONTRASTIVE_TEMPERATURE = 0.2
PHASES = ("head", "full")
# How batch norm behaves while everything trains (see Trainer).
BATCHNORM_MODES = ("batch", "frozen")


def cosine_rate(position: float, length: float, base_rate: float) -> float:
    """``base_rate * (1 + cos(pi * position / length)) / 2``: ``base_rate`` at 0, towards 0 at ``length``.

    Parameters
    ----------
    position : float
        Steps or epochs done, in ``[0, length)``.
    length : float
        Steps or epochs of the whole schedule, > 0.
    base_rate : float
        The rate at the start.
    """
    if not 0 <= position < length:
        raise ValueError(f"position={position!r}: expected a value in [0, {length!r})")
    return base_rate * 0.5 * (1 + math.cos(math.pi * position / length))


@dataclass
class StepLog:
    """What :meth:`Trainer.train` measured: mean loss per logging interval, images/s, seconds."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


class Trainer:
    """An encoder + head with traced train and predict steps that survive weight resets.

    Parameters
    ----------
    encoder, head : keras.Model
        Built inside ``strategy.scope()``.
    loss : {"sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mean_squared_error", "nt_xent"}
        Cross-entropy on integer labels, on one-hot/soft targets, or of independent sigmoids
        (mean over outputs), or the squared error of unbounded outputs (mean over outputs),
        per example; or ``"nt_xent"``, the contrastive loss of :func:`nt_xent` (targets unused).
    learning_rate : float
    strategy : tf.distribute.Strategy, optional
        Default: the current (default) strategy.
    batchnorm : {"batch", "frozen"}
        How batch norm behaves in the ``full`` step: each batch's statistics (and the moving
        ones updated), or the moving statistics, never updated.
    """

    def __init__(self, encoder, head, *, loss: str, learning_rate: float, strategy=None, batchnorm: str = "batch"):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm={batchnorm!r}: expected one of {BATCHNORM_MODES}")
        self.batchnorm = batchnorm
        self.strategy = strategy or tf.distribute.get_strategy()
        self.encoder, self.head = encoder, head
        self.loss_name = loss
        with self.strategy.scope():
            self.model = stack(encoder, head)
            self.optimizers = {
                "head": adam_for(self.model, learning_rate),
                "full": adam_for(self.model, learning_rate),
            }
            self.optimizers["head"].build(head.trainable_variables)
            self.optimizers["full"].build(self.model.trainable_variables)
        self._optimizer_start = {
            name: [variable.numpy() for variable in optimizer.variables] for name, optimizer in self.optimizers.items()
        }
        self._steps = {}
        self._predict = None
        self._encode = None

    def _per_example_loss(self, targets, probabilities):
        if self.loss_name == "nt_xent":
            return nt_xent(probabilities)
        if self.loss_name == "mean_squared_error":
            return tf.reduce_mean(tf.square(targets - probabilities), axis=-1)
        epsilon = keras.backend.epsilon()
        probabilities = tf.clip_by_value(probabilities, epsilon, 1 - epsilon)
        if self.loss_name == "sparse_categorical_crossentropy":
            picked = tf.gather(probabilities, tf.cast(targets, tf.int32), axis=1, batch_dims=1)
            return -tf.math.log(picked)
        if self.loss_name == "categorical_crossentropy":
            return -tf.reduce_sum(targets * tf.math.log(probabilities), axis=-1)
        binary = targets * tf.math.log(probabilities) + (1 - targets) * tf.math.log(1 - probabilities)
        return -tf.reduce_mean(binary, axis=-1)

    def _optimizer(self, phase: str):
        """The optimizer ``phase`` trains with: the full one, or the head's."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: expected one of {PHASES}")
        return self.optimizers[phase]

    def _step(self, phase: str):
        if phase in self._steps:
            return self._steps[phase]
        optimizer = self._optimizer(phase)
        variables = self.model.trainable_variables if phase == "full" else self.head.trainable_variables

        def replica_step(inputs, targets):
            with tf.GradientTape() as tape:
                if phase == "head" or (phase == "full" and self.batchnorm == "frozen"):
                    # Inference mode in the encoder: its batch norm uses the moving statistics.
                    probabilities = self.head(self.encoder(inputs, training=False), training=True)
                else:
                    probabilities = self.model(inputs, training=True)
                per_example = self._per_example_loss(targets, probabilities)
                loss = tf.nn.compute_average_loss(per_example)
                scaled = optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            return loss

        @tf.function
        def step(images, targets):
            per_replica = self.strategy.run(replica_step, args=(images, targets))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self._steps[phase] = step
        return step

    def reset(
        self, *, encoder_weights=None, head_weights=None, learning_rate: float | None = None, seed: int | None = None
    ) -> None:
        """Assign weights (lists as from ``get_weights``) and restart both optimizers.

        ``seed`` also restarts every dropout layer's random stream, so the same seed gives
        the same run. Nothing is retraced: the variables keep their identity, only their
        values change.
        """
        if encoder_weights is not None:
            self.encoder.set_weights(encoder_weights)
        if head_weights is not None:
            self.head.set_weights(head_weights)
        for name, optimizer in self.optimizers.items():
            for variable, start in zip(optimizer.variables, self._optimizer_start[name]):
                variable.assign(start)
            if learning_rate is not None:
                optimizer.learning_rate.assign(learning_rate)
        if seed is not None:
            for index, generator in enumerate(_seed_generators(self.model)):
                generator.state.assign(np.array([seed, index], dtype=generator.state.dtype))

    def set_learning_rate(self, learning_rate: float, *, phase: str = "full") -> None:
        """Change the learning rate of the optimizer that ``phase`` uses (nothing is retraced)."""
        optimizer = self._optimizer(phase)
        if not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r}: expected a positive rate")
        optimizer.learning_rate.assign(learning_rate)

    def batches(self, dataset: tf.data.Dataset):
        """An iterator over ``dataset`` distributed for this trainer's strategy.

        Keep it across :meth:`train` calls: a new iterator restarts the dataset's seeded
        shuffle and augmentation from the beginning.

        The dataset's autotuning is switched off (:func:`drnb.pipeline.without_autotune`):
        deleting an endless iterator whose autotuner is running stalls at random.
        """
        return iter(self.strategy.experimental_distribute_dataset(without_autotune(dataset)))

    def train(self, batches, steps: int, *, phase: str = "full", log_every: int = 0, rate_at=None) -> StepLog:
        """Run ``steps`` optimizer steps on batches from the iterator ``batches`` (see :meth:`batches`).

        Parameters
        ----------
        phase : {"head", "full"}
            Train the head on a frozen encoder, or everything.
        log_every : int
            Record the mean loss every this many steps (0: once, at the end).
        rate_at : callable, optional
            ``rate_at(i)`` is the learning rate of this call's step ``i`` (0-based), set
            before the step (a variable assignment: nothing is retraced). Without it the
            rate stays as it is.
        """
        step = self._step(phase)  # raises ValueError for an unknown phase
        log = StepLog()
        interval = log_every or steps
        running, count, images_seen = 0.0, 0, 0
        start = time.perf_counter()
        for index in range(steps):
            if rate_at is not None:
                self.set_learning_rate(rate_at(index), phase=phase)
            images, targets = next(batches)
            running += float(step(images, targets))
            count += 1
            log.steps += 1
            images_seen += _batch_size(images)
            if count == interval or log.steps == steps:
                log.losses.append(running / count)
                running, count = 0.0, 0
        log.seconds = time.perf_counter() - start
        log.images_per_second = images_seen / max(log.seconds, 1e-9)
        return log

    def encode(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Encoder features (inference mode) for every batch of ``dataset`` (images, anything): float32 (N, F).

        It reads ``dataset`` with tf.data's autotuning off
        (:func:`drnb.pipeline.without_autotune`): with it, a pass on a few cores ran slow at random.
        """
        if self._encode is None:
            self._encode = tf.function(lambda images: self.encoder(images, training=False), reduce_retracing=True)
        batches = without_autotune(dataset)
        return np.concatenate([self._encode(images).numpy() for images, _ in batches], axis=0).astype(np.float32)

    def head_outputs(self, features: np.ndarray) -> np.ndarray:
        """The head's outputs (inference mode) for encoder features float32 (N, F): float32 (N, outputs)."""
        return np.asarray(self.head(np.asarray(features, np.float32), training=False), dtype=np.float32)

    def predict(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Probabilities for every batch of ``dataset`` (images, anything), in order: float32 (N, outputs).

        Reads ``dataset`` with tf.data's autotuning off, as :meth:`encode` does (and why).
        """
        if self._predict is None:
            self._predict = tf.function(
                lambda images: self.model(images, training=False), reduce_retracing=True
            )
        return np.concatenate([self._predict(images).numpy() for images, _ in without_autotune(dataset)], axis=0)


def nt_xent(projections: tf.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> tf.Tensor:
    """The normalised-temperature cross-entropy of SimCLR (Chen et al., 2020), per view.

    Each view must pick out its partner, the other view of the same photograph, among every
    other view of the batch: the cross-entropy of its partner under a softmax over cosine
    similarities divided by ``temperature``.

    Parameters
    ----------
    projections : tf.Tensor
        (2B, D): views ``2i`` and ``2i + 1`` are the two views of photograph ``i``.

    Returns
    -------
    tf.Tensor
        float32 (2B,), each >= 0; log(2B - 1) when the projections tell nothing apart.
    """
    unit = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=1)
    count = tf.shape(unit)[0]
    logits = tf.matmul(unit, unit, transpose_b=True) / temperature
    logits -= 1e9 * tf.eye(count)  # a view is never its own partner
    partners = tf.bitwise.bitwise_xor(tf.range(count), 1)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=partners, logits=logits)


def adam_for(model, learning_rate: float):
    """Adam for ``model``, wrapped in dynamic loss scaling when any of its layers computes in float16.

    Under the ``mixed_float16`` policy (drnb's default on a GPU) small gradients underflow in
    float16. ``Model.compile`` adds the loss scaling itself; a custom loop such as
    :class:`Trainer` must: :class:`keras.optimizers.LossScaleOptimizer` multiplies the loss
    before the gradients (``scale_loss``), divides them again, and skips a step whose gradients
    overflowed, halving the scale.
    """
    optimizer = keras.optimizers.Adam(learning_rate)
    if any(getattr(layer, "compute_dtype", None) == "float16" for layer in leaf_layers(model)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _seed_generators(model) -> list:
    """The random-stream generators of ``model``'s layers (dropout), nested models included."""
    return [layer.seed_generator for layer in leaf_layers(model) if getattr(layer, "seed_generator", None) is not None]


def _batch_size(images) -> int:
    if hasattr(images, "values"):  # PerReplica under a multi-device strategy
        return int(sum(value.shape[0] for value in images.values))
    return int(images.shape[0])
