"""The rotation pretext (Gidaris et al., 2018; the study's task): which quarter turn was applied?

To say which way is up, an encoder has to find what has a place in a fundus: the optic disc
to one side, the macula, the vessel arcades. Each photograph is shown in all four quarter
turns in one batch (``rotation_mode="all4"``, RotNet) or in one drawn turn
(``"random1"``, the reference code), and a softmax head names the turn.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from drnb.models import rotation_head
from drnb.pipeline import rotation_batches
from drnb.pretexts.base import PretextTask
from drnb.training import Trainer


def rotated_copies(profile) -> int:
    """Rotated copies of each pretext image in one pass: 4 with ``rotation_mode="all4"``
    (every quarter turn), 1 with ``"random1"`` (one drawn turn)."""
    return 4 if profile.rotation_mode == "all4" else 1


def training_batches(images: tf.Tensor, indices: np.ndarray, batch_size: int, profile, seed: int) -> tf.data.Dataset:
    """Endless batches of (rotated image, rotation label 0-3) in the profile's ``rotation_mode``."""
    return rotation_batches(images, indices, batch_size, mode=profile.rotation_mode, seed=seed)


def rotation_accuracy(trainer: Trainer, images: tf.Tensor, indices: np.ndarray, batch_size: int, seed: int = 0) -> tuple[float, np.ndarray]:
    """Accuracy and 4x4 confusion matrix (true x predicted turn) of rotation predictions,
    every image in all four rotations (``seed`` is unused: nothing is drawn)."""
    dataset = rotation_batches(images, indices, batch_size, mode="all4", training=False)
    probabilities = trainer.predict(dataset)
    labels = np.tile(np.arange(4), len(indices))
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return float((predicted == labels).mean()), confusion


TASK = PretextTask(
    name="rotation",
    loss="sparse_categorical_crossentropy",
    score_name="heldout_rotation_accuracy",
    score_meaning="the share of held-out photographs' quarter turns named right, each photograph in all four (guessing: 0.25)",
    views_per_image=rotated_copies,
    scored_views_per_image=4,
    head=rotation_head,
    batches=training_batches,
    score=rotation_accuracy,
    class_names=("0", "90", "180", "270"),
    facts=lambda profile: {"rotation_mode": profile.rotation_mode},
)
