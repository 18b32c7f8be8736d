"""The unlabelled archive: photographs the pretext learns from besides the study's own.

Self-supervision pays where unlabelled photographs outnumber graded ones, as in a clinic's
archive. The setting ``pretext_images`` names the archive's sources, each either

- a folder, searched with its sub-folders for :data:`IMAGE_SUFFIXES` (no label file needed), or
- a registered dataset, ``NAME`` (at its default folder) or ``NAME:DIR``, loaded through its
  layout with its grades dropped on loading, so that nothing downstream can read them.

The archive's photographs go through the study's preprocessing and cache (and the same
``drop_missing`` / ``drop_unreadable`` rules). One that is a near duplicate of a study
photograph (:mod:`drnb.duplicates`, the profile's ``duplicate_threshold``) is left out and
counted: the pretext must not see a test photograph twice under two names, nor count it in
the archive. The grading runs, their folds and subsets never read the archive.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drnb.datasets import DATASETS, TABLE_COLUMNS, load_dataset, patient_ids_from_names

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# The columns the pretext's table carries: what grouping the held-out share needs, and where
# each photograph came from.
PRETEXT_COLUMNS = ("image_id", "patient_id", "source")


@dataclass(frozen=True)
class ArchiveSource:
    """One entry of ``pretext_images``: a folder, or a registered dataset (and its folder)."""

    dataset: str = ""  # a key of drnb.datasets.DATASETS, or "" for a plain folder
    folder: str = ""  # absolute; "" = the registered dataset's default folder

    @property
    def name(self) -> str:
        """How counts and tables name this source: the dataset, or the folder's last part."""
        return self.dataset or Path(self.folder).name or self.folder


def parse_source(entry: str) -> ArchiveSource:
    """``"eyepacs2015"``, ``"eyepacs2015:DIR"`` or ``"DIR"`` -> :class:`ArchiveSource`.

    A plain folder is made absolute against the current folder, so that a run folder's
    settings mean the same from any notebook's working folder.

    Raises
    ------
    ValueError
        For an empty entry, or ``NAME:DIR`` whose ``NAME`` is not a registered dataset.
    """
    text = str(entry).strip()
    if not text:
        raise ValueError("pretext_images: an empty entry; expected a folder of photographs or a dataset name")
    name, sep, folder = text.partition(":")
    if name in DATASETS:
        if name == "synthetic":
            raise ValueError(
                "pretext_images: 'synthetic' is drawn from the study's own seed; give a folder of photographs instead"
            )
        return ArchiveSource(dataset=name, folder=str(Path(folder).expanduser().resolve()) if folder else "")
    if sep and "/" not in name and "\\" not in name:
        raise ValueError(
            f"pretext_images: {text!r} names no registered dataset {name!r}; expected a folder, or NAME:DIR with "
            f"NAME one of {sorted(set(DATASETS) - {'synthetic'})}"
        )
    return ArchiveSource(folder=str(Path(text).expanduser().resolve()))


def normalise_entries(entries) -> tuple[str, ...]:
    """``pretext_images`` as a profile stores it: a tuple of entries with folders absolute.

    ``entries``: a tuple or list of entries, or one comma-separated string ("" = none).
    """
    if isinstance(entries, str):
        entries = [item for item in entries.split(",") if item.strip()]
    sources = [parse_source(entry) for entry in entries]
    return tuple(
        (f"{source.dataset}:{source.folder}" if source.folder else source.dataset) if source.dataset else source.folder
        for source in sources
    )


def check_sources(entries) -> None:
    """Every source's folder exists (a registered dataset's default folder where none is
    given); FileNotFoundError naming the first that does not."""
    from drnb.datasets import default_data_dir

    for source in map(parse_source, entries):
        folder = source.folder or str(default_data_dir(source.dataset))
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"pretext_images: {folder} is not a folder; expected a folder of fundus photographs "
                f"({', '.join(IMAGE_SUFFIXES)}, sub-folders searched) or NAME:DIR of a registered dataset"
            )


def folder_table(folder: str | os.PathLike, source: str) -> pd.DataFrame:
    """Every photograph under ``folder`` (sub-folders too), sorted by path.

    Returns
    -------
    pandas.DataFrame
        :data:`drnb.datasets.TABLE_COLUMNS` plus ``source``: ``image_id`` is the path inside
        ``folder``; ``grade`` is -1 (none known); ``patient_id`` from EyePACS-style names
        (``<patient>_<left|right>``), else missing.

    Raises
    ------
    ValueError
        When the folder holds no photograph.
    """
    root = Path(folder)
    paths = sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    )
    if not paths:
        raise ValueError(f"pretext_images: {root} holds no photograph ({', '.join(IMAGE_SUFFIXES)}, sub-folders searched)")
    relative = pd.Series([path.relative_to(root).as_posix() for path in paths])
    stems = pd.Series([path.stem for path in paths])
    return pd.DataFrame(
        {
            "image_id": relative,
            "path": [str(path) for path in paths],
            "grade": np.full(len(paths), -1, np.int64),
            "patient_id": patient_ids_from_names(stems),
            "split": None,
            "source": source,
        }
    )


def dataset_table(source: ArchiveSource, drop_missing: bool) -> pd.DataFrame:
    """A registered dataset's photographs with their grades dropped (``grade`` -1)."""
    table = load_dataset(source.dataset, source.folder or None, drop_missing=drop_missing)
    return table.assign(grade=-1, source=source.name)[[*TABLE_COLUMNS, "source"]]


def archive_table(entries, *, drop_missing: bool = False) -> pd.DataFrame:
    """Every source of ``pretext_images`` in one table, ids prefixed by their source.

    Returns
    -------
    pandas.DataFrame
        :data:`drnb.datasets.TABLE_COLUMNS` plus ``source``; empty for no entries.
    """
    tables = []
    for source in map(parse_source, entries):
        table = dataset_table(source, drop_missing) if source.dataset else folder_table(source.folder, source.name)
        prefix = table["source"] + "/"
        tables.append(table.assign(image_id=prefix + table["image_id"].astype(str),
                                   patient_id=(prefix + table["patient_id"].astype(str)).where(table["patient_id"].notna())))
    if not tables:
        return pd.DataFrame({column: [] for column in (*TABLE_COLUMNS, "source")})
    return pd.concat(tables, ignore_index=True)


def study_duplicates(archive_images: np.ndarray, study_images: np.ndarray, threshold: float) -> np.ndarray:
    """Which archive photographs are near duplicates of a study photograph.

    Parameters
    ----------
    archive_images, study_images : numpy.ndarray
        uint8 (A, S, S, 3) and (N, S, S, 3), preprocessed alike.
    threshold : float
        A cosine similarity of fingerprints in (0, 1] (:mod:`drnb.duplicates`), or 0 to
        compare nothing.

    Returns
    -------
    numpy.ndarray
        bool (A,): True where the photograph matches some study photograph.
    """
    from drnb.duplicates import fingerprints, matches_any

    if threshold == 0 or len(archive_images) == 0 or len(study_images) == 0:
        return np.zeros(len(archive_images), bool)
    return matches_any(fingerprints(archive_images), fingerprints(study_images), threshold)


@dataclass
class PretextImages:
    """The pretext's photographs: the study's, then the archive's, with their sources.

    ``images``: uint8 (N + A, S, S, 3); ``table``: :data:`PRETEXT_COLUMNS`, row-aligned;
    ``counts``: photographs per source that the pretext uses; ``left_out``: per reason
    (``"near duplicate of a study photograph"``, ``"unreadable"``), how many archive
    photographs were left out.
    """

    images: np.ndarray
    table: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)


def pretext_images(study_images: np.ndarray, study_table: pd.DataFrame, study_name: str, archive_images: np.ndarray,
                   archive_rows: pd.DataFrame, listed: int, threshold: float) -> PretextImages:
    """Join the study's photographs and the archive's, less the archive's near duplicates.

    An archive photograph that is one of the study's own files, or a near duplicate of a study
    photograph, is left out (and counted), so that no photograph reaches the pretext twice.

    Parameters
    ----------
    study_images, archive_images : numpy.ndarray
        uint8 (N, S, S, 3) and (A, S, S, 3), preprocessed alike.
    study_table, archive_rows : pandas.DataFrame
        Row-aligned with the images (``path``); ``archive_rows`` has ``source``.
    study_name : str
        The source name of the study's photographs (its dataset).
    listed : int
        Archive photographs found before preprocessing, to count the unreadable ones dropped.
    threshold : float
        The profile's ``duplicate_threshold``.
    """
    # The study's own files always, and copies of its photographs by their fingerprints.
    duplicate = archive_rows["path"].isin(set(study_table["path"])).to_numpy() | study_duplicates(
        archive_images, study_images, threshold
    )
    kept_rows = archive_rows.loc[~duplicate]
    table = pd.concat(
        [study_table.assign(source=study_name)[list(PRETEXT_COLUMNS)], kept_rows[list(PRETEXT_COLUMNS)]], ignore_index=True
    )
    counts = {study_name: int(len(study_table)), **{k: int(v) for k, v in kept_rows["source"].value_counts(sort=False).items()}}
    left_out = {"near duplicate of a study photograph": int(duplicate.sum()), "unreadable": int(listed - len(archive_rows))}
    if duplicate.any():
        logger.warning("pretext_images: %d archive photograph(s) are near duplicates of study photographs; left out "
                       "(e.g. %s)", int(duplicate.sum()), archive_rows.loc[duplicate, "image_id"].head(3).tolist())
    images = np.concatenate([study_images, archive_images[~duplicate]]) if len(kept_rows) else study_images
    return PretextImages(images=images, table=table, counts=counts, left_out=left_out)
