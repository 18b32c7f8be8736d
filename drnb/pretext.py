"""The rotation pretext: learn which quarter turn was applied to an unlabelled image.

The pretext sees images only, never grades, so it uses every image of the dataset (test
folds included), as self-supervised pre-training on the unlabelled pool does; a held-out
share (whole patients and near-duplicate groups, given the dataset table) measures rotation
accuracy on images the encoder never trained on.

Writes into ``out_dir``: ``encoder.keras`` (the encoder alone, for fine-tuning),
``history.csv`` (loss, held-out rotation accuracy and learning rate per epoch; the accuracy
is empty between the epochs it is scored at, every ``pretext_eval_every``), ``metrics.json``
and ``confusion.csv`` (held-out true rotation x predicted rotation, after the last epoch).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from drnb.distribute import configure_precision, scaled_batch_and_rate, seed_everything, select_strategy
from drnb.duplicates import photograph_groups
from drnb.files import atomic_path, write_json
from drnb.models import profile_encoder, rotation_head
from drnb.pipeline import rotation_batches
from drnb.splits import split_holdout
from drnb.training import Trainer

if TYPE_CHECKING:
    from drnb.profiles import Profile

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.keras"
# Share of the images (whole patients and duplicate groups) held out to score rotation accuracy.
HOLDOUT_FRACTION = 0.1


def rotated_copies(profile: Profile) -> int:
    """Rotated copies of each pretext image in one pass: 4 with ``rotation_mode="all4"``
    (every quarter turn), 1 with ``"random1"`` (one drawn turn)."""
    return 4 if profile.rotation_mode == "all4" else 1


def planned_epochs(profile: Profile, rotated_per_epoch: int) -> int:
    """The pretext's passes: ``pretext_epochs``, or more for a small set, so that it shows at
    least ``pretext_min_steps`` batches of ``pretext_batch_size`` rotated images.

    What the pretext needs is a number of gradient steps, not of passes. The floor counts
    batches of one replica's batch size, so it asks for the same images on any number of
    replicas.

    Parameters
    ----------
    rotated_per_epoch : int
        Rotated images in one pass: the pretext images times :func:`rotated_copies`.
    """
    if rotated_per_epoch < 1:
        raise ValueError(f"rotated_per_epoch={rotated_per_epoch!r}: expected a positive number of images")
    floor = math.ceil(profile.pretext_min_steps * profile.pretext_batch_size / rotated_per_epoch)
    return max(profile.pretext_epochs, floor)


@dataclass
class PretextResult:
    """What :func:`train_pretext` produced: paths and held-out rotation accuracy."""

    encoder_path: Path
    history: pd.DataFrame
    heldout_accuracy: float
    confusion: np.ndarray  # int (4, 4): true rotation x predicted rotation
    heldout_indices: np.ndarray  # int64: rows of ``images`` held out (the accuracy's images)
    seconds: float
    images_per_second: float


def rotation_accuracy(trainer: Trainer, images: tf.Tensor, indices: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """Accuracy and 4x4 confusion matrix of rotation predictions, every image in all four rotations."""
    dataset = rotation_batches(images, indices, batch_size, mode="all4", training=False)
    probabilities = trainer.predict(dataset)
    labels = np.tile(np.arange(4), len(indices))
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return float((predicted == labels).mean()), confusion


def build_pretext_trainer(profile: Profile, strategy=None) -> Trainer:
    """Encoder + rotation head of ``profile``, inside ``strategy``'s scope."""
    strategy = strategy or select_strategy()
    configure_precision(profile.mixed_precision)
    _, learning_rate = scaled_batch_and_rate(profile.pretext_batch_size, profile.pretext_learning_rate, strategy)
    with strategy.scope():
        encoder = profile_encoder(profile)
        head = rotation_head(encoder.output_shape[-1], profile)
    return Trainer(encoder, head, loss="sparse_categorical_crossentropy", learning_rate=learning_rate, strategy=strategy)


def train_pretext(
    images: np.ndarray,
    profile: Profile,
    out_dir: str | os.PathLike,
    *,
    table=None,
    strategy=None,
    log=print,
) -> PretextResult:
    """Train the rotation pretext and save the encoder.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed, ``S == profile.image_size``.
    profile : Profile
        Uses the ``encoder``, ``feature_stages``, ``rotation_mode``, ``duplicate_threshold``
        and ``pretext_*`` settings.
    out_dir : path
        Created if needed; see the module docstring for what is written.
    table : pandas.DataFrame, optional
        The dataset table, row-aligned with ``images`` (``image_id``, ``patient_id``). With
        it, a patient's eyes and near-duplicate photographs are held out together
        (:func:`drnb.duplicates.photograph_groups`), so the held-out accuracy is not helped
        by a twin in training (a left eye flipped looks much like the right one). Without
        it, images are held out one by one.
    log : callable
        Receives one progress line per epoch.

    Returns
    -------
    PretextResult
    """
    if images.ndim != 4 or images.shape[1:] != (profile.image_size, profile.image_size, 3):
        raise ValueError(
            f"images have shape {images.shape}; expected (N, {profile.image_size}, {profile.image_size}, 3) "
            "as set by the profile's image_size"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(profile.seed, profile.deterministic)
    trainer = build_pretext_trainer(profile, strategy)
    batch_size, _ = scaled_batch_and_rate(profile.pretext_batch_size, profile.pretext_learning_rate, trainer.strategy)
    groups = None if table is None else photograph_groups(images, table, profile.duplicate_threshold)[0]
    train_indices, holdout_indices = split_holdout(len(images), HOLDOUT_FRACTION, profile.seed, groups)
    if len(holdout_indices) == 0:
        holdout_indices = train_indices[: min(len(train_indices), 64)]
        log("pretext: too few images to hold any out; rotation accuracy is on training images")
    image_tensor = tf.constant(images)
    rotated_per_epoch = len(train_indices) * rotated_copies(profile)
    steps_per_epoch = max(1, math.ceil(rotated_per_epoch / batch_size))
    epochs = planned_epochs(profile, rotated_per_epoch)
    if epochs > profile.pretext_epochs:
        log(
            f"pretext: {epochs} epochs instead of {profile.pretext_epochs}, to show at least pretext_min_steps="
            f"{profile.pretext_min_steps} batches of {profile.pretext_batch_size} rotated images ({rotated_per_epoch} per epoch)"
        )
    dataset = rotation_batches(
        image_tensor,
        train_indices,
        batch_size,
        mode=profile.rotation_mode,
        seed=profile.seed,
    )
    rows = []
    start = time.perf_counter()
    train_seconds, images_trained = 0.0, 0
    batches = trainer.batches(dataset)  # one iterator for all epochs: shuffling continues across epochs
    for epoch in range(1, epochs + 1):
        step_log = trainer.train(batches, steps_per_epoch, phase="full")
        train_seconds += step_log.seconds
        images_trained += step_log.steps * batch_size
        scored = epoch % profile.pretext_eval_every == 0 or epoch == epochs
        if scored:
            accuracy, confusion = rotation_accuracy(trainer, image_tensor, holdout_indices, batch_size)
        rows.append(
            {
                "epoch": epoch,
                "loss": step_log.losses[-1],
                "heldout_rotation_accuracy": accuracy if scored else float("nan"),
                "learning_rate": float(trainer.optimizers["full"].learning_rate.numpy()),  # at the epoch's last step
                "images_per_second": step_log.images_per_second,
                "elapsed_seconds": time.perf_counter() - start,
            }
        )
        scores = f", held-out rotation accuracy {accuracy:.3f}" if scored else ""
        log(
            f"pretext epoch {epoch}/{epochs}: loss {step_log.losses[-1]:.4f}{scores}, "
            f"{step_log.images_per_second:.0f} img/s, {time.perf_counter() - start:.0f} s"
        )
    history = pd.DataFrame(rows)
    result = PretextResult(
        encoder_path=out_dir / ENCODER_FILE,
        history=history,
        heldout_accuracy=accuracy,
        confusion=confusion,
        heldout_indices=holdout_indices,
        seconds=time.perf_counter() - start,
        images_per_second=images_trained / max(train_seconds, 1e-9),
    )
    history.to_csv(out_dir / "history.csv", index=False)
    labels = [f"{k * 90}" for k in range(4)]
    pd.DataFrame(confusion, index=[f"true_{k}" for k in labels], columns=[f"pred_{k}" for k in labels]).to_csv(
        out_dir / "confusion.csv"
    )
    write_json(
        out_dir / "metrics.json",
        {
            "heldout_rotation_accuracy": accuracy,
            "heldout_images": int(len(holdout_indices)),
            "heldout_grouped": groups is not None,
            "train_images": int(len(train_indices)),
            "epochs": epochs,
            "rotation_mode": profile.rotation_mode,
            "seconds": result.seconds,
            "images_per_second": result.images_per_second,
        },
    )
    # The encoder comes last: its presence marks a finished pretext.
    save_atomically(trainer.encoder, result.encoder_path)
    return result


def save_atomically(model: keras.Model, path: Path) -> None:
    """Save ``model`` in the ``.keras`` format so that an interrupted save leaves the old file
    at ``path``, or none, and no temporary file (:func:`drnb.files.atomic_path`)."""
    with atomic_path(path, suffix=".keras") as temporary:  # Keras insists on the suffix
        model.save(temporary)


def load_encoder(path: str | os.PathLike) -> keras.Model:
    """Load an encoder saved by :func:`train_pretext` (``safe_mode`` stays on).

    Raises
    ------
    FileNotFoundError
        When there is no file at ``path``.
    ValueError
        Naming ``path`` when the file does not load (cut short, or not a Keras model): Keras
        itself says "File not found" for a file that is there.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no encoder at {path}; train one with notebooks/02_rotation_pretext.ipynb or `drnb reproduce`"
        )
    model, damage = _try_loading(path)
    if damage:
        raise ValueError(
            f"{damage}; rerun notebooks/02_rotation_pretext.ipynb or `drnb reproduce`, which train it again"
        )
    return model


def encoder_ready(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an encoder that loads, so that the pretext counts as finished.

    A file that is there but does not load is named in a warning and counts as missing: the
    pretext is trained again and replaces it (atomically, :func:`save_atomically`).
    """
    if not Path(path).is_file():
        return False
    _, damage = _try_loading(Path(path))
    if damage:
        logger.warning("%s; training the pretext again", damage)
    return damage is None


def encoder_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the encoder file at ``path`` (naming it) when it does not load, else None."""
    return _try_loading(Path(path))[1]


def _try_loading(path: Path) -> tuple[keras.Model | None, str | None]:
    """``(model, None)``, or ``(None, what is wrong)`` when the file at ``path`` does not load."""
    try:
        return keras.models.load_model(path, compile=False), None
    except Exception as error:  # Keras raises errors of many kinds for a damaged archive
        return None, f"encoder {path} is damaged: it does not load ({type(error).__name__}: {error})"
