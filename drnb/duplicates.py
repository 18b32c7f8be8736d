"""Near-duplicate photographs: found after preprocessing, kept on one side of every split.

Public fundus sets hold the same photograph more than once under different names: IDRiD's
516 images include six pairs of identical photographs (one pair straddles its official
train/test split; three pairs disagree on the grade), and public Kaggle notebooks found
groups of APTOS 2019 training images with identical perceptual hashes. Split image by image,
such a pair can put a test photograph's twin in the training subset, and the test kappa
then measures memory, not grading.

drnb compares every pair of preprocessed images by a *fingerprint* built to ignore what
all photographs share and what re-saving changes:

1. grey levels, area-averaged to at most :data:`FINGERPRINT_SIDE` pixels a side;
2. minus a Gaussian blur of themselves (sigma :data:`HIGHPASS_SIGMA` pixels), which keeps
   the vessels and lesions and drops illumination and vignetting;
3. only the pixels within :data:`INNER_RADIUS` of the side from the centre, away from the
   mask's edge, which is alike in every preprocessed image;
4. centred and scaled to unit length, so that the dot product of two fingerprints is their
   correlation (cosine similarity) in [-1, 1].

Two images whose cosine is at least the profile's ``duplicate_threshold`` are near
duplicates. Measured on the development machine at 128 px: 30 IDRiD photographs and their
own copies re-saved as JPEG (quality 60), resized (x0.45 to x1.7), cropped by 2 % or
brightened by 15 % score at least 0.976; the nearest *different* photograph scores at most
0.952 among 3,629 EyePACS images (where no pair reaches 0.97), 0.945 among 400 synthetic
ones, while IDRiD's six identical pairs score above 0.99. Pairs are joined transitively into
groups (:func:`duplicate_groups`), and the groups are merged with patient ids
(:func:`split_groups`), so that the cross-validation keeps every group in one fold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

FINGERPRINT_SIDE = 32  # pixels a side; vessels are still a pixel or two wide
HIGHPASS_SIGMA = 2.0  # pixels of the fingerprint grid
INNER_RADIUS = 0.38  # of the side: inside drnb's mask (radius 0.485 of the side) with room to spare
_BLOCK_ROWS = 2048  # rows of the similarity matrix held at once
_CHUNK_IMAGES = 256  # images turned into thumbnails at once
_FLAT_GREY_LEVELS = 0.01  # root-mean-square detail below which a fingerprint is all zeros

__all__ = [
    "FINGERPRINT_SIDE",
    "duplicate_groups",
    "duplicate_table",
    "find_duplicates",
    "fingerprints",
    "near_duplicate_pairs",
    "photograph_groups",
    "split_groups",
]


def fingerprints(images: np.ndarray) -> np.ndarray:
    """High-passed, unit-length grey thumbnails of preprocessed images (see the module docstring).

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3) or (N, S, S), preprocessed (disc centred, square), S >= 8.

    Returns
    -------
    numpy.ndarray
        float32 (N, D): D is the number of thumbnail pixels within the inner disc. An image
        without detail (uniform) gets a row of zeros, similar to nothing.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[1] != images.shape[2] or images.shape[1] < 8:
        raise ValueError(f"images of shape {images.shape}: expected square images (N, S, S[, 3]) with S >= 8")
    side = min(FINGERPRINT_SIDE, images.shape[1])
    rows, cols = np.mgrid[:side, :side]
    inner = np.hypot(rows - (side - 1) / 2, cols - (side - 1) / 2) < INNER_RADIUS * side
    if len(images) == 0:
        return np.zeros((0, int(inner.sum())), np.float32)
    # Thumbnails chunk by chunk: a float copy of a whole 224-px set would take gigabytes.
    grey = np.concatenate(
        [
            _area_resize(chunk.mean(axis=-1, dtype=np.float32) if chunk.ndim == 4 else chunk.astype(np.float32), side)
            for chunk in np.array_split(images, max(1, -(-len(images) // _CHUNK_IMAGES)))
        ]
    )
    grey -= ndimage.gaussian_filter(grey, sigma=(0, HIGHPASS_SIGMA, HIGHPASS_SIGMA), mode="nearest")
    prints = grey[:, inner]
    prints -= prints.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(prints, axis=1, keepdims=True)
    # Below a hundredth of a grey level per pixel there is nothing left but rounding: not
    # scaled up, so that it matches nothing.
    flat = norms <= _FLAT_GREY_LEVELS * np.sqrt(prints.shape[1])
    return np.divide(prints, norms, out=np.zeros_like(prints), where=~flat).astype(np.float32)


def _area_resize(grey: np.ndarray, side: int) -> np.ndarray:
    """(N, S, S) float32 -> (N, side, side): block means when S is a multiple, else PIL's box filter."""
    n, size, _ = grey.shape
    if size % side == 0:
        step = size // side
        return grey.reshape(n, side, step, side, step).mean(axis=(2, 4))
    from PIL import Image

    thumbnails = [
        Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((side, side), Image.Resampling.BOX)
        for image in grey
    ]
    return np.stack([np.asarray(thumbnail) for thumbnail in thumbnails]).astype(np.float32)


def matches_any(prints: np.ndarray, reference: np.ndarray, threshold: float) -> np.ndarray:
    """Which rows of ``prints`` have a fingerprint cosine similarity of at least ``threshold``
    with some row of ``reference``.

    Parameters
    ----------
    prints, reference : numpy.ndarray
        float32 (A, D) and (N, D) from :func:`fingerprints`.
    threshold : float
        In (0, 1].

    Returns
    -------
    numpy.ndarray
        bool (A,).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: expected a cosine similarity in (0, 1]")
    matched = np.zeros(len(prints), bool)
    for start in range(0, len(prints), _BLOCK_ROWS):
        block = np.asarray(prints[start : start + _BLOCK_ROWS], np.float32) @ np.asarray(reference, np.float32).T
        matched[start : start + _BLOCK_ROWS] = (block >= threshold).any(axis=1)
    return matched


def near_duplicate_pairs(prints: np.ndarray, threshold: float) -> pd.DataFrame:
    """Every pair of rows whose fingerprints' cosine similarity is at least ``threshold``.

    Parameters
    ----------
    prints : numpy.ndarray
        float32 (N, D) from :func:`fingerprints`.
    threshold : float
        In (0, 1]; drnb's profiles use 0.97.

    Returns
    -------
    pandas.DataFrame
        Columns ``first``, ``second`` (row indices, ``first < second``) and ``similarity``,
        sorted by ``first`` then ``second``; empty when there are none.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: expected a cosine similarity in (0, 1]")
    prints = np.asarray(prints, dtype=np.float32)
    if prints.ndim != 2:
        raise ValueError(f"fingerprints of shape {prints.shape}: expected (N, D) from fingerprints()")
    firsts, seconds, similarities = [], [], []
    for start in range(0, len(prints), _BLOCK_ROWS):
        block = prints[start : start + _BLOCK_ROWS] @ prints.T
        rows, cols = np.nonzero(block >= threshold)
        rows = rows + start
        above = cols > rows  # each pair once, never an image with itself
        firsts.append(rows[above])
        seconds.append(cols[above])
        similarities.append(block[rows[above] - start, cols[above]])
    pairs = pd.DataFrame(
        {
            "first": np.concatenate(firsts) if firsts else np.zeros(0, np.int64),
            "second": np.concatenate(seconds) if seconds else np.zeros(0, np.int64),
            "similarity": np.concatenate(similarities) if similarities else np.zeros(0, np.float32),
        }
    ).astype({"first": np.int64, "second": np.int64})
    return pairs.sort_values(["first", "second"], ignore_index=True)


def find_duplicates(images: np.ndarray, threshold: float) -> pd.DataFrame:
    """Near-duplicate pairs among preprocessed images.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed.
    threshold : float
        A cosine similarity in (0, 1], or 0 to search nothing.

    Returns
    -------
    pandas.DataFrame
        :func:`near_duplicate_pairs` of the images' :func:`fingerprints`; no rows when
        ``threshold`` is 0.
    """
    if threshold == 0:
        return near_duplicate_pairs(np.zeros((0, 1), np.float32), 1.0)
    return near_duplicate_pairs(fingerprints(images), threshold)


def duplicate_groups(n_images: int, pairs: pd.DataFrame) -> np.ndarray:
    """Join pairs transitively: the group of every image, numbered by its smallest member.

    Parameters
    ----------
    n_images : int
    pairs : pandas.DataFrame
        Integer columns ``first`` and ``second``, row indices in [0, n_images), as from
        :func:`near_duplicate_pairs`.

    Returns
    -------
    numpy.ndarray
        int64 (n_images,): the row index of the first image of each row's group (an image
        with no near duplicate is its own group).
    """
    return _components(n_images, pairs["first"].to_numpy(), pairs["second"].to_numpy())


def _components(n_nodes: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph, each labelled by its smallest node."""
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1 if n_nodes else 0, n_nodes, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n_nodes))
    return smallest[component]


def split_groups(patient_ids, image_ids, pairs: pd.DataFrame) -> np.ndarray | None:
    """Group ids for cross-validation: patients, joined wherever near duplicates link them.

    Parameters
    ----------
    patient_ids : array-like of shape (N,), or None
        Patient of each image, or None when the dataset has none.
    image_ids : array-like of shape (N,)
        Stand in for the patient where there is none.
    pairs : pandas.DataFrame
        From :func:`near_duplicate_pairs`.

    Returns
    -------
    numpy.ndarray or None
        object (N,): a patient's id (or an image's, without patients), where every patient
        and image linked by a near-duplicate pair takes the id of the first of them. Ids
        that no pair touches are returned unchanged, and with no pair at all the result is
        the patient ids themselves (or None without them), so a dataset without near
        duplicates is split exactly as before. (With pairs and no patient ids, the folds are
        drawn over groups, so every fold can differ from the image-by-image split.)
    """
    if patient_ids is None and pairs.empty:
        return None
    labels = np.asarray(image_ids if patient_ids is None else patient_ids, dtype=object)
    if len(labels) != len(np.asarray(image_ids)):
        raise ValueError(f"{len(labels)} patient ids for {len(np.asarray(image_ids))} images: expected one per image")
    if pairs.empty:
        return labels
    codes, uniques = pd.factorize(pd.Series(labels), sort=False)
    first_label = _components(len(uniques), codes[pairs["first"].to_numpy()], codes[pairs["second"].to_numpy()])
    return np.asarray(uniques, dtype=object)[first_label[codes]]


def photograph_groups(images: np.ndarray, table: pd.DataFrame, threshold: float) -> tuple[np.ndarray | None, pd.DataFrame]:
    """The groups no split may cut: a dataset's patients, joined by near-duplicate photographs.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, S, S, 3), preprocessed, row-aligned with ``table``.
    table : pandas.DataFrame
        The dataset table: ``image_id`` and ``patient_id`` (missing where unknown; any type).
    threshold : float
        A cosine similarity in (0, 1] for :func:`find_duplicates`, or 0 to search nothing.

    Returns
    -------
    groups : numpy.ndarray or None
        object (N,) of str: :func:`split_groups` of ``"patient <id>"`` (``"image <id>"``
        where the patient is unknown) and the pairs found; None when the table names no
        patient and no pair is found.
    pairs : pandas.DataFrame
        The near-duplicate pairs (:func:`find_duplicates`).
    """
    if len(images) != len(table):
        raise ValueError(f"{len(images)} images but {len(table)} table rows; expected one row per image")
    patients = table["patient_id"]
    patient_ids = None
    if patients.notna().any():
        # An image without a patient is its own group. Prefixes keep the two kinds of id apart
        # (patient 7 is not image 7) and make every id a string, whatever the table held.
        named = "patient " + patients.astype(str)
        patient_ids = named.where(patients.notna(), "image " + table["image_id"].astype(str)).to_numpy(dtype=object)
    pairs = find_duplicates(images, threshold)
    return split_groups(patient_ids, table["image_id"].to_numpy(), pairs), pairs


def duplicate_table(table: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The near-duplicate pairs with both images' ids and grades, for a reader to check.

    Returns
    -------
    pandas.DataFrame
        Columns ``first_image``, ``second_image``, ``first_grade``, ``second_grade``,
        ``similarity`` and ``grades_differ``, one row per pair.
    """
    table = table.reset_index(drop=True)
    first, second = table.iloc[pairs["first"]], table.iloc[pairs["second"]]
    return pd.DataFrame(
        {
            "first_image": first["image_id"].to_numpy(),
            "second_image": second["image_id"].to_numpy(),
            "first_grade": first["grade"].to_numpy(),
            "second_grade": second["grade"].to_numpy(),
            "similarity": pairs["similarity"].round(4).to_numpy(),
            "grades_differ": first["grade"].to_numpy() != second["grade"].to_numpy(),
        }
    )
