"""Rotary position embedding tables (the cos_sin operand of Backend.rope).

Angles are computed in float64 and rounded once to float32, so a table row for position 100k is
as accurate as one for position 1 (computing p * f in float32, as HF does, loses ~1e-3 rad there).

Supported `rope_scaling` (HF config.rope_scaling / rope_parameters) types:
    None, "default"  theta_i = base^(-2i/R)
    "linear"         theta_i / factor                        (position interpolation)
    "llama3"         Llama 3.1 band-wise scaling: long wavelengths / factor, short ones kept,
                     a smooth blend between (factor, low_freq_factor, high_freq_factor,
                     original_max_position_embeddings)
"""

from __future__ import annotations

import math

import numpy as np


def rope_inv_freq(rot_dim: int, base: float, scaling: dict | None = None) -> np.ndarray:
    """The rot_dim/2 inverse frequencies theta_i (float64), after `scaling`."""
    if not isinstance(rot_dim, (int, np.integer)) or rot_dim < 2 or rot_dim % 2:
        raise ValueError(f"rot_dim must be an even integer >= 2, got {rot_dim!r}")
    base = float(base)
    if not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"rope base (rope_theta) must be a finite number > 1, got {base}")
    inv_freq = 1.0 / base ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)

    kind = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / _positive(scaling, "factor")
    if kind == "llama3":
        factor = _positive(scaling, "factor")
        low = _positive(scaling, "low_freq_factor")
        high = _positive(scaling, "high_freq_factor")
        old_len = _positive(scaling, "original_max_position_embeddings")
        if high <= low:
            raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
        low_freq_wavelen = old_len / low  # wavelengths longer than this are divided by factor
        high_freq_wavelen = old_len / high  # wavelengths shorter than this are kept
        wavelen = 2.0 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(wavelen > low_freq_wavelen, inv_freq / factor,
                        np.where(wavelen < high_freq_wavelen, inv_freq, blended))
    raise ValueError(f"unsupported rope scaling type {kind!r}: supported are default, linear, llama3")


def rope_cos_sin(rot_dim: int, base: float, max_positions: int, scaling: dict | None = None) -> np.ndarray:
    """float32 [max_positions, rot_dim]: row p = [cos(p theta_0..), sin(p theta_0..)] (R/2 each)."""
    if not isinstance(max_positions, (int, np.integer)) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    inv_freq = rope_inv_freq(rot_dim, base, scaling)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.ascontiguousarray(np.concatenate([np.cos(angles), np.sin(angles)], axis=1), dtype=np.float32)


def _positive(scaling: dict, key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} needs {key!r}")
    v = float(scaling[key])
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"rope scaling {key} must be a positive number, got {scaling[key]!r}")
    return v
