"""Fine-tuning on labelled fractions: one run per protocol x method x fraction x repetition.

A run, given a repetition's split (:mod:`drnb.splits`):

1. starts the encoder from the method's weights (``rotation``: the pretext encoder;
   ``scratch``: a fresh random initialisation; ``imagenet``: DenseNet121's ImageNet
   weights) and a fresh head, both seeded by ``seed + repetition`` so that methods are
   compared on the same split, head initialisation and batch order (with
   ``scratch_encoder="shared"`` every scratch run starts from one fresh encoder, seeded by
   ``seed``, as every rotation run starts from the one pretext encoder);
2. with ``head_init="ridge"`` fits its linear head in closed form on the frozen encoder's
   features of the ``test_time_turns`` views (LP-FT's "linear probe"); warms the head up
   for ``warmup_epochs`` with the encoder frozen; then, under the ``finetune`` protocol
   only, trains everything for
   ``finetune_epochs`` with a fresh optimizer state, the rate constant or cosine-decayed
   step by step, batch norm on each batch's statistics or frozen (``finetune_batchnorm``).
   Under the ``linear`` protocol the encoder keeps its start, and predictions reuse the
   frozen features. Frozen features are kept under the encoder that made them
   (:mod:`drnb.features`), so runs whose encoders start identical encode each image once
   per view between them (:meth:`FinetuneSession.frozen_features`);
3. with a validation split (carved from the training pool, never the test fold), scores
   quadratic weighted kappa on it after each full epoch and keeps the best weights;
   without one, keeps the last, moved ``finetune_start_share`` of the way back to the
   weights the full phase started from (a weight-space ensemble, "WiSE-FT");
4. predicts the test fold and decodes grades: with the fixed rule, or
   (``cut_points="prior"``) with cut points fitted on ``calibration_images`` images of the
   training pool so that grades come out as often as in the labelled subset
   (:func:`drnb.targets.prior_cut_points`); ``metrics.json`` keeps both kappas;
5. scores referable DR (grade >= 2) from the expected grade: the AUC on the test fold, and
   sensitivity and specificity at a threshold set for 90 % specificity on the labelled
   subset's non-referable images (:meth:`FinetuneSession.referable_threshold`);
6. writes ``predictions.csv``, ``history.csv`` and, last, ``metrics.json``: a run whose
   ``metrics.json`` exists is finished.

An epoch is one pass over the labelled subset. The full phase can be given a floor and a cap
in optimizer steps (``finetune_min_steps``, ``finetune_max_steps``), so that 5 % of the data
is not judged after a few dozen updates and 100 % costs a bounded time. See
:func:`plan_steps` and :func:`learning_rate_at`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import tensorflow as tf

from drnb.distribute import configure_precision, scaled_batch_and_rate, seed_everything, seed_weights, select_strategy
from drnb.duplicates import photograph_groups
from drnb.features import FeatureStore, array_fingerprint, encoder_fingerprint
from drnb.files import read_json, write_json
from drnb.metrics import evaluate_predictions, quadratic_weighted_kappa, referable, referable_metrics, specificity_threshold
from drnb.models import grade_head, imagenet_weights_available, profile_encoder, recalibrate_batchnorm
from drnb.pipeline import check_view, labelled_batches, without_autotune
from drnb.pretext import load_encoder, save_atomically
from drnb.pretexts import PRETEXT_TASKS
from drnb.ridge import fit_ridge
from drnb.splits import RepetitionSplit, make_repetition_split, validate_fraction
from drnb.targets import TARGET_LOSSES, decode, decode_with_cut_points, encode, expected_grade, ordinal_decode, prior_cut_points
from drnb.training import Trainer, cosine_rate

if TYPE_CHECKING:
    from drnb.profiles import Profile

logger = logging.getLogger(__name__)

# The encoders a sweep compares: a pretext task's (drnb.pretexts), a fresh random one,
# DenseNet121's ImageNet weights.
PRETEXT_METHODS = tuple(PRETEXT_TASKS)
METHODS = (*PRETEXT_METHODS, "scratch", "imagenet")
# How a run uses its labelled subset: "finetune" trains the encoder with its head (the study's
# protocol); "linear" keeps the starting encoder and trains or fits the head alone (linear
# evaluation, the usual read-out of self-supervised features).
PROTOCOLS = ("finetune", "linear")
HEAD_INITS = ("random", "ridge")
SCRATCH_ENCODERS = ("per_repetition", "shared")
LR_SCHEDULES = ("constant", "cosine")
# Views of an image a prediction averages over and a ridge head is fitted on (symmetry_views).
VIEW_COUNTS = (1, 2, 4, 8)
# Augmentation while fine-tuning, beyond drnb.pipeline.augment's zoom and colour: a fundus
# photograph has no up or down, so every symmetry of the square is a fair view of it.
FINETUNE_AUGMENT = {"vertical_flip": True, "rot90": True}

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
# What collect_results, the progress line and notebook 04 read from every finished run's metrics.
FINISHED_RUN_KEYS = ("protocol", "method", "fraction", "repetition", "qw_kappa", "accuracy", "n_test")
MODEL_FILE = "model.keras"
# Methods whose runs all start from the same trained encoder weights; scratch runs start from a
# fresh initialisation, whose batch-norm statistics may need re-estimating, and share it only
# with scratch_encoder="shared" (see starts_shared).
SHARED_START_METHODS = (*PRETEXT_METHODS, "imagenet")


def shares_fresh_encoder(method: str, profile: Profile) -> bool:
    """Whether every run of ``method`` starts from the session's one fresh encoder
    (``scratch`` with ``scratch_encoder="shared"``; :meth:`FinetuneSession.shared_fresh_encoder`)."""
    return method == "scratch" and profile.scratch_encoder == "shared"


def starts_shared(method: str, profile: Profile) -> bool:
    """Whether every run of ``method`` starts from the same encoder weights, batch norm included:
    the pretext's or ImageNet's, or with ``scratch_encoder="shared"`` one fresh encoder
    (:meth:`FinetuneSession.shared_fresh_encoder`); else a run starts from a fresh encoder
    of its repetition (its batch norm, with ``recalibrate_batchnorm``, re-estimated on the
    run's calibration images)."""
    return method in SHARED_START_METHODS or shares_fresh_encoder(method, profile)


def symmetry_views(count: int) -> range:
    """The views (see :func:`drnb.pipeline.labelled_batches`) of ``count`` symmetries of the
    square: 1 -> (0,), the image as it is; 2 -> (0, 2), turned by 0 and 180 degrees; 4 -> 0-3,
    every quarter turn; 8 -> 0-7, every quarter turn of the image and of its mirror image."""
    if count not in VIEW_COUNTS:
        raise ValueError(f"count={count!r}: expected 1, 2, 4 or 8 views")
    return range(8) if count == 8 else range(0, 4, 4 // count)


def run_directory(root: str | os.PathLike, protocol: str, method: str, fraction: float, repetition: int) -> Path:
    """``root/<protocol>/<method>/fraction_<f>/repetition_<r>``: where one run's files go."""
    return Path(root) / protocol / method / f"fraction_{fraction:g}" / f"repetition_{repetition}"


def runnable_methods(profile: Profile) -> list[str]:
    """The profile's methods that can run here: ``imagenet`` needs DenseNet121 and its cached weights."""
    imagenet_ok = profile.encoder == "densenet121" and imagenet_weights_available()
    return [method for method in profile.methods if method != "imagenet" or imagenet_ok]


def pretext_methods(profile: Profile) -> list[str]:
    """The profile's methods whose encoder a pretext task trains (notebook 02), in its order."""
    return [method for method in profile.methods if method in PRETEXT_METHODS]


def full_epochs(profile: Profile, protocol: str) -> int:
    """Epochs with everything training in a run of ``protocol``: ``finetune_epochs``, or 0 for
    ``"linear"``, whose encoder keeps its start."""
    return profile.finetune_epochs if protocol == "finetune" else 0


def plan_steps(n_train: int, batch_size: int, profile: Profile, protocol: str = "finetune") -> tuple[int, int]:
    """Optimizer steps per warm-up epoch and per fine-tuning epoch of a run of ``protocol``
    (``"linear"`` has no fine-tuning epoch).

    An epoch is one pass over ``n_train`` images; the full phase (``finetune_epochs`` epochs)
    makes at least ``finetune_min_steps`` and at most ``finetune_max_steps`` steps in all
    (0: no bound), so small subsets get enough updates and large ones cost a bounded time.

    Returns
    -------
    (warmup_steps, finetune_steps) : tuple of int
        Steps in each warm-up epoch and in each fine-tuning epoch (at least 1 for each epoch
        the profile has; 0 for a phase with no epochs).
    """
    one_pass = max(math.ceil(n_train / batch_size), 1)
    epochs = full_epochs(profile, protocol)
    finetune_steps = 0
    if epochs:
        full_total = max(one_pass * epochs, profile.finetune_min_steps)
        if profile.finetune_max_steps:
            full_total = min(full_total, profile.finetune_max_steps)
        finetune_steps = math.ceil(full_total / epochs)  # >= 1: a pass and the cap are both >= 1 step per epoch
    return (one_pass if profile.warmup_epochs else 0), finetune_steps


def learning_rate_at(step: int, total_steps: int, profile: Profile, base_rate: float) -> float:
    """Learning rate of full fine-tuning step ``step`` (0-based, ``< total_steps``).

    ``"constant"``: ``base_rate``. ``"cosine"``: ``base_rate * (1 + cos(pi * step / total_steps)) / 2``,
    from ``base_rate`` at the first step towards 0 at the last, so that the weights kept at
    the end of a short run have settled.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step={step}: expected a fine-tuning step in [0, {total_steps})")
    if profile.lr_schedule == "constant":
        return base_rate
    return cosine_rate(step, total_steps, base_rate)


class FinetuneSession:
    """Fine-tunes many runs on one dataset with one traced model (see :mod:`drnb.training`).

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed.
    table : pandas.DataFrame
        The dataset table (``grade``, ``patient_id``, ``image_id``), row-aligned with ``images``.
    profile : Profile
    encoder_paths : dict, optional
        Pretext method (``rotation``, ``contrastive``) -> the encoder its pretext saved;
        needed for each pretext method the session runs.
    feature_dir : path, optional
        Where frozen features are kept between sessions (:class:`drnb.features.FeatureStore`),
        so that the notebooks of a sweep encode each image once per encoder and view; None
        keeps them for this session only.
    strategy : tf.distribute.Strategy, optional
    log : callable
        Receives progress lines.
    """

    def __init__(self, images, table, profile: Profile, *, encoder_paths=None, feature_dir=None, strategy=None, log=print):
        if len(images) != len(table):
            raise ValueError(f"{len(images)} images but {len(table)} table rows; expected one row per image")
        self.profile, self.log = profile, log
        self.table = table.reset_index(drop=True)
        self.grades = self.table["grade"].to_numpy(np.int64)
        # The reference split ignores groups (as the study's code did), so it is not searched.
        threshold = profile.duplicate_threshold if profile.split_mode == "stratified" else 0
        self.patient_ids, self.duplicate_pairs = photograph_groups(images, self.table, threshold)
        if len(self.duplicate_pairs):
            log(
                f"{len(self.duplicate_pairs)} near-duplicate pair(s) of photographs "
                f"(fingerprint similarity >= {profile.duplicate_threshold}): each kept within one fold"
            )
        self.strategy = strategy or select_strategy()
        seed_everything(profile.seed, profile.deterministic)  # once: runs reseed only their weights
        configure_precision(profile.mixed_precision)
        self.batch_size, learning_rate = scaled_batch_and_rate(
            profile.finetune_batch_size, profile.finetune_learning_rate, self.strategy
        )
        self.learning_rate = learning_rate
        self.images = tf.constant(images)
        self.targets = encode(self.grades, profile.target)
        self.encoder_paths = {method: Path(path) for method, path in (encoder_paths or {}).items()}
        self._pretrained: dict[str, list] = {}
        self._shared_fresh = None
        with self.strategy.scope():
            encoder = profile_encoder(profile)
            head = grade_head(encoder.output_shape[-1], profile)
        self.trainer = Trainer(
            encoder, head, loss=TARGET_LOSSES[profile.target],
            learning_rate=learning_rate, strategy=self.strategy, batchnorm=profile.finetune_batchnorm,
        )
        self._splits: dict[tuple, RepetitionSplit] = {}
        self.features = FeatureStore(len(images), feature_dir, log=log)
        self._images = images
        self._images_key = None  # a fingerprint of the images, on first use: features are kept for these only

    def available_methods(self) -> list[str]:
        """The profile's methods that can run here (see :func:`runnable_methods`); logs what is skipped."""
        methods = runnable_methods(self.profile)
        if len(methods) < len(self.profile.methods):
            self.log("imagenet: skipped (needs encoder=densenet121 and the ImageNet weights in ~/.keras/models)")
        return methods

    def split(self, repetition: int, fraction: float | None = None) -> RepetitionSplit:
        """The repetition's test fold, validation split and nested labelled subsets (cached).

        Subsets are prefixes of one seeded per-grade order, so a ``fraction`` outside the
        profile's list is nested with the others like any of them.
        """
        fractions = tuple(sorted(set(self.profile.fractions) | ({fraction} if fraction else set())))
        key = (repetition, fractions)
        if key not in self._splits:
            self._splits[key] = make_repetition_split(
                self.grades,
                repetition,
                fractions,
                patient_ids=self.patient_ids,
                n_folds=self.profile.folds,
                seed=self.profile.seed,
                validation_fraction=self.profile.validation_fraction,
                mode=self.profile.split_mode,
            )
        return self._splits[key]

    def _initial_weights(self, method: str, seed: int):
        """(encoder weights, head weights) a run of ``method`` starts from.

        The head is built first after seeding, so every method of a repetition starts from
        the same head; only ``scratch`` and ``imagenet`` need a fresh encoder, and
        ``scratch`` with ``scratch_encoder="shared"`` the session's one.
        """
        seed_weights(seed)
        head_weights = grade_head(self.trainer.encoder.output_shape[-1], self.profile).get_weights()
        if method in PRETEXT_METHODS:
            if method not in self._pretrained:
                self._pretrained[method] = self._load_pretrained(method)
            return self._pretrained[method], head_weights
        if shares_fresh_encoder(method, self.profile):
            return self.shared_fresh_encoder(), head_weights
        fresh_encoder = profile_encoder(self.profile, weights="imagenet" if method == "imagenet" else None)
        return fresh_encoder.get_weights(), head_weights

    def shared_fresh_encoder(self) -> list:
        """The weights every scratch run starts from with ``scratch_encoder="shared"`` (made once).

        A fresh encoder seeded with the profile's ``seed``, whatever the repetition, as every
        rotation run starts from the one pretext encoder; with ``recalibrate_batchnorm`` its
        batch norm is re-estimated on :meth:`unlabelled_calibration_rows`. Every fraction's
        notebook builds the same weights (to the bit on a CPU, or with ``deterministic``), so
        the runs of the whole sweep share their kept features (:meth:`frozen_features`).
        Leaves the trainer's encoder holding them; a run resets it anyway.

        Returns
        -------
        list of numpy.ndarray
            As from ``get_weights``.
        """
        if self._shared_fresh is None:
            seed_weights(self.profile.seed)
            self.trainer.encoder.set_weights(profile_encoder(self.profile).get_weights())
            if self.profile.recalibrate_batchnorm:
                self.recalibrate_batchnorm(self.unlabelled_calibration_rows())
            self._shared_fresh = self.trainer.encoder.get_weights()
        return self._shared_fresh

    def unlabelled_calibration_rows(self) -> np.ndarray:
        """Rows a shared fresh encoder's batch norm is re-estimated on: ``calibration_images``
        rows of the whole set, drawn with the profile's ``seed``.

        Test folds included, as the pretext trains on them: no grade is read, and a
        statistic every repetition can share cannot leave out every repetition's test fold.

        Returns
        -------
        numpy.ndarray
            int64 (min(calibration_images, images),), sorted.
        """
        count = min(self.profile.calibration_images, len(self.grades))
        return np.sort(np.random.default_rng(self.profile.seed).choice(len(self.grades), count, replace=False)).astype(np.int64)

    def _load_pretrained(self, method: str) -> list:
        if method not in self.encoder_paths:
            raise ValueError(f"method {method!r} needs encoder_paths[{method!r}]: the encoder saved by its pretext")
        path = self.encoder_paths[method]
        pretrained = load_encoder(path)
        expected = self.trainer.encoder
        if pretrained.input_shape != expected.input_shape or [w.shape for w in pretrained.weights] != [w.shape for w in expected.weights]:
            raise ValueError(
                f"encoder {path} takes {pretrained.input_shape} with {len(pretrained.weights)} "
                f"weights; the profile builds {self.profile.encoder} taking {expected.input_shape}. "
                "Train the pretext with the same profile."
            )
        return pretrained.get_weights()

    def _inference_batches(self, rows: np.ndarray, view: int = 0) -> tf.data.Dataset:
        """``rows``' images in order, in ``view`` (0-7, see :func:`symmetry_views`), in batches (with their targets)."""
        return labelled_batches(self.images, rows, self.targets[rows], self.batch_size, seed=0, training=False, view=view)

    def _predict(self, indices: np.ndarray, frozen: bool = False) -> np.ndarray:
        """Outputs for ``indices``' images, float32 (len(indices), outputs): averaged over the
        profile's ``test_time_turns`` views of each image (:func:`symmetry_views`; 1: the image as it is).

        ``frozen``: the run's encoder still has its starting weights, so the head reads the
        features :meth:`frozen_features` keeps, or encodes, for it.
        """
        views = symmetry_views(self.profile.test_time_turns)
        if frozen:
            return np.mean([self.trainer.head_outputs(self.frozen_features(indices, view)) for view in views], axis=0)
        return np.mean([self.trainer.predict(self._inference_batches(indices, view)) for view in views], axis=0)

    def run(
        self, method: str, fraction: float, repetition: int, out_dir: str | os.PathLike, *,
        protocol: str | None = None, save_model: bool = False,
    ) -> dict:
        """Train and evaluate one run; write its files into ``out_dir``; return its metrics.

        The steps: :meth:`run_subsets`, :meth:`start_weights`, :meth:`fit_head_on_features`
        (``head_init="ridge"``), :meth:`train` (the warm-up, then with ``protocol="finetune"``
        everything), :meth:`predict_grades` on the test fold, :meth:`score`, and
        :func:`write_run`. Both protocols of a repetition start from the same weights and head
        fit, so a linear run is where its fine-tuned twin starts.

        ``protocol``: one of the profile's ``protocols``, by default its first.
        ``save_model`` also saves the classifier as ``model.keras`` (for Grad-CAM).
        """
        protocol = protocol or self.profile.protocols[0]
        if protocol not in self.profile.protocols:
            raise ValueError(f"protocol={protocol!r}: expected one of the profile's protocols {list(self.profile.protocols)}")
        start = time.perf_counter()  # the run's seconds: everything it does, from its start weights to its scores
        features_before = self.features.rows_encoded, self.features.rows_reused
        split, train_indices, validation_indices = self.run_subsets(method, fraction, repetition, protocol)
        seed = self.profile.seed + repetition
        calibration = self.calibration_rows(split, seed)
        self.start_weights(method, seed, calibration)
        ridge_penalty = self.fit_head_on_features(train_indices) if self.profile.head_init == "ridge" else None
        history = self.train(train_indices, validation_indices, seed, protocol=protocol)
        frozen = protocol == "linear"  # the encoder kept its start: predictions read the kept features
        outputs, predicted, fixed_grades, cut_points = self.predict_grades(split.test, calibration, train_indices, frozen)
        scores = expected_grade(outputs, self.profile.target)
        threshold = self.referable_threshold(train_indices, seed, frozen)
        metrics = self.score(split.test, predicted, fixed_grades, seed, scores=scores, threshold=threshold)
        metrics.update(
            protocol=protocol,
            method=method,
            fraction=float(fraction),
            repetition=int(repetition),
            n_train=int(len(train_indices)),
            n_validation=int(len(validation_indices)),
            n_test=int(len(split.test)),
            steps=int(sum(row["steps"] for row in history)),
            best_epoch=next((row["epoch"] for row in history if row.get("kept")), 0),
            cut_points=None if cut_points is None else [float(cut) for cut in cut_points],
            referable_threshold_images=int(len(self.operating_point_rows(train_indices, seed))),
            ridge_penalty=ridge_penalty,
            # (image, view) features this run encoded, and those it read from what was kept
            # (drnb.features): by earlier runs with the same starting encoder, or earlier in
            # this run (its calibration images are training images, encoded for the fit).
            features_encoded=self.features.rows_encoded - features_before[0],
            features_reused=self.features.rows_reused - features_before[1],
            seconds=time.perf_counter() - start,
        )
        if self.profile.target == "ordinal":
            # How often the reference decoding, (p > .5).sum() - 1, would have produced grade -1.
            metrics["reference_decoding_minus_one"] = int((ordinal_decode(outputs, rule="reference") < 0).sum())
        if save_model:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_atomically(self.trainer.model, Path(out_dir) / MODEL_FILE)
        write_run(out_dir, metrics, history, self.table.iloc[split.test], self.grades[split.test], predicted, outputs, scores=scores)
        self.features.save()
        return metrics

    def run_subsets(
        self, method: str, fraction: float, repetition: int, protocol: str
    ) -> tuple[RepetitionSplit, np.ndarray, np.ndarray]:
        """The repetition's split, the run's labelled training rows and its validation rows.

        Only a fine-tuned run has validation rows (they choose its kept epoch); a note is
        logged when they outnumber the training rows, since the run then reads more labels
        than its fraction.

        Returns
        -------
        (split, train_indices, validation_indices)
            :class:`drnb.splits.RepetitionSplit`; int64 (M,) and (V,) row indices.
        """
        split = self.split(repetition, validate_fraction(fraction))
        train_indices = split.train[fraction]
        validation_indices = split.validation_for(fraction) if protocol == "finetune" else np.zeros(0, np.int64)
        if len(validation_indices) > len(train_indices):
            self.log(
                f"note: {method}, fraction {fraction:g}, repetition {repetition}: {len(train_indices)} training images, "
                f"and {len(validation_indices)} more labelled images choose the epoch "
                f"(validation_fraction={self.profile.validation_fraction:g} of the pool): this run sees more labels "
                "than its fraction; set validation_fraction=0 (with lr_schedule=cosine) to stay within it"
            )
        return split, train_indices, validation_indices

    def score(
        self, test_rows: np.ndarray, predicted: np.ndarray, fixed_grades: np.ndarray, seed: int, *,
        scores: np.ndarray | None = None, threshold: float | None = None,
    ) -> dict:
        """Kappa, its bootstrap interval, accuracy and per-grade recall of ``predicted`` on
        ``test_rows`` (:func:`drnb.metrics.evaluate_predictions`), and the kappa of the fixed
        rule's grades of the same outputs, so that what the cut points change stays visible.

        Given the test images' continuous ``scores`` (float (M,), the expected grade), also
        referable DR: AUC with its interval, and sensitivity and specificity at ``threshold``
        (from :meth:`referable_threshold`; see :func:`drnb.metrics.referable_metrics`).
        """
        true_grades = self.grades[test_rows]
        metrics = evaluate_predictions(true_grades, predicted, n_resamples=self.profile.bootstrap_resamples, seed=seed)
        metrics["qw_kappa_fixed_cuts"] = quadratic_weighted_kappa(true_grades, fixed_grades)
        if scores is not None:
            metrics.update(referable_metrics(true_grades, scores, threshold, n_resamples=self.profile.bootstrap_resamples, seed=seed))
        return metrics

    def operating_point_rows(self, train_indices: np.ndarray, seed: int) -> np.ndarray:
        """Rows whose scores set the referable-DR threshold: the labelled subset's non-referable
        images (grades 0-1), at most ``calibration_images`` of them drawn with ``seed``.

        Only the labelled subset's grades are read, as the run itself reads them: never a
        test grade, nor the grade of a calibration image outside the subset.

        Returns
        -------
        numpy.ndarray
            int64 (K,), sorted; empty when the subset has no non-referable image.
        """
        train_indices = np.asarray(train_indices, np.int64)
        pool = train_indices[~referable(self.grades[train_indices])]
        count = min(self.profile.calibration_images, len(pool))
        return np.sort(np.random.default_rng(seed).choice(pool, count, replace=False)).astype(np.int64)

    def referable_threshold(self, train_indices: np.ndarray, seed: int, frozen: bool = False) -> float:
        """The expected grade above which the run calls a photograph referable DR: chosen so
        that 90 % of :meth:`operating_point_rows` (training images) fall at or below it
        (:func:`drnb.metrics.specificity_threshold`). Test specificity may therefore fall below 90 %.

        Call it with the run's trained weights (``frozen``: as for :meth:`predict_grades`).

        Returns
        -------
        float
            NaN when the labelled subset has no non-referable image.
        """
        rows = self.operating_point_rows(train_indices, seed)
        if not len(rows):
            return float("nan")
        scores = expected_grade(self._predict(rows, frozen), self.profile.target)
        return specificity_threshold(scores, referable(self.grades[rows]))

    def start_weights(self, method: str, seed: int, calibration: np.ndarray) -> None:
        """Reset the trainer to ``method``'s starting encoder and a fresh head seeded by ``seed``.

        A fresh encoder of its own (scratch, ``scratch_encoder="per_repetition"``) has its
        batch norm re-estimated on ``calibration`` with ``recalibrate_batchnorm``: its moving
        statistics are still 0 and 1, and a head fitted on them would meet features the
        training steps never produce.
        """
        encoder_weights, head_weights = self._initial_weights(method, seed)
        self.trainer.reset(encoder_weights=encoder_weights, head_weights=head_weights, learning_rate=self.learning_rate, seed=seed)
        if self.profile.recalibrate_batchnorm and not starts_shared(method, self.profile):
            self.recalibrate_batchnorm(calibration)

    def fit_head_on_features(self, train_indices: np.ndarray) -> float:
        """Fit the linear head by ridge regression on the frozen features of ``train_indices``.

        Each of the ``test_time_turns`` views of an image (turns, or turns of its mirror image)
        is a sample with its grade: the fit learns to ignore how the photograph is oriented,
        which the rotation pretext's features encode, on the views the predictions average.

        Returns
        -------
        float
            The penalty chosen.
        """
        views = [self.frozen_features(train_indices, view) for view in symmetry_views(self.profile.test_time_turns)]
        image_of_row = np.tile(np.arange(len(train_indices)), len(views))  # an image's views leave together
        return self.fit_head(np.concatenate(views), self.grades[train_indices][image_of_row], image_of_row)

    def train(self, train_indices: np.ndarray, validation_indices: np.ndarray, seed: int, *, protocol: str = "finetune") -> list[dict]:
        """The warm-up epochs (head alone), then with ``protocol="finetune"`` the full epochs.

        With a validation split the full epoch whose weights score the best validation kappa
        is kept (its row has ``kept=True``); without one, the last, then moved
        ``finetune_start_share`` of the way back to the weights the full phase started from.

        Returns
        -------
        list of dict
            One row per epoch: ``epoch, phase, steps, learning_rate, loss`` (the epoch's mean),
            ``images_per_second``, and ``validation_qw_kappa`` where scored.
        """
        profile = self.profile
        batch = min(self.batch_size, len(train_indices))
        batches = self.trainer.batches(
            labelled_batches(
                self.images, train_indices, self.targets[train_indices], batch, seed=seed, training=True,
                augment_options=FINETUNE_AUGMENT,
            )
        )
        warmup_steps, finetune_steps = plan_steps(len(train_indices), batch, profile, protocol)
        history = []
        for epoch in range(1, profile.warmup_epochs + 1):
            step_log = self.trainer.train(batches, warmup_steps, phase="head")
            history.append(_epoch_row(epoch, "warmup", warmup_steps, self.learning_rate, step_log))
        epochs = full_epochs(profile, protocol)
        start = self.trainer.model.get_weights() if epochs and profile.finetune_start_share else None
        history += self._full_epochs(batches, finetune_steps, epochs, validation_indices, first_epoch=len(history) + 1)
        if history and not any(row.get("kept") for row in history):
            history[-1]["kept"] = True  # no epoch chosen by validation: the last one is kept
        if start is not None:
            self.trainer.model.set_weights(interpolated(start, self.trainer.model.get_weights(), profile.finetune_start_share))
        return history

    def _full_epochs(self, batches, steps: int, epochs: int, validation_indices: np.ndarray, first_epoch: int) -> list[dict]:
        """``epochs`` epochs of ``steps`` steps with everything training, the rate following
        :func:`learning_rate_at`; with validation rows, the best-scoring epoch's weights are
        restored at the end and its row marked ``kept`` (without them :meth:`train` keeps the last)."""
        rows, best = [], {"kappa": -np.inf, "weights": None, "row": None}
        total = steps * epochs
        for index in range(epochs):
            done = index * steps
            rate_at = lambda step, done=done: learning_rate_at(done + step, total, self.profile, self.learning_rate)  # noqa: E731
            step_log = self.trainer.train(batches, steps, phase="full", rate_at=rate_at)
            row = _epoch_row(first_epoch + index, "full", steps, rate_at(0), step_log)
            if len(validation_indices):
                validation_grades = self._decode(self._predict(validation_indices))
                row["validation_qw_kappa"] = quadratic_weighted_kappa(self.grades[validation_indices], validation_grades)
                if row["validation_qw_kappa"] > best["kappa"]:
                    best = {"kappa": row["validation_qw_kappa"], "weights": self.trainer.model.get_weights(), "row": row}
            rows.append(row)
        if best["weights"] is not None:
            self.trainer.model.set_weights(best["weights"])
            best["row"]["kept"] = True
        return rows

    def predict_grades(
        self, rows: np.ndarray, calibration: np.ndarray, train_indices: np.ndarray, frozen: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Outputs and grades for ``rows``, with the fixed rule and the profile's decoding.

        With ``cut_points="prior"`` the cut points are fitted on ``calibration``'s outputs so
        that grades come out as often as in the labelled subset ``train_indices``.

        Returns
        -------
        (outputs, grades, fixed_rule_grades, cut_points)
            float32 (M, outputs); int (M,) in 0..4 twice; float (4,) or None.
        """
        probabilities = self._predict(rows, frozen)
        fixed_grades = self._decode(probabilities)
        if self.profile.cut_points != "prior":
            return probabilities, fixed_grades, fixed_grades, None
        calibration_scores = expected_grade(self._predict(calibration, frozen), self.profile.target)
        cut_points = prior_cut_points(calibration_scores, self.grades[train_indices])
        predicted = decode_with_cut_points(expected_grade(probabilities, self.profile.target), cut_points)
        return probabilities, predicted, fixed_grades, cut_points

    def frozen_features(self, rows: np.ndarray, view: int = 0) -> np.ndarray:
        """The encoder's pooled features of ``rows`` as its weights are now, for a ridge head's
        fit or the predictions of a run that never trains its encoder.

        Call it with the trainer reset to the run's starting weights (and a fresh encoder's
        batch norm re-estimated). Features are kept under a fingerprint of those weights
        (:mod:`drnb.features`) and only rows not encoded yet are encoded: every rotation run
        reads one set per view, and a scratch run of repetition r, whose fresh encoder is the
        same in every fraction's notebook (or, shared, in every run), reads what the notebooks
        before it kept in the session's ``feature_dir``.

        Parameters
        ----------
        rows : numpy.ndarray
            int (M,), row indices into the session's images.
        view : int in 0..7
            The images are shown turned (0-3 quarter turns) or mirrored and turned (4-7; see
            :func:`symmetry_views`).

        Returns
        -------
        numpy.ndarray
            float32 (M, F), in the order of ``rows``.
        """
        view = check_view(view)  # before a key is made for it
        if self._images_key is None:
            self._images_key = array_fingerprint([self._images])
        key = encoder_fingerprint(self.trainer.encoder, context=self._images_key)
        return self.features.features(key, view, rows, lambda missing: self.trainer.encode(self._inference_batches(missing, view)))

    def fit_head(self, features: np.ndarray, grades: np.ndarray, image_of_row: np.ndarray | None = None) -> float:
        """Set the linear regression head to the ridge regression of ``grades`` on ``features``
        (``head_init="ridge"``, see :mod:`drnb.ridge`).

        Parameters
        ----------
        features : numpy.ndarray
            float32 (M, F): the frozen encoder's pooled features of the training images.
        grades : numpy.ndarray
            int (M,) in 0..4.
        image_of_row : numpy.ndarray, optional
            int (M,): which image each row shows; the rows of one image (its turns) are left
            out together when the penalty is chosen. Default: every row its own image.

        Returns
        -------
        float
            The penalty chosen, leaving an image out at a time, by the correlation of the
            left-out predictions with the grades (what decoding by prior cut points needs).
        """
        fit = fit_ridge(features, grades, groups=image_of_row, criterion="correlation")
        self.trainer.head.set_weights([fit.weights[:, None].astype(np.float32), np.array([fit.bias], np.float32)])
        return fit.penalty

    def recalibrate_batchnorm(self, rows: np.ndarray) -> int:
        """Re-estimate the encoder's batch-norm statistics on ``rows``' images, as they are
        (no augmentation), in batches of the fine-tuning batch size: the statistics each
        training step normalised with (see :func:`drnb.models.recalibrate_batchnorm`).

        Returns
        -------
        int
            The number of batches used.
        """
        batches = (images for images, _ in without_autotune(self._inference_batches(np.asarray(rows, np.int64))))
        return recalibrate_batchnorm(self.trainer.encoder, batches)

    def _decode(self, probabilities: np.ndarray) -> np.ndarray:
        return decode(probabilities, self.profile.target)

    def calibration_rows(self, split: RepetitionSplit, seed: int) -> np.ndarray:
        """Rows the prior-matched cut points are fitted on (``cut_points="prior"``).

        ``calibration_images`` rows drawn with ``seed`` from the repetition's training pool
        (every row outside its test fold, labelled at this fraction or not), so both methods
        of a repetition are calibrated on the same images and no test image is used.

        Returns
        -------
        numpy.ndarray
            int64 (min(calibration_images, pool size),), sorted.
        """
        pool = np.setdiff1d(np.arange(len(self.grades)), split.test)
        count = min(self.profile.calibration_images, len(pool))
        return np.sort(np.random.default_rng(seed).choice(pool, count, replace=False)).astype(np.int64)


def interpolated(start: list, trained: list, start_share: float) -> list:
    """``start_share * start + (1 - start_share) * trained``, weight by weight (floating-point
    weights only; counters and seeds keep their trained values)."""
    return [
        (start_share * a + (1 - start_share) * b).astype(b.dtype) if np.issubdtype(b.dtype, np.floating) else b
        for a, b in zip(start, trained)
    ]


HISTORY_COLUMNS = ("epoch", "phase", "steps", "learning_rate", "loss", "images_per_second")


def _epoch_row(epoch: int, phase: str, steps: int, rate: float, step_log) -> dict:
    """One row of ``history.csv``: the epoch, its phase and steps, its first step's learning
    rate, its mean loss and speed (``step_log``: :class:`drnb.training.StepLog`)."""
    return {
        "epoch": epoch, "phase": phase, "steps": steps, "learning_rate": rate,
        "loss": step_log.losses[-1], "images_per_second": step_log.images_per_second,
    }


def write_run(out_dir, metrics, history, test_rows, true_grades, predicted, probabilities, *, scores=None) -> None:
    """Write a run's ``history.csv``, ``predictions.csv`` and finally ``metrics.json`` (atomically).

    ``predictions.csv``: ``image_id, path, grade, predicted``, the head's outputs ``p0``, ...,
    and, given ``scores`` (float (M,), the expected grade), ``score``: what referable DR is
    ranked by (older runs lack it; :func:`drnb.results.prediction_scores` recomputes it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A run that trains nothing (protocol "linear" with a ridge head, no warm-up) still writes the header.
    (pd.DataFrame(history) if history else pd.DataFrame(columns=HISTORY_COLUMNS)).to_csv(out_dir / "history.csv", index=False)
    predictions = pd.DataFrame(
        {"image_id": test_rows["image_id"].to_numpy(), "path": test_rows["path"].to_numpy(), "grade": true_grades, "predicted": predicted}
    )
    for k in range(probabilities.shape[1]):
        predictions[f"p{k}"] = probabilities[:, k]
    if scores is not None:
        predictions["score"] = np.asarray(scores, np.float64)
    predictions.to_csv(out_dir / PREDICTIONS_FILE, index=False)
    write_json(out_dir / METRICS_FILE, metrics)


def run_fraction(
    session: FinetuneSession,
    fraction: float,
    root: str | os.PathLike,
    *,
    repetitions: int | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Every method x protocol x repetition at one fraction; finished runs are skipped unless ``overwrite``.

    Returns
    -------
    pandas.DataFrame
        One row of metrics per run (finished earlier or now).
    """
    rows = []
    methods = session.available_methods()
    repetitions = session.profile.repetitions if repetitions is None else repetitions
    protocols = session.profile.protocols
    total = len(methods) * len(protocols) * repetitions
    start = time.perf_counter()
    done = 0
    for repetition in range(repetitions):
        for method in methods:
            for protocol in protocols:
                done += 1
                out_dir = run_directory(root, protocol, method, fraction, repetition)
                label = f"[{done}/{total}] {method} {protocol} fraction {fraction:g} repetition {repetition}"
                finished = None if overwrite else finished_run(out_dir)
                if finished is not None:
                    rows.append(finished)
                    session.log(f"{label}: finished earlier, skipped")
                    continue
                metrics = session.run(method, fraction, repetition, out_dir, protocol=protocol, save_model=repetition == 0)
                rows.append(metrics)
                session.log(
                    f"{label}: qw kappa {metrics['qw_kappa']:.3f}, "
                    f"accuracy {metrics['accuracy']:.3f}, {metrics['n_train']} train images, {metrics['steps']} steps, "
                    f"{metrics['seconds']:.0f} s (elapsed {time.perf_counter() - start:.0f} s)"
                    + _features_note(metrics)
                )
    return pd.DataFrame(rows)


def load_finished_run(out_dir: str | os.PathLike) -> dict:
    """The metrics of the run in ``out_dir``, once its files are checked to load.

    A run is finished when its ``metrics.json`` (written last) is a JSON object with the
    metrics every reader needs, and its ``predictions.csv`` reads as a table with one row per
    test image (``n_test``), so that notebook 04 reads whatever counts as finished.

    Raises
    ------
    FileNotFoundError
        When ``metrics.json`` does not exist (the run has not finished).
    ValueError
        Naming the file that is damaged or missing beside ``metrics.json``.
    """
    out_dir = Path(out_dir)
    metrics = read_json(out_dir / METRICS_FILE)
    missing = [key for key in FINISHED_RUN_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"{out_dir / METRICS_FILE} is damaged: it lacks {missing}")
    predictions_path = out_dir / PREDICTIONS_FILE
    try:
        predictions = pd.read_csv(predictions_path)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{predictions_path} is damaged or missing ({type(error).__name__}: {error})") from None
    lacking = [column for column in ("image_id", "grade", "predicted") if column not in predictions.columns]
    if lacking or len(predictions) != metrics["n_test"]:
        raise ValueError(
            f"{predictions_path} is damaged: expected {metrics['n_test']} rows with image_id, grade and predicted, "
            f"found {len(predictions)} rows" + (f" lacking {lacking}" if lacking else "")
        )
    return metrics


def finished_run(out_dir: str | os.PathLike) -> dict | None:
    """:func:`load_finished_run`'s metrics, or None for a run to do: one that has not finished,
    or one whose files are damaged (named in a warning, so the run is done again)."""
    try:
        return load_finished_run(out_dir)
    except FileNotFoundError:
        return None
    except ValueError as error:
        logger.warning("%s; running it again", error)
        return None


def _features_note(metrics: dict) -> str:
    """How many (image, view) features a run encoded and how many it read from what was kept."""
    encoded, reused = metrics["features_encoded"], metrics["features_reused"]
    return f"; features: {encoded} encoded, {reused} reused" if encoded or reused else ""
