"""Weight quantization (pure numpy): GGUF's 32-weight block formats Q8_0 / Q4_0 / Q4_1, and integer
grids of 2/3/4/8 bits with groups of 32/64/128 weights or one per row (GPTQ / AWQ checkpoints).

    rtn(w[N, K], qtype | grid)                      -> Quantized | IntQuantized   round to nearest
    gptq(w[N, K], h[K, K], qtype | grid, ...)       -> Quantized | IntQuantized   GPTQ (Frantar et al. 2022)
    awq_search([w_i[N_i, K]], x[T, K], qtype | grid) -> s[K] f32   AWQ (Lin et al. 2023) per-channel scales
    layer_error(w, wq, x)                           -> float       ||x wq^T - x w^T||^2 / ||x w^T||^2

    Quantized(qtype, d, m, q).dequantize()   -> float32 [N, K], what gguf.quants.dequantize gives
    Quantized.gguf_blocks()                  -> uint8 [N, K/32 * block_bytes], GGUF's layout
    Quantized.from_gguf_blocks(raw, qtype)   -> the inverse of gguf_blocks
    IntQuantized(grid, scales, zeros, q).dequantize() -> float32 [N, K] = scale * (q - zero)

The GGUF formats (per block of 32 consecutive weights of a row; f16 values little-endian):
    Q8_0  d f16, q int8 [-127, 127]            w = d * q                 34 bytes: d, q[0..31]
    Q4_0  d f16, q 4-bit [0, 15]               w = d * (q - 8)           18 bytes: d, 16 nibble bytes
    Q4_1  d f16, m f16, q 4-bit [0, 15]        w = d * q + m             20 bytes: d, m, 16 nibble bytes
Nibble byte i (0..15) holds q[i] in its low and q[i + 16] in its high four bits.

A Grid(bits, group_size, symmetric) is what GPTQ / AWQ checkpoints store: codes q in [0, 2^bits - 1],
w = scale * (q - zero) with an f16 scale and an integer zero per group of group_size consecutive
weights of a row (-1: the whole row; the last group of a row may be shorter). Asymmetric: the range
[min(w, 0), max(w, 0)] over 2^bits - 1 steps, zero = round(-min / scale) (0 is always a code).
Symmetric: zero = 2^(bits-1) and llama.cpp's Q4_0 rule, scale = (the weight of largest |w|) / -2^(bits-1),
so that weight is exact (the scale may be negative); 8 bits use Q8_0's scale = max|w| / 127 instead
(codes -127..127 around the zero, as int8 kernels want).

RTN on qtypes repeats llama.cpp's float32 operations in the same order (quantize_row_q*_ref), so its
bytes equal gguf's. GPTQ works in float64; its group scales (d, m) are rounded to float16 before any
code is chosen, so the encoded blocks dequantize to exactly the weights GPTQ assumed when it
propagated each column's error. Grids use the same float64 rule in rtn and gptq. Inputs are checked
up front: a bad shape, a row length K that is not a multiple of 32, a non-finite value or a scale
beyond float16 raises a one-line ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # weights per block (every format here)
QTYPES = ("Q8_0", "Q4_0", "Q4_1")
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}
_F16_MAX = float(np.finfo(np.float16).max)
_RTN_CHUNK = 1 << 22  # elements per RTN slab (bounds the float32 temporaries on large tables)


# ----------------------------------------------------------------------------------------------
# checks


def _check_qtype(qtype) -> str:
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(QTYPES)}, got {qtype!r}")
    return qtype


def _check_weight(w, what: str = "w") -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{what} must be a 2-D weight matrix [N, K], got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"{what} must hold real numbers, got dtype {w.dtype}")
    k = w.shape[1]
    if k % QK != 0:
        raise ValueError(f"{what}: row length K={k} is not a multiple of {QK} "
                         f"(Q8_0 / Q4_0 / Q4_1 blocks hold {QK} weights of a row)")
    if w.size and not np.isfinite(w).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return w


def _check_activations(x, k: int, what: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"{what} must be [tokens, K={k}] activations, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what} must hold real numbers, got dtype {x.dtype}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return x


def _to_f16(v: np.ndarray, what: str) -> np.ndarray:
    """float16 of block scales; a value beyond float16's range is an error, not an infinity."""
    if v.size and np.abs(v).max() > _F16_MAX:  # (rounds to inf in float16)
        big = float(np.abs(v).max())
        with np.errstate(over="ignore"):
            overflow = bool(np.isinf(np.float16(big)))
        if overflow:
            raise ValueError(f"block {what} {big:.6g} exceeds float16's range (max {_F16_MAX:g}): "
                             f"weights too large for GGUF's f16 block scales")
    return v.astype(np.float16)


# ----------------------------------------------------------------------------------------------
# the quantized matrix


@dataclass
class Quantized:
    """One weight matrix W [N, K] (K a multiple of 32) in a GGUF block format."""

    qtype: str  # "Q8_0" | "Q4_0" | "Q4_1"
    d: np.ndarray  # [N, K//32] float16
    m: np.ndarray | None  # [N, K//32] float16 (Q4_1) else None
    q: np.ndarray  # [N, K] uint8 (Q4_*: 0..15) or int8 (Q8_0)

    def __post_init__(self):
        _check_qtype(self.qtype)
        if self.q.ndim != 2 or self.q.shape[1] % QK:
            raise ValueError(f"q must be [N, K] with K a multiple of {QK}, got shape {self.q.shape}")
        n, k = self.q.shape
        want = np.int8 if self.qtype == "Q8_0" else np.uint8
        if self.q.dtype != want:
            raise ValueError(f"{self.qtype} codes must be {np.dtype(want).name}, got {self.q.dtype}")
        if self.d.shape != (n, k // QK) or self.d.dtype != np.float16:
            raise ValueError(f"d must be float16 [{n}, {k // QK}], got {self.d.dtype} {self.d.shape}")
        if (self.m is not None) != (self.qtype == "Q4_1"):
            raise ValueError(f"m is {'required' if self.qtype == 'Q4_1' else 'not used'} for {self.qtype}")
        if self.m is not None and (self.m.shape != self.d.shape or self.m.dtype != np.float16):
            raise ValueError(f"m must be float16 {self.d.shape}, got {self.m.dtype} {self.m.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        """Size of the GGUF blocks."""
        n, k = self.q.shape
        return n * (k // QK) * BLOCK_BYTES[self.qtype]

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], with gguf.quants.dequantize's float32 operations (so exactly its values)."""
        n, k = self.q.shape
        nb = k // QK
        d = self.d.astype(np.float32).reshape(n, nb, 1)
        q = self.q.reshape(n, nb, QK)
        if self.qtype == "Q8_0":
            out = d * q.astype(np.float32)
        elif self.qtype == "Q4_0":
            out = d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
        else:
            out = (d * q.astype(np.float32)) + self.m.astype(np.float32).reshape(n, nb, 1)
        return out.reshape(n, k)

    def gguf_blocks(self) -> np.ndarray:
        """uint8 [N, (K//32) * block_bytes]: each row's blocks in GGUF's layout."""
        n, k = self.q.shape
        nb = k // QK
        parts = [self.d.astype("<f2").reshape(n, nb, 1).view(np.uint8)]
        if self.qtype == "Q8_0":
            parts.append(self.q.reshape(n, nb, QK).view(np.uint8))
        else:
            if self.m is not None:
                parts.append(self.m.astype("<f2").reshape(n, nb, 1).view(np.uint8))
            q = self.q.reshape(n, nb, 2, QK // 2)
            parts.append((q[:, :, 0, :] & np.uint8(0x0F)) | (q[:, :, 1, :] << np.uint8(4)))
        return np.concatenate(parts, axis=-1).reshape(n, nb * BLOCK_BYTES[self.qtype])

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, qtype: str) -> "Quantized":
        """The inverse of gguf_blocks: raw uint8 [N, nb * block_bytes] -> Quantized."""
        _check_qtype(qtype)
        raw = np.ascontiguousarray(raw)
        bb = BLOCK_BYTES[qtype]
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % bb:
            raise ValueError(f"{qtype} blocks must be uint8 [N, nb * {bb}], got {raw.dtype} {raw.shape}")
        n, nb = raw.shape[0], raw.shape[1] // bb
        b = raw.reshape(n, nb, bb)
        d = b[:, :, 0:2].copy().view("<f2").reshape(n, nb).astype(np.float16)
        if qtype == "Q8_0":
            return cls(qtype, d, None, b[:, :, 2:].copy().view(np.int8).reshape(n, nb * QK))
        off = 4 if qtype == "Q4_1" else 2
        m = b[:, :, 2:4].copy().view("<f2").reshape(n, nb).astype(np.float16) if qtype == "Q4_1" else None
        nib = b[:, :, off:]
        q = np.concatenate([nib & np.uint8(0x0F), nib >> np.uint8(4)], axis=-1)
        return cls(qtype, d, m, q.reshape(n, nb * QK))


GRID_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    """An integer quantization grid: `bits` per code, one (scale, zero) per `group_size` weights of a
    row (-1: per output channel, the whole row), symmetric (zero fixed at 2^(bits-1)) or not."""

    bits: int
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in GRID_BITS or isinstance(self.bits, bool):
            raise ValueError(f"bits must be one of {', '.join(map(str, GRID_BITS))}, got {self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not (g == -1 or (g > 0 and g % QK == 0)):
            raise ValueError(f"group_size must be -1 (per output channel) or a positive multiple of {QK}, got {g!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, k: int) -> int:
        """Weights per group in a row of k."""
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        return -(-k // self.group(k)) if k else 0


@dataclass
class IntQuantized:
    """One weight matrix W [N, K] on an integer grid: w = scales * (q - zeros), per group of a row."""

    grid: Grid
    scales: np.ndarray  # [N, G] float16
    zeros: np.ndarray  # [N, G] uint8, 0..2^bits (a GPTQ v1 checkpoint can say 2^bits)
    q: np.ndarray  # [N, K] uint8, 0..2^bits - 1

    def __post_init__(self):
        n, k = self.q.shape
        want = (n, self.grid.num_groups(k))
        if self.scales.shape != want or self.scales.dtype != np.float16 or self.zeros.shape != want:
            raise ValueError(f"scales / zeros must be [{want[0]}, {want[1]}] (float16 / integers), got "
                             f"{self.scales.dtype} {self.scales.shape} and {self.zeros.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: scale * (q - zero), exact in float32 (an f16 times an integer below 2^9)."""
        n, k = self.q.shape
        gs = self.grid.group(k)
        s = np.repeat(self.scales.astype(np.float32), gs, axis=1)[:, :k]
        z = np.repeat(self.zeros.astype(np.int16), gs, axis=1)[:, :k]
        return s * (self.q.astype(np.int16) - z).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# RTN: llama.cpp's rule in its float32 operations


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32 (gguf.quants.np_roundf)."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.sign(x) * (fl + np.floor(2 * (a - fl)))


def _rtn_blocks(b: np.ndarray, qtype: str):
    """b float32 [..., 32] -> (d f32 [..., 1], m f32 [..., 1] | None, codes [..., 32])."""
    f32 = np.float32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if qtype == "Q8_0":
            d = np.abs(b).max(axis=-1, keepdims=True) / f32(127)
            inv = np.where(d == 0, f32(0), f32(1) / d).astype(f32)
            return d, None, _roundf(b * inv).astype(np.int8)
        if qtype == "Q4_0":
            imax = np.abs(b).argmax(axis=-1)[..., None]  # first element of largest |w|
            d = np.take_along_axis(b, imax, axis=-1) / f32(-8)
            inv = np.where(d == 0, f32(0), f32(1) / d).astype(f32)
            q = np.clip(np.trunc(b * inv + f32(8.5)), 0, 15).astype(np.uint8)
            return d, None, q
        mx = b.max(axis=-1, keepdims=True)
        mn = b.min(axis=-1, keepdims=True)
        d = (mx - mn) / f32(15)
        inv = np.where(d == 0, f32(0), f32(1) / d).astype(f32)
        q = np.clip(np.trunc((b - mn) * inv + f32(0.5)), 0, 15).astype(np.uint8)
        return d, mn, q


def rtn(w: np.ndarray, qtype):
    """Round to nearest with llama.cpp's rule; bytes identical to gguf.quants.quantize.

    Q8_0: d = amax / 127, q = roundf(w / d). Q4_0: d = max / -8 (max: the signed weight of largest
    |w|), q = min(15, trunc(w / d + 8.5)). Q4_1: d = (max - min) / 15, m = min,
    q = min(15, trunc((w - min) / d + 0.5)). All in float32; d and m are then stored as float16.
    A Grid: each group's params by the grid rule (module docstring), nearest codes, in float64."""
    if isinstance(qtype, Grid):
        return _rtn_grid(_check_weight(w), qtype)
    _check_qtype(qtype)
    w = _check_weight(w)
    n, k = w.shape
    nb = k // QK
    d = np.empty((n, nb), np.float16)
    m = np.empty((n, nb), np.float16) if qtype == "Q4_1" else None
    q = np.empty((n, k), np.int8 if qtype == "Q8_0" else np.uint8)
    rows = max(1, _RTN_CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        b = w[r0:r1].astype(np.float32, copy=False).reshape(r1 - r0, nb, QK)
        bd, bm, bq = _rtn_blocks(b, qtype)
        d[r0:r1] = _to_f16(bd.reshape(r1 - r0, nb), "scale d")
        if m is not None:
            m[r0:r1] = _to_f16(bm.reshape(r1 - r0, nb), "minimum m")
        q[r0:r1] = bq.reshape(r1 - r0, k)
    return Quantized(qtype, d, m, q)


def _rtn_grid(w: np.ndarray, grid: Grid) -> IntQuantized:
    """Round to nearest on a grid, one group of columns at a time (vectorised over rows)."""
    n, k = w.shape
    gs, ng = grid.group(k), grid.num_groups(k)
    scales = np.empty((n, ng), np.float16)
    zeros = np.empty((n, ng), np.uint8)
    q = np.empty((n, k), np.uint8)
    rows = max(1, _RTN_CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        wt = w[r0:r0 + rows].astype(np.float64).T  # [K, rows]: a group's columns on axis 0, as gptq has them
        for g in range(ng):
            cols = wt[g * gs:(g + 1) * gs]
            d, z = _group_params(cols, grid)
            c, _ = _encode(cols, d, z, grid)
            scales[r0:r0 + rows, g] = d
            zeros[r0:r0 + rows, g] = z
            q[r0:r0 + rows, g * gs:(g + 1) * gs] = c.T
    return IntQuantized(grid, scales, zeros, q)


# ----------------------------------------------------------------------------------------------
# GPTQ


def _grid_params(g: np.ndarray, grid: Grid):
    """(scale, zero) [..., N] as float64 values (scale a float16) of a group g [..., gs, N]: the rule
    in the module docstring. A group of zeros gets scale 1 (any scale codes it exactly)."""
    if grid.symmetric:
        z = float(1 << (grid.bits - 1))
        if grid.bits == 8:
            d = np.abs(g).max(axis=-2) / 127.0
        else:
            imax = np.abs(g).argmax(axis=-2)[..., None, :]
            d = np.take_along_axis(g, imax, axis=-2)[..., 0, :] / -z
        d = _to_f16(d, "scale").astype(np.float64)
        d[d == 0] = 1.0
        return d, np.full(d.shape, z)
    lo = np.minimum(g.min(axis=-2), 0.0)
    hi = np.maximum(g.max(axis=-2), 0.0)
    d = _to_f16((hi - lo) / grid.maxq, "scale").astype(np.float64)
    d[d == 0] = 1.0
    return d, np.clip(np.rint(-lo / d), 0, grid.maxq)


def _group_params(g: np.ndarray, qtype):
    """Group params from float64 weights g [..., 32, N] (the group's columns on axis -2):
    llama.cpp's rule, rounded to float16 and returned as float64 (d [..., N], m [..., N] | None).
    A Grid: (scale, zero), _grid_params."""
    if isinstance(qtype, Grid):
        return _grid_params(g, qtype)
    if qtype == "Q8_0":
        d = np.abs(g).max(axis=-2) / 127.0
        return _to_f16(d, "scale d").astype(np.float64), None
    if qtype == "Q4_0":
        imax = np.abs(g).argmax(axis=-2)[..., None, :]
        d = np.take_along_axis(g, imax, axis=-2)[..., 0, :] / -8.0
        return _to_f16(d, "scale d").astype(np.float64), None
    mx = g.max(axis=-2)
    mn = g.min(axis=-2)
    d = _to_f16((mx - mn) / 15.0, "scale d").astype(np.float64)
    return d, _to_f16(mn, "minimum m").astype(np.float64)


def _encode(w: np.ndarray, d: np.ndarray, m: np.ndarray | None, qtype):
    """Nearest codes of float64 weights w [N] for float16-valued params d, m [N] (a Grid: scale d,
    zero m); returns (codes float64, the weights they dequantize to, float64)."""
    if isinstance(qtype, Grid):
        q = np.clip(np.rint(w / d) + m, 0, qtype.maxq)
        return q, d * (q - m)  # exact: an f16 times a small integer
    dz = d == 0
    ds = np.where(dz, 1.0, d)
    if qtype == "Q8_0":
        q = np.clip(np.rint(w / ds), -127, 127)
        q[dz] = 0
        return q, d * q  # exact: an f16 times a small integer
    if qtype == "Q4_0":
        q = np.clip(np.rint(w / ds) + 8, 0, 15)
        q[dz] = 8
        return q, d * (q - 8)
    q = np.clip(np.rint((w - m) / ds), 0, 15)
    q[dz] = 0
    # Q4_1 dequantizes as float32(d * q) + m in float32: the sum may round, so repeat it
    wq = (d.astype(np.float32) * q.astype(np.float32) + m.astype(np.float32)).astype(np.float64)
    return q, wq


def _tril_inv(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by blocks (about K^3/3 flops; numpy has no trtri)."""
    n = L.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(L))
    h = n // 2
    a = _tril_inv(L[:h, :h])
    b = _tril_inv(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h] = a
    out[h:, h:] = b
    out[h:, :h] = -(b @ (L[h:, :h] @ a))
    return out


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """U upper-triangular with U^T U = H^-1 (GPTQ's Hinv = cholesky(cholesky_inverse(chol H), upper)).

    With J the reversal, J H J = L L^T gives H = R R^T for the upper R = J L J, so
    H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J: one Cholesky and one triangular inverse."""
    L = np.linalg.cholesky(H[::-1, ::-1])
    return np.ascontiguousarray(_tril_inv(L)[::-1, ::-1])


def gptq(w: np.ndarray, h: np.ndarray, qtype, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False):
    """GPTQ (Frantar et al. 2022) of W [N, K] on H = X^T X [K, K] (float64; X the calibration inputs).

    As the reference implementation (gptq.py fasterquant), in float64: dead columns (H[i,i] == 0)
    get H[i,i] = 1 and weight 0; H += percdamp * mean(diag H) * I; U = upper Cholesky factor of
    H^-1; columns are quantized in order (act_order: by descending diag H) in lazy batches of
    block_size, each column's error (w - q) / U[i,i] propagated through U's row to the columns after
    it (within the batch at once, to later batches by one matmul per batch).

    Group params (d, and m for Q4_1) of each 32-column group follow llama.cpp's rule and are rounded
    to float16 before codes are chosen (the nearest code for each weight), so the blocks dequantize
    to exactly the weights GPTQ assumed. Without act_order they come from the current, updated
    weights of the group when its first column is reached (within the batch too); with act_order
    the groups are static: all computed up front from the original W, each column keeping its
    original 32-column group. If H + damping is not positive definite (percdamp=0 on a singular H)
    the damping is raised tenfold (from 1e-6 * mean diag when percdamp is 0), up to four times.

    A Grid: the same, with its groups (scale and zero by the grid rule) and an IntQuantized result.
    A lazy batch is widened to whole groups, so a group's params see every update before its first
    column (the reference reads the batch-start weights there); a per-channel group is the original
    row (the reference's find_params before the loop)."""
    grid = qtype if isinstance(qtype, Grid) else None
    if grid is None:
        _check_qtype(qtype)
    w = _check_weight(w)
    n, k = w.shape
    h = np.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"h must be the [K, K] = [{k}, {k}] matrix X^T X of the layer's inputs, got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.floating) and not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"h must hold real numbers, got dtype {h.dtype}")
    if h.size and not np.isfinite(h).all():
        raise ValueError("h holds NaN or infinite values")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size <= 0 or block_size % QK:
        raise ValueError(f"block_size must be a positive multiple of {QK} (whole groups per batch), got {block_size!r}")
    if not np.isfinite(percdamp) or percdamp < 0:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    gs = QK if grid is None else grid.group(k)
    nb = -(-k // gs) if k else 0
    if grid is not None and gs < k:
        block_size = -(-block_size // gs) * gs
    if n == 0 or k == 0:
        return rtn(np.zeros((n, k), np.float32), qtype)

    W = np.array(w, dtype=np.float64).T.copy()  # [K, N]: column j of W is the contiguous row W[j]
    H = np.array(h, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0

    D = np.empty((nb, n))  # group params as float64 values of float16s, [group, row]
    M = np.empty((nb, n)) if qtype == "Q4_1" or grid is not None else None
    if act_order:
        for j in range(0, k, gs):  # static groups, from the original W
            D[j // gs], mg = _group_params(W[j:j + gs], qtype)
            if M is not None:
                M[j // gs] = mg
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[perm]
        H = H[perm][:, perm]
    else:
        perm = np.arange(k)

    base = float(np.mean(np.diag(H)))
    damp = percdamp * base
    for attempt in range(5):
        Hd = H.copy()
        Hd[np.diag_indices(k)] += damp
        try:
            U = _inverse_cholesky_upper(Hd)
            if np.isfinite(U).all():
                break
        except np.linalg.LinAlgError:
            pass
        if attempt == 4:
            raise ValueError("GPTQ: X^T X plus damping is not positive definite (raise percdamp)")
        damp = damp * 10 if damp > 0 else 1e-6 * base

    codes = np.empty((k, n))  # in processing order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        Err1 = np.empty((i2 - i1, n))
        for i in range(i2 - i1):
            j = i1 + i
            g = perm[j] // gs
            if not act_order and j % gs == 0:
                D[g], mg = _group_params(W[j:j + gs], qtype)  # current weights: the group is in this batch
                if M is not None:
                    M[g] = mg
            wj = W1[i]
            q, wq = _encode(wj, D[g], None if M is None else M[g], qtype)
            codes[j] = q
            err = (wj - wq) / U1[i, i]
            Err1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
        if i2 < k:
            W[i2:] -= U[i1:i2, i2:].T @ Err1

    q = np.empty((n, k), np.int8 if qtype == "Q8_0" else np.uint8)
    q[:, perm] = codes.T
    if grid is not None:
        return IntQuantized(grid, np.ascontiguousarray(D.T.astype(np.float16)),
                            np.ascontiguousarray(M.T.astype(np.uint8)), q)
    d = D.T.astype(np.float16)  # exact: D holds float16 values
    m = M.T.astype(np.float16) if M is not None else None
    return Quantized(qtype, np.ascontiguousarray(d), None if m is None else np.ascontiguousarray(m), q)


# ----------------------------------------------------------------------------------------------
# AWQ


def _awq_scales(act: np.ndarray, alpha: float) -> np.ndarray:
    """s = act^alpha normalised to sqrt(max * min) = 1, as float32 (the value the caller folds)."""
    s = act ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def awq_search(ws: list[np.ndarray], x: np.ndarray, qtype, grid: int = 20,
               max_tokens: int = 512) -> np.ndarray:
    """AWQ (Lin et al. 2023): per-input-channel scales s [K] (float32) for linears ws (each [N_i, K])
    that share the input x [tokens, K].

    For alpha in {0, 1/grid, ..., (grid-1)/grid}: s = mean_tokens(|x|)^alpha, normalised by
    sqrt(max(s) * min(s)) (channels whose mean is below 1e-5 of the largest are raised to that);
    each W_i diag(s) is quantized by rtn and the loss is
        sum_i || x diag(1/s) Q(W_i diag(s))^T - x W_i^T ||_F^2
    over at most max_tokens evenly spaced tokens of x (the mean uses all of them). The s of least
    loss is returned (ties to the smaller alpha); alpha = 0 gives s = 1, plain RTN, so the result
    is never worse than that on these tokens. The caller scales W_i by s and folds 1/s into the op
    producing x. qtype may be a Grid (rtn on that grid)."""
    if not isinstance(qtype, Grid):
        _check_qtype(qtype)
    if isinstance(ws, np.ndarray):
        ws = [ws]
    if len(ws) == 0:
        raise ValueError("awq_search needs at least one weight matrix")
    ws = [_check_weight(w, f"ws[{i}]") for i, w in enumerate(ws)]
    k = ws[0].shape[1]
    for i, w in enumerate(ws):
        if w.shape[1] != k:
            raise ValueError(f"ws[{i}] has K={w.shape[1]} but ws[0] has K={k}: the linears must share their input")
    x = _check_activations(x, k)
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    ones = np.ones(k, np.float32)
    if k == 0 or x.shape[0] == 0:
        return ones
    x64 = x.astype(np.float64)
    act = np.abs(x64).mean(axis=0)
    if act.max() == 0:
        return ones
    act = np.maximum(act, act.max() * 1e-5)
    t = x64.shape[0]
    if t > max_tokens:
        x64 = x64[np.linspace(0, t - 1, max_tokens).round().astype(np.int64)]
    xs = x64.astype(np.float32)
    w64 = [w.astype(np.float64) for w in ws]

    best_loss, best_s = np.inf, ones
    for a in range(grid):
        s = ones if a == 0 else _awq_scales(act, a / grid)
        s64 = s.astype(np.float64)
        loss = 0.0
        for wi in w64:
            scaled = (wi * s64).astype(np.float32)  # == float32 W * float32 s, as the caller does
            e = rtn(scaled, qtype).dequantize().astype(np.float64) / s64 - wi
            y = xs @ e.astype(np.float32).T
            loss += float(np.square(y, dtype=np.float64).sum())
        if loss < best_loss:
            best_loss, best_s = loss, s
    return best_s


# ----------------------------------------------------------------------------------------------


def layer_error(w: np.ndarray, wq: np.ndarray, x: np.ndarray) -> float:
    """Relative output error || x wq^T - x w^T ||_F^2 / || x w^T ||_F^2 (float64)."""
    w = np.asarray(w, dtype=np.float64)
    wq = np.asarray(wq, dtype=np.float64)
    if w.ndim != 2 or wq.shape != w.shape:
        raise ValueError(f"w and wq must be matrices of one shape, got {w.shape} and {wq.shape}")
    x = _check_activations(x, w.shape[1]).astype(np.float64)
    num = float(np.square(x @ (wq - w).T).sum())
    den = float(np.square(x @ w.T).sum())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den
