"""FP8 E4M3 weights: encode / decode in numpy, per-output-channel quantization, our F8_E4M3
blocks, and the Hugging Face checkpoint format.

E4M3 (OCP FP8, torch.float8_e4m3fn): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. No
infinities; 0x7F / 0xFF are NaN; the largest finite value is 448; subnormals are m/8 * 2^-6.

Our blocks (mojollm.weights, type "F8_E4M3"; not a ggml type, kernel code 100): 32 weights along
a row in 34 bytes, a float16 scale d then 32 E4M3 codes, w = d * e4m3(q). The cpu kernels are in
mojo/quant.mojo; the cuda kernel reads the same bytes.

Per-channel quantization (what vLLM / llm-compressor FP8 checkpoints hold): one scale per output
row, s = amax(row) / 448, q = e4m3(w / s). Every block of a row then carries the same d = s. We
round s up to a float16 value (and at least 2^-14, float16's smallest normal, so a row of tiny
weights keeps 11 significant scale bits), so blocks and checkpoint scales convert both ways
without loss.

The HF format (compressed-tensors "float-quantized", channel strategy, weights only; vLLM runs it
as its W8A16 FP8 scheme, transformers through its compressed-tensors integration):
    <linear>.weight        F8_E4M3 [out, in]
    <linear>.weight_scale  F32 [out, 1]         w = weight_scale * e4m3(weight)
    config.json "quantization_config": hf_quantization_config()
Loading also takes per-tensor scales ([] or [1]: compressed-tensors' "tensor" strategy, or
quant_method "fp8" checkpoints). A checkpoint scale that is not a float16 value is rounded to
one and the codes are re-encoded against it (a change of at most 2^-12 of each weight's size,
which almost never moves a code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mojollm.weights import WeightTensor

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


# ---------------------------------------------------------------- the HF checkpoint format


def hf_quantization_config(ignore: list[str] | None = None) -> dict[str, Any]:
    """config.json's quantization_config for per-channel FP8 weights, float activations."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": list(ignore if ignore is not None else ["lm_head"]), "kv_cache_scheme": None,
            "global_compression_ratio": None}


def is_hf_fp8(config: dict) -> bool:
    """Whether a config.json's quantization_config describes FP8 E4M3 weights we load (False
    without one, or for another method such as GPTQ); a one-line ValueError for an FP8 / a
    compressed-tensors config we cannot take, with its reason."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict):
        return False
    method = q.get("quant_method")
    if method == "fp8":  # vLLM's / transformers' Fp8Config: per-tensor scales, or 2-D blocks
        if q.get("weight_block_size") is not None:
            raise ValueError(f"FP8 with weight_block_size {q['weight_block_size']} (block-wise scales) is not "
                             "supported: per-channel or per-tensor scales only")
        return True
    if method != "compressed-tensors":
        return False
    fmt = q.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (FP8 weights: float-quantized)")
    if q.get("kv_cache_scheme"):
        raise ValueError("a quantized KV cache (kv_cache_scheme) is not supported")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise ValueError(f"config group {name!r} has no weights scheme")
        if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("symmetric") is False or w.get("dynamic"):
            raise ValueError(f"config group {name!r}: weights {w.get('type')}/{w.get('num_bits')} bits are not static "
                             "symmetric FP8 (float, 8 bits)")
        if (w.get("strategy") or "tensor") not in ("channel", "tensor"):
            raise ValueError(f"config group {name!r}: FP8 weight strategy {w.get('strategy')!r} is not supported "
                             "(channel or tensor)")
    return True


def holds(name: str, tensor: Any, fp8_config: bool) -> bool:
    """Whether the HF loader hands this checkpoint tensor to hf_weights: every F8_E4M3 tensor (read
    as uint8 arrays) and, in an FP8 checkpoint, the scales."""
    if isinstance(tensor, np.ndarray) and tensor.dtype == np.uint8:
        return True
    return fp8_config and name.endswith((".weight_scale", ".input_scale"))


def blocks_from_hf(name: str, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A checkpoint's F8_E4M3 weight [out, in] (uint8 view) and its weight_scale ([out, 1], [out],
    [1] or []) -> our blocks; a one-line ValueError naming the tensor when they do not fit."""
    try:
        if codes.ndim != 2:
            raise ValueError(f"an FP8 weight must be 2-D [out, in], got shape {codes.shape}")
        s = np.asarray(scale, np.float32)
        if s.size not in (1, codes.shape[0]) or s.ndim > 2 or (s.ndim == 2 and s.shape[1] != 1):
            raise ValueError(f"weight_scale has shape {s.shape}: expected [{codes.shape[0]}, 1] (per channel) "
                             "or [1] (per tensor)")
        return to_blocks(np.ascontiguousarray(codes), s.reshape(-1))
    except ValueError as e:
        raise ValueError(f"tensor {name}: {e}") from None


def hf_weights(config: dict, parts: dict[str, Any], where: str) -> dict[str, "WeightTensor"]:
    """The FP8 linears of a HF checkpoint as F8_E4M3 WeightTensors, {HF weight name: tensor}.
    `parts`: the checkpoint's F8_E4M3 tensors (uint8 arrays [out, in]) and every `*.weight_scale`
    / `*.input_scale` tensor. input_scale (static activation scales of W8A8 checkpoints) is not
    needed: the kernels keep the activations in float32. Any defect is one ModelLoadError line."""
    from mojollm.errors import ModelLoadError
    from mojollm.weights import WeightTensor

    try:
        fp8_config = is_hf_fp8(config)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    codes = {n: a for n, a in parts.items() if isinstance(a, np.ndarray) and a.dtype == np.uint8}
    if codes and not fp8_config:
        raise ModelLoadError(f"{where}: tensor {next(iter(codes))} is F8_E4M3 but config.json has no FP8 "
                             "quantization_config (compressed-tensors float-quantized, or quant_method fp8)")
    scales = {n: a for n, a in parts.items() if n.endswith(".weight_scale")}
    out = {}
    for name, q in codes.items():
        if not name.endswith(".weight"):
            raise ModelLoadError(f"{where}: tensor {name} is F8_E4M3 but is no linear's weight")
        scale = scales.pop(name + "_scale", None)
        if scale is None:
            raise ModelLoadError(f"{where}: the FP8 weight {name} has no {name}_scale")
        s = scale.to_float32() if isinstance(scale, WeightTensor) else np.asarray(scale, np.float32)
        try:
            blocks = blocks_from_hf(name, q, s)
        except ValueError as e:
            raise ModelLoadError(f"{where}: {e}") from None
        out[name] = WeightTensor(name, tuple(int(d) for d in q.shape), "F8_E4M3", blocks)
    if scales:
        raise ModelLoadError(f"{where}: {next(iter(scales))} scales no F8_E4M3 weight")
    return out


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file; uint8 arrays are stored as F8_E4M3 codes (safetensors.numpy cannot
    name that dtype: numpy has none). Layout: u64 header length, the JSON header (padded with
    spaces to 8 bytes), then every tensor's little-endian bytes in header order."""
    import json

    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = "F8_E4M3" if a.dtype == np.uint8 else _ST_DTYPES.get(a.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {a.dtype} has no safetensors name here")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
