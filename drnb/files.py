"""Files written atomically: a reader, or a run that crashed mid-write, sees the old file or
the new one, never half of one, and no temporary file is left behind.

Every result drnb writes goes through :func:`atomic_path`: the run folder's CSV and JSON
files, the encoders, the preprocessing cache and the kept features. The module depends on
nothing else in drnb, so the data stage can use it without the run folder's imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file to: it replaces ``path`` when the
    ``with`` block ends without an error, and is removed when the block raises.

    Parameters
    ----------
    path : path
        The file to write; its folder is created if missing.
    suffix : str, optional
        How the temporary name ends; by default ``path``'s own suffix, for writers that
        insist on one (Keras on ``.keras``) or append one otherwise (``numpy.save``, ``.npy``).

    Yields
    ------
    pathlib.Path
        A name not yet taken. The writer creates the file, so it gets the same permissions
        (the umask's) as any file the writer would create, not a temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = (path.suffix or ".tmp") if suffix is None else suffix
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{ending}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, write: Callable) -> None:
    """Write a file through ``write(binary_file)`` at an :func:`atomic_path`."""
    with atomic_path(path) as temporary, open(temporary, "xb") as file:
        write(file)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`write_atomically`)."""
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, values: dict) -> None:
    """Write a JSON file atomically (NumPy scalars become plain numbers)."""
    write_text_atomically(path, json.dumps(values, indent=2, default=_plain))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object written by :func:`write_json`.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        Naming ``path`` when it is not a JSON object (a file cut short, edited by hand, or
        of another kind): JSON's own error names no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is damaged: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object, found {type(values).__name__}")
    return values


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)
