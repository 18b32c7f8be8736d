"""A profile's study on one repetition, on any Keras backend: kappa and time per stage.

drnb trains with TensorFlow; a lent GPU machine may have only JAX or PyTorch (see
``accelerator_rates.py``, which times the same models' steps). This script runs the profile's
configuration through Keras's own ``fit`` on photographs held in memory, on one repetition
(one test fold), within a time limit, and records what it learnt and how long each stage took:

1. ``scratch``: a fresh encoder fine-tuned at each fraction;
2. the rotation pretext on every image outside a held-out set, for the profile's epochs or
   until the time left is what the scratch runs took (``--seconds``);
3. ``rotation``: the pretext's encoder fine-tuned at each fraction, from the same head.

What is drnb's: preprocessing, near-duplicate and patient grouping, the repetition's split
(test fold, validation split, nested labelled subsets), encoder, heads, pooling, precision
policy, targets, decoding and kappa; and the schedule: ``warmup_epochs`` with the encoder
frozen, then ``finetune_epochs`` with everything training at the profile's rate, keeping the
epoch of best validation kappa (or the last epoch without a validation split). What is not:
the step is Keras's ``fit`` (a fresh Adam per phase, as the reference code's two ``compile``
calls), augmentation is a random symmetry of the square per image (drnb also zooms and
jitters colour; the pretext only rotates), every epoch is whole batches drawn from a stream
of permutations, and ``finetune_min_steps``, ``finetune_max_steps``, ``min_steps``,
``warmup_on_features``, ``lr_schedule`` and ``cut_points="prior"`` are not supported (a
``ValueError`` names the setting)::

    KERAS_BACKEND=jax python benchmarks/accelerator_study.py --profile paper \\
        --dataset eyepacs2015 --data-dir DIR --fractions 1.0,0.1,0.05 --seconds 420 --json study.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESERVE_MARGIN_SECONDS = 15.0  # per rotation run, beyond the scratch run's steady time: model build, cached compile
UNSUPPORTED = {  # setting -> the value this script implements
    "finetune_min_steps": 0,
    "finetune_max_steps": 0,
    "min_steps": 0,
    "warmup_on_features": False,
    "lr_schedule": "constant",
    "pretext_lr_schedule": "constant",
    "cut_points": "fixed",
}


def check_supported(profile) -> None:
    """ValueError naming the first setting of ``profile`` this script does not implement."""
    for name, value in UNSUPPORTED.items():
        if getattr(profile, name) != value:
            raise ValueError(
                f"{name}={getattr(profile, name)!r}: accelerator_study.py implements only {name}={value!r} "
                "(drnb's own loop implements the rest); run it with --set "
                f"{name}={value}"
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

    Each epoch takes the next ``steps * batch_size`` rows of the stream, so every row is seen
    equally often over epochs and no batch is short (a short batch would compile the step
    again on some backends).
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if len(rows) == 0:
            raise ValueError("BatchStream: no rows to draw batches from")
        self.rows, self.batch_size = np.asarray(rows, np.int64), batch_size
        self.steps = max(1, -(-len(self.rows) // batch_size))
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
    """Whether another epoch can start and end by ``deadline`` (seconds on one clock).

    The last epoch's seconds predict the next one's, except when only the first epoch has run:
    it includes the step's compilation (minutes for DenseNet121 on a GPU), so the second epoch
    is tried whenever ``now`` is before the deadline.
    """
    estimate = epoch_seconds[-1] if len(epoch_seconds) >= 2 else 0.0
    return now + estimate <= deadline


def predict_whole_batches(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict`` over ``images``, padded to whole batches (one compiled shape), as float32."""
    padding = -len(images) % batch_size
    if padding:
        images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)[: len(images) - padding]


def fit_epoch(model, images: np.ndarray, targets: np.ndarray, rows: np.ndarray, rng, batch_size: int) -> tuple[float, float]:
    """One epoch of ``fit`` over ``rows`` (each image under a random symmetry of the square); (loss, seconds)."""
    batch = square_symmetries(images[rows], rng.integers(0, 8, size=len(rows)))
    start = time.perf_counter()
    history = model.fit(batch, targets[rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return float(history.history["loss"][-1]), time.perf_counter() - start


def enable_compilation_cache(folder: str) -> None:
    """On JAX, keep compiled steps on disk, so a second model of the same shapes compiles from the cache."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper", help="profile whose configuration runs")
    parser.add_argument("--dataset", help="dataset (default: the profile's)")
    parser.add_argument("--data-dir", help="the dataset's folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile setting (repeatable)")
    parser.add_argument("--fractions", default="1.0", help="labelled fractions, comma-separated, run in this order")
    parser.add_argument("--methods", default="scratch,rotation", help="methods fine-tuned: scratch, rotation or both")
    parser.add_argument("--pretext-seconds", type=float, help="at most this long for the pretext, compilation included")
    parser.add_argument("--repetition", type=int, default=0, help="repetition (its test fold)")
    parser.add_argument("--seconds", type=float, default=480.0, help="time limit for the whole script")
    parser.add_argument("--json", required=True, help="output file, rewritten after every stage")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.seconds

    import tempfile

    import keras
    from accelerator_rates import accelerator_name
    from run_benchmarks import profile_from

    from drnb.duplicates import photograph_groups
    from drnb.metrics import evaluate_predictions, quadratic_weighted_kappa
    from drnb.models import build_encoder, build_head, precision_policy, stack
    from drnb.preprocessing import preprocess_table
    from drnb.runs import load_table, preprocess_config
    from drnb.splits import make_repetition_split, split_holdout, validate_fraction
    from drnb.targets import decode, encode

    profile = profile_from(args, args.set)
    check_supported(profile)
    try:
        fractions = [validate_fraction(float(text)) for text in args.fractions.split(",")]
    except ValueError as error:
        parser.error(f"--fractions {args.fractions!r}: {error}")
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if not methods or set(methods) - {"scratch", "rotation"}:
        parser.error(f"--methods {args.methods!r}: expected scratch, rotation or scratch,rotation")
    figures: dict = {"profile": profile.name, "dataset": profile.dataset, "repetition": args.repetition, "runs": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(**values):
        figures.update(values)
        out.write_text(json.dumps(figures, indent=2))

    table = load_table(profile)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        images, table = preprocess_table(table, preprocess_config(profile), cache_dir=cache, progress=False)
        record(images=len(images), preprocess_seconds=time.perf_counter() - start)
    grades = table["grade"].to_numpy(np.int64)
    groups, pairs = photograph_groups(images, table, profile.duplicate_threshold)
    split = make_repetition_split(
        grades, args.repetition, sorted(set(fractions) | set(profile.fractions)), patient_ids=groups,
        n_folds=profile.folds, seed=profile.seed, validation_fraction=profile.validation_fraction, mode=profile.split_mode,
    )
    accelerator = accelerator_name()
    policy = precision_policy(profile.mixed_precision, accelerator=accelerator is not None)
    keras.mixed_precision.set_global_policy(policy)
    enable_compilation_cache(tempfile.mkdtemp(prefix="drnb-compiled-"))
    record(
        backend=keras.backend.backend(), keras_version=keras.__version__, device=accelerator or "CPU",
        precision_policy=policy, near_duplicate_pairs=len(pairs), test_images=len(split.test),
    )
    targets = encode(grades, profile.target).astype(np.float32)
    batch_size = profile.finetune_batch_size
    seed = profile.seed + args.repetition
    loss = "binary_crossentropy" if profile.target == "ordinal" else "categorical_crossentropy"

    def finetune(method: str, fraction: float, encoder_weights) -> dict:
        """One run: warm-up with the encoder frozen, full epochs, best validation epoch; its figures."""
        run_start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        encoder = build_encoder(profile.encoder, profile.image_size, pooling=profile.pooling)
        head = build_head(
            encoder.output_shape[-1], 5, hidden=profile.finetune_hidden, dropout=profile.finetune_dropout,
            activation="sigmoid" if profile.target == "ordinal" else "softmax", name="grade_head",
        )
        if encoder_weights is not None:
            encoder.set_weights(encoder_weights)
        classifier = stack(encoder, head)
        train_rows, validation_rows = split.train[fraction], split.validation_for(fraction)
        stream, rng = BatchStream(train_rows, batch_size, seed), np.random.default_rng(seed)
        history, best = [], {"kappa": -np.inf, "weights": None, "epoch": 0}
        phases = [("warmup", False)] * profile.warmup_epochs + [("full", True)] * profile.finetune_epochs
        for epoch, (phase, encoder_trains) in enumerate(phases, start=1):
            if epoch == 1 or phase != phases[epoch - 2][0]:
                encoder.trainable = encoder_trains
                classifier.compile(optimizer=keras.optimizers.Adam(profile.finetune_learning_rate), loss=loss)
            epoch_loss, seconds = fit_epoch(classifier, images, targets, stream.epoch(), rng, batch_size)
            row = {"epoch": epoch, "phase": phase, "loss": epoch_loss, "seconds": seconds}
            if len(validation_rows) and phase == "full":
                predicted = decode(predict_whole_batches(classifier, images[validation_rows], batch_size), profile.target)
                row["validation_qw_kappa"] = quadratic_weighted_kappa(grades[validation_rows], predicted)
                if row["validation_qw_kappa"] > best["kappa"]:
                    best = {"kappa": row["validation_qw_kappa"], "weights": classifier.get_weights(), "epoch": epoch}
            history.append(row)
        if best["weights"] is not None:
            classifier.set_weights(best["weights"])
        else:
            best["epoch"] = len(phases)
        probabilities = predict_whole_batches(classifier, images[split.test], batch_size)
        scores = evaluate_predictions(grades[split.test], decode(probabilities, profile.target), seed=seed)
        steps = stream.steps * len(phases)
        # A phase's first epoch includes its compilation: the median epoch is the steady rate, the excess the compile.
        steady, compile_seconds = {}, 0.0
        for phase in ("warmup", "full"):
            seconds = [r["seconds"] for r in history if r["phase"] == phase]
            if seconds:
                steady[phase] = float(np.median(seconds))
                compile_seconds += max(seconds[0] - steady[phase], 0.0)
        return {
            "method": method, "fraction": fraction, "n_train": len(train_rows), "n_validation": len(validation_rows),
            "n_test": len(split.test), "qw_kappa": scores["qw_kappa"], "accuracy": scores["accuracy"],
            "qw_kappa_ci": [scores["kappa_ci_low"], scores["kappa_ci_high"]], "best_epoch": best["epoch"],
            "steps": steps, "seconds": time.perf_counter() - run_start, "compile_seconds": compile_seconds,
            **{f"{phase}_images_per_second": stream.steps * batch_size / seconds for phase, seconds in steady.items()},
            "history": history,
        }

    def run_all(method: str, encoder_weights) -> None:
        """Every fraction of ``method`` while time is left."""
        for fraction in fractions:
            if time.perf_counter() > deadline:
                print(f"{method} {fraction:g}: skipped, out of time", flush=True)
                continue
            run = finetune(method, fraction, encoder_weights)
            figures["runs"].append(run)
            record()
            print(
                f"{method} {fraction:g}: QWK {run['qw_kappa']:.3f}, accuracy {run['accuracy']:.3f}, "
                f"{run['n_train']} images, best epoch {run['best_epoch']}, {run['seconds']:.0f} s", flush=True,
            )

    if "scratch" in methods:
        run_all("scratch", None)
    # Time kept for the rotation runs: the scratch runs' less their compilation, which the rotation runs repeat
    # with the same shapes (from JAX's compilation cache), plus a margin per run.
    reserve = sum(run["seconds"] - run["compile_seconds"] + RESERVE_MARGIN_SECONDS for run in figures["runs"])

    # The pretext: every image but a held-out set (patients and near-duplicates kept together), the test fold included,
    # as self-supervision on the unlabelled pool does.
    pretext_start = time.perf_counter()
    keras.utils.set_random_seed(profile.seed)
    encoder = build_encoder(profile.encoder, profile.image_size, pooling=profile.pooling)
    head = build_head(encoder.output_shape[-1], 4, hidden=profile.pretext_hidden, dropout=profile.pretext_dropout, name="rotation_head")
    pretext = stack(encoder, head, name="pretext")
    pretext.compile(optimizer=keras.optimizers.Adam(profile.pretext_learning_rate), loss="sparse_categorical_crossentropy")
    train_rows, heldout_rows = split_holdout(len(images), profile.pretext_holdout_fraction, profile.seed, groups)
    heldout = np.repeat(heldout_rows, 4)
    heldout_turns = np.tile(np.arange(4), len(heldout_rows))
    heldout_images = square_symmetries(images[heldout], heldout_turns)
    # all4: a batch holds batch/4 photographs, each in its four rotations (RotNet); random1: one random turn each.
    copies = 4 if profile.rotation_mode == "all4" else 1
    stream = BatchStream(train_rows, profile.pretext_batch_size // copies, profile.seed)
    rng = np.random.default_rng(profile.seed)
    pretext_deadline = deadline - reserve
    if args.pretext_seconds is not None:
        pretext_deadline = min(pretext_deadline, pretext_start + args.pretext_seconds)
    pretext_history = []
    for epoch in range(1, profile.pretext_epochs + 1):
        if not next_epoch_fits(time.perf_counter(), pretext_deadline, [row["seconds"] for row in pretext_history]):
            break
        rows = np.repeat(stream.epoch(), copies)
        turns = np.tile(np.arange(4), len(rows) // 4) if copies == 4 else rng.integers(0, 4, size=len(rows))
        start = time.perf_counter()
        history = pretext.fit(
            square_symmetries(images[rows], turns), turns, batch_size=profile.pretext_batch_size, epochs=1, shuffle=False, verbose=0
        )
        epoch_seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": float(history.history["loss"][-1]), "seconds": epoch_seconds}
        if epoch % profile.pretext_eval_every == 0 or epoch == profile.pretext_epochs:
            predicted = predict_whole_batches(pretext, heldout_images, profile.pretext_batch_size).argmax(axis=1)
            row["heldout_rotation_accuracy"] = float((predicted == heldout_turns).mean())
        pretext_history.append(row)
        record(pretext={"history": pretext_history})  # replaced by the summary below; kept if the run is cut short
        print(f"pretext epoch {epoch}: loss {row['loss']:.4f}, {epoch_seconds:.1f} s", flush=True)
    if pretext_history and "heldout_rotation_accuracy" not in pretext_history[-1]:
        predicted = predict_whole_batches(pretext, heldout_images, profile.pretext_batch_size).argmax(axis=1)
        pretext_history[-1]["heldout_rotation_accuracy"] = float((predicted == heldout_turns).mean())
    steady = np.median([r["seconds"] for r in pretext_history[1:]]) if len(pretext_history) > 1 else float("nan")
    record(
        pretext={
            "epochs": len(pretext_history), "profile_epochs": profile.pretext_epochs, "train_images": len(train_rows),
            "heldout_images": len(heldout_rows), "seconds": time.perf_counter() - pretext_start,
            "stopped_by": "epochs" if len(pretext_history) == profile.pretext_epochs else "time", "reserved_seconds": reserve,
            "images_per_second": stream.steps * stream.batch_size * copies / steady,
            "heldout_rotation_accuracy": pretext_history[-1]["heldout_rotation_accuracy"] if pretext_history else None,
            "history": pretext_history,
        },
    )
    print(f"pretext: {len(pretext_history)} epochs, held-out rotation accuracy {figures['pretext']['heldout_rotation_accuracy']}", flush=True)
    if pretext_history and "rotation" in methods:
        run_all("rotation", encoder.get_weights())
    record(total_seconds=time.perf_counter() - started)
    print(f"written {out}")


if __name__ == "__main__":
    main()
