"""The contrastive pretext (SimCLR, Chen et al., 2020): which two views show the same photograph?

Each photograph is shown twice in a batch, each time cropped, turned or mirrored and
re-coloured at random (:func:`drnb.pipeline.contrastive_view`); a projection head maps the
encoder's features to vectors, and the loss (:func:`drnb.training.nt_xent`) asks each view to
pick out its partner among every other view of the batch. To do it the encoder must describe
what a photograph shows (its vessels, its disc, its lesions) in a way that survives changes a
grade is blind to, rather than which way is up, which a fundus barely encodes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from drnb.models import projection_head
from drnb.pipeline import contrastive_batches
from drnb.pretexts.base import PretextTask
from drnb.training import Trainer


def two_views(profile) -> int:
    """Views of each photograph in one pass: two, a positive pair."""
    return 2


def training_batches(images: tf.Tensor, indices: np.ndarray, batch_size: int, profile, seed: int) -> tf.data.Dataset:
    """Endless batches of ``batch_size`` views, two of each of ``batch_size // 2`` photographs."""
    return contrastive_batches(images, indices, batch_size, seed=seed)


def pair_accuracy(trainer: Trainer, images: tf.Tensor, indices: np.ndarray, batch_size: int, seed: int = 0) -> tuple[float, None]:
    """The share of held-out views whose most similar view in their batch is their partner.

    Views are drawn from ``seed`` (the same every time the score is taken) in batches of
    ``batch_size`` views, as in training; similarity is the cosine of the projections.
    Guessing scores ``1 / (batch_size - 1)`` in a full batch; a last batch of one photograph,
    whose views can only find each other, is left out unless it is the only one.
    """
    projections = trainer.predict(contrastive_batches(images, indices, batch_size, seed=seed, training=False))
    found = []
    for start in range(0, len(projections), batch_size):
        block = projections[start : start + batch_size]
        if len(block) < 4 and start:
            continue
        unit = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        found.append(similarity.argmax(axis=1) == (np.arange(len(block)) ^ 1))
    return float(np.concatenate(found).mean()), None


TASK = PretextTask(
    name="contrastive",
    loss="nt_xent",
    score_name="heldout_pair_accuracy",
    score_meaning=(
        "the share of held-out views whose most similar view in their batch is the other view of the same "
        "photograph (guessing: 1 / (views per batch - 1))"
    ),
    views_per_image=two_views,
    scored_views_per_image=2,
    head=projection_head,
    batches=training_batches,
    score=pair_accuracy,
)
