"""What a sweep costs: its work counted from the runs' own plan, the rates that work runs at,
and the wall time they predict.

The work of a profile's sweep is counted, not guessed: every image each run trains on, encodes
and predicts, from the run's real splits and step plan (:func:`planned_work`). Rates are
measured: at length by ``benchmarks/run_benchmarks.py``, or in a few seconds by
:func:`probe_rates`, which ``drnb reproduce`` runs before it starts so that it can say how long
the sweep will take on this machine (:func:`predicted_sweep_seconds`).
"""

from __future__ import annotations

import math
import time

import numpy as np


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def forward_flops(model) -> float:
    """FLOPs of one image through ``model`` (convolutions and dense layers, 2 per multiply-add)."""
    import keras

    from drnb.models import leaf_layers

    total = 0.0
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.prod(layer.kernel.shape)
            out_h, out_w = layer.output.shape[1:3]
            total += 2.0 * kernel * out_h * out_w
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * np.prod(layer.kernel.shape)
    return total


def training_rates(trainer, dataset, batch_size: int, steps: int, phase: str = "full", rounds: int = 5) -> dict:
    """Images/s through the drnb pipeline and on one constant batch, same traced step.

    The machine's speed drifts by 10-30 % within a minute (shared host, clock changes), more
    than the overhead being measured. So the two are measured in ``rounds`` alternating
    blocks of ``steps // rounds`` steps, each pipeline block beside a constant-batch block,
    and the ratio is the median of the per-round ratios; the rates are medians too.
    """
    import tensorflow as tf

    batches = trainer.batches(dataset)
    start = time.perf_counter()
    trainer.train(batches, 1, phase=phase)  # traces the step
    tracing = time.perf_counter() - start
    images, targets = next(iter(dataset))
    constant = trainer.batches(tf.data.Dataset.from_tensors((images, targets)).repeat())
    trainer.train(batches, 3, phase=phase)  # warm caches
    trainer.train(constant, 3, phase=phase)
    block = max(2, steps // rounds)
    pipeline, bare = [], []
    for _ in range(rounds):
        pipeline.append(trainer.train(batches, block, phase=phase).images_per_second)
        bare.append(trainer.train(constant, block, phase=phase).images_per_second)
    return {
        "tracing_seconds": tracing,
        "drnb_images_per_second": float(np.median(pipeline)),
        "bare_images_per_second": float(np.median(bare)),
        "ratio": float(np.median(np.array(pipeline) / np.array(bare))),
        "ratio_rounds": [round(float(p / b), 3) for p, b in zip(pipeline, bare)],
    }


RIDGE_TIMING_ROWS = (2_048, 16_384)


def ridge_fit_timing(n_features: int, views: int, rows: tuple[int, int] = RIDGE_TIMING_ROWS) -> dict:
    """A ridge head's fit (:func:`drnb.ridge.fit_ridge`) timed on random features at two sizes.

    Its cost is about fixed plus linear in the rows (the (F, F) Gram matrix and the left-out
    blocks), so two sizes give both parts.

    Parameters
    ----------
    n_features : int
        The encoder's pooled width F.
    views : int
        Rows per image (the profile's ``test_time_turns``), left out together as in the runs.
    rows : (int, int)
        The two sizes timed, in rows.

    Returns
    -------
    dict
        ``ridge_fit_seconds`` (per fit, >= 0) and ``ridge_seconds_per_row``.
    """
    from drnb.ridge import fit_ridge

    rng = np.random.default_rng(0)
    seconds = []
    for count in rows:
        images = count // views
        features = rng.normal(size=(images * views, n_features)).astype(np.float32)
        grades = np.tile(rng.integers(0, 5, images), views).astype(np.float32)
        start = time.perf_counter()
        fit_ridge(features, grades, groups=np.tile(np.arange(images), views), criterion="correlation")
        seconds.append(time.perf_counter() - start)
    per_row = max((seconds[1] - seconds[0]) / (rows[1] - rows[0]), 1e-12)
    return {"ridge_fit_seconds": max(seconds[0] - per_row * rows[0], 0.0), "ridge_seconds_per_row": per_row}


def planned_work(profile, session, n_images: int, walkthrough: bool = True, archive_images: int = 0) -> dict:
    """What a ``drnb reproduce`` sweep of ``profile`` trains and predicts, counted, not guessed.

    Pretext: for each pretext method, its epochs x steps per epoch, as
    :func:`drnb.pretext.train_pretext` plans them on the study's ``n_images`` and
    ``archive_images`` more (each its own group when held out), and the held-out views it
    scores (every ``pretext_eval_every`` epochs and after the last). Fine-tuning: for every method, protocol, fraction and repetition, the run's real labelled
    subset (from ``session``'s splits) through
    :func:`drnb.finetune.plan_steps`; the validation images scored after each full epoch; the
    images the cut points are fitted on; the test fold (each of these three
    ``test_time_turns`` times). Features for a ridge-fitted head (in each of the
    ``test_time_turns`` views), and, for a run of the
    ``linear`` protocol, which never trains its encoder, the features its predictions read, are
    encoded once per row, view and starting encoder over the whole sweep, as the notebooks
    share them (:mod:`drnb.features`): one encoder for the methods that start every run from
    the same weights (:func:`drnb.finetune.starts_shared`), one per repetition for a fresh
    encoder (the same seeded initialisation, re-estimated on the same calibration images, at
    every fraction); a fresh encoder's batch-norm re-estimate passes the run's calibration
    images once per run, a shared fresh encoder's its unlabelled calibration images once per
    notebook. A ridge-fitted head is one fit per run on its training subset's rows in every
    view. With ``walkthrough``, the first fraction's notebook also walks through repetition 0 of
    the first method and protocol before its sweep, training and predicting that run once more
    (its features are the sweep's, kept), as ``drnb reproduce`` runs it.

    Returns
    -------
    dict
        Image counts per kind of work (``archive_images`` to preprocess, ``pretext_train``, ``pretext_predict``,
        ``finetune_full``, ``finetune_head``, ``finetune_encode``
        (features), ``finetune_predict`` (through the network)), the ridge fits and their
        rows (``ridge_fits``, ``ridge_rows``), the number of fine-tuning runs, of fresh
        encoders built (``fresh_encoders``: one per run, or one per notebook for a shared
        scratch encoder), of pretext tasks (``pretexts``) and of notebooks, and ``images`` (``n_images``).
    """
    from drnb.finetune import (
        PRETEXT_METHODS, full_epochs, plan_steps, runnable_methods, shares_fresh_encoder, starts_shared, symmetry_views,
    )

    work = {
        **pretext_work(profile, session, n_images, archive_images),
        "finetune_full": 0, "finetune_head": 0, "finetune_encode": 0, "finetune_predict": 0,
        "ridge_fits": 0, "ridge_rows": 0,
    }
    methods = runnable_methods(profile)
    test_views = symmetry_views(profile.test_time_turns)
    fit_views = test_views if profile.head_init == "ridge" else ()
    fresh = sum(not starts_shared(method, profile) for method in methods)  # a fresh encoder per run
    # A fresh encoder every run of a method shares (scratch_encoder="shared"): built, and its
    # batch norm re-estimated, once per notebook.
    shared_fresh = sum(shares_fresh_encoder(method, profile) for method in methods)
    if profile.recalibrate_batchnorm:
        work["finetune_predict"] += shared_fresh * len(profile.fractions) * len(session.unlabelled_calibration_rows())
    encoded = {}  # (starting encoder, view) -> rows encoded, over every notebook of the sweep
    for fraction in profile.fractions:
        for repetition in range(profile.repetitions):
            split = session.split(repetition, fraction)
            train = split.train[fraction]
            batch = min(session.batch_size, len(train))
            calibration = session.calibration_rows(split, profile.seed + repetition)
            for protocol in profile.protocols:
                # The runs this (repetition, protocol) trains: one per method, and the walkthrough's.
                walks = walkthrough and fraction == profile.fractions[0] and repetition == 0 and protocol == profile.protocols[0]
                runs = len(methods) + walks
                warmup_steps, finetune_steps = plan_steps(len(train), batch, profile, protocol)
                trains = protocol == "finetune"  # predicts through the network; a linear run reads features
                epochs = full_epochs(profile, protocol)
                scored = [split.test] + [split.validation_for(fraction)] * epochs
                if profile.cut_points == "prior":
                    scored.append(calibration)
                # The labelled subset's non-referable images that set the referable-DR threshold.
                scored.append(session.operating_point_rows(train, profile.seed + repetition))
                predicted = sum(len(rows) for rows in scored) * len(test_views)  # each image in every view averaged
                if profile.recalibrate_batchnorm:  # fresh encoders only
                    work["finetune_predict"] += fresh * len(calibration)
                for method in methods:
                    encoder = method if starts_shared(method, profile) else (method, repetition)
                    for view in fit_views:
                        encoded.setdefault((encoder, view), set()).update(train.tolist())
                    if not trains:
                        for view in test_views:
                            encoded.setdefault((encoder, view), set()).update(np.concatenate(scored).tolist())
                work["finetune_predict"] += runs * predicted if trains else 0
                warmup_images = profile.warmup_epochs * warmup_steps * batch
                work["finetune_head"] += runs * warmup_images
                work["finetune_full"] += runs * epochs * finetune_steps * batch
                if fit_views:
                    work["ridge_fits"] += runs
                    work["ridge_rows"] += runs * len(fit_views) * len(train)
    work["finetune_encode"] = sum(len(rows) for rows in encoded.values())
    runs_per_notebook = profile.repetitions * len(profile.protocols)
    work["runs"] = len(methods) * len(profile.fractions) * runs_per_notebook
    built_per_run = sum(method not in PRETEXT_METHODS for method in methods) - shared_fresh  # ImageNet's too
    work["fresh_encoders"] = (built_per_run * runs_per_notebook + shared_fresh) * len(profile.fractions)
    work["notebooks"] = 2 + (work["pretexts"] > 0) + len(profile.fractions)
    work["images"] = n_images
    return work


def pretext_work(profile, session, n_images: int, archive_images: int) -> dict:
    """The pretext notebook's share of :func:`planned_work`: ``pretexts`` (tasks trained),
    ``archive_images`` (preprocessed for them), ``pretext_train`` and ``pretext_predict`` images."""
    from drnb.distribute import scaled_batch_and_rate
    from drnb.finetune import pretext_methods
    from drnb.pretext import HOLDOUT_FRACTION, planned_epochs
    from drnb.pretexts import PRETEXT_TASKS
    from drnb.splits import split_holdout

    methods = pretext_methods(profile)
    archive_images = archive_images if methods else 0
    # The session's groups are the pretext's (patients and near duplicates) in the stratified
    # split mode; an archive photograph is its own group.
    groups = session.patient_ids
    if groups is not None and archive_images:
        groups = np.concatenate([groups, np.array([f"archive {i}" for i in range(archive_images)], dtype=object)])
    pretext_train, holdout = split_holdout(n_images + archive_images, HOLDOUT_FRACTION, profile.seed, groups)
    # Batches are per replica; the global batch grows with the replicas, as in the runs.
    batch, _ = scaled_batch_and_rate(profile.pretext_batch_size, profile.pretext_learning_rate, session.strategy)
    work = {"pretexts": len(methods), "archive_images": archive_images, "pretext_train": 0, "pretext_predict": 0}
    for method in methods:
        task = PRETEXT_TASKS[method]
        views_per_epoch = len(pretext_train) * task.views_per_image(profile)
        epochs = planned_epochs(profile, views_per_epoch)
        work["pretext_train"] += epochs * max(1, math.ceil(views_per_epoch / batch)) * batch
        # Held-out views are scored every pretext_eval_every epochs and after the last.
        scored = len(holdout) or min(len(pretext_train), 64)
        work["pretext_predict"] += math.ceil(epochs / profile.pretext_eval_every) * task.scored_views_per_image * scored
    return work


def predicted_sweep_seconds(work: dict, rates: dict, fixed: dict) -> dict:
    """Seconds per stage of a first ``drnb reproduce`` sweep: each kind of work at its measured rate.

    Parameters
    ----------
    work : dict
        From :func:`planned_work`.
    rates : dict
        Images/s: ``preprocess`` (from files), ``pretext_train``, ``finetune_full``,
        ``finetune_head``, ``encode`` (features, in any view) and
        ``predict`` (inference); rows/s of a ridge fit, ``ridge_rows``.
    fixed : dict
        Seconds: ``kernel`` (a notebook's kernel start and imports), ``load`` (reading the
        cached images), ``pretext_tracing`` and ``finetune_tracing`` (once per notebook that
        trains), ``fresh_model`` (building a fresh encoder and head for a run), ``ridge_fit``
        (a ridge fit's cost beyond its rows), optionally ``run`` (a run's cost beyond its work).

    Returns
    -------
    dict
        Seconds for ``data`` (notebook 01, preprocessing from the files), ``pretext`` (02),
        ``finetune`` (all of 03), ``analysis`` (04, counted as a kernel start) and ``total``.
    """
    data = fixed["kernel"] + work["images"] / rates["preprocess"]
    pretext = (
        (fixed["kernel"] + fixed["load"]) * (work["pretexts"] > 0) + fixed["pretext_tracing"] * work["pretexts"]
        + work["archive_images"] / rates["preprocess"]
        + work["pretext_train"] / rates["pretext_train"] + work["pretext_predict"] / rates["predict"]
    )
    fractions = work["notebooks"] - 2 - (work["pretexts"] > 0)
    finetune = (
        fractions * (fixed["kernel"] + fixed["load"] + fixed["finetune_tracing"])
        + work["fresh_encoders"] * fixed["fresh_model"]
        + work["finetune_full"] / rates["finetune_full"]
        + work["finetune_head"] / rates["finetune_head"]
        + work["finetune_encode"] / rates["encode"]
        + work["finetune_predict"] / rates["predict"]
        + work["ridge_fits"] * fixed["ridge_fit"] + work["ridge_rows"] / rates["ridge_rows"]
        + work["runs"] * fixed.get("run", 0.0)
    )
    stages = {"data": data, "pretext": pretext, "finetune": finetune, "analysis": fixed["kernel"]}
    stages["total"] = sum(stages.values())
    return stages


def sweep_rates(figures: dict) -> dict:
    """The images/s :func:`predicted_sweep_seconds` needs, from a benchmark's figures.

    Each training rate is the one measured through drnb's pipeline when the figures have it
    (this script), else that of Keras's own ``fit`` over arrays in memory, else that of one
    batch at a time (``accelerator_rates.py``, on a machine without TensorFlow).

    Raises
    ------
    ValueError
        Naming the figure missing, e.g. of a measurement cut short.
    """
    def first_of(*names):
        for name in names:
            if name in figures:
                return figures[name]
        raise ValueError(f"the figures have none of {list(names)}: was the measurement cut short?")

    rates = {"preprocess": first_of("preprocess_uncached_images_per_second"), "predict": first_of("predict_images_per_second")}
    # Features through the views' pipeline where measured (here), else the network's inference rate.
    rates["encode"] = first_of("encode_images_per_second", "predict_images_per_second")
    # Figures measured before ridge fits were timed have none; see check_ridge_timing.
    rates["ridge_rows"] = 1 / figures["ridge_seconds_per_row"] if "ridge_seconds_per_row" in figures else float("inf")
    for phase, key in (("pretext", "pretext_train"), ("finetune_full", "finetune_full"), ("finetune_head", "finetune_head")):
        rates[key] = first_of(*(f"{phase}_{kind}_images_per_second" for kind in ("drnb", "fit", "bare")))
    return rates


def check_ridge_timing(work: dict, figures: dict, source: str) -> None:
    """Refuse to predict a sweep that fits ridge heads from figures that never timed a fit.

    Raises
    ------
    ValueError
        Naming ``source`` (where the figures come from) and the fits they would leave out.
    """
    if work["ridge_fits"] and "ridge_seconds_per_row" not in figures:
        raise ValueError(
            f"{source} has no ridge fit timing (ridge_seconds_per_row), but the sweep fits {work['ridge_fits']} ridge "
            "heads: measure the rates again with this version of the benchmark"
        )




# --------------------------------------------------------------------------------------------
# The start-of-run prediction: a few seconds of measurement on this machine
# --------------------------------------------------------------------------------------------

PROBE_STEPS = 6  # timed steps per kind of training, after the step that traces


def sweep_fixed_seconds(figures: dict, profile, n_images: int) -> dict:
    """The fixed costs :func:`predicted_sweep_seconds` adds for a set of ``n_images``, from
    measured ``figures``."""
    return {
        # accelerator_rates.py times an interpreter's imports, not a Jupyter kernel's start.
        "kernel": figures["kernel_start_and_import_seconds"] if "kernel_start_and_import_seconds" in figures
        else figures["python_import_seconds"],
        "load": n_images / figures["preprocess_cached_images_per_second"],
        "pretext_tracing": figures["pretext_tracing_seconds"],
        # Only the phases the profile has are traced (none when it never trains its encoder or head).
        "finetune_tracing": figures["finetune_full_tracing_seconds"] * ("finetune" in profile.protocols)
        + figures["finetune_head_tracing_seconds"] * (profile.warmup_epochs > 0) + figures["predict_tracing_seconds"],
        "fresh_model": figures["fresh_model_seconds"],
        "ridge_fit": figures.get("ridge_fit_seconds", 0.0),
        # Measured by the start-of-run probe; the benchmark leaves it out.
        "run": figures.get("run_overhead_seconds", 0.0),
    }


def work_gflop(work: dict, figures: dict) -> dict:
    """GFLOP per stage of ``work``: training images x ``*_training_gflop_per_image``, inference
    images (encoded, predicted) x a third of the fine-tuning network's (forward only)."""
    pretext, finetune = figures["pretext_training_gflop_per_image"], figures["finetune_training_gflop_per_image"]
    return {
        "pretext_gflop": work["pretext_train"] * pretext + work["pretext_predict"] * pretext / 3,
        "finetune_gflop": (work["finetune_full"] + work["finetune_head"]) * finetune
        + (work["finetune_encode"] + work["finetune_predict"]) * finetune / 3,
    }


def _probe_training(trainer, batches, steps: int, phase: str) -> tuple[float, float]:
    """(seconds of the first, tracing step; images/s over ``steps`` more) of ``trainer`` on
    ``batches``; two steps between them drain what the input pipeline prefetched while the
    step was traced, which would otherwise pass for training speed."""
    start = time.perf_counter()
    trainer.train(batches, 1, phase=phase)
    tracing = time.perf_counter() - start
    trainer.train(batches, 2, phase=phase)
    return tracing, trainer.train(batches, steps, phase=phase).images_per_second


def _probe_run_overhead(profile, session) -> float:
    """Seconds a run spends besides its counted work (scoring with bootstrap intervals, the
    referable-DR threshold, writing its files, resetting weights): a ``linear`` run of a
    fresh encoder with a ridge head, whose own work is a few hundred features, timed after a
    first one has traced its functions. 0 for a profile that has no such cheap run."""
    import tempfile
    from pathlib import Path

    if not ("linear" in profile.protocols and profile.head_init == "ridge" and "scratch" in profile.methods):
        return 0.0
    with tempfile.TemporaryDirectory() as folder:
        session.run("scratch", profile.fractions[0], 0, Path(folder) / "first", protocol="linear")
        return timed(lambda: session.run("scratch", profile.fractions[0], 1 % profile.repetitions, Path(folder) / "second",
                                         protocol="linear"))


def _probe_preprocessing(profile, table, figures: dict) -> None:
    """Uncached and cached preprocessing rates: the whole set when it is in the cache (read
    back), else a few photographs read and preprocessed on one core, times the cores, and
    read back from a file."""
    import os
    import tempfile
    from pathlib import Path

    from drnb.datasets import read_image
    from drnb.preprocessing import cache_key, default_cache_dir, preprocess_image, preprocess_table
    from drnb.runs import preprocess_config

    config = preprocess_config(profile)
    if (Path(default_cache_dir()) / f"fundus_{cache_key(table, config)}.npy").exists():
        seconds = timed(lambda: preprocess_table(table, config, drop_unreadable=profile.drop_unreadable, progress=False))
        figures["preprocess_cached_images_per_second"] = figures["preprocess_uncached_images_per_second"] = len(table) / seconds
        return
    sample = table["path"].iloc[:: max(1, len(table) // 8)].iloc[:8].tolist()
    start = time.perf_counter()
    preprocessed = np.stack([preprocess_image(read_image(path), config) for path in sample])
    figures["preprocess_uncached_images_per_second"] = len(sample) / (time.perf_counter() - start) * (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as folder:  # a cached set is read back as one array
        np.save(Path(folder) / "sample.npy", preprocessed)
        figures["preprocess_cached_images_per_second"] = len(sample) / timed(lambda: np.load(Path(folder) / "sample.npy"))


def probe_rates(profile, table, *, import_seconds: float, kernel_seconds: float, steps: int = PROBE_STEPS) -> tuple[dict, object]:
    """The figures :func:`predicted_sweep_seconds` needs, measured in seconds on this machine.

    The networks are the profile's, at its image size and batch sizes, trained for ``steps``
    steps on blank images (the rate of a step does not depend on what the pixels show); the
    sweep's splits come from ``table`` (its grades and patients; near duplicates, which move a
    few photographs between folds, are not searched for).

    Parameters
    ----------
    table : pandas.DataFrame
        The study's table (:func:`drnb.runs.load_table`).
    import_seconds, kernel_seconds : float
        Measured by the caller: importing drnb's training modules, and starting a bare kernel.

    Returns
    -------
    figures : dict
        In :func:`sweep_rates`' and :func:`sweep_fixed_seconds`' names.
    session : drnb.finetune.FinetuneSession
        On the blank images, for :func:`planned_work`.
    """
    import tensorflow as tf

    from drnb.finetune import FINETUNE_AUGMENT, FinetuneSession, pretext_methods
    from drnb.models import grade_head, profile_encoder
    from drnb.pipeline import labelled_batches
    from drnb.pretext import build_pretext_trainer
    from drnb.pretexts import PRETEXT_TASKS
    from drnb.targets import encode

    figures = {"kernel_start_and_import_seconds": import_seconds + kernel_seconds}
    _probe_preprocessing(profile, table, figures)
    size = profile.image_size
    blank = np.zeros((len(table), size, size, 3), np.uint8)
    session = FinetuneSession(blank, table, profile.derive(duplicate_threshold=0.0), log=lambda line: None)
    sample = tf.constant(blank[: 4 * max(profile.pretext_batch_size, profile.finetune_batch_size)])
    rows = np.arange(len(sample))
    figures["pretext_tracing_seconds"] = figures["pretext_training_gflop_per_image"] = 0.0
    figures["pretext_drnb_images_per_second"] = float("inf")
    methods = pretext_methods(profile)
    if methods:  # every task at the first's rate
        task = PRETEXT_TASKS[methods[0]]
        trainer = build_pretext_trainer(profile, task)
        batches = trainer.batches(task.batches(sample, rows, profile.pretext_batch_size, profile, profile.seed))
        tracing, rate = _probe_training(trainer, batches, steps, "full")
        figures.update(pretext_tracing_seconds=tracing, pretext_drnb_images_per_second=rate,
                       pretext_training_gflop_per_image=3 * forward_flops(trainer.model) / 1e9)
    targets = encode(np.zeros(len(sample), np.int64), profile.target)
    batches = session.trainer.batches(labelled_batches(
        sample, rows, targets, profile.finetune_batch_size, seed=0, training=True, augment_options=FINETUNE_AUGMENT))
    for phase in ("head", "full"):
        figures[f"finetune_{phase}_tracing_seconds"], figures[f"finetune_{phase}_drnb_images_per_second"] = (
            _probe_training(session.trainer, batches, steps, phase))
    figures["finetune_training_gflop_per_image"] = 3 * forward_flops(session.trainer.model) / 1e9
    inference = labelled_batches(sample, rows, targets, profile.finetune_batch_size, seed=0, training=False)
    figures["predict_tracing_seconds"] = timed(lambda: session.trainer.predict(inference))
    figures["predict_images_per_second"] = len(rows) / timed(lambda: session.trainer.predict(inference))
    figures["fresh_model_seconds"] = timed(lambda: grade_head(profile_encoder(profile).output_shape[-1], profile))
    if profile.head_init == "ridge":
        width = session.trainer.encoder.output_shape[-1]
        figures.update(ridge_fit_timing(width, profile.test_time_turns, rows=(256, 2048)))
    figures["run_overhead_seconds"] = _probe_run_overhead(profile, session)
    return figures, session


def predict_sweep(profile, table, *, import_seconds: float, kernel_seconds: float) -> dict:
    """Seconds per stage of ``profile``'s sweep on this machine, as ``drnb reproduce`` runs it
    (the walkthrough in the first fraction's notebook, the archive's photographs preprocessed
    and learned from), from :func:`probe_rates`; with the work it counts (image-steps per
    kind, GFLOP per stage) and the probe's own seconds."""
    from drnb.archive import archive_table

    start = time.perf_counter()
    figures, session = probe_rates(profile, table, import_seconds=import_seconds, kernel_seconds=kernel_seconds)
    # The archive's photographs as listed (its near duplicates of study photographs, left out later, are few).
    archive_images = len(archive_table(profile.pretext_images, drop_missing=profile.drop_missing)) if profile.pretext_images else 0
    work = planned_work(profile, session, len(table), archive_images=archive_images)
    seconds = predicted_sweep_seconds(work, sweep_rates(figures), sweep_fixed_seconds(figures, profile, len(table)))
    return {**seconds, **work, **work_gflop(work, figures), "probe_seconds": time.perf_counter() - start + import_seconds}


def describe_prediction(prediction: dict) -> str:
    """One line for the start of a run: the predicted total and its stages, in minutes."""
    def minutes(seconds):
        return f"{seconds / 60:.1f} min"

    return (
        f"predicted on this machine: {minutes(prediction['total'])} (data {minutes(prediction['data'])}, "
        f"pretext {minutes(prediction['pretext'])}, fine-tuning {minutes(prediction['finetune'])}, "
        f"analysis {minutes(prediction['analysis'])}), from {prediction['probe_seconds']:.0f} s of measurement"
    )


PREDICT_COMMAND = (
    "import sys, time; start = time.perf_counter(); import drnb.finetune, drnb.pretext; "
    "from drnb.workload import main; main(sys.argv[1:], import_seconds=time.perf_counter() - start)"
)
"""``python -c PREDICT_COMMAND RUN_DIR KERNEL``: the prediction, with the imports timed as a
kernel meets them (``import drnb`` imports TensorFlow, so ``-m drnb.workload`` could not time it)."""


def main(argv, import_seconds: float) -> None:
    """Print the prediction for the run folder ``argv[0]``'s profile, with notebooks run in
    kernel ``argv[1]``, as one JSON line."""
    import json

    from jupyter_client.manager import start_new_kernel

    from drnb.runs import load_table, open_run

    run_dir, kernel = argv[:2]
    _, profile = open_run(run_dir, create=False)
    start = time.perf_counter()
    manager, client = start_new_kernel(kernel_name=kernel)
    client.stop_channels()
    manager.shutdown_kernel(now=True)
    kernel_seconds = time.perf_counter() - start
    table = load_table(profile)
    prediction = predict_sweep(profile, table, import_seconds=import_seconds, kernel_seconds=kernel_seconds)
    print(json.dumps({key: float(value) for key, value in prediction.items()}))
