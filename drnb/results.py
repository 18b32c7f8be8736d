"""Collect per-run metrics into the paper's table and compare methods.

Every fine-tuning run leaves a ``metrics.json`` (see :mod:`drnb.finetune`); this module reads
them all, never a shared file that runs append to, so a crashed run cannot corrupt the
results of the others. Runs written before drnb scored referable DR get its AUC and per-grade
recall computed from their ``predictions.csv`` (:func:`referable_from_predictions`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from drnb.metrics import (
    GRADES,
    bootstrap_auc_difference_ci,
    bootstrap_kappa_difference_ci,
    evaluate_predictions,
    quadratic_weighted_kappa,
    referable_auc,
    referable_metrics,
)
from drnb.targets import expected_grade

# What each (protocol, method) pair's runs are, in words: the linear read-out of a scratch
# encoder is an untrained network, not the study's scratch-trained baseline.
DESCRIPTIONS = {
    ("finetune", "rotation"): "rotation pretext, fine-tuned",
    ("finetune", "contrastive"): "contrastive pretext, fine-tuned",
    ("finetune", "scratch"): "trained from scratch",
    ("finetune", "imagenet"): "ImageNet weights, fine-tuned",
    ("linear", "rotation"): "rotation pretext, linear head",
    ("linear", "contrastive"): "contrastive pretext, linear head",
    ("linear", "scratch"): "random weights, linear head",
    ("linear", "imagenet"): "ImageNet weights, linear head",
}
# The study's published quadratic weighted kappa, rotation pretext, APTOS 2019 (min, avg, max).
PAPER_KAPPA = {
    0.05: (0.175, 0.294, 0.467),
    0.10: (0.289, 0.432, 0.508),
    0.25: (0.474, 0.575, 0.694),
    0.50: (0.612, 0.680, 0.737),
    1.00: (0.696, 0.725, 0.756),
}
RESULT_COLUMNS = (
    "protocol", "method", "fraction", "repetition", "qw_kappa", "accuracy", "kappa_ci_low", "kappa_ci_high",
    "referable_auc", "referable_auc_ci_low", "referable_auc_ci_high", "referable_sensitivity", "referable_specificity",
    "referable_note", "n_train", "n_test", "seconds",
)
# Referable-DR figures that are numbers (null in a metrics.json where undefined).
REFERABLE_NUMBERS = (
    "referable_auc", "referable_auc_ci_low", "referable_auc_ci_high", "referable_threshold",
    "referable_sensitivity", "referable_specificity",
)
# Why an older run has no operating point.
NO_TRAINING_SCORES = "no operating point: the run predates it, and the training images' scores it needs were not kept"


def describe(protocol: str, method: str) -> str:
    """What a (protocol, method) pair's runs are, in words (e.g. "random weights, linear head")."""
    return DESCRIPTIONS.get((protocol, method), f"{method}, {protocol}")


def collect_results(
    finetune_root: str | os.PathLike, *, target: str | None = None, n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per finished run under ``finetune_root``
    (``<protocol>/<method>/fraction_<f>/repetition_<r>/metrics.json``).

    A ``metrics.json`` without referable-DR figures (a run older than them) gets them from its
    ``predictions.csv`` (:func:`referable_from_predictions`): the AUC, its interval and the
    per-grade recall, but no operating point (``referable_note`` says why).

    Parameters
    ----------
    target : str, optional
        The profile's ``target``: how an older ``predictions.csv`` without a ``score`` column
        turns its outputs into the expected grade. Needed only for such runs.
    n_resamples, seed : int
        The bootstrap of an older run's AUC interval, seeded ``seed + repetition`` as a run is.

    Returns
    -------
    pandas.DataFrame
        :data:`RESULT_COLUMNS` first, then every other metric; sorted by protocol, method,
        fraction, repetition. Undefined referable-DR figures are NaN.
    """
    paths = sorted(Path(finetune_root).glob("*/*/fraction_*/repetition_*/metrics.json"))
    rows = [_read_metrics(path) for path in paths]
    if not rows:
        raise FileNotFoundError(f"no finished runs (metrics.json) under {finetune_root}; run notebook 03 first")
    for path, row in zip(paths, rows):
        if "referable_auc" not in row:
            seeded = seed + int(row.get("repetition", 0))
            computed = referable_from_predictions(path.parent / "predictions.csv", target, n_resamples=n_resamples, seed=seeded)
            row.update({key: value for key, value in computed.items() if key not in row})  # what the run recorded stays
    results = pd.DataFrame(rows)
    for column in REFERABLE_NUMBERS:
        results[column] = pd.to_numeric(results[column], errors="coerce") if column in results else np.nan
    ordered = list(RESULT_COLUMNS) + [c for c in results.columns if c not in RESULT_COLUMNS]
    return results[ordered].sort_values(["protocol", "method", "fraction", "repetition"]).reset_index(drop=True)


def _read_metrics(path: Path) -> dict:
    """One run's metrics; a damaged file is named, with how to redo its run."""
    from drnb.files import read_json

    try:
        return read_json(path)
    except ValueError as error:
        raise ValueError(f"{error}; rerun notebook 03 (or drnb reproduce) to redo this run") from None


def prediction_scores(predictions: pd.DataFrame, target: str | None = None) -> np.ndarray:
    """Each photograph's continuous score, float64 (N,), from a ``predictions.csv`` table: its
    ``score`` column, or for a run written before that column the expected grade of its
    outputs ``p0``, ... (:func:`drnb.targets.expected_grade` with ``target``).

    Raises
    ------
    ValueError
        If the table has neither ``score`` nor outputs, or needs ``target`` and none is given.
    """
    if "score" in predictions:
        return predictions["score"].to_numpy(np.float64)
    outputs = [column for column in predictions.columns if column.startswith("p") and column[1:].isdigit()]
    if not outputs:
        raise ValueError(f"predictions have no score and no outputs p0, p1, ...; columns: {list(predictions.columns)}")
    if target is None:
        raise ValueError("these predictions predate the score column: pass target (the profile's) to compute the expected grade")
    return expected_grade(predictions[sorted(outputs, key=lambda c: int(c[1:]))].to_numpy(), target)


def referable_from_predictions(
    path: str | os.PathLike, target: str | None = None, *, n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Referable-DR figures and per-grade recall of one run, from its ``predictions.csv`` alone.

    For runs written before drnb scored referable DR. The operating point needs the scores of
    training images, which a run never wrote, so its threshold, sensitivity and specificity
    stay None and ``referable_note`` says so (:data:`NO_TRAINING_SCORES`).

    Returns
    -------
    dict
        As :func:`drnb.metrics.referable_metrics`, with ``recall_0`` .. ``recall_4``.

    Raises
    ------
    FileNotFoundError
        If ``predictions.csv`` is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run's referable-DR figures are computed from it")
    predictions = pd.read_csv(path)
    figures = referable_metrics(
        predictions["grade"].to_numpy(), prediction_scores(predictions, target), None,
        n_resamples=n_resamples, seed=seed, note=NO_TRAINING_SCORES,
    )
    recalls = evaluate_predictions(predictions["grade"].to_numpy(), predictions["predicted"].to_numpy(), n_resamples=0)
    return {**figures, **{f"recall_{g}": recalls[f"recall_{g}"] for g in GRADES}}


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's table: per protocol, method and fraction, QWK min / avg / max over
    repetitions, beside the paper's (rotation, fine-tuned), and referable DR's AUC.

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol, method, runs_are (in words), train_split (%), runs, qwk_min,
        qwk_avg, qwk_max, auc_min, auc_avg, auc_max`` (referable-DR AUC over the runs where it
        is defined; NaN where none is), ``sensitivity_avg, specificity_avg`` (at the operating
        point chosen on training images, over the runs that have one), ``accuracy_avg,
        paper_qwk_min, paper_qwk_avg, paper_qwk_max, qwk_avg_minus_paper``.
    """
    results = results.assign(**{c: np.nan for c in ("referable_auc", "referable_sensitivity", "referable_specificity") if c not in results})
    grouped = results.groupby(["protocol", "method", "fraction"])
    table = grouped.agg(
        runs=("qw_kappa", "size"),
        qwk_min=("qw_kappa", "min"),
        qwk_avg=("qw_kappa", "mean"),
        qwk_max=("qw_kappa", "max"),
        auc_min=("referable_auc", "min"),
        auc_avg=("referable_auc", "mean"),
        auc_max=("referable_auc", "max"),
        sensitivity_avg=("referable_sensitivity", "mean"),
        specificity_avg=("referable_specificity", "mean"),
        accuracy_avg=("accuracy", "mean"),
    ).reset_index()
    paper = pd.DataFrame(
        [(fraction, *values) for fraction, values in PAPER_KAPPA.items()],
        columns=["fraction", "paper_qwk_min", "paper_qwk_avg", "paper_qwk_max"],
    )
    table["fraction_key"] = table["fraction"].round(4)
    paper["fraction_key"] = paper["fraction"].round(4)
    table = table.merge(paper.drop(columns="fraction"), on="fraction_key", how="left").drop(columns="fraction_key")
    table["qwk_avg_minus_paper"] = table["qwk_avg"] - table["paper_qwk_avg"]
    table.insert(2, "runs_are", [describe(p, m) for p, m in zip(table["protocol"], table["method"])])
    table.insert(3, "train_split", (table.pop("fraction") * 100).round(2))
    return table


def cut_point_effect(results: pd.DataFrame) -> pd.DataFrame:
    """What prior-matched cut points changed: per method and fraction, both decodings' average kappa.

    Parameters
    ----------
    results : pandas.DataFrame
        From :func:`collect_results`; needs ``qw_kappa_fixed_cuts`` (runs written since drnb
        recorded it).

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol, method, train_split (%), qwk_avg`` (the profile's decoding),
        ``qwk_avg_fixed_cuts`` (the fixed rule on the same outputs), ``difference`` and
        ``runs_higher`` (runs where the profile's decoding scored higher) of ``runs``.
    """
    if "qw_kappa_fixed_cuts" not in results:
        raise ValueError("results have no qw_kappa_fixed_cuts column: these runs predate it; rerun them to compare")
    higher = results["qw_kappa"] > results["qw_kappa_fixed_cuts"]
    table = (
        results.assign(higher=higher)
        .groupby(["protocol", "method", "fraction"])
        .agg(
            qwk_avg=("qw_kappa", "mean"),
            qwk_avg_fixed_cuts=("qw_kappa_fixed_cuts", "mean"),
            runs_higher=("higher", "sum"),
            runs=("qw_kappa", "size"),
        )
        .reset_index()
    )
    table.insert(2, "difference", table["qwk_avg"] - table["qwk_avg_fixed_cuts"])
    table.insert(2, "train_split", (table.pop("fraction") * 100).round(2))
    return table[["protocol", "method", "train_split", "qwk_avg", "qwk_avg_fixed_cuts", "difference", "runs_higher", "runs"]]


def markdown_table(table: pd.DataFrame) -> str:
    """The summary table as GitHub Markdown, three decimals (no ``tabulate`` needed)."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"

    def cell(value):
        if isinstance(value, (float, np.floating)):
            if np.isnan(value):
                return ""
            return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.3f}"
        return str(value)

    lines = [header, rule] + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(results: pd.DataFrame, table: pd.DataFrame, paths) -> None:
    """Write ``results.csv``, ``table.csv`` and ``table.md`` of a run folder (:class:`drnb.runs.RunPaths`)."""
    from drnb.files import write_text_atomically

    write_text_atomically(paths.results, results.to_csv(index=False))
    write_text_atomically(paths.table_csv, table.to_csv(index=False))
    write_text_atomically(paths.table_md, markdown_table(table))


def pooled_predictions(finetune_root: str | os.PathLike, protocol: str, method: str, fraction: float) -> pd.DataFrame:
    """Every repetition's test predictions for one protocol, method and fraction, with a
    ``repetition`` column.

    The repetitions' test folds partition the dataset, so the pool holds each image once.
    """
    frames = []
    for path in sorted(Path(finetune_root).glob(f"{protocol}/{method}/fraction_{fraction:g}/repetition_*/predictions.csv")):
        frame = pd.read_csv(path)
        frame["repetition"] = int(path.parent.name.split("_")[-1])
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no predictions for {method} ({protocol}) at fraction {fraction:g} under {finetune_root}")
    return pd.concat(frames, ignore_index=True)


def compare_methods(
    finetune_root: str | os.PathLike,
    results: pd.DataFrame,
    method: str = "rotation",
    baseline: str = "scratch",
    *,
    protocol: str = "finetune",
    n_resamples: int = 1000,
    seed: int = 0,
    target: str | None = None,
) -> pd.DataFrame:
    """Did ``method`` beat ``baseline`` under ``protocol``? Per fraction, paired across
    repetitions and images.

    For each fraction: the mean kappa difference over repetitions (each repetition pairs the
    two methods on the same split), how many repetitions ``method`` won, and a paired,
    seeded bootstrap 95 % CI of the kappa difference over the pooled test predictions
    (``scipy.stats.bootstrap``, resampling images, both methods on the same resample). The
    verdict is "better"/"worse" when the CI excludes 0, else "no clear difference".
    The same for referable DR's AUC: ``auc_mean_difference`` over repetitions,
    ``auc_pooled_difference`` with ``auc_ci_low``, ``auc_ci_high`` on the same resamples
    (NaN where the pooled photographs, or a resample, hold one class only), ``auc_verdict``.
    ``target``: the profile's, for predictions written before their ``score`` column.
    """
    rows = []
    results = results[results["protocol"] == protocol]
    for fraction in sorted(set(results["fraction"])):
        per_method = {
            name: results[(results["method"] == name) & (results["fraction"] == fraction)].set_index("repetition")["qw_kappa"]
            for name in (method, baseline)
        }
        paired = per_method[method].to_frame("a").join(per_method[baseline].to_frame("b"), how="inner")
        if paired.empty:
            continue
        ours, theirs = (
            frame.assign(score=prediction_scores(frame, target))
            for frame in (pooled_predictions(finetune_root, protocol, name, fraction) for name in (method, baseline))
        )
        merged = ours.merge(theirs, on=["image_id", "repetition"], suffixes=("_a", "_b"))
        data = (merged["grade_a"].to_numpy(), merged["predicted_a"].to_numpy(), merged["predicted_b"].to_numpy())
        difference = quadratic_weighted_kappa(data[0], data[1]) - quadratic_weighted_kappa(data[0], data[2])
        low, high = bootstrap_kappa_difference_ci(*data, n_resamples=n_resamples, seed=seed)
        verdict = _verdict(low, high)
        auc = _auc_difference(merged, n_resamples, seed)
        per_run_auc = {
            name: results[(results["method"] == name) & (results["fraction"] == fraction)].set_index("repetition")["referable_auc"]
            for name in (method, baseline)
        } if "referable_auc" in results else None
        rows.append(
            {
                "protocol": protocol,
                "method": method,
                "baseline": baseline,
                "train_split": round(fraction * 100, 2),
                "repetitions": len(paired),
                "method_qwk_avg": paired["a"].mean(),
                "baseline_qwk_avg": paired["b"].mean(),
                "mean_difference": (paired["a"] - paired["b"]).mean(),
                "repetitions_won": int((paired["a"] > paired["b"]).sum()),
                "pooled_difference": difference,
                "ci_low": low,
                "ci_high": high,
                "verdict": _say(method, verdict),
                "auc_mean_difference": (per_run_auc[method] - per_run_auc[baseline]).mean() if per_run_auc else np.nan,
                **auc,
                "auc_verdict": _say(method, _verdict(auc["auc_ci_low"], auc["auc_ci_high"])),
            }
        )
    return pd.DataFrame(rows)


def _verdict(low: float, high: float) -> str:
    """"better" / "worse" when the interval excludes 0; else "no clear difference" (also when undefined)."""
    return "better" if low > 0 else "worse" if high < 0 else "no clear difference"


def _say(method: str, verdict: str) -> str:
    return f"{method} {verdict}" if verdict != "no clear difference" else verdict


def _auc_difference(merged: pd.DataFrame, n_resamples: int, seed: int) -> dict:
    """Referable-DR AUC of the first grader (``score_a``) minus the second's (``score_b``) on the
    paired photographs ``merged``, with its paired bootstrap interval:
    ``auc_pooled_difference, auc_ci_low, auc_ci_high`` (NaN when undefined)."""
    grades, first, second = (merged[c].to_numpy() for c in ("grade_a", "score_a", "score_b"))
    difference = referable_auc(grades, first) - referable_auc(grades, second)
    if np.isnan(difference):
        return {"auc_pooled_difference": np.nan, "auc_ci_low": np.nan, "auc_ci_high": np.nan}
    low, high = bootstrap_auc_difference_ci(grades, first, second, n_resamples=n_resamples, seed=seed)
    return {"auc_pooled_difference": difference, "auc_ci_low": low, "auc_ci_high": high}
