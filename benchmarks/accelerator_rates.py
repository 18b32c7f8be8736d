"""A profile's models timed on any Keras backend: for an accelerator machine where drnb's own loop cannot run.

drnb trains with TensorFlow (``tf.data`` and a traced step). A lent GPU machine may hold JAX or
PyTorch and only a CPU TensorFlow, or none; drnb's settings (:mod:`drnb.profiles`) gather their
options from modules that import TensorFlow, so it must be importable. This script builds the
profile's own models with :mod:`drnb.models` (encoder, head widths, dropout, the
profile's learning rates and mixed-precision policy) and times Keras's own compiled step on
photographs held in memory, on whatever backend ``KERAS_BACKEND`` names. It measures:

- training images/s of the pretext (4-way softmax on rotated photographs), of fine-tuning
  with the encoder frozen (warm-up) and with everything training (ordinal sigmoid head, binary
  cross-entropy), and inference images/s, each at the profile's batch size: one batch at a
  time (``train_on_batch``, ``predict_on_batch``: the "bare" rate of ``run_benchmarks.py``)
  and over one epoch of ``fit`` (``predict``);
- the seconds of each one's first step (compilation), and of building a fresh encoder and head;
- drnb's preprocessing of the photographs from files on every core, from the cache, and of one
  APTOS-sized photograph;
- a half-precision matmul on the device, for achieved training FLOP/s against a peak measured
  in the same run.

It writes JSON that ``run_benchmarks.py --rates`` turns into the predicted wall time of the
profile's whole sweep, with the work counted from the dataset's real splits::

    KERAS_BACKEND=jax python benchmarks/accelerator_rates.py --profile paper \\
        --dataset eyepacs2015 --data-dir DIR --json paper-gpu.json
    python benchmarks/run_benchmarks.py --profile paper --dataset eyepacs2015 --data-dir DIR \\
        --rates paper-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from accelerator_study import square_symmetries
from run_benchmarks import (
    add_profile_arguments, format_figure, forward_flops, large_photograph_seconds, profile_from, ridge_fit_timing,
)


def accelerator_name() -> str | None:
    """The accelerator Keras's backend computes on, or None on a CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return None if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    return None


def matmul_tflops(size: int, dtype: str, repeats: int = 10) -> float:
    """Best rate of a (size x size) @ (size x size) product on the backend's device, TFLOP/s."""
    import keras

    ops = keras.ops
    a = ops.cast(keras.random.uniform((size, size), seed=0), dtype)
    b = ops.cast(keras.random.uniform((size, size), seed=1), dtype)
    ops.convert_to_numpy(ops.matmul(a, b)[0, 0])  # compiles, warms the device
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            product = ops.matmul(a, b)
        ops.convert_to_numpy(product[0, 0])  # waits for the device
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best / 1e12


def step_rates(step, batches, steps: int, rounds: int = 5) -> dict:
    """Seconds of the first call of ``step`` (compilation) and its median images/s afterwards.

    Parameters
    ----------
    step : callable
        ``step(images, targets)``, returning only once the device is done (Keras's
        ``train_on_batch`` and ``predict_on_batch`` return host values).
    batches : list of (images, targets)
        Cycled through; images (B, S, S, 3).
    steps : int
        Timed calls, split into ``rounds`` blocks; the rate is the median of the blocks'.
    """
    start = time.perf_counter()
    step(*batches[0])
    first = time.perf_counter() - start
    for index in range(3):
        step(*batches[index % len(batches)])
    block = max(2, steps // rounds)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        images = 0
        for index in range(block):
            batch = batches[index % len(batches)]
            step(*batch)
            images += len(batch[0])
        rates.append(images / (time.perf_counter() - start))
    return {"tracing_seconds": first, "bare_images_per_second": float(np.median(rates))}


def fit_rate(model, images: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
    """Images/s of one epoch of Keras's own ``fit`` over arrays in memory.

    On JAX, ``train_on_batch`` writes the weights back into Keras's variables after every
    step; ``fit`` does so once per epoch, closer to drnb's traced loop. A short first epoch
    compiles (or reuses the compiled step) before the timed one. Whole batches only: a
    smaller last batch would compile the step again.
    """
    whole = len(images) // batch_size * batch_size
    images, targets = images[:whole], targets[:whole]
    model.fit(images[: 2 * batch_size], targets[: 2 * batch_size], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(images, targets, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return len(images) / (time.perf_counter() - start)


def predict_rate(model, images: np.ndarray, batch_size: int) -> float:
    """Images/s of Keras's own ``predict`` over arrays in memory (whole batches), after a compiled first call."""
    images = images[: len(images) // batch_size * batch_size]
    model.predict(images[: 2 * batch_size], batch_size=batch_size, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=batch_size, verbose=0)
    return len(images) / (time.perf_counter() - start)


def rotated_batches(images: np.ndarray, batch_size: int, count: int, seed: int = 0) -> list:
    """``count`` batches of photographs, each turned by a random multiple of 90 degrees (float32, label 0-3)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        rows = rng.choice(len(images), size=batch_size, replace=len(images) < batch_size)
        turns = rng.integers(0, 4, size=batch_size)
        rotated = square_symmetries(images[rows], turns).astype(np.float32)
        batches.append((rotated, turns.astype(np.int32)))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, default="paper", what="models are timed")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement, in 5 rounds")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the matrices of the peak measurement")
    parser.add_argument("--json", required=True, help="output file")
    args = parser.parse_args()
    if args.steps < 1 or args.matmul_size < 1:
        parser.error("--steps and --matmul-size: expected positive integers")

    import keras

    from drnb.models import grade_head, precision_policy, profile_encoder, rotation_head, stack
    from drnb.preprocessing import preprocess_table
    from drnb.runs import load_table, preprocess_config
    from drnb.targets import TARGET_LOSSES, encode

    profile = profile_from(args, args.set)
    # Preprocessing forks worker processes: before the backend starts its device threads.
    table = load_table(profile)
    config = preprocess_config(profile)
    with tempfile.TemporaryDirectory() as empty_cache:
        start = time.perf_counter()
        preprocess_table(table, config, cache_dir=empty_cache, progress=False)
        uncached = len(table) / (time.perf_counter() - start)
        start = time.perf_counter()
        images, table = preprocess_table(table, config, cache_dir=empty_cache, progress=False)
        cached = len(table) / (time.perf_counter() - start)
    preprocessed = dict(
        images=len(images),
        preprocess_uncached_images_per_second=uncached,
        preprocess_cached_images_per_second=cached,
        preprocess_aptos_sized_photograph_seconds=large_photograph_seconds(image_size=profile.image_size),
    )

    accelerator = accelerator_name()
    policy = precision_policy(profile.mixed_precision, accelerator=accelerator is not None)
    figures: dict = {}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(**values):
        """Print figures as they come and keep the JSON current, so a run cut short keeps what it measured."""
        figures.update(values)
        for key, value in values.items():
            print(f"{key:<44}  {format_figure(value)}", flush=True)
        out.write_text(json.dumps(figures, indent=2))

    record(
        profile=profile.name, dataset=profile.dataset, backend=keras.backend.backend(), keras_version=keras.__version__,
        devices=f"{accelerator or 'CPU'} ({os.cpu_count()} CPU cores)", cpu_cores=os.cpu_count(), precision_policy=policy,
    )
    record(**preprocessed)
    matmul_dtype = "float16" if policy == "mixed_float16" else "float32"
    record(matmul_dtype=matmul_dtype, matmul_tflops=matmul_tflops(args.matmul_size, matmul_dtype))

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(profile.seed)
    start = time.perf_counter()
    encoder = profile_encoder(profile)
    head = rotation_head(encoder.output_shape[-1], profile)
    pretext = stack(encoder, head, name="pretext")
    record(pretext_build_seconds=time.perf_counter() - start)
    pretext.compile(optimizer=keras.optimizers.Adam(profile.pretext_learning_rate), loss="sparse_categorical_crossentropy")
    batches = rotated_batches(images, profile.pretext_batch_size, count=8, seed=profile.seed)
    rates = step_rates(pretext.train_on_batch, batches, args.steps)
    turns = np.random.default_rng(profile.seed).integers(0, 4, size=len(images))
    rotated = square_symmetries(images, turns).astype(np.float32)
    rates["fit_images_per_second"] = fit_rate(pretext, rotated, turns.astype(np.int32), profile.pretext_batch_size)
    del rotated
    flops = 3 * forward_flops(pretext)
    record(
        **{f"pretext_{key}": value for key, value in rates.items()},
        pretext_training_gflop_per_image=flops / 1e9,
        pretext_flops_to_matmul_peak=flops * rates["bare_images_per_second"] / (figures["matmul_tflops"] * 1e12),
    )
    del pretext, encoder, head, batches

    start = time.perf_counter()
    encoder = profile_encoder(profile)
    classifier = stack(encoder, grade_head(encoder.output_shape[-1], profile))
    record(fresh_model_seconds=time.perf_counter() - start)
    targets = encode(table["grade"].to_numpy(np.int64), profile.target).astype(np.float32)
    loss = TARGET_LOSSES[profile.target]
    rng = np.random.default_rng(profile.seed)
    batch = profile.finetune_batch_size
    batches = []
    for _ in range(8):
        rows = rng.choice(len(images), size=batch, replace=len(images) < batch)
        batches.append((images[rows].astype(np.float32), targets[rows]))
    pictures = images.astype(np.float32)
    for phase, encoder_trains in (("head", False), ("full", True)):
        encoder.trainable = encoder_trains
        classifier.compile(optimizer=keras.optimizers.Adam(profile.finetune_learning_rate), loss=loss)
        rates = step_rates(classifier.train_on_batch, batches, args.steps)
        rates["fit_images_per_second"] = fit_rate(classifier, pictures, targets, batch)
        record(**{f"finetune_{phase}_{key}": value for key, value in rates.items()})
    flops = 3 * forward_flops(classifier)
    record(
        finetune_training_gflop_per_image=flops / 1e9,
        finetune_flops_to_matmul_peak=flops * figures["finetune_full_bare_images_per_second"] / (figures["matmul_tflops"] * 1e12),
    )
    rates = step_rates(lambda images, _: classifier.predict_on_batch(images), batches, args.steps)
    record(
        predict_tracing_seconds=rates["tracing_seconds"], predict_images_per_second=rates["bare_images_per_second"],
        predict_fit_images_per_second=predict_rate(classifier, pictures, batch),
    )

    # A ridge-fitted head is fitted with NumPy on this machine's CPU cores.
    record(**ridge_fit_timing(encoder.output_shape[-1], profile.test_time_turns))

    # A notebook's kernel imports drnb on this backend; the TensorFlow path's import is measured by run_benchmarks.py.
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import keras, drnb.models, drnb.preprocessing"], check=True)
    record(python_import_seconds=time.perf_counter() - start)
    print(f"written {out}")


if __name__ == "__main__":
    main()
