"""Figures for the notebooks: data, pretext, the kappa- and AUC-vs-fraction comparisons,
referable-DR ROC curves, Grad-CAM.

Each function draws on a new or given matplotlib ``Axes``/``Figure`` and returns it; saving
is the caller's choice (``fig.savefig``). Nothing here trains or reads run folders.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from drnb.datasets import GRADE_NAMES
from drnb.results import PAPER_KAPPA
from drnb.targets import TARGETS

METHOD_COLOURS = {"rotation": "tab:blue", "contrastive": "tab:purple", "scratch": "tab:orange", "imagenet": "tab:green"}
PROTOCOL_LINES = {"finetune": "-", "linear": "--"}


def plot_grade_counts(counts: pd.Series, title: str = "", ax=None):
    """Bar chart of images per grade; ``counts`` indexed by grade 0-4."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    bars = ax.bar([f"{g}\n{GRADE_NAMES[g]}" for g in counts.index], counts.to_numpy(), color="tab:red")
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.set_title(title or "images per grade")
    return ax


def image_grid(images: np.ndarray, titles: list[str] | None = None, columns: int = 5, size: float = 2.0):
    """Show uint8 (N, H, W, 3) images in a grid; returns the Figure."""
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * size), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index])
            if titles:
                ax.set_title(titles[index], fontsize=9)
    fig.tight_layout()
    return fig


def sample_grid(images: np.ndarray, grades: np.ndarray, per_grade: int = 4, seed: int = 0):
    """``per_grade`` random images of each grade, one row per grade; returns the Figure."""
    rng = np.random.default_rng(seed)
    chosen, titles = [], []
    for grade in range(5):
        candidates = np.flatnonzero(grades == grade)
        picks = rng.choice(candidates, size=min(per_grade, len(candidates)), replace=False) if len(candidates) else []
        for slot in range(per_grade):
            if slot < len(picks):
                chosen.append(images[picks[slot]])
            else:
                chosen.append(np.zeros_like(images[0]))
            titles.append(f"grade {grade}" if slot == 0 else "")
    return image_grid(np.stack(chosen), titles, columns=per_grade)


def duplicate_grid(images: np.ndarray, table: pd.DataFrame, pairs: pd.DataFrame, limit: int = 4):
    """The first ``limit`` near-duplicate pairs side by side, two pairs a row.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), row-aligned with ``table`` (``image_id``, ``grade``).
    pairs : pandas.DataFrame
        From :func:`drnb.duplicates.find_duplicates` (``first``, ``second``, ``similarity``).

    Returns
    -------
    matplotlib.figure.Figure or None
        Titled with id, grade and similarity; None when there are no pairs.
    """
    shown = pairs.head(limit)
    if shown.empty:
        return None
    ids, grades = table["image_id"].to_numpy(), table["grade"].to_numpy()
    chosen, titles = [], []
    for first, second, similarity in shown[["first", "second", "similarity"]].itertuples(index=False):
        chosen += [images[first], images[second]]
        titles += [f"{ids[first]} (grade {grades[first]})", f"{ids[second]} (grade {grades[second]}), {similarity:.3f}"]
    return image_grid(np.stack(chosen), titles, columns=4)


def plot_learning_curves(history: pd.DataFrame, metric: str = "heldout_rotation_accuracy"):
    """Loss per epoch and ``metric`` at the epochs it was measured (``pretext_eval_every``) from a
    ``history.csv``; returns the Figure."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(history["epoch"], history["loss"], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    if metric in history:
        scored = history.dropna(subset=[metric])
        right.plot(scored["epoch"], scored[metric], marker="o", color="tab:green")
        right.set(xlabel="epoch", ylabel=metric.replace("_", " "), title=metric.replace("_", " "), ylim=(0, 1.02))
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, labels: list[str], title: str = "", ax=None):
    """Heat map of a confusion matrix (rows true, columns predicted), counts annotated."""
    import seaborn as sns

    ax = ax or plt.subplots(figsize=(4.2, 3.6))[1]
    sns.heatmap(confusion, annot=True, fmt="d", cmap="Blues", xticklabels=labels, yticklabels=labels, cbar=False, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return ax


def plot_kappa_vs_fraction(
    table: pd.DataFrame, *, show_paper: bool = True, floor: float | None = None, title: str = "", ax=None
):
    """Average QWK vs % labelled per protocol and method, min-max bands, and the paper's rotation curve.

    Fine-tuned runs are drawn solid with bands, linear read-outs dashed without; each curve is
    labelled by what its runs are (:func:`drnb.results.describe`).

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`drnb.results.summary_table`.
    floor : float, optional
        A kappa drawn as a dotted horizontal line: what the photographs' format alone scores
        (:func:`drnb.photo_format.format_only_kappa`).
    """
    ax = ax or plt.subplots(figsize=(7.5, 4.8))[1]
    _method_curves(ax, table, "qwk")
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle=":", label=f"photograph format alone ({floor:.2f})")
    if show_paper:
        fractions = sorted(PAPER_KAPPA)
        ax.errorbar(
            [f * 100 for f in fractions],
            [PAPER_KAPPA[f][1] for f in fractions],
            yerr=[[PAPER_KAPPA[f][1] - PAPER_KAPPA[f][0] for f in fractions], [PAPER_KAPPA[f][2] - PAPER_KAPPA[f][1] for f in fractions]],
            color="black", linestyle="-.", marker="s", capsize=3, label="paper, rotation (min-avg-max)",
        )
    _fraction_axis(ax, table, extra_ticks={5, 10, 25, 50, 100} if show_paper else set())
    ax.set(ylabel="quadratic weighted kappa", ylim=(min(0, table["qwk_min"].min() - 0.05), 1))
    ax.set_title(title or "average QWK vs labelled fraction (bands: min-max over repetitions)")
    ax.legend(loc="best")  # low curves (hard data) and high ones (the paper, synthetic) both stay visible
    return ax


def plot_auc_vs_fraction(table: pd.DataFrame, *, title: str = "", ax=None):
    """Average referable-DR AUC vs % labelled per protocol and method, drawn as
    :func:`plot_kappa_vs_fraction` draws kappa (solid with min-max bands: fine-tuned; dashed:
    linear), with chance (0.5) dotted.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`drnb.results.summary_table` (``auc_min``, ``auc_avg``, ``auc_max``; a
        fraction whose runs all lack an AUC, one class only in every test fold, is a gap).
    """
    ax = ax or plt.subplots(figsize=(7.5, 4.8))[1]
    _method_curves(ax, table, "auc")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    _fraction_axis(ax, table)
    low = table["auc_min"].min()
    ax.set(ylabel="referable DR (grade >= 2) ROC AUC", ylim=(min(0.4, low - 0.05) if np.isfinite(low) else 0.4, 1.0))
    ax.set_title(title or "average referable-DR AUC vs labelled fraction (bands: min-max over repetitions)")
    ax.legend(loc="best")
    return ax


def plot_referable_roc(curves: dict, *, operating_points: dict | None = None, title: str = "", ax=None):
    """ROC curves of referable DR (grade >= 2 against 0-1), one per labelled run, with the AUC
    in the legend and, where given, the operating point chosen on training images as a dot.

    Parameters
    ----------
    curves : dict
        Label -> (grades, scores): int (N,) true grades 0..4 and float (N,) continuous scores
        of one run's test photographs (a ``predictions.csv``; :func:`drnb.results.prediction_scores`).
        A run whose photographs hold one class only is listed in the legend as undefined.
    operating_points : dict, optional
        Label -> (sensitivity, specificity), each in [0, 1] or None.
    """
    from sklearn.metrics import roc_curve

    from drnb.metrics import ONE_CLASS_ONLY, referable, referable_auc

    ax = ax or plt.subplots(figsize=(5.2, 5.0))[1]
    for label, (grades, scores) in curves.items():
        auc = referable_auc(grades, scores)
        if np.isnan(auc):
            ax.plot([], [], label=f"{label}: {ONE_CLASS_ONLY}")
            continue
        fpr, tpr, _ = roc_curve(referable(grades), np.asarray(scores, np.float64))
        (line,) = ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
        sensitivity, specificity = (operating_points or {}).get(label, (None, None))
        if sensitivity is not None and specificity is not None and np.isfinite([sensitivity, specificity]).all():
            ax.plot(1 - specificity, sensitivity, "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.axvline(0.1, color="grey", linestyle="--", alpha=0.5, label="90 % specificity")
    ax.set(xlabel="1 - specificity (healthy eyes referred)", ylabel="sensitivity (referable DR caught)", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title or "referable DR: ROC (dots: the operating point set on training images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return ax


def _method_curves(ax, table: pd.DataFrame, prefix: str) -> None:
    """``<prefix>_avg`` against ``train_split`` per protocol and method: one colour per method,
    solid fine-tuned runs with a ``<prefix>_min``-``<prefix>_max`` band, dashed linear read-outs."""
    for (protocol, method), rows in table.groupby(["protocol", "method"], sort=False):
        rows = rows.sort_values("train_split")
        colour = METHOD_COLOURS.get(method)
        ax.plot(
            rows["train_split"], rows[f"{prefix}_avg"], marker="o", color=colour, linestyle=PROTOCOL_LINES.get(protocol, "-"),
            label=rows["runs_are"].iloc[0],
        )
        if protocol == "finetune":
            ax.fill_between(rows["train_split"], rows[f"{prefix}_min"], rows[f"{prefix}_max"], color=colour, alpha=0.15)


def _fraction_axis(ax, table: pd.DataFrame, extra_ticks: set = frozenset()) -> None:
    """The labelled fraction on a log scale, ticked at the table's fractions (and ``extra_ticks``), with a grid."""
    ax.set_xscale("log")
    ticks = sorted(set(table["train_split"]) | set(extra_ticks))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("% of labelled training images")
    ax.grid(alpha=0.3)


def grad_cam(model, images: np.ndarray, target: str = "ordinal", *, views: int = 1, mask: bool = True) -> np.ndarray:
    """Grad-CAM heat maps of the prediction a fine-tuned classifier (encoder -> head) made.

    The score explained is the expected grade for ``ordinal`` (sum of outputs 1-4), the output
    itself for ``regression``, the predicted grade's probability for ``softmax``, averaged over
    ``views``. Each stage whose pooled features the head reads (``feature_stages="all"``: every
    stage; ``"last"``: the last) gives its feature maps weighted by the score's gradient with
    respect to their pooled values, upsampled to the image; the maps of all stages and views
    (each turned back) are summed, and the ReLU keeps what raised the score.
    Why summed with these weights: each stage's map then averages to its pooled features'
    first-order share of the score, so stages of every resolution add up on one scale.

    Parameters
    ----------
    model : keras.Model
        A classifier saved by a fine-tuning run: an encoder of :mod:`drnb.models`, then a head.
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed (zero outside the fundus mask).
    target : {"ordinal", "softmax", "regression"}
    views : {1, 2, 4, 8}
        The symmetries whose outputs the prediction averaged: the profile's ``test_time_turns``.
    mask : bool
        Zero the heat outside each image's retina, :func:`drnb.preprocessing.fundus_mask` (read
        off the image, as preprocessing's own mask also holds black where a disc fell short of
        it): the black surround shows no retina, only a constant the head reads like a bias.

    Returns
    -------
    numpy.ndarray
        float32 (N, S, S) in [0, 1], each map divided by its peak; all zero where nothing raised
        the score.
    """
    import keras

    from drnb.finetune import symmetry_views
    from drnb.preprocessing import fundus_mask

    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {list(TARGETS)}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise ValueError(f"images have shape {images.shape}; expected (N, S, S, 3)")
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 2:
        raise ValueError(f"model {model.name!r} holds {len(nested)} nested models; expected an encoder and a head")
    encoder, head = nested
    pools = _stage_pools(encoder)
    mapper = keras.Model(encoder.input, [pool.input for pool in pools])
    chosen_views = symmetry_views(views)
    heat = np.concatenate([
        _signed_heat(mapper, pools, head, model, images[start : start + 32], target, chosen_views)
        for start in range(0, len(images), 32)
    ])
    heat = np.maximum(heat, 0)
    if mask:
        heat *= np.stack([fundus_mask(image) for image in images])
    peak = heat.reshape(len(heat), -1).max(axis=1).reshape(-1, 1, 1)
    return (heat / np.where(peak > 0, peak, 1)).astype(np.float32)


def _stage_pools(encoder) -> list:
    """The encoder's global pooling layers, in the order the head reads their features:
    ``stage<i>_pool`` by stage, then ``global_pool`` (see :func:`drnb.models.pooled_features`)."""
    import re

    names = [layer.name for layer in encoder.layers]
    if "global_pool" not in names:
        raise ValueError(f"encoder {encoder.name!r} has no layer 'global_pool'; expected an encoder of drnb.models")
    earlier = sorted(
        (name for name in names if re.fullmatch(r"stage\d+_pool", name)), key=lambda name: int(name[5:-5])
    )
    pools = [encoder.get_layer(name) for name in [*earlier, "global_pool"]]
    width = sum(pool.input.shape[-1] for pool in pools)
    if width != encoder.output_shape[-1]:
        raise ValueError(
            f"encoder {encoder.name!r} outputs {encoder.output_shape[-1]} features; its pooling layers give {width}"
        )
    return pools


def _signed_heat(mapper, pools, head, model, images: np.ndarray, target: str, views) -> np.ndarray:
    """Grad-CAM before the ReLU of :func:`grad_cam`, summed over stages and averaged over
    ``views``: float32 (N, S, S), any sign."""
    import tensorflow as tf

    from drnb.pipeline import shown_in_view

    size = images.shape[1]
    batch = tf.cast(images, tf.float32)
    shown = {view: shown_in_view(batch, view) for view in views}  # as drnb.pipeline.labelled_batches shows it
    if target == "softmax":  # the grade predicted from the views' mean, explained in every view
        mean = np.mean([np.asarray(model(shown_batch, training=False), np.float32) for shown_batch in shown.values()], axis=0)
        predicted = tf.one_hot(mean.argmax(axis=1), mean.shape[1])
    heat = np.zeros(images.shape[:3], np.float32)
    for view, view_batch in shown.items():
        # Computed before the tape: each stage is credited with what its own pooled features
        # give the head, not again with what it gives through the later stages.
        maps = [tf.cast(stage, tf.float32) for stage in tf.nest.flatten(mapper(view_batch, training=False))]
        with tf.GradientTape() as tape:
            tape.watch(maps)
            features = [pool(stage) for pool, stage in zip(pools, maps)]
            pooled = tf.concat(features, axis=-1) if len(features) > 1 else features[0]
            outputs = tf.cast(head(pooled, training=False), tf.float32)
            if target == "ordinal":
                score = tf.reduce_sum(outputs[:, 1:], axis=1)
            elif target == "regression":
                score = outputs[:, 0]
            else:
                score = tf.reduce_sum(outputs * predicted, axis=1)
        signed = tf.zeros((len(images), size, size), tf.float32)
        for stage, gradient in zip(maps, tape.gradient(score, maps)):
            # Summed over positions, the gradient is d score / d pooled feature.
            weights = tf.reduce_sum(gradient, axis=[1, 2], keepdims=True)
            signed += tf.image.resize(tf.reduce_sum(weights * stage, axis=-1, keepdims=True), (size, size))[..., 0]
        # Back to the image's orientation: undo the turn, then the mirror.
        signed = np.rot90(signed.numpy(), -(view % 4), axes=(1, 2))
        heat += (np.flip(signed, axis=2) if view >= 4 else signed) / len(views)
    return heat


def overlay_heatmaps(images: np.ndarray, heatmaps: np.ndarray, titles: list[str] | None = None, columns: int = 5):
    """Images with their heat maps on top; returns the Figure."""
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.2), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index])
            ax.imshow(heatmaps[index], cmap="jet", alpha=0.4, vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[index], fontsize=8)
    fig.tight_layout()
    return fig
