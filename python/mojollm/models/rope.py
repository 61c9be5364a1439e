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
    if isinstance(rot_dim, bool) or not isinstance(rot_dim, (int, np.integer)) or rot_dim < 2 or rot_dim % 2:
        raise ValueError(f"rot_dim must be an even integer >= 2, got {rot_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float, np.integer, np.floating)) \
            or not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"rope base (rope_theta) must be a finite number > 1, got {base!r}")
    base = float(base)
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
    return cos_sin_table(rope_inv_freq(rot_dim, base, scaling), max_positions)


_TABLE_CHUNK = 1 << 14  # positions per float64 block: bounds the temporaries whatever the table length


def cos_sin_table(inv_freq: np.ndarray, max_positions: int) -> np.ndarray:
    """float32 [max_positions, 2 len(inv_freq)] cos/sin rows, built block by block so the float64
    angles never exist for the whole table at once (peak memory is the float32 result)."""
    if isinstance(max_positions, bool) or not isinstance(max_positions, (int, np.integer)) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive integer, got {max_positions!r}")
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    half = inv_freq.shape[0]
    table = np.empty((int(max_positions), 2 * half), dtype=np.float32)
    for start in range(0, int(max_positions), _TABLE_CHUNK):
        stop = min(start + _TABLE_CHUNK, int(max_positions))
        angles = np.arange(start, stop, dtype=np.float64)[:, None] * inv_freq[None, :]
        table[start:stop, :half] = np.cos(angles)
        table[start:stop, half:] = np.sin(angles)
    return table


def _positive(scaling: dict, key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} needs {key!r}")
    v = scaling[key]
    # float() would also take "8" or True; a config that spells a number that way is damaged.
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"rope scaling {key} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"rope scaling {key} must be a positive number, got {scaling[key]!r}")
    return v
