"""Collecting runs into the paper's table, and the paired comparison of methods."""

import logging
import re

import numpy as np
import pandas as pd
import pytest

from drnb.finetune import run_directory, write_run
from drnb.metrics import ONE_CLASS_ONLY, evaluate_predictions, referable_metrics, specificity_threshold
from drnb.results import (
    NO_TRAINING_SCORES,
    PAPER_KAPPA,
    collect_results,
    compare_methods,
    cut_point_effect,
    markdown_table,
    summary_table,
)


def fake_sweep(root, accuracy_by_run, fractions=(0.1, 1.0), repetitions=3, n=200, seed=0, legacy=False, grades=None):
    """Write run folders as fine-tuning does, with predictions correct at the given rates.

    ``accuracy_by_run``: (protocol, method) -> the share of test images predicted right. The
    score is the predicted grade plus noise; its referable-DR threshold is set on made-up
    training scores. ``legacy``: write what runs wrote before referable DR (no referable
    figures in metrics.json, no score column). Returns the grades.
    """
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 5, n) if grades is None else np.asarray(grades)
    folds = np.arange(n) % repetitions
    test_rows = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "path": "x"})
    for (protocol, method), accuracy in accuracy_by_run.items():
        for fraction in fractions:
            for repetition in range(repetitions):
                test = folds == repetition
                truth = grades[test]
                predicted = np.where(rng.random(test.sum()) < accuracy, truth, rng.integers(0, 5, test.sum()))
                scores = predicted + rng.normal(0, 0.3, test.sum())
                metrics = evaluate_predictions(truth, predicted, n_resamples=0)
                if not legacy:
                    training = rng.integers(0, 5, 50)
                    threshold = specificity_threshold(training + rng.normal(0, 0.3, 50), training >= 2)
                    metrics.update(referable_metrics(truth, scores, threshold, n_resamples=50, seed=repetition))
                metrics.update(protocol=protocol, method=method, fraction=fraction, repetition=repetition, n_train=10,
                               n_test=int(test.sum()), seconds=1.0)
                probabilities = np.eye(5)[predicted]
                out = run_directory(root, protocol, method, fraction, repetition)
                write_run(out, metrics, [], test_rows[test], truth, predicted, probabilities, scores=None if legacy else scores)
    return grades


BOTH_PROTOCOLS = {("finetune", "rotation"): 0.9, ("finetune", "scratch"): 0.4, ("linear", "rotation"): 0.7, ("linear", "scratch"): 0.6}


def test_table_has_min_avg_max_per_protocol_method_and_fraction_beside_the_paper(tmp_path):
    fake_sweep(tmp_path, BOTH_PROTOCOLS)
    results = collect_results(tmp_path)
    assert len(results) == 4 * 2 * 3
    table = summary_table(results)
    assert set(zip(table["protocol"], table["method"], table["train_split"])) == {
        (p, m, s) for p, m in BOTH_PROTOCOLS for s in (10, 100)
    }
    for protocol in ("finetune", "linear"):
        row = table[(table["protocol"] == protocol) & (table["method"] == "rotation") & (table["train_split"] == 10)].iloc[0]
        runs = results[(results["protocol"] == protocol) & (results["method"] == "rotation") & (results["fraction"] == 0.1)]
        kappas = runs["qw_kappa"]
        assert (row["qwk_min"], row["qwk_avg"], row["qwk_max"]) == pytest.approx((kappas.min(), kappas.mean(), kappas.max()))
        assert row["paper_qwk_avg"] == PAPER_KAPPA[0.1][1]
        assert row["qwk_avg_minus_paper"] == pytest.approx(kappas.mean() - PAPER_KAPPA[0.1][1])
    # The linear read-out of a scratch encoder is an untrained network, and the table says so.
    words = dict(zip(zip(table["protocol"], table["method"]), table["runs_are"]))
    assert words[("linear", "scratch")] == "random weights, linear head"
    assert words[("finetune", "scratch")] == "trained from scratch"
    markdown = markdown_table(table)
    assert markdown.count("\n") == len(table) + 2 and "| linear | scratch | random weights, linear head | 10 |" in markdown
    # Referable DR beside kappa: AUC min / avg / max and the operating point's averages.
    assert list(table.columns[table.columns.get_loc("qwk_max") + 1:][:5]) == [
        "auc_min", "auc_avg", "auc_max", "sensitivity_avg", "specificity_avg"
    ]
    for (protocol, method, split), rows in results.groupby(["protocol", "method", "fraction"]):
        row = table[(table["protocol"] == protocol) & (table["method"] == method) & (table["train_split"] == split * 100)].iloc[0]
        aucs = rows["referable_auc"]
        assert np.isfinite(aucs).all()
        assert (row["auc_min"], row["auc_avg"], row["auc_max"]) == pytest.approx((aucs.min(), aucs.mean(), aucs.max()))
        assert row["sensitivity_avg"] == pytest.approx(rows["referable_sensitivity"].mean())
    assert "auc_avg" in markdown


def test_older_runs_get_auc_and_recall_from_their_predictions_but_no_operating_point(tmp_path):
    from sklearn.metrics import roc_auc_score

    fake_sweep(tmp_path, {("finetune", "rotation"): 0.8}, legacy=True)
    with pytest.raises(ValueError, match="pass target"):
        collect_results(tmp_path)
    results = collect_results(tmp_path, target="softmax", n_resamples=50)  # one-hot outputs: the expected grade is the grade
    for row in results.itertuples():
        predictions = pd.read_csv(run_directory(tmp_path, row.protocol, row.method, row.fraction, row.repetition) / "predictions.csv")
        assert row.referable_auc == pytest.approx(roc_auc_score(predictions["grade"] >= 2, predictions["predicted"]), abs=1e-9)
        assert row.referable_auc_ci_low < row.referable_auc < row.referable_auc_ci_high
        assert np.isnan(row.referable_sensitivity) and np.isnan(row.referable_threshold)
        assert row.referable_note == NO_TRAINING_SCORES
    assert np.isfinite(results[[f"recall_{g}" for g in range(5)]].to_numpy()).all()
    table = summary_table(results)
    assert np.isfinite(table["auc_avg"]).all() and table["sensitivity_avg"].isna().all()


def test_a_test_fold_of_one_class_is_undefined_and_says_so(tmp_path):
    # Fold 0 (every third photograph from the first) holds grades 0-1 only.
    grades = np.where(np.arange(60) % 3 == 0, np.arange(60) % 2, np.arange(60) % 5)
    fake_sweep(tmp_path, {("finetune", "rotation"): 0.8, ("finetune", "scratch"): 0.5}, fractions=(1.0,), n=60, grades=grades)
    results = collect_results(tmp_path)
    lone = results["repetition"] == 0
    assert results.loc[lone, "referable_note"].str.startswith(ONE_CLASS_ONLY).all()
    assert results.loc[lone, "referable_auc"].isna().all() and results.loc[lone, "referable_sensitivity"].isna().all()
    assert np.isfinite(results.loc[~lone, "referable_auc"]).all() and (results.loc[~lone, "referable_note"] == "").all()
    table = summary_table(results)
    assert (table["auc_min"] == table["auc_min"]).all()  # the undefined fold is left out, not made 0
    comparison = compare_methods(tmp_path, results, n_resamples=50)
    assert np.isfinite(comparison[["auc_pooled_difference", "auc_mean_difference"]].to_numpy()).all()


def test_a_much_better_method_is_called_better_and_equal_ones_are_not_per_protocol(tmp_path):
    clear = {("finetune", "rotation"): 0.95, ("finetune", "scratch"): 0.2, ("linear", "rotation"): 0.6, ("linear", "scratch"): 0.6}
    fake_sweep(tmp_path, clear)
    results = collect_results(tmp_path)
    comparison = compare_methods(tmp_path, results, n_resamples=200, protocol="finetune")
    assert (comparison["protocol"] == "finetune").all() and len(comparison) == 2
    assert (comparison["verdict"] == "rotation better").all()
    assert (comparison["repetitions_won"] == 3).all() and (comparison["ci_low"] > 0).all()
    # The same question for referable DR's AUC, on the same resamples.
    assert (comparison["auc_ci_low"] > 0).all() and (comparison["auc_verdict"] == "rotation better").all()
    assert (comparison["auc_ci_low"] < comparison["auc_pooled_difference"]).all()
    assert (comparison["auc_pooled_difference"] < comparison["auc_ci_high"]).all()
    assert (comparison["auc_mean_difference"] > 0).all()

    # The linear runs are paired with each other, not with the fine-tuned ones.
    comparison = compare_methods(tmp_path, results, n_resamples=200, protocol="linear")
    assert (comparison["ci_low"] < comparison["pooled_difference"]).all()
    assert (comparison["pooled_difference"] < comparison["ci_high"]).all()
    assert (comparison["verdict"] == "no clear difference").all()


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        collect_results(tmp_path)


def test_cut_point_effect_compares_both_decodings_per_fraction():
    results = pd.DataFrame(
        {
            "protocol": ["linear"] * 3,
            "method": ["rotation"] * 3,
            "fraction": [0.05, 0.05, 1.0],
            "qw_kappa": [0.30, 0.10, 0.50],
            "qw_kappa_fixed_cuts": [0.20, 0.10, 0.40],
        }
    )
    effect = cut_point_effect(results).set_index("train_split")
    assert effect.loc[5.0, "qwk_avg"] == pytest.approx(0.20)
    assert effect.loc[5.0, "difference"] == pytest.approx(0.05)
    assert effect.loc[5.0, "runs_higher"] == 1 and effect.loc[5.0, "runs"] == 2
    assert effect.loc[100.0, "difference"] == pytest.approx(0.10)
    with pytest.raises(ValueError, match="qw_kappa_fixed_cuts"):
        cut_point_effect(results.drop(columns="qw_kappa_fixed_cuts"))


# --------------------------------------------------------------------------------------------
# A damaged run is named, and redone on a rerun
# --------------------------------------------------------------------------------------------


def _damage(path, how):
    if how == "invalid_json":
        path.write_text('{"qw_kappa": 0.5,')
    elif how == "empty":
        path.write_text("")
    else:  # cut short
        text = path.read_text()
        path.write_text(text[: len(text) // 2])


def test_collect_results_names_a_damaged_metrics_file(tmp_path):
    fake_sweep(tmp_path, {("finetune", "rotation"): 0.9})
    damaged = run_directory(tmp_path, "finetune", "rotation", 1.0, 1) / "metrics.json"
    _damage(damaged, "invalid_json")
    with pytest.raises(ValueError, match=re.escape(f"{damaged} is damaged: not valid JSON") + ".*rerun notebook 03"):
        collect_results(tmp_path)


@pytest.mark.parametrize("file, how", [("metrics.json", "invalid_json"), ("metrics.json", "empty"),
                                       ("predictions.csv", "cut_short"), ("predictions.csv", "empty")])
def test_a_damaged_run_is_named_in_a_warning_and_redone(tmp_path, caplog, file, how):
    """run_fraction counts a run finished only when its metrics and predictions load."""
    from drnb.finetune import finished_run, load_finished_run, run_fraction
    from drnb.profiles import PROFILES

    fake_sweep(tmp_path, {("finetune", "rotation"): 0.9}, fractions=(1.0,), repetitions=2)
    damaged_run = run_directory(tmp_path, "finetune", "rotation", 1.0, 1)
    intact = load_finished_run(run_directory(tmp_path, "finetune", "rotation", 1.0, 0))
    _damage(damaged_run / file, how)
    with caplog.at_level(logging.WARNING, logger="drnb"):
        assert finished_run(damaged_run) is None
    assert str(damaged_run / file) in caplog.text and "running it again" in caplog.text

    class Session:  # what run_fraction asks of a FinetuneSession
        profile = PROFILES["smoke"].derive(protocols=("finetune",), methods=("rotation",), repetitions=2)
        done: list = []

        def available_methods(self):
            return ["rotation"]

        def log(self, line):
            pass

        def run(self, method, fraction, repetition, out_dir, *, protocol, save_model):
            self.done.append((method, protocol, repetition))
            return {**intact, "repetition": repetition, "n_train": 10, "steps": 1, "seconds": 1.0,
                    "features_encoded": 0, "features_reused": 0}

    session = Session()
    runs = run_fraction(session, 1.0, tmp_path)
    assert session.done == [("rotation", "finetune", 1)]  # only the damaged run, not the intact one
    assert sorted(runs["repetition"]) == [0, 1]
