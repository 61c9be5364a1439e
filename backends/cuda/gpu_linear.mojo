# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound; dense: a warp per few rows, 16-byte
#                            weight loads; quant: a block per few rows splitting K; NT tokens per
#                            pass so each weight is read once per pass
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
# A block of QG_THREADS threads owns R rows (and the NT tokens of block_idx.y) and splits K among its
# threads: thread i takes the 8-weight units i, i + QG_THREADS, ... of each row. A unit is one
# 32-bit word of a Q4 block (bytes 4c..4c+3: weights 4c..4c+3 in the low nibbles, 16+4c..19+4c in
# the high ones) or two words of a Q8 block (weights 8c..8c+7). So a warp's weight load is 128
# (Q4) or 256 (Q8) contiguous bytes, and its x loads are float4s covering 64-byte halves of cache
# lines (Q4) or whole lines (Q8): x, 4 bytes a weight, comes from L1 and is loaded once for R rows.
# U units of every row (words and scales) are loaded before the first multiply. A quant becomes a
# float without a conversion instruction: one byte permute builds the float 2^23 + q, and one
# subtraction removes 2^23 (and Q4_0's 8, Q8_0's 128) exactly; then 8 FMAs, and one FMA with the
# block's scale. The sums stay float32: warp shuffles, then shared memory across the warps.
comptime QG_THREADS = 128


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
def _qgemv_step[QT: Int, NT: Int, R: Int, U: Int, TAIL: Bool](
    x: F32P, qs: Ptr[DType.uint32], d: F16P, m: F16P, mut acc: SIMD[DType.float32, R * NT],
    u: Int, n0: Int, t0: Int, nn: Int, tt: Int, kk: Int, nu: Int,
):
    """Units u + j QG_THREADS (j < U) of rows n0..n0+R-1 into acc. TAIL: some of them may lie past
    the row's nu units; those load the last unit again and are not summed."""
    comptime QW = 2 if QT == Q8_0 else 1  # 32-bit words per unit
    var nb = nu // 4
    var qv = Array[SIMD[DType.uint32, QW], R * U](fill=SIMD[DType.uint32, QW](0))
    var dv = Array[Float16, R * U](fill=Float16(0))
    var mv = Array[Float16, R * U](fill=Float16(0))
    var xs = Array[SIMD[DType.float32, 8], U](fill=SIMD[DType.float32, 8](0))
    comptime for j in range(U):
        var uj = u + j * QG_THREADS
        comptime if TAIL:
            uj = min(uj, nu - 1)
        comptime for r in range(R):
            var row = min(n0 + r, nn - 1)  # rows past N repeat the last one; never stored
            qv[j * R + r] = vload[QW](qs, (row * nu + uj) * QW)
            dv[j * R + r] = d[unsafe_offset=row * nb + (uj >> 2)]
            comptime if QT == Q4_1:
                mv[j * R + r] = m[unsafe_offset=row * nb + (uj >> 2)]
        comptime if NT == 1:
            comptime if QT == Q8_0:
                xs[j] = vload[8](x, t0 * kk + uj * 8)
            else:
                var xo = t0 * kk + (uj >> 2) * 32 + (uj & 3) * 4
                xs[j] = vload[4](x, xo).join(vload[4](x, xo + 16))
    comptime for j in range(U):
        var uj = u + j * QG_THREADS
        var live = True
        comptime if TAIL:
            live = uj < nu
            uj = min(uj, nu - 1)
        var xo = uj * 8 if QT == Q8_0 else (uj >> 2) * 32 + (uj & 3) * 4
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
                var xv: SIMD[DType.float32, 8]
                comptime if NT == 1:
                    xv = xs[j]
                else:
                    var xt = (t0 + t) * kk + xo
                    comptime if QT == Q8_0:
                        xv = vload[8](x, xt)
                    else:
                        xv = vload[4](x, xt).join(vload[4](x, xt + 16))
                var sx: Float32 = 0
                comptime if QT == Q4_1:
                    sx = xv.reduce_add()
                comptime for r in range(R):
                    acc[r * NT + t] = sd[r].fma(_dot8(wf[r], xv), acc[r * NT + t])  # d sum(q x)
                    comptime if QT == Q4_1:
                        acc[r * NT + t] = sm[r].fma(sx, acc[r * NT + t])  # Q4_1 (w = d q + m): + m sum(x)


def gemv_quant_kernel[QT: Int, NT: Int, R: Int](
    x: F32P, qs: Ptr[DType.uint32], d: F16P, m: F16P, bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64,
    K: Int64,
):
    """y[t, n] = x[t, :] . dequant(w[n, :]) (+ bias[n]) for rows n0 = R block_idx.x .. n0 + R - 1 and
    tokens t0 = NT block_idx.y .. t0 + NT - 1. K is a multiple of 32; x rows are 16-byte aligned."""
    comptime U = 4 if NT == 1 else 2  # units of each row in flight per thread
    comptime NV = R * NT
    comptime NW = QG_THREADS // WARP_SIZE
    var nn = Int(N)
    var tt = Int(T)
    var kk = Int(K)
    var nu = kk // 8
    var n0 = block_idx.x * R
    var t0 = block_idx.y * NT
    var tid = thread_idx.x
    var acc = SIMD[DType.float32, NV](0)  # [row r][token t]
    var u = tid
    while u + (U - 1) * QG_THREADS < nu:
        _qgemv_step[QT, NT, R, U, False](x, qs, d, m, acc, u, n0, t0, nn, tt, kk, nu)
        u += U * QG_THREADS
    if u < nu:
        _qgemv_step[QT, NT, R, U, True](x, qs, d, m, acc, u, n0, t0, nn, tt, kk, nu)
    var partial = stack_allocation[NW * NV, Float32, address_space=AddressSpace.SHARED]()
    comptime for v in range(NV):
        var s = warp.sum(acc[v])
        if lane_id() == 0:
            partial[unsafe_offset=(tid // WARP_SIZE) * NV + v] = s
    barrier()
    if tid < NV:
        var r = tid // NT
        var t = tid % NT
        var s: Float32 = 0
        comptime for w in range(NW):
            s += partial[unsafe_offset=w * NV + tid]
        if n0 + r < nn and t0 + t < tt:
            if has_bias != 0:
                s += bias[unsafe_offset=n0 + r]
            y[unsafe_offset=(t0 + t) * nn + n0 + r] = s


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
