"""FP8 E4M3 weights: encode / decode in numpy, per-output-channel quantization, and our F8_E4M3
blocks. The checkpoint format that carries them is mojollm.models.compressed_tensors.

E4M3 (OCP FP8, torch.float8_e4m3fn): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. No
infinities; 0x7F / 0xFF are NaN; the largest finite value is 448; subnormals are m/8 * 2^-6.

Our blocks (mojollm.weights, type "F8_E4M3"; not a ggml type, kernel code 100): 32 weights along
a row in 34 bytes, a float16 scale d then 32 E4M3 codes, w = d * e4m3(q). The cpu kernels are in
mojo/quant.mojo; the cuda kernel reads the same bytes.

Per-channel quantization (what vLLM / llm-compressor FP8 checkpoints hold): one scale per output
row, s = amax(row) / 448, q = e4m3(w / s). Every block of a row then carries the same d = s. We
round s up to a float16 value (and at least 2^-14, float16's smallest normal, so a row of tiny
weights keeps 11 significant scale bits), so blocks and checkpoint scales convert both ways
without loss. A checkpoint scale that is not a float16 value (to_blocks) is rounded to one and
the codes are re-encoded against it (a change of at most 2^-12 of each weight's size, which
almost never moves a code).
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
QK = 32  # weights per block
BLOCK_BYTES = 2 + QK
MIN_SCALE = 2.0 ** -14  # float16's smallest normal
_CHUNK = 1 << 22  # elements per step of the float64 encoder (bounds its temporaries)


def _table() -> np.ndarray:
    """float32 value of every code 0..255 (NaN for 0x7F / 0xFF)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(c & 0x80, -mag, mag)
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


DECODE_TABLE = _table()


def decode(codes: np.ndarray) -> np.ndarray:
    """uint8 E4M3 codes -> float32 (exact), any shape."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"E4M3 codes must be uint8, got {codes.dtype}")
    return DECODE_TABLE[codes]


def _encode64(x: np.ndarray) -> np.ndarray:
    """float64 -> E4M3 codes, round to nearest even, saturating at +-448 (x finite)."""
    a = np.abs(x)
    # the binade of |x| (at least the smallest normal one, 2^-6: subnormals share its spacing);
    # frexp is exact where log2 could round up across a power of two
    _, ex = np.frexp(np.maximum(a, 2.0 ** -6))
    ulp = np.ldexp(1.0, ex - 4)  # 3 mantissa bits
    r = np.minimum(np.round(a / ulp) * ulp, E4M3_MAX)  # np.round: half to even; exact in float64
    # r is an E4M3 value: its code is exponent << 3 | mantissa, which for subnormals (exponent 0)
    # is r / 2^-9, and continues into the normals (r = 2^-6 is code 8)
    mant, ex = np.frexp(np.maximum(r, 2.0 ** -6))
    normal = ((ex + 6) << 3) + np.round((mant * 2 - 1) * 8).astype(np.int64)
    code = np.where(r < 2.0 ** -6, np.round(r * 2.0 ** 9).astype(np.int64), normal)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def encode(x: np.ndarray) -> np.ndarray:
    """Float array -> uint8 E4M3 codes of the same shape: round to nearest even, values beyond
    +-448 saturate to +-448 (as torch.clamp(x, -448, 448).to(torch.float8_e4m3fn)); -0.0 keeps
    its sign. NaN and inf are refused."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"encode takes a float array, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("encode: x must be finite (NaN or inf has no E4M3 weight)")
    flat = x.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for i in range(0, flat.size, _CHUNK):
        out[i:i + _CHUNK] = _encode64(flat[i:i + _CHUNK].astype(np.float64))
    return out.reshape(x.shape)


def _f16_scale(s: np.ndarray) -> np.ndarray:
    """float16 scales >= s (and >= MIN_SCALE), the nearest ones from above."""
    s = np.maximum(np.asarray(s, np.float64), MIN_SCALE)
    if not np.isfinite(s).all() or s.max(initial=0) > np.finfo(np.float16).max:
        raise ValueError("a scale is beyond float16's range (weights of magnitude above ~2.9e7, or not finite)")
    d = s.astype(np.float16)
    low = d.astype(np.float64) < s
    d[low] = np.nextafter(d[low], np.float16(np.inf))
    return d


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w float [N, K] -> (codes uint8 [N, K], scales float32 [N], each a float16 value):
    per output row s = amax / 448 (rounded up to float16, at least MIN_SCALE), q = e4m3(w / s)."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize_per_channel takes a float [out, in] matrix, got {w.dtype} of shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quantize_per_channel: the weights must be finite")
    amax = np.abs(w).max(axis=1, initial=0.0).astype(np.float64)
    d = _f16_scale(amax / E4M3_MAX)
    codes = np.empty(w.shape, np.uint8)
    rows = max(1, _CHUNK // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        part = w[r:r + rows].astype(np.float64) / d[r:r + rows, None].astype(np.float64)
        codes[r:r + rows] = _encode64(part)
    return codes, d.astype(np.float32)


def to_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] and one scale per row ([N] or [N, 1], float16 values) -> F8_E4M3 blocks
    uint8 [N, K/32 * 34]. A scale that is not a float16 value is rounded to one and that row's
    codes are re-encoded against it (see the module docstring)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be uint8 [out, in], got {codes.dtype} of shape {codes.shape}")
    n, k = codes.shape
    if k % QK:
        raise ValueError(f"the row length {k} is not a multiple of {QK} (the F8_E4M3 block)")
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.full(n, s[0])
    if s.shape != (n,):
        raise ValueError(f"expected one scale per row ({n}) or one for the tensor, got shape {np.shape(scales)}")
    if not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError("the scales must be positive finite numbers")
    if ((codes & 0x7F) == 0x7F).any():
        raise ValueError("the E4M3 codes hold NaN (0x7F / 0xFF)")
    if s.max() > np.finfo(np.float16).max:
        raise ValueError("a scale is beyond float16's range")
    d = np.maximum(s, MIN_SCALE).astype(np.float16)  # the nearest float16 (>= 2^-14)
    redo = d.astype(np.float64) != s
    if redo.any():
        exact = decode(codes[redo]).astype(np.float64) * s[redo, None]  # float64: exact products
        codes = codes.copy()
        codes[redo] = _encode64(exact / d[redo, None].astype(np.float64))
    out = np.empty((n, k // QK, BLOCK_BYTES), np.uint8)
    out[:, :, :2] = d.view(np.uint8).reshape(n, 1, 2)
    out[:, :, 2:] = codes.reshape(n, k // QK, QK)
    return out.reshape(n, k // QK * BLOCK_BYTES)


def from_blocks(blocks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """F8_E4M3 blocks uint8 [N, K/32 * 34] -> (codes uint8 [N, K], scales float32 [N]). Every block
    of a row must carry the same scale (per-channel blocks, as quantize_per_channel makes)."""
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or k % QK or blocks.shape[1] != k // QK * BLOCK_BYTES:
        raise ValueError(f"F8_E4M3 blocks of rows of {k} must be uint8 [out, {k // QK * BLOCK_BYTES}], "
                         f"got {blocks.dtype} of shape {blocks.shape}")
    b = blocks.reshape(blocks.shape[0], k // QK, BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0]
    if (d != d[:, :1]).any():
        raise ValueError("the blocks of a row carry different scales: not per-channel FP8 (no HF checkpoint form)")
    return np.ascontiguousarray(b[:, :, 2:]).reshape(-1, k), d[:, 0].astype(np.float32)


def blocks_to_float32(blocks: np.ndarray, shape) -> np.ndarray:
    """F8_E4M3 blocks -> float32 weights of `shape` (last axis K): float32(d * e4m3(q)), as the
    kernels compute them."""
    shape = tuple(int(s) for s in shape)
    k = shape[-1]
    b = np.asarray(blocks, np.uint8).reshape(-1, k // QK, BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).astype(np.float32)  # [rows, nb, 1]
    return (decode(b[:, :, 2:]) * d).reshape(shape)


def quantize_blocks(w: np.ndarray) -> np.ndarray:
    """float [N, K] -> per-channel F8_E4M3 blocks uint8 [N, K/32 * 34]."""
    codes, scales = quantize_per_channel(w)
    return to_blocks(codes, scales)
