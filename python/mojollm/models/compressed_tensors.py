"""compressed-tensors checkpoints (llm-compressor's format, which vLLM and transformers load) whose
linears are 8-bit codes with one scale per output channel: write them, and read them into our blocks.

config.json "quantization_config":
    quant_method "compressed-tensors", quantization_status "compressed", ignore ["lm_head"] (modules
    left in float), kv_cache_scheme null, format "float-quantized" | "int-quantized"
    ("naive-quantized": either, as the weights' type says), and config_groups, each
        {targets: ["Linear"], weights: args, input_activations: args | null, output_activations: null}
    args: num_bits, type ("float" | "int"), symmetric, strategy ("tensor" | "channel" | "group" |
    "block" | "token"), dynamic, group_size, block_structure, actorder, observer, observer_kwargs.
A quantized linear's tensors (symmetric schemes store no zero point; older writers stored zeros):
    <linear>.weight        F8_E4M3 | I8 [out, in]
    <linear>.weight_scale  float [out, 1] (strategy channel) or [1] / [] (tensor)   w = scale * code

The two schemes we read and write, each onto blocks of 32 weights of a row in 34 bytes (a float16
d, the row's scale, then 32 codes), so the cpu and cuda kernels run them as they are:
    fp8   float-quantized: weights float 8 bits, static, symmetric, channel or tensor. Any
          input_activations are not used: the kernels keep activations in float32. vLLM runs it as
          W8A16 FP8 (W8A8 FP8 where the config quantizes activations). Also quant_method "fp8"
          (vLLM's / transformers' Fp8Config: one scale per tensor). -> F8_E4M3 blocks (mojollm.fp8)
    w8a8  int-quantized: weights int 8 bits, static, symmetric, channel or tensor; input_activations
          int 8 bits, symmetric, strategy token, dynamic: each token's activations are rounded to
          int8 on their own scale max|x| / 127 at run time. vLLM runs it as its W8A8 int8 scheme
          (CompressedTensorsW8A8Int8, dynamic per-token). -> W8A8 blocks (Q8_0's layout; mojo/quant.mojo
          rounds x * 127 / max|x| to nearest, as vLLM's dynamic int8 kernel does. transformers'
          compressed-tensors integration rounds on max|x| / 127.5 into [-128, 127] instead)
Anything else (groups, blocks, 4 bits, static activation scales, asymmetric weights, a quantized
KV cache, one checkpoint mixing both schemes) is refused with a one-line reason.

Scales: a block's d is a float16 value. A checkpoint scale that is not one is rounded to the nearest
(at least 2^-14, float16's smallest normal) and the row's codes are re-rounded against it:
    FP8: see mojollm.fp8 (each weight moves by at most 2^-12 of its size; a code almost never moves).
    int8: for scales of 2^-14 and more the codes never move (|q| <= 128 and d / s within 2^-11 of 1
          put q * s / d within 0.07 of q) and each weight moves by at most 2^-11 of its size; a row
          whose scale is below 2^-14 (|w| < 2^-7) is rounded to steps of 2^-14: error <= 2^-15.
We write every scale as a float16 value in float32, so our checkpoints map onto blocks exactly.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mojollm import fp8
from mojollm.errors import ModelLoadError
from mojollm.quantization import QK, Quantized
from mojollm.weights import WeightTensor

SCHEMES = ("fp8", "w8a8")
_CODE_TYPES = {np.dtype(np.uint8): "F8_E4M3", np.dtype(np.int8): "I8"}  # the safetensors dtype of each
_SCHEME_CODES = {"fp8": "F8_E4M3", "w8a8": "I8"}
_SCHEME_NAMES = {"fp8": "FP8", "w8a8": "W8A8 int8"}


# ----------------------------------------------------------------------------------------------
# writing


def _args(kind: str, strategy: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "observer": observer,
            "observer_kwargs": {}}


def quantization_config(scheme: str, ignore: list[str] | None = None) -> dict[str, Any]:
    """config.json's quantization_config: per-channel weights, and for w8a8 dynamic per-token int8
    activations (module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    kind = "float" if scheme == "fp8" else "int"
    acts = None if scheme == "fp8" else _args("int", "token", True, None)
    return {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": _args(kind, "channel", False, "minmax"),
                                          "input_activations": acts, "output_activations": None}},
            "ignore": list(ignore if ignore is not None else ["lm_head"]), "kv_cache_scheme": None,
            "global_compression_ratio": None}


def linear_tensors(codes: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """{weight, weight_scale} of one linear: codes [out, in] (uint8 E4M3 or int8), one scale per row."""
    return {"weight": np.ascontiguousarray(codes), "weight_scale": np.asarray(scales, np.float32).reshape(-1, 1)}


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32", **_CODE_TYPES}


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file; uint8 arrays are stored as F8_E4M3 codes (safetensors.numpy cannot
    name that dtype: numpy has none). Layout: u64 header length, the JSON header (padded with
    spaces to 8 bytes), then every tensor's little-endian bytes; widest dtypes first, as the
    safetensors library orders them, so every tensor starts aligned to its element size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, a in sorted(tensors.items(), key=lambda kv: (-np.asarray(kv[1]).dtype.itemsize, kv[0])):
        a = np.ascontiguousarray(a)
        dtype = _ST_DTYPES.get(a.dtype)
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


# ----------------------------------------------------------------------------------------------
# reading


def scheme_of(config: Any) -> str | None:
    """"fp8" or "w8a8" for a config.json whose quantization_config we load as such; None without
    one, or for another method (GPTQ, AWQ: mojollm.models.packed_int); a one-line ValueError for a
    compressed-tensors / fp8 config we cannot take, with its reason."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method")
    if method == "fp8":  # vLLM's / transformers' Fp8Config: per-tensor scales, or 2-D blocks
        if q.get("weight_block_size") is not None:
            raise ValueError(f"FP8 with weight_block_size {q['weight_block_size']} (block-wise scales) is not "
                             "supported: per-channel or per-tensor scales only")
        return "fp8"
    if method != "compressed-tensors":
        return None
    fmt = q.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (FP8 weights: float-quantized; "
                         "W8A8 int8: int-quantized)")
    if q.get("kv_cache_scheme"):
        raise ValueError("a quantized KV cache (kv_cache_scheme) is not supported")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = {_group_scheme(name, g, fmt) for name, g in groups.items()}
    if len(schemes) > 1:
        raise ValueError("the config groups mix FP8 and int8 weights: one scheme per checkpoint is supported")
    return schemes.pop()


def _group_scheme(name: str, group: Any, fmt: str) -> str:
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise ValueError(f"config group {name!r} has no weights scheme")
    # the format names the weights' type; naive-quantized leaves it to the weights' args
    kind = {"float-quantized": "float", "int-quantized": "int"}.get(fmt, "int" if w.get("type") == "int" else "float")
    label = "int8" if kind == "int" else "FP8"
    if (w.get("type"), w.get("num_bits")) != (kind, 8) or w.get("symmetric") is False or w.get("dynamic"):
        raise ValueError(f"config group {name!r}: weights {w.get('type')}/{w.get('num_bits')} bits are not static "
                         f"symmetric {label} ({kind}, 8 bits)")
    if (w.get("strategy") or "tensor") not in ("channel", "tensor"):
        raise ValueError(f"config group {name!r}: {label} weight strategy {w.get('strategy')!r} is not supported "
                         "(channel or tensor)")
    if kind != "int":
        return "fp8"
    a = group.get("input_activations")
    if not isinstance(a, dict):
        raise ValueError(f"config group {name!r}: int8 weights without input_activations (weight-only) are not "
                         "supported: W8A8 takes dynamic per-token int8 activations")
    if not a.get("dynamic"):
        raise ValueError(f"config group {name!r}: static activation scales (input_activations dynamic false) are "
                         "not supported: W8A8 here rounds each token's activations on their own scale at run time")
    if (a.get("type"), a.get("num_bits"), a.get("strategy")) != ("int", 8, "token") or a.get("symmetric") is False:
        raise ValueError(f"config group {name!r}: input_activations {a.get('type')}/{a.get('num_bits')} bits, strategy "
                         f"{a.get('strategy')!r} are not symmetric int8 per token")
    return "w8a8"


def holds(name: str, tensor: Any, scheme: str | None) -> bool:
    """Whether the HF loader hands this checkpoint tensor to hf_weights: every F8_E4M3 / I8 tensor
    (uint8 / int8 arrays) and, in a checkpoint of one of our schemes, the scales and zero points."""
    if isinstance(tensor, np.ndarray) and tensor.dtype in _CODE_TYPES:
        return True
    return scheme is not None and name.endswith((".weight_scale", ".input_scale", "_zero_point"))


def int8_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] and one scale per row (float, >= 0) -> W8A8 blocks uint8 [N, K/32 * 34] (Q8_0's
    layout, every block of a row repeating its scale). A scale that is not a float16 value is rounded
    to one and the row's codes are re-rounded against it (module docstring)."""
    n, k = codes.shape
    if k % QK:
        raise ValueError(f"the row length {k} is not a multiple of {QK} (the Q8_0 block)")
    s = np.asarray(scales, np.float64).reshape(-1)
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("the scales must be finite and non-negative")
    if s.max(initial=0) > np.finfo(np.float16).max:
        raise ValueError("a scale is beyond float16's range")
    d = np.where(s == 0, 0, np.maximum(s, fp8.MIN_SCALE)).astype(np.float16)
    redo = d.astype(np.float64) != s
    if redo.any():
        codes = codes.copy()
        codes[redo] = np.clip(np.rint(codes[redo] * (s[redo] / d[redo])[:, None]), -128, 127)
    return Quantized("Q8_0", np.repeat(d[:, None], k // QK, axis=1), None, np.ascontiguousarray(codes)).gguf_blocks()


def _blocks(scheme: str, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """One checkpoint linear's codes [out, in] and weight_scale ([out, 1], [out], [1] or []) -> our blocks."""
    if codes.ndim != 2:
        raise ValueError(f"a quantized weight must be 2-D [out, in], got shape {codes.shape}")
    n = codes.shape[0]
    s = np.asarray(scale, np.float32)
    if s.size not in (1, n) or s.ndim > 2 or (s.ndim == 2 and s.shape[1] != 1):
        raise ValueError(f"weight_scale has shape {s.shape}: expected [{n}, 1] (per channel) or [1] (per tensor)")
    s = np.broadcast_to(s.reshape(-1), (n,))
    return fp8.to_blocks(np.ascontiguousarray(codes), s) if scheme == "fp8" else int8_blocks(codes, s)


def _floats(t: Any, name: str) -> np.ndarray:
    if isinstance(t, WeightTensor):
        return t.to_float32()
    a = np.asarray(t)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"tensor {name} holds {a.dtype}, not numbers")
    return a.astype(np.float32)


def hf_weights(config: dict, parts: dict[str, Any], where: str) -> dict[str, WeightTensor]:
    """The quantized linears of a checkpoint as our WeightTensors ("F8_E4M3" or "W8A8"), {HF weight
    name: tensor}. `parts`: every tensor holds() picked: the codes (uint8 / int8 arrays [out, in]) and
    the scales and zero points. input_scale (static activation scales) is not used: FP8 runs float32
    activations, W8A8 dynamic per-token ones. Any defect is one ModelLoadError line."""
    try:
        scheme = scheme_of(config)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    scales = {n: a for n, a in parts.items() if n.endswith(".weight_scale")}
    zeros = {n: a for n, a in parts.items() if n.endswith(".weight_zero_point")}
    out = {}
    for name, q in parts.items():
        if name.endswith("_zero_point") or not (isinstance(q, np.ndarray) and q.dtype in _CODE_TYPES):
            continue
        got = _CODE_TYPES[q.dtype]
        if scheme is None:
            fix = "FP8 quantization_config (compressed-tensors float-quantized, or quant_method fp8)" \
                if got == "F8_E4M3" else "W8A8 quantization_config (compressed-tensors int-quantized)"
            raise ModelLoadError(f"{where}: tensor {name} is {got} but config.json has no {fix}")
        if got != _SCHEME_CODES[scheme]:
            raise ModelLoadError(f"{where}: tensor {name} is {got} but the quantization_config describes "
                                 f"{_SCHEME_NAMES[scheme]} weights ({_SCHEME_CODES[scheme]})")
        if not name.endswith(".weight"):
            raise ModelLoadError(f"{where}: tensor {name} is {got} but is no linear's weight")
        scale = scales.pop(name + "_scale", None)
        if scale is None:
            raise ModelLoadError(f"{where}: the {_SCHEME_NAMES[scheme]} weight {name} has no {name}_scale")
        try:
            zero = zeros.pop(name + "_zero_point", None)
            if zero is not None and np.any(_floats(zero, name + "_zero_point") != 0):
                raise ValueError("weight_zero_point is not zero: asymmetric weights are not supported")
            blocks = _blocks(scheme, q, _floats(scale, name + "_scale"))
        except ValueError as e:
            raise ModelLoadError(f"{where}: tensor {name}: {e}") from None
        qtype = "F8_E4M3" if scheme == "fp8" else "W8A8"
        out[name] = WeightTensor(name, tuple(int(d) for d in q.shape), qtype, blocks)
    if scales or zeros:
        raise ModelLoadError(f"{where}: {next(iter({**scales, **zeros}))} belongs to no quantized weight")
    return out
