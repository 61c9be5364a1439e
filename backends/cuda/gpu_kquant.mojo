# GGUF Q5_0 / Q5_1 and k-quants (Q4_K, Q5_K, Q6_K) kept quantized on the device: the GEMV for
# 1-64 tokens (int8 activations, dp4a), whole-matrix dequantization (before a GEMM, above 64 tokens)
# and embedding rows. Q4_0 / Q4_1 / Q8_0 live in gpu_linear / gpu_elementwise.
#
# Layouts on the device (backend.repack_gguf_kquant; every block starts 16-byte aligned):
#   Q4_K  the raw GGUF rows, 144 B per 256 weights: f16 d | f16 dmin | 12 B scales | 128 B qs
#   Q5_K  the raw GGUF rows, 176 B: f16 d | f16 dmin | 12 B scales | 32 B qh | 128 B qs
#   Q6_K  208 B per 256 weights: 128 B ql | 64 B qh | 16 x i8 scales (the GGUF block without its
#         trailing f16 d, which moves to d [N, K/256] f16: 210 B blocks are not 16-byte aligned)
#   Q5_0 / Q5_1  qs [N, K/32, 16] B (the nibbles, as Q4_0) + qh [N, K/32] u32 + d (and m) [N, K/32] f16
# Element order (ggml): Q4_K / Q5_K: weight e = 64 j + 32 n + l of a super-block is nibble n of qs byte
# 32 j + l, its 5th bit bit (2 j + n) of qh byte l, scale group 2 j + n (6-bit sc, m packed in 12 B);
# Q6_K: e = 128 h + 32 s + l is nibble s / 2 of ql byte 64 h + 32 (s % 2) + l, bits 2 s..2 s + 1 of qh
# byte 32 h + l, scale group e / 16; Q5_x: byte j of qs holds weights j (low) and j + 16 (high).
#
# GEMV: a warp owns R rows (and the NT tokens of block_idx.y), its lanes split K in units of 64
# weights (a nibble plane's 32 bytes: two 32-weight sub-blocks; Q5_x: one 32-weight block), so a
# unit is two 16-byte loads of codes (+ a 16-byte header / scales, + 32 B of high bits), decoded
# with word operations into int8 codes in registers once, then multiplied with the int8 activation
# blocks of quantize_q8_kernel (x ~= dx qx per 32, with the sum of the codes) by dp4a into exact
# int32 sums; per sub-block one FMA with d dx (and the min term):
#   Q4_K / Q5_K  w = d sc q - dmin m:  d dx (sc sum q qx) - dmin dx (m sum qx)
#   Q6_K         w = d sc (q - 32), sc per 16:  d dx (sc0 (sum_lo q qx - 32 sum_lo qx) + sc1 (..hi..))
#   Q5_0         w = d (q - 16):   d dx (sum q qx - 16 sum qx)
#   Q5_1         w = d q + m:      d dx sum q qx + m dx sum qx
# then warp shuffles. 4 warps per block, no shared memory.

from std.memory import bitcast
from max.gpu import thread_idx, block_idx, block_dim, global_idx, lane_id, WARP_SIZE
from max.gpu.primitives import warp

from gpu_common import Ptr, F32P, I32P, U8P, F16P, vload, flag, ERR_TOKEN, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
from gpu_linear import _dp4a

comptime KQ_WARPS = 4
comptime U32P = Ptr[DType.uint32]
comptime W8 = SIMD[DType.uint32, 8]


@always_inline
def kq_is_kquant[QT: Int]() -> Bool:
    return QT == Q4_K or QT == Q5_K or QT == Q6_K


@always_inline
def kq_unit[QT: Int]() -> Int:
    """Weights per GEMV unit (a lane's share of a row at a time)."""
    return 64 if kq_is_kquant[QT]() else 32


@always_inline
def kq_block_words[QT: Int]() -> Int:
    """32-bit words per 256-weight super-block on the device."""
    comptime if QT == Q4_K:
        return 36
    elif QT == Q5_K:
        return 44
    else:
        return 52


@always_inline
def _f16_bits(p: F16P, i: Int) -> UInt32:
    return bitcast[DType.uint16, 1](p[unsafe_offset=i]).cast[DType.uint32]()


@always_inline
def _f16_lo(w: UInt32) -> Float32:
    return bitcast[DType.float16, 2](w)[0].cast[DType.float32]()


@always_inline
def _f16_hi(w: UInt32) -> Float32:
    return bitcast[DType.float16, 2](w)[1].cast[DType.float32]()


@always_inline
def _sext8(v: UInt32) -> Int32:
    """The low byte of v as a signed integer."""
    return bitcast[DType.int32, 1](v << 24) >> 24


@always_inline
def _kscale(s1: UInt32, s2: UInt32, s3: UInt32, j: Int) -> SIMD[DType.int32, 2]:
    """(sc, m) of sub-block j (0..7) of a Q4_K / Q5_K super-block whose 12 scale bytes S are the
    words s1, s2, s3: j < 4: S[j] & 63, S[j + 4] & 63; else (S[j + 4] & 15) | (S[j - 4] >> 6) << 4,
    (S[j + 4] >> 4) | (S[j] >> 6) << 4."""
    var sh = UInt32(8 * (j & 3))
    var a = (s1 >> sh) & 0xFF
    var b = (s2 >> sh) & 0xFF
    var c = (s3 >> sh) & 0xFF
    var sc: UInt32
    var mn: UInt32
    if j < 4:
        sc = a & 63
        mn = b & 63
    else:
        sc = (c & 15) | ((a >> 6) << 4)
        mn = (c >> 4) | ((b >> 6) << 4)
    return SIMD[DType.int32, 2](bitcast[DType.int32, 1](sc), bitcast[DType.int32, 1](mn))


@always_inline
def _spread4(t: UInt32) -> UInt32:
    """Bits 0..3 of t to bit 4 of bytes 0..3 (the shifted copies t << 7k do not overlap)."""
    return (((t & 15) * 0x00204081) & 0x01010101) << 4


@always_inline
def _dot[LO: Int, HI: Int](c: W8, x: W8, acc: Int32) -> Int32:
    """acc + sum over words LO..HI-1 of the byte products (codes < 128, activations int8)."""
    var s = acc
    comptime for e in range(LO, HI):
        s = _dp4a[True](c[e], x[e], s)
    return s


@always_inline
def _xsum[LO: Int, HI: Int](x: W8) -> Int32:
    """Sum of the int8 activation codes of words LO..HI-1."""
    var s: Int32 = 0
    comptime for e in range(LO, HI):
        s = _dp4a[True](UInt32(0x01010101), x[e], s)
    return s


@always_inline
def _kq_decode[QT: Int](
    hdr: SIMD[DType.uint32, 4], qa: W8, qb: W8, p: Int,
    mut c0: W8, mut c1: W8, mut isc: SIMD[DType.int32, 4], mut fs: SIMD[DType.float32, 2],
):
    """A unit's raw words (see _kq_step) -> codes c0 (first sub-block), c1 (second), the integer
    scales isc and the float scales fs. p: the unit's index in its super-block (0..3)."""
    comptime if QT == Q4_K or QT == Q5_K:
        c0 = qa & 0x0F0F0F0F
        c1 = (qa >> 4) & 0x0F0F0F0F
        comptime if QT == Q5_K:
            c0 |= ((qb >> W8(UInt32(2 * p))) & 0x01010101) << 4
            c1 |= ((qb >> W8(UInt32(2 * p + 1))) & 0x01010101) << 4
        var a = _kscale(hdr[1], hdr[2], hdr[3], 2 * p)
        var b = _kscale(hdr[1], hdr[2], hdr[3], 2 * p + 1)
        isc = SIMD[DType.int32, 4](a[0], b[0], a[1], b[1])
        fs = SIMD[DType.float32, 2](_f16_lo(hdr[0]), _f16_hi(hdr[0]))
    elif QT == Q6_K:
        var t = UInt32(p % 2)
        c0 = (qa & 0x0F0F0F0F) | (((qb >> W8(2 * t)) & 0x03030303) << 4)
        c1 = ((qa >> 4) & 0x0F0F0F0F) | (((qb >> W8(2 * t + 4)) & 0x03030303) << 4)
        # hdr[0]: scale bytes of sub-blocks s = 0, 1 of this half; hdr[1]: s = 2, 3 (two per sub-block)
        var sh = 16 * t
        isc = SIMD[DType.int32, 4](_sext8(hdr[0] >> sh), _sext8(hdr[0] >> (sh + 8)),
                                   _sext8(hdr[1] >> sh), _sext8(hdr[1] >> (sh + 8)))
        fs = SIMD[DType.float32, 2](_f16_lo(hdr[2]), 0)
    else:  # Q5_0 / Q5_1: qa words 0..3 = the 16 qs bytes, hdr = (qh, d bits, m bits)
        var qh = hdr[0]
        comptime for e in range(4):
            c0[e] = (qa[e] & 0x0F0F0F0F) | _spread4(qh >> UInt32(4 * e))
            c0[4 + e] = ((qa[e] >> 4) & 0x0F0F0F0F) | _spread4(qh >> UInt32(16 + 4 * e))
        fs = SIMD[DType.float32, 2](_f16_lo(hdr[1]), _f16_lo(hdr[2]))


@always_inline
def _kq_dot[QT: Int](
    c0: W8, c1: W8, isc: SIMD[DType.int32, 4], fs: SIMD[DType.float32, 2],
    x0: W8, s0: SIMD[DType.float32, 2], x1: W8, s1: SIMD[DType.float32, 2], acc: Float32,
) -> Float32:
    """acc + the unit's dot product with the activation blocks (x0, s0 = (dx, code sum)) and (x1, s1)."""
    var a = acc
    comptime if QT == Q4_K or QT == Q5_K:
        var d0 = _dot[0, 8](c0, x0, 0)
        var d1 = _dot[0, 8](c1, x1, 0)
        a = (fs[0] * s0[0]).fma(Float32(isc[0] * d0), a)
        a = (fs[0] * s1[0]).fma(Float32(isc[1] * d1), a)
        # m times the code sum is exact in float32 (< 2^18)
        a = (-(fs[1] * s0[0])).fma(Float32(isc[2]) * s0[1], a)
        a = (-(fs[1] * s1[0])).fma(Float32(isc[3]) * s1[1], a)
    elif QT == Q6_K:
        var l0 = _xsum[0, 4](x0)
        var l1 = _xsum[0, 4](x1)
        var h0 = Int32(s0[1]) - l0  # the block's code sum is an exact integer in float32
        var h1 = Int32(s1[1]) - l1
        var i0 = isc[0] * _dot[0, 4](c0, x0, -32 * l0) + isc[1] * _dot[4, 8](c0, x0, -32 * h0)
        var i1 = isc[2] * _dot[0, 4](c1, x1, -32 * l1) + isc[3] * _dot[4, 8](c1, x1, -32 * h1)
        a = (fs[0] * s0[0]).fma(Float32(i0), a)
        a = (fs[0] * s1[0]).fma(Float32(i1), a)
    elif QT == Q5_0:
        var i0 = _dot[0, 8](c0, x0, Int32(s0[1]) * -16)
        a = (fs[0] * s0[0]).fma(Float32(i0), a)
    else:  # Q5_1
        a = (fs[0] * s0[0]).fma(Float32(_dot[0, 8](c0, x0, 0)), a)
        a = fs[1].fma(s0[0] * s0[1], a)
    return a


@always_inline
def _kq_step[QT: Int, NT: Int, R: Int, U: Int, LANES: Int = WARP_SIZE](
    qx: U32P, xs: F32P, w: U32P, d: F16P, m: F16P, h: U32P,
    mut acc: SIMD[DType.float32, R * NT], u0: Int, n0: Int, t0: Int, nn: Int, tt: Int, kk: Int,
):
    """Units u0 + j LANES (j < U, all inside the row) of rows n0..n0+R-1 into acc. Every load
    of the U R units is issued before the first decode. (LANES: the warp's width; a parameter so a
    host build, where WARP_SIZE is 0, can run this function to check it.)"""
    var nb32 = kk // 32  # activation blocks per token
    var nsb = kk // 256
    var hdr = Array[SIMD[DType.uint32, 4], R * U](fill=SIMD[DType.uint32, 4](0))
    var qa = Array[W8, R * U](fill=W8(0))
    var qb = Array[W8, R * U](fill=W8(0))
    comptime for j in range(U):
        var u = u0 + j * LANES
        var p = u % 4
        comptime for r in range(R):
            var row = min(n0 + r, nn - 1)  # rows past N repeat the last one; never stored
            comptime i = j * R + r
            comptime if QT == Q4_K:
                var base = (row * nsb + u // 4) * 36
                hdr[i] = vload[4](w, base)
                qa[i] = vload[4](w, base + 4 + 8 * p).join(vload[4](w, base + 8 + 8 * p))
            elif QT == Q5_K:
                var base = (row * nsb + u // 4) * 44
                hdr[i] = vload[4](w, base)
                qb[i] = vload[4](w, base + 4).join(vload[4](w, base + 8))
                qa[i] = vload[4](w, base + 12 + 8 * p).join(vload[4](w, base + 16 + 8 * p))
            elif QT == Q6_K:
                var sb = row * nsb + u // 4
                var base = sb * 52
                var hh = p // 2
                qa[i] = vload[4](w, base + 16 * hh + 8 * (p % 2)).join(vload[4](w, base + 16 * hh + 8 * (p % 2) + 4))
                qb[i] = vload[4](w, base + 32 + 8 * hh).join(vload[4](w, base + 36 + 8 * hh))
                var sc = vload[2](w, base + 48 + 2 * hh)
                hdr[i] = SIMD[DType.uint32, 4](sc[0], sc[1], _f16_bits(d, sb), 0)
            else:  # Q5_0 / Q5_1
                var blk = row * nb32 + u
                qa[i] = vload[4](w, blk * 4).join(SIMD[DType.uint32, 4](0))
                var mb: UInt32 = 0
                comptime if QT == Q5_1:
                    mb = _f16_bits(m, blk)
                hdr[i] = SIMD[DType.uint32, 4](h[unsafe_offset=blk], _f16_bits(d, blk), mb, 0)
    var c0 = Array[W8, R * U](fill=W8(0))
    var c1 = Array[W8, R * U](fill=W8(0))
    var isc = Array[SIMD[DType.int32, 4], R * U](fill=SIMD[DType.int32, 4](0))
    var fs = Array[SIMD[DType.float32, 2], R * U](fill=SIMD[DType.float32, 2](0))
    comptime for j in range(U):
        var p = (u0 + j * LANES) % 4
        comptime for r in range(R):
            comptime i = j * R + r
            _kq_decode[QT](hdr[i], qa[i], qb[i], p, c0[i], c1[i], isc[i], fs[i])
    comptime for t in range(NT):
        if NT == 1 or t0 + t < tt:
            var xrow = (t0 + t) * nb32
            comptime for j in range(U):
                var u = u0 + j * LANES
                var xb0: Int
                var xb1: Int
                comptime if QT == Q4_K or QT == Q5_K:
                    xb0 = (u // 4) * 8 + 2 * (u % 4)
                    xb1 = xb0 + 1
                elif QT == Q6_K:
                    xb0 = (u // 4) * 8 + 4 * ((u % 4) // 2) + u % 2
                    xb1 = xb0 + 2
                else:
                    xb0 = u
                    xb1 = u
                var x0 = vload[4](qx, (xrow + xb0) * 8).join(vload[4](qx, (xrow + xb0) * 8 + 4))
                var s0 = vload[2](xs, (xrow + xb0) * 2)
                var x1 = W8(0)
                var s1 = SIMD[DType.float32, 2](0)
                comptime if kq_is_kquant[QT]():
                    x1 = vload[4](qx, (xrow + xb1) * 8).join(vload[4](qx, (xrow + xb1) * 8 + 4))
                    s1 = vload[2](xs, (xrow + xb1) * 2)
                comptime for r in range(R):
                    comptime i = j * R + r
                    acc[r * NT + t] = _kq_dot[QT](c0[i], c1[i], isc[i], fs[i], x0, s0, x1, s1, acc[r * NT + t])


def gemv_kq_kernel[QT: Int, NT: Int, R: Int](
    qx: U32P, xs: F32P, w: U32P, d: F16P, m: F16P, h: U32P, bias: F32P, y: F32P,
    has_bias: Int64, T: Int64, N: Int64, K: Int64,
):
    """y[t, n] = x[t, :] . dequant(w[n, :]) (+ bias[n]) for the R rows of this warp and tokens
    t0 = NT block_idx.y .. t0 + NT - 1, x given quantized (qx int8 [T, K], xs (dx, code sum) per 32).
    K: a multiple of 256 (k-quants) or 32 (Q5_x)."""
    comptime U = 2 if NT == 1 and R <= 2 else 1  # units of each row in flight per lane
    var nn = Int(N)
    var tt = Int(T)
    var kk = Int(K)
    var lane = Int(lane_id())
    var n0 = (Int(block_idx.x) * KQ_WARPS + Int(thread_idx.x) // WARP_SIZE) * R
    if n0 >= nn:  # the whole warp leaves
        return
    var t0 = Int(block_idx.y) * NT
    var units = kk // kq_unit[QT]()
    var acc = SIMD[DType.float32, R * NT](0)  # [row r][token t]
    var u = lane
    comptime if U > 1:
        while u + (U - 1) * WARP_SIZE < units:
            _kq_step[QT, NT, R, U](qx, xs, w, d, m, h, acc, u, n0, t0, nn, tt, kk)
            u += U * WARP_SIZE
    while u < units:
        _kq_step[QT, NT, R, 1](qx, xs, w, d, m, h, acc, u, n0, t0, nn, tt, kk)
        u += WARP_SIZE
    comptime for r in range(R):
        var b: Float32 = 0
        if has_bias != 0 and n0 + r < nn:
            b = bias[unsafe_offset=n0 + r]
        comptime for t in range(NT):
            var s = warp.sum(acc[r * NT + t])
            if lane == 0 and n0 + r < nn and t0 + t < tt:
                y[unsafe_offset=(t0 + t) * nn + n0 + r] = s + b


# ---- dequantization (element-wise; bit-identical to gguf.quants.dequantize) --------------------
@always_inline
def _f16_at(w: U8P, off: Int) -> Float32:
    """The float16 at byte offset off (even) of w."""
    return F16P(unsafe_from_address=Int(w.unsafe_offset(off)))[].cast[DType.float32]()


@always_inline
def kq_dequant_one[QT: Int](w: U8P, d: F16P, m: F16P, h: U32P, row: Int, kk: Int, j: Int) -> Float32:
    """Weight j of `row` (K = kk) in the device layout above. A * code is exact in float32, so the
    one rounding (of the FMA with the min) is numpy's."""
    comptime if QT == Q5_0 or QT == Q5_1:
        var blk = row * (kk // 32) + j // 32
        var e = j % 32
        var byte = w[unsafe_offset=blk * 16 + e % 16].cast[DType.int32]()
        var nib = byte & 15 if e < 16 else byte >> 4
        var q = nib | (bitcast[DType.int32, 1]((h[unsafe_offset=blk] >> UInt32(e)) & 1) << 4)
        var dd = d[unsafe_offset=blk].cast[DType.float32]()
        comptime if QT == Q5_0:
            return Float32(q - 16) * dd
        else:
            return Float32(q).fma(dd, m[unsafe_offset=blk].cast[DType.float32]())
    else:
        var sb = row * (kk // 256) + j // 256
        var e = j % 256
        var l = e % 32
        comptime if QT == Q4_K or QT == Q5_K:
            comptime QS = 16 if QT == Q4_K else 48
            var base = sb * (144 if QT == Q4_K else 176)
            var g = e // 32
            var s = _kscale(
                bitcast[DType.uint32, 1](w.unsafe_load[width=4](base + 4)),
                bitcast[DType.uint32, 1](w.unsafe_load[width=4](base + 8)),
                bitcast[DType.uint32, 1](w.unsafe_load[width=4](base + 12)),
                g,
            )
            var q = (w[unsafe_offset=base + QS + 32 * (g // 2) + l].cast[DType.int32]() >> Int32(4 * (g % 2))) & 15
            comptime if QT == Q5_K:
                q |= ((w[unsafe_offset=base + 16 + l].cast[DType.int32]() >> Int32(g)) & 1) << 4
            var a = _f16_at(w, base) * Float32(s[0])
            var b = _f16_at(w, base + 2) * Float32(s[1])
            return Float32(q).fma(a, -b)
        else:  # Q6_K
            var base = sb * 208
            var hh = e // 128
            var s = (e % 128) // 32
            var nib = (w[unsafe_offset=base + 64 * hh + 32 * (s % 2) + l].cast[DType.int32]() >> Int32(4 * (s // 2))) & 15
            var hi = (w[unsafe_offset=base + 128 + 32 * hh + l].cast[DType.int32]() >> Int32(2 * s)) & 3
            var sc = bitcast[DType.int8, 1](w[unsafe_offset=base + 192 + e // 16]).cast[DType.float32]()
            var a = d[unsafe_offset=sb].cast[DType.float32]() * sc
            return Float32((nib | (hi << 4)) - 32) * a


def dequant_kq_kernel[QT: Int, odt: DType](
    w: U8P, d: F16P, m: F16P, h: U32P, dst: Ptr[odt], N: Int64, K: Int64
):
    """Whole matrix -> dense [N, K] (before a GEMM when many tokens share the weights)."""
    var i = Int(global_idx.x)
    var k = Int(K)
    if i >= Int(N) * k:
        return
    dst[unsafe_offset=i] = kq_dequant_one[QT](w, d, m, h, i // k, k, i % k).cast[odt]()


def embedding_kq_kernel[QT: Int](
    w: U8P, d: F16P, m: F16P, h: U32P, ids: I32P, dst: F32P, err: I32P, V: Int64, Hd: Int64
):
    var t = Int(block_idx.x)
    var hd = Int(Hd)
    var id = Int(ids[unsafe_offset=t])
    var row0 = t * hd
    if id < 0 or id >= Int(V):
        if thread_idx.x == 0:
            flag(err, ERR_TOKEN)
        for j in range(Int(thread_idx.x), hd, Int(block_dim.x)):
            dst[unsafe_offset=row0 + j] = 0
        return
    for j in range(Int(thread_idx.x), hd, Int(block_dim.x)):
        dst[unsafe_offset=row0 + j] = kq_dequant_one[QT](w, d, m, h, id, hd, j)
