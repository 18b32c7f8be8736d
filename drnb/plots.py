"""Figures for the notebooks: data, pretext, the kappa-vs-fraction comparison, Grad-CAM.

Each function draws on a new or given matplotlib ``Axes``/``Figure`` and returns it; saving
is the caller's choice (``fig.savefig``). Nothing here trains or reads run folders.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from drnb.datasets import GRADE_NAMES
from drnb.results import PAPER_KAPPA

METHOD_COLOURS = {"rotation": "tab:blue", "scratch": "tab:orange", "imagenet": "tab:green"}
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
    for (protocol, method), rows in table.groupby(["protocol", "method"], sort=False):
        rows = rows.sort_values("train_split")
        colour = METHOD_COLOURS.get(method)
        ax.plot(
            rows["train_split"], rows["qwk_avg"], marker="o", color=colour, linestyle=PROTOCOL_LINES.get(protocol, "-"),
            label=rows["runs_are"].iloc[0],
        )
        if protocol == "finetune":
            ax.fill_between(rows["train_split"], rows["qwk_min"], rows["qwk_max"], color=colour, alpha=0.15)
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
    ax.set_xscale("log")
    ticks = sorted(set(table["train_split"]) | ({5, 10, 25, 50, 100} if show_paper else set()))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set(xlabel="% of labelled training images", ylabel="quadratic weighted kappa", ylim=(min(0, table["qwk_min"].min() - 0.05), 1))
    ax.set_title(title or "average QWK vs labelled fraction (bands: min-max over repetitions)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")  # low curves (hard data) and high ones (the paper, synthetic) both stay visible
    return ax


def grad_cam(model, images: np.ndarray, target: str = "ordinal") -> np.ndarray:
    """Grad-CAM heat maps of a fine-tuned classifier (encoder -> head).

    The score explained is the expected grade for ``ordinal`` (sum of outputs 1-4), the
    output itself for ``regression``, and the predicted grade's probability for
    ``softmax``; the maps are taken at the input of the
    encoder's global pooling of its last stage.

    Parameters
    ----------
    model : keras.Model
        A classifier saved by a fine-tuning run (layers ``encoder``-like then head).
    images : numpy.ndarray
        uint8 (N, S, S, 3).

    Returns
    -------
    numpy.ndarray
        float32 (N, S, S) in [0, 1].
    """
    import keras
    import tensorflow as tf

    encoder, head = model.layers[1], model.layers[2]
    feature_maps = encoder.get_layer("global_pool").input
    mapper = keras.Model(encoder.inputs, [feature_maps, encoder.output])
    batch = tf.cast(images, tf.float32)
    with tf.GradientTape() as tape:
        maps, features = mapper(batch, training=False)
        tape.watch(maps)
        # Pool again from the watched maps (the same op as the encoder's) so gradients reach
        # them; with feature_stages="all" the earlier stages' pooled features come first and
        # are held as they are.
        average = isinstance(encoder.get_layer("global_pool"), keras.layers.GlobalAveragePooling2D)
        pooled = tf.reduce_mean(maps, axis=[1, 2]) if average else tf.reduce_max(maps, axis=[1, 2])
        earlier = features[:, : features.shape[-1] - maps.shape[-1]]
        probabilities = head(tf.concat([earlier, pooled], axis=-1), training=False)
        if target == "ordinal":
            score = tf.reduce_sum(probabilities[:, 1:], axis=1)
        elif target == "regression":
            score = probabilities[:, 0]
        else:
            score = tf.reduce_max(probabilities, axis=1)
    gradients = tape.gradient(score, maps)
    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., None]
    cams = tf.image.resize(cams, images.shape[1:3])[..., 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return (cams / np.where(peak > 0, peak, 1)).astype(np.float32)


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
