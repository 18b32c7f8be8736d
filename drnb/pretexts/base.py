"""What a pretext task is to drnb's pretext loop (:func:`drnb.pretext.train_pretext`).

A task is one module that defines a :class:`PretextTask`: how it turns unlabelled
photographs into training batches, the head and loss it trains the encoder with, and how
it scores photographs held out of training. The loop, the held-out split, the files and
the encoder that fine-tuning starts from are the same for every task, so a new task is one
more module registered in :data:`drnb.pretexts.PRETEXT_TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from drnb.profiles import Profile
    from drnb.training import Trainer


@dataclass(frozen=True)
class PretextTask:
    """One self-supervised pretext task.

    Attributes
    ----------
    name : str
        The fine-tuning method whose encoder it trains (``"rotation"``, ``"contrastive"``).
    loss : str
        A :data:`drnb.training.LOSSES` name, applied to the head's outputs.
    score_name : str
        The held-out score's column in ``history.csv`` and key in ``metrics.json``.
    score_meaning : str
        One sentence: what the score counts, and what guessing scores.
    views_per_image : callable
        ``(profile) -> int``: training views of each photograph in one pass.
    scored_views_per_image : int
        Views of each held-out photograph that :attr:`score` passes through the network.
    head : callable
        ``(feature_dim, profile) -> keras.Model`` read on the encoder's features.
    batches : callable
        ``(images, indices, batch_size, profile, seed) -> tf.data.Dataset`` of endless
        (float32 (B, S, S, 3) in [0, 255], targets) training batches of ``indices``' rows.
    score : callable
        ``(trainer, images, indices, batch_size, seed) -> (score, confusion or None)``: the
        held-out score in [0, 1] on ``indices``' rows, and a confusion matrix where the task
        has classes.
    class_names : tuple of str
        The classes of the confusion matrix (``confusion.csv``); () for a task without classes.
    facts : callable
        ``(profile) -> dict``: the task's own settings, recorded in ``metrics.json``.
    """

    name: str
    loss: str
    score_name: str
    score_meaning: str
    views_per_image: Callable[[Profile], int]
    scored_views_per_image: int
    head: Callable[[int, Profile], keras.Model]
    batches: Callable[..., tf.data.Dataset]
    score: Callable[[Trainer, tf.Tensor, np.ndarray, int, int], tuple[float, np.ndarray | None]]
    class_names: tuple[str, ...] = ()
    facts: Callable[[Profile], dict] = lambda profile: {}
