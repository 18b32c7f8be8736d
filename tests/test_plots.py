"""Figures drawn from run files, and Grad-CAM maps of what a grader looked at."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import pandas as pd  # noqa: E402

from drnb.plots import plot_learning_curves  # noqa: E402


def test_learning_curves_join_the_epochs_the_accuracy_was_scored_at():
    # pretext_eval_every=2 over 4 epochs: history.csv leaves the accuracy empty at epochs 1 and 3.
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "loss": [1.2, 0.9, 0.7, 0.6], "heldout_rotation_accuracy": [np.nan, 0.5, np.nan, 0.9]}
    )
    figure = plot_learning_curves(history)
    loss_epochs, _ = figure.axes[0].lines[0].get_data()
    accuracy_epochs, accuracy = figure.axes[1].lines[0].get_data()
    assert list(loss_epochs) == [1, 2, 3, 4]
    assert list(accuracy_epochs) == [2, 4] and list(accuracy) == [0.5, 0.9]


def summary_rows():
    """A summary table as drnb.results.summary_table gives it: two methods, two protocols, two fractions."""
    rows = []
    for protocol in ("finetune", "linear"):
        for method, base in (("rotation", 0.8), ("scratch", 0.7)):
            for split in (25.0, 100.0):
                rows.append({"protocol": protocol, "method": method, "runs_are": f"{method}, {protocol}", "train_split": split,
                             "qwk_min": base - 0.1, "qwk_avg": base, "qwk_max": base + 0.05,
                             "auc_min": base + 0.05, "auc_avg": base + 0.1, "auc_max": base + 0.15})
    return pd.DataFrame(rows)


def test_auc_vs_fraction_draws_each_method_as_the_kappa_plot_does():
    from drnb.plots import plot_auc_vs_fraction, plot_kappa_vs_fraction

    table = summary_rows()
    auc_ax = plot_auc_vs_fraction(table)
    kappa_ax = plot_kappa_vs_fraction(table, show_paper=False)
    curves = {line.get_label(): line for line in auc_ax.lines}
    assert set(curves) == set(table["runs_are"]) | {"chance (0.5)"}
    x, y = curves["rotation, finetune"].get_data()
    assert list(x) == [25.0, 100.0] and list(y) == pytest.approx([0.9, 0.9])
    assert curves["rotation, linear"].get_linestyle() == "--" and curves["rotation, finetune"].get_linestyle() == "-"
    assert len(auc_ax.collections) == len(kappa_ax.collections) == 2  # min-max bands for the fine-tuned curves only
    assert [line.get_color() for line in auc_ax.lines[:4]] == [line.get_color() for line in kappa_ax.lines[:4]]
    assert auc_ax.get_xscale() == "log" and "AUC" in auc_ax.get_ylabel()
    table.loc[table["method"] == "scratch", ["auc_min", "auc_avg", "auc_max"]] = np.nan  # one class only everywhere: a gap
    plot_auc_vs_fraction(table)


def test_referable_roc_draws_each_run_with_its_auc_and_operating_point():
    from sklearn.metrics import roc_auc_score

    from drnb.plots import plot_referable_roc

    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 100)
    scores = grades + rng.normal(0, 1, 100)
    ax = plot_referable_roc(
        {"rotation": (grades, scores), "healthy only": (np.zeros(5, int), np.arange(5.0))},
        operating_points={"rotation": (0.7, 0.9)},
    )
    labels = [line.get_label() for line in ax.lines]
    assert f"rotation (AUC {roc_auc_score(grades >= 2, scores):.3f})" in labels
    assert "healthy only: undefined: one class only" in labels
    dot = next(line for line in ax.lines if line.get_marker() == "o")
    assert list(dot.get_xdata()) == pytest.approx([0.1]) and list(dot.get_ydata()) == pytest.approx([0.7])


def preprocessed_fundus(n: int, size: int = 64, grades=(2,), seed: int = 0, clips=(0.0, 0.2)):
    """``n`` synthetic photographs preprocessed as a run does (Ben Graham), with their lesions.

    Returns
    -------
    images : uint8 (n, size, size, 3)
    lesions : bool (n, size, size), the lesion pixels carried through the same crop and resize
    fundus : bool (n, size, size), the mask each image was cut with
    grades : int (n,)
    """
    from drnb.preprocessing import PreprocessConfig, find_fundus, preprocess_image, rotation_invariant_mask
    from drnb.synthetic import make_fundus

    config = PreprocessConfig(size=size, ben_graham=True)
    rng = np.random.default_rng(seed)
    images, lesions, fundus, drawn = [], [], [], []
    for index in range(n):
        grade = grades[index % len(grades)]
        clip = rng.choice(clips)  # drawn apart from the grade, so that no grade has its own frame
        photograph, lesion = make_fundus(grade, size + size // 4, rng, clip=clip, return_lesion_mask=True)
        geometry = find_fundus(photograph)
        images.append(preprocess_image(photograph, config, geometry))
        lesion_image = np.repeat(lesion[..., None], 3, axis=2).astype(np.uint8) * 255
        lesions.append(preprocess_image(lesion_image, PreprocessConfig(size=size), geometry)[..., 0] > 127)
        square = geometry.half_extent / geometry.radius * (1 - config.margin)
        fundus.append(rotation_invariant_mask(size, 1 - config.margin, square))
        drawn.append(grade)
    return np.stack(images), np.stack(lesions), np.stack(fundus), np.array(drawn)


def stage_maps(encoder, images):
    """Each pooled stage's feature maps, float32 (N, h, w, C), in the order the head reads them."""
    import keras

    names = [layer.name for layer in encoder.layers if layer.name.startswith("stage") and layer.name.endswith("_pool")]
    names = sorted(names) + ["global_pool"]
    batch = images.astype(np.float32)
    return [np.asarray(keras.Model(encoder.input, encoder.get_layer(name).input)(batch, training=False)) for name in names]


@pytest.mark.parametrize("feature_stages", ["last", "all"])
def test_grad_cam_of_a_linear_head_adds_every_stage_the_head_reads(feature_stages):
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    import keras
    import tensorflow as tf

    # Seeded: with some random weights an image's map is all zero (the ReLU cuts it all).
    keras.utils.set_random_seed(2)
    encoder = build_encoder("compact", 64, feature_stages=feature_stages)
    head = build_head(encoder.output_shape[-1], 1, hidden=(), activation="linear")
    model = stack(encoder, head)
    images, _, fundus, _ = preprocessed_fundus(2)
    maps = grad_cam(model, images, "regression")
    # A linear head's score is w . pooled features: each stage's maps weighed by the head's
    # weights for them (the gradient with respect to their average), upsampled and added.
    stages = stage_maps(encoder, images)
    assert len(stages) == (4 if feature_stages == "all" else 1)
    weights = np.asarray(head.get_weights()[0])[:, 0]
    assert sum(stage.shape[-1] for stage in stages) == len(weights)
    expected, first = np.zeros((2, 64, 64), np.float32), 0
    for stage in stages:
        stage_weights, first = weights[first : first + stage.shape[-1]], first + stage.shape[-1]
        expected += np.asarray(tf.image.resize((stage * stage_weights).sum(axis=-1)[..., None], (64, 64)))[..., 0]
    expected = np.maximum(expected, 0) * fundus
    assert expected.reshape(2, -1).max(axis=1).min() > 0
    np.testing.assert_allclose(maps, expected / expected.reshape(2, -1).max(axis=1)[:, None, None], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target, outputs, activation", [("ordinal", 5, "sigmoid"), ("softmax", 5, "softmax")])
def test_grad_cam_maps_lie_in_the_fundus_in_zero_to_one(target, outputs, activation):
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    import keras

    keras.utils.set_random_seed(1)
    encoder = build_encoder("compact", 64, feature_stages="all")
    model = stack(encoder, build_head(encoder.output_shape[-1], outputs, hidden=(8,), activation=activation))
    images, _, fundus, _ = preprocessed_fundus(3, clips=(0.3,))
    maps = grad_cam(model, images, target)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not maps[~fundus].any()
    assert maps.reshape(3, -1).std(axis=1).min() > 0
    # The mask only cuts: the maps are the unmasked ones cut to the fundus, divided by their peak.
    cut = grad_cam(model, images, target, mask=False) * fundus
    np.testing.assert_allclose(maps, cut / cut.reshape(3, -1).max(axis=1)[:, None, None], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="target"):
        grad_cam(model, images, "grades")


@pytest.mark.parametrize("views", [4, 8])
def test_grad_cam_over_test_time_views_turns_with_the_image(views):
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    import keras

    keras.utils.set_random_seed(1)
    encoder = build_encoder("compact", 64, feature_stages="all")
    model = stack(encoder, build_head(encoder.output_shape[-1], 1, hidden=(8,), activation="linear"))
    images, _, _, _ = preprocessed_fundus(2)
    maps = grad_cam(model, images, "regression", views=views)
    # The prediction averages the views, and so does its explanation: each view's map is
    # turned back, so a turned (or mirrored) image has the turned map.
    np.testing.assert_allclose(grad_cam(model, np.rot90(images, 1, axes=(1, 2)), "regression", views=views),
                               np.rot90(maps, 1, axes=(1, 2)), atol=1e-4)
    if views == 8:
        np.testing.assert_allclose(grad_cam(model, images[:, :, ::-1], "regression", views=views), maps[:, :, ::-1], atol=1e-4)
    assert np.abs(maps - grad_cam(model, images, "regression")).max() > 0.05


def heat_near_lesions(maps, lesions, fundus, reach: int = 2):
    """Per image, the chance that a fundus pixel within ``reach`` pixels of a lesion is hotter
    than one farther away (ROC AUC, float (N,)), and the share of all heat inside the fundus."""
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    ranks = []
    for heat, lesion, disc in zip(maps, lesions, fundus):
        near = ndimage.binary_dilation(lesion, iterations=reach)
        ranks.append(roc_auc_score(near[disc], heat[disc]))
    return np.array(ranks), float((maps * fundus).sum() / maps.sum())


@pytest.mark.slow
def test_grad_cam_of_a_model_trained_on_lesions_looks_at_the_lesions():
    from drnb.models import build_encoder, build_head, stack
    from drnb.plots import grad_cam

    import keras

    # Grades 0 and 2 of the synthetic eyes differ only by their lesions (the anatomy is drawn
    # the same way), so a model that tells them apart has to find the lesions. The quick
    # profile's model and prediction: a linear regression head on every stage's pooled
    # features, outputs averaged over the 8 symmetries.
    train_images, _, _, train_grades = preprocessed_fundus(300, grades=(0, 2), seed=0)
    images, lesions, fundus, _ = preprocessed_fundus(40, grades=(2,), seed=1)
    keras.utils.set_random_seed(0)
    encoder = build_encoder("compact", 64, feature_stages="all")
    model = stack(encoder, build_head(encoder.output_shape[-1], 1, hidden=(), activation="linear"))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(train_images.astype(np.float32), train_grades.astype(np.float32), batch_size=32, epochs=8, verbose=0)
    # It grades them: grade 2 well above grade 0, on photographs it has not seen (about 1.4 apart).
    healthy, _, _, _ = preprocessed_fundus(40, grades=(0,), seed=1)
    gap = np.asarray(model(images.astype(np.float32), training=False)).mean() - np.asarray(model(healthy.astype(np.float32), training=False)).mean()
    assert gap > 1.0, gap

    ranks, inside = heat_near_lesions(grad_cam(model, images, "regression", views=8), lesions, fundus)
    assert inside == 1.0
    # AUC rather than mean heat: the last stage's 2 x 2 maps add heat over the whole disc,
    # which leaves the order of the pixels as it is. The old map (last stage, unmasked, one
    # view) ranked the pixels near lesions no higher than the others (median AUC 0.53). With the
    # light falling from any side, some photographs put heat on their bright side too: about
    # three in four rank the lesions' pixels first (.78 measured; .9 when the top was always lit).
    assert np.median(ranks) > 0.6 and (ranks > 0.5).mean() >= 0.7
