"""Input checks every kernel wrapper runs before an address crosses into Mojo.

A failed check raises a ValueError whose message is one complete sentence naming the argument."""

from __future__ import annotations

import math

import numpy as np


def check_array(name: str, a, dtype, ndim: int | None = None, writable: bool = False) -> np.ndarray:
    """`a` must be a C-contiguous numpy array of `dtype` (and `ndim` dimensions)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim > 1 else ''}, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable: it is updated in place")
    return a


def check_float(name: str, v, positive: bool = False) -> float:
    """A finite non-negative (or positive) number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0 or (positive and f == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {f}")
    return f
