# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound; dense: a warp per few rows, 16-byte
#                            weight loads; quant: a warp per 4 rows (or KS warps splitting K),
#                            loads of the next step in flight; NT tokens per pass so each weight is
#                            read once per pass
#   gemm_simt                float32 weights, and every GEMM on AMD: 64x64 tiles in shared memory,
#                            4x4 per thread
# 16-bit GEMMs on NVIDIA are Modular's (gpu_library.mojo): our mma.sync and wgmma kernels ran at
# 0.3-0.75x of them on an H200 and were deleted.
#
# W is read as [N, K] row-major (torch's Linear layout): A and B are K-contiguous ("TN").

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.sys import size_of, is_nvidia_gpu
from max.gpu import thread_idx, block_idx, block_dim, grid_dim, global_idx, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import AddressSpace
from std.sys._assembly import inlined_assembly

from gpu_common import SharedPtr, Ptr, F32P, U8P, I8P, F16P, vload, Q4_0, Q4_1, Q8_0

comptime GEMV_WARPS = 8


# ---- GEMV, dense weights ----------------------------------------------------------------------
# A warp owns R consecutive rows at a time (the x vector it loads serves all R) and strides over
# row groups with the whole grid, so a launch of a few blocks per SM covers any N in one wave.
# R * U = 8 sixteen-byte weight loads are in flight per lane before the first multiply.
@always_inline
def _gemv_rows[wdt: DType, NT: Int, R: Int, U: Int](
    x: F32P, w: Ptr[wdt], bias: F32P, y: F32P, has_bias: Int64, T: Int, N: Int, K: Int, n0: Int, t0: Int
):
    var lane = lane_id()
    comptime VW = 16 // size_of[wdt]()
    comptime STEP = WARP_SIZE * VW
    var acc = SIMD[DType.float32, R * NT](0)  # [row r][token t]
    var k0 = 0
    while k0 + U * STEP <= K:
        var wv = Array[SIMD[wdt, VW], R * U](fill=SIMD[wdt, VW](0))  # raw: 4 registers per load
        comptime for u in range(U):
            comptime for r in range(R):
                var row = min(n0 + r, N - 1)  # rows past N repeat the last one; never stored
                wv[u * R + r] = vload[VW](w, row * K + k0 + u * STEP + lane * VW)
        comptime for u in range(U):
            var off = k0 + u * STEP + lane * VW
            comptime for t in range(NT):
                if t0 + t < T:
                    var xv = vload[VW](x, (t0 + t) * K + off)
                    comptime for r in range(R):
                        acc[r * NT + t] += (wv[u * R + r].cast[DType.float32]() * xv).reduce_add()
        k0 += U * STEP
    while k0 < K:
        var off = k0 + lane * VW
        if off < K:
            comptime for t in range(NT):
                if t0 + t < T:
                    var xv = vload[VW](x, (t0 + t) * K + off)
                    comptime for r in range(R):
                        var row = min(n0 + r, N - 1)
                        acc[r * NT + t] += (vload[VW](w, row * K + off).cast[DType.float32]() * xv).reduce_add()
        k0 += STEP
    comptime for r in range(R):
        var b: Float32 = 0
        if has_bias != 0 and n0 + r < N:
            b = bias[unsafe_offset=n0 + r]
        comptime for t in range(NT):
            var s = warp.sum(acc[r * NT + t])
            if lane == 0 and n0 + r < N and t0 + t < T:
                y[unsafe_offset=(t0 + t) * N + n0 + r] = s + b


def gemv_dense_kernel[wdt: DType, NT: Int, R: Int](
    x: F32P, w: Ptr[wdt], bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64, K: Int64
):
    """Tokens t0..t0+NT-1 of block_idx.y. K is a multiple of the 16-byte vector width and the rows
    are 16-byte aligned (checked on the host)."""
    var nn = Int(N)
    var groups = ceildiv(nn, R)
    var warps = grid_dim.x * GEMV_WARPS
    var t0 = block_idx.y * NT
    var g = block_idx.x * GEMV_WARPS + thread_idx.x // WARP_SIZE
    while g < groups:
        _gemv_rows[wdt, NT, R, 8 // R](x, w, bias, y, has_bias, Int(T), nn, Int(K), g * R, t0)
        g += warps


def gemv_scalar_kernel[wdt: DType, NT: Int](
    x: F32P, w: Ptr[wdt], bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64, K: Int64
):
    """Any K, any alignment: one warp per row, element loads."""
    var n = block_idx.x * GEMV_WARPS + thread_idx.x // WARP_SIZE
    var nn = Int(N)
    if n >= nn:
        return
    var lane = lane_id()
    var tt = Int(T)
    var kk = Int(K)
    var t0 = block_idx.y * NT
    var acc = SIMD[DType.float32, NT](0)
    for k in range(lane, kk, WARP_SIZE):
        var wf = w[unsafe_offset=n * kk + k].cast[DType.float32]()
        comptime for t in range(NT):
            if t0 + t < tt:
                acc[t] += wf * x[unsafe_offset=(t0 + t) * kk + k]
    var b: Float32 = 0
    if has_bias != 0:
        b = bias[unsafe_offset=n]
    comptime for t in range(NT):
        var s = warp.sum(acc[t])
        if lane == 0 and t0 + t < tt:
            y[unsafe_offset=(t0 + t) * nn + n] = s + b


# ---- GEMV, GGUF-quantized weights (repacked: qs [N, nb, 16|32] bytes, d/m [N, nb] f16) ----------
# A warp owns QG_ROWS rows (and the NT tokens of block_idx.y) and the units of one of KS interleaved
# parts of K (KS warps of a block share the rows when N alone gives too few warps); it streams
# through them with the next step's loads in flight while it computes the current one. A unit is one
# 32-bit word of a Q4 block (bytes 4c..4c+3: weights 4c..4c+3 in the low nibbles, 16+4c..19+4c in
# the high ones) or two words of a Q8 block (weights 8c..8c+7); lane l takes unit l of each slot of
# WARP_SIZE units, part p the slots p, p + KS, ..., so a warp's weight load is 128 (Q4) or 256 (Q8)
# contiguous bytes, and its x loads are float4s covering 64-byte halves of cache lines (Q4) or whole
# lines (Q8): x, 4 bytes a weight, comes from L1 and is loaded once for the QG_ROWS rows. A step is
# U slots of every row: U * QG_ROWS words (and f16 scales) per lane. A quant becomes a float without
# a conversion instruction: one byte permute builds the float 2^23 + q, and one subtraction removes
# 2^23 (and Q4_0's 8, Q8_0's 128) exactly; then 8 FMAs, and one FMA with the block's scale. The sums
# stay float32: warp shuffles (and shared memory across the KS warps of a row group).
comptime QG_WARPS = 4
comptime QG_THREADS = QG_WARPS * WARP_SIZE
comptime QG_ROWS = 4


@always_inline
def _byte_f32[e: Int](w: UInt32) -> Float32:
    """The float 2^23 + (byte e of w), exact."""
    var bits: UInt32
    comptime if is_nvidia_gpu():
        bits = inlined_assembly["prmt.b32 $0, $1, $2, $3;", UInt32, constraints="=r,r,r,r", has_side_effect=False](
            w, UInt32(0x4B000000), UInt32(0x7440 | e)
        )
    else:
        bits = ((w >> UInt32(8 * e)) & 0xFF) | 0x4B000000
    return bitcast[DType.float32, 1](bits)


@always_inline
def _unit_weights[QT: Int, QW: Int](q: SIMD[DType.uint32, QW]) -> SIMD[DType.float32, 8]:
    """The 8 quants of a unit as exact floats (Q4_0: q - 8, Q4_1: q, Q8_0: the int8), in the order
    of the unit's x values: Q4 [low nibbles of bytes 0..3, high nibbles], Q8 [bytes 0..7]."""
    comptime OFF = Float32(8388616.0) if QT == Q4_0 else (Float32(8388736.0) if QT == Q8_0 else Float32(8388608.0))
    var lo: UInt32
    var hi: UInt32
    comptime if QT == Q8_0:
        lo = q[0] ^ 0x80808080  # int8 q -> unsigned byte q + 128
        hi = q[QW - 1] ^ 0x80808080
    else:
        lo = q[0] & 0x0F0F0F0F
        hi = (q[0] >> 4) & 0x0F0F0F0F
    var v = SIMD[DType.float32, 8](0)
    comptime for e in range(4):
        v[e] = _byte_f32[e](lo) - OFF
        v[4 + e] = _byte_f32[e](hi) - OFF
    return v


@always_inline
def _dot8(w: SIMD[DType.float32, 8], xv: SIMD[DType.float32, 8]) -> Float32:
    var s = w[0] * xv[0]
    comptime for e in range(1, 8):
        s = w[e].fma(xv[e], s)
    return s


@always_inline
def _qxo[QT: Int](uj: Int) -> Int:
    """Where unit uj's first x value lies in its row (the unit uj + WARP_SIZE j's: 8 WARP_SIZE j on)."""
    comptime if QT == Q8_0:
        return uj * 8
    else:
        return (uj >> 2) * 32 + (uj & 3) * 4


@always_inline
def _qx[QT: Int](x: F32P, xo: Int) -> SIMD[DType.float32, 8]:
    """The 8 x values of the unit whose first x value is x[xo]."""
    comptime if QT == Q8_0:
        return vload[8](x, xo)
    else:
        return vload[4](x, xo).join(vload[4](x, xo + 16))


@always_inline
def _qload[QT: Int, U: Int, TAIL: Bool](
    qs: Ptr[DType.uint32], d: F16P, m: F16P,
    mut qv: Array[SIMD[DType.uint32, 2 if QT == Q8_0 else 1], QG_ROWS * U],
    mut dv: Array[Float16, QG_ROWS * U], mut mv: Array[Float16, QG_ROWS * U],
    u: Int, ue: Int, n0: Int, nn: Int, nu: Int,
):
    """Issue the loads of units u + j WARP_SIZE (j < U) of rows n0..n0+QG_ROWS-1: words and scales.
    TAIL: units at or past ue load unit ue - 1 again (the multiply gives them a zero scale)."""
    comptime QW = 2 if QT == Q8_0 else 1  # 32-bit words per unit
    var nb = nu // 4
    comptime for r in range(QG_ROWS):
        var row = min(n0 + r, nn - 1)  # rows past N repeat the last one; never stored
        var qo = (row * nu + u) * QW
        var bo = row * nb + (u >> 2)
        comptime for j in range(U):
            comptime if TAIL:
                var uj = min(u + j * WARP_SIZE, ue - 1)
                qo = (row * nu + uj) * QW
                bo = row * nb + (uj >> 2)
            comptime jq = 0 if TAIL else j * WARP_SIZE * QW  # constant offsets from the row's base
            comptime jb = 0 if TAIL else j * (WARP_SIZE // 4)
            qv[j * QG_ROWS + r] = vload[QW](qs, qo + jq)
            dv[j * QG_ROWS + r] = d[unsafe_offset=bo + jb]
            comptime if QT == Q4_1:
                mv[j * QG_ROWS + r] = m[unsafe_offset=bo + jb]


@always_inline
def _qmul[QT: Int, NT: Int, U: Int, TAIL: Bool](
    x: F32P, qv: Array[SIMD[DType.uint32, 2 if QT == Q8_0 else 1], QG_ROWS * U],
    dv: Array[Float16, QG_ROWS * U], mv: Array[Float16, QG_ROWS * U],
    mut acc: SIMD[DType.float32, QG_ROWS * NT], u: Int, ue: Int, t0: Int, tt: Int, kk: Int,
):
    """acc[r, t] += the loaded units (u + j WARP_SIZE) of row r . x[t0 + t]; each decoded unit serves
    the NT tokens, whose x vectors come from L1 (every warp of the SM walks the same x)."""
    comptime QW = 2 if QT == Q8_0 else 1
    comptime R = QG_ROWS
    var xo0 = _qxo[QT](u)
    comptime for j in range(U):
        var xo = xo0 + j * 8 * WARP_SIZE
        var live = True
        comptime if TAIL:
            var uj = u + j * WARP_SIZE
            live = uj < ue
            xo = _qxo[QT](min(uj, ue - 1))
        var wf = Array[SIMD[DType.float32, 8], R](fill=SIMD[DType.float32, 8](0))
        var sd = Array[Float32, R](fill=Float32(0))
        var sm = Array[Float32, R](fill=Float32(0))
        comptime for r in range(R):
            wf[r] = _unit_weights[QT, QW](qv[j * R + r])
            sd[r] = dv[j * R + r].cast[DType.float32]() if live else Float32(0)
            comptime if QT == Q4_1:
                sm[r] = mv[j * R + r].cast[DType.float32]() if live else Float32(0)
        comptime for t in range(NT):
            if NT == 1 or t0 + t < tt:
                var xv = _qx[QT](x, (t0 + t) * kk + xo)
                var sx: Float32 = 0
                comptime if QT == Q4_1:
                    sx = xv.reduce_add()
                comptime for r in range(R):
                    acc[r * NT + t] = sd[r].fma(_dot8(wf[r], xv), acc[r * NT + t])  # d sum(q x)
                    comptime if QT == Q4_1:
                        acc[r * NT + t] = sm[r].fma(sx, acc[r * NT + t])  # Q4_1 (w = d q + m): + m sum(x)


def gemv_quant_kernel[QT: Int, NT: Int](
    x: F32P, qs: Ptr[DType.uint32], d: F16P, m: F16P, bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64,
    K: Int64, KS: Int64,
):
    """y[t, n] = x[t, :] . dequant(w[n, :]) (+ bias[n]) for tokens t0 = NT block_idx.y .. t0 + NT - 1.
    Warp w of block b: rows n0 = QG_ROWS (b QG_WARPS / KS + w / KS) .., part w % KS of K (contiguous
    runs of whole slots). KS divides QG_WARPS; K is a multiple of 32; x rows are 16-byte aligned."""
    comptime U = (4 if QT == Q4_0 else 2) if NT == 1 else 1  # slots of every row per step
    comptime R = QG_ROWS
    comptime NV = R * NT
    comptime QW = 2 if QT == Q8_0 else 1
    var nn = Int(N)
    var tt = Int(T)
    var kk = Int(K)
    var ks = Int(KS)
    var nu = kk // 8
    var wid = thread_idx.x // WARP_SIZE
    var lane = lane_id()
    var gpb = QG_WARPS // ks  # row groups per block
    var n0 = (block_idx.x * gpb + wid // ks) * R
    var t0 = block_idx.y * NT
    var per = ceildiv(ceildiv(nu, WARP_SIZE), ks) * WARP_SIZE  # units of a part
    var s0 = (wid % ks) * per  # the step's first unit (warp-uniform)
    var ue = min(nu, s0 + per)  # the part's end
    var acc = SIMD[DType.float32, NV](0)  # [row r][token t]
    if n0 < nn:
        var qv = Array[SIMD[DType.uint32, QW], R * U](fill=SIMD[DType.uint32, QW](0))
        var dv = Array[Float16, R * U](fill=Float16(0))
        var mv = Array[Float16, R * U](fill=Float16(0))
        if s0 + U * WARP_SIZE <= ue:  # a full step: every unit of every lane in the part
            _qload[QT, U, False](qs, d, m, qv, dv, mv, s0 + lane, ue, n0, nn, nu)
            while True:
                var s1 = s0 + U * WARP_SIZE
                var more = s1 + U * WARP_SIZE <= ue
                var qn = Array[SIMD[DType.uint32, QW], R * U](fill=SIMD[DType.uint32, QW](0))
                var dn = Array[Float16, R * U](fill=Float16(0))
                var mn = Array[Float16, R * U](fill=Float16(0))
                if more:  # the next full step's loads go out before this step's multiplies
                    _qload[QT, U, False](qs, d, m, qn, dn, mn, s1 + lane, ue, n0, nn, nu)
                _qmul[QT, NT, U, False](x, qv, dv, mv, acc, s0 + lane, ue, t0, tt, kk)
                s0 = s1
                if not more:
                    break
                qv = qn^
                dv = dn^
                mv = mn^
        if s0 < ue:  # the ragged last step (some units past the part)
            _qload[QT, U, True](qs, d, m, qv, dv, mv, s0 + lane, ue, n0, nn, nu)
            _qmul[QT, NT, U, True](x, qv, dv, mv, acc, s0 + lane, ue, t0, tt, kk)
    if ks == 1:
        comptime for v in range(NV):
            var s = warp.sum(acc[v])
            var r = v // NT
            var t = v % NT
            if lane == 0 and n0 + r < nn and t0 + t < tt:
                if has_bias != 0:
                    s += bias[unsafe_offset=n0 + r]
                y[unsafe_offset=(t0 + t) * nn + n0 + r] = s
    else:
        var partial = stack_allocation[QG_WARPS * NV, Float32, address_space=AddressSpace.SHARED]()
        comptime for v in range(NV):
            var s = warp.sum(acc[v])
            if lane == 0:
                partial[unsafe_offset=wid * NV + v] = s
        barrier()
        var tid = thread_idx.x
        if tid < gpb * NV:  # thread (row group g, value v) adds the KS parts
            var g = tid // NV
            var v = tid % NV
            var r = v // NT
            var t = v % NT
            var row = (block_idx.x * gpb + g) * R + r
            var s: Float32 = 0
            for p in range(ks):
                s += partial[unsafe_offset=(g * ks + p) * NV + v]
            if row < nn and t0 + t < tt:
                if has_bias != 0:
                    s += bias[unsafe_offset=row]
                y[unsafe_offset=(t0 + t) * nn + row] = s


# ---- SIMT GEMM (float32 weights, any K; the portable fallback) ---------------------------------
comptime SG_BM = 64
comptime SG_BN = 64
comptime SG_BK = 16
comptime SG_LD = SG_BM + 1  # padded: stores of a k-column land in distinct banks


def gemm_simt_kernel[adt: DType, wdt: DType](
    a: Ptr[adt], w: Ptr[wdt], bias: F32P, c: F32P, has_bias: Int64, M: Int64, N: Int64, K: Int64
):
    var As = stack_allocation[SG_BK * SG_LD, Float32, address_space=AddressSpace.SHARED]()
    var Ws = stack_allocation[SG_BK * SG_LD, Float32, address_space=AddressSpace.SHARED]()
    var mm = Int(M)
    var nn = Int(N)
    var kk = Int(K)
    var tid = thread_idx.x
    var tx = tid % 16
    var ty = tid // 16
    var m0 = block_idx.y * SG_BM
    var n0 = block_idx.x * SG_BN
    var acc = SIMD[DType.float32, 16](0)
    for k0 in range(0, kk, SG_BK):
        # 64 rows x 16 k of A and of W: 4 elements per thread each, coalesced along k.
        comptime for r in range(4):
            var e = tid + 256 * r
            var row = e // SG_BK
            var kc = e % SG_BK
            var gk = k0 + kc
            var av: Float32 = 0
            if m0 + row < mm and gk < kk:
                av = a[unsafe_offset=(m0 + row) * kk + gk].cast[DType.float32]()
            As[unsafe_offset=kc * SG_LD + row] = av
            var wv: Float32 = 0
            if n0 + row < nn and gk < kk:
                wv = w[unsafe_offset=(n0 + row) * kk + gk].cast[DType.float32]()
            Ws[unsafe_offset=kc * SG_LD + row] = wv
        barrier()
        comptime for k in range(SG_BK):
            var av = SIMD[DType.float32, 4](0)
            var wv = SIMD[DType.float32, 4](0)
            comptime for i in range(4):
                av[i] = As[unsafe_offset=k * SG_LD + ty + 16 * i]
                wv[i] = Ws[unsafe_offset=k * SG_LD + tx + 16 * i]
            comptime for i in range(4):
                comptime for j in range(4):
                    acc[i * 4 + j] += av[i] * wv[j]
        barrier()
    comptime for i in range(4):
        var row = m0 + ty + 16 * i
        comptime for j in range(4):
            var col = n0 + tx + 16 * j
            if row < mm and col < nn:
                var v = acc[i * 4 + j]
                if has_bias != 0:
                    v += bias[unsafe_offset=col]
                c[unsafe_offset=row * nn + col] = v
