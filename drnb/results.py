"""Collect per-run metrics into the paper's table and compare methods.

Every fine-tuning run leaves a ``metrics.json`` (see :mod:`drnb.finetune`); this module reads
them all, never a shared file that runs append to, so a crashed run cannot corrupt the
results of the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from drnb.metrics import bootstrap_kappa_difference_ci, quadratic_weighted_kappa

# What each (protocol, method) pair's runs are, in words: the linear read-out of a scratch
# encoder is an untrained network, not the study's scratch-trained baseline.
DESCRIPTIONS = {
    ("finetune", "rotation"): "rotation pretext, fine-tuned",
    ("finetune", "scratch"): "trained from scratch",
    ("finetune", "imagenet"): "ImageNet weights, fine-tuned",
    ("linear", "rotation"): "rotation pretext, linear head",
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
RESULT_COLUMNS = ("protocol", "method", "fraction", "repetition", "qw_kappa", "accuracy", "kappa_ci_low", "kappa_ci_high", "n_train", "n_test", "seconds")


def describe(protocol: str, method: str) -> str:
    """What a (protocol, method) pair's runs are, in words (e.g. "random weights, linear head")."""
    return DESCRIPTIONS.get((protocol, method), f"{method}, {protocol}")


def collect_results(finetune_root: str | os.PathLike) -> pd.DataFrame:
    """One row per finished run under ``finetune_root``
    (``<protocol>/<method>/fraction_<f>/repetition_<r>/metrics.json``).

    Returns
    -------
    pandas.DataFrame
        :data:`RESULT_COLUMNS` first, then every other metric; sorted by protocol, method,
        fraction, repetition.
    """
    paths = sorted(Path(finetune_root).glob("*/*/fraction_*/repetition_*/metrics.json"))
    rows = [_read_metrics(path) for path in paths]
    if not rows:
        raise FileNotFoundError(f"no finished runs (metrics.json) under {finetune_root}; run notebook 03 first")
    results = pd.DataFrame(rows)
    ordered = list(RESULT_COLUMNS) + [c for c in results.columns if c not in RESULT_COLUMNS]
    return results[ordered].sort_values(["protocol", "method", "fraction", "repetition"]).reset_index(drop=True)


def _read_metrics(path: Path) -> dict:
    """One run's metrics; a damaged file is named, with how to redo its run."""
    from drnb.files import read_json

    try:
        return read_json(path)
    except ValueError as error:
        raise ValueError(f"{error}; rerun notebook 03 (or drnb reproduce) to redo this run") from None


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's table: per protocol, method and fraction, QWK min / avg / max over
    repetitions, beside the paper's (rotation, fine-tuned).

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol, method, runs_are (in words), train_split (%), runs, qwk_min,
        qwk_avg, qwk_max, accuracy_avg, paper_qwk_min, paper_qwk_avg, paper_qwk_max,
        qwk_avg_minus_paper``.
    """
    grouped = results.groupby(["protocol", "method", "fraction"])
    table = grouped.agg(
        runs=("qw_kappa", "size"),
        qwk_min=("qw_kappa", "min"),
        qwk_avg=("qw_kappa", "mean"),
        qwk_max=("qw_kappa", "max"),
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
) -> pd.DataFrame:
    """Did ``method`` beat ``baseline`` under ``protocol``? Per fraction, paired across
    repetitions and images.

    For each fraction: the mean kappa difference over repetitions (each repetition pairs the
    two methods on the same split), how many repetitions ``method`` won, and a paired,
    seeded bootstrap 95 % CI of the kappa difference over the pooled test predictions
    (``scipy.stats.bootstrap``, resampling images, both methods on the same resample). The
    verdict is "better"/"worse" when the CI excludes 0, else "no clear difference".
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
        ours = pooled_predictions(finetune_root, protocol, method, fraction)
        theirs = pooled_predictions(finetune_root, protocol, baseline, fraction)
        merged = ours.merge(theirs, on=["image_id", "repetition"], suffixes=("_a", "_b"))
        data = (merged["grade_a"].to_numpy(), merged["predicted_a"].to_numpy(), merged["predicted_b"].to_numpy())
        difference = quadratic_weighted_kappa(data[0], data[1]) - quadratic_weighted_kappa(data[0], data[2])
        low, high = bootstrap_kappa_difference_ci(*data, n_resamples=n_resamples, seed=seed)
        verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
        rows.append(
            {
                "protocol": protocol,
                "train_split": round(fraction * 100, 2),
                "repetitions": len(paired),
                f"{method}_qwk_avg": paired["a"].mean(),
                f"{baseline}_qwk_avg": paired["b"].mean(),
                "mean_difference": (paired["a"] - paired["b"]).mean(),
                "repetitions_won": int((paired["a"] > paired["b"]).sum()),
                "pooled_difference": difference,
                "ci_low": low,
                "ci_high": high,
                "verdict": f"{method} {verdict}" if verdict != "no clear difference" else verdict,
            }
        )
    return pd.DataFrame(rows)
