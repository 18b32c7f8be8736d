"""The run folder: where each stage reads and writes, so notebooks talk through files.

::

    runs/<name>/
      profile.json                  the resolved settings (written once; a run keeps them)
      data/dataset.csv              the dataset table as loaded (notebook 01)
      data/summary.json             counts and image statistics (notebook 01)
      data/near_duplicates.csv      pairs of near-identical photographs, kept within one fold (notebook 01)
      pretext/encoder.keras         the rotation encoder (notebook 02), history.csv, metrics.json
      pretext_<method>/             the same for another pretext task the profile's methods name (contrastive)
      data/format_only.csv          what the photographs' format alone scores, per repetition (notebook 01)
      finetune/<protocol>/<method>/fraction_<f>/repetition_<r>/
                                    metrics.json, predictions.csv, history.csv (notebook 03)
      features/                     frozen-encoder features the fraction notebooks share (notebook 03;
                                    a cache, removed when drnb reproduce finishes the sweep)
      results.csv, table.csv, table.md, comparison.csv, kappa_vs_fraction.png,
      referable_auc_vs_fraction.png (notebook 04)
      notebooks/                    the executed notebooks (drnb reproduce)
      .drnb-lock                    the process id of the last drnb reproduce that held the folder
                                    (the lock itself is the operating system's, on this file)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from drnb.files import write_json, write_text_atomically
from drnb.profiles import Profile, load_profile, resolve_profile

PROFILE_FILE = "profile.json"
LOCK_FILE = ".drnb-lock"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run folder (see the module docstring)."""

    root: Path

    @property
    def profile(self) -> Path:
        return self.root / PROFILE_FILE

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def pretext(self) -> Path:
        return self.root / "pretext"

    @property
    def encoder(self) -> Path:
        return self.encoder_for("rotation")

    def pretext_dir(self, method: str) -> Path:
        """Where ``method``'s pretext writes: ``pretext/`` for rotation (the study's), else
        ``pretext_<method>/``."""
        return self.pretext if method == "rotation" else self.root / f"pretext_{method}"

    def encoder_for(self, method: str) -> Path:
        """The encoder ``method``'s pretext saved."""
        return self.pretext_dir(method) / "encoder.keras"

    def encoders(self, methods) -> dict[str, Path]:
        """Pretext method -> its encoder, for those of ``methods`` that have a pretext."""
        from drnb.pretexts import PRETEXT_TASKS

        return {method: self.encoder_for(method) for method in methods if method in PRETEXT_TASKS}

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def table_csv(self) -> Path:
        return self.root / "table.csv"

    @property
    def table_md(self) -> Path:
        return self.root / "table.md"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison.csv"

    @property
    def plot(self) -> Path:
        return self.root / "kappa_vs_fraction.png"

    @property
    def auc_plot(self) -> Path:
        return self.root / "referable_auc_vs_fraction.png"


def checkout_root() -> Path | None:
    """The source checkout drnb runs from, or None when installed as a wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() and (root / "pyproject.toml").is_file() else None


def default_run_dir(name: str = "notebooks") -> Path:
    """``runs/<name>`` in the checkout (or the current folder outside one)."""
    return (checkout_root() or Path.cwd()) / "runs" / name


def open_run(
    run_dir: str | os.PathLike = "", profile_name: str = "smoke", overrides: dict | None = None, *, create: bool = True,
    same_profile: bool = False,
) -> tuple[RunPaths, Profile]:
    """Open a run folder, creating its ``profile.json`` on first use.

    A run keeps the settings it was started with: opening an existing run with overrides
    that change them is an error (start a new ``run_dir`` instead), so results made with
    different settings never mix in one table.

    Parameters
    ----------
    run_dir : path
        ``""`` means :func:`default_run_dir`.
    profile_name : str
        The profile of a new run folder (and, with ``same_profile``, the one an existing
        folder must have been made with).
    overrides : dict, optional
        Settings to change; empty values (``""``) are ignored, so notebook parameters can
        default to "the profile's value".
    create : bool
        With ``False``, a folder without ``profile.json`` is an error instead of a new run.
    same_profile : bool
        Refuse a folder made by another profile than ``profile_name`` (the command line
        names the profile it means; a notebook's default only names one for a new folder).
    """
    paths = RunPaths(Path(run_dir).expanduser().resolve() if run_dir else default_run_dir())
    overrides = {key: value for key, value in (overrides or {}).items() if value not in ("", None)}
    if paths.profile.exists():
        profile = load_profile(paths.profile)
        if same_profile and profile.name != profile_name:
            raise ValueError(
                f"run folder {paths.root} was made by profile {profile.name!r}, not {profile_name!r}; "
                f"use a new run folder for {profile_name!r}, or --profile {profile.name} to resume it"
            )
        requested = resolve_profile(profile.name, {**_as_overrides(profile), **overrides})
        if requested != profile:
            changed = {k: v for k, v in requested.to_dict().items() if profile.to_dict()[k] != v}
            raise ValueError(
                f"run folder {paths.root} was made with other settings; {changed} would change them. "
                "Use a new run folder."
            )
        return paths, profile
    if not create:
        raise FileNotFoundError(f"no run at {paths.root} (no {PROFILE_FILE}); run notebooks 01-03 or `drnb reproduce` first")
    profile = resolve_profile(profile_name, overrides)
    write_text_atomically(paths.profile, profile.to_json())
    return paths, profile


def listed_fraction(fraction: float, profile: Profile, paths: RunPaths) -> float:
    """``fraction`` as the run folder's settings list it; ValueError for one they do not list.

    Notebook 04 tables every fraction in the folder and ``drnb reproduce`` plans the ones
    ``profile.json`` lists, so a fraction outside them would mix runs no plan knows of into
    the folder's results.
    """
    for listed in profile.fractions:
        if abs(listed - fraction) < 1e-9:
            return listed
    raise ValueError(
        f"fraction={fraction:g} is not one of this run folder's fractions {list(profile.fractions)} "
        f"({paths.profile}); expected one of them, or a new run folder whose profile lists it "
        f"(drnb reproduce --set fractions=...)"
    )


@contextlib.contextmanager
def run_lock(paths: RunPaths):
    """Hold the run folder for this process, or refuse at once if another process holds it.

    The lock is the operating system's (``fcntl.flock`` on ``.drnb-lock``): it dies with its
    process, so a folder left by a killed run is never blocked. The file keeps the holder's
    process id, to name it. Where ``fcntl`` does not exist (Windows) nothing is locked.

    Raises
    ------
    RuntimeError
        Naming the folder and the process that holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    lock_path = paths.root / LOCK_FILE
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(
                f"run folder {paths.root} is in use by another drnb reproduce (process {holder}); "
                "wait for it to finish, or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _as_overrides(profile: Profile) -> dict:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in profile.to_dict().items() if key != "name"}


def load_table(profile: Profile):
    """The profile's dataset as drnb's common table (see :func:`drnb.datasets.load_dataset`)."""
    from drnb.datasets import load_dataset

    return load_dataset(
        profile.dataset,
        profile.data_dir or None,
        drop_missing=profile.drop_missing,
        synthetic_images=profile.synthetic_images,
        seed=profile.seed,
        label_file=profile.label_file or None,
        image_dir=profile.image_dir or None,
        id_column=profile.id_column or None,
        grade_column=profile.grade_column or None,
        patient_column=profile.patient_column or None,
        suffix=profile.suffix or None,
    )


def preprocess_config(profile: Profile):
    """The :class:`drnb.preprocessing.PreprocessConfig` that ``profile`` asks for."""
    from drnb.preprocessing import PreprocessConfig

    return PreprocessConfig(size=profile.image_size, ben_graham=profile.ben_graham)


def load_images(profile: Profile, *, log=print):
    """Load the profile's dataset and preprocess it (from the cache when it can).

    Returns
    -------
    images : numpy.ndarray
        uint8 (N, image_size, image_size, 3).
    table : pandas.DataFrame
        The dataset table, row-aligned with ``images``.
    """
    from drnb.preprocessing import preprocess_table

    images, table = preprocess_table(load_table(profile), preprocess_config(profile), drop_unreadable=profile.drop_unreadable)
    log(f"{profile.dataset}: {len(table)} images, preprocessed to {profile.image_size} px")
    return images, table


def load_pretext_images(profile: Profile, images, table, *, log=print):
    """The pretext's photographs: the study's ``images`` and, with ``pretext_images``, the
    archive's, preprocessed (from the cache when it can) and less its near duplicates of
    study photographs (:func:`drnb.archive.pretext_images`).

    Parameters
    ----------
    images, table
        The study's preprocessed images, uint8 (N, S, S, 3), and its table, from :func:`load_images`.

    Returns
    -------
    drnb.archive.PretextImages
    """
    from drnb.archive import archive_table, pretext_images
    from drnb.preprocessing import preprocess_table

    listed = archive_table(profile.pretext_images, drop_missing=profile.drop_missing)
    archive_images, archive_rows = (
        preprocess_table(listed, preprocess_config(profile), drop_unreadable=profile.drop_unreadable)
        if len(listed) else (images[:0], listed)
    )
    joined = pretext_images(images, table, profile.dataset, archive_images, archive_rows, len(listed), profile.duplicate_threshold)
    if not profile.pretext_images:
        return joined
    counts = ", ".join(f"{source} {count}" for source, count in joined.counts.items())
    left_out = ", ".join(f"{count} {reason}" for reason, count in joined.left_out.items() if count)
    log(f"pretext photographs: {len(joined.images)} ({counts})" + (f"; left out of the archive: {left_out}" if left_out else ""))
    return joined


def missing_pretexts(paths: RunPaths, profile: Profile, *, log=None) -> list[str]:
    """The pretext methods the profile names whose encoder is missing or does not load (named
    in a warning, :func:`drnb.pretext.encoder_ready`); with ``log``, each one that loads is
    said to be kept."""
    from drnb.finetune import pretext_methods
    from drnb.pretext import encoder_ready

    missing = []
    for method in pretext_methods(profile):
        if not encoder_ready(paths.encoder_for(method)):
            missing.append(method)
        elif log is not None:
            log(f"{method}: encoder trained earlier, kept ({paths.encoder_for(method)})")
    return missing


def train_pretexts(paths: RunPaths, profile: Profile, methods, images, table, *, pretext=None, log=print) -> None:
    """Train each pretext task of ``methods`` (e.g. :func:`missing_pretexts`) into the run folder.

    Parameters
    ----------
    images, table
        The study's preprocessed images and table (:func:`load_images`).
    pretext : drnb.archive.PretextImages, optional
        The pretext's photographs when already loaded; else they are loaded
        (:func:`load_pretext_images`) only if there is a task to train.
    """
    from drnb.pretext import train_pretext

    if methods and pretext is None:
        pretext = load_pretext_images(profile, images, table, log=log)
    for method in methods:
        result = train_pretext(pretext.images, profile, paths.pretext_dir(method), method=method, table=pretext.table,
                               left_out=pretext.left_out, log=log)
        log(f"{method}: held-out score {result.heldout_accuracy:.3f}; {result.images_per_second:.0f} images/s; "
            f"{result.seconds:.0f} s; encoder saved to {result.encoder_path}")


def write_data_summary(paths: RunPaths, table, images, duplicates=None, format_only=None) -> dict:
    """Write ``data/dataset.csv`` and ``data/summary.json`` (counts per grade, splits, image
    shape; given the :func:`drnb.duplicates.duplicate_table`, the near-duplicate pairs; given
    :func:`drnb.photo_format.format_only_kappa`'s table, ``data/format_only.csv`` and its
    average kappa)."""
    from drnb.datasets import grade_counts

    summary = {
        "images": int(len(table)),
        "images_per_grade": {int(g): int(c) for g, c in grade_counts(table).items()},
        "given_splits": {str(k): int(v) for k, v in table["split"].value_counts().items()},
        "patients": int(table["patient_id"].nunique()),
        "preprocessed_shape": list(images.shape[1:]),
    }
    if duplicates is not None:
        summary["near_duplicate_pairs"] = int(len(duplicates))
        summary["near_duplicate_pairs_with_different_grades"] = int(duplicates["grades_differ"].sum())
        write_text_atomically(paths.data / "near_duplicates.csv", duplicates.to_csv(index=False))
    if format_only is not None:
        summary["format_only_qw_kappa"] = float(format_only["qw_kappa"].mean())
        write_text_atomically(paths.data / "format_only.csv", format_only.to_csv(index=False))
    write_text_atomically(paths.data / "dataset.csv", table.to_csv(index=False))
    write_json(paths.data / "summary.json", summary)
    return summary
