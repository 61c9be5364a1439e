# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound; dense: a warp per few rows, 16-byte
#                            weight loads; quant: a block per few rows splitting K, int8
#                            activations and dp4a; NT tokens per pass so each weight is read once
#                            per pass
#   gemm_simt                float32 weights, and every GEMM on AMD: 64x64 tiles in shared memory,
#                            4x4 per thread
# 16-bit GEMMs on NVIDIA are Modular's (gpu_library.mojo): our mma.sync and wgmma kernels ran at
# 0.3-0.75x of them on an H200 and were deleted.
#
# W is read as [N, K] row-major (torch's Linear layout): A and B are K-contiguous ("TN").

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.sys import size_of, is_nvidia_gpu
from max.gpu import thread_idx, block_idx, grid_dim, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import AddressSpace
from std.sys._assembly import inlined_assembly

from gpu_common import Ptr, F32P, F16P, vload, Q4_0, Q4_1, Q8_0

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
# Activations arrive quantized like llama.cpp's Q8_1 (quantize_q8_kernel in gpu_elementwise): qx
# int8 [T, K] and xs float32 [T, nb, 2] = (dx, sum of the block's 32 codes), x ~= dx * qx per
# 32-block. A block of QG_THREADS threads owns R rows (and the NT tokens of block_idx.y) and splits
# K by whole 32-weight blocks: thread i takes quant blocks i, i + QG_THREADS, ... of each row, so a
# warp reads 32 consecutive blocks of a row (512 B of Q4, 1 KB of Q8) with one 16-byte load per
# lane (two for Q8), and its 32 x codes (two 16-byte loads, from L1, shared by the R rows). U blocks
# of every row (words and f16 scales) are loaded before the first multiply. Products: dp4a (4 int8
# products + an add per instruction) into an exact int32 block sum, then one FMA with d * dx:
#   Q4_0 (w = d (q - 8)): d dx (sum q qx - 8 sum qx), the -8 sum qx folded into the dp4a chain
#   Q4_1 (w = d q + m):   d dx sum q qx + m dx sum qx
#   Q8_0 (w = d q):       d dx sum q qx
# Q4 nibbles need no shift for the high half: (word & 0xF0F0F0F0) holds 16 q as unsigned bytes, and
# its unsigned x signed dp4a chain, shifted right by 4 at the end, is exact. The sums stay float32:
# warp shuffles, then shared memory across the warps.
comptime QG_THREADS = 128


@always_inline
def _dp4a[A_SIGNED: Bool](a: UInt32, b: UInt32, c: Int32) -> Int32:
    """c + the sum of the 4 byte products of a (signed or unsigned bytes) and b (signed bytes)."""
    comptime if is_nvidia_gpu():
        comptime ASM = "dp4a.s32.s32 $0, $1, $2, $3;" if A_SIGNED else "dp4a.u32.s32 $0, $1, $2, $3;"
        return inlined_assembly[ASM, Int32, constraints="=r,r,r,r", has_side_effect=False](a, b, c)
    else:
        var bs = bitcast[DType.int8, 4](b).cast[DType.int32]()
        var av: SIMD[DType.int32, 4]
        comptime if A_SIGNED:
            av = bitcast[DType.int8, 4](a).cast[DType.int32]()
        else:
            av = bitcast[DType.uint8, 4](a).cast[DType.int32]()
        return c + (av * bs).reduce_add()


@always_inline
def _block_dot[QT: Int](q: SIMD[DType.uint32, 8], xq: SIMD[DType.uint32, 8], c: Int32) -> Int32:
    """c + sum over the 32 weights of code * activation code (Q4: nibbles 0..15; Q8: int8)."""
    comptime if QT == Q8_0:
        var s = c
        comptime for e in range(8):
            s = _dp4a[True](q[e], xq[e], s)
        return s
    else:
        # Q4 word e (bytes 4e..4e+3): low nibbles = weights 4e..4e+3 (x word e), high = 16+4e.. (x word 4+e)
        var lo = c
        var hi: Int32 = 0
        comptime for e in range(4):
            lo = _dp4a[False](q[e] & 0x0F0F0F0F, xq[e], lo)
            hi = _dp4a[False](q[e] & 0xF0F0F0F0, xq[4 + e], hi)
        return lo + (hi >> 4)


@always_inline
def _qgemv_step[QT: Int, NT: Int, R: Int, U: Int](
    qx: Ptr[DType.uint32], xs: F32P, qs: Ptr[DType.uint32], d: F16P, m: F16P,
    mut acc: SIMD[DType.float32, R * NT], b: Int, n0: Int, t0: Int, nn: Int, tt: Int, nb: Int,
):
    """Quant blocks b + j QG_THREADS (j < U, all < nb) of rows n0..n0+R-1 into acc."""
    comptime QW = 8 if QT == Q8_0 else 4  # 32-bit words of weight codes per block
    var qv = Array[SIMD[DType.uint32, 8], R * U](fill=SIMD[DType.uint32, 8](0))
    var dv = Array[Float16, R * U](fill=Float16(0))
    var mv = Array[Float16, R * U](fill=Float16(0))
    var xv = Array[SIMD[DType.uint32, 8], U](fill=SIMD[DType.uint32, 8](0))
    var sv = Array[SIMD[DType.float32, 2], U](fill=SIMD[DType.float32, 2](0))
    comptime for j in range(U):
        var bj = b + j * QG_THREADS
        comptime for r in range(R):
            var blk = min(n0 + r, nn - 1) * nb + bj  # rows past N repeat the last one; never stored
            comptime if QT == Q8_0:
                qv[j * R + r] = vload[4](qs, blk * QW).join(vload[4](qs, blk * QW + 4))
            else:
                qv[j * R + r] = vload[4](qs, blk * QW).join(SIMD[DType.uint32, 4](0))
            dv[j * R + r] = d[unsafe_offset=blk]
            comptime if QT == Q4_1:
                mv[j * R + r] = m[unsafe_offset=blk]
        comptime if NT == 1:
            xv[j] = vload[4](qx, (t0 * nb + bj) * 8).join(vload[4](qx, (t0 * nb + bj) * 8 + 4))
            sv[j] = vload[2](xs, (t0 * nb + bj) * 2)
    comptime for t in range(NT):
        if NT == 1 or t0 + t < tt:
            comptime for j in range(U):
                var xq: SIMD[DType.uint32, 8]
                var s: SIMD[DType.float32, 2]
                comptime if NT == 1:
                    xq = xv[j]
                    s = sv[j]
                else:
                    var xb = (t0 + t) * nb + b + j * QG_THREADS
                    xq = vload[4](qx, xb * 8).join(vload[4](qx, xb * 8 + 4))
                    s = vload[2](xs, xb * 2)
                var c0: Int32 = 0
                comptime if QT == Q4_0:
                    c0 = Int32(s[1]) * -8  # the sum of the codes is an exact integer in float32
                var ms: Float32 = 0
                comptime if QT == Q4_1:
                    ms = s[0] * s[1]  # dx sum qx
                comptime for r in range(R):
                    var sumi = _block_dot[QT](qv[j * R + r], xq, c0)
                    var dd = dv[j * R + r].cast[DType.float32]() * s[0]
                    acc[r * NT + t] = dd.fma(Float32(sumi), acc[r * NT + t])
                    comptime if QT == Q4_1:
                        acc[r * NT + t] = mv[j * R + r].cast[DType.float32]().fma(ms, acc[r * NT + t])


def gemv_quant_kernel[QT: Int, NT: Int, R: Int](
    qx: Ptr[DType.uint32], xs: F32P, qs: Ptr[DType.uint32], d: F16P, m: F16P, bias: F32P, y: F32P,
    has_bias: Int64, T: Int64, N: Int64, K: Int64,
):
    """y[t, n] = x[t, :] . dequant(w[n, :]) (+ bias[n]) for rows n0 = R block_idx.x .. n0 + R - 1 and
    tokens t0 = NT block_idx.y .. t0 + NT - 1, x given quantized (qx, xs). K is a multiple of 32."""
    comptime U = 2 if NT == 1 else 1  # blocks of each row in flight per thread (besides the other rows')
    comptime NV = R * NT
    comptime NW = QG_THREADS // WARP_SIZE
    var nn = Int(N)
    var tt = Int(T)
    var nb = Int(K) // 32
    var n0 = block_idx.x * R
    var t0 = block_idx.y * NT
    var tid = thread_idx.x
    var acc = SIMD[DType.float32, NV](0)  # [row r][token t]
    var b = tid
    comptime if U > 1:
        while b + (U - 1) * QG_THREADS < nb:
            _qgemv_step[QT, NT, R, U](qx, xs, qs, d, m, acc, b, n0, t0, nn, tt, nb)
            b += U * QG_THREADS
    while b < nb:
        _qgemv_step[QT, NT, R, 1](qx, xs, qs, d, m, acc, b, n0, t0, nn, tt, nb)
        b += QG_THREADS
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
