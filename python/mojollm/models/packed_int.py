"""GPTQ and AWQ packed-integer checkpoints (safetensors): write them, and read them into our blocks.

A linear with K inputs and N outputs is stored as four tensors under its module name
(`model.layers.0.self_attn.q_proj.qweight`, ...), codes q in [0, 2^bits - 1], G groups of inputs,
and w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k]:

  GPTQ (AutoGPTQ / GPTQModel / vLLM / transformers; bits 2, 3, 4, 8)
    qweight int32 [K * bits / 32, N]  codes packed along K: in each run of 32 inputs, input j sits at
                                      bit bits * j of a little-endian stream of `bits` words (2/4/8
                                      bits: 32 / bits codes per word; 3 bits: 32 codes in 3 words, two
                                      of them split across a word boundary)
    qzeros  int32 [G, N * bits / 32]  zero points packed the same way along N (N padded with zero
                                      codes to whole words: 32 outputs at 3 bits). checkpoint_format
                                      "gptq" (v1, AutoGPTQ) stores zero - 1 in each field (read back
                                      field by field, + 1, as vLLM's and AutoGPTQ's kernels do);
                                      "gptq_v2" (GPTQModel) stores the zero itself. We write v1 for
                                      symmetric grids and v2 otherwise: v1 cannot store a zero of 0
    scales  f16   [G, N]
    g_idx   int32 [K]                 each input's group: k // group_size, or a permutation of
                                      that order after act-order (desc_act) without static groups
  AWQ GEMM (AutoAWQ / vLLM / transformers; 4 bits, zero point; version "gemm")
    qweight int32 [K, N / 8]          codes packed along N: word c holds outputs 8c + (0, 2, 4, 6,
                                      1, 3, 5, 7)[i] at bits 4i (AWQ's interleaved order)
    qzeros  int32 [G, N / 8]          zero points (as they are) packed the same way
    scales  f16   [G, N]              group g holds inputs g * group_size ...

Reading turns each linear into one of our block types (32 inputs of a row per block), so the cpu
and cuda kernels run it as they are. Exact wherever the groups are constant over each aligned run of
32 inputs (group sizes 32/64/128/..., per-channel, desc_act with static groups):
    q - zero in [-8, 7] (2 and 3 bits always; 4 bits symmetric)        -> Q4_0: d = scale, q - zero + 8
    other 4-bit codes                                                   -> Q4_1: d = scale, q, m = -scale * zero
        m is rounded to float16 (round to nearest even): off by at most half an f16 ulp of
        scale * zero, below 1/128 of a step (scale); every other map here is exact
    8 bits with q - zero in [-128, 127] (symmetric)                     -> Q8_0: d = scale, q - zero
        (AutoGPTQ's symmetric scale makes -128 codes; the int8 kernels take them)
Otherwise (desc_act with a non-monotone g_idx, 8-bit asymmetric, scales that are not float16) the
dequantized weights are quantized to Q8_0 by round to nearest, and one log line says how many.
Pickles are never read; any defect of a checkpoint is one ModelLoadError line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mojollm.errors import ModelLoadError
from mojollm.quantization import QK, Grid, IntQuantized, Quantized, rtn
from mojollm.weights import FLOAT_TYPES, WeightTensor

log = logging.getLogger("mojollm.models")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's position i in a word holds output 8c + AWQ_ORDER[i]
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
GPTQ_FORMATS = ("gptq", "gptq_v2")


# ----------------------------------------------------------------------------------------------
# bit packing


def _unit(bits: int) -> int:
    """Codes in the shortest run that fills whole 32-bit words (16, 32, 8, 4 for 2, 3, 4, 8 bits)."""
    return 32 // math.gcd(bits, 32)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [R, C] (0..2^bits - 1) -> int32 [R' * bits / 32, C], packed along axis 0: code r at
    bit bits * r of a little-endian stream of words (R rounded up to a whole run with zero codes)."""
    r, c = codes.shape
    u = _unit(bits)
    rp = -(-r // u) * u
    v = np.zeros((rp, c), np.uint64)
    v[:r] = codes
    v = v.reshape(rp // u, u, c)
    words = np.zeros((rp // u, u * bits // 32, c), np.uint64)
    for j in range(u):
        w, sh = divmod(bits * j, 32)
        words[:, w] |= v[:, j] << np.uint64(sh)
        if sh + bits > 32:  # 3 bits: the code's high bits open the next word
            words[:, w + 1] |= v[:, j] >> np.uint64(32 - sh)
    return (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32).reshape(-1, c)


def unpack_rows(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """The inverse of pack_rows: int32 [W, C] -> uint8 codes [rows, C]."""
    u = _unit(bits)
    nw = u * bits // 32
    c = words.shape[1]
    w64 = np.ascontiguousarray(words).view(np.uint32).astype(np.uint64).reshape(-1, nw, c)
    out = np.empty((w64.shape[0], u, c), np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(u):
        w, sh = divmod(bits * j, 32)
        v = w64[:, w] >> np.uint64(sh)
        if sh + bits > 32:
            v |= w64[:, w + 1] << np.uint64(32 - sh)
        out[:, j] = v & mask
    return out.reshape(-1, c)[:rows]


def _awq_perm(n: int) -> np.ndarray:
    return (np.arange(n).reshape(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)


# ----------------------------------------------------------------------------------------------
# writing


def gptq_tensors(iq: IntQuantized, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """{qweight, qzeros, scales, g_idx} of one linear (groups in order: g_idx = k // group_size)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {', '.join(GPTQ_FORMATS)}, got {checkpoint_format!r}")
    n, k = iq.shape
    bits = iq.grid.bits
    if k % QK:
        raise ValueError(f"GPTQ packing needs K a multiple of {QK}, got {k}")
    zeros = iq.zeros.astype(np.int64)
    if checkpoint_format == "gptq":
        if zeros.size and zeros.min() < 1:
            raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (zero - 1): use checkpoint_format gptq_v2")
        zeros = zeros - 1
    return {"qweight": pack_rows(iq.q.T, bits),
            "qzeros": np.ascontiguousarray(pack_rows(zeros, bits).T),
            "scales": np.ascontiguousarray(iq.scales.T),
            "g_idx": (np.arange(k) // iq.grid.group(k)).astype(np.int32)}


def awq_tensors(iq: IntQuantized) -> dict[str, np.ndarray]:
    """{qweight, qzeros, scales} of one linear in AWQ's GEMM layout (4 bits, K a multiple of the group)."""
    n, k = iq.shape
    if iq.grid.bits != 4 or n % 8 or k % iq.grid.group(k):
        raise ValueError(f"AWQ GEMM packs 4 bits with N a multiple of 8 and whole groups; got {iq.grid.bits} bits, "
                         f"N={n}, K={k}, group {iq.grid.group(k)}")
    perm = _awq_perm(n)
    return {"qweight": np.ascontiguousarray(pack_rows(iq.q[perm], 4).T),
            "qzeros": np.ascontiguousarray(pack_rows(iq.zeros[perm].astype(np.int64), 4).T),
            "scales": np.ascontiguousarray(iq.scales.T)}


def quantization_config(method: str, grid: Grid, act_order: bool = False) -> dict:
    """config.json's quantization_config, in the field names the loaders read (transformers'
    GPTQConfig / AwqConfig, vLLM, GPTQModel, AutoAWQ)."""
    if method == "awq":
        return {"quant_method": "awq", "bits": grid.bits, "group_size": grid.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    fmt = "gptq" if grid.symmetric else "gptq_v2"  # v1 cannot store a zero point of 0
    return {"quant_method": "gptq", "bits": grid.bits, "group_size": grid.group_size, "desc_act": act_order,
            "static_groups": act_order, "sym": grid.symmetric, "true_sequential": True, "damp_percent": 0.01,
            "lm_head": False, "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32"}


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class PackedLinear:
    """One linear's content, unpacked: w[n, k] = scales[g, n] * (q[k, n] - zeros[g, n]), g = g_idx[k]."""

    bits: int
    q: np.ndarray  # [K, N] uint8
    zeros: np.ndarray  # [G, N] int16
    scales: np.ndarray  # [G, N] float32
    g_idx: np.ndarray  # [K] int64

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]."""
        s = self.scales[self.g_idx]
        z = self.zeros[self.g_idx]
        return np.ascontiguousarray((s * (self.q.astype(np.int16) - z).astype(np.float32)).T)


def read_gptq(t: dict[str, np.ndarray], bits: int, v2: bool, group_size: int, where: str) -> PackedLinear:
    """A GPTQ linear from its tensors (qweight, qzeros int32; scales float; g_idx int32 or absent)."""
    qweight, qzeros, scales = _int32(t, "qweight", where), _int32(t, "qzeros", where), _scales(t, where)
    if qweight.ndim != 2 or scales.ndim != 2 or qzeros.ndim != 2:
        raise ModelLoadError(f"{where}: qweight, qzeros and scales must be matrices")
    k = qweight.shape[0] * 32 // bits
    g, n = scales.shape
    if qweight.shape[0] * 32 % bits or qweight.shape[1] != n or k % QK:
        raise ModelLoadError(f"{where}: qweight has shape {list(qweight.shape)}, which is no {bits}-bit packing of "
                             f"K (a multiple of {QK}) inputs by the N={n} outputs of scales")
    u = _unit(bits)
    if qzeros.shape != (g, -(-n // u) * u * bits // 32):
        raise ModelLoadError(f"{where}: qzeros has shape {list(qzeros.shape)}, expected "
                             f"{[g, -(-n // u) * u * bits // 32]} for {bits}-bit zero points of {g} groups x {n}")
    if "g_idx" in t:
        g_idx = _int32(t, "g_idx", where).astype(np.int64)
        if g_idx.shape != (k,) or (k and (g_idx.min() < 0 or g_idx.max() >= g)):
            raise ModelLoadError(f"{where}: g_idx must hold {k} group indices in [0, {g}), got shape "
                                 f"{list(g_idx.shape)}")
    else:
        g_idx = _contiguous_groups(k, group_size, g, where)
    zeros = unpack_rows(np.ascontiguousarray(qzeros.T), bits, n).T.astype(np.int16)
    if not v2:
        zeros += 1  # v1 stores zero - 1, field by field
    return PackedLinear(bits, unpack_rows(qweight, bits, k), zeros, scales, g_idx)


def read_awq(t: dict[str, np.ndarray], bits: int, group_size: int, where: str) -> PackedLinear:
    """An AWQ GEMM linear from its tensors (qweight, qzeros int32; scales float)."""
    qweight, qzeros, scales = _int32(t, "qweight", where), _int32(t, "qzeros", where), _scales(t, where)
    if qweight.ndim != 2 or scales.ndim != 2 or qzeros.ndim != 2:
        raise ModelLoadError(f"{where}: qweight, qzeros and scales must be matrices")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (g, n // 8) or k % QK:
        raise ModelLoadError(f"{where}: AWQ shapes qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales "
                             f"{list(scales.shape)} disagree (want [K, N/8], [G, N/8], [G, N], K a multiple of {QK})")
    perm = _awq_perm(n)
    q = np.empty((k, n), np.uint8)
    q[:, perm] = unpack_rows(np.ascontiguousarray(qweight.T), 4, n).T
    zeros = np.empty((g, n), np.int16)
    zeros[:, perm] = unpack_rows(np.ascontiguousarray(qzeros.T), 4, n).T
    return PackedLinear(bits, q, zeros, scales, _contiguous_groups(k, group_size, g, where))


def _int32(t: dict, key: str, where: str) -> np.ndarray:
    a = t[key]
    if not isinstance(a, np.ndarray) or a.dtype != np.int32:
        raise ModelLoadError(f"{where}.{key} must be an int32 tensor")
    return np.asarray(a)


def _scales(t: dict, where: str) -> np.ndarray:
    s = t["scales"]
    if isinstance(s, np.ndarray) and s.dtype.kind == "f":  # (tests pass plain arrays)
        return s.astype(np.float32)
    if not isinstance(s, WeightTensor) or s.qtype not in FLOAT_TYPES:
        raise ModelLoadError(f"{where}.scales must be a float16 / bfloat16 / float32 tensor")
    return s.to_float32()


def _contiguous_groups(k: int, group_size: int, g: int, where: str) -> np.ndarray:
    gs = k if group_size == -1 else group_size
    if -(-k // gs) != g:
        raise ModelLoadError(f"{where}: {g} groups of scales, but K={k} in groups of {gs} makes {-(-k // gs)}")
    return np.arange(k) // gs


def to_blocks(p: PackedLinear) -> tuple[Quantized, bool]:
    """Our blocks for a packed linear, and whether they hold its weights exactly (module docstring)."""
    k, n = p.q.shape
    gb = p.g_idx.reshape(k // QK, QK)
    s16 = p.scales.astype(np.float16)
    exact = bool((gb == gb[:, :1]).all()) and bool(np.array_equal(s16.astype(np.float32), p.scales))
    if exact:
        first = gb[:, 0]
        d = np.ascontiguousarray(s16[first].T)  # [N, K/32]
        z = p.zeros[first].T  # [N, K/32]
        qt = p.q.T
        c = qt.astype(np.int16) - np.repeat(z, QK, axis=1)
        lo, hi = (int(c.min()), int(c.max())) if c.size else (0, 0)
        if p.bits <= 4 and lo >= -8 and hi <= 7:
            return Quantized("Q4_0", d, None, (c + 8).astype(np.uint8)), True
        if p.bits <= 4:
            m = (-(d.astype(np.float32) * z.astype(np.float32))).astype(np.float16)  # the one rounding
            return Quantized("Q4_1", d, np.ascontiguousarray(m), np.ascontiguousarray(qt)), True
        if lo >= -128 and hi <= 127:
            return Quantized("Q8_0", d, None, c.astype(np.int8)), True
    return rtn(p.dequantize(), "Q8_0"), False


# ----------------------------------------------------------------------------------------------
# a checkpoint's quantization_config


@dataclass(frozen=True)
class Scheme:
    """What config.json's quantization_config says about the packed linears."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: per output channel
    v2: bool  # GPTQ: zero points stored as they are (gptq_v2), not minus one (v1)
    where: str

    @staticmethod
    def owns(name: str) -> bool:
        return name.endswith(PACKED_SUFFIXES)

    def linears(self, raw: dict[str, Any]) -> dict[str, tuple[str, WeightTensor]]:
        """{module weight name ("model.layers.0.mlp.up_proj.weight"): (file, WeightTensor)} of every
        packed linear in raw ({tensor name: (file, tensor)}); logs how many were not exact."""
        modules: dict[str, dict] = {}
        for name, (f, t) in raw.items():
            prefix, part = name.rsplit(".", 1)
            modules.setdefault(prefix, {})[part] = (f, t)
        out, inexact = {}, 0
        for prefix, parts in modules.items():
            f = next(iter(parts.values()))[0]
            where = f"{f}: {prefix}"
            need = ("qweight", "qzeros", "scales")
            missing = [x for x in need if x not in parts]
            if missing:
                raise ModelLoadError(f"{where} lacks its {missing[0]} tensor ({self.method} linears need "
                                     f"{', '.join(need)})")
            t = {x: v for x, (_, v) in parts.items()}
            if self.method == "awq":
                if "g_idx" in t:
                    raise ModelLoadError(f"{where}.g_idx: AWQ checkpoints have no g_idx")
                p = read_awq(t, self.bits, self.group_size, where)
            else:
                p = read_gptq(t, self.bits, self.v2, self.group_size, where)
            q, exact = to_blocks(p)
            inexact += not exact
            n, k = q.shape
            out[prefix + ".weight"] = (f, WeightTensor(prefix + ".weight", (n, k), q.qtype, q.gguf_blocks()))
        if inexact:
            log.warning("%s: %d of %d %s linears have groups that do not line up with 32-weight blocks or "
                        "codes beyond Q4/Q8 (desc_act, 8-bit asymmetric): converted to Q8_0 from their "
                        "dequantized weights", self.where, inexact, len(modules), self.method.upper())
        return out


def scheme_of(raw_config: Any, where: str) -> Scheme | None:
    """The Scheme of a config.json with a GPTQ / AWQ quantization_config; None without one."""
    qc = raw_config.get("quantization_config") if isinstance(raw_config, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{where}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise ModelLoadError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                             f"(supported: gptq, awq)")
    bits = qc.get("bits", qc.get("w_bit"))
    allowed = (2, 3, 4, 8) if method == "gptq" else (4,)
    if bits not in allowed or isinstance(bits, bool):
        raise ModelLoadError(f"{where}: {method} with bits={bits!r} is not supported (supported: "
                             f"{', '.join(map(str, allowed))})")
    gs = qc.get("group_size", qc.get("q_group_size", -1 if method == "gptq" else 128))
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
        raise ModelLoadError(f"{where}: quantization_config.group_size must be -1 or a positive integer, got {gs!r}")
    v2 = False
    if method == "gptq":
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if not isinstance(fmt, str) or fmt.lower() not in GPTQ_FORMATS:
            raise ModelLoadError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (supported: "
                                 f"{', '.join(GPTQ_FORMATS)})")
        v2 = fmt.lower() == "gptq_v2"
    else:
        version = qc.get("version") or qc.get("format") or "gemm"
        if not isinstance(version, str) or version.lower() != "gemm":
            raise ModelLoadError(f"{where}: AWQ version {version!r} is not supported (supported: gemm)")
        if qc.get("zero_point", True) is not True:
            raise ModelLoadError(f"{where}: AWQ without zero points (zero_point false) is not supported")
    return Scheme(method, bits, gs, v2, where)
