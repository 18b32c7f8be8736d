"""Self-supervised pretext training: an encoder learns from unlabelled photographs.

The pretext sees images only, never grades, so it uses every image of the dataset (test
folds included), as self-supervised pre-training on the unlabelled pool does, and any
unlabelled archive the profile names (:mod:`drnb.archive`); a held-out share (whole
patients and near-duplicate groups, given the table) measures the task's score on images
the encoder never trained on. The task (rotation, contrastive, ...) is a module of
:mod:`drnb.pretexts`; this loop, the split and the files are the same for every task.

Writes into ``out_dir``: ``encoder.keras`` (the encoder alone, for fine-tuning),
``history.csv`` (loss, the held-out score and learning rate per epoch; the score is empty
between the epochs it is taken at, every ``pretext_eval_every``), ``metrics.json`` and, for
a task with classes, ``confusion.csv`` (held-out true x predicted class, after the last epoch).
"""

from __future__ import annotations

import functools
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
from drnb.models import profile_encoder
from drnb.pretexts import PRETEXT_TASKS, PretextTask
from drnb.splits import split_holdout
from drnb.training import Trainer

if TYPE_CHECKING:
    from drnb.profiles import Profile

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.keras"
# Share of the images (whole patients and duplicate groups) held out to score the pretext task.
HOLDOUT_FRACTION = 0.1


def pretext_task(method: str) -> PretextTask:
    """The pretext task that trains ``method``'s encoder; ValueError for a method without one."""
    if method not in PRETEXT_TASKS:
        raise ValueError(f"method {method!r} has no pretext task; expected one of {list(PRETEXT_TASKS)}")
    return PRETEXT_TASKS[method]


def planned_epochs(profile: Profile, views_per_epoch: int) -> int:
    """The pretext's passes: ``pretext_epochs``, or more for a small set, so that it shows at
    least ``pretext_min_steps`` batches of ``pretext_batch_size`` views.

    What the pretext needs is a number of gradient steps, not of passes. The floor counts
    batches of one replica's batch size, so it asks for the same images on any number of
    replicas.

    Parameters
    ----------
    views_per_epoch : int
        Views in one pass: the pretext images times the task's ``views_per_image``.
    """
    if views_per_epoch < 1:
        raise ValueError(f"views_per_epoch={views_per_epoch!r}: expected a positive number of images")
    floor = math.ceil(profile.pretext_min_steps * profile.pretext_batch_size / views_per_epoch)
    return max(profile.pretext_epochs, floor)


@dataclass
class PretextResult:
    """What :func:`train_pretext` produced: paths, history and the held-out score."""

    encoder_path: Path
    history: pd.DataFrame
    heldout_accuracy: float  # the task's held-out score in [0, 1] (PretextTask.score_meaning)
    confusion: np.ndarray | None  # int (C, C): true x predicted class, for a task with classes
    heldout_indices: np.ndarray  # int64: rows of ``images`` held out (the accuracy's images)
    seconds: float
    images_per_second: float


def build_pretext_trainer(profile: Profile, task: PretextTask, strategy=None) -> Trainer:
    """The profile's encoder with ``task``'s head and loss, inside ``strategy``'s scope."""
    strategy = strategy or select_strategy()
    configure_precision(profile.mixed_precision)
    _, learning_rate = scaled_batch_and_rate(profile.pretext_batch_size, profile.pretext_learning_rate, strategy)
    with strategy.scope():
        encoder = profile_encoder(profile)
        head = task.head(encoder.output_shape[-1], profile)
    return Trainer(encoder, head, loss=task.loss, learning_rate=learning_rate, strategy=strategy)


def train_pretext(
    images: np.ndarray,
    profile: Profile,
    out_dir: str | os.PathLike,
    *,
    method: str = "rotation",
    table=None,
    left_out: dict | None = None,
    strategy=None,
    log=print,
) -> PretextResult:
    """Train ``method``'s pretext task and save the encoder.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed, ``S == profile.image_size``.
    profile : Profile
        Uses the ``encoder``, ``feature_stages``, ``duplicate_threshold`` and ``pretext_*``
        settings (and the task's own, such as ``rotation_mode``).
    out_dir : path
        Created if needed; see the module docstring for what is written.
    method : str
        A key of :data:`drnb.pretexts.PRETEXT_TASKS`: the task, and the fine-tuning method
        whose encoder it trains.
    table : pandas.DataFrame, optional
        The dataset table, row-aligned with ``images`` (``image_id``, ``patient_id``). With
        it, a patient's eyes and near-duplicate photographs are held out together
        (:func:`drnb.duplicates.photograph_groups`), so the held-out score is not helped by
        a twin in training (a left eye flipped looks much like the right one). Without it,
        images are held out one by one. With a ``source`` column
        (:func:`drnb.runs.load_pretext_images`), ``metrics.json`` counts the photographs of
        each source trained on and held out.
    left_out : dict, optional
        Reason -> archive photographs left out (:class:`drnb.archive.PretextImages`), recorded
        in ``metrics.json``.
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
    task = pretext_task(method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(profile.seed, profile.deterministic)
    trainer = build_pretext_trainer(profile, task, strategy)
    batch_size, _ = scaled_batch_and_rate(profile.pretext_batch_size, profile.pretext_learning_rate, trainer.strategy)
    groups = None if table is None else photograph_groups(images, table, profile.duplicate_threshold)[0]
    train_indices, holdout_indices = heldout_split(len(images), groups, profile.seed, log)
    image_tensor = tf.constant(images)
    views_per_epoch = len(train_indices) * task.views_per_image(profile)
    epochs = planned_epochs(profile, views_per_epoch)
    if epochs > profile.pretext_epochs:
        log(
            f"pretext: {epochs} epochs instead of {profile.pretext_epochs}, to show at least pretext_min_steps="
            f"{profile.pretext_min_steps} batches of {profile.pretext_batch_size} views ({views_per_epoch} per epoch)"
        )
    dataset = task.batches(image_tensor, train_indices, batch_size, profile, profile.seed)
    score = functools.partial(task.score, trainer, image_tensor, holdout_indices, batch_size, profile.seed)
    history, (accuracy, confusion), timing = _train_epochs(
        trainer, dataset, epochs, max(1, math.ceil(views_per_epoch / batch_size)), batch_size, profile, task, score, log
    )
    result = PretextResult(
        encoder_path=out_dir / ENCODER_FILE, history=history, heldout_accuracy=accuracy, confusion=confusion,
        heldout_indices=holdout_indices, seconds=timing["seconds"], images_per_second=timing["images_per_second"],
    )
    _write_pretext(result, out_dir, task, profile, {
        "heldout_grouped": groups is not None,
        "train_images": int(len(train_indices)),
        **_source_counts(table, train_indices, holdout_indices),
        "archive_left_out": dict(left_out or {}),
        "epochs": epochs,
    })
    # The encoder comes last: its presence marks a finished pretext.
    save_atomically(trainer.encoder, result.encoder_path)
    return result


def heldout_split(count: int, groups, seed: int, log) -> tuple[np.ndarray, np.ndarray]:
    """Rows trained on and rows held out (:data:`HOLDOUT_FRACTION`, whole ``groups``); a set
    too small to hold any out is scored on up to 64 training rows, and says so."""
    train_indices, holdout_indices = split_holdout(count, HOLDOUT_FRACTION, seed, groups)
    if len(holdout_indices) == 0:
        holdout_indices = train_indices[: min(len(train_indices), 64)]
        log("pretext: too few images to hold any out; the held-out score is on training images")
    return train_indices, holdout_indices


def _train_epochs(trainer, dataset, epochs, steps_per_epoch, batch_size, profile, task, score, log):
    """The epochs, scored every ``pretext_eval_every`` and after the last: (history, last score, timing)."""
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
            last_score = score()
        rows.append(
            {
                "epoch": epoch,
                "loss": step_log.losses[-1],
                task.score_name: last_score[0] if scored else float("nan"),
                "learning_rate": float(trainer.optimizers["full"].learning_rate.numpy()),  # at the epoch's last step
                "images_per_second": step_log.images_per_second,
                "elapsed_seconds": time.perf_counter() - start,
            }
        )
        shown = f", {task.score_name.replace('_', ' ')} {last_score[0]:.3f}" if scored else ""
        log(
            f"{task.name} pretext epoch {epoch}/{epochs}: loss {step_log.losses[-1]:.4f}{shown}, "
            f"{step_log.images_per_second:.0f} img/s, {time.perf_counter() - start:.0f} s"
        )
    timing = {"seconds": time.perf_counter() - start, "images_per_second": images_trained / max(train_seconds, 1e-9)}
    return pd.DataFrame(rows), last_score, timing


def _write_pretext(result: PretextResult, out_dir: Path, task: PretextTask, profile: Profile, facts: dict) -> None:
    """``history.csv``, ``confusion.csv`` (a task with classes) and ``metrics.json``."""
    result.history.to_csv(out_dir / "history.csv", index=False)
    if result.confusion is not None:
        labels = task.class_names
        pd.DataFrame(result.confusion, index=[f"true_{k}" for k in labels], columns=[f"pred_{k}" for k in labels]).to_csv(
            out_dir / "confusion.csv"
        )
    write_json(
        out_dir / "metrics.json",
        {
            "pretext": task.name,
            task.score_name: result.heldout_accuracy,
            "heldout_score_means": task.score_meaning,
            "heldout_images": int(len(result.heldout_indices)),
            **facts,
            **task.facts(profile),
            "seconds": result.seconds,
            "images_per_second": result.images_per_second,
        },
    )


def _source_counts(table, train_indices: np.ndarray, holdout_indices: np.ndarray) -> dict:
    """Photographs per source trained on and held out, when ``table`` names sources."""
    if table is None or "source" not in table:
        return {}
    sources = pd.Series(table["source"].astype(str).to_numpy())
    return {
        "train_images_per_source": _counts(sources.iloc[train_indices]),
        "heldout_images_per_source": _counts(sources.iloc[holdout_indices]),
    }


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(key): int(count) for key, count in values.value_counts(sort=False).items()}


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
