# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound; dense: a warp per few rows, 16-byte
#                            weight loads; quant: a block per few rows splitting K; NT tokens per
#                            pass so each weight is read once per pass
#   gemm_simt                float32 weights (and AMD): 64x64 tiles in shared memory, 4x4 per thread
#   gemm_mma                 16-bit weights on NVIDIA tensor cores (mma.sync m16n8k16 via
#                            ldmatrix), 128x128x32 tiles, cp.async multi-stage pipeline
#
# Both GEMMs read W as [N, K] row-major (torch's Linear layout): A and B are K-contiguous ("TN").

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.sys import size_of, is_nvidia_gpu
from max.gpu import thread_idx, block_idx, block_dim, grid_dim, global_idx, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory,
)
from std.sys._assembly import inlined_assembly
from max.gpu.compute.mma import (
    mma, ld_matrix, wgmma_async, wgmma_fence_aligned, wgmma_commit_group_sync, wgmma_wait_group_sync,
    WGMMADescriptor,
)

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


# ---- Tensor-core GEMM (NVIDIA, 16-bit A and W, float32 accumulation) --------------------------
comptime MG_BM = 128
comptime MG_BN = 128
comptime MG_BK = 32
comptime MG_LD = MG_BK + 8  # 80-byte rows: ldmatrix's 8 row addresses hit 8 distinct bank quads
comptime MG_THREADS = 256  # 8 warps: 2 along M x 4 along N, each a 64 x 32 tile
comptime MG_STAGES = 4
comptime MG_TILE = MG_BM * MG_LD  # elements of one operand tile (BM == BN)
comptime MG_SMEM_BYTES = MG_STAGES * 2 * MG_TILE * 2
comptime MG_GROUP_M = 8  # block rasterisation: 8 row-tiles share each column sweep (L2 reuse)


@always_inline
def _mg_load_tile[dt: DType](
    src: Ptr[dt], smem: SharedPtr[dt],
    row0: Int, rows: Int, kk: Int, k0: Int
):
    # 128 rows x 32 k = 512 chunks of 16 bytes, two per thread; rows/k past the end are zero-filled.
    comptime for r in range(2):
        var ch = thread_idx.x + MG_THREADS * r
        var row = ch >> 2
        var col = (ch & 3) * 8
        var gr = row0 + row
        var gk = k0 + col
        var ok = gr < rows and gk < kk
        var off = gr * kk + gk if ok else 0
        async_copy[16, fill=Scalar[dt](0)](
            src.unsafe_offset(off).unsafe_address_space_cast[AddressSpace.GLOBAL](),
            smem.unsafe_offset(row * MG_LD + col),
            src_size=Int32(16 if ok else 0),
        )


def gemm_mma_kernel[dt: DType, cdt: DType](
    a: Ptr[dt], w: Ptr[dt], bias: F32P, c: Ptr[cdt], has_bias: Int64, M: Int64, N: Int64, K: Int64,
    splits: Int64, part: F32P,
):
    """C[M, N] = A[M, K] W[N, K]^T. K % 8 == 0 and 16-byte aligned rows (checked on the host).
    Split-K (few rows, e.g. a short prompt: too few output tiles to fill the GPU): block_idx.y takes
    a slice of K and writes float32 partials to part[split, M, N]; splitk_reduce_kernel adds them."""
    comptime assert is_nvidia_gpu(), "gemm_mma_kernel needs NVIDIA tensor cores"
    var smem = external_memory[Scalar[dt], address_space=AddressSpace.SHARED, alignment=16]()
    var mm = Int(M)
    var nn = Int(N)
    var kk = Int(K)
    var lane = lane_id()
    var warp_id = thread_idx.x // WARP_SIZE
    var wm = warp_id // 4
    var wn = warp_id % 4

    # Grouped rasterisation of the 1-D grid.
    var pid = block_idx.x
    var npm = ceildiv(mm, MG_BM)
    var npn = ceildiv(nn, MG_BN)
    var in_group = MG_GROUP_M * npn
    var first_m = (pid // in_group) * MG_GROUP_M
    var gsz = min(npm - first_m, MG_GROUP_M)
    var pid_m = first_m + (pid % in_group) % gsz
    var pid_n = (pid % in_group) // gsz
    var m0 = pid_m * MG_BM
    var n0 = pid_n * MG_BN

    var acc = SIMD[DType.float32, 64](0)  # [mi 4][ni 4][4]
    var nk_all = ceildiv(kk, MG_BK)
    var nsp = Int(splits)
    var per = ceildiv(nk_all, nsp)
    var kt0 = block_idx.y * per
    var nk = max(0, min(nk_all, kt0 + per) - kt0)
    var kbase = kt0 * MG_BK

    comptime for s in range(MG_STAGES - 1):
        if s < nk:
            _mg_load_tile[dt](a, smem.unsafe_offset(s * 2 * MG_TILE), m0, mm, kk, kbase + s * MG_BK)
            _mg_load_tile[dt](w, smem.unsafe_offset(s * 2 * MG_TILE + MG_TILE), n0, nn, kk, kbase + s * MG_BK)
        async_copy_commit_group()

    for kt in range(nk):
        async_copy_wait_group(Int32(MG_STAGES - 2))
        barrier()
        # Refill the stage computed in the previous iteration (everyone is past it now).
        var nxt = kt + MG_STAGES - 1
        if nxt < nk:
            var st = nxt % MG_STAGES
            _mg_load_tile[dt](a, smem.unsafe_offset(st * 2 * MG_TILE), m0, mm, kk, kbase + nxt * MG_BK)
            _mg_load_tile[dt](w, smem.unsafe_offset(st * 2 * MG_TILE + MG_TILE), n0, nn, kk, kbase + nxt * MG_BK)
        async_copy_commit_group()

        var sa = smem.unsafe_offset((kt % MG_STAGES) * 2 * MG_TILE)
        var sb = sa.unsafe_offset(MG_TILE)
        comptime for ks in range(MG_BK // 16):
            var af = Array[SIMD[dt, 8], 4](fill=SIMD[dt, 8](0))
            comptime for mi in range(4):
                var row = wm * 64 + mi * 16 + (lane % 16)
                af[mi] = ld_matrix[8](sa.unsafe_offset(row * MG_LD + ks * 16 + (lane // 16) * 8))
            var bf = Array[SIMD[dt, 8], 2](fill=SIMD[dt, 8](0))
            comptime for nj in range(2):
                var nrow = wn * 32 + nj * 16 + (lane % 8) + (lane // 16) * 8
                bf[nj] = ld_matrix[8](sb.unsafe_offset(nrow * MG_LD + ks * 16 + ((lane // 8) % 2) * 8))
            comptime for mi in range(4):
                comptime for ni in range(4):
                    comptime o = (mi * 4 + ni) * 4
                    var cf = acc.slice[4, offset=o]()
                    var bv = bf[ni // 2].slice[4, offset=(ni % 2) * 4]()
                    mma(cf, af[mi], bv, cf)
                    acc = acc.insert[offset=o](cf)

    # Epilogue: thread holds rows lane/4 and lane/4 + 8, columns 2 (lane % 4), +1 of each 16x8 tile.
    comptime for mi in range(4):
        comptime for ni in range(4):
            comptime o = (mi * 4 + ni) * 4
            var r0 = m0 + wm * 64 + mi * 16 + lane // 4
            var col = n0 + wn * 32 + ni * 8 + (lane % 4) * 2
            comptime for h in range(2):
                var row = r0 + 8 * h
                if row < mm:
                    comptime for e in range(2):
                        if col + e < nn:
                            var v = acc[o + 2 * h + e]
                            if nsp > 1:
                                part[unsafe_offset=(block_idx.y * mm + row) * nn + col + e] = v
                            else:
                                if has_bias != 0:
                                    v += bias[unsafe_offset=col + e]
                                c[unsafe_offset=row * nn + col + e] = v.cast[cdt]()


def splitk_reduce_kernel[cdt: DType](part: F32P, bias: F32P, c: Ptr[cdt], has_bias: Int64, MN: Int64, N: Int64,
                                     splits: Int64):
    var i = global_idx.x
    if i >= Int(MN):
        return
    var v: Float32 = 0
    for sp in range(Int(splits)):
        v += part[unsafe_offset=sp * Int(MN) + i]
    if has_bias != 0:
        v += bias[unsafe_offset=i % Int(N)]
    c[unsafe_offset=i] = v.cast[cdt]()


# ---- Hopper GEMM: wgmma (sm_90a), bfloat16 --------------------------------------------------------
# Two warpgroups, each 64 rows x BN columns of a 128 x BN block tile; BK = 64; 4 cp.async stages.
# Shared tiles use wgmma's no-swizzle K-major layout: 8-row x 16-byte "core matrices", the 8 along
# K 128 bytes apart (leading byte offset), successive 8-row groups 1024 bytes apart (stride byte
# offset). The descriptor's two offsets are runtime values (`swap` exchanges them) so a run can
# confirm which reading of the layout the hardware uses without a rebuild.
comptime WG_BM = 128
comptime WG_BK = 64
comptime WG_STAGES = 4
comptime WG_THREADS = 256


def wg_smem_bytes[BN: Int]() -> Int:
    return WG_STAGES * (WG_BM + BN) * WG_BK * 2


@always_inline
def _wg_load[dt: DType, ROWS: Int](src: Ptr[dt], smem: SharedPtr[dt], row0: Int, rows: Int, kk: Int, k0: Int):
    # Thread -> chunk order: pairs of 16-byte chunks of a row (one 32-byte sector) fastest, then the
    # 8 rows of a core matrix: full sectors from global, bank-conflict-optimal shared writes.
    comptime for i in range(ROWS * 8 // WG_THREADS):
        var ch = thread_idx.x + WG_THREADS * i
        var c = ((ch >> 4) & 3) * 2 + (ch & 1)
        var r = (ch >> 6) * 8 + ((ch >> 1) & 7)
        var gr = row0 + r
        var gk = k0 + c * 8
        var ok = gr < rows and gk < kk
        var off = gr * kk + gk if ok else 0
        async_copy[16, fill=Scalar[dt](0)](
            src.unsafe_offset(off).unsafe_address_space_cast[AddressSpace.GLOBAL](),
            smem.unsafe_offset(((r >> 3) * 1024 + c * 128 + (r & 7) * 16) // 2),
            src_size=Int32(16 if ok else 0),
        )


@always_inline
def _wg_desc[dt: DType](p: SharedPtr[dt], lbo: Int, sbo: Int) -> WGMMADescriptor[dt]:
    var addr = Int(p)
    return WGMMADescriptor[dt](Int64(((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32)))


def gemm_wgmma_kernel[dt: DType, cdt: DType, BN: Int](
    a: Ptr[dt], w: Ptr[dt], bias: F32P, c: Ptr[cdt], has_bias: Int64, M: Int64, N: Int64, K: Int64, swap: Int64
):
    comptime assert is_nvidia_gpu(), "gemm_wgmma_kernel needs an sm_90a GPU"
    comptime A_TILE = WG_BM * WG_BK
    comptime STAGE = (WG_BM + BN) * WG_BK
    var smem = external_memory[Scalar[dt], address_space=AddressSpace.SHARED, alignment=128]()
    var mm = Int(M)
    var nn = Int(N)
    var kk = Int(K)
    var lane = lane_id()
    var warp_id = thread_idx.x // WARP_SIZE
    var wg = warp_id // 4
    var lbo = 128 if swap == 0 else 1024
    var sbo = 1024 if swap == 0 else 128

    var pid = block_idx.x
    var npm = ceildiv(mm, WG_BM)
    var npn = ceildiv(nn, BN)
    var in_group = MG_GROUP_M * npn
    var first_m = (pid // in_group) * MG_GROUP_M
    var gsz = min(npm - first_m, MG_GROUP_M)
    var m0 = (first_m + (pid % in_group) % gsz) * WG_BM
    var n0 = ((pid % in_group) // gsz) * BN
    var nk = ceildiv(kk, WG_BK)

    # Loads run WG_STAGES - 2 tiles ahead: the stage refilled at step kt was read by the wgmma
    # batch of step kt - 2, which is complete (one batch, kt - 1, may still be in flight).
    comptime for s in range(WG_STAGES - 2):
        if s < nk:
            _wg_load[dt, WG_BM](a, smem.unsafe_offset(s * STAGE), m0, mm, kk, s * WG_BK)
            _wg_load[dt, BN](w, smem.unsafe_offset(s * STAGE + A_TILE), n0, nn, kk, s * WG_BK)
        async_copy_commit_group()

    var acc = SIMD[DType.float32, BN // 2](0)
    for kt in range(nk):
        async_copy_wait_group(Int32(WG_STAGES - 3))
        # cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        inlined_assembly["fence.proxy.async.shared::cta;", NoneType, constraints=""]()
        barrier()
        var nxt = kt + WG_STAGES - 2
        if nxt < nk:
            var st = nxt % WG_STAGES
            _wg_load[dt, WG_BM](a, smem.unsafe_offset(st * STAGE), m0, mm, kk, nxt * WG_BK)
            _wg_load[dt, BN](w, smem.unsafe_offset(st * STAGE + A_TILE), n0, nn, kk, nxt * WG_BK)
        async_copy_commit_group()
        var sa = smem.unsafe_offset((kt % WG_STAGES) * STAGE + wg * (64 * WG_BK))
        var sb = smem.unsafe_offset((kt % WG_STAGES) * STAGE + A_TILE)
        wgmma_fence_aligned()
        comptime for ks in range(WG_BK // 16):
            acc = wgmma_async[64, BN, 16, DType.float32, BN // 2, a_type=dt, b_type=dt](
                _wg_desc[dt](sa.unsafe_offset(ks * 128), lbo, sbo),
                _wg_desc[dt](sb.unsafe_offset(ks * 128), lbo, sbo),
                acc,
            )
        wgmma_commit_group_sync()
        wgmma_wait_group_sync[1]()
    wgmma_wait_group_sync[0]()

    # Accumulator layout per warp: 16 rows, then per 8 columns the mma.sync C layout.
    var r0 = m0 + wg * 64 + (warp_id % 4) * 16 + lane // 4
    comptime for j in range(BN // 8):
        var col = n0 + j * 8 + (lane % 4) * 2
        comptime for hf in range(2):
            var row = r0 + 8 * hf
            if row < mm:
                comptime for e in range(2):
                    if col + e < nn:
                        var v = acc[4 * j + 2 * hf + e]
                        if has_bias != 0:
                            v += bias[unsafe_offset=col + e]
                        c[unsafe_offset=row * nn + col + e] = v.cast[cdt]()
