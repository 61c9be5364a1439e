# Row-wise and element-wise kernels: embedding, RMSNorm (+ fused residual add), add, RoPE,
# SiLU-and-mul, KV-cache store. All memory-bound; one block per row where a row needs a reduction.

from std.math import rsqrt, exp
from std.memory import bitcast
from max.gpu import thread_idx, block_idx, block_dim, global_idx, lane_id, WARP_SIZE
from max.gpu.primitives import warp

from gpu_common import (
    Ptr, F32P, I32P, I64P, U8P, I8P, F16P, flag, block_sum, block_max,
    ERR_TOKEN, ERR_SLOT, ERR_POSITION, Q4_0, Q4_1, Q8_0, F8_E4M3, KV_I8, KV_SCALE_BYTES, roundeven, e4m3_codes,
)

comptime ROW_BLOCK = 256
# quantize_q8_token_kernel: a decode step has one row per sequence, so its block takes more threads
comptime TOKEN_BLOCK = 1024


# ---- embedding: out[t, :] = table[ids[t], :] --------------------------------------------------
def embedding_dense_kernel[dt: DType](
    table: Ptr[dt], ids: I32P, dst: F32P, err: I32P, V: Int64, Hd: Int64
):
    var t = block_idx.x
    var hd = Int(Hd)
    var id = Int(ids[unsafe_offset=t])
    var row0 = t * hd
    if id < 0 or id >= Int(V):
        if thread_idx.x == 0:
            flag(err, ERR_TOKEN)
        for j in range(thread_idx.x, hd, block_dim.x):
            dst[unsafe_offset=row0 + j] = 0
        return
    var src = id * hd
    for j in range(thread_idx.x, hd, block_dim.x):
        dst[unsafe_offset=row0 + j] = table[unsafe_offset=src + j].cast[DType.float32]()


@always_inline
def dequant_one[QT: Int](qs: U8P, d: F16P, m: F16P, row: Int, nb: Int, j: Int) -> Float32:
    """Weight j of `row` in the repacked GGUF layout (see gpu_common)."""
    var b = j // 32
    var r = j % 32
    var blk = row * nb + b
    var scale = d[unsafe_offset=blk].cast[DType.float32]()
    comptime if QT == Q8_0:
        var q = bitcast[DType.int8, 1](qs[unsafe_offset=blk * 32 + r])
        return Float32(q) * scale
    elif QT == F8_E4M3:
        # exact: a 4-bit e4m3 significand times an 11-bit f16 one fits float32's 24
        var q = bitcast[DType.float8_e4m3fn, 1](qs[unsafe_offset=blk * 32 + r])
        return q.cast[DType.float32]() * scale
    else:
        var byte = qs[unsafe_offset=blk * 16 + (r % 16)]
        var nib = byte & 15 if r < 16 else byte >> 4
        comptime if QT == Q4_0:
            return (Float32(nib) - 8.0) * scale
        else:
            return Float32(nib) * scale + m[unsafe_offset=blk].cast[DType.float32]()


def embedding_quant_kernel[QT: Int](
    qs: U8P, d: F16P, m: F16P, ids: I32P, dst: F32P, err: I32P, V: Int64, Hd: Int64
):
    var t = block_idx.x
    var hd = Int(Hd)
    var id = Int(ids[unsafe_offset=t])
    var row0 = t * hd
    if id < 0 or id >= Int(V):
        if thread_idx.x == 0:
            flag(err, ERR_TOKEN)
        for j in range(thread_idx.x, hd, block_dim.x):
            dst[unsafe_offset=row0 + j] = 0
        return
    var nb = hd // 32
    for j in range(thread_idx.x, hd, block_dim.x):
        dst[unsafe_offset=row0 + j] = dequant_one[QT](qs, d, m, id, nb, j)


def dequant_kernel[QT: Int, odt: DType](qs: U8P, d: F16P, m: F16P, dst: Ptr[odt], N: Int64, K: Int64):
    """Whole quantized matrix -> dense [N, K] (used before a GEMM when many tokens share the weights)."""
    var i = global_idx.x
    var k = Int(K)
    if i >= Int(N) * k:
        return
    dst[unsafe_offset=i] = dequant_one[QT](qs, d, m, i // k, k // 32, i % k).cast[odt]()


# ---- x [T, K] float32 -> int8 codes per 32-block, for the quantized GEMV (gpu_linear) ----------
def quantize_q8_kernel(x: F32P, qx: I8P, xs: F32P, n: Int64):
    """A warp per 32-block of the flattened x (n = T K elements, K a multiple of 32): dx = max|x| / 127,
    q = round-half-even(x * (1/dx)) (|q| <= 127) in float32, as mojo/quant.mojo does on the CPU;
    qx[i] = q, xs[2 blk] = dx, xs[2 blk + 1] = sum of the block's q (an exact integer). A block with
    max|x| < 1e-30 gets dx = 0 and q = 0; one holding NaN or inf gets dx = NaN and q = 0, so the
    outputs it reaches are NaN as with float activations."""
    var i = global_idx.x
    if i >= Int(n):  # n is a multiple of 32: whole warps leave
        return
    var v = x[unsafe_offset=i]
    var bad = Int32(1) if (bitcast[DType.uint32, 1](v) & 0x7F800000) == 0x7F800000 else Int32(0)
    var amax = abs(v)
    comptime for k in range(5):
        amax = max(amax, warp.shuffle_xor(amax, UInt32(16 >> k)))
        bad |= warp.shuffle_xor(bad, UInt32(16 >> k))
    var dx: Float32 = 0
    var inv: Float32 = 0
    if bad != 0:
        dx = bitcast[DType.float32, 1](UInt32(0x7FC00000))
    elif amax >= 1e-30:
        dx = amax / 127
        inv = 1 / dx
    var q: Int32 = 0
    if inv != 0:
        q = round(v * inv).cast[DType.int32]()
    qx[unsafe_offset=i] = q.cast[DType.int8]()
    var qsum = q
    comptime for k in range(5):
        qsum += warp.shuffle_xor(qsum, UInt32(16 >> k))
    if lane_id() == 0:
        xs[unsafe_offset=(i // 32) * 2] = dx
        xs[unsafe_offset=(i // 32) * 2 + 1] = Float32(qsum)


def quantize_q8_token_kernel(x: F32P, qx: I8P, xs: F32P, K: Int64):
    """quantize_q8_kernel's output for W8A8, one TOKEN_BLOCK block per token row of x [T, K]: dx =
    max|x| / 127 over the whole row (per-token activations, as mojo/quant.mojo's W8A8 on the CPU),
    written for every 32-block with that block's sum of codes, so the Q8_0 GEMV reads it unchanged.
    NaN / inf anywhere in the row: dx = NaN and q = 0."""
    var k = Int(K)
    var row = block_idx.x * k
    var amax: Float32 = 0
    var bad: Float32 = 0
    for j in range(thread_idx.x, k, TOKEN_BLOCK):
        var v = x[unsafe_offset=row + j]
        if (bitcast[DType.uint32, 1](v) & 0x7F800000) == 0x7F800000:
            bad = 1
        amax = max(amax, abs(v))
    amax = block_max[TOKEN_BLOCK](amax)
    bad = block_max[TOKEN_BLOCK](bad)
    var dx: Float32 = 0
    var inv: Float32 = 0
    if bad != 0:
        dx = bitcast[DType.float32, 1](UInt32(0x7FC00000))
    elif amax >= 1e-30:
        dx = amax / 127
        inv = 1 / dx
    var lane = Int(lane_id())
    for b in range(thread_idx.x // 32, k // 32, TOKEN_BLOCK // 32):  # a warp per 32-block
        var i = row + b * 32 + lane
        var q: Int32 = 0
        if inv != 0:
            q = round(x[unsafe_offset=i] * inv).cast[DType.int32]()
        qx[unsafe_offset=i] = q.cast[DType.int8]()
        var qsum = q
        comptime for s in range(5):
            qsum += warp.shuffle_xor(qsum, UInt32(16 >> s))
        if lane == 0:
            xs[unsafe_offset=(i // 32) * 2] = dx
            xs[unsafe_offset=(i // 32) * 2 + 1] = Float32(qsum)


# ---- x [T, K] float32 -> float16 32-blocks, for the FP8 GEMV's tensor cores (gpu_linear) ------
def f16_blocks_kernel(x: F32P, xh: F16P, sx: F32P, n: Int64, K: Int64, Tp: Int64):
    """A warp per 32-block (token t, block b) of the flattened x (n = T K elements, K a multiple of
    32): xh = x / s rounded to float16, s = sx[b Tp + t] the power of two that puts the block's
    max|x| in [2^14, 2^15), so no activation overflows float16 and none above 2^-28 of its block's
    largest is subnormal (the scaling is exact; the rounding costs at most 2^-11 relative). A block
    holding NaN or inf gets s = NaN and xh = 0 (the token's outputs are NaN, as with float
    activations); a block under 1e-30 s = 1. Per block, not per token: every block is independent,
    so the whole grid works at once (a per-token maximum is a reduction over K first)."""
    var i = global_idx.x
    if i >= Int(n):  # n is a multiple of 32: whole warps leave
        return
    var v = x[unsafe_offset=i]
    var bad = Int32(1) if (bitcast[DType.uint32, 1](v) & 0x7F800000) == 0x7F800000 else Int32(0)
    var amax = abs(v)
    comptime for k in range(5):
        amax = max(amax, warp.shuffle_xor(amax, UInt32(16 >> k)))
        bad |= warp.shuffle_xor(bad, UInt32(16 >> k))
    var s: Float32 = 1
    var inv: Float32 = 1
    if bad != 0:
        s = bitcast[DType.float32, 1](UInt32(0x7FC00000))
        inv = 0
    elif amax >= 1e-30:  # exponent e >= 27: both powers below are normal floats
        var e = (bitcast[DType.uint32, 1](amax) >> 23) & 0xFF  # max|x| in [2^(e-127), 2^(e-126))
        s = bitcast[DType.float32, 1]((e - 14) << 23)  # 2^(e - 141)
        inv = bitcast[DType.float32, 1]((268 - e) << 23)  # 2^(141 - e)
    var h = (v * inv).cast[DType.float16]()
    if bad != 0:
        h = 0
    xh[unsafe_offset=i] = h
    if lane_id() == 0:
        var blk = i // 32
        var nb = Int(K) // 32
        sx[unsafe_offset=(blk % nb) * Int(Tp) + blk // nb] = s


# ---- RMSNorm -----------------------------------------------------------------------------------
def rms_norm_kernel(x: F32P, w: F32P, dst: F32P, K: Int64, eps: Float32):
    var kk = Int(K)
    var base = block_idx.x * kk
    var ss: Float32 = 0
    for j in range(thread_idx.x, kk, ROW_BLOCK):
        var v = x[unsafe_offset=base + j]
        ss += v * v
    var inv = rsqrt(block_sum[ROW_BLOCK](ss) / Float32(kk) + eps)
    for j in range(thread_idx.x, kk, ROW_BLOCK):
        dst[unsafe_offset=base + j] = x[unsafe_offset=base + j] * inv * w[unsafe_offset=j]


def add_rms_norm_kernel(x: F32P, res: F32P, w: F32P, dst: F32P, K: Int64, eps: Float32):
    """res += x (in place), out = rms_norm(res) * w: one pass instead of two kernels."""
    var kk = Int(K)
    var base = block_idx.x * kk
    var ss: Float32 = 0
    for j in range(thread_idx.x, kk, ROW_BLOCK):
        var v = res[unsafe_offset=base + j] + x[unsafe_offset=base + j]
        res[unsafe_offset=base + j] = v
        ss += v * v
    var inv = rsqrt(block_sum[ROW_BLOCK](ss) / Float32(kk) + eps)
    # Each thread re-reads only the elements it wrote itself: no barrier needed.
    for j in range(thread_idx.x, kk, ROW_BLOCK):
        dst[unsafe_offset=base + j] = res[unsafe_offset=base + j] * inv * w[unsafe_offset=j]


# ---- add: out = a + b, b either the same shape or one row broadcast over rows ------------------
def add_kernel(a: F32P, b: F32P, dst: F32P, n: Int64, bn: Int64):
    var i = global_idx.x
    if i < Int(n):
        dst[unsafe_offset=i] = a[unsafe_offset=i] + b[unsafe_offset=i % Int(bn)]


# ---- RoPE, in place on x[T, H, D]; cos_sin[P, R] = [cos(p f_i) | sin(p f_i)], i < R/2 ---------
def rope_kernel[NEOX: Bool](
    x: F32P, pos: I32P, cs: F32P, err: I32P, H: Int64, D: Int64, R: Int64, P: Int64
):
    var th = block_idx.x  # token * H + head
    var t = th // Int(H)
    var p = Int(pos[unsafe_offset=t])
    if p < 0 or p >= Int(P):
        if thread_idx.x == 0:
            flag(err, ERR_POSITION)
        return
    var r = Int(R)
    var half = r // 2
    var base = th * Int(D)
    var row = p * r
    for i in range(thread_idx.x, half, block_dim.x):
        var c = cs[unsafe_offset=row + i]
        var s = cs[unsafe_offset=row + half + i]
        var i1: Int
        var i2: Int
        comptime if NEOX:  # HF rotate_half: feature i pairs with i + R/2
            i1 = i
            i2 = i + half
        else:  # GPT-J / llama.cpp: feature 2i pairs with 2i + 1
            i1 = 2 * i
            i2 = 2 * i + 1
        var x1 = x[unsafe_offset=base + i1]
        var x2 = x[unsafe_offset=base + i2]
        x[unsafe_offset=base + i1] = x1 * c - x2 * s
        x[unsafe_offset=base + i2] = x2 * c + x1 * s


# ---- SiLU(gate) * up over gate_up[T, 2F] -> [T, F] ---------------------------------------------
def silu_mul_kernel(gu: F32P, dst: F32P, T: Int64, F: Int64):
    var i = global_idx.x
    var f = Int(F)
    if i >= Int(T) * f:
        return
    var t = i // f
    var j = i % f
    var g = gu[unsafe_offset=t * 2 * f + j]
    var u = gu[unsafe_offset=t * 2 * f + f + j]
    dst[unsafe_offset=i] = g / (1.0 + exp(-g)) * u


# ---- KV-cache store: cache[slot[t]] = k[t] (and v); slot < 0 marks a padding token -------------
def store_kv_kernel[kdt: DType, cdt: DType](
    kc: Ptr[cdt], vc: Ptr[cdt], k: Ptr[kdt], v: Ptr[kdt], slots: I64P, err: I32P,
    E: Int64, num_slots: Int64,
):
    var t = block_idx.x
    var e = Int(E)
    var slot = Int(slots[unsafe_offset=t])
    if slot < 0:
        return
    if slot >= Int(num_slots):
        if thread_idx.x == 0:
            flag(err, ERR_SLOT)
        return
    for j in range(thread_idx.x, e, block_dim.x):
        kc[unsafe_offset=slot * e + j] = k[unsafe_offset=t * e + j].cast[cdt]()
        vc[unsafe_offset=slot * e + j] = v[unsafe_offset=t * e + j].cast[cdt]()


# ---- KV-cache store into int8 / fp8 rows (mojollm.kv_dtypes) ---------------------------------
comptime KVQ_WARPS = 4  # warps per block of store_kv_quant_kernel: one (token, head) row each
comptime KVQ_MAX_D = 4 * 32  # head dims it takes: 4 elements per lane


@always_inline
def _quant_row[QK: Int](c: U8P, dst: Int, x: F32P, src: Int, d: Int):
    """One warp writes the row x[src : src + d] as d codes and its scale at byte dst of c:
    s = max|x| / 127 (int8) or / 448 (fp8), codes of x / s (a float32 division, as the format and
    the cpu kernels do) rounded half to even (int8 clamped to +-127; E4M3 saturating); a zero row
    s = 0 and codes 0; NaN or inf anywhere in the row s = NaN and codes 0 (the row reads as NaN)."""
    var lane = Int(lane_id())
    var vals = SIMD[DType.float32, 4](0)  # elements lane + 32 i
    var amax: Float32 = 0
    var bad: Float32 = 0
    comptime for i in range(4):
        var e = lane + 32 * i
        if e < d:
            var v = x[unsafe_offset=src + e]
            vals[i] = v
            if (bitcast[DType.uint32, 1](v) & 0x7F800000) == 0x7F800000:
                bad = 1
            amax = max(amax, abs(v))
    amax = warp.max(amax)
    bad = warp.max(bad)
    var s: Float32 = 0
    if bad != 0:
        s = bitcast[DType.float32, 1](UInt32(0x7FC00000))
    else:
        s = amax / (Float32(127.0) if QK == KV_I8 else Float32(448.0))
    var ok = bad == 0 and s > 0
    comptime for i in range(4):
        var e = lane + 32 * i
        if e < d:
            var code: UInt8 = 0
            if ok:
                var y = vals[i] / s
                comptime if QK == KV_I8:
                    var q = max(min(roundeven[1](y), Float32(127.0)), Float32(-127.0))
                    code = bitcast[DType.uint8, 1](q.cast[DType.int8]())
                else:
                    code = e4m3_codes[1](y)
            c[unsafe_offset=dst + e] = code
    if lane == 0:
        c.unsafe_offset(dst + d).unsafe_bitcast[Float32]()[unsafe_offset=0] = s


def store_kv_quant_kernel[QK: Int](
    kc: U8P, vc: U8P, k: F32P, v: F32P, slots: I64P, err: I32P, T: Int64, KVH: Int64, D: Int64, num_slots: Int64,
):
    """cache[slot[t], h] = quantized k[t, h] (and v): a warp per (token, head) row of k [T, KVH, D]
    float32 into caches [slots, KVH, D + 4] uint8; slot < 0 marks a padding token."""
    var r = block_idx.x * KVQ_WARPS + thread_idx.x // WARP_SIZE
    var kvh = Int(KVH)
    var d = Int(D)
    if r >= Int(T) * kvh:
        return
    var t = r // kvh
    var slot = Int(slots[unsafe_offset=t])
    if slot < 0:
        return
    if slot >= Int(num_slots):
        if lane_id() == 0:
            flag(err, ERR_SLOT)
        return
    var dst = (slot * kvh + r % kvh) * (d + KV_SCALE_BYTES)
    _quant_row[QK](kc, dst, k, r * d, d)
    _quant_row[QK](vc, dst, v, r * d, d)


def convert_kernel[sdt: DType, ddt: DType](src: Ptr[sdt], dst: Ptr[ddt], n: Int64):
    var i = global_idx.x
    if i < Int(n):
        dst[unsafe_offset=i] = src[unsafe_offset=i].cast[ddt]()
