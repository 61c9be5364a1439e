# y[T, N] = x[T, K] @ W[N, K]^T (+ bias): the kernels behind Backend.linear.
#
#   gemv_dense / gemv_quant  few tokens (decode): bandwidth-bound, one warp per output row, 16-byte
#                            weight loads, NT tokens per pass so each weight is read once per pass
#   gemm_simt                float32 weights (and AMD): 64x64 tiles in shared memory, 4x4 per thread
#   gemm_mma                 16-bit weights on NVIDIA tensor cores (mma.sync m16n8k16 via
#                            ldmatrix), 128x128x32 tiles, cp.async multi-stage pipeline
#
# Both GEMMs read W as [N, K] row-major (torch's Linear layout): A and B are K-contiguous ("TN").

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.sys import size_of, is_nvidia_gpu
from max.gpu import thread_idx, block_idx, block_dim, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory,
)
from max.gpu.compute.mma import mma, ld_matrix

from gpu_common import SharedPtr, Ptr, F32P, U8P, I8P, F16P, vload, Q4_0, Q4_1, Q8_0

comptime GEMV_WARPS = 8


# ---- GEMV, dense weights ----------------------------------------------------------------------
@always_inline
def _dot_x[NT: Int, VW: Int](
    mut acc: SIMD[DType.float32, NT], wf: SIMD[DType.float32, VW], x: F32P, t0: Int, T: Int, kk: Int, off: Int
):
    comptime for t in range(NT):
        if t0 + t < T:
            var xv = vload[VW](x, (t0 + t) * kk + off)
            acc[t] += (wf * xv).reduce_add()


def gemv_dense_kernel[wdt: DType, NT: Int, VEC: Bool](
    x: F32P, w: Ptr[wdt], bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64, K: Int64
):
    """One warp per output row n, tokens t0..t0+NT-1 of block_idx.y. VEC: K is a multiple of the
    16-byte vector width and the rows are 16-byte aligned (checked on the host)."""
    var n = block_idx.x * GEMV_WARPS + thread_idx.x // WARP_SIZE
    var nn = Int(N)
    if n >= nn:
        return
    var lane = lane_id()
    var tt = Int(T)
    var kk = Int(K)
    var t0 = block_idx.y * NT
    var wrow = n * kk
    var acc = SIMD[DType.float32, NT](0)
    comptime VW = 16 // size_of[wdt]()
    comptime STEP = WARP_SIZE * VW
    comptime if VEC:
        var k0 = 0
        # Four independent 16-byte loads in flight per lane before any arithmetic.
        while k0 + 4 * STEP <= kk:
            var o0 = k0 + lane * VW
            var w0 = vload[VW](w, wrow + o0)
            var w1 = vload[VW](w, wrow + o0 + STEP)
            var w2 = vload[VW](w, wrow + o0 + 2 * STEP)
            var w3 = vload[VW](w, wrow + o0 + 3 * STEP)
            _dot_x[NT, VW](acc, w0.cast[DType.float32](), x, t0, tt, kk, o0)
            _dot_x[NT, VW](acc, w1.cast[DType.float32](), x, t0, tt, kk, o0 + STEP)
            _dot_x[NT, VW](acc, w2.cast[DType.float32](), x, t0, tt, kk, o0 + 2 * STEP)
            _dot_x[NT, VW](acc, w3.cast[DType.float32](), x, t0, tt, kk, o0 + 3 * STEP)
            k0 += 4 * STEP
        while k0 < kk:
            var off = k0 + lane * VW
            if off < kk:
                _dot_x[NT, VW](acc, vload[VW](w, wrow + off).cast[DType.float32](), x, t0, tt, kk, off)
            k0 += STEP
    else:
        for k in range(lane, kk, WARP_SIZE):
            var wf = w[unsafe_offset=wrow + k].cast[DType.float32]()
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
def gemv_quant_kernel[QT: Int, NT: Int](
    x: F32P, qs: U8P, d: F16P, m: F16P, bias: F32P, y: F32P, has_bias: Int64, T: Int64, N: Int64, K: Int64
):
    var n = block_idx.x * GEMV_WARPS + thread_idx.x // WARP_SIZE
    var nn = Int(N)
    if n >= nn:
        return
    var lane = lane_id()
    var tt = Int(T)
    var kk = Int(K)
    var nb = kk // 32
    var t0 = block_idx.y * NT
    var acc = SIMD[DType.float32, NT](0)
    for b in range(lane, nb, WARP_SIZE):
        var blk = n * nb + b
        var scale = d[unsafe_offset=blk].cast[DType.float32]()
        comptime if QT == Q8_0:
            var q = vload[32](qs, blk * 32)
            var lo = bitcast[DType.int8, 16](q.slice[16, offset=0]()).cast[DType.float32]()
            var hi = bitcast[DType.int8, 16](q.slice[16, offset=16]()).cast[DType.float32]()
            comptime for t in range(NT):
                if t0 + t < tt:
                    var xo = (t0 + t) * kk + b * 32
                    var xa = vload[16](x, xo)
                    var xb = vload[16](x, xo + 16)
                    acc[t] += scale * ((lo * xa).reduce_add() + (hi * xb).reduce_add())
        else:
            var q = vload[16](qs, blk * 16)
            # Byte j holds weight j (low nibble) and weight j + 16 (high nibble).
            var lo = (q & 15).cast[DType.float32]()
            var hi = (q >> 4).cast[DType.float32]()
            var mn: Float32 = 0
            comptime if QT == Q4_1:
                mn = m[unsafe_offset=blk].cast[DType.float32]()
            comptime for t in range(NT):
                if t0 + t < tt:
                    var xo = (t0 + t) * kk + b * 32
                    var xa = vload[16](x, xo)
                    var xb = vload[16](x, xo + 16)
                    var s = (lo * xa).reduce_add() + (hi * xb).reduce_add()
                    var sx = xa.reduce_add() + xb.reduce_add()
                    comptime if QT == Q4_0:
                        acc[t] += scale * (s - 8.0 * sx)  # w = (q - 8) d
                    else:
                        acc[t] += scale * s + mn * sx  # w = q d + m
    var bb: Float32 = 0
    if has_bias != 0:
        bb = bias[unsafe_offset=n]
    comptime for t in range(NT):
        var s = warp.sum(acc[t])
        if lane == 0 and t0 + t < tt:
            y[unsafe_offset=(t0 + t) * nn + n] = s + bb


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
        async_copy[16](
            src.unsafe_offset(off).unsafe_address_space_cast[AddressSpace.GLOBAL](),
            smem.unsafe_offset(row * MG_LD + col),
            src_size=Int32(16 if ok else 0),
        )


def gemm_mma_kernel[dt: DType, cdt: DType](
    a: Ptr[dt], w: Ptr[dt], bias: F32P, c: Ptr[cdt], has_bias: Int64, M: Int64, N: Int64, K: Int64
):
    """C[M, N] = A[M, K] W[N, K]^T. K % 8 == 0 and 16-byte aligned rows (checked on the host)."""
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
    var nk = ceildiv(kk, MG_BK)

    comptime for s in range(MG_STAGES - 1):
        if s < nk:
            _mg_load_tile[dt](a, smem.unsafe_offset(s * 2 * MG_TILE), m0, mm, kk, s * MG_BK)
            _mg_load_tile[dt](w, smem.unsafe_offset(s * 2 * MG_TILE + MG_TILE), n0, nn, kk, s * MG_BK)
        async_copy_commit_group()

    for kt in range(nk):
        async_copy_wait_group(Int32(MG_STAGES - 2))
        barrier()
        # Refill the stage computed in the previous iteration (everyone is past it now).
        var nxt = kt + MG_STAGES - 1
        if nxt < nk:
            var st = nxt % MG_STAGES
            _mg_load_tile[dt](a, smem.unsafe_offset(st * 2 * MG_TILE), m0, mm, kk, nxt * MG_BK)
            _mg_load_tile[dt](w, smem.unsafe_offset(st * 2 * MG_TILE + MG_TILE), n0, nn, kk, nxt * MG_BK)
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
                            if has_bias != 0:
                                v += bias[unsafe_offset=col + e]
                            c[unsafe_offset=row * nn + col + e] = v.cast[cdt]()
