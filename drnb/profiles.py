"""Run profiles: the one source of truth for every setting of a reproduction.

A :class:`Profile` holds everything a run needs, from the dataset to the fine-tuning
schedule. Four are defined:

``smoke``
    seconds on a CPU; for tests and for checking an installation. Numbers mean nothing.
``demo``
    ``quick``'s recipe, lighter, on the synthetic photographs at 48 px: the default run, in
    minutes on any 2-core machine.
``quick``
    the CPU profile: the whole study on 2 cores within an hour on ~3,600 photographs, both
    protocols (fine-tuned and linear) for both methods (see ``docs/decisions.md``).
``paper``
    the study's configuration: DenseNet121 at 224 px, pretext lr 1e-5, batch 32, 200
    epochs; fine-tuning lr 5e-5, batch 32, 3 warm-up + 17 epochs, 5 repetitions, fractions
    5/10/25/50/100 %, ordinal head. For GPUs.

Any field can be overridden by name (``--set pretext_epochs=5`` on the command line,
``overrides={"pretext_epochs": "5"}`` in Python); an unknown name is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from drnb.archive import normalise_entries, parse_source
from drnb.checks import check_integer
from drnb.datasets import DATASETS
from drnb.files import read_json
from drnb.finetune import HEAD_INITS, LR_SCHEDULES, METHODS, PROTOCOLS, SCRATCH_ENCODERS, VIEW_COUNTS
from drnb.models import ENCODERS, FEATURE_STAGES, PRECISION_MODES
from drnb.pipeline import ROTATION_MODES
from drnb.splits import MODES as SPLIT_MODES
from drnb.splits import REFERENCE_VALIDATION_FRACTION
from drnb.targets import CUT_POINTS, TARGETS
from drnb.training import BATCHNORM_MODES


@dataclass(frozen=True)
class Profile:
    """Every setting of a reproduction run, in the order a run uses them: data, encoder,
    pretext, fine-tuning, evaluation. Field comments say what each one does."""

    name: str = "custom"
    # --- data ---
    dataset: str = "synthetic"  # a name from drnb.datasets.DATASETS
    data_dir: str = ""  # the dataset's folder; "" = drnb's default place for it
    synthetic_images: int = 600  # size of the synthetic dataset, when dataset == "synthetic"
    label_file: str = ""  # layout override (e.g. for dataset "csv"): label file in data_dir; "" = registry's
    image_dir: str = ""  # layout override: image folder in data_dir; "" = registry's
    id_column: str = ""  # layout override: column of image ids; "" = registry's
    grade_column: str = ""  # layout override: column of grades 0-4; "" = registry's
    patient_column: str = ""  # label-file layouts: column of patient ids (eyes kept together); "" = none, or EyePACS-style ids
    suffix: str = ""  # layout override: image file suffix such as .jpg; "" = registry's
    drop_missing: bool = False  # drop listed-but-missing images with a warning instead of failing
    drop_unreadable: bool = False  # drop undecodable images with a warning instead of failing
    image_size: int = 128  # side of the square preprocessed images, pixels
    ben_graham: bool = False  # Ben Graham's local colour normalisation in preprocessing
    # --- encoder ---
    encoder: str = "compact"  # "densenet121" (the study's) or "compact" (for CPUs)
    feature_stages: str = "last"  # pool the "last" stage's maps, or "all" stages' pooled maps concatenated
    mixed_precision: str = "auto"  # "auto" (on when a GPU is present), "on" or "off"
    # --- pretext (each task the methods name: rotation, contrastive; drnb.pretexts) ---
    rotation_mode: str = "all4"  # rotation: "all4", every image in 4 rotations per batch (RotNet); "random1": one random
    pretext_hidden: tuple[int, ...] = (256,)  # pretext head widths; (2048, 1024) is the reference rotation head
    pretext_batch_size: int = 64  # views per batch: rotated images, or two views of each photograph (contrastive)
    pretext_learning_rate: float = 1e-3  # Adam
    pretext_epochs: int = 10  # passes over the pretext images (all4: each pass shows every rotation)
    pretext_min_steps: int = 0  # show at least this many batches of pretext_batch_size: a small set gets more passes; 0: no floor
    pretext_eval_every: int = 1  # score the held-out photographs after every this many epochs, and after the last
    # An unlabelled archive the pretext learns from besides the study's photographs: folders
    # (sub-folders searched) or registered datasets as NAME or NAME:DIR, whose grades are never
    # read (drnb.archive). --set and notebook parameters store folders absolute. () = the study's alone.
    pretext_images: tuple[str, ...] = ()
    # --- fine-tuning ---
    methods: tuple[str, ...] = ("rotation", "scratch")  # starting encoders compared: rotation, contrastive, scratch, imagenet
    protocols: tuple[str, ...] = ("finetune",)  # "finetune" (encoder and head trained), "linear" (head alone)
    target: str = "ordinal"  # "ordinal" (cumulative sigmoid code), "softmax" or "regression" (one linear output)
    finetune_hidden: tuple[int, ...] = (1024,)  # "simple multiclass" head widths; () = a linear head
    # "random" (Keras's initialisers) or "ridge": a linear regression head starts from ridge regression
    # on the frozen encoder's features of the test_time_turns views, in closed form (drnb.ridge; LP-FT).
    head_init: str = "random"
    finetune_batch_size: int = 32  # images per batch
    finetune_learning_rate: float = 5e-5  # Adam, both phases
    warmup_epochs: int = 3  # epochs with the encoder frozen (head only)
    # Epochs with everything training, after the warm-up (protocol "finetune"; protocol
    # "linear" stops after the warm-up or the ridge fit). 0 only with protocols=("linear",).
    finetune_epochs: int = 17
    finetune_min_steps: int = 0  # at least this many steps with everything training (epochs stretched); 0: no floor
    finetune_max_steps: int = 0  # at most this many steps with everything training (epochs shortened); 0: no cap
    lr_schedule: str = "constant"  # full phase: "constant", or "cosine" decay from the rate towards 0, step by step
    # Batch norm while everything trains: "batch" normalises each batch by its own statistics
    # (Keras's fit, the study's code); "frozen" keeps the starting moving statistics.
    finetune_batchnorm: str = "batch"
    # After the full phase, every weight becomes this share of its starting value plus the rest
    # of its trained value (WiSE-FT, a weight-space ensemble); 0: the trained weights as they are.
    finetune_start_share: float = 0.0
    # A fresh (scratch) encoder's batch-norm statistics re-estimated on calibration images
    # before its head is fitted or warmed up (drnb.models.recalibrate_batchnorm).
    recalibrate_batchnorm: bool = False
    # "per_repetition": each scratch run starts from a fresh encoder seeded with seed + repetition;
    # "shared": every scratch run starts from one fresh encoder seeded with seed, as every
    # rotation run starts from the one pretext encoder.
    scratch_encoder: str = "per_repetition"
    validation_fraction: float = 0.1  # of the training pool, to choose the fine-tuning epoch kept
    # --- evaluation ---
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)  # labelled fractions of the training pool
    repetitions: int = 5  # cross-validation repetitions (repetition r tests on fold r)
    folds: int = 5  # cross-validation folds
    split_mode: str = "stratified"  # "stratified" (drnb) or "reference" (the study's code, for comparison)
    duplicate_threshold: float = 0.97  # images whose fingerprints correlate this much share a fold (drnb.duplicates); 0: off
    cut_points: str = "fixed"  # outputs -> grades: "fixed" (0.5 per ordinal output; argmax) or "prior" (drnb.targets)
    # Training-pool images (never test) the prior cut points are fitted on, and a fresh encoder's
    # batch norm re-estimated on (a shared one's: as many images of the whole set, unlabelled).
    calibration_images: int = 256
    test_time_turns: int = 1  # predictions averaged over 1, 2 (0 and 180 degrees) or 4 quarter turns of each image, or 8 (also mirrored)
    bootstrap_resamples: int = 1000  # for the 95% CI of each run's kappa
    # --- reproducibility ---
    seed: int = 0  # repetition r uses seed + r for its split, initialisation and shuffling
    deterministic: bool = False  # tf op determinism: same seed, same kappa (slower)

    def __post_init__(self):
        _check_choice("dataset", self.dataset, tuple(DATASETS))
        for entry in self.pretext_images:
            parse_source(entry)  # ValueError naming a bad entry
        _check_choice("encoder", self.encoder, ENCODERS)
        _check_choice("feature_stages", self.feature_stages, FEATURE_STAGES)
        _check_choice("mixed_precision", self.mixed_precision, PRECISION_MODES)
        _check_choice("rotation_mode", self.rotation_mode, ROTATION_MODES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("cut_points", self.cut_points, CUT_POINTS)
        _check_choice("split_mode", self.split_mode, SPLIT_MODES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("head_init", self.head_init, HEAD_INITS)
        _check_choice("scratch_encoder", self.scratch_encoder, SCRATCH_ENCODERS)
        _check_choice("finetune_batchnorm", self.finetune_batchnorm, BATCHNORM_MODES)
        if not self.protocols or len(set(self.protocols)) < len(self.protocols):
            raise ValueError(f"protocols={self.protocols}: expected one or both of {list(PROTOCOLS)}, each once")
        for protocol in self.protocols:
            _check_choice("protocols", protocol, PROTOCOLS)
        if self.head_init == "ridge" and (self.target != "regression" or self.finetune_hidden):
            raise ValueError(
                f"head_init='ridge' fits a linear regression head: expected target='regression' and "
                f"finetune_hidden=() (got target={self.target!r}, finetune_hidden={self.finetune_hidden})"
            )
        for method in self.methods:
            _check_choice("methods", method, METHODS)
        if not self.methods:
            raise ValueError("methods: expected at least one of " + ", ".join(METHODS))
        if not self.fractions:
            raise ValueError("fractions=(): expected at least one labelled fraction in (0, 1], e.g. --set fractions=0.1,1.0")
        for fraction in self.fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"fractions: {fraction!r} is not a labelled fraction in (0, 1]")
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size={self.image_size!r}: expected a side in pixels in [16, 2048]")
        positive = (
            "image_size synthetic_images pretext_batch_size pretext_epochs pretext_eval_every repetitions folds "
            "finetune_batch_size calibration_images"
        ).split()
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        for name in ("warmup_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an epoch count >= 0")
        if self.test_time_turns not in VIEW_COUNTS:
            raise ValueError(
                f"test_time_turns={self.test_time_turns!r}: expected 1 (each image as it is), 2 (0 and 180 degrees), "
                "4 (every quarter turn) or 8 (every quarter turn of the image and of its mirror image)"
            )
        if "finetune" in self.protocols and not self.finetune_epochs:
            raise ValueError(
                "finetune_epochs=0 never trains the encoder: expected finetune_epochs >= 1 with protocol "
                "'finetune', or protocols=('linear',) for linear evaluation alone"
            )
        if "linear" in self.protocols and not self.warmup_epochs and self.head_init != "ridge":
            raise ValueError(
                "protocol 'linear' trains the head alone, and warmup_epochs=0 trains nothing: expected "
                "head_init='ridge' (a head fitted in closed form on the frozen features), or warm-up epochs"
            )
        if "finetune" not in self.protocols and self.validation_fraction:
            raise ValueError(
                f"validation_fraction={self.validation_fraction!r} chooses among fine-tuning epochs, "
                "and protocols=('linear',) has none: expected 0"
            )
        if self.finetune_start_share and self.validation_fraction:
            raise ValueError(
                f"finetune_start_share={self.finetune_start_share!r} moves the last weights back towards the start, "
                f"and validation_fraction={self.validation_fraction!r} would choose weights that are never used: "
                "expected one of them 0"
            )
        if self.repetitions > self.folds:
            raise ValueError(f"repetitions={self.repetitions} exceeds folds={self.folds}: repetition r tests on fold r")
        if "rotation" in self.methods and self.rotation_mode == "all4" and self.pretext_batch_size % 4:
            raise ValueError(f"pretext_batch_size={self.pretext_batch_size}: 'all4' needs a multiple of 4")
        if "contrastive" in self.methods and self.pretext_batch_size % 2:
            raise ValueError(f"pretext_batch_size={self.pretext_batch_size}: the contrastive pretext needs an even number of views")
        if self.pretext_images and not set(self.methods) & {"rotation", "contrastive"}:
            raise ValueError(
                f"pretext_images={list(self.pretext_images)}: no method in {list(self.methods)} trains a pretext; "
                "expected rotation or contrastive among the methods, or no archive"
            )
        if not 0 <= self.finetune_start_share < 1:
            raise ValueError(f"finetune_start_share={self.finetune_start_share!r}: expected a share in [0, 1)")
        if not 0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction={self.validation_fraction!r}: expected a fraction in [0, 0.5)")
        if not (self.duplicate_threshold == 0 or 0.5 <= self.duplicate_threshold <= 1):
            raise ValueError(
                f"duplicate_threshold={self.duplicate_threshold!r}: expected a cosine similarity in [0.5, 1], "
                "or 0 to split image by image"
            )
        for name in ("finetune_min_steps", "finetune_max_steps", "pretext_min_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a step count >= 0 (0: none)")
        if self.finetune_max_steps and self.finetune_max_steps < max(self.finetune_min_steps, self.finetune_epochs):
            raise ValueError(
                f"finetune_max_steps={self.finetune_max_steps}: expected 0 (no cap) or at least "
                f"finetune_min_steps={self.finetune_min_steps} and one step per epoch ({self.finetune_epochs})"
            )
        for name in ("pretext_learning_rate", "finetune_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive learning rate")
        _check_ranges(self)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def derive(self, **changes) -> "Profile":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# The largest seed: repetition r seeds NumPy, Python and TensorFlow with seed + r, and NumPy's
# legacy generators (scikit-learn's) take seeds below 2**32; 2**31 keeps every library's int32 too.
SEED_LIMIT = 2**31 - 1


def _check_ranges(profile: "Profile") -> None:
    """The ranges :meth:`Profile.__post_init__`'s rules leave open, checked before any run
    folder is written: a seed a library refuses would otherwise fail in the first notebook."""
    check_integer(profile.seed, "seed", 0, SEED_LIMIT - profile.repetitions)
    check_integer(profile.folds, "folds", 2)  # cross-validation needs a test fold and a training pool
    check_integer(profile.bootstrap_resamples, "bootstrap_resamples", 1)  # notebook 04's paired CI needs one
    for name in ("pretext_hidden", "finetune_hidden"):
        for width in getattr(profile, name):
            check_integer(width, f"{name} width", 1)
    for name in ("pretext_learning_rate", "finetune_learning_rate"):
        if not math.isfinite(getattr(profile, name)):
            raise ValueError(f"{name}={getattr(profile, name)!r}: expected a finite positive learning rate")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        dataset="synthetic",
        synthetic_images=120,
        image_size=32,
        pretext_hidden=(32,),
        pretext_batch_size=32,
        pretext_epochs=1,
        fractions=(0.25, 1.0),
        repetitions=2,
        protocols=("finetune", "linear"),
        finetune_hidden=(32,),
        finetune_batch_size=16,
        finetune_learning_rate=1e-3,
        warmup_epochs=1,
        finetune_epochs=1,
        cut_points="prior",
        calibration_images=64,
        bootstrap_resamples=50,
    ),
    "quick": Profile(
        name="quick",
        synthetic_images=400,
        image_size=128,
        ben_graham=True,
        feature_stages="all",
        pretext_hidden=(256,),
        pretext_batch_size=128,
        pretext_learning_rate=2e-3,
        pretext_epochs=3,
        pretext_min_steps=300,  # what 3 passes make on ~3,300 images; a smaller set gets more passes
        protocols=("finetune", "linear"),
        # LP-FT: a ridge head fitted on the frozen features, then everything trained with batch
        # norm frozen, at a small rate decayed to 0, and the weights moved halfway back to the
        # start (WiSE-FT); docs/decisions.md says why each.
        target="regression",
        finetune_hidden=(),
        head_init="ridge",
        finetune_learning_rate=1e-4,
        warmup_epochs=0,
        finetune_epochs=6,
        finetune_min_steps=200,
        finetune_max_steps=480,
        lr_schedule="cosine",
        finetune_batchnorm="frozen",
        finetune_start_share=0.5,
        recalibrate_batchnorm=True,
        scratch_encoder="shared",  # one fresh encoder for every scratch run, as rotation's one pretext
        validation_fraction=0.0,
        cut_points="prior",
        test_time_turns=8,  # every quarter turn of each image and of its mirror image: fit and predictions
    ),
    "paper": Profile(
        name="paper",
        dataset="aptos2019",
        image_size=224,
        encoder="densenet121",
        rotation_mode="random1",
        pretext_hidden=(2048, 1024),
        pretext_batch_size=32,
        pretext_learning_rate=1e-5,
        pretext_epochs=200,
        pretext_eval_every=10,  # scoring after each of 200 epochs would be a fifth of the pretext on a GPU
        finetune_hidden=(1024,),
        finetune_learning_rate=5e-5,
        warmup_epochs=3,
        finetune_epochs=17,
        validation_fraction=REFERENCE_VALIDATION_FRACTION,  # the study's val_split, the same at every fraction
    ),
}
# The default run (`make reproduce`): quick's recipe on 600 of drnb's synthetic photographs at
# 48 px, with 3 repetitions, a 60-step floor per run, 4 views per prediction and a 150-step
# pretext, so that it teaches in minutes on any 2-core machine; docs/decisions.md has the counts.
PROFILES["demo"] = PROFILES["quick"].derive(
    name="demo", synthetic_images=600, image_size=48, repetitions=3, finetune_min_steps=60, test_time_turns=4,
    pretext_min_steps=150,
)


def _parse_value(name: str, text: str, annotation):
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool or annotation == "bool":
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if origin is tuple:
            (item_type, _) = typing.get_args(annotation)
            items = [item for item in text.replace("(", "").replace(")", "").split(",") if item.strip()]
            return tuple(item_type(item.strip()) for item in items)
        return annotation(text)
    except ValueError:
        raise ValueError(f"--set {name}={text!r}: expected a value of type {getattr(annotation, '__name__', annotation)}") from None


def resolve_profile(name: str, overrides: dict | None = None) -> Profile:
    """A named profile with overrides applied and checked.

    Parameters
    ----------
    name : {"smoke", "demo", "quick", "paper"}
    overrides : dict, optional
        Field name -> value, either typed or as text (``"0.1,0.5"`` for a tuple).

    Raises
    ------
    ValueError
        For an unknown profile, an unknown field or a value of the wrong type or range.
    """
    if name not in PROFILES:
        raise ValueError(f"profile={name!r}: expected one of {list(PROFILES)}")
    hints = typing.get_type_hints(Profile)
    changes = {}
    for key, value in (overrides or {}).items():
        if key not in hints:
            raise ValueError(f"--set {key}: no such setting; the settings are {sorted(hints)}")
        changes[key] = _parse_value(key, value, hints[key]) if isinstance(value, str) and hints[key] is not str else value
    if "pretext_images" in changes:
        changes["pretext_images"] = normalise_entries(changes["pretext_images"])
    return PROFILES[name].derive(**changes)


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; ValueError for an item without ``=``."""
    parsed = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {assignment!r}: expected key=value")
        parsed[key.strip()] = value.strip()
    return parsed


# Settings added after run folders were first written, with the value that reproduces what
# those runs did: a resumed run must not change its splits, decoding or encoder halfway through.
SETTINGS_BEFORE_THEY_EXISTED = {"duplicate_threshold": 0.0, "cut_points": "fixed", "feature_stages": "last"}


# Settings drnb no longer has, with the value every run now uses: a folder written with that
# value resumes as it was; with another, its runs cannot be continued the same way.
SETTINGS_REMOVED = {
    "pooling": "avg",
    "pretext_dropout": 0.5,
    "finetune_dropout": 0.5,
    "pretext_holdout_fraction": 0.1,
    "pretext_lr_schedule": "constant",
    "pretext_zoom": 0.1,
    "finetune_zoom": 0.1,
    "finetune_colour": 0.1,
    "warmup_on_features": False,
    "min_steps": 0,
    "ridge_criterion": "correlation",
}


def load_profile(path) -> Profile:
    """Read a resolved profile written by :meth:`Profile.to_json`.

    A setting the file does not name takes its value from :data:`SETTINGS_BEFORE_THEY_EXISTED`
    when it has one there (the behaviour before the setting existed), else the default;
    ``protocols`` is ``("linear",)`` for a file with ``finetune_epochs=0``. A removed setting
    (:data:`SETTINGS_REMOVED`) must hold the value drnb now always uses, or not matter.

    Raises
    ------
    ValueError
        Naming ``path`` when it is damaged (not a JSON object) or holds a setting that is
        unknown, of the wrong type or out of its range.
    """
    values = read_json(path)
    _drop_removed_settings(values, path)
    hints = typing.get_type_hints(Profile)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}")
    values = {**{key: value for key, value in SETTINGS_BEFORE_THEY_EXISTED.items() if key not in values}, **values}
    if "protocols" not in values:  # before both protocols ran in one sweep, finetune_epochs=0 was linear evaluation
        values["protocols"] = ["linear"] if values.get("finetune_epochs") == 0 else ["finetune"]
    try:
        return Profile(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
    except (TypeError, ValueError) as error:  # a value of the wrong type, or out of its range
        raise ValueError(f"{path} holds a setting drnb refuses: {error}. Start a new run folder.") from None


def _drop_removed_settings(values: dict, path) -> None:
    """Remove the settings drnb no longer has from ``values``; ValueError for one whose value
    would have changed what the folder's runs did."""
    ridge_head = values.get("head_init") == "ridge"
    if ridge_head and "pooling" in values:  # an older drnb's file (every one names pooling), from before
        # ridge_turns and ridge_criterion existed, fitted a ridge head on 1 view by squared error
        values.setdefault("ridge_turns", 1)
        values.setdefault("ridge_criterion", "error")
    turns = values.pop("ridge_turns", None)
    if ridge_head and turns is not None and turns != values.get("test_time_turns", 1):
        raise ValueError(
            f"{path}: ridge_turns={turns} differs from test_time_turns={values.get('test_time_turns', 1)}; "
            "drnb now fits a ridge head on the views it predicts on. Start a new run folder."
        )
    for key, now in SETTINGS_REMOVED.items():
        if key not in values:
            continue
        value = values.pop(key)
        irrelevant = key == "ridge_criterion" and not ridge_head
        if value != now and not irrelevant:
            raise ValueError(
                f"{path}: {key}={value!r}; drnb no longer has this setting and always uses {now!r}. Start a new run folder."
            )
