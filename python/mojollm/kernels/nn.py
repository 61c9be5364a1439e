"""Elementwise and normalisation ops of the cpu backend (Mojo kernels in mojo/nn.mojo).

Every function checks shapes, dtypes, contiguity and index ranges and raises a one-line
ValueError before any buffer address is handed to Mojo: the kernels themselves trust their
inputs, so a bad call must never get that far.

    rms_norm(x[..., K], weight[K], eps)              -> [..., K]
    add_rms_norm(x, residual, weight, eps)           -> (rms_norm(residual + x), residual)  residual updated in place
    add(a[..., N], b[..., N] | b[N])                 -> a + b
    silu_mul(gate_up[..., 2F])                       -> silu(gate_up[..., :F]) * gate_up[..., F:]
    softmax(x[..., N])                               -> softmax over the last axis
    rope(x[T, H, D], positions[T] int32, cos_sin[P, R], neox) -> x rotated in place
"""

from __future__ import annotations


import numpy as np

from mojollm.kernels.build import kernel_loader
from mojollm.kernels.checks import check_array, check_float




_kernels = kernel_loader("nn")


def _rows(x: np.ndarray, name: str) -> tuple[int, int]:
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {x.shape}")
    n = int(x.shape[-1])
    return x.size // n, n


# ---- ops ----


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    check_array("x", x, np.float32)
    check_array("weight", weight, np.float32, ndim=1)
    rows, n = _rows(x, "x")
    if weight.shape[0] != n:
        raise ValueError(f"weight has {weight.shape[0]} elements but x rows have {n}")
    e = check_float("eps", eps)
    out = np.empty_like(x)
    if rows:
        _kernels().rms_norm((x.ctypes.data, weight.ctypes.data, out.ctypes.data, rows, n), e)
    return out


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """residual <- residual + x (in place); returns (rms_norm(residual), residual)."""
    check_array("x", x, np.float32)
    check_array("residual", residual, np.float32, writable=True)
    check_array("weight", weight, np.float32, ndim=1)
    if x.shape != residual.shape:
        raise ValueError(f"x {x.shape} and residual {residual.shape} must have the same shape")
    if np.may_share_memory(x, residual):  # both are C-contiguous: overlapping bounds = shared
        raise ValueError("x and residual must not share memory")
    rows, n = _rows(x, "x")
    if weight.shape[0] != n:
        raise ValueError(f"weight has {weight.shape[0]} elements but x rows have {n}")
    e = check_float("eps", eps)
    out = np.empty_like(x)
    if rows:
        _kernels().add_rms_norm((x.ctypes.data, residual.ctypes.data, weight.ctypes.data, out.ctypes.data, rows, n), e)
    return out, residual


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for same-shape arrays, or a[..., N] + b[N] (a bias broadcast over rows)."""
    check_array("a", a, np.float32)
    check_array("b", b, np.float32)
    rows, n = _rows(a, "a")
    if b.shape == a.shape:
        stride = n
    elif b.ndim == 1 and b.shape[0] == n:
        stride = 0
    else:
        raise ValueError(f"b must have shape {a.shape} or ({n},), got {b.shape}")
    out = np.empty_like(a)
    if rows:
        _kernels().add((a.ctypes.data, b.ctypes.data, out.ctypes.data, rows, n, stride))
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """silu(g) * u where g, u are the first and second halves of the last axis."""
    check_array("gate_up", gate_up, np.float32)
    rows, n = _rows(gate_up, "gate_up")
    if n % 2:
        raise ValueError(f"gate_up's last axis must be even (gate and up halves), got {n}")
    f = n // 2
    out = np.empty(gate_up.shape[:-1] + (f,), dtype=np.float32)
    if rows:
        _kernels().silu_mul((gate_up.ctypes.data, out.ctypes.data, rows, f))
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (max-subtracted, so large logits do not overflow)."""
    check_array("x", x, np.float32)
    rows, n = _rows(x, "x")
    out = np.empty_like(x)
    if rows:
        _kernels().softmax((x.ctypes.data, out.ctypes.data, rows, n))
    return out


def rope(x: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x[T, H, D] in place by the angles of `positions` and return it.

    cos_sin[P, R] (mojollm.models.rope.rope_cos_sin): row p = [cos(p f_0..f_{R/2-1}), sin(...)].
    The first R features of each head rotate (R < D: partial rotary). neox=True pairs feature i
    with i + R/2 (HF rotate_half); neox=False pairs 2i with 2i + 1 (llama.cpp GGUF llama models).
    """
    check_array("x", x, np.float32, ndim=3, writable=True)
    check_array("positions", positions, np.int32, ndim=1)
    check_array("cos_sin", cos_sin, np.float32, ndim=2)
    t, h, d = x.shape
    if positions.shape[0] != t:
        raise ValueError(f"positions has {positions.shape[0]} entries but x has {t} tokens")
    max_pos, rot = cos_sin.shape
    if rot < 2 or rot % 2 or rot > d:
        raise ValueError(f"cos_sin's rotary width {rot} must be even, >= 2 and <= head_dim {d}")
    if t and h:
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_pos:
            raise ValueError(f"positions must lie in [0, {max_pos}) (rows of cos_sin), got [{lo}, {hi}]")
        _kernels().rope((x.ctypes.data, positions.ctypes.data, cos_sin.ctypes.data, t, h, d, rot), bool(neox))
    return x
