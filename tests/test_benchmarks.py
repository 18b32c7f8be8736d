"""The benchmark script runs end to end on the smoke profile, writes every figure it prints, and
predicts a sweep's wall time from work counted the way the runs do it."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmarks.py"
ACCELERATOR_SCRIPT = SCRIPT.with_name("accelerator_rates.py")


@pytest.mark.slow
def test_benchmark_script_writes_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--steps", "2", "--predict-images", "480", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    # The same sweep on four times the images (smoke draws 120) is predicted to take longer.
    assert figures["predicted_480_images_total_minutes"] > figures["predicted_total_minutes"]
    assert figures["predicted_480_images_finetune_minutes"] > figures["predicted_finetune_minutes"]
    assert figures["predicted_480_images_data_minutes"] > figures["predicted_data_minutes"]
    for phase in ("pretext", "finetune_full", "finetune_head"):
        assert figures[f"{phase}_drnb_images_per_second"] > 0
        assert figures[f"{phase}_bare_images_per_second"] > 0
        # Alternating rounds, each a pipeline block beside a constant-batch block: the ratio
        # is the median of the rounds' ratios.
        rounds = figures[f"{phase}_ratio_rounds"]
        assert len(rounds) == 5
        assert figures[f"{phase}_ratio"] == pytest.approx(np.median(rounds), abs=1e-3)
    # The input pipelines alone are measured under their own names, not overwritten by training rates.
    assert figures["pretext_input_images_per_second"] != figures["pretext_drnb_images_per_second"]
    assert figures["finetune_input_images_per_second"] > 0 and figures["numpy_matmul_gflops"] > 0
    assert "finetune_flops_to_matmul_peak" in result.stdout
    assert 0 < figures["preprocess_aptos_sized_photograph_seconds"] < 60
    # The encoding rate is timed view by view, and the spread of the views is reported beside it.
    assert 0 < figures["encode_view_images_per_second_min"] <= figures["encode_view_images_per_second_max"]
    assert figures["encode_images_per_second"] > 0 and "encode_view_images_per_second_max" in result.stdout


@pytest.mark.slow
def test_input_only_measures_the_pipelines_and_trains_nothing(tmp_path):
    out = tmp_path / "input.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--input-only", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["pretext_input_images_per_second"] > 0 and figures["finetune_input_images_per_second"] > 0
    assert figures["preprocess_uncached_images_per_second"] > 0
    assert not any("tracing" in key or "drnb_images" in key or "predicted" in key for key in figures)


class CountingBatches:
    """An iterator over (images, targets) batches that counts the images it hands out."""

    def __init__(self, batches):
        self.batches, self.images = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        images, targets = next(self.batches)
        self.images += int(images.shape[0])
        return images, targets


def count_trainer_work(trainer) -> dict:
    """Wrap ``trainer``'s train, encode and predict so that they count the images they process."""
    counts = {"head": 0, "full": 0, "encode": 0, "predict": 0}
    train, encode, predict = trainer.train, trainer.encode, trainer.predict

    def counting_train(batches, steps, *, phase="full", **kwargs):
        counting = CountingBatches(batches)
        log = train(counting, steps, phase=phase, **kwargs)
        counts[phase] += counting.images
        return log

    def counting_inference(function, kind):
        def wrapped(dataset):
            outputs = function(dataset)
            counts[kind] += len(outputs)
            return outputs

        return wrapped

    trainer.train = counting_train
    trainer.encode, trainer.predict = counting_inference(encode, "encode"), counting_inference(predict, "predict")
    return counts


def test_planned_work_counts_what_the_runs_train_and_predict(tmp_path, benchmark_module, monkeypatch):
    import drnb.finetune
    from drnb.finetune import FinetuneSession, full_epochs, plan_steps
    from drnb.models import profile_encoder
    from drnb.pretext import save_atomically
    from drnb.profiles import resolve_profile
    from drnb.synthetic import make_fundus_images

    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    smoke = resolve_profile("smoke", {})
    encoder_path = tmp_path / "encoder.keras"  # an untrained encoder stands in for the pretext's
    save_atomically(profile_encoder(smoke), encoder_path)
    ridge = {"target": "regression", "finetune_hidden": "", "head_init": "ridge", "test_time_turns": "4", "recalibrate_batchnorm": "true"}
    for case, overrides in enumerate((
        {}, {"finetune_min_steps": "6"}, {"test_time_turns": "4", "cut_points": "prior"}, ridge,
        {**ridge, "test_time_turns": "2", "warmup_epochs": "1"},
        # Nothing trains: the predictions read the features, kept per starting encoder.
        {**ridge, "test_time_turns": "2", "cut_points": "prior", "warmup_epochs": "0", "finetune_epochs": "0",
         "validation_fraction": "0", "protocols": "linear"},
        # ... or the head alone trains, on the images.
        {**ridge, "warmup_epochs": "1", "finetune_epochs": "0", "validation_fraction": "0", "protocols": "linear"},
        # Both protocols, LP-FT as quick runs it: a ridge fit, then everything trained, or not;
        # every scratch run starts from one fresh encoder.
        {**ridge, "test_time_turns": "2", "cut_points": "prior", "warmup_epochs": "0",
         "validation_fraction": "0", "scratch_encoder": "shared", "finetune_batchnorm": "frozen"},
    )):
        # Two fractions, two notebooks (one session each) that share their kept features
        # through one folder, as a sweep's do: the second encodes only rows the first did not.
        profile = resolve_profile(
            "smoke", {"fractions": "0.5,1.0", "methods": "rotation,scratch", "bootstrap_resamples": "10", **overrides}
        )
        sessions = [
            FinetuneSession(images, table, profile, encoder_paths={"rotation": encoder_path}, feature_dir=tmp_path / f"features-{case}", log=lambda line: None)
            for _ in profile.fractions
        ]
        work = benchmark_module.planned_work(profile, sessions[0], len(images), walkthrough=False)
        counts = {"head": 0, "full": 0, "encode": 0, "predict": 0}
        fitted_rows, built = [], []
        monkeypatch.setattr(drnb.finetune, "profile_encoder", lambda *a, **k: built.append(1) or profile_encoder(*a, **k))
        for fraction, session in zip(profile.fractions, sessions):
            fit_head = session.fit_head
            session.fit_head = lambda features, *rest, fit_head=fit_head: fitted_rows.append(len(features)) or fit_head(features, *rest)
            session_counts = count_trainer_work(session.trainer)
            recalibrate = session.recalibrate_batchnorm
            session.recalibrate_batchnorm = lambda rows, counts=session_counts, recalibrate=recalibrate: (
                counts.__setitem__("predict", counts["predict"] + len(rows)) or recalibrate(rows)
            )
            for repetition in range(profile.repetitions):
                for method in profile.methods:
                    for protocol in profile.protocols:
                        out = tmp_path / f"{case}-{fraction}-{method}-{repetition}-{protocol}"
                        session.run(method, fraction, repetition, out, protocol=protocol)
            counts = {key: counts[key] + session_counts[key] for key in counts}
        assert counts["full"] == work["finetune_full"]
        assert (work["finetune_full"] > 0) == ("finetune" in profile.protocols)
        assert counts["head"] == work["finetune_head"]
        assert counts["predict"] == work["finetune_predict"] > 0
        assert counts["encode"] == work["finetune_encode"]
        # Features are encoded for a ridge fit, or a linear run's predictions.
        assert (work["finetune_encode"] > 0) == (profile.head_init == "ridge" or "linear" in profile.protocols)
        assert work["ridge_fits"] == len(fitted_rows) and work["ridge_rows"] == sum(fitted_rows)
        assert (work["ridge_fits"] > 0) == (profile.head_init == "ridge")
        runs = len(profile.fractions) * profile.repetitions * len(profile.protocols)
        assert work["runs"] == 2 * runs and work["fresh_encoders"] == len(built)
        assert len(built) == (len(profile.fractions) if profile.scratch_encoder == "shared" else runs)
        assert work["notebooks"] == 5 and work["images"] == 80
        # The first fraction's notebook walks through repetition 0 of the first method and protocol once more.
        walked = benchmark_module.planned_work(profile, sessions[0], len(images))
        n_train = len(sessions[0].split(0, profile.fractions[0]).train[profile.fractions[0]])
        batch = min(sessions[0].batch_size, n_train)
        steps = plan_steps(n_train, batch, profile, profile.protocols[0])[1]
        assert walked["finetune_full"] - work["finetune_full"] == full_epochs(profile, profile.protocols[0]) * steps * batch
        assert walked["ridge_fits"] - work["ridge_fits"] == (profile.head_init == "ridge")
        if profile.test_time_turns == 4 and not profile.recalibrate_batchnorm:
            # The fine-tuned runs' test fold, validation after each full epoch, calibration and the
            # referable-DR threshold's training images, each in four turns.
            scored = sum(
                len(split.test) + profile.finetune_epochs * len(split.validation_for(f))
                + len(session.calibration_rows(split, profile.seed + r))
                + len(session.operating_point_rows(split.train[f], profile.seed + r))
                for f, session in zip(profile.fractions, sessions) for r in range(profile.repetitions)
                for split in [session.split(r, f)]
            )
            assert work["finetune_predict"] == 4 * scored * len(profile.methods)


def test_predicted_sweep_adds_each_stage_at_its_rate(benchmark_module):
    work = {
        "images": 100, "notebooks": 5, "fresh_encoders": 4, "pretexts": 2, "archive_images": 150,
        "pretext_train": 1200, "pretext_predict": 40,
        "finetune_full": 3000, "finetune_head": 600, "finetune_encode": 800, "finetune_predict": 500,
        "ridge_fits": 6, "ridge_rows": 9000, "runs": 8,
    }
    rates = {
        "preprocess": 50, "pretext_train": 100, "finetune_full": 100, "finetune_head": 300,
        "encode": 40, "predict": 20, "ridge_rows": 3000,
    }
    fixed = {"kernel": 10, "load": 1, "pretext_tracing": 4, "finetune_tracing": 3, "fresh_model": 0.5, "ridge_fit": 0.25}
    stages = benchmark_module.predicted_sweep_seconds(work, rates, fixed)
    # What a run spends besides its counted work, when measured (the start-of-run probe), once per run.
    with_overhead = benchmark_module.predicted_sweep_seconds(work, rates, {**fixed, "run": 2.5})
    assert with_overhead["finetune"] - stages["finetune"] == pytest.approx(8 * 2.5)
    assert stages["data"] == 10 + 2
    assert stages["pretext"] == 10 + 1 + 2 * 4 + 3 + 12 + 2  # two tasks traced; the archive preprocessed
    assert stages["finetune"] == 2 * (10 + 1 + 3) + 4 * 0.5 + 30 + 2 + 20 + 25 + 6 * 0.25 + 3
    assert stages["analysis"] == 10
    assert stages["total"] == pytest.approx(12 + 36 + 111.5 + 10)


def test_small_figures_keep_significant_digits(benchmark_module):
    assert [benchmark_module.format_figure(v) for v in (0.0, 2.5, 0.000205468, 7, "CPU")] == ["0.000", "2.500", "0.000205", "7", "CPU"]


def test_ridge_timing_splits_a_fit_into_fixed_seconds_and_seconds_per_row(benchmark_module, monkeypatch):
    import drnb.ridge

    clock = {"now": 0.0}
    monkeypatch.setattr(benchmark_module.time, "perf_counter", lambda: clock["now"])
    fitted = []

    def fake_fit(features, grades, *, groups, criterion):  # 0.5 s + 1 ms per row, on the fake clock
        fitted.append((features.shape, len(np.unique(groups)), criterion))
        clock["now"] += 0.5 + 0.001 * len(features)

    monkeypatch.setattr(drnb.ridge, "fit_ridge", fake_fit)
    timing = benchmark_module.ridge_fit_timing(12, 4, rows=(40, 400))
    assert timing == pytest.approx({"ridge_fit_seconds": 0.5, "ridge_seconds_per_row": 0.001})
    assert fitted == [((40, 12), 10, "correlation"), ((400, 12), 100, "correlation")]  # an image's four views together


def test_sweep_rates_prefer_drnb_then_fit_then_one_batch_at_a_time(benchmark_module):
    figures = {
        "preprocess_uncached_images_per_second": 50, "predict_images_per_second": 20,
        "pretext_drnb_images_per_second": 1, "pretext_fit_images_per_second": 2, "pretext_bare_images_per_second": 3,
        "finetune_full_fit_images_per_second": 4, "finetune_full_bare_images_per_second": 5,
        "finetune_head_bare_images_per_second": 6,
        "ridge_seconds_per_row": 0.001,
    }
    rates = benchmark_module.sweep_rates(figures)
    assert (rates["pretext_train"], rates["finetune_full"], rates["finetune_head"]) == (1, 4, 6)
    assert rates["encode"] == 20 and rates["ridge_rows"] == pytest.approx(1000)  # no view pipeline timed: inference's rate
    assert benchmark_module.sweep_rates({**figures, "encode_images_per_second": 30})["encode"] == 30
    del figures["ridge_seconds_per_row"]  # figures from before fits were timed serve a sweep without any
    assert benchmark_module.sweep_rates(figures)["ridge_rows"] == float("inf")
    benchmark_module.check_ridge_timing({"ridge_fits": 0}, figures, "old.json")
    with pytest.raises(ValueError, match=r"old.json has no ridge fit timing .* fits 50 ridge heads"):
        benchmark_module.check_ridge_timing({"ridge_fits": 50}, figures, "old.json")
    del figures["finetune_full_fit_images_per_second"], figures["finetune_full_bare_images_per_second"]
    with pytest.raises(ValueError, match="finetune_full_bare_images_per_second"):
        benchmark_module.sweep_rates(figures)


@pytest.mark.slow
def test_accelerator_rates_feed_the_sweep_prediction(tmp_path):
    """The backend-agnostic timing runs here on TensorFlow (mixed precision forced on, as on a
    GPU), and ``run_benchmarks.py --rates`` predicts the sweep from its figures alone."""
    rates = tmp_path / "rates.json"
    result = subprocess.run(
        [sys.executable, str(ACCELERATOR_SCRIPT), "--profile", "smoke", "--set", "mixed_precision=on",
         "--steps", "2", "--matmul-size", "128", "--json", str(rates)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(rates.read_text())
    assert figures["precision_policy"] == "mixed_float16" and figures["matmul_dtype"] == "float16"
    assert figures["images"] == 120 and figures["cpu_cores"] >= 1
    for phase in ("pretext", "finetune_head", "finetune_full"):
        assert figures[f"{phase}_bare_images_per_second"] > 0 and figures[f"{phase}_fit_images_per_second"] > 0
        assert figures[f"{phase}_tracing_seconds"] > 0
    assert figures["predict_images_per_second"] > 0 and figures["matmul_tflops"] > 0

    predicted = tmp_path / "predicted.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--rates", str(rates), "--json", str(predicted)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    minutes = json.loads(predicted.read_text())
    stages = ("data", "pretext", "finetune", "analysis")
    assert minutes["predicted_total_minutes"] == pytest.approx(sum(minutes[f"predicted_{s}_minutes"] for s in stages))
    assert minutes["predicted_finetune_minutes"] > 0 and minutes["measured_on"] == figures["devices"]

    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "quick", "--rates", str(rates), "--json", str(predicted)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0 and "measured for profile 'smoke', not --profile 'quick'" in result.stderr


STUDY_SCRIPT = SCRIPT.with_name("accelerator_study.py")


def test_square_symmetries_are_the_eight_turns_and_transposes(study_module):
    image = np.arange(3 * 3 * 2).reshape(1, 3, 3, 2)  # no symmetry of the square maps it to itself
    images = np.repeat(image, 8, axis=0)
    turned = study_module.square_symmetries(images, np.arange(8))
    assert turned.shape == images.shape and turned.dtype == images.dtype
    assert len({t.tobytes() for t in turned}) == 8
    for k in range(4):
        np.testing.assert_array_equal(turned[k], np.rot90(image[0], k))  # the pretext's labels: 90 k degrees anticlockwise
    np.testing.assert_array_equal(turned[4], image[0].transpose(1, 0, 2))
    with pytest.raises(ValueError, match="symmetries 0-7"):
        study_module.square_symmetries(images, np.full(8, 8))
    with pytest.raises(ValueError, match=r"expected \(N, S, S, C\) and \(N,\)"):
        study_module.square_symmetries(images, np.arange(7))


def test_batch_stream_gives_whole_batches_and_every_row_equally_often(study_module):
    rows = np.array([3, 5, 7, 11, 13, 17, 19])
    stream = study_module.BatchStream(rows, batch_size=3, seed=0)
    assert stream.steps == 3  # ceil(7 / 3)
    epochs = [stream.epoch() for _ in range(7)]  # 7 epochs of 9 rows: 63 = 9 passes over the 7 rows
    assert all(len(epoch) == 9 for epoch in epochs)
    drawn = np.concatenate(epochs)
    assert set(drawn) == set(rows)
    assert np.all(np.unique(drawn, return_counts=True)[1] == 9)
    assert not np.array_equal(epochs[0], epochs[1])
    with pytest.raises(ValueError, match="no rows"):
        study_module.BatchStream(np.array([], np.int64), batch_size=3, seed=0)


def test_pretext_epochs_stop_by_the_deadline_but_not_on_the_compiling_first_epoch(study_module):
    fits = study_module.next_epoch_fits
    assert fits(0.0, 375.0, []) and not fits(376.0, 375.0, [])
    # The first epoch took 193 s, compilation included (measured on an H100): the second is still tried.
    assert fits(200.0, 375.0, [193.0])
    # From then on the last epoch predicts the next.
    assert fits(371.0, 375.0, [193.0, 3.7]) and not fits(372.0, 375.0, [193.0, 3.7])


def test_batch_stream_repeats_rows_to_fill_a_batch_larger_than_the_set(study_module):
    stream = study_module.BatchStream(np.array([4, 8, 9]), batch_size=5, seed=1)
    first, second = stream.epoch(), stream.epoch()
    assert stream.steps == 1 and len(first) == len(second) == 5
    assert np.all(np.unique(np.concatenate([first, second]), return_counts=True)[1] >= 3)


def test_predictions_are_made_in_whole_batches_and_trimmed(study_module):
    class RecordingModel:
        shapes = []

        def predict(self, images, batch_size, verbose):
            self.shapes.append(images.shape[0])
            return images[:, 0, 0, :1] * 2.0

    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    outputs = study_module.predict_whole_batches(RecordingModel(), images, batch_size=4)
    assert RecordingModel.shapes == [8]  # padded to two whole batches
    np.testing.assert_array_equal(outputs[:, 0], 2.0 * np.arange(5))
    assert outputs.dtype == np.float32


def test_study_json_has_no_nan(study_module):
    figures = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), float("inf")], "c": {"d": None, "e": "x"}}
    assert study_module.finite_or_none(figures) == {"a": None, "b": [1.5, 3, None], "c": {"d": None, "e": "x"}}


def test_scratch_and_rotation_runs_start_from_the_same_head(study_module):
    import types

    import keras

    from drnb.profiles import resolve_profile

    study = types.SimpleNamespace(profile=resolve_profile("paper", {"encoder": "compact", "image_size": 32}), keras=keras, seed=3)
    scratch, scratch_encoder = study_module.Study.classifier(study)
    pretrained = [np.full(w.shape, 0.5, w.dtype) for w in scratch_encoder.get_weights()]
    rotation, rotation_encoder = study_module.Study.classifier(study, pretrained)
    for ours, theirs in zip(scratch.layers[-1].get_weights(), rotation.layers[-1].get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(rotation_encoder.get_weights()[0], pretrained[0])
    assert not np.array_equal(scratch_encoder.get_weights()[0], pretrained[0])


def test_study_script_names_the_setting_it_does_not_implement(study_module):
    from drnb.profiles import resolve_profile

    study_module.check_supported(resolve_profile("paper"))
    with pytest.raises(ValueError, match="finetune_min_steps=200: accelerator_study.py implements only finetune_min_steps=0"):
        study_module.check_supported(resolve_profile("quick"))
    with pytest.raises(ValueError, match="protocols=.*implements only protocols=\\('finetune',\\)"):
        study_module.check_supported(resolve_profile("paper", {"protocols": "finetune,linear"}))
    with pytest.raises(ValueError, match="finetune_batchnorm='frozen'"):
        study_module.check_supported(resolve_profile("paper", {"finetune_batchnorm": "frozen"}))
    with pytest.raises(ValueError, match="scratch_encoder='shared'"):
        study_module.check_supported(resolve_profile("paper", {"scratch_encoder": "shared"}))


@pytest.mark.slow
def test_accelerator_study_fine_tunes_both_methods_around_a_time_boxed_pretext(tmp_path):
    """The study script runs here on TensorFlow: scratch, the pretext, rotation, on one fold."""
    out = tmp_path / "study.json"
    settings = ["dataset=synthetic", "encoder=compact", "image_size=32", "synthetic_images=120", "pretext_epochs=3", "pretext_eval_every=2",
                "warmup_epochs=1", "finetune_epochs=2"]

    def study(*arguments):
        """Run the script with the tiny settings; its figures, read as strict JSON (no NaN)."""
        result = subprocess.run(
            [sys.executable, str(STUDY_SCRIPT), "--profile", "paper", *[f"--set={s}" for s in settings], *arguments, "--json", str(out)],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))

    figures = study("--fractions", "1.0,0.25", "--seconds", "400")
    assert figures["images"] == 120 and figures["precision_policy"] == "float32"
    pretext = figures["pretext"]
    assert pretext["epochs"] == 3 and pretext["stopped_by"] == "epochs"
    assert [("heldout_rotation_accuracy" in row) for row in pretext["history"]] == [False, True, True]
    assert 0 <= pretext["heldout_rotation_accuracy"] <= 1
    assert pretext["train_images"] + pretext["heldout_images"] == 120
    runs = {(run["method"], run["fraction"]): run for run in figures["runs"]}
    assert list(runs) == [("scratch", 1.0), ("scratch", 0.25), ("rotation", 1.0), ("rotation", 0.25)]
    for run in runs.values():
        assert -1 <= run["qw_kappa"] <= 1 and 0 <= run["accuracy"] <= 1
        assert [row["phase"] for row in run["history"]] == ["warmup", "full", "full"]
        # The epoch kept is the first of the best validation kappa, as in drnb's FinetuneSession.
        kappas = [row["validation_qw_kappa"] for row in run["history"] if row["phase"] == "full"]
        assert run["best_epoch"] == 2 + int(np.argmax(kappas))
        assert run["n_test"] == figures["test_images"]
    # Nested subsets from drnb's split: a quarter of the full subset, the same for both methods.
    assert runs[("scratch", 0.25)]["n_train"] == runs[("rotation", 0.25)]["n_train"] < runs[("scratch", 1.0)]["n_train"] / 3

    # Out of time from the start: nothing runs, and the JSON says so in strict JSON (null, not NaN).
    figures = study("--seconds", "0")
    assert figures["runs"] == [] and figures["pretext"]["epochs"] == 0 and figures["pretext"]["stopped_by"] == "time"
    assert figures["pretext"]["images_per_second"] is None and figures["pretext"]["heldout_rotation_accuracy"] is None
    # Scratch alone trains no pretext.
    figures = study("--methods", "scratch", "--fractions", "0.25")
    assert "pretext" not in figures and [(run["method"], run["fraction"]) for run in figures["runs"]] == [("scratch", 0.25)]

    result = subprocess.run(
        [sys.executable, str(STUDY_SCRIPT), "--profile", "quick", "--json", str(tmp_path / "no.json")],
        capture_output=True, text=True, timeout=600,
    )
    from drnb.profiles import PROFILES

    assert result.returncode != 0 and f"finetune_min_steps={PROFILES['quick'].finetune_min_steps}" in result.stderr


def test_study_compilation_cache_is_temporary_on_jax_and_absent_elsewhere(study_module, tmp_path, monkeypatch):
    import types

    import keras

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    study_module.enable_compilation_cache(None)  # the tests run Keras on TensorFlow
    assert list(tmp_path.iterdir()) == []

    settings, at_exit = {}, []
    fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(update=settings.__setitem__))
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(study_module.atexit, "register", lambda function, *args, **kwargs: at_exit.append((function, args, kwargs)))
    study_module.enable_compilation_cache(None)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("drnb-compiled-") and settings["jax_compilation_cache_dir"] == str(folder)
    for function, args, kwargs in at_exit:  # what happens when the process ends
        function(*args, **kwargs)
    assert list(tmp_path.iterdir()) == []

    kept = tmp_path / "kept"
    study_module.enable_compilation_cache(str(kept))  # a folder the user names is theirs: not removed
    assert settings["jax_compilation_cache_dir"] == str(kept) and len(at_exit) == 1


@pytest.mark.slow
def test_the_start_of_run_probe_counts_the_sweeps_work_and_times_each_stage(tmp_path, monkeypatch):
    from drnb.finetune import FinetuneSession
    from drnb.runs import load_images, load_table
    from drnb.profiles import resolve_profile
    from drnb.workload import describe_prediction, planned_work, predict_sweep

    monkeypatch.setenv("DRNB_CACHE", str(tmp_path / "cache"))
    profile = resolve_profile("smoke", {"head_init": "ridge", "target": "regression", "finetune_hidden": "", "test_time_turns": "2"})
    prediction = predict_sweep(profile, load_table(profile), import_seconds=1.0, kernel_seconds=0.5)
    images, table = load_images(profile, log=lambda line: None)
    # Counted on blank images of the same table, the work is the real session's (the synthetic set has no near duplicates).
    work = planned_work(profile, FinetuneSession(images, table, profile, log=lambda line: None), len(images))
    assert {key: prediction[key] for key in work} == work
    stages = ("data", "pretext", "finetune", "analysis")
    assert all(prediction[stage] > 0 for stage in stages)
    assert prediction["total"] == pytest.approx(sum(prediction[stage] for stage in stages))
    assert prediction["analysis"] == pytest.approx(1.5)  # a kernel's start and imports, as given
    assert prediction["pretext_gflop"] > 0 and prediction["finetune_gflop"] > prediction["pretext_gflop"] > 0
    assert describe_prediction(prediction).startswith(f"predicted on this machine: {prediction['total'] / 60:.1f} min")


def test_the_sweeps_steps_at_the_bare_rates_add_each_kind_of_work_at_its_rate(benchmark_module):
    figures = {
        "work_pretext_train": 1000, "pretext_bare_images_per_second": 100,
        "work_finetune_full": 3000, "finetune_full_bare_images_per_second": 50,
        "work_finetune_head": 600, "finetune_head_bare_images_per_second": 300,
        "work_finetune_predict": 400, "work_pretext_predict": 100, "work_finetune_encode": 500, "predict_images_per_second": 200,
    }
    assert benchmark_module.bare_step_seconds(figures) == pytest.approx(10 + 60 + 2 + 5)
