"""Devices: ``tf.distribute`` strategy, mixed precision, seeds.

When one machine is not enough, drnb scales with TensorFlow's own strategies rather than a
scheduler of its own:

- several machines (``TF_CONFIG`` names more than one worker):
  ``MultiWorkerMirroredStrategy``; start the same command on every worker with its own
  ``TF_CONFIG``;
- several GPUs on this machine: ``MirroredStrategy``;
- otherwise the default strategy (one GPU or the CPU).

Batch sizes in a profile are per replica, as in the study (32 per GPU); the global batch is
``batch_size * replicas`` and the learning rate is scaled by the same factor (the linear
scaling rule), so one GPU reproduces the study's exact numbers.
"""

from __future__ import annotations

import json
import logging
import os
import random

import keras
import numpy as np
import tensorflow as tf

from drnb.models import precision_policy

logger = logging.getLogger(__name__)


def select_strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """The strategy for this process: multi-worker, multi-GPU or default (see module docstring).

    Parameters
    ----------
    devices : list of str, optional
        Force a ``MirroredStrategy`` over these devices (e.g. ``["/cpu:0"]`` in tests).
    """
    if devices:
        return tf.distribute.MirroredStrategy(devices)
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if sum(len(tasks) for tasks in cluster.values()) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def scaled_batch_and_rate(batch_size: int, learning_rate: float, strategy: tf.distribute.Strategy) -> tuple[int, float]:
    """Global batch and learning rate for ``strategy``: both times the replica count."""
    replicas = strategy.num_replicas_in_sync
    return batch_size * replicas, learning_rate * replicas


def configure_precision(mode: str) -> str:
    """Set Keras's global dtype policy: ``"on"``, ``"off"`` or ``"auto"`` (on when a GPU is visible).

    Returns the policy name set (``"mixed_float16"`` or ``"float32"``). Output layers stay in
    float32 (see :func:`drnb.models.build_head`).
    """
    policy = precision_policy(mode, accelerator=bool(tf.config.list_physical_devices("GPU")))
    keras.mixed_precision.set_global_policy(policy)
    return policy


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow (``keras.utils.set_random_seed``); optionally make ops deterministic.

    Call it once per process: ``tf.random.set_seed`` clears TensorFlow's kernel cache, so the
    next step of every traced model is instantiated again. Between runs
    use :func:`seed_weights`.
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def seed_weights(seed: int) -> None:
    """Seed what initial weights are drawn from (Python's ``random`` and NumPy), nothing else.

    Keras initializers and dropout layers take their seeds from Python's ``random`` when they
    are built; drnb's batches and augmentation are stateless ops keyed by their own seeds
    (:func:`drnb.pipeline.shuffled_positions`), so a run needs no TensorFlow global seed and
    its numbers do not depend on the runs before it.
    """
    random.seed(int(seed))
    np.random.seed(int(seed))


def describe_devices() -> str:
    """One line naming the devices TensorFlow sees, for logs and result files."""
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return ", ".join(names) if names else f"CPU ({os.cpu_count()} cores)"
