"""Frozen-encoder features, kept under the encoder that made them, in memory and on disk.

A run that fits its head on frozen features (``head_init="ridge"``), or never trains its
encoder (protocol ``linear``), reads each image's pooled features in
each view it uses (a quarter turn, or a quarter turn of its mirror image). Those features
depend on nothing but the encoder (its architecture, weights and precision), the image and
the view, so :class:`FeatureStore` keeps them under a key made of exactly these
(:func:`encoder_fingerprint`): runs whose encoders are identical read each other's features,
and any change of weights gives a new key. Identical encoders are common in a sweep: every
``rotation`` run starts from the pretext encoder, and a ``scratch`` run of repetition r is the
same seeded initialisation, its batch norm re-estimated on the same calibration images, in
every fraction's notebook.

Given a folder, the store also keeps what it encoded there, one
``features_<key>_view<v>.npz`` per encoder and view (``features`` float32 (N, F), ``encoded``
bool (N,)), so the notebooks of a sweep, which share no memory, encode each image once per
encoder and view between them. A
file is written to a temporary name and renamed, so a reader never sees half of one; a file
that cannot be read is reported and encoded again, and one that cannot be written is
reported and left (the run's results do not depend on it).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from drnb.files import write_atomically
from drnb.models import leaf_layers

FILE_PREFIX = "features_"
# Part of every key: bump it when what a view shows, or how features are computed, changes.
FORMAT_VERSION = 1


def array_fingerprint(arrays, *, digest_size: int = 12) -> str:
    """A hex digest of the dtype, shape and bytes of every array, in order."""
    digest = hashlib.blake2b(digest_size=digest_size)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def encoder_fingerprint(encoder, *, context: str = "") -> str:
    """A key for the features ``encoder`` computes now: its architecture (each layer's class
    and configuration, in order, without the names Keras numbers per process), its weights
    and the precision policy of its layers, plus ``context`` (e.g. which images it encodes)
    and :data:`FORMAT_VERSION`.

    Parameters
    ----------
    encoder : keras.Model
    context : str
        Anything else the features depend on.
    """
    policy = getattr(getattr(encoder, "dtype_policy", None), "name", "")
    weights = [np.asarray(weight) for weight in encoder.get_weights()]
    layers = [
        [type(layer).__name__, {key: value for key, value in layer.get_config().items() if key != "name"}]
        for layer in leaf_layers(encoder)
    ]
    architecture = json.dumps([str(encoder.input_shape), layers], sort_keys=True, default=str)
    described = f"{FORMAT_VERSION}|{context}|{policy}|{architecture}"
    return array_fingerprint([np.frombuffer(described.encode(), np.uint8), *weights])


class FeatureStore:
    """Features of ``n_rows`` images, per (encoder key, view), encoded only once.

    Parameters
    ----------
    n_rows : int
        Images in the dataset the rows index.
    directory : path, optional
        Where to keep the features between processes; None keeps them in memory only.
    log : callable
        Receives a line when a file cannot be read or written.

    Attributes
    ----------
    rows_encoded, rows_reused : int
        Since the store was made: the distinct rows of each request passed to ``encode``, and
        those served from what was kept (by earlier requests, or read from the folder). A
        sweep whose runs share encoders should mostly reuse.
    """

    def __init__(self, n_rows: int, directory: str | os.PathLike | None = None, *, log=print):
        if n_rows < 1:
            raise ValueError(f"n_rows={n_rows!r}: expected a positive number of images")
        self.n_rows = int(n_rows)
        self.directory = Path(directory) if directory is not None else None
        self.log = log
        self._kept: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._unsaved: set[tuple[str, int]] = set()
        self._unwritable: set[tuple[str, int]] = set()  # their files failed: kept in memory only
        self.rows_encoded = 0
        self.rows_reused = 0

    def path(self, encoder_key: str, view: int) -> Path | None:
        """The file of one encoder and view (None without a directory)."""
        if self.directory is None:
            return None
        return self.directory / f"{FILE_PREFIX}{encoder_key}_view{view}.npz"

    def features(self, encoder_key: str, view: int, rows, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``rows``' features, calling ``encode`` for the rows not kept yet.

        Parameters
        ----------
        encoder_key : str
            From :func:`encoder_fingerprint`.
        view : int
            Which symmetry of the square the images are shown in (0-7, see
            :func:`drnb.finetune.symmetry_views`).
        rows : array-like
            int (M,) indices in ``[0, n_rows)``, in any order, repeats allowed.
        encode : callable
            ``encode(missing)`` -> float32 (len(missing), F): the features of the sorted,
            unique rows ``missing``, by the encoder the key names.

        Returns
        -------
        numpy.ndarray
            float32 (M, F), in the order of ``rows``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows)):
            raise ValueError(f"rows: expected a 1-D array of indices in [0, {self.n_rows})")
        key = (encoder_key, int(view))
        if key not in self._kept:
            self._kept[key] = self._read(key) or (None, np.zeros(self.n_rows, bool))
        features, encoded = self._kept[key]
        if not len(rows):
            return np.zeros((0, 0 if features is None else features.shape[1]), np.float32)
        unique = np.unique(rows)
        missing = unique[~encoded[unique]]
        if len(missing):
            fresh = np.asarray(encode(missing), dtype=np.float32)
            if fresh.ndim != 2 or len(fresh) != len(missing):
                raise ValueError(f"encode returned shape {fresh.shape}; expected ({len(missing)}, features)")
            if features is None:
                features = np.zeros((self.n_rows, fresh.shape[1]), np.float32)
                self._kept[key] = (features, encoded)
            features[missing] = fresh
            encoded[missing] = True
            self._unsaved.add(key)
        self.rows_encoded += len(missing)
        self.rows_reused += len(unique) - len(missing)
        return features[rows]

    def save(self) -> list[Path]:
        """Write every encoder and view that gained rows since the last save; return the files.

        Rows another process saved to the same file before this save are merged in; two
        saves at the same moment may lose each other's rows, which are then encoded again.
        A file that cannot be written is reported and skipped. With a directory, what is on
        disk then leaves memory (it is read again when asked for), so a notebook holds one
        run's features at a time, not every encoder's of the sweep.
        """
        written = []
        for key in sorted(self._unsaved):
            path = self.path(*key)
            if path is None:
                break
            features, encoded = self._kept[key]
            on_disk = self._read(key)
            if on_disk is not None and on_disk[0].shape == features.shape:
                theirs = on_disk[1] & ~encoded
                features[theirs] = on_disk[0][theirs]
                encoded |= theirs
            try:
                write_atomically(path, lambda file: np.savez(file, features=features, encoded=encoded))
                written.append(path)
                self._unwritable.discard(key)
            except OSError as error:
                self._unwritable.add(key)
                self.log(f"features: cannot write {path} ({error}); later notebooks will encode its rows again")
        self._unsaved.clear()
        if self.directory is not None:
            self._kept = {key: kept for key, kept in self._kept.items() if key in self._unwritable}
        return written

    def _read(self, key) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(*key)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path) as stored:
                features, encoded = stored["features"], stored["encoded"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            self.log(f"features: cannot read {path} ({error}); its rows are encoded again")
            return None
        if features.dtype != np.float32 or features.shape[:1] != (self.n_rows,) or features.ndim != 2 or encoded.shape != (self.n_rows,):
            self.log(
                f"features: {path} holds features {features.shape} {features.dtype} for {encoded.shape} rows; "
                f"expected float32 ({self.n_rows}, F): its rows are encoded again"
            )
            return None
        return features, encoded.astype(bool)
