"""Argument checks shared by drnb's modules, so that every bad value reads the same way."""

from __future__ import annotations

from numbers import Integral

import numpy as np


def check_integer(value, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; a ValueError naming ``name`` otherwise
    (bools, floats and strings are refused, not rounded)."""
    expected = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer {expected}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {expected}, got {value!r}")
    return int(value)
