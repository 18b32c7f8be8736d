"""Learning happens: the pretext and fine-tuning on synthetic fundus images, on a small CPU budget."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from drnb.finetune import FinetuneSession, learning_rate_at, plan_steps, run_directory, run_fraction
from drnb.metrics import operating_point, quadratic_weighted_kappa, referable_auc
from drnb.preprocessing import PreprocessConfig, preprocess_image
from drnb.pretext import planned_epochs, train_pretext
from drnb.profiles import resolve_profile
from drnb.synthetic import make_fundus_images
from drnb.targets import decode, decode_with_cut_points, expected_grade

pytestmark = pytest.mark.slow

N_IMAGES = 300
SETTINGS = {
    "image_size": 64,
    "pretext_epochs": 4,
    "pretext_batch_size": 64,
    "pretext_learning_rate": 2e-3,
    "pretext_hidden": (64,),
    "finetune_hidden": (64,),
    "finetune_learning_rate": 2e-3,
    "warmup_epochs": 2,
    "finetune_epochs": 6,
    "fractions": (0.25, 1.0),
    "repetitions": 2,
    "bootstrap_resamples": 100,
}


@pytest.fixture(scope="module")
def synthetic():
    raw, grades = make_fundus_images(N_IMAGES, size=96, seed=0)
    config = PreprocessConfig(size=SETTINGS["image_size"])
    images = np.stack([preprocess_image(image, config) for image in raw])
    table = pd.DataFrame(
        {"image_id": [f"syn{i}" for i in range(N_IMAGES)], "path": "", "grade": grades, "patient_id": None, "split": None}
    )
    return images, table


@pytest.fixture(scope="module")
def profile():
    return resolve_profile("smoke", SETTINGS)


@pytest.fixture(scope="module")
def pretext(synthetic, profile, tmp_path_factory):
    return train_pretext(synthetic[0], profile, tmp_path_factory.mktemp("pretext"), log=lambda line: None)


def test_pretext_loss_falls_and_heldout_rotation_accuracy_passes_0_4(pretext):
    # Up is read off the anatomy alone (the light comes from any side): the disc's side tells
    # quarter turns apart at once, the macula's small drop below the disc 0 from 180 degrees
    # slowly; 4 passes over 270 photographs at 64 px reach about .53. Guessing: 0.25.
    history = pretext.history
    assert history["loss"].iloc[-1] < 0.75 * history["loss"].iloc[0]
    assert pretext.heldout_accuracy > 0.4
    assert pretext.confusion.sum() == 4 * round(0.1 * N_IMAGES)  # every held-out image in four rotations
    assert pretext.encoder_path.exists()
    assert json.loads((pretext.encoder_path.parent / "metrics.json").read_text())["heldout_rotation_accuracy"] == pytest.approx(pretext.heldout_accuracy)


def test_the_contrastive_loss_falls_and_its_heldout_pairs_are_found_above_chance(synthetic, profile, tmp_path):
    images = synthetic[0][:, ::2, ::2]  # 32 px: 270 photographs trained on, 30 held out
    settings = profile.derive(image_size=32, pretext_epochs=20, pretext_batch_size=32)
    result = train_pretext(images, settings, tmp_path / "contrastive", method="contrastive", log=lambda line: None)
    history = result.history
    assert history["loss"].iloc[-3:].mean() < 0.85 * history["loss"].iloc[:2].mean()
    # 60 held-out views in batches of 32 and 28: guessing finds the partner 1 time in 27 to 31.
    assert result.heldout_accuracy >= 0.1
    assert result.confusion is None and (tmp_path / "contrastive" / "encoder.keras").exists()
    assert not (tmp_path / "contrastive" / "confusion.csv").exists()
    assert json.loads((tmp_path / "contrastive" / "metrics.json").read_text())["heldout_pair_accuracy"] == pytest.approx(result.heldout_accuracy)


def test_heldout_rotations_are_scored_every_few_epochs_and_after_the_last(synthetic, tmp_path, monkeypatch, benchmark_module):
    import dataclasses

    from drnb.pretexts import PRETEXT_TASKS

    images = synthetic[0][:60, ::2, ::2]  # 32 px: only the scoring schedule is under test
    profile = resolve_profile("smoke", {"image_size": 32, "pretext_epochs": 5, "pretext_eval_every": 2, "pretext_batch_size": 32})
    scored_images = []
    rotation = PRETEXT_TASKS["rotation"]

    def counting_score(trainer, image_tensor, indices, batch_size, seed):
        scored_images.append(4 * len(indices))
        return rotation.score(trainer, image_tensor, indices, batch_size, seed)

    monkeypatch.setitem(PRETEXT_TASKS, "rotation", dataclasses.replace(rotation, score=counting_score))
    result = train_pretext(images, profile, tmp_path / "pretext", log=lambda line: None)
    accuracy = result.history["heldout_rotation_accuracy"]
    assert accuracy.notna().tolist() == [False, True, False, True, True]  # epochs 2, 4 and the last
    assert result.heldout_accuracy == accuracy.iloc[-1]
    assert pd.read_csv(tmp_path / "pretext" / "history.csv")["heldout_rotation_accuracy"].isna().sum() == 2
    # The benchmark's prediction counts the same held-out predictions.
    table = synthetic[1].iloc[:60]
    session = FinetuneSession(images, table, profile, log=lambda line: None)
    assert benchmark_module.planned_work(profile, session, len(images))["pretext_predict"] == sum(scored_images) == 3 * 4 * 6


def test_a_small_set_gets_more_pretext_passes_up_to_the_minimum_steps(synthetic, tmp_path, benchmark_module):
    images = synthetic[0][:60, ::2, ::2]  # 32 px: 54 images after the hold-out, 216 rotated per pass
    profile = resolve_profile("smoke", {"image_size": 32, "pretext_epochs": 1, "pretext_min_steps": 20, "pretext_batch_size": 32})
    lines = []
    result = train_pretext(images, profile, tmp_path / "pretext", log=lines.append)
    assert len(result.history) == 3 and result.history["heldout_rotation_accuracy"].notna().iloc[-1]  # ceil(20 * 32 / 216)
    assert json.loads((tmp_path / "pretext" / "metrics.json").read_text())["epochs"] == 3
    assert any("3 epochs instead of 1" in line and "pretext_min_steps=20" in line for line in lines)
    session = FinetuneSession(images, synthetic[1].iloc[:60], profile, log=lambda line: None)
    assert benchmark_module.planned_work(profile, session, len(images))["pretext_train"] == 3 * 7 * 32  # 7 steps per pass
    # The floor only ever adds passes; a set large enough keeps the profile's epochs.
    assert planned_epochs(profile, 216) == 3 and planned_epochs(profile, 640) == 1
    assert planned_epochs(profile.derive(pretext_epochs=5), 216) == 5
    with pytest.raises(ValueError, match="views_per_epoch=0"):
        planned_epochs(profile, 0)
    with pytest.raises(ValueError, match="pretext_min_steps=-1"):
        resolve_profile("smoke", {"pretext_min_steps": "-1"})


def test_finetuning_reaches_kappa_above_0_5_and_writes_its_run(synthetic, profile, pretext, tmp_path):
    images, table = synthetic
    session = FinetuneSession(images, table, profile, encoder_paths={"rotation": pretext.encoder_path}, log=lambda line: None)
    out = run_directory(tmp_path, "finetune", "rotation", 1.0, 0)
    metrics = session.run("rotation", 1.0, 0, out, protocol="finetune", save_model=True)
    assert metrics["qw_kappa"] > 0.5
    assert metrics["kappa_ci_low"] <= metrics["qw_kappa"] <= metrics["kappa_ci_high"]
    split = session.split(0)
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["image_id"]) == sorted(table["image_id"].iloc[split.test])
    assert predictions["predicted"].between(0, 4).all()
    assert metrics["n_test"] == len(split.test) and metrics["n_train"] == len(split.train[1.0])
    assert {"metrics.json", "history.csv", "model.keras"} <= {p.name for p in out.iterdir()}


def test_full_fine_tuning_steps_are_floored_and_capped(profile):
    bounded = profile.derive(warmup_epochs=2, finetune_epochs=4, finetune_min_steps=40, finetune_max_steps=100)
    assert plan_steps(10, 32, bounded) == (1, 10)  # one pass is 1 step; 4 epochs stretched to the floor of 40
    assert plan_steps(640, 32, bounded) == (20, 20)  # 4 x 20 = 80 lies between the bounds: one pass per epoch
    assert plan_steps(10_000, 32, bounded) == (313, 25)  # 4 x 313 capped at 100; the warm-up keeps its passes
    assert plan_steps(10_000, 32, bounded.derive(finetune_max_steps=0)) == (313, 313)  # no cap: one pass per epoch


def test_a_profile_without_epochs_plans_no_steps(profile):
    linear = profile.derive(warmup_epochs=0, finetune_epochs=0, validation_fraction=0.0, head_init="ridge",
                            target="regression", finetune_hidden=(), protocols=("linear",))
    assert plan_steps(10, 32, linear) == (0, 0)
    assert plan_steps(10, 32, linear.derive(warmup_epochs=2)) == (1, 0)  # the head alone, one pass per epoch
    # A linear run of a profile that also fine-tunes has its warm-up and no full epoch.
    both = profile.derive(warmup_epochs=2, finetune_epochs=4, finetune_min_steps=30, protocols=("finetune", "linear"))
    assert plan_steps(10, 32, both, "linear") == (1, 0)
    assert plan_steps(10, 32, both, "finetune") == (1, 8)


def test_cosine_schedule_decays_towards_zero_step_by_step_and_constant_does_not(profile):
    cosine = profile.derive(finetune_epochs=4, lr_schedule="cosine")
    rates = [learning_rate_at(step, 40, cosine, 1e-3) for step in range(40)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(1e-3 * (1 + np.cos(39 / 40 * np.pi)) / 2)
    assert [learning_rate_at(step, 40, profile.derive(finetune_epochs=4), 1e-3) for step in range(40)] == [1e-3] * 40
    with pytest.raises(ValueError, match="step=40"):
        learning_rate_at(40, 40, cosine, 1e-3)


def test_sweep_skips_finished_runs(synthetic, profile, pretext, tmp_path):
    images, table = synthetic
    quick = profile.derive(warmup_epochs=1, finetune_epochs=1)
    session = FinetuneSession(images, table, quick, encoder_paths={"rotation": pretext.encoder_path}, log=lambda line: None)
    first = run_fraction(session, 0.25, tmp_path)
    assert sorted(zip(first["protocol"], first["method"], first["repetition"])) == [
        (p, m, r) for p in ("finetune", "linear") for m in ("rotation", "scratch") for r in (0, 1)
    ]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    session.run = must_not_train
    again = run_fraction(session, 0.25, tmp_path)
    pd.testing.assert_frame_equal(again.sort_index(axis=1), first.sort_index(axis=1), check_dtype=False)


def test_runs_share_frozen_features_exactly_when_their_encoders_are_identical(synthetic, profile, pretext):
    from drnb.pipeline import labelled_batches

    images, table = synthetic
    session = FinetuneSession(images, table, profile, encoder_paths={"rotation": pretext.encoder_path}, log=lambda line: None)
    encoded = []
    encode = session.trainer.encode
    session.trainer.encode = lambda dataset: encoded.append(len(out := encode(dataset))) or out
    first, second = np.arange(0, 120), np.arange(60, 200)[::-1]  # overlapping, second out of order

    def direct(rows):
        return encode(labelled_batches(session.images, rows, session.targets[rows], 32, seed=0, training=False))

    weights = session._initial_weights("rotation", seed=0)
    session.trainer.reset(encoder_weights=weights[0], head_weights=weights[1], learning_rate=1e-3, seed=0)
    session.frozen_features(first)
    features = session.frozen_features(second)
    assert encoded == [120, 80]  # the second call encodes only rows 120-199
    np.testing.assert_allclose(features, direct(second), rtol=1e-4, atol=1e-5)

    def start(method, seed):
        weights = session._initial_weights(method, seed)
        session.trainer.reset(encoder_weights=weights[0], head_weights=weights[1], learning_rate=1e-3, seed=seed)

    start("scratch", seed=1)
    encoded.clear()
    session.frozen_features(first)
    scratch = session.frozen_features(second)
    assert encoded == [120, 80]  # a fresh encoder is not the pretext's: its own rows, each once
    np.testing.assert_allclose(scratch, direct(second), rtol=1e-4, atol=1e-5)
    assert not np.allclose(scratch, features)

    start("scratch", seed=2)  # another seed, another encoder: nothing shared
    encoded.clear()
    np.testing.assert_allclose(session.frozen_features(second), direct(second), rtol=1e-4, atol=1e-5)
    assert encoded == [140]
    start("scratch", seed=1)  # the same seed builds the same encoder again: all kept
    encoded.clear()
    np.testing.assert_array_equal(session.frozen_features(second), scratch)
    assert encoded == []
    start("rotation", seed=3)
    np.testing.assert_array_equal(session.frozen_features(second), features)
    assert encoded == []


def test_features_of_turned_images_are_kept_apart_from_the_images_as_they_are(synthetic, profile, pretext):
    from drnb.pipeline import labelled_batches

    images, table = synthetic
    session = FinetuneSession(images, table, profile, encoder_paths={"rotation": pretext.encoder_path}, log=lambda line: None)
    weights = session._initial_weights("rotation", seed=0)
    session.trainer.reset(encoder_weights=weights[0], head_weights=weights[1], learning_rate=1e-3, seed=0)
    rows = np.arange(40)
    upright = session.frozen_features(rows)
    turned = session.frozen_features(rows, view=1)
    batches = labelled_batches(session.images, rows, session.targets[rows], 32, seed=0, training=False, view=1)
    np.testing.assert_allclose(turned, session.trainer.encode(batches), rtol=1e-4, atol=1e-5)
    assert not np.allclose(turned, upright, atol=1e-3)  # the pretext's features see the orientation
    np.testing.assert_array_equal(session.frozen_features(rows), upright)  # the kept features were not overwritten


DETERMINISM_SCRIPT = """
import numpy as np, pandas as pd, tensorflow as tf
from drnb.finetune import FinetuneSession
from drnb.profiles import resolve_profile
from drnb.synthetic import make_fundus_images
images, grades = make_fundus_images(80, size=32, seed=1)
table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
profile = resolve_profile("smoke", {"deterministic": "true", "methods": "scratch", "bootstrap_resamples": "10"})
session = FinetuneSession(images, table, profile, log=lambda line: None)
first = session.run("scratch", 1.0, 0, "{out}/a")["qw_kappa"]
session.run("scratch", 1.0, 1, "{out}/other")  # another run in between
tf.random.set_seed(12345)  # and another global seed, as a user's cell might set
print([first, session.run("scratch", 1.0, 0, "{out}/b")["qw_kappa"]])
"""


def test_deterministic_flag_gives_the_same_run_whatever_ran_before(tmp_path):
    # Op determinism is process-wide and cannot be switched off again: run it apart.
    output = subprocess.run(
        [sys.executable, "-c", DETERMINISM_SCRIPT.replace("{out}", str(tmp_path))], capture_output=True, text=True, check=True
    ).stdout
    first, second = json.loads(output.strip().splitlines()[-1])
    assert first == second
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()


@pytest.fixture(scope="module")
def small_session():
    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    profile = resolve_profile("smoke", {"methods": "scratch", "bootstrap_resamples": "10", "calibration_images": "40"})
    return FinetuneSession(images, table, profile, log=lambda line: None)


def test_prior_cut_points_are_fitted_on_the_training_pool_and_decode_the_test_fold(small_session, tmp_path):
    split = small_session.split(0, 1.0)
    rows = small_session.calibration_rows(split, seed=0)
    assert len(rows) == 40 and not np.intersect1d(rows, split.test).size
    np.testing.assert_array_equal(small_session.calibration_rows(split, seed=0), rows)  # same for every method

    metrics = small_session.run("scratch", 1.0, 0, tmp_path)
    cuts = np.array(metrics["cut_points"])
    assert cuts.shape == (4,) and np.all(np.diff(cuts) >= 0)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    scores = expected_grade(predictions[[f"p{k}" for k in range(5)]].to_numpy(), "ordinal")
    np.testing.assert_array_equal(predictions["predicted"], decode_with_cut_points(scores, cuts))
    fixed = decode(predictions[[f"p{k}" for k in range(5)]].to_numpy(), "ordinal")
    assert metrics["qw_kappa_fixed_cuts"] == pytest.approx(quadratic_weighted_kappa(predictions["grade"], fixed))
    # Referable DR: the score written is the expected grade, and the threshold is the one the
    # run's weights give the labelled subset's non-referable images.
    np.testing.assert_allclose(predictions["score"], scores, atol=1e-6)
    assert metrics["referable_auc"] == pytest.approx(referable_auc(predictions["grade"], predictions["score"]), abs=1e-9)
    train = small_session.split(0, 1.0).train[1.0]
    assert metrics["referable_threshold"] == pytest.approx(small_session.referable_threshold(train, seed=0))
    assert metrics["referable_threshold_images"] == len(small_session.operating_point_rows(train, seed=0)) > 0
    sensitivity, specificity = operating_point(predictions["grade"], predictions["score"], metrics["referable_threshold"])
    assert (metrics["referable_sensitivity"], metrics["referable_specificity"]) == pytest.approx((sensitivity, specificity))


def test_the_referable_threshold_reads_only_the_labelled_subsets_grades(small_session, monkeypatch):
    split = small_session.split(0, 0.25)
    train = split.train[0.25]
    rows = small_session.operating_point_rows(train, seed=1)
    assert len(rows) and np.isin(rows, train).all() and (small_session.grades[rows] < 2).all()
    threshold = small_session.referable_threshold(train, seed=1)
    rng = np.random.default_rng(0)
    outside = np.setdiff1d(np.arange(len(small_session.grades)), train)  # the test fold, and the unlabelled pool
    shuffled = small_session.grades.copy()
    shuffled[outside] = rng.permutation(shuffled[outside])
    assert not np.array_equal(shuffled[split.test], small_session.grades[split.test])
    original = small_session.grades
    monkeypatch.setattr(small_session, "grades", shuffled)
    np.testing.assert_array_equal(small_session.operating_point_rows(train, seed=1), rows)
    assert small_session.referable_threshold(train, seed=1) == threshold
    # The check can fail: the labelled subset's own grades do choose the rows.
    relabelled = original.copy()
    relabelled[train] = rng.permutation(relabelled[train])
    monkeypatch.setattr(small_session, "grades", relabelled)
    assert not np.array_equal(small_session.operating_point_rows(train, seed=1), rows)


def test_test_time_turns_average_the_predictions_of_each_image_turned(small_session):
    rows = small_session.split(0, 1.0).test
    model = small_session.trainer.model
    images = small_session.images.numpy()[rows].astype(np.float32)
    turned = [model.predict(np.rot90(images, k, axes=(1, 2)), verbose=0) for k in range(4)]
    mirrored = [model.predict(np.rot90(images[:, :, ::-1], k, axes=(1, 2)), verbose=0) for k in range(4)]
    np.testing.assert_allclose(small_session._predict(rows), turned[0], atol=1e-5)
    assert not np.allclose(turned[0], turned[1], atol=1e-4)  # the untrained network is not rotation-invariant
    assert not np.allclose(turned[0], mirrored[0], atol=1e-4)  # nor mirror-invariant
    for turns, expected in ((2, (turned[0] + turned[2]) / 2), (4, np.mean(turned, axis=0)), (8, np.mean(turned + mirrored, axis=0))):
        small_session.profile = small_session.profile.derive(test_time_turns=turns)
        try:
            np.testing.assert_allclose(small_session._predict(rows), expected, atol=1e-5)
        finally:
            small_session.profile = small_session.profile.derive(test_time_turns=1)


def test_symmetry_views_are_evenly_spaced_turns_then_the_mirror_images_turns():
    from drnb.finetune import symmetry_views

    assert [list(symmetry_views(count)) for count in (1, 2, 4, 8)] == [[0], [0, 2], [0, 1, 2, 3], list(range(8))]
    with pytest.raises(ValueError, match="count=3: expected 1, 2, 4 or 8 views"):
        symmetry_views(3)


def test_test_time_turns_must_be_1_2_4_or_8():
    with pytest.raises(ValueError, match="test_time_turns=3: expected 1"):
        resolve_profile("quick", {"test_time_turns": "3"})


def test_a_validation_split_larger_than_the_training_subset_is_reported(tmp_path):
    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    settings = {"methods": "scratch", "bootstrap_resamples": "10", "calibration_images": "40", "fractions": "0.1,1.0"}
    messages = []
    session = FinetuneSession(images, table, resolve_profile("smoke", {**settings, "validation_fraction": "0.2"}), log=messages.append)
    split = session.split(0)
    assert len(split.validation_for(0.1)) > len(split.train[0.1])
    session.run("scratch", 0.1, 0, tmp_path / "small")
    assert any("more labelled images choose the epoch" in message and "validation_fraction=0.2" in message for message in messages)
    messages.clear()
    session.run("scratch", 1.0, 0, tmp_path / "full")  # 100 %: the split is smaller than the subset
    assert not any("more labelled images" in message for message in messages)


def test_a_fresh_encoders_batchnorm_is_recalibrated_on_the_calibration_rows(small_session, tmp_path, monkeypatch):
    split = small_session.split(0, 1.0)
    calibration = small_session.calibration_rows(split, seed=small_session.profile.seed)
    calls = []
    monkeypatch.setattr(small_session, "recalibrate_batchnorm", lambda rows: calls.append(np.array(rows)) or 1)
    small_session.run("scratch", 1.0, 0, tmp_path / "off")
    assert calls == []  # the smoke profile leaves batch norm as training left it
    small_session.profile = small_session.profile.derive(recalibrate_batchnorm=True)
    try:
        small_session.run("scratch", 1.0, 0, tmp_path / "on")
    finally:
        small_session.profile = small_session.profile.derive(recalibrate_batchnorm=False)
    # Once: the fresh encoder, before its warm-up.
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], calibration)


def test_batchnorm_is_re_estimated_from_batches_read_with_autotuning_off(small_session, autotune_of_iterated_datasets):
    # As Trainer.encode and Trainer.predict do (tests/test_training.py): with tf.data's
    # autotuning on, an inference pass ran at random at ~60 % speed on 2 cores.
    weights = small_session.trainer.encoder.get_weights()
    try:
        assert small_session.recalibrate_batchnorm(np.arange(40)) > 0
    finally:
        small_session.trainer.encoder.set_weights(weights)  # the module's session, as it was
    assert autotune_of_iterated_datasets == [False]


def test_a_shared_fresh_encoder_starts_every_scratch_run_and_is_recalibrated_once_unlabelled(tmp_path, monkeypatch):
    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    settings = {"methods": "scratch", "bootstrap_resamples": "10", "calibration_images": "40", "recalibrate_batchnorm": "true"}

    def session_for(scratch_encoder):
        profile = resolve_profile("smoke", {**settings, "scratch_encoder": scratch_encoder})
        return FinetuneSession(images, table, profile, log=lambda line: None)

    per_repetition, shared = session_for("per_repetition"), session_for("shared")
    starts = [per_repetition._initial_weights("scratch", seed) for seed in (0, 1)]
    assert any(not np.array_equal(a, b) for a, b in zip(starts[0][0], starts[1][0]))  # one fresh encoder per repetition
    shared_starts = [shared._initial_weights("scratch", seed) for seed in (0, 1)]
    # The head still follows the repetition's seed, as in every method: only the encoder is shared.
    for (_, head), (_, per_repetition_head) in zip(shared_starts, starts):
        for a, b in zip(head, per_repetition_head):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(shared_starts[0][1], shared_starts[1][1]))
    # The same encoder weights, to the bit, in another notebook's session, whichever repetition
    # it starts with: the sweep shares its features.
    other = session_for("shared")
    for a, b in zip(shared_starts[0][0], other._initial_weights("scratch", 3)[0]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(shared_starts[0][0], starts[0][0]))
    shared_starts = [start for start, _ in shared_starts]
    # Its batch norm was re-estimated: the moving statistics are no longer the initial 0 and 1.
    means = [w for w, v in zip(shared_starts[0], shared.trainer.encoder.weights) if "moving_mean" in v.path]
    assert means and all(np.abs(m).max() > 0 for m in means)

    rows = shared.unlabelled_calibration_rows()
    assert len(rows) == 40 and np.all(np.diff(rows) > 0)
    split = shared.split(0, 1.0)
    assert np.intersect1d(rows, split.test).size  # the whole set, no labels read: not one repetition's pool
    calls = []
    fresh = session_for("shared")
    recalibrate = fresh.recalibrate_batchnorm
    monkeypatch.setattr(fresh, "recalibrate_batchnorm", lambda rows: calls.append(np.array(rows)) or recalibrate(rows))
    for repetition in (0, 1):
        fresh.run("scratch", 1.0, repetition, tmp_path / str(repetition))
    assert len(calls) == 1  # once for the session, not per run
    np.testing.assert_array_equal(calls[0], rows)


@pytest.mark.parametrize("turns", [1, 4, 8])
def test_a_ridge_head_is_fitted_on_the_training_images_in_each_view_the_predictions_average(turns, tmp_path, monkeypatch):
    from drnb.ridge import fit_ridge

    images, grades = make_fundus_images(80, size=32, seed=1)
    table = pd.DataFrame({"image_id": [str(i) for i in range(80)], "path": "", "grade": grades, "patient_id": None, "split": None})
    settings = {
        "methods": "scratch", "bootstrap_resamples": "10", "calibration_images": "40", "target": "regression",
        "finetune_hidden": "", "head_init": "ridge", "test_time_turns": str(turns), "warmup_epochs": "0",
        "finetune_epochs": "1", "finetune_learning_rate": "1e-9",
    }
    session = FinetuneSession(images, table, resolve_profile("smoke", settings), log=lambda line: None)
    fits, turns_encoded = [], []
    fit_head, frozen_features = session.fit_head, session.frozen_features
    monkeypatch.setattr(
        session, "fit_head",
        lambda features, targets, groups=None: fits.append((features, targets, groups)) or fit_head(features, targets, groups),
    )
    monkeypatch.setattr(
        session, "frozen_features",
        lambda rows, view=0: turns_encoded.append(view) or frozen_features(rows, view),
    )
    metrics = session.run("scratch", 1.0, 0, tmp_path)
    train = session.split(0, 1.0).train[1.0]
    assert turns_encoded == ([0] if turns == 1 else list(range(turns)))  # 4-7: the mirror image's turns
    features, targets, images = fits[0]
    assert features.shape == (turns * len(train), session.trainer.encoder.output_shape[-1])
    np.testing.assert_array_equal(targets, np.tile(grades[train], turns))
    np.testing.assert_array_equal(images, np.tile(np.arange(len(train)), turns))  # an image's turns leave together
    # The head holds that fit: a rate of 1e-9 leaves it where it started.
    expected = fit_ridge(features, targets, groups=images, criterion="correlation")
    weights, bias = session.trainer.head.get_weights()
    np.testing.assert_allclose(weights[:, 0], expected.weights, rtol=1e-3, atol=1e-6)
    assert metrics["ridge_penalty"] == expected.penalty


@pytest.mark.parametrize("overrides, message", [
    ({"test_time_turns": "3"}, "test_time_turns=3: expected 1"),
    ({"head_init": "ridge", "target": "ordinal"}, "head_init='ridge' fits a linear regression head"),
])
def test_views_must_be_1_2_4_or_8_and_a_ridge_head_must_be_linear(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_profile("quick", overrides)


@pytest.mark.parametrize("warmup", [
    {"warmup_epochs": "0"},  # the ridge fit alone (quick)
    {"warmup_epochs": "1"},  # the head also trains, on the images, with the encoder frozen
])
def test_without_epochs_the_encoder_is_untouched_and_predicts_from_its_kept_features(
    warmup, tmp_path, monkeypatch, tiny_fundus_set, linear_settings
):
    from drnb.models import profile_encoder
    from drnb.pretext import save_atomically

    images, _, table = tiny_fundus_set
    profile = resolve_profile("smoke", {**linear_settings, **warmup})
    encoder_path = tmp_path / "encoder.keras"  # an untrained encoder stands in for the pretext's
    save_atomically(profile_encoder(profile), encoder_path)
    session = FinetuneSession(images, table, profile, encoder_paths={"rotation": encoder_path}, log=lambda line: None)
    encoded, encode = [], session.trainer.encode

    def counting_encode(dataset):
        features = encode(dataset)
        encoded.append(len(features))
        return features

    monkeypatch.setattr(session.trainer, "encode", counting_encode)
    for method in ("rotation", "scratch"):
        encoded.clear()
        metrics = session.run(method, 1.0, 0, tmp_path / method)
        start, _ = session._initial_weights(method, profile.seed)
        if method == "rotation":  # batch norm re-estimated for fresh encoders only
            for kept, started in zip(session.trainer.encoder.get_weights(), start):
                np.testing.assert_array_equal(kept, started)
        n_train = len(session.split(0, 1.0).train[1.0])
        assert metrics["steps"] == profile.warmup_epochs * plan_steps(n_train, min(session.batch_size, n_train), profile)[0]
        assert metrics["best_epoch"] == profile.warmup_epochs  # the last warm-up epoch is kept; none without one
        assert list(pd.read_csv(tmp_path / method / "history.csv").columns)[:2] == ["epoch", "phase"]
        split = session.split(0, 1.0)
        calibration = session.calibration_rows(split, profile.seed)
        # The features' predictions are the network's own.
        np.testing.assert_allclose(session._predict(split.test, frozen=True), session._predict(split.test), rtol=1e-4, atol=1e-5)
        if profile.warmup_epochs:
            continue  # the warm-up reads features or images of its own; the counts below are the fit's
        # Each row once per turn: the fit's four, then the test fold's four (calibration rows
        # are training rows at 100 %), for the pretext's encoder and a fresh one alike.
        assert np.isin(calibration, split.train[1.0]).all()
        assert encoded == [n_train] * 4 + [len(split.test)] * 4


@pytest.fixture
def lp_ft_session(tmp_path, tiny_fundus_set):
    """A smoke-sized session of quick's recipe: a ridge head on frozen features, then (protocol
    "finetune") everything trained with batch norm frozen; both protocols, both methods."""
    from drnb.models import profile_encoder
    from drnb.pretext import save_atomically

    images, _, table = tiny_fundus_set
    profile = resolve_profile("smoke", {
        "methods": "rotation,scratch", "protocols": "finetune,linear", "bootstrap_resamples": "10", "calibration_images": "40",
        "target": "regression", "finetune_hidden": "", "head_init": "ridge", "test_time_turns": "2",
        "cut_points": "prior", "warmup_epochs": "0", "finetune_epochs": "2", "finetune_min_steps": "6",
        "validation_fraction": "0", "finetune_batchnorm": "frozen", "lr_schedule": "cosine", "recalibrate_batchnorm": "true",
        "scratch_encoder": "shared",
    })
    encoder_path = tmp_path / "encoder.keras"  # an untrained encoder stands in for the pretext's
    save_atomically(profile_encoder(profile), encoder_path)
    return FinetuneSession(images, table, profile, encoder_paths={"rotation": encoder_path}, log=lambda line: None)


def test_fine_tuning_changes_the_saved_encoder_and_linear_evaluation_does_not(lp_ft_session, tmp_path):
    import keras

    from drnb.pretext import load_encoder

    session = lp_ft_session
    starts = {"rotation": load_encoder(session.encoder_paths["rotation"]).get_weights(), "scratch": session.shared_fresh_encoder()}
    for method, start in starts.items():
        for protocol in ("linear", "finetune"):
            out = run_directory(tmp_path, protocol, method, 1.0, 0)
            metrics = session.run(method, 1.0, 0, out, protocol=protocol, save_model=True)
            assert metrics["protocol"] == protocol and np.isfinite(metrics["qw_kappa"])
            saved = keras.models.load_model(out / "model.keras", compile=False).get_layer(session.trainer.encoder.name)
            unchanged = [np.array_equal(a, b) for a, b in zip(saved.get_weights(), start)]
            if protocol == "linear":
                assert all(unchanged) and metrics["steps"] == 0
            else:
                assert not all(unchanged) and metrics["steps"] >= session.profile.finetune_min_steps
                # Batch norm frozen: its moving statistics are the ones the head was fitted with.
                names = [v.path for v in session.trainer.encoder.weights]
                moving = [same for same, name in zip(unchanged, names) if "moving_" in name]
                assert moving and all(moving)


def test_scratch_and_rotation_runs_of_a_repetition_see_the_same_rows_and_steps(lp_ft_session, tmp_path, monkeypatch):
    import drnb.finetune

    session = lp_ft_session
    seen = []  # (training rows, targets) of every training pipeline built
    real = drnb.finetune.labelled_batches

    def spy(images, indices, targets, *args, training=False, **kwargs):
        if training:
            seen.append((np.array(indices), np.array(targets)))
        return real(images, indices, targets, *args, training=training, **kwargs)

    monkeypatch.setattr(drnb.finetune, "labelled_batches", spy)
    runs = {method: session.run(method, 0.5, 1, tmp_path / method, protocol="finetune") for method in ("rotation", "scratch")}
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    np.testing.assert_array_equal(seen[0][1], seen[1][1])
    assert runs["rotation"]["steps"] == runs["scratch"]["steps"] > 0
    assert runs["rotation"]["n_train"] == runs["scratch"]["n_train"] == len(session.split(1, 0.5).train[0.5])
    histories = [pd.read_csv(tmp_path / method / "history.csv") for method in ("rotation", "scratch")]
    pd.testing.assert_series_equal(histories[0]["learning_rate"], histories[1]["learning_rate"])
    predicted = [pd.read_csv(tmp_path / method / "predictions.csv")["image_id"] for method in ("rotation", "scratch")]
    pd.testing.assert_series_equal(predicted[0], predicted[1])


def test_a_protocol_the_profile_does_not_run_is_refused(lp_ft_session, tmp_path):
    linear_only = FinetuneSession(
        lp_ft_session._images, lp_ft_session.table, lp_ft_session.profile.derive(protocols=("linear",)), log=lambda line: None
    )
    with pytest.raises(ValueError, match="protocol='finetune': expected one of the profile's protocols \\['linear'\\]"):
        linear_only.run("scratch", 1.0, 0, tmp_path, protocol="finetune")


def test_a_start_share_leaves_the_fine_tuned_weights_that_share_of_the_way_back_to_the_start(lp_ft_session, tmp_path):
    import keras

    from drnb.finetune import interpolated
    from drnb.pretext import load_encoder

    start = load_encoder(lp_ft_session.encoder_paths["rotation"]).get_weights()
    trained_session = lp_ft_session
    shared_session = FinetuneSession(
        trained_session._images, trained_session.table, trained_session.profile.derive(finetune_start_share=0.25),
        encoder_paths=trained_session.encoder_paths, log=lambda line: None,
    )
    saved = {}
    for name, session in (("trained", trained_session), ("shared", shared_session)):
        session.run("rotation", 1.0, 0, tmp_path / name, protocol="finetune", save_model=True)
        model = keras.models.load_model(tmp_path / name / "model.keras", compile=False)
        saved[name] = model.get_layer(session.trainer.encoder.name).get_weights()
    expected = interpolated(start, saved["trained"], 0.25)
    assert any(not np.allclose(a, b) for a, b in zip(start, saved["trained"]))
    for got, want in zip(saved["shared"], expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Integer weights (counters, seeds) are not averaged.
    assert interpolated([np.array([2])], [np.array([7])], 0.5)[0].tolist() == [7]
    with pytest.raises(ValueError, match="finetune_start_share=1.0"):
        trained_session.profile.derive(finetune_start_share=1.0)
