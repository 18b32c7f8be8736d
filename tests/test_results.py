"""Collecting runs into the paper's table, and the paired comparison of methods."""

import logging
import re

import numpy as np
import pandas as pd
import pytest

from drnb.finetune import run_directory, write_run
from drnb.metrics import evaluate_predictions
from drnb.results import PAPER_KAPPA, collect_results, compare_methods, cut_point_effect, markdown_table, summary_table


def fake_sweep(root, accuracy_by_run, fractions=(0.1, 1.0), repetitions=3, n=200, seed=0):
    """Write run folders as fine-tuning does, with predictions correct at the given rates.

    ``accuracy_by_run``: (protocol, method) -> the share of test images predicted right.
    """
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 5, n)
    folds = np.arange(n) % repetitions
    test_rows = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "path": "x"})
    for (protocol, method), accuracy in accuracy_by_run.items():
        for fraction in fractions:
            for repetition in range(repetitions):
                test = folds == repetition
                truth = grades[test]
                predicted = np.where(rng.random(test.sum()) < accuracy, truth, rng.integers(0, 5, test.sum()))
                metrics = evaluate_predictions(truth, predicted, n_resamples=0)
                metrics.update(protocol=protocol, method=method, fraction=fraction, repetition=repetition, n_train=10,
                               n_test=int(test.sum()), seconds=1.0)
                probabilities = np.eye(5)[predicted]
                out = run_directory(root, protocol, method, fraction, repetition)
                write_run(out, metrics, [], test_rows[test], truth, predicted, probabilities)
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


def test_a_much_better_method_is_called_better_and_equal_ones_are_not_per_protocol(tmp_path):
    clear = {("finetune", "rotation"): 0.95, ("finetune", "scratch"): 0.2, ("linear", "rotation"): 0.6, ("linear", "scratch"): 0.6}
    fake_sweep(tmp_path, clear)
    results = collect_results(tmp_path)
    comparison = compare_methods(tmp_path, results, n_resamples=200, protocol="finetune")
    assert (comparison["protocol"] == "finetune").all() and len(comparison) == 2
    assert (comparison["verdict"] == "rotation better").all()
    assert (comparison["repetitions_won"] == 3).all() and (comparison["ci_low"] > 0).all()

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
