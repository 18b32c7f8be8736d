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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from drnb.workload import (  # noqa: F401  (planned_work and the rest: the tests and accelerator_rates.py read them here)
    check_ridge_timing, forward_flops, planned_work, predicted_sweep_seconds, ridge_fit_timing,
    sweep_fixed_seconds, sweep_rates, timed, training_rates, work_gflop,
)


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``a @ b`` rate in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.random((size, size), dtype=np.float32), rng.random((size, size), dtype=np.float32)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


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
        return min(timed(lambda: preprocess_image(read_image(path), config)) for _ in range(repeats))


def predicted_figures(figures: dict, profile, session, n_images: int, source: str = "the figures", archive_images: int = 0) -> dict:
    """The sweep's predicted minutes per stage from measured rates and fixed costs, and the
    total if the photographs were APTOS-sized PNGs (decoded on every core of the machine
    measured); with ``archive_images``, the pretext also preprocesses and trains on that many
    unlabelled photographs."""
    import os

    rates = sweep_rates(figures)
    fixed = sweep_fixed_seconds(figures, profile, n_images)
    work = planned_work(profile, session, n_images, archive_images=archive_images)
    check_ridge_timing(work, figures, source)
    stages = predicted_sweep_seconds(work, rates, fixed)
    predicted = {f"predicted_{stage}_minutes": seconds / 60 for stage, seconds in stages.items()}
    # The work itself, which no machine changes: images per kind of step, and GFLOP per stage.
    predicted.update({f"work_{kind}": count for kind, count in work.items()})
    if "pretext_training_gflop_per_image" in figures and "finetune_training_gflop_per_image" in figures:
        predicted.update({f"work_{stage}": gflop for stage, gflop in work_gflop(work, figures).items()})
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
        :func:`predicted_figures`' keys, ``predicted_`` becoming ``predicted_<n_images>_images_``
        (``work_`` likewise).
    """
    from drnb.finetune import FinetuneSession

    rows = np.resize(np.arange(len(images)), n_images)
    scaled_table = table.iloc[rows].reset_index(drop=True).assign(image_id=[str(i) for i in range(n_images)], patient_id=None)
    scaled = profile.derive(duplicate_threshold=0.0)
    session = FinetuneSession(images[rows], scaled_table, scaled, log=lambda line: None)
    predicted = predicted_figures(figures, scaled, session, n_images, archive_images=archive_images)
    return {re.sub(r"^(predicted|work)_", rf"\1_{n_images}_images_", key): value for key, value in predicted.items()}


def bare_step_seconds(figures: dict) -> float:
    """Seconds the sweep's work (``work_*`` figures) takes at the bare-step rates: every training
    image on one constant batch, every prediction and encoding at the inference rate."""
    return (
        figures["work_pretext_train"] / figures["pretext_bare_images_per_second"]
        + figures["work_finetune_full"] / figures["finetune_full_bare_images_per_second"]
        + figures["work_finetune_head"] / figures["finetune_head_bare_images_per_second"]
        + (figures["work_finetune_predict"] + figures["work_pretext_predict"] + figures["work_finetune_encode"])
        / figures["predict_images_per_second"]
    )


def import_seconds() -> float:
    """A fresh interpreter importing drnb's training modules (TensorFlow included)."""
    return timed(lambda: subprocess.run([sys.executable, "-c", "import drnb.finetune, drnb.pretext"], check=True))


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
        return timed(lambda: subprocess.run(command, check=True))


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
    figures["finetune_training_gflop_per_image"] = flops / 1e9
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
        if name == profile.name:  # the sweep's wall against its steps at the bare-step rates: what the rest costs
            figures["end_to_end_to_bare_steps"] = figures[f"end_to_end_{name}_seconds"] / bare_step_seconds(figures)

    _report(figures, args.json or Path(__file__).parent / "results" / f"{profile.name}-{profile.dataset}.json")


if __name__ == "__main__":
    main()
