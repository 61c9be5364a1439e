"""GGUF block-quantized linear layers, (de)quantization and the embedding table (cpu backend).

The Mojo kernels work directly on the GGUF blocks (mojo/quant.mojo: Q4_0 / Q4_1 / Q8_0, and FP8's F8_E4M3;
mojo/kquant.mojo: Q5_0 / Q5_1 and the k-quants Q2_K .. Q6_K, large Q4_K / Q6_K layers through
Modular's int8 kernels, see MODULAR_TYPES); a weight matrix is never expanded to float32. Every
entry point here checks shapes, dtypes, contiguity and index ranges and raises a one-line
ValueError before any buffer address reaches Mojo.

    QuantLinear(w).forward(x[T, K] f32)     -> [T, N] f32      y = x @ W.T, W [N, K] quantized
        forward(x, dot=...) picks the arithmetic: "auto" (default), "float", "int8" or an int8 path
    QuantLinear.concat([a, b, ...])         -> one layer whose rows are a's, then b's, ...
    quantize(x[..., K] f32, qtype)          -> uint8 [..., K/32 * block_bytes]  (== gguf.quants.quantize;
                                               Q4_0 / Q4_1 / Q8_0)
    dequantize(raw uint8, qtype, shape)     -> float32 of `shape`               (== gguf.quants.dequantize)
    EmbeddingTable(w).lookup(ids[T] int)    -> [T, D] f32     rows of a float or block-quantized table

Dot products (QuantLinear.forward's `dot`, default from MOJOLLM_QUANT_DOT, else "auto"; Q4_0 / Q4_1 /
Q8_0 / Q5_0 / Q5_1, the k-quants stay float32 apart from MODULAR_TYPES; F8_E4M3 is always float32:
its codes are no integers):
    "float"   activations stay float32 (the reference; every T)
    "int8"    activations quantized per 32-block to int8 + a float32 scale, once per call, and
              integer dot products on the host's best int8 path (every T: above 8 rows the
              weights are streamed once per 8 rows)
    a path    "vnni512" | "vnni256" | "avx2" | "generic": int8 on that instruction set (those
              this build has: int8_paths(); for tests and measurements)
    "auto"    int8 for T <= 8 (decode), float for the GEMM above (prefill)
The int8 paths differ from float by the activations' rounding (per block, at most dx/2 per
element), as llama.cpp's Q8_0/Q8_1 activations do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mojollm.kernels.build import kernel_loader
from mojollm.kernels.checks import check_array
from mojollm.weights import BLOCK_BYTES, BLOCK_SIZE, FLOAT_TYPES, WeightTensor

# ggml's GGMLQuantizationType values, the type codes the Mojo module expects.
TYPE_CODES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
TYPE_CODES["W8A8"] = 101  # not ggml's: Q8_0's blocks with per-token int8 activations (mojo/quant.mojo)
# not ggml's (its codes end below 40): FP8 E4M3 blocks (mojollm.fp8), always float32 activations
TYPE_CODES["F8_E4M3"] = 100
_BLOCKS_OF = {"W8A8": "Q8_0"}  # a type whose blocks are another's: (de)quantize and gather as that one
QUANT_TYPES = tuple(BLOCK_BYTES)
QUANTIZE_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the types quantize() writes
KQUANT_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # kernels in mojo/kquant.mojo
# Q4_K / Q6_K layers whose rows come in multiples of 32 are also repacked at load for Modular's
# int8 kernels (mojo/kquant.mojo's modular_matmul: activations quantized to int8 per 256, as
# llama.cpp does), which beat the float32 kernels (bench/RESULTS.md, "CPU kernels: k-quants") on
# layers of a few MiB at every T, and on small layers from 4 rows (prefill, batches: a single row
# on a small layer is faster on one core than Modular's kernel, which always wakes every core).
# Layers from MODULAR_MIN_BYTES keep only Modular's layout; smaller ones keep both. A float
# default_dot() at load (MOJOLLM_QUANT_DOT=float, set_default_dot) keeps every layer on the float32
# kernels.
MODULAR_TYPES = ("Q4_K", "Q6_K")
MODULAR_MIN_BYTES = 2 << 20
MODULAR_MIN_ROWS = 4
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}




_kernels = kernel_loader("quant")
_kquant_kernels = kernel_loader("kquant")


def _module(qtype: str):
    """The loader of the kernel module for a type: kquant for Q5_0 / Q5_1 and the k-quants, quant
    for the others. kquant's matmul takes the dot-product code for Q5_0 / Q5_1 (int8 activations on
    quant.mojo's GEMV, as Q4_0 / Q4_1); the k-quants ignore it (float32 activations)."""
    return _kquant_kernels if qtype in KQUANT_TYPES else _kernels

# mojo/quant.mojo's PATH_* codes.
DOT_CODES = {"auto": -1, "float": 0, "generic": 1, "avx2": 2, "vnni256": 3, "vnni512": 4}
_DOT_NAMES = {v: k for k, v in DOT_CODES.items()}
DOT_ENV = "MOJOLLM_QUANT_DOT"
_default_dot_code: int | None = None
_default_dot_set: str | None = None


def int8_paths() -> list[str]:
    """The int8 dot-product paths this host's build of the kernels has, the default first."""
    return [_DOT_NAMES[int(c)] for c in _kernels().int8_paths()]


def dot_code(dot: str) -> int:
    """The kernel's code for `dot` ("auto", "float", "int8" or a path of int8_paths())."""
    if dot == "int8":
        return DOT_CODES[int8_paths()[0]]
    if dot in ("auto", "float"):
        return DOT_CODES[dot]
    paths = int8_paths()
    if dot not in paths:
        known = ", ".join(["auto", "float", "int8", *paths])
        why = " (not built for this host's instruction set)" if dot in DOT_CODES else ""
        raise ValueError(f"unknown dot product {dot!r}{why}: expected one of {known}")
    return DOT_CODES[dot]


def default_dot() -> int:
    """The code of the process-wide default: set_default_dot's, else MOJOLLM_QUANT_DOT's (read
    once), else auto."""
    global _default_dot_code
    if _default_dot_code is None:
        value = os.environ.get(DOT_ENV, "").strip() or "auto"
        try:
            _default_dot_code = dot_code(value)
        except ValueError as e:
            raise ValueError(f"{DOT_ENV}: {e}") from None
    return _default_dot_code


def set_default_dot(dot: str | None) -> str | None:
    """Make `dot` the default of every QuantLinear.forward without its own `dot` (None: back to
    MOJOLLM_QUANT_DOT / auto); returns the previous setting's name (None if it came from there).
    For tests and measurements that must run a whole model one way."""
    global _default_dot_code, _default_dot_set
    previous = _default_dot_set
    _default_dot_code = None if dot is None else dot_code(dot)
    _default_dot_set = dot
    return previous


def _check_qtype(qtype: str, allowed: Sequence[str] = QUANT_TYPES) -> str:
    if qtype not in allowed:
        raise ValueError(f"unsupported type {qtype!r}: expected one of {', '.join(allowed)}")
    return qtype


def _check_row_length(k: int, what: str, block: int) -> None:
    if k <= 0 or k % block:
        raise ValueError(f"{what} must be a positive multiple of {block} (the block size), got {k}")


def _block_data(w: WeightTensor, rows: int, k: int) -> np.ndarray:
    """The tensor's blocks as a C-contiguous uint8 [rows, k/block * block_bytes] array (no copy
    when the loader's view already is one, e.g. a slice of the memory-mapped GGUF file)."""
    want = (rows, k // BLOCK_SIZE[w.qtype] * BLOCK_BYTES[w.qtype])
    data = np.asarray(w.data)
    if data.dtype != np.uint8 or data.shape != want:
        raise ValueError(f"tensor {w.name}: {w.qtype} data must be uint8 of shape {want}, got {data.dtype} {data.shape}")
    return np.ascontiguousarray(data)


def _check_e4m3(name: str, blocks: np.ndarray) -> None:
    codes = blocks.reshape(blocks.shape[0], -1, BLOCK_BYTES["F8_E4M3"])[:, :, 2:]
    if ((codes & 0x7F) == 0x7F).any():
        raise ValueError(f"tensor {name}: F8_E4M3 blocks hold NaN codes (0x7F / 0xFF)")


class QuantLinear:
    """y = x @ W.T for a GGUF-quantized W [out_features, in_features], computed on the blocks."""

    def __init__(self, w: WeightTensor):
        if not isinstance(w, WeightTensor):
            raise ValueError(f"QuantLinear needs a WeightTensor, got {type(w).__name__}")
        self.qtype = _check_qtype(w.qtype)
        if len(w.shape) != 2:
            raise ValueError(f"tensor {w.name}: a linear weight must be 2-D [out, in], got shape {w.shape}")
        n, k = (int(s) for s in w.shape)
        if n <= 0:
            raise ValueError(f"tensor {w.name}: needs at least one output row, got shape {w.shape}")
        _check_row_length(k, f"tensor {w.name}: row length (in_features)", BLOCK_SIZE[self.qtype])
        self.name = w.name
        self.out_features = n
        self.in_features = k
        self._data = _block_data(w, n, k)
        if self.qtype == "F8_E4M3":  # the kernel decodes NaN codes as numbers: refuse them here
            _check_e4m3(w.name, self._data)
        self._addr = self._data.ctypes.data  # cached: .ctypes costs ~1 us per call
        self._code = TYPE_CODES[self.qtype]
        self._kernels = _module(self.qtype)
        self._modular = None  # the blocks in Modular's layout, when its kernel runs this layer
        self._packed = False  # True: only Modular's layout is kept (no GGUF blocks to read)
        if self.qtype in MODULAR_TYPES and n % 32 == 0 and default_dot() != DOT_CODES["float"]:
            self._modular = np.empty_like(self._data)
            self._kernels().modular_pack(self._code, self._addr, self._modular.ctypes.data, self._modular.shape)
            self._modular_addr = self._modular.ctypes.data
            if self._modular.nbytes >= MODULAR_MIN_BYTES:  # only forward reads them from here on
                self._data = self._addr = None
                self._packed = True
        self.parts: tuple[int, ...] = (n,)  # out_features of the layers fused into this one

    def _blocks(self) -> np.ndarray:
        if self._packed:
            raise ValueError(f"{self.name}: its {self.qtype} blocks were repacked for Modular's int8 kernel at "
                             f"load; load with {DOT_ENV}=float (or set_default_dot('float')) to keep them")
        return self._data

    @property
    def data(self) -> np.ndarray:
        """The blocks, uint8 [out_features, in_features/block * block_bytes] (read-only view)."""
        view = self._blocks().view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        return int((self._modular if self._packed else self._data).nbytes)

    @property
    def weight(self) -> WeightTensor:
        return WeightTensor(self.name, (self.out_features, self.in_features), self.qtype, self._blocks())

    def forward(self, x: np.ndarray, max_threads: int = 0, dot: str | None = None) -> np.ndarray:
        """x float32 [T, in_features] (C-contiguous) -> float32 [T, out_features].
        max_threads > 0 caps the work items (1 = the calling thread only; for measurements).
        dot: "auto" | "float" | "int8" | an int8 path (module docstring); None: default_dot()."""
        check_array("x", x, np.float32, ndim=2)
        t, k = x.shape
        if k != self.in_features:
            raise ValueError(f"x has {k} features but {self.name} expects {self.in_features}")
        code = default_dot() if dot is None else dot_code(dot)
        y = np.empty((t, self.out_features), dtype=np.float32)
        if t and self._modular is not None and (self._packed or t >= MODULAR_MIN_ROWS):
            # Modular's int8 kernel (the per-call dot choice does not apply: chosen at load)
            self._kernels().modular_matmul(self._code, self._modular_addr, x.ctypes.data, y.ctypes.data,
                                           (t, self.out_features, k))
        elif t:
            self._kernels().matmul(self._code, self._addr, x.ctypes.data, y.ctypes.data,
                                   (t, self.out_features, k, max(0, int(max_threads)), code))
        return y

    __call__ = forward

    def dequantize(self) -> np.ndarray:
        """The weights as float32 [out_features, in_features] (for references and debugging)."""
        return dequantize(self._blocks(), self.qtype, (self.out_features, self.in_features))

    @classmethod
    def concat(cls, linears: Sequence["QuantLinear"], name: str | None = None) -> "QuantLinear":
        """One layer computing all of `linears` in a single call (e.g. q/k/v or gate/up): their
        rows stacked in order; split the output with `parts`. Blocks are self-contained, so
        stacking the raw bytes is exact."""
        linears = list(linears)
        if not linears or not all(isinstance(l, QuantLinear) for l in linears):
            raise ValueError("concat needs a non-empty sequence of QuantLinear layers")
        qtypes = {l.qtype for l in linears}
        if len(qtypes) != 1:
            raise ValueError(f"concat needs one quantization type, got {sorted(qtypes)}")
        ks = {l.in_features for l in linears}
        if len(ks) != 1:
            raise ValueError(f"concat needs one in_features, got {sorted(ks)}")
        data = np.concatenate([l._blocks() for l in linears], axis=0)
        n = int(data.shape[0])
        fused = cls(WeightTensor(name or "+".join(l.name for l in linears), (n, ks.pop()), qtypes.pop(), data))
        fused.parts = tuple(p for l in linears for p in l.parts)
        return fused

    def __repr__(self) -> str:
        return f"QuantLinear({self.name!r}, {self.qtype}, out={self.out_features}, in={self.in_features})"


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., K/32 * block_bytes] GGUF blocks, bit-identical to
    gguf.quants.quantize for Q4_0, Q4_1 and Q8_0."""
    _check_qtype(qtype, QUANTIZE_TYPES)
    check_array("x", x, np.float32)
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the row)")
    k = int(x.shape[-1])
    _check_row_length(k, "x's last axis", BLOCK_SIZE[qtype])
    if not np.isfinite(x).all():
        raise ValueError("x must be finite: NaN or inf cannot be block-quantized")
    rows = x.size // k
    out = np.empty(x.shape[:-1] + (k // BLOCK_SIZE[qtype] * BLOCK_BYTES[qtype],), dtype=np.uint8)
    if rows:
        _kernels().quantize(TYPE_CODES[qtype], x.ctypes.data, out.ctypes.data, (rows, k))
    return out


def dequantize(raw: np.ndarray, qtype: str, shape: Sequence[int]) -> np.ndarray:
    """uint8 GGUF blocks -> float32 of logical `shape` (last axis K), bit-identical to
    gguf.quants.dequantize. `raw` holds the rows' blocks in order (any shape, C-contiguous);
    pass a slice of rows to dequantize only those."""
    _check_qtype(qtype)
    check_array("raw", raw, np.uint8)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of non-negative sizes, got {shape}")
    k = shape[-1]
    _check_row_length(k, "shape's last axis", BLOCK_SIZE[qtype])
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    need = rows * (k // BLOCK_SIZE[qtype]) * BLOCK_BYTES[qtype]
    if raw.size != need:
        raise ValueError(f"{qtype} {shape} needs {need} bytes of blocks, raw has {raw.size}")
    out = np.empty(shape, dtype=np.float32)
    if rows:
        _module(qtype)().dequantize(TYPE_CODES[_BLOCKS_OF.get(qtype, qtype)], raw.ctypes.data, out.ctypes.data, (rows, k))
    return out


class EmbeddingTable:
    """Token embeddings [vocab, D] of any supported type; lookup dequantizes only the rows asked for."""

    def __init__(self, w: WeightTensor):
        if not isinstance(w, WeightTensor):
            raise ValueError(f"EmbeddingTable needs a WeightTensor, got {type(w).__name__}")
        self.qtype = _check_qtype(w.qtype, FLOAT_TYPES + QUANT_TYPES)
        if len(w.shape) != 2 or w.shape[0] <= 0 or w.shape[1] <= 0:
            raise ValueError(f"tensor {w.name}: an embedding table must be 2-D [vocab, dim], got shape {w.shape}")
        self.name = w.name
        self.vocab_size, self.dim = (int(s) for s in w.shape)
        if self.qtype in QUANT_TYPES:
            _check_row_length(self.dim, f"tensor {w.name}: embedding dim", BLOCK_SIZE[self.qtype])
            self._data = _block_data(w, self.vocab_size, self.dim)
        else:
            data = np.asarray(w.data)
            want = np.dtype(_FLOAT_DTYPES[self.qtype])
            if data.dtype != want or data.shape != tuple(w.shape):
                raise ValueError(f"tensor {w.name}: {self.qtype} data must be {want.name} of shape {w.shape}, "
                                 f"got {data.dtype} {data.shape}")
            self._data = np.ascontiguousarray(data)
        self._addr = self._data.ctypes.data
        self._code = TYPE_CODES[_BLOCKS_OF.get(self.qtype, self.qtype)]

    @property
    def data(self) -> np.ndarray:
        view = self._data.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """ids integer [T] in [0, vocab) -> float32 [T, dim]."""
        if not isinstance(ids, np.ndarray):
            raise ValueError(f"ids must be a numpy integer array, got {type(ids).__name__}")
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D [T], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers (int32), got {ids.dtype}")
        t = int(ids.shape[0])
        out = np.empty((t, self.dim), dtype=np.float32)
        if t == 0:
            return out
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for {self.name} (vocab size {self.vocab_size})")
        ids32 = np.ascontiguousarray(ids, dtype=np.int32)
        _module(self.qtype)().embedding(self._code, self._addr, ids32.ctypes.data, out.ctypes.data, (t, self.dim))
        return out

    __call__ = lookup

    def __repr__(self) -> str:
        return f"EmbeddingTable({self.name!r}, {self.qtype}, vocab={self.vocab_size}, dim={self.dim})"
