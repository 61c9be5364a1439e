# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound; dense: a warp per few rows, 16-byte
#                            weight loads; quant: a block per few rows splitting K, int8
#                            activations and dp4a; NT tokens per pass so each weight is read once
#                            per pass
#   gemv_f8                  FP8 E4M3 weights (decode, NVIDIA): tensor cores on e4m3 codes widened
#                            to f16 in hardware, f16 activations; weights tiled for coalesced
#                            512-byte loads (dequant_f8_kernel widens them for a GEMM)
#   gemm_simt                float32 weights, and every GEMM on AMD: 64x64 tiles in shared memory,
#                            4x4 per thread
# 16-bit GEMMs on NVIDIA are Modular's (gpu_library.mojo): our mma.sync and wgmma kernels ran at
# 0.3-0.75x of them on an H200 and were deleted.
#
# W is read as [N, K] row-major (torch's Linear layout): A and B are K-contiguous ("TN").

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.sys import size_of, is_nvidia_gpu
from max.gpu import thread_idx, block_idx, grid_dim, global_idx, lane_id, WARP_SIZE, MAX_THREADS_PER_BLOCK_METADATA
from std.utils import StaticTuple
from max.gpu.sync import barrier, syncwarp
from max.gpu.primitives import warp
from max.gpu.memory import AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory
from std.sys._assembly import inlined_assembly
from max.gpu.compute.mma import mma

from gpu_common import Ptr, SharedPtr, F32P, F16P, vload, vstore, Q4_0, Q4_1, Q8_0

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


# ---- GEMV, FP8 E4M3 weights (tiled: qs [ceil(N/16), K/32, 544] bytes, see below) --------------
# Why tensor cores: at 1 byte a weight a decode GEMV must take ~16 weights per SM clock to keep
# up with the H200's HBM. On CUDA cores that is a conversion to float32 per weight (conversions
# issue at a fraction of the FMA rate) and, at 8 tokens, 128 FMAs per SM clock, all of FP32's
# rate; e4m3 has no integer form for dp4a. Hopper widens e4m3 pairs to f16 pairs in one
# instruction (cvt.rn.f16x2.e4m3x2: `.cast` of an e4m3 SIMD lowers to it) and f16x2 registers are
# exactly mma.sync's A operand, so the weights feed m16n8k16 (f32 accumulation) with no other work.
#
# Layout (backend.f8_tiles repacks at load): one 544-byte unit per (16-row tile, 32-block): 512
# code bytes in mma.sync's A-fragment order, 16 bytes per lane l (g = l / 4, c = l % 4): codes
# 8c .. 8c + 7 of row g, then the same of row g + 8; then 8 words (f16 d of row g | f16 d of row
# g + 8 << 16). A tile's units lie back to back, so a warp streams a contiguous range of bytes in
# 512-byte requests, and reads its 16 code bytes and 2 scales of a unit back as they lie (rows are
# padded to a multiple of 16 with zero codes and scales). mma step s (0, 1) takes codes 8c + 4s .. 8c + 4s + 3
# of both rows as the lane's k slots (2c, 2c+1 | 2c+8, 2c+9) of A and the same 4 activations of
# token g as B: the dot product does not care which k goes where as long as A and B agree.
#
# Activations arrive as f16 32-blocks (f16_blocks_kernel): xh [T, K] = x / s, s = sx[b, t] a power
# of two per (token, block). A block of W warps owns one tile and 8 TT tokens (TT n8 tiles of
# mma's n8); warp w takes the contiguous blocks [w nb / W, (w + 1) nb / W) through its own ring of
# S shared-memory stages of U units, filled by cp.async S - 1 stages ahead of the math (registers
# cannot hold that much in flight: ptxas sinks each global load to its first use, which left one
# or two 512-byte loads per warp outstanding); the activations of a stage are read from L2 into
# registers while it lands. The warps add up through shared memory:
#   y[t, n] = sum_b (d[n, b] sx[b, t]) sum_{j in b} e4m3(q[n, j]) xh[t, j]
# e4m3 values are exact in f16, f16 x f16 products exact in f32 and d sx exact (a power of two
# times an f16): the only rounding besides float32 sums is x's to f16 (2^-11 relative).
comptime F8_ROWS = 16
comptime F8_UNIT_WORDS = 136  # 544 bytes: 128 words of codes (4 per lane), 8 words of scales


@always_inline
def _f8_a_fragment(wa: UInt32, wb: UInt32) -> SIMD[DType.float16, 8]:
    """mma's A (rows g, g + 8; k slots 2c, 2c+1, 2c+8, 2c+9) from 4 e4m3 codes of each row."""
    var fa = bitcast[DType.float8_e4m3fn, 4](wa).cast[DType.float16]()
    var fb = bitcast[DType.float8_e4m3fn, 4](wb).cast[DType.float16]()
    return fa.join(fb).shuffle[0, 1, 4, 5, 2, 3, 6, 7]()


@always_inline
def _f8_issue[U: Int](qs: Ptr[DType.uint32], st: SharedPtr[DType.uint32], u: Int, n: Int, lane: Int):
    """cp.async units u .. u + n - 1 (n <= U; contiguous, 544 bytes each) into stage st: the warp
    copies their 16-byte chunks in order, lane l chunks l, l + 32, ... (512-byte requests)."""
    comptime CH = F8_UNIT_WORDS // 4  # 34 chunks a unit
    comptime for i in range(ceildiv(U * CH, WARP_SIZE)):
        var c = i * WARP_SIZE + lane
        if c < n * CH:
            async_copy[16](qs.unsafe_offset((u * CH + c) * 4).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                           st.unsafe_offset(c * 4))


@always_inline
def _f8_stage[TT: Int, U: Int](
    st: SharedPtr[DType.uint32], xv: Array[SIMD[DType.float16, 8], U * TT],
    sv: Array[SIMD[DType.float32, 2], U * TT], mut acc: SIMD[DType.float32, 4 * TT], n: Int, lane: Int, g: Int,
):
    """The n (<= U) units of stage st into acc: the lane's 16 code bytes and its rows' scales from
    shared memory, activations xv and their scales sv (tokens 2c, 2c + 1) from registers."""
    comptime for j in range(U):
        if j < n:
            var wq = st.unsafe_offset(j * F8_UNIT_WORDS + lane * 4).unsafe_load[width=4, alignment=16](0)
            var dd = bitcast[DType.float16, 2](st[unsafe_offset=j * F8_UNIT_WORDS + 128 + g]).cast[DType.float32]()
            var a0 = _f8_a_fragment(wq[0], wq[2])
            var a1 = _f8_a_fragment(wq[1], wq[3])
            comptime for t in range(TT):
                var part = SIMD[DType.float32, 4](0)
                mma(part, a0, xv[j * TT + t].slice[4, offset=0](), part)
                mma(part, a1, xv[j * TT + t].slice[4, offset=4](), part)
                var s = sv[j * TT + t]
                acc[t * 4 + 0] = (dd[0] * s[0]).fma(part[0], acc[t * 4 + 0])
                acc[t * 4 + 1] = (dd[0] * s[1]).fma(part[1], acc[t * 4 + 1])
                acc[t * 4 + 2] = (dd[1] * s[0]).fma(part[2], acc[t * 4 + 2])
                acc[t * 4 + 3] = (dd[1] * s[1]).fma(part[3], acc[t * 4 + 3])


def f8_smem_bytes[TT: Int, U: Int, W: Int, S: Int]() -> Int:
    """Dynamic shared memory of gemv_f8_kernel: W warps' S stages of U units, later the partial sums."""
    return 4 * max(W * S * U * F8_UNIT_WORDS, W * 4 * TT * WARP_SIZE)


@__llvm_metadata(MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(W * WARP_SIZE)))
def gemv_f8_kernel[TT: Int, U: Int, W: Int, S: Int](
    xh: F16P, sx: F32P, qs: Ptr[DType.uint32], bias: F32P, y: F32P,
    has_bias: Int64, T: Int64, N: Int64, K: Int64,
):
    """y[t, n] = x[t, :] . dequant(w[n, :]) (+ bias[n]) for the rows of tile block_idx.x and tokens
    8 TT block_idx.y .. + 8 TT - 1; x given as f16 32-blocks xh with scales sx [K/32, Tp]
    (Tp = T rounded up to 8). K is a multiple of 32; qs and xh 16-byte aligned; launched with
    f8_smem_bytes[TT, U, W, S]() bytes of dynamic shared memory."""
    comptime assert is_nvidia_gpu(), "gemv_f8_kernel needs NVIDIA tensor cores (mma.sync f16)"
    comptime assert S >= 2, "at least one stage in flight while another is multiplied"
    comptime NV = 4 * TT
    comptime STAGE = U * F8_UNIT_WORDS  # words of a stage
    var smem = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
    var nn = Int(N)
    var tt = Int(T)
    var kk = Int(K)
    var nb = kk // 32
    var tp = ceildiv(tt, 8) * 8
    var lane = lane_id()
    var wid = thread_idx.x // WARP_SIZE
    var g = lane // 4
    var c = lane % 4
    var n0 = block_idx.x * F8_ROWS
    var t0 = block_idx.y * 8 * TT
    # The lane's activation offset and scale column per token tile, clamped to real tokens: a
    # column of a token past T holds another token's values and is never stored.
    var xrow = SIMD[DType.int32, TT](0)  # T <= 64 tokens: T K < 2^31 for any K below 2^25
    var scol = SIMD[DType.int32, TT](0)
    comptime for t in range(TT):
        xrow[t] = Int32(min(t0 + 8 * t + g, tt - 1) * kk + c * 8)
        scol[t] = Int32(min(t0 + 8 * t, tp - 8) + 2 * c)
    var wst = smem.unsafe_offset(wid * S * STAGE)  # this warp's stages
    var b0 = wid * nb // W  # this warp's blocks [b0, b1)
    var b1 = (wid + 1) * nb // W
    var u0 = block_idx.x * nb + b0  # their first unit
    var nst = ceildiv(b1 - b0, U)
    comptime for i in range(S - 1):  # prologue: stages 0 .. S - 2 in flight
        if i < nst:
            _f8_issue[U](qs, wst.unsafe_offset(i * STAGE), u0 + i * U, min(U, b1 - b0 - i * U), lane)
        async_copy_commit_group()
    var acc = SIMD[DType.float32, NV](0)  # [tile][c0 c1 c2 c3 of mma's C fragment]
    for k in range(nst):
        var nx = k + S - 1
        if nx < nst:
            _f8_issue[U](qs, wst.unsafe_offset((nx % S) * STAGE), u0 + nx * U,
                         min(U, b1 - b0 - nx * U), lane)
        async_copy_commit_group()
        var n = min(U, b1 - b0 - k * U)
        var bk = b0 + k * U
        var xv = Array[SIMD[DType.float16, 8], U * TT](fill=SIMD[DType.float16, 8](0))
        var sv = Array[SIMD[DType.float32, 2], U * TT](fill=SIMD[DType.float32, 2](0))
        comptime for j in range(U):  # L2 reads while the stage lands (a unit past n reads a real one)
            var bj = min(bk + j, nb - 1)
            comptime for t in range(TT):
                xv[j * TT + t] = vload[8](xh, Int(xrow[t]) + bj * 32)
                sv[j * TT + t] = vload[2](sx, bj * tp + Int(scol[t]))
        async_copy_wait_group(Int32(S - 1))  # stage k has landed (for this lane)
        syncwarp()  # ... and for the whole warp
        _f8_stage[TT, U](wst.unsafe_offset((k % S) * STAGE), xv, sv, acc, n, lane, g)
        syncwarp()  # every lane is done with the stage before it is refilled
    async_copy_wait_group(0)
    barrier()  # the stages become the partial sums
    var partial = smem.bitcast[Float32]()
    comptime for v in range(NV):
        partial[unsafe_offset=(wid * NV + v) * WARP_SIZE + lane] = acc[v]
    barrier()
    for i in range(thread_idx.x, NV * WARP_SIZE, W * WARP_SIZE):
        var v = i // WARP_SIZE
        var l = i % WARP_SIZE
        var s: Float32 = 0
        comptime for w in range(W):
            s += partial[unsafe_offset=(w * NV + v) * WARP_SIZE + l]
        var e4 = v % 4
        var row = n0 + l // 4 + 8 * (e4 // 2)
        var tok = t0 + (v // 4) * 8 + 2 * (l % 4) + e4 % 2
        if row < nn and tok < tt:
            if has_bias != 0:
                s += bias[unsafe_offset=row]
            y[unsafe_offset=tok * nn + row] = s


def dequant_f8_kernel[odt: DType](qs: Ptr[DType.uint32], dst: Ptr[odt], N: Int64, K: Int64):
    """The tiled FP8 weight -> dense [N, K] (d e4m3(q), exact in float32 and rounded once to odt):
    a thread per (unit, lane), 8 weights of row g and 8 of row g + 8 each."""
    var i = global_idx.x
    var nn = Int(N)
    var kk = Int(K)
    var nb = kk // 32
    var u = i // WARP_SIZE
    if u >= ceildiv(nn, F8_ROWS) * nb:
        return
    var lane = i % WARP_SIZE
    var g = lane // 4
    var c = lane % 4
    var w = vload[4](qs, u * F8_UNIT_WORDS + lane * 4)
    var dd = bitcast[DType.float16, 2](qs[unsafe_offset=u * F8_UNIT_WORDS + 128 + g]).cast[DType.float32]()
    var row = (u // nb) * F8_ROWS + g
    var off = (u % nb) * 32 + c * 8
    var lo = bitcast[DType.float8_e4m3fn, 8](w.slice[2, offset=0]()).cast[DType.float32]() * dd[0]
    var hi = bitcast[DType.float8_e4m3fn, 8](w.slice[2, offset=2]()).cast[DType.float32]() * dd[1]
    if row < nn:
        vstore[8](dst, row * kk + off, lo.cast[odt]())
    if row + 8 < nn:
        vstore[8](dst, (row + 8) * kk + off, hi.cast[odt]())


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
