"""Paged attention ops of the cpu backend (Mojo kernels in mojo/attention.mojo).

    store_kv(k_cache, v_cache, k[T, KVH, D], v, slot_mapping[T] int64)        in place
    attention_prefill(q[T, H, D], k_cache, v_cache, block_tables[S, M] int32,
                      cu_seqlens_q[S+1] int32, context_lens[S] int32, scale) -> [T, H, D]
    attention_decode(q[S, H, D], k_cache, v_cache, block_tables, context_lens, scale) -> [S, H, D]

Caches are [num_blocks, B, KVH, W] in one of the KV dtypes of mojollm.kv_dtypes (layout and
causal semantics: backends/base.py): float32 / float16 / bfloat16 (uint16 bits) with W = D, int8 /
fp8 as uint8 rows of D codes and a float32 scale (W = D + 4). Every op takes `kv_dtype=`; by
default it is the cache's own (a KVCache from `kv_cache_zeros`, or read off a float32 / float16 /
uint16 array; a plain uint8 array must say int8 or fp8). q, k, v and outputs stay float32.
Every index the kernels will follow (slots, the block ids a sequence's context needs, query
counts) is range-checked here first, so a bad step plan raises ValueError instead of reading
or writing outside a buffer.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from mojollm.kernels.build import kernel_loader
from mojollm.kernels.checks import check_array, check_float
from mojollm.kv_dtypes import KV_CACHE_DTYPES, check_kv_cache_dtype, row_width

_info: dict[str, int] = {}
_buffers = threading.local()  # per-thread scratch, reused across calls (fresh pages cost faults)


_kernels = kernel_loader("attention")


def _workers() -> int:
    if "workers" not in _info:
        k = _kernels()
        _info["workers"] = int(k.workers())
        _info["rows"] = int(k.tile_rows())
    return _info["workers"]


def _buffer(name: str, floats: int) -> np.ndarray:
    """A float32 buffer of at least `floats` owned by this thread and reused by later calls:
    a fresh multi-MB np.empty per call is mmapped anew and pays a page fault per 4 KiB."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.size < floats:
        buf = np.empty(max(floats, 1), dtype=np.float32)
        setattr(_buffers, name, buf)
    return buf


def _scratch(d: int, units: int = 1) -> np.ndarray:
    """Per-worker scratch for `units` row tiles (uninitialised: the kernel writes before reading)."""
    key = f"scratch{d},{units}"
    if key not in _info:
        _info[key] = int(_kernels().scratch_per_worker(d, units))
    return _buffer("scratch", _workers() * _info[key])


def _meta(*values) -> np.ndarray:
    return np.array([int(v) for v in values], dtype=np.int64)


# the KV dtype codes of attention.mojo (KV_F32 ..) and the numpy element type each is stored in
KV_CODES = {name: i for i, name in enumerate(KV_CACHE_DTYPES)}
STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16, "int8": np.uint8, "fp8": np.uint8}
_BY_STORAGE = {np.dtype(np.float32): "float32", np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16"}


class KVCache(np.ndarray):
    """A cpu KV cache: a numpy array that carries its KV dtype (int8 and fp8 caches are both
    uint8 bytes, so the array's dtype alone cannot tell them apart)."""

    kv_dtype = "float32"

    def __array_finalize__(self, obj):
        self.kv_dtype = getattr(obj, "kv_dtype", None) or _BY_STORAGE.get(self.dtype, "float32")


def kv_cache_zeros(shape, kv_dtype: str) -> KVCache:
    """A zeroed cache [num_blocks, B, KVH, W] of `kv_dtype` (W = row_width(kv_dtype, D))."""
    c = np.zeros(shape, dtype=STORAGE[kv_dtype]).view(KVCache)
    c.kv_dtype = kv_dtype
    return c


def cache_kv_dtype(cache, kv_dtype: str | None = None) -> str:
    """The KV dtype of `cache`: `kv_dtype` when given, else the cache's own."""
    if kv_dtype is not None:
        name = check_kv_cache_dtype(kv_dtype)
        if name == "auto":
            raise ValueError("kv_dtype must name the cache's dtype, not auto")
        return name
    own = getattr(cache, "kv_dtype", None)
    if own is not None:
        return own
    dt = getattr(cache, "dtype", None)
    if dt in _BY_STORAGE:
        return _BY_STORAGE[np.dtype(dt)]
    raise ValueError(f"a {dt} KV cache needs kv_dtype= (int8 or fp8 for uint8 bytes)")


def _check_caches(k_cache, v_cache, kv_dtype: str | None = None) -> tuple[int, int, int, int, str]:
    """(num_blocks, B, KVH, D, kv dtype) of a pair of caches [num_blocks, B, KVH, W]."""
    kv = cache_kv_dtype(k_cache, kv_dtype)
    check_array("k_cache", k_cache, STORAGE[kv], ndim=4)
    check_array("v_cache", v_cache, STORAGE[kv], ndim=4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same shape")
    nb, b, kvh, w = k_cache.shape
    d = w - row_width(kv, 0)
    if min(nb, b, kvh, d) <= 0:
        raise ValueError(f"KV cache dimensions must be non-zero, got {k_cache.shape} ({kv})")
    return nb, b, kvh, d, kv


def _check_q(q, kvh: int, d: int, name: str = "q") -> tuple[int, int]:
    check_array(name, q, np.float32, ndim=3)
    t, h, qd = q.shape
    if qd != d:
        raise ValueError(f"{name} head dim {qd} does not match the KV cache's {d}")
    if h == 0 or h % kvh:
        raise ValueError(f"{name} has {h} heads, which must be a non-zero multiple of the cache's {kvh} kv heads")
    return t, h


def _check_tables(block_tables, context_lens, n_seqs: int, nb: int, b: int) -> None:
    """context_lens fit the block tables, and every block id they reach is a real block."""
    check_array("block_tables", block_tables, np.int32, ndim=2)
    check_array("context_lens", context_lens, np.int32, ndim=1)
    if context_lens.shape[0] != n_seqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries for {n_seqs} sequences")
    if block_tables.shape[0] != n_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {n_seqs} sequences")
    if n_seqs == 0:
        return
    m = block_tables.shape[1]
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 0 or hi > m * b:
        raise ValueError(f"context_lens must lie in [0, {m * b}] ({m} blocks of {b} per table row), got [{lo}, {hi}]")
    if block_tables.size and 0 <= int(block_tables.min()) and int(block_tables.max()) < nb:
        return  # every entry is a real block (the common case: one reduction pair)
    # Entries past a sequence's context are padding and may hold anything: check only the reached ones.
    needed = (context_lens.astype(np.int64) + b - 1) // b
    used = block_tables[np.arange(m)[None, :] < needed[:, None]]
    if used.size and (int(used.min()) < 0 or int(used.max()) >= nb):
        raise ValueError(f"block_tables reach block ids [{int(used.min())}, {int(used.max())}] outside the cache's {nb} blocks")


def store_kv(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray,
             kv_dtype: str | None = None) -> None:
    """k_cache.reshape(-1, KVH, W)[slot_mapping[t]] = k[t] (and v) in the cache's dtype, in place
    (16-bit: rounded to nearest even; int8 / fp8: quantized per head row, see mojollm.kv_dtypes)."""
    nb, b, kvh, d, kv = _check_caches(k_cache, v_cache, kv_dtype)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.writeable:
            raise ValueError(f"{name} must be writable: store_kv updates it in place")
    check_array("k", k, np.float32, ndim=3)
    check_array("v", v, np.float32, ndim=3)
    check_array("slot_mapping", slot_mapping, np.int64, ndim=1)
    if k.shape != v.shape or k.shape[1:] != (kvh, d):
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [T, {kvh}, {d}] to match the cache")
    t = k.shape[0]
    if slot_mapping.shape[0] != t:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {t} tokens")
    if t == 0:
        return
    lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
    if lo < 0 or hi >= nb * b:
        raise ValueError(f"slot_mapping must lie in [0, {nb * b}) ({nb} blocks of {b}), got [{lo}, {hi}]")
    meta = _meta(k_cache.ctypes.data, v_cache.ctypes.data, k.ctypes.data, v.ctypes.data, slot_mapping.ctypes.data,
                 t, kvh * d, KV_CODES[kv], kvh)
    _kernels().store_kv(meta.ctypes.data)


def attention_prefill(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                      cu_seqlens_q: np.ndarray, context_lens: np.ndarray, scale: float,
                      kv_dtype: str | None = None) -> np.ndarray:
    """Causal attention of a varlen batch of new tokens over the paged cache (which already
    holds them: call store_kv first). Query i of sequence s sits at position
    context_lens[s] - q_len_s + i."""
    nb, b, kvh, d, kv = _check_caches(k_cache, v_cache, kv_dtype)
    t, h = _check_q(q, kvh, d)
    check_array("cu_seqlens_q", cu_seqlens_q, np.int32, ndim=1)
    n_seqs = cu_seqlens_q.shape[0] - 1
    if n_seqs < 0:
        raise ValueError("cu_seqlens_q must have S + 1 entries (it starts with 0)")
    _check_tables(block_tables, context_lens, n_seqs, nb, b)
    q_lens = np.diff(cu_seqlens_q.astype(np.int64))
    if int(cu_seqlens_q[0]) != 0 or int(cu_seqlens_q[-1]) != t or (q_lens < 0).any():
        raise ValueError(f"cu_seqlens_q must rise from 0 to T={t}, got {cu_seqlens_q.tolist()[:8]}...")
    if (q_lens > context_lens).any():
        s = int(np.argmax(q_lens > context_lens))
        raise ValueError(f"sequence {s} has {int(q_lens[s])} new tokens but context_len {int(context_lens[s])}: "
                         "context_lens must count the new tokens too")
    sc = check_float("scale", scale, positive=True)
    out = np.empty_like(q)
    if t == 0:
        return out
    scratch = _scratch(d)
    meta = _meta(q.ctypes.data, k_cache.ctypes.data, v_cache.ctypes.data, block_tables.ctypes.data,
                 cu_seqlens_q.ctypes.data, context_lens.ctypes.data, out.ctypes.data, scratch.ctypes.data,
                 t, h, kvh, d, b, n_seqs, block_tables.shape[1], _workers(), KV_CODES[kv])
    _kernels().attention_prefill(meta.ctypes.data, sc)
    return out


SPLIT_KEYS = 256  # flash-decoding: a sequence's keys are cut into chunks of about this many
MAX_SPLITS = 8


def decode_splits(context_lens: np.ndarray, workers: int, num_splits: int | None = None) -> np.ndarray:
    """Prefix sums [S + 1] (int32) of each sequence's key chunk count (flash-decoding): one per
    SPLIT_KEYS keys, at most MAX_SPLITS, one on a single worker. A count depends on that
    sequence's own context only, so a sequence's attention is the same bits whatever else the
    batch holds (speculative verify rows, other requests). num_splits: that many chunks for
    every sequence, of whole 64-key blocks (tests)."""
    lens = np.asarray(context_lens, dtype=np.int64)
    if num_splits is not None:
        counts = np.minimum(num_splits, -(-lens // 64))
    elif workers <= 1:
        counts = np.ones_like(lens)
    else:
        counts = np.clip(-(-lens // SPLIT_KEYS), 1, MAX_SPLITS)
    return np.concatenate([[0], np.cumsum(np.maximum(counts, 1))]).astype(np.int32)


def partial_floats(first: np.ndarray, units: int, h: int, kvh: int, d: int) -> int:
    """Floats of the split partials for chunk prefix sums `first`: a slot per chunk and unit."""
    return int(first[-1]) * units * min(_info["rows"], h // kvh) * (d + 2)


def attention_decode(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float, *, num_splits: int | None = None,
                     kv_dtype: str | None = None) -> np.ndarray:
    """One query per sequence (at position context_lens[s] - 1) over its paged context.
    num_splits overrides the flash-decoding chunk count (tests; default: decode_splits)."""
    nb, b, kvh, d, kv = _check_caches(k_cache, v_cache, kv_dtype)
    n_seqs, h = _check_q(q, kvh, d)
    _check_tables(block_tables, context_lens, n_seqs, nb, b)
    if n_seqs and int(context_lens.min()) < 1:
        raise ValueError("context_lens must be >= 1 in decode: the cache holds at least the new token")
    sc = check_float("scale", scale, positive=True)
    out = np.empty_like(q)
    if n_seqs == 0:
        return out
    workers = _workers()
    rows = _info["rows"]
    if num_splits is not None and int(num_splits) < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    first = decode_splits(context_lens, workers, num_splits)
    units = kvh * math.ceil((h // kvh) / rows)  # row tiles of one sequence: kv heads x group-head tiles
    partial = _buffer("partial", partial_floats(first, units, h, kvh, d))
    scratch = _scratch(d, units)
    meta = _meta(q.ctypes.data, k_cache.ctypes.data, v_cache.ctypes.data, block_tables.ctypes.data,
                 context_lens.ctypes.data, out.ctypes.data, scratch.ctypes.data, partial.ctypes.data,
                 n_seqs, h, kvh, d, b, block_tables.shape[1], first.ctypes.data, workers, KV_CODES[kv])
    _kernels().attention_decode(meta.ctypes.data, sc)
    return out


def stream_read_gbs(size_mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of the attention kernels' own thread pool streaming a buffer far
    larger than the caches: the roofline of a memory-bound decode."""
    x = np.ones(size_mib * 2**20 // 4, dtype=np.float32)
    sums = np.zeros(max(_workers(), 1) * 2, dtype=np.float32)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        n = int(_kernels().stream_read(x.ctypes.data, x.size, sums.ctypes.data))
        dt = time.perf_counter() - t0
        if i:  # the first pass pages the buffer in
            best = min(best, dt)
    if abs(float(sums.sum()) - n) > 1e-3 * n:
        raise RuntimeError("stream_read summed the wrong number of floats")
    return 4 * n / best / 1e9
