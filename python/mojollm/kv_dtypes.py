"""The KV cache's element types (`kv_cache_dtype`): names, storage layout and sizes, shared by
every backend.

Per layer a model holds (k_cache, v_cache), each [num_blocks, block_size, KVH, W]:

    float32    float32, W = D
    bfloat16   bfloat16 (numpy uint16 bits on the cpu backend), W = D
    float16    float16, W = D
    int8       uint8, W = D + 4: per (slot, head) row the D codes (int8, two's complement), then one
    fp8        little-endian float32 scale s of that token's head; value = s * code.
               int8: s = max|row| / 127, codes = round-half-even(x / s);
               fp8:  s = max|row| / 448, codes = OCP E4M3 (mojollm.fp8) of x / s, round to nearest even;
               a zero row has s = 0 and codes 0.

The scale is per token and head, not per block: blocks fill one token at a time, so a block's
scale would have to be known before its tokens. It costs 4 bytes per head row (D = 64: 68 bytes
against 256 in float32, 3.76x the tokens in the same memory).

"auto" is the backend's own choice for the model's weights (Backend.kv_cache_dtype).
"""

from __future__ import annotations

KV_CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
SCALE_BYTES = 4
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}
_STORAGE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int8": "uint8", "fp8": "uint8"}


def check_kv_cache_dtype(name) -> str:
    """`name` lower-cased if it is "auto" or a KV cache dtype; else a one-line ValueError."""
    text = str(name).strip().lower() if isinstance(name, str) else None
    if text not in ("auto",) + KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return text


def row_width(kv_dtype: str, head_dim: int) -> int:
    """W: storage elements of one (slot, head) row (bytes for int8 / fp8)."""
    return head_dim + SCALE_BYTES if kv_dtype in QUANTIZED else head_dim


def row_bytes(kv_dtype: str, head_dim: int) -> int:
    """Bytes of one (slot, head) row."""
    return row_width(kv_dtype, head_dim) * _ITEMSIZE[kv_dtype]


def storage_dtype(kv_dtype: str) -> str:
    """The element type a backend allocates: float32, bfloat16, float16 or uint8."""
    return _STORAGE[kv_dtype]


def resolve(name, backend, weight_qtype: str) -> str:
    """The KV dtype a model on `backend` gets for kv_cache_dtype=`name`: "auto" is the backend's
    choice for `weight_qtype`; an explicit dtype must be one its kernels run (one-line ValueError)."""
    name = check_kv_cache_dtype(name)
    default = backend.kv_cache_dtype(weight_qtype)
    if name == "auto" or name == default:
        return default
    extra = tuple(backend.kv_cache_dtypes()) if hasattr(backend, "kv_cache_dtypes") else ()
    runs = (default,) + tuple(d for d in extra if d != default)
    if name not in runs:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported on the {getattr(backend, 'name', '?')} backend "
                         f"(it runs: {', '.join(runs)})")
    return name
