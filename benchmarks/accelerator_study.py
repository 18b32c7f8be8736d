"""A profile's study on one repetition, on any Keras backend: kappa and time per stage.

drnb trains with TensorFlow; a lent GPU machine may run Keras on JAX or PyTorch instead (see
``accelerator_rates.py``, which times the same models' steps; TensorFlow must still be
importable for drnb's settings). This script runs the profile's
configuration through Keras's own ``fit`` on photographs held in memory, on one repetition
(one test fold), within a time limit, and records what it learnt and how long each stage took:

1. ``scratch`` (if asked for): a fresh encoder fine-tuned at each fraction;
2. the rotation pretext (if ``rotation`` is asked for) on every image outside a held-out set,
   for the profile's epochs, ``--pretext-seconds`` (compilation included), or until the time
   left is what the rotation runs need: the scratch runs' time less their compilation, plus
   a margin per run, or ``--reserve-seconds`` when no scratch run measured it;
3. ``rotation``: the pretext's encoder fine-tuned at each fraction, from the same head.

A run starts only if the scratch run of its fraction, less compilation, says it fits.

What is drnb's: preprocessing, near-duplicate and patient grouping, the repetition's split
(test fold, validation split, nested labelled subsets), encoder, heads, pooling, precision
policy, targets, decoding, kappa and its bootstrap CI; and the schedule: ``warmup_epochs``
with the encoder frozen, then ``finetune_epochs`` with everything training at the profile's
rate, keeping the epoch of best validation kappa (or the last epoch without a validation
split). What is not: the step is Keras's ``fit`` (a fresh Adam per phase, as the reference
code's two ``compile`` calls), augmentation is a random symmetry of the square per image (drnb
also zooms and jitters colour; the pretext only rotates), every epoch is whole batches drawn
from a stream of permutations, ``deterministic`` is ignored, and the settings in
:data:`UNSUPPORTED` stop the script with a ``ValueError`` that names them.

On JAX, compiled steps are kept in ``--compilation-cache`` (a temporary folder by default):
a later run of the same shapes, in this process or in a later one on the same machine,
skips most of the compilation (152 s for DenseNet121's first fine-tuning run on an H100,
15-16 s for the next ones)::

    KERAS_BACKEND=jax python benchmarks/accelerator_study.py --profile paper \\
        --dataset eyepacs2015 --data-dir DIR --fractions 1.0,0.1,0.05 --seconds 520 --json study.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESERVE_MARGIN_SECONDS = 15.0  # per rotation run, beyond the scratch run's steady time: model build, cached compile
UNSUPPORTED = {  # setting -> the only value this script implements
    "finetune_min_steps": 0,
    "finetune_max_steps": 0,
    "lr_schedule": "constant",
    "cut_points": "fixed",
    "test_time_turns": 1,
    "head_init": "random",
    "recalibrate_batchnorm": False,
    "scratch_encoder": "per_repetition",
    "protocols": ("finetune",),
    "finetune_batchnorm": "batch",
    "finetune_start_share": 0.0,
}


def check_supported(profile) -> None:
    """Raise for a setting of ``profile`` this script does not implement.

    Parameters
    ----------
    profile : drnb.profiles.Profile

    Raises
    ------
    ValueError
        Naming the first setting whose value differs from :data:`UNSUPPORTED`'s.
    """
    for name, value in UNSUPPORTED.items():
        if getattr(profile, name) != value:
            raise ValueError(
                f"{name}={getattr(profile, name)!r}: accelerator_study.py implements only {name}={value!r} "
                f"(drnb's own loop implements the rest); run it with --set {name}={value}"
            )


def square_symmetries(images: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Each image turned by one of the 8 symmetries of the square.

    Parameters
    ----------
    images : numpy.ndarray
        (N, S, S, C), any dtype.
    which : numpy.ndarray
        int (N,) in 0-7: ``which & 3`` quarter turns (anticlockwise) after a transpose when
        ``which & 4``. 0-3 alone are the pretext's rotations by ``90 * which`` degrees.

    Returns
    -------
    numpy.ndarray
        A new array, the shape and dtype of ``images``.
    """
    which = np.asarray(which)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or which.shape != (len(images),):
        raise ValueError(f"images {images.shape} and which {which.shape}: expected (N, S, S, C) and (N,)")
    if len(which) and (which.min() < 0 or which.max() > 7):
        raise ValueError(f"which: expected symmetries 0-7, got values in [{which.min()}, {which.max()}]")
    out = np.empty_like(images)
    for symmetry in np.unique(which):
        rows = np.flatnonzero(which == symmetry)
        chosen = images[rows].transpose(0, 2, 1, 3) if symmetry & 4 else images[rows]
        out[rows] = np.rot90(chosen, int(symmetry & 3), axes=(1, 2))
    return out


class BatchStream:
    """Rows of one index set in whole batches, from a seeded stream of permutations.

    Each epoch takes the next ``steps * batch_size`` rows of the stream, with ``steps =
    ceil(len(rows) / batch_size)``, so every row is seen equally often over epochs and no
    batch is short (a short batch would compile the step again on some backends).

    Parameters
    ----------
    rows : numpy.ndarray
        int (R,), R >= 1: the rows drawn from.
    batch_size : int
        Rows per batch, >= 1.
    seed : int
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if len(rows) == 0:
            raise ValueError("BatchStream: no rows to draw batches from")
        if batch_size < 1:
            raise ValueError(f"BatchStream: batch_size={batch_size}, expected at least 1")
        self.rows, self.batch_size = np.asarray(rows, np.int64), batch_size
        self.steps = math.ceil(len(self.rows) / batch_size)
        self.rng = np.random.default_rng(seed)
        self.queue = np.zeros(0, np.int64)

    def epoch(self) -> np.ndarray:
        """int64 (steps * batch_size,): the next epoch's rows, in batch order."""
        needed = self.steps * self.batch_size
        while len(self.queue) < needed:
            self.queue = np.concatenate([self.queue, self.rng.permutation(self.rows)])
        rows, self.queue = self.queue[:needed], self.queue[needed:]
        return rows


def next_epoch_fits(now: float, deadline: float, epoch_seconds: list[float]) -> bool:
    """Whether another epoch can start and end by ``deadline``.

    The last epoch's seconds predict the next one's, except when only the first epoch has run:
    it includes the step's compilation (minutes for DenseNet121 on a GPU), so the second epoch
    is tried whenever ``now`` is before the deadline.

    Parameters
    ----------
    now, deadline : float
        Seconds on one clock (``time.perf_counter``).
    epoch_seconds : list of float
        The seconds of the epochs run so far, in order.
    """
    estimate = epoch_seconds[-1] if len(epoch_seconds) >= 2 else 0.0
    return now + estimate <= deadline


def predict_whole_batches(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict`` over ``images`` in whole batches, so that one compiled shape serves every call.

    Parameters
    ----------
    model : keras.Model
    images : numpy.ndarray
        (N, S, S, 3), N >= 1; the last image is repeated to fill the last batch.
    batch_size : int

    Returns
    -------
    numpy.ndarray
        float32 (N, K): the model's outputs for the N images, padding dropped.
    """
    padding = -len(images) % batch_size
    if padding:
        images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)[: len(images) - padding]


def finite_or_none(value):
    """``value`` with every non-finite float inside it replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def enable_compilation_cache(folder: str | None) -> None:
    """On JAX, keep compiled steps in ``folder``, so a model of the same shapes compiles from it.

    ``None``: a temporary folder, removed when the process ends. Other backends: nothing.
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        if folder is None:
            folder = tempfile.mkdtemp(prefix="drnb-compiled-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Study:
    """One repetition of a profile's study on photographs held in memory (see the module docstring).

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed, ``S == profile.image_size``.
    table : pandas.DataFrame
        The dataset table (``grade``, ``patient_id``, ``image_id``), row-aligned with ``images``.
    profile : drnb.profiles.Profile
    fractions : list of float
        The labelled fractions to run, in order.
    repetition : int
        The repetition; it tests on fold ``repetition``.
    """

    def __init__(self, images, table, profile, fractions, repetition: int):
        import keras

        from drnb.duplicates import photograph_groups
        from drnb.splits import make_repetition_split
        from drnb.targets import TARGET_LOSSES, encode

        check_supported(profile)
        self.keras, self.images, self.profile, self.fractions = keras, images, profile, list(fractions)
        self.grades = table["grade"].to_numpy(np.int64)
        self.groups, self.duplicate_pairs = photograph_groups(images, table, profile.duplicate_threshold)
        self.split = make_repetition_split(
            self.grades, repetition, sorted(set(self.fractions) | set(profile.fractions)), patient_ids=self.groups,
            n_folds=profile.folds, seed=profile.seed, validation_fraction=profile.validation_fraction, mode=profile.split_mode,
        )
        self.targets = encode(self.grades, profile.target).astype(np.float32)
        self.seed = profile.seed + repetition
        self.loss = TARGET_LOSSES[profile.target]

    def classifier(self, encoder_weights=None):
        """Encoder and grade head, seeded so that every method's head starts the same.

        Parameters
        ----------
        encoder_weights : list of numpy.ndarray, optional
            Loaded into the encoder (the pretext's); None keeps its fresh weights.

        Returns
        -------
        (classifier, encoder) : keras.Model, keras.Model
        """
        from drnb.models import grade_head, profile_encoder, stack

        profile = self.profile
        self.keras.utils.set_random_seed(self.seed)
        encoder = profile_encoder(profile)
        head = grade_head(encoder.output_shape[-1], profile)
        if encoder_weights is not None:
            encoder.set_weights(encoder_weights)
        return stack(encoder, head), encoder

    def finetune(self, method: str, fraction: float, encoder_weights=None) -> dict:
        """One run: warm-up with the encoder frozen, full epochs, the best validation epoch kept.

        Returns
        -------
        dict
            Test kappa, accuracy and CI, image counts, the epoch kept, seconds (in all and
            compiling), steady images/s per phase and every epoch's loss, seconds and
            validation kappa.
        """
        from drnb.metrics import evaluate_predictions, quadratic_weighted_kappa
        from drnb.targets import decode

        profile, keras, batch_size = self.profile, self.keras, self.profile.finetune_batch_size
        run_start = time.perf_counter()
        classifier, encoder = self.classifier(encoder_weights)
        train_rows, validation_rows = self.split.train[fraction], self.split.validation_for(fraction)
        stream = BatchStream(train_rows, batch_size, self.seed)
        augmentation = np.random.default_rng([self.seed, 1])  # apart from the stream's order
        epochs, best = [], {"kappa": -np.inf, "weights": None, "epoch": 0}
        phases = ["warmup"] * profile.warmup_epochs + ["full"] * profile.finetune_epochs
        for epoch, phase in enumerate(phases, start=1):
            if epoch == 1 or phase != phases[epoch - 2]:
                encoder.trainable = phase == "full"
                classifier.compile(optimizer=keras.optimizers.Adam(profile.finetune_learning_rate), loss=self.loss)
            rows = stream.epoch()
            batch = square_symmetries(self.images[rows], augmentation.integers(0, 8, size=len(rows)))
            start = time.perf_counter()
            fitted = classifier.fit(batch, self.targets[rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            row = {"epoch": epoch, "phase": phase, "loss": float(fitted.history["loss"][-1]), "seconds": time.perf_counter() - start}
            if len(validation_rows) and phase == "full":
                predicted = decode(predict_whole_batches(classifier, self.images[validation_rows], batch_size), profile.target)
                row["validation_qw_kappa"] = quadratic_weighted_kappa(self.grades[validation_rows], predicted)
                if row["validation_qw_kappa"] > best["kappa"]:
                    best = {"kappa": row["validation_qw_kappa"], "weights": classifier.get_weights(), "epoch": epoch}
            epochs.append(row)
        if best["weights"] is not None:
            classifier.set_weights(best["weights"])
        else:
            best["epoch"] = len(phases)
        test = self.split.test
        probabilities = predict_whole_batches(classifier, self.images[test], batch_size)
        scores = evaluate_predictions(
            self.grades[test], decode(probabilities, profile.target), n_resamples=profile.bootstrap_resamples, seed=self.seed
        )
        # A phase's first epoch includes its compilation: the median epoch is the steady time, the excess the compilation.
        steady, compile_seconds = {}, 0.0
        for phase in ("warmup", "full"):
            phase_seconds = [row["seconds"] for row in epochs if row["phase"] == phase]
            if phase_seconds:
                steady[phase] = float(np.median(phase_seconds))
                compile_seconds += max(phase_seconds[0] - steady[phase], 0.0)
        return {
            "method": method, "fraction": fraction, "n_train": len(train_rows), "n_validation": len(validation_rows),
            "n_test": len(test), "qw_kappa": scores["qw_kappa"], "accuracy": scores["accuracy"],
            "qw_kappa_ci": [scores["kappa_ci_low"], scores["kappa_ci_high"]], "best_epoch": best["epoch"],
            "images_per_epoch": stream.steps * batch_size, "seconds": time.perf_counter() - run_start,
            "compile_seconds": compile_seconds,
            **{f"{phase}_images_per_second": stream.steps * batch_size / seconds for phase, seconds in steady.items()},
            "history": epochs,
        }

    def pretext(self, deadline: float, record) -> tuple[list, dict]:
        """Train the rotation pretext until its epochs are done or the next would end after ``deadline``.

        Every image outside a held-out set trains (the test fold included, as self-supervision
        on the unlabelled pool does); the held-out set keeps patients and near duplicates
        together and is scored in all four rotations every ``pretext_eval_every`` epochs and
        after the last. ``record(pretext=...)`` is called after every epoch.

        Returns
        -------
        (encoder_weights, summary) : list of numpy.ndarray, dict
            The encoder's weights (None when no epoch ran) and the pretext's figures.
        """
        from drnb.models import profile_encoder, rotation_head, stack
        from drnb.pretext import HOLDOUT_FRACTION, planned_epochs
        from drnb.pretexts.rotation import rotated_copies
        from drnb.splits import split_holdout

        profile, keras = self.profile, self.keras
        start_all = time.perf_counter()
        keras.utils.set_random_seed(profile.seed)
        encoder = profile_encoder(profile)
        head = rotation_head(encoder.output_shape[-1], profile)
        pretext = stack(encoder, head, name="pretext")
        pretext.compile(optimizer=keras.optimizers.Adam(profile.pretext_learning_rate), loss="sparse_categorical_crossentropy")
        train_rows, heldout_rows = split_holdout(len(self.images), HOLDOUT_FRACTION, profile.seed, self.groups)
        heldout_turns = np.tile(np.arange(4), len(heldout_rows))
        heldout_images = square_symmetries(self.images[np.repeat(heldout_rows, 4)], heldout_turns)
        # all4: a batch holds batch/4 photographs, each in its four rotations (RotNet); random1: one random turn each.
        copies = rotated_copies(profile)
        stream = BatchStream(train_rows, profile.pretext_batch_size // copies, profile.seed)
        turns_rng = np.random.default_rng([profile.seed, 1])
        epochs, planned = [], planned_epochs(profile, len(train_rows) * copies)

        def heldout_accuracy() -> float:
            predicted = predict_whole_batches(pretext, heldout_images, profile.pretext_batch_size).argmax(axis=1)
            return float((predicted == heldout_turns).mean())

        for epoch in range(1, planned + 1):
            if not next_epoch_fits(time.perf_counter(), deadline, [row["seconds"] for row in epochs]):
                break
            rows = np.repeat(stream.epoch(), copies)
            turns = np.tile(np.arange(4), len(rows) // 4) if copies == 4 else turns_rng.integers(0, 4, size=len(rows))
            batch = square_symmetries(self.images[rows], turns)
            start = time.perf_counter()
            fitted = pretext.fit(batch, turns, batch_size=profile.pretext_batch_size, epochs=1, shuffle=False, verbose=0)
            row = {"epoch": epoch, "loss": float(fitted.history["loss"][-1]), "seconds": time.perf_counter() - start}
            if epoch % profile.pretext_eval_every == 0 or epoch == planned:
                row["heldout_rotation_accuracy"] = heldout_accuracy()
            epochs.append(row)
            record(pretext={"history": epochs})  # replaced by the summary below; kept if the call is cut short
            print(f"pretext epoch {epoch}: loss {row['loss']:.4f}, {row['seconds']:.1f} s", flush=True)
        if epochs and "heldout_rotation_accuracy" not in epochs[-1]:
            epochs[-1]["heldout_rotation_accuracy"] = heldout_accuracy()
        steady = float(np.median([row["seconds"] for row in epochs[1:]])) if len(epochs) > 1 else None
        summary = {
            "epochs": len(epochs), "profile_epochs": planned, "train_images": len(train_rows),
            "heldout_images": len(heldout_rows), "seconds": time.perf_counter() - start_all,
            "stopped_by": "epochs" if len(epochs) == planned else "time",
            "images_per_second": stream.steps * stream.batch_size * copies / steady if steady else None,
            "heldout_rotation_accuracy": epochs[-1]["heldout_rotation_accuracy"] if epochs else None,
            "history": epochs,
        }
        return (encoder.get_weights() if epochs else None), summary


def main() -> None:
    from run_benchmarks import add_profile_arguments, profile_from

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, default="paper", what="configuration runs")
    parser.add_argument("--fractions", default="1.0", help="labelled fractions, comma-separated, run in this order")
    parser.add_argument("--methods", default="scratch,rotation", help="scratch, rotation or scratch,rotation")
    parser.add_argument("--repetition", type=int, default=0, help="repetition (its test fold)")
    parser.add_argument("--seconds", type=float, default=520.0, help="time limit for the whole script")
    parser.add_argument("--pretext-seconds", type=float, help="at most this long for the pretext, compilation included")
    parser.add_argument("--reserve-seconds", type=float, default=0.0, help="kept for the rotation runs when no scratch run measured them")
    parser.add_argument("--compilation-cache", help="folder for JAX's compiled steps (default: a temporary one)")
    parser.add_argument("--json", required=True, help="output file, rewritten after every run and pretext epoch")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.seconds
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if not methods or set(methods) - {"scratch", "rotation"}:
        parser.error(f"--methods {args.methods!r}: expected scratch, rotation or scratch,rotation")

    import keras
    from accelerator_rates import accelerator_name

    from drnb.models import precision_policy
    from drnb.preprocessing import preprocess_table
    from drnb.files import write_text_atomically
    from drnb.runs import load_table, preprocess_config
    from drnb.splits import validate_fraction

    profile = profile_from(args, args.set)
    check_supported(profile)
    try:
        fractions = [validate_fraction(float(text)) for text in args.fractions.split(",")]
    except ValueError as error:
        parser.error(f"--fractions {args.fractions!r}: {error}")
    figures: dict = {"profile": profile.name, "dataset": profile.dataset, "repetition": args.repetition, "runs": []}
    out = Path(args.json)

    def record(**values):
        """Keep the JSON current (atomically, NaN as null), so a call cut short keeps what it measured."""
        figures.update(values)
        write_text_atomically(out, json.dumps(finite_or_none(figures), indent=2))

    table = load_table(profile)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        images, table = preprocess_table(table, preprocess_config(profile), cache_dir=cache, progress=False)
        record(images=len(images), preprocess_seconds=time.perf_counter() - start)
    study = Study(images, table, profile, fractions, args.repetition)
    accelerator = accelerator_name()
    policy = precision_policy(profile.mixed_precision, accelerator=accelerator is not None)
    keras.mixed_precision.set_global_policy(policy)
    enable_compilation_cache(args.compilation_cache)
    record(
        backend=keras.backend.backend(), keras_version=keras.__version__, device=accelerator or "CPU", methods=methods,
        precision_policy=policy, near_duplicate_pairs=len(study.duplicate_pairs), test_images=len(study.split.test),
    )

    def steady_seconds(fraction: float) -> float:
        """The scratch run of ``fraction`` less its compilation (0 when there is none)."""
        runs = [run for run in figures["runs"] if run["method"] == "scratch" and run["fraction"] == fraction]
        return runs[0]["seconds"] - runs[0]["compile_seconds"] if runs else 0.0

    def run_all(method: str, encoder_weights=None) -> None:
        for fraction in fractions:
            if time.perf_counter() + steady_seconds(fraction) > deadline:
                print(f"{method} {fraction:g}: skipped, it would end after --seconds", flush=True)
                continue
            run = study.finetune(method, fraction, encoder_weights)
            figures["runs"].append(run)
            record()
            print(
                f"{method} {fraction:g}: QWK {run['qw_kappa']:.3f}, accuracy {run['accuracy']:.3f}, "
                f"{run['n_train']} images, best epoch {run['best_epoch']}, {run['seconds']:.0f} s", flush=True,
            )

    if "scratch" in methods:
        run_all("scratch")
    if "rotation" in methods:
        measured = [steady_seconds(fraction) for fraction in fractions if steady_seconds(fraction)]
        reserve = sum(measured) + RESERVE_MARGIN_SECONDS * len(measured) if measured else args.reserve_seconds
        pretext_deadline = deadline - reserve
        if args.pretext_seconds is not None:
            pretext_deadline = min(pretext_deadline, time.perf_counter() + args.pretext_seconds)
        encoder_weights, summary = study.pretext(pretext_deadline, record)
        record(pretext={**summary, "reserved_seconds": reserve})
        print(f"pretext: {summary['epochs']} epochs, held-out rotation accuracy {summary['heldout_rotation_accuracy']}", flush=True)
        if encoder_weights is not None:
            run_all("rotation", encoder_weights)
    record(total_seconds=time.perf_counter() - started)
    print(f"written {out}")


if __name__ == "__main__":
    main()
