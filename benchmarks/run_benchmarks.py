"""Where the time goes: throughput, overhead ratios and fixed costs of a drnb profile.

Prints a table and writes JSON (default ``benchmarks/results/<profile>-<dataset>.json``).
Run it on an otherwise idle machine: the two cores are shared by everything.

    python benchmarks/run_benchmarks.py --profile quick
    python benchmarks/run_benchmarks.py --profile quick --dataset eyepacs2015 --data-dir ../shared/data/eyepacs
    python benchmarks/run_benchmarks.py --profile smoke --end-to-end smoke,quick
    python benchmarks/run_benchmarks.py --profile paper --input-only     # no training: fits a CPU
    python benchmarks/run_benchmarks.py --profile paper --rates gpu.json  # rates from accelerator_rates.py

Measured:
- input pipeline: images/s preprocessing from files (empty cache), loading the cache, seconds
  per APTOS-sized (3216 x 2136 PNG) photograph, and
  the augmenting ``tf.data`` pipeline alone;
- training images/s of the profile's encoder inside drnb (pipeline + traced step) against the
  same step on one constant in-memory batch; the ratio is the pipeline's overhead (>= 0.9);
- achieved training FLOP/s (forward FLOPs counted from layer shapes, x3 for training) against
  a float32 NumPy matmul measured in the same run;
- fixed costs: interpreter + imports, a Jupyter kernel start, graph tracing per model;
- the predicted wall time of the profile's whole sweep on this dataset: every image the
  sweep trains on and predicts, counted from its real splits and step plan, at the rates
  measured above, plus the fixed costs per notebook; and the same with APTOS-sized PNGs to
  decode. On a GPU this tells in minutes whether ``paper`` fits its two hours;
- optionally the end-to-end wall time of ``drnb reproduce`` for some profiles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``a @ b`` rate in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.random((size, size), dtype=np.float32), rng.random((size, size), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
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


def pipeline_rate(dataset, batches: int) -> float:
    """Images/s of a ``tf.data`` pipeline alone (no model)."""
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    count = sum(int(next(iterator)[0].shape[0]) for _ in range(batches))
    return count / (time.perf_counter() - start)


def large_photograph_seconds(repeats: int = 3, image_size: int = 128) -> float:
    """Seconds to read and preprocess one APTOS-sized photograph (3216 x 2136 PNG) on one core.

    APTOS 2019's largest photographs are this size; decoding the PNG dominates. The image is a
    synthetic fundus upsampled into the frame, cut flat at top and bottom, with pixel noise so
    that it compresses about as badly as a photograph.
    """
    from PIL import Image

    from drnb.datasets import read_image
    from drnb.preprocessing import PreprocessConfig, preprocess_image
    from drnb.synthetic import make_fundus

    rng = np.random.default_rng(0)
    disc = Image.fromarray(make_fundus(2, size=512, rng=rng, clip=0.1)).resize((2136, 2136), Image.Resampling.BILINEAR)
    photograph = np.zeros((2136, 3216, 3), dtype=np.uint8)
    photograph[:, 540:2676] = np.asarray(disc)
    noise = rng.integers(-4, 5, size=photograph.shape)
    photograph = np.where(photograph > 0, np.clip(photograph + noise, 1, 255), 0).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "large.png")
        Image.fromarray(photograph).save(path)
        config = PreprocessConfig(size=image_size)
        return min(_timed(lambda: preprocess_image(read_image(path), config)) for _ in range(repeats))


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
    view. With ``walkthrough``, each fraction's notebook also walks through repetition 0 of the
    first method and protocol before its sweep, training and predicting that run once more (its
    features are the sweep's, kept).

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
        **_pretext_work(profile, session, n_images, archive_images),
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
                # The runs this (repetition, protocol) trains: one per method, and notebook 03's walkthrough.
                runs = len(methods) + (walkthrough and repetition == 0 and protocol == profile.protocols[0])
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


def _pretext_work(profile, session, n_images: int, archive_images: int) -> dict:
    """The pretext notebook's share of :func:`planned_work`: ``pretexts`` (tasks trained),
    ``archive_images`` (preprocessed for them), ``pretext_train`` and ``pretext_predict`` images."""
    import math

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
        (a ridge fit's cost beyond its rows).

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


def predicted_figures(figures: dict, profile, session, n_images: int, source: str = "the figures", archive_images: int = 0) -> dict:
    """The sweep's predicted minutes per stage from measured rates and fixed costs, and the
    total if the photographs were APTOS-sized PNGs (decoded on every core of the machine
    measured); with ``archive_images``, the pretext also preprocesses and trains on that many
    unlabelled photographs."""
    import os
    import re

    rates = sweep_rates(figures)
    warmup_tracing = figures["finetune_head_tracing_seconds"]
    fixed = {
        # accelerator_rates.py times an interpreter's imports, not a Jupyter kernel's start.
        "kernel": figures.get("kernel_start_and_import_seconds", figures["python_import_seconds"]),
        "load": n_images / figures["preprocess_cached_images_per_second"],
        "pretext_tracing": figures["pretext_tracing_seconds"],
        # Only the phases the profile has are traced (none when it never trains its encoder or head).
        "finetune_tracing": figures["finetune_full_tracing_seconds"] * ("finetune" in profile.protocols)
        + warmup_tracing * (profile.warmup_epochs > 0) + figures["predict_tracing_seconds"],
        "fresh_model": figures["fresh_model_seconds"],
        "ridge_fit": figures.get("ridge_fit_seconds", 0.0),
    }
    work = planned_work(profile, session, n_images, archive_images=archive_images)
    check_ridge_timing(work, figures, source)
    stages = predicted_sweep_seconds(work, rates, fixed)
    predicted = {f"predicted_{stage}_minutes": seconds / 60 for stage, seconds in stages.items()}
    decoding = n_images / rates["preprocess"]
    # Figures from another machine name its cores ("cpu_cores", or "(16 CPU cores)" in "devices").
    named = re.search(r"\((\d+) CPU cores\)", figures.get("devices", ""))
    cores = figures.get("cpu_cores") or (int(named.group(1)) if named else os.cpu_count() or 1)
    aptos_decoding = n_images * figures["preprocess_aptos_sized_photograph_seconds"] / cores
    predicted["predicted_total_minutes_if_aptos_sized"] = (stages["total"] - decoding + aptos_decoding) / 60
    return predicted


def scaled_prediction(figures: dict, profile, images: np.ndarray, table, n_images: int, archive_images: int = 0) -> dict:
    """The sweep's predicted minutes on a set of ``n_images`` with this set's grade proportions.

    The set's rows are repeated (or cut) to ``n_images`` and split as the sweep would split
    them, without the near-duplicate search (every repeated photograph would be found as a
    duplicate of itself), so that every count of :func:`planned_work` is that of the larger set.

    Returns
    -------
    dict
        :func:`predicted_figures`' keys, ``predicted_`` becoming ``predicted_<n_images>_images_``.
    """
    from drnb.finetune import FinetuneSession

    rows = np.resize(np.arange(len(images)), n_images)
    scaled_table = table.iloc[rows].reset_index(drop=True).assign(image_id=[str(i) for i in range(n_images)], patient_id=None)
    scaled = profile.derive(duplicate_threshold=0.0)
    session = FinetuneSession(images[rows], scaled_table, scaled, log=lambda line: None)
    predicted = predicted_figures(figures, scaled, session, n_images, archive_images=archive_images)
    return {key.replace("predicted_", f"predicted_{n_images}_images_", 1): value for key, value in predicted.items()}


def import_seconds() -> float:
    """A fresh interpreter importing drnb's training modules (TensorFlow included)."""
    return _timed(lambda: subprocess.run([sys.executable, "-c", "import drnb.finetune, drnb.pretext"], check=True))


def kernel_start_seconds() -> float:
    """Start a Jupyter kernel and import drnb in it, as each papermill notebook does."""
    from jupyter_client.manager import start_new_kernel

    start = time.perf_counter()
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        client.execute_interactive("import drnb.finetune, drnb.pretext", timeout=300)
        return time.perf_counter() - start
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def end_to_end_seconds(profile: str, dataset: str | None, data_dir: str | None) -> float:
    """Wall time of ``drnb reproduce`` for ``profile`` in a temporary run folder."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "drnb", "reproduce", "--profile", profile, "--out", folder]
        if dataset:
            command += ["--dataset", dataset]
        if data_dir:
            command += ["--data-dir", data_dir]
        return _timed(lambda: subprocess.run(command, check=True))


def add_profile_arguments(parser, *, default: str, what: str, assignments: bool = True) -> None:
    """The options every benchmark script resolves its profile from (see :func:`profile_from`).

    ``--profile`` (default ``default``; ``what`` says what is done with it), ``--dataset``,
    ``--data-dir`` and, with ``assignments``, repeatable ``--set KEY=VALUE``.
    """
    parser.add_argument("--profile", default=default, help=f"profile whose {what}")
    parser.add_argument("--dataset", help="dataset (default: the profile's)")
    parser.add_argument("--data-dir", help="the dataset's folder")
    if assignments:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile setting (repeatable)")


def profile_from(args, assignments=()):
    """The ``--profile`` named on the command line, with ``--dataset``, ``--data-dir`` and
    ``KEY=VALUE`` ``assignments`` (``--set``) applied."""
    from drnb.profiles import parse_assignments, resolve_profile

    overrides = {key: value for key, value in {"dataset": args.dataset, "data_dir": args.data_dir}.items() if value}
    return resolve_profile(args.profile, {**overrides, **parse_assignments(list(assignments))})


def predict_from_rates(args) -> None:
    """``--rates FILE``: the profile's sweep on this dataset at rates measured on another machine.

    The work is counted here, from the dataset's real splits (see :func:`planned_work`); the
    rates and fixed costs are the file's.
    """
    from drnb.finetune import FinetuneSession
    from drnb.runs import load_images

    profile = profile_from(args)
    figures = json.loads(Path(args.rates).read_text())
    if figures.get("profile") != profile.name:
        raise ValueError(f"{args.rates}: measured for profile {figures.get('profile')!r}, not --profile {profile.name!r}")
    images, table = load_images(profile, log=lambda line: None)
    session = FinetuneSession(images, table, profile, log=lambda line: None)
    predicted = {"rates_from": str(args.rates), "measured_on": figures.get("devices", "?"), "dataset": profile.dataset,
                 "images": len(images), "archive_images": args.archive_images,
                 **predicted_figures(figures, profile, session, len(images), source=str(args.rates), archive_images=args.archive_images)}
    if args.predict_images:
        predicted.update(scaled_prediction(figures, profile, images, table, args.predict_images, args.archive_images))
    _report(predicted, args.json or Path(__file__).parent / "results" / f"{profile.name}-{profile.dataset}-predicted.json")


def format_figure(value) -> str:
    """A figure as printed: floats to three decimals, or three significant digits when smaller
    than 0.01 (seconds per row), anything else as it is."""
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def _report(figures: dict, path) -> None:
    """Print the figures as a table and write them as JSON to ``path``."""
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {format_figure(value)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"written {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, default="quick", what="settings are measured", assignments=False)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per training measurement, split into 5 rounds")
    parser.add_argument("--end-to-end", default="", help="comma-separated profiles to time with `drnb reproduce`")
    parser.add_argument(
        "--input-only", action="store_true",
        help="measure preprocessing and the augmenting input pipelines only (no training): e.g. the paper profile's, on a CPU",
    )
    parser.add_argument(
        "--rates", help="predict the sweep from the figures in this JSON (from accelerator_rates.py) instead of measuring here"
    )
    parser.add_argument(
        "--predict-images", type=int, default=0, metavar="N",
        help="also predict the sweep on N images with this set's grade proportions (e.g. 3662, APTOS 2019's training set)",
    )
    parser.add_argument(
        "--archive-images", type=int, default=0, metavar="N",
        help="count N unlabelled archive photographs in the pretext's work (pretext_images), in every prediction",
    )
    parser.add_argument("--json", help="output file (default benchmarks/results/<profile>-<dataset>.json)")
    args = parser.parse_args()
    for name in ("predict_images", "archive_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number of images, or 0 for none")
    if args.rates:
        predict_from_rates(args)
        return

    import tensorflow as tf

    from drnb.distribute import describe_devices
    from drnb.finetune import FINETUNE_AUGMENT, FinetuneSession
    from drnb.models import grade_head, profile_encoder
    from drnb.pipeline import labelled_batches, rotation_batches
    from drnb.preprocessing import preprocess_table
    from drnb.pretext import build_pretext_trainer
    from drnb.pretexts import PRETEXT_TASKS
    from drnb.runs import load_table, preprocess_config
    from drnb.targets import encode

    profile = profile_from(args)
    figures: dict = {"profile": profile.name, "dataset": profile.dataset, "devices": describe_devices()}

    figures["numpy_matmul_gflops"] = matmul_peak()
    table = load_table(profile)
    config = preprocess_config(profile)
    with tempfile.TemporaryDirectory() as empty_cache:
        start = time.perf_counter()
        preprocess_table(table, config, cache_dir=empty_cache, progress=False)
        figures["preprocess_uncached_images_per_second"] = len(table) / (time.perf_counter() - start)
        start = time.perf_counter()
        images, table = preprocess_table(table, config, cache_dir=empty_cache, progress=False)
        figures["preprocess_cached_images_per_second"] = len(table) / (time.perf_counter() - start)
    figures["preprocess_aptos_sized_photograph_seconds"] = large_photograph_seconds(image_size=profile.image_size)
    image_tensor = tf.constant(images)
    indices = np.arange(len(images))

    pretext_data = rotation_batches(image_tensor, indices, profile.pretext_batch_size, mode=profile.rotation_mode)
    figures["pretext_input_images_per_second"] = pipeline_rate(pretext_data, 20)
    targets = encode(table["grade"].to_numpy(np.int64), profile.target)  # as the fine-tuning session encodes them
    finetune_data = labelled_batches(
        image_tensor, indices, targets, profile.finetune_batch_size, seed=0, training=True,
        augment_options=FINETUNE_AUGMENT,
    )
    figures["finetune_input_images_per_second"] = pipeline_rate(finetune_data, 20)
    if args.input_only:
        _report(figures, args.json or Path(__file__).parent / "results" / f"{profile.name}-{profile.dataset}-input.json")
        return
    start = time.perf_counter()
    pretext = build_pretext_trainer(profile, PRETEXT_TASKS["rotation"])
    figures["pretext_build_seconds"] = time.perf_counter() - start
    pretext_rates = training_rates(pretext, pretext_data, profile.pretext_batch_size, args.steps)
    figures.update({f"pretext_{k}": v for k, v in pretext_rates.items()})
    flops = 3 * forward_flops(pretext.model)
    figures["pretext_training_gflop_per_image"] = flops / 1e9
    figures["pretext_achieved_gflops"] = flops * pretext_rates["drnb_images_per_second"] / 1e9

    session = FinetuneSession(images, table, profile, log=lambda line: None)
    for phase in ("head", "full"):
        rates = training_rates(session.trainer, finetune_data, profile.finetune_batch_size, args.steps, phase)
        figures.update({f"finetune_{phase}_{k}": v for k, v in rates.items()})
    batch = profile.finetune_batch_size
    predict_data = labelled_batches(image_tensor, indices[: 20 * batch], targets[: 20 * batch], batch, seed=0, training=False)
    start = time.perf_counter()
    features = session.trainer.encode(predict_data)
    session.trainer.predict(predict_data)
    figures["predict_tracing_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    session.trainer.predict(predict_data)
    figures["predict_images_per_second"] = len(features) / (time.perf_counter() - start)
    # A linear evaluation's features: every view of the square's symmetries, as the runs encode them.
    # 16 batches per view (4,096 images over the eight views at batch 32), each view timed on
    # its own: 4 batches per view in one timing swung by a factor of 1.6 from run to run, and
    # the views' spread shows a slow pass (one read with tf.data's autotuning ran at ~60 %).
    rows = indices[: 16 * batch]
    session.trainer.encode(session._inference_batches(rows[:batch], 5))  # traces the view's pipeline
    view_rates = []
    for view in range(8):
        start = time.perf_counter()
        encoded = len(session.trainer.encode(session._inference_batches(rows, view)))
        view_rates.append(encoded / (time.perf_counter() - start))
    figures["encode_images_per_second"] = len(view_rates) / sum(1 / rate for rate in view_rates)  # images / total time
    figures["encode_view_images_per_second_min"] = min(view_rates)
    figures["encode_view_images_per_second_max"] = max(view_rates)
    figures.update(ridge_fit_timing(features.shape[1], profile.test_time_turns))
    start = time.perf_counter()
    fresh = profile_encoder(profile)
    grade_head(fresh.output_shape[-1], profile).get_weights()
    fresh.get_weights()
    figures["fresh_model_seconds"] = time.perf_counter() - start
    flops = 3 * forward_flops(session.trainer.model)
    figures["finetune_achieved_gflops"] = flops * figures["finetune_full_drnb_images_per_second"] / 1e9
    figures["finetune_flops_to_matmul_peak"] = figures["finetune_achieved_gflops"] / figures["numpy_matmul_gflops"]
    figures["pretext_flops_to_matmul_peak"] = figures["pretext_achieved_gflops"] / figures["numpy_matmul_gflops"]
    figures["pipeline_to_training_speed"] = figures["finetune_input_images_per_second"] / figures["finetune_full_drnb_images_per_second"]

    figures["python_import_seconds"] = import_seconds()
    figures["kernel_start_and_import_seconds"] = kernel_start_seconds()
    figures.update(predicted_figures(figures, profile, session, len(images), archive_images=args.archive_images))
    if args.predict_images:
        figures.update(scaled_prediction(figures, profile, images, table, args.predict_images, args.archive_images))
    for name in filter(None, args.end_to_end.split(",")):
        figures[f"end_to_end_{name}_seconds"] = end_to_end_seconds(name, args.dataset, args.data_dir)

    _report(figures, args.json or Path(__file__).parent / "results" / f"{profile.name}-{profile.dataset}.json")


if __name__ == "__main__":
    main()
