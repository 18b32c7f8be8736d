"""Encoders and heads.

Every encoder takes uint8-range images, float32 (B, S, S, 3) in [0, 255], scales them itself,
and ends in the same global average pooling for the pretext and for fine-tuning (the reference
code pre-trains with max and fine-tunes with average pooling, so the fine-tuned head met
features it was never trained on).

What is pooled is ``feature_stages``: the last stage's feature maps (``"last"``, as the study
did), or every stage's maps, each pooled and concatenated (``"all"``). A network trained to
tell rotations apart specialises its last stage to that task, while its middle stages keep
more general features (Gidaris et al. 2018 found RotNet's middle blocks the best for other
tasks); in a fundus photograph those middle stages see the texture of lesions, where the last
one sees the layout of the disc and vessels.

- ``densenet121``: ``keras.applications.DenseNet121(include_top=False)``, the study's encoder,
  random or ImageNet weights.
- ``compact``: a small DenseNet-style network designed for 2 CPU cores at 64-128 px: a strided
  stem, then four stages of densely connected 3x3 convolutions (each layer sees every earlier
  feature map of its stage, as in DenseNet), separated by 1x1 transition convolutions and
  average pooling. Width grows with depth so every stage costs about the same, and the
  network is shallow enough that its first ``fit`` traces in seconds, not minutes.
"""

from __future__ import annotations

import keras
from keras import layers

from drnb.targets import TARGET_ACTIVATIONS, output_width

ENCODERS = ("densenet121", "compact")
FEATURE_STAGES = ("last", "all")
HEAD_ACTIVATIONS = ("softmax", "sigmoid", "linear")
PRECISION_MODES = ("auto", "on", "off")
# Dropout after each hidden layer of a head, as in the reference code's heads.
HEAD_DROPOUT = 0.5
# Outputs of the contrastive pretext's projection head (SimCLR's width).
PROJECTION_WIDTH = 128

# The compact encoder is trained for hundreds, not tens of thousands, of steps: batch-norm
# moving statistics that forget faster (Keras's default is 0.99) are usable after a few dozen.
BN_MOMENTUM = 0.9
# ImageNet statistics, as keras.applications.densenet.preprocess_input ("torch" mode) uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scale_inputs(inputs):
    scaled = layers.Rescaling(1 / 255.0, name="scale_0_1")(inputs)
    return layers.Normalization(
        mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_normalization"
    )(scaled)


def compact_densenet(
    image_size: int,
    *,
    stem_filters: int = 32,
    growth_rates: tuple[int, ...] = (16, 32, 48, 64),
    layers_per_stage: int = 3,
    feature_stages: str = "last",
    name: str = "compact",
) -> keras.Model:
    """Build the compact DenseNet-style encoder.

    Parameters
    ----------
    image_size : int
        Side of the square input in pixels (64-256 sensible).
    stem_filters : int
        Filters of the strided stem convolution.
    growth_rates : tuple of int
        Filters each densely connected layer adds, per stage; one stage per entry.
    layers_per_stage : int
        Densely connected 3x3 layers per stage.
    feature_stages : {"last", "all"}
        Pool the last stage's maps, or every stage's (before its transition), concatenated.

    Returns
    -------
    keras.Model
        (B, image_size, image_size, 3) in [0, 255] -> (B, features) float; features is the
        last stage's channel count (298 with the default widths), or the sum over stages
        (80 + 136 + 212 + 298 = 726).
    """
    smallest = 4 * 2 ** (len(growth_rates) - 1)  # stem and pool halve twice, each transition once
    if image_size < smallest:
        raise ValueError(f"image_size={image_size}: the compact encoder with {len(growth_rates)} stages needs >= {smallest} px")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = _scale_inputs(inputs)
    x = layers.Conv2D(stem_filters, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    # As DenseNet121's stem: a further halving before the dense stages, where most of the
    # compute would otherwise go at full resolution.
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    stage_maps = []
    for stage, growth in enumerate(growth_rates):
        for index in range(layers_per_stage):
            prefix = f"stage{stage}_layer{index}"
            y = layers.Conv2D(growth, 3, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
            y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_bn")(y)
            y = layers.ReLU(name=f"{prefix}_relu")(y)
            x = layers.Concatenate(name=f"{prefix}_concat")([x, y])
        stage_maps.append(x)
        if stage < len(growth_rates) - 1:
            # Transition: compress the concatenated maps by half and halve the resolution.
            x = layers.Conv2D(x.shape[-1] // 2, 1, use_bias=False, name=f"transition{stage}_conv")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"transition{stage}_bn")(x)
            x = layers.ReLU(name=f"transition{stage}_relu")(x)
            x = layers.AveragePooling2D(2, name=f"transition{stage}_pool")(x)
    return keras.Model(inputs, pooled_features(stage_maps, feature_stages), name=name)


def pooled_features(stage_maps: list, feature_stages: str):
    """The encoder's output from its stages' feature maps, shallowest first.

    The last stage's pooling layer is always named ``global_pool``; with ``"all"`` the earlier
    stages' are ``stage<i>_pool``, and the last one comes last in the concatenation
    ``pooled_stages`` (:func:`drnb.plots.grad_cam` explains the maps at every pooling's input).

    Returns
    -------
    KerasTensor
        (B, C_last) for ``"last"``, (B, sum of C) for ``"all"``.
    """
    if feature_stages not in FEATURE_STAGES:
        raise ValueError(f"feature_stages={feature_stages!r}: expected one of {FEATURE_STAGES}")
    last = layers.GlobalAveragePooling2D(name="global_pool")(stage_maps[-1])
    if feature_stages == "last" or len(stage_maps) == 1:
        return last
    earlier = [layers.GlobalAveragePooling2D(name=f"stage{index}_pool")(maps) for index, maps in enumerate(stage_maps[:-1])]
    return layers.Concatenate(name="pooled_stages")([*earlier, last])


# DenseNet121's dense blocks 1-3, batch-normalised and activated at the start of the
# transition after each (block 4 ends in the backbone's output, activated the same way).
DENSENET121_BLOCK_ENDS = ("pool2_relu", "pool3_relu", "pool4_relu")


def build_encoder(
    name: str, image_size: int, *, feature_stages: str = "last", weights: str | None = None
) -> keras.Model:
    """Build an encoder by name.

    Parameters
    ----------
    name : {"densenet121", "compact"}
    image_size : int
        Input side in pixels.
    feature_stages : {"last", "all"}
        Pool the last stage, or every stage (DenseNet121: its four dense blocks, 256 + 512 +
        1024 + 1024 features).
    weights : None or "imagenet"
        ``"imagenet"`` only for ``densenet121``; needs the weights file in Keras's cache or a
        connection to download it, and raises a ``RuntimeError`` saying so otherwise.

    Returns
    -------
    keras.Model
        (B, image_size, image_size, 3) in [0, 255] -> (B, features).
    """
    if name not in ENCODERS:
        raise ValueError(f"encoder={name!r}: expected one of {ENCODERS}")
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights={weights!r}: expected None or 'imagenet'")
    if name == "compact":
        if weights is not None:
            raise ValueError("encoder='compact' has no pretrained weights; use weights=None")
        return compact_densenet(image_size, feature_stages=feature_stages)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    try:
        backbone = keras.applications.DenseNet121(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling=None
        )
    except Exception as error:  # urllib/OSError/HTTPError: the download of the weights failed
        raise RuntimeError(
            f"could not load DenseNet121 ImageNet weights ({type(error).__name__}: {error}). Offline, place "
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/ or use weights=None."
        ) from error
    if feature_stages == "all":  # the same weights, answering with every block's maps
        backbone = keras.Model(
            backbone.inputs, [*(backbone.get_layer(end).output for end in DENSENET121_BLOCK_ENDS), backbone.output],
            name="densenet121_blocks",
        )
    stage_maps = backbone(_scale_inputs(inputs))
    stage_maps = stage_maps if isinstance(stage_maps, (list, tuple)) else [stage_maps]
    return keras.Model(inputs, pooled_features(list(stage_maps), feature_stages), name="densenet121")


def profile_encoder(profile, *, weights: str | None = None) -> keras.Model:
    """The profile's encoder (``encoder``, ``image_size``, ``feature_stages``), fresh.

    Returns
    -------
    keras.Model
        (B, image_size, image_size, 3) in [0, 255] -> (B, features).
    """
    return build_encoder(
        profile.encoder, profile.image_size, feature_stages=profile.feature_stages, weights=weights
    )


def imagenet_weights_available() -> bool:
    """True when DenseNet121's ImageNet weights are in Keras's local cache (no download attempted)."""
    from pathlib import Path

    cache = Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras").expanduser()
    return (cache / "models" / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5").exists()


def build_head(
    feature_dim: int,
    outputs: int,
    *,
    hidden: tuple[int, ...] = (1024,),
    dropout: float = HEAD_DROPOUT,
    activation: str = "softmax",
    name: str = "head",
) -> keras.Model:
    """Dense -> BatchNorm -> ReLU -> Dropout blocks, then the output layer (kept in float32).

    The reference heads: pretext ``hidden=(2048, 1024)``, fine-tuning "simple multiclass"
    ``hidden=(1024,)``, both ``dropout=0.5``. ``hidden=()`` is a linear head.

    Returns
    -------
    keras.Model
        (B, feature_dim) -> (B, outputs), float32: probabilities in [0, 1] for ``"softmax"``
        and ``"sigmoid"``, any real number for ``"linear"``.
    """
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {HEAD_ACTIVATIONS}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}: expected a rate in [0, 1)")
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for index, units in enumerate(hidden):
        x = layers.Dense(units, name=f"{name}_dense{index}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.ReLU(name=f"{name}_relu{index}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"{name}_dropout{index}")(x)
    # Float32 outputs keep the loss numerically safe under a mixed-precision policy.
    outputs_ = layers.Dense(outputs, activation=activation, dtype="float32", name=f"{name}_output")(x)
    return keras.Model(inputs, outputs_, name=name)


def rotation_head(feature_dim: int, profile) -> keras.Model:
    """The profile's pretext head: ``pretext_hidden`` layers, 4 rotations, softmax.

    Returns
    -------
    keras.Model
        (B, feature_dim) -> (B, 4) probabilities, float32.
    """
    return build_head(feature_dim, 4, hidden=profile.pretext_hidden, name="rotation_head")


def projection_head(feature_dim: int, profile) -> keras.Model:
    """The contrastive pretext's head: ``pretext_hidden`` layers without dropout, then
    :data:`PROJECTION_WIDTH` linear outputs, compared by cosine (:func:`drnb.training.nt_xent`).

    Returns
    -------
    keras.Model
        (B, feature_dim) -> (B, PROJECTION_WIDTH), float32.
    """
    return build_head(feature_dim, PROJECTION_WIDTH, hidden=profile.pretext_hidden, dropout=0.0, activation="linear",
                      name="projection_head")


def grade_head(feature_dim: int, profile) -> keras.Model:
    """The profile's fine-tuning head: ``finetune_hidden`` layers, then 5
    sigmoid outputs for the ``ordinal`` target (cumulative code), 5 softmax outputs for
    ``softmax``, one linear output for ``regression``.

    Returns
    -------
    keras.Model
        (B, feature_dim) -> (B, 5) probabilities or (B, 1) grade scores, float32.
    """
    return build_head(
        feature_dim, output_width(profile.target), hidden=profile.finetune_hidden,
        activation=TARGET_ACTIVATIONS[profile.target], name="grade_head",
    )


def encoder_blocks(encoder: keras.Model):
    """The encoder as a reader sees it: one row per block (stem, stages, transitions, the pooled
    features last) with its layer count, output shape and weights.

    Returns
    -------
    pandas.DataFrame
        Indexed by block name; columns ``layers``, ``output`` (shape without the batch) and
        ``weights``, in the order the image passes through them.
    """
    import pandas as pd

    rows = [
        ("pooling" if len(layer.output.shape) == 2 else layer.name.split("_")[0], tuple(layer.output.shape[1:]), layer.count_params())
        for layer in encoder.layers
    ]
    rows.sort(key=lambda row: row[0] == "pooling")  # the pooled features last, whichever stages they come from
    table = pd.DataFrame(rows, columns=["block", "output", "weights"])
    return table.groupby("block", sort=False).agg(layers=("output", "size"), output=("output", "last"), weights=("weights", "sum"))


def leaf_layers(model: keras.Model) -> list:
    """Every layer of ``model`` that is not itself a model, nested models searched, in order."""
    leaves = []
    for layer in model.layers:
        leaves.extend(leaf_layers(layer) if getattr(layer, "layers", None) else [layer])
    return leaves


def recalibrate_batchnorm(model: keras.Model, batches) -> int:
    """Set every batch-norm layer's moving statistics to its batch statistics averaged over ``batches``.

    A network normalises with the statistics of each batch while it trains and with its moving
    averages when it predicts. Where those disagree, the features a head was fitted on are
    not the ones it meets: a fresh encoder's moving averages are still their initial 0 and 1. One
    training-mode pass per batch, with the momentum of batch ``i`` (1-based) set to
    ``(i - 1) / i``, leaves each moving mean and variance equal to the mean of the batches'
    statistics ("precise batch norm"; Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021).
    No weight is trained, and every layer's momentum is restored afterwards.

    Parameters
    ----------
    model : keras.Model
        Nested models are searched.
    batches : iterable
        Batches of the model's input, e.g. float32 (B, S, S, 3) images.

    Returns
    -------
    int
        The number of batches used (0 when ``model`` has no batch-norm layer).
    """
    norms = [layer for layer in leaf_layers(model) if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    count = 0
    try:
        for inputs in batches:
            count += 1
            for norm in norms:
                norm.momentum = (count - 1) / count
            model(inputs, training=True)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return count


def precision_policy(mode: str, *, accelerator: bool) -> str:
    """Keras's dtype policy for a profile's ``mixed_precision``: ``"mixed_float16"`` for
    ``"on"``, and for ``"auto"`` when an accelerator is present; ``"float32"`` otherwise."""
    if mode not in PRECISION_MODES:
        raise ValueError(f"mixed_precision={mode!r}: expected one of {list(PRECISION_MODES)}")
    return "mixed_float16" if mode == "on" or (mode == "auto" and accelerator) else "float32"


def stack(encoder: keras.Model, head: keras.Model, name: str = "classifier") -> keras.Model:
    """Encoder followed by head, as one model that saves and loads as a whole."""
    inputs = keras.Input(encoder.input_shape[1:], name="image")
    return keras.Model(inputs, head(encoder(inputs)), name=name)
