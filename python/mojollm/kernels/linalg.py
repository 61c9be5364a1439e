"""Dense linear algebra on the cpu backend: f32 GEMM and float-weight linear layers (mojo/linalg.mojo).

    gemm(a[M, K] f32, b[K, N] f32)             -> c[M, N] f32
    DenseLinear(w).forward(x[T, K] f32)         -> y[T, N] f32     y = x @ W.T, W [N, K] F32/F16/BF16
    DenseLinear.concat([a, b, ...])             -> one layer whose rows are a's, then b's (fused q/k/v)
    DenseLinear.stack([wq, wk, wv])             -> the same, straight from WeightTensors

A DenseLinear packs its weight once, at construction, into the layout the Mojo micro-kernel
reads: panels of NR output rows, k-major inside a panel (`packed[p, k, j] = W[p*NR + j, k]`,
rows past N zero). Both the GEMM path (T > 4 tokens) and the GEMV path (T <= 4, decode) read that
one copy, so the weights are never held twice.

Weight dtypes stay as loaded: BF16 (uint16 bits) and F16 are widened to f32 in registers, so
decode streams half the bytes of f32. F16 is *not* converted at load: converting to f32 would
double its memory and GEMV time, and converting to bf16 would drop 3 mantissa bits; every x86-64
CPU with AVX2 converts f16 -> f32 in one instruction (vcvtph2ps).

Every entry point checks dtype, shape and C-contiguity and raises a one-line ValueError before
any address reaches Mojo.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import numpy as np

from mojollm.kernels.build import kernel_loader
from mojollm.kernels.checks import check_array
from mojollm.weights import FLOAT_TYPES, WeightTensor

# Weight dtype codes of mojo/linalg.mojo (WT_*), and the numpy dtype each is stored as.
_WEIGHT_CODES = {"F32": 0, "BF16": 1, "F16": 2}
_WEIGHT_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(np.uint16), "F16": np.dtype(np.float16)}
_ALIGN = 64  # bytes: packed panels and scratch start on a cache line (no split vector loads)


_kernels = kernel_loader("linalg")


class _Config:
    """The Mojo module's blocking constants, read once."""

    def __init__(self):
        nr, mr, ws_floats, tasks, gemv_max_t, simd_width = (int(v) for v in _kernels().config())
        self.nr, self.mr, self.ws_floats, self.tasks = nr, mr, ws_floats, tasks
        self.gemv_max_t, self.simd_width = gemv_max_t, simd_width


_config: _Config | None = None


def config() -> _Config:
    """NR (panel width), MR (micro-tile rows), scratch floats per task, tasks per call, GEMV_MAX_T,
    f32 SIMD width W."""
    global _config
    if _config is None:
        _config = _Config()
    return _config


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


_scratch = threading.local()


def _workspace_addr() -> int:
    """Per-thread packing scratch for the GEMM path (reused: a fresh buffer would page-fault)."""
    addr = getattr(_scratch, "addr", None)
    if addr is None:
        cfg = config()
        _scratch.buf = _aligned_empty((cfg.ws_floats * cfg.tasks,), np.float32)
        addr = _scratch.addr = _scratch.buf.ctypes.data
    return addr


def _addr(a: np.ndarray) -> int:
    """Address of a (validated, non-empty, C-contiguous) array's data. ctypes' from_buffer costs
    ~0.2 us where `a.ctypes.data` costs ~1.5 us: it counts on the decode path (~200 calls/token)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty buffer
        return a.ctypes.data


def _threads(max_threads) -> int:
    if isinstance(max_threads, bool) or not isinstance(max_threads, (int, np.integer)) or max_threads < 0:
        raise ValueError(f"max_threads must be a non-negative int (0 = all cores), got {max_threads!r}")
    return int(max_threads)


def gemm(a: np.ndarray, b: np.ndarray, max_threads: int = 0) -> np.ndarray:
    """C = A @ B for float32 row-major A [M, K] and B [K, N] (both C-contiguous).
    max_threads > 0 caps the tasks (1 = the calling thread only; for measurements)."""
    check_array("a", a, np.float32, 2)
    check_array("b", b, np.float32, 2)
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(f"gemm shape mismatch: a is {a.shape}, b is {b.shape} (a's columns must equal b's rows)")
    n = b.shape[1]
    threads = _threads(max_threads)
    if k == 0:
        return np.zeros((m, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    if m and n:
        _kernels().gemm(_addr(a), _addr(b), _addr(c), (m, n, k, _workspace_addr(), threads))
    return c


def fma_peak_gflops(threads: int = 0, iters: int = 2_000_000, repeats: int = 3) -> float:
    """Attainable f32 FLOP/s of this machine (GFLOP/s, best of `repeats`): a register-only FMA
    loop in Mojo on `threads` threads (0 = one per core). The roofline ceiling for GEMM."""
    import time

    tasks = _threads(threads) or config().tasks
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    best = 0.0
    for _ in range(repeats + 1):  # the first run wakes the worker threads
        t0 = time.perf_counter()
        flops = _kernels().fma_peak(iters, tasks)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def _weight_rows(w: WeightTensor) -> np.ndarray:
    """The weight as a 2-D [N, K] array of its storage dtype (float32 / float16 / uint16)."""
    if not isinstance(w, WeightTensor):
        raise ValueError(f"DenseLinear needs a WeightTensor, got {type(w).__name__}")
    if w.qtype not in FLOAT_TYPES:
        raise ValueError(f"tensor {w.name}: DenseLinear takes {', '.join(FLOAT_TYPES)} weights, got {w.qtype} "
                         "(quantized weights go to mojollm.kernels.quant.QuantLinear)")
    if len(w.shape) != 2 or w.shape[0] <= 0 or w.shape[1] <= 0:
        raise ValueError(f"tensor {w.name}: a linear weight must be 2-D [out, in] with both sizes > 0, got shape {w.shape}")
    n, k = (int(s) for s in w.shape)
    data = np.asarray(w.data)
    want = _WEIGHT_DTYPES[w.qtype]
    if data.dtype != want or data.size != n * k:
        raise ValueError(f"tensor {w.name}: {w.qtype} data must be {want.name} with {n * k} elements, "
                         f"got {data.dtype} of shape {data.shape}")
    return data.reshape(n, k)


def _bf16_order(nr: int, w: int) -> np.ndarray:
    """Column order of a bf16 panel row: in each chunk of 2W columns, memory slot 2j holds column
    j and slot 2j+1 column W + j, so one 32-bit lane widens to both with a shift and a mask."""
    j = np.arange(w)
    chunk = np.stack([j, w + j], axis=1).reshape(-1)  # slot -> column within a 2W chunk
    return np.concatenate([c * 2 * w + chunk for c in range(nr // (2 * w))])


def _pack(rows: np.ndarray, nr: int, w: int) -> np.ndarray:
    """[N, K] -> [ceil(N/NR), K, NR] panels (zero rows past N), 64-byte aligned; bf16 (uint16)
    rows in the pair-interleaved column order of `_bf16_order`."""
    n, k = rows.shape
    full, rest = divmod(n, nr)
    panels = full + (rest > 0)
    src = rows
    if rest:
        src = np.zeros((panels * nr, k), dtype=rows.dtype)
        src[:n] = rows
    src = src.reshape(panels, nr, k)
    if rows.dtype == np.uint16:
        src = src[:, _bf16_order(nr, w), :]
    packed = _aligned_empty((panels, k, nr), rows.dtype)
    packed[...] = src.transpose(0, 2, 1)
    return packed


def _unpack(packed: np.ndarray, n: int, w: int) -> np.ndarray:
    panels, k, nr = packed.shape
    rows = np.empty((panels, nr, k), dtype=packed.dtype)
    order = _bf16_order(nr, w) if packed.dtype == np.uint16 else np.arange(nr)
    rows[:, order, :] = packed.transpose(0, 2, 1)
    return np.ascontiguousarray(rows.reshape(panels * nr, k)[:n])


class DenseLinear:
    """y = x @ W.T for a float weight W [out_features, in_features] (F32, F16 or BF16)."""

    def __init__(self, w: WeightTensor):
        rows = _weight_rows(w)
        self.name = w.name
        self.qtype = w.qtype
        self.out_features, self.in_features = rows.shape
        self._packed = _pack(rows, config().nr, config().simd_width)
        self._addr = self._packed.ctypes.data  # cached: .ctypes costs ~1 us per call
        self._code = _WEIGHT_CODES[self.qtype]
        self.parts: tuple[int, ...] = (self.out_features,)  # out_features of the layers fused into this one

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (includes the zero rows padding N to a multiple of NR)."""
        return int(self._packed.nbytes)

    @property
    def weight(self) -> WeightTensor:
        """The weight back in its loaded form ([N, K], storage dtype; a copy)."""
        return WeightTensor(self.name, (self.out_features, self.in_features), self.qtype,
                            _unpack(self._packed, self.out_features, config().simd_width))

    def forward(self, x: np.ndarray, max_threads: int = 0) -> np.ndarray:
        """x float32 [T, in_features] (C-contiguous) -> float32 [T, out_features].
        max_threads > 0 caps the tasks (1 = the calling thread only; for measurements)."""
        check_array("x", x, np.float32, 2)
        t, k = x.shape
        if k != self.in_features:
            raise ValueError(f"x has {k} features but {self.name} expects {self.in_features}")
        threads = _threads(max_threads)
        y = np.empty((t, self.out_features), dtype=np.float32)
        if t:
            _kernels().linear(_addr(x), self._addr, _addr(y),
                              (t, self.out_features, k, self._code, _workspace_addr(), threads))
        return y

    __call__ = forward

    def to_float32(self) -> np.ndarray:
        """The weights as float32 [out_features, in_features] (references and debugging)."""
        return self.weight.to_float32()

    @classmethod
    def stack(cls, weights: Sequence[WeightTensor], name: str | None = None) -> "DenseLinear":
        """One layer computing all of `weights` (each [N_i, K]) in a single call, rows stacked in
        order; split the output with `parts`. Mixed dtypes are widened to F32 (exact)."""
        weights = list(weights)
        if not weights:
            raise ValueError("stack needs a non-empty sequence of WeightTensors")
        rows = [_weight_rows(w) for w in weights]
        ks = {r.shape[1] for r in rows}
        if len(ks) != 1:
            raise ValueError(f"stack needs one in_features, got {sorted(ks)}")
        qtypes = {w.qtype for w in weights}
        if len(qtypes) == 1:
            qtype = qtypes.pop()
            data = np.concatenate(rows, axis=0)
        else:
            qtype = "F32"
            data = np.concatenate([w.to_float32().reshape(r.shape) for w, r in zip(weights, rows)], axis=0)
        fused = cls(WeightTensor(name or "+".join(w.name for w in weights), tuple(data.shape), qtype, data))
        fused.parts = tuple(int(r.shape[0]) for r in rows)
        return fused

    @classmethod
    def concat(cls, linears: Sequence["DenseLinear"], name: str | None = None) -> "DenseLinear":
        """Fuse already-built layers (e.g. q/k/v or gate/up) into one; see `stack`."""
        linears = list(linears)
        if not linears or not all(isinstance(l, DenseLinear) for l in linears):
            raise ValueError("concat needs a non-empty sequence of DenseLinear layers")
        fused = cls.stack([l.weight for l in linears], name=name or "+".join(l.name for l in linears))
        fused.parts = tuple(p for l in linears for p in l.parts)
        return fused

    def __repr__(self) -> str:
        return f"DenseLinear({self.name!r}, {self.qtype}, out={self.out_features}, in={self.in_features})"
