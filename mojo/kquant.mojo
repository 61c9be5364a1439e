# GGUF k-quant and 5-bit block kernels (CPU, float32 activations and output): Q2_K, Q3_K, Q4_K,
# Q5_K, Q6_K (256-weight super-blocks) and Q5_0, Q5_1 (32-weight blocks). Q4_0 / Q4_1 / Q8_0 and
# the float embedding tables live in quant.mojo.
#
# Block layouts (ggml, little endian; offsets in bytes):
#   Q5_0  22 B: f16 d | u32 qh | 16 B qs                 w = d * (q - 16)
#   Q5_1  24 B: f16 d | f16 m | u32 qh | 16 B qs         w = d * q + m
#         q = nibble | qh bit << 4; qs byte j holds element j (low nibble) and j + 16 (high).
#   Q2_K  84 B: 16 B scales | 64 B qs | f16 d | f16 dmin  16 groups of 16: w = d*sc*q - dmin*m
#         (sc = low 4 bits of the group's scale byte, m = high 4 bits; q 2 bits)
#   Q3_K 110 B: 32 B hmask | 64 B qs | 12 B scales | f16 d 16 groups of 16: w = d*(sc-32)*(q-4)
#         (q = 2 low bits | hmask bit << 2; six-bit scales packed in 12 bytes)
#   Q4_K 144 B: f16 d | f16 dmin | 12 B scales | 128 B qs 8 groups of 32: w = d*sc*q - dmin*m
#         (six-bit sc and m packed in 12 bytes; q a nibble)
#   Q5_K 176 B: f16 d | f16 dmin | 12 B scales | 32 B qh | 128 B qs   as Q4_K, q = nibble | qh bit << 4
#   Q6_K 210 B: 128 B ql | 64 B qh | 16 x i8 scales | f16 d            16 groups of 16: w = d*sc*(q-32)
#         (q = nibble | 2 high bits << 4)
#   Element order in a super-block: nibbles: e = 64 j + 32 n + l is nibble n of byte 32 j + l;
#   2-bit fields: e = 128 h + 32 s + l is bits 2s..2s+1 of byte 32 h + l; Q5_K / Q3_K high bits:
#   e = 32 j + l is bit j of byte l.
#
# Every format is read the same way: a block is QB/16 chunks of 16 weights, chunk c belongs to
# scale group g = 16 c / GS, and w = A[g] * (code - OFFSET) + B[g] with `code` a small unsigned
# integer (_codes), A and B float32 per group (_scales). A[g] * code is exact in float32 (an
# 11-bit float16 mantissa times a <= 8-bit scale times a <= 6-bit code), which is what makes the
# dequantization below bit-identical to gguf.quants.dequantize whatever the rounding steps.
#
# Y[T, N] = X[T, K] @ W[N, K]^T straight from the blocks, as in quant.mojo:
#   * T <= 8 (decode): rows stream once, decoded in registers. One token: a group adds
#     A * dot(code, x) + B' * sum(x) (B' = B - OFFSET * A, sum(x) per group precomputed once per
#     call), so a chunk costs its decode plus two vector FMAs. Several tokens: each chunk is
#     dequantized once in registers (one FMA) and costs one FMA per token; two rows share every
#     x load. Software prefetch runs PF_BYTES ahead in the rows. ONE parallel region.
#   * T > 8 (prefill): a copy of quant.mojo's GEMM (that file is being reworked for int8
#     activations): each core dequantizes MR rows x KC columns of W into an L1 tile and runs an
#     MR x 32-token register microkernel over the packed (k-major) X.
#   * modular_pack / modular_matmul (end of file): Modular's int8-activation Q4_K / Q6_K kernels,
#     which mojollm.kernels.quant uses for large layers of those types.
# Portable SIMD only (no ISA intrinsics), so the module follows the host: an AVX2 build
# (--target-cpu znver2) passes the same tests.

from std.memory import alloc, bitcast
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import llvm_intrinsic, num_physical_cores
from std.sys.intrinsics import PrefetchOptions, prefetch

from max.algorithm import parallelize
from layout import Coord, TileTensor, row_major
from quantization.qmatmul_k import matmul_Q4_K, matmul_Q4_K_pack_b, matmul_Q6_K, matmul_Q6_K_pack_b
from quant import PATH_AUTO, PATH_FLOAT, _best_path, _matmul_path as _matmul_i8_path

comptime F32Ptr = Pointer[Float32, MutAnyOrigin]
comptime U8Ptr = Pointer[UInt8, MutAnyOrigin]
comptime I32Ptr = Pointer[Int32, MutAnyOrigin]
comptime V16 = SIMD[DType.float32, 16]
comptime I16 = SIMD[DType.int32, 16]

# Type codes: ggml's GGMLQuantizationType values.
comptime Q5_0 = 6
comptime Q5_1 = 7
comptime Q2_K = 10
comptime Q3_K = 11
comptime Q4_K = 12
comptime Q5_K = 13
comptime Q6_K = 14

comptime SMALL_T = 8  # up to this many activation rows take the streaming (GEMV) path
comptime MR = 8  # W rows per GEMM microkernel tile
comptime PF_BYTES = 4096  # GEMV software prefetch distance (bytes ahead in the weight rows)
# Thresholds for a parallel region, as in quant.mojo: waking the sleeping workers costs
# 200-400 us on the 2-core VM, so only work worth ~0.2 ms of one core is split.
comptime PARALLEL_MIN_BYTES = 1 << 16
comptime GEMV_PARALLEL_MIN_BYTES = 2 << 20
comptime GEMM_PARALLEL_MIN_FLOPS = 32 << 20


# ---------------------------------------------------------------- geometry


@always_inline
def _qb[qt: Int]() -> Int:
    """Weights per block."""
    comptime if qt == Q5_0 or qt == Q5_1:
        return 32
    else:
        return 256


@always_inline
def _block_bytes[qt: Int]() -> Int:
    comptime if qt == Q5_0:
        return 22
    elif qt == Q5_1:
        return 24
    elif qt == Q2_K:
        return 84
    elif qt == Q3_K:
        return 110
    elif qt == Q4_K:
        return 144
    elif qt == Q5_K:
        return 176
    else:
        return 210


@always_inline
def _group[qt: Int]() -> Int:
    """Weights per scale group."""
    comptime if qt == Q2_K or qt == Q3_K or qt == Q6_K:
        return 16
    else:
        return 32


@always_inline
def _ng[qt: Int]() -> Int:
    return _qb[qt]() // _group[qt]()


@always_inline
def _offset[qt: Int]() -> Int:
    """The code's zero point (w = A * (code - OFFSET) + B)."""
    comptime if qt == Q5_0:
        return 16
    elif qt == Q3_K:
        return 4
    elif qt == Q6_K:
        return 32
    else:
        return 0


def _work_items(rows: Int, bytes_per_row: Int, min_rows: Int, min_bytes: Int = PARALLEL_MIN_BYTES) -> Int:
    """How many row chunks to split an op into: 1 (no parallel region) when it is small, else
    one per core (`parallelize` hands each worker one contiguous share)."""
    if rows * bytes_per_row < min_bytes or rows < 2 * min_rows:
        return 1
    return max(1, min(rows // min_rows, num_physical_cores()))


# ---------------------------------------------------------------- block decoding


@always_inline
def _f16(u8: U8Ptr, off: Int) -> Float32:
    return Pointer[Float16, MutAnyOrigin](unsafe_from_address=Int(u8.unsafe_offset(off)))[].cast[DType.float32]()


@always_inline
def _scales[qt: Int](u8: U8Ptr, off: Int, mut a: SIMD[DType.float32, _ng[qt]()],
                     mut b: SIMD[DType.float32, _ng[qt]()]):
    """The block's per-group scale A and min B (0 for the formats without one), computed as
    gguf.quants.dequantize does (float16 -> float32, times the integer scale, each rounded once;
    the products are exact anyway)."""
    comptime NG = _ng[qt]()
    comptime if qt == Q5_0:
        a = _f16(u8, off)
        b = 0
    elif qt == Q5_1:
        a = _f16(u8, off)
        b = _f16(u8, off + 2)
    elif qt == Q2_K:
        var sc = u8.unsafe_load[width=16](off)
        a = rebind[SIMD[DType.float32, NG]]((sc & 15).cast[DType.float32]() * _f16(u8, off + 80))
        b = rebind[SIMD[DType.float32, NG]](-((sc >> 4).cast[DType.float32]() * _f16(u8, off + 82)))
    elif qt == Q3_K:
        # i < 8: low 4 bits of byte i, else high 4 bits of byte i - 8; 2 high bits from byte
        # 8 + i % 4 at bit 2 (i / 4); the 6-bit result is offset by 32.
        var s8 = u8.unsafe_load[width=8](off + 96)
        var s4 = u8.unsafe_load[width=4](off + 104)
        var low = (s8 & 15).join(s8 >> 4)
        comptime HSHIFT = SIMD[DType.uint8, 16](0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6)
        var high = (s4.join(s4).join(s4.join(s4)) >> HSHIFT) & 3
        var sc = (low | (high << 4)).cast[DType.int32]() - 32
        a = rebind[SIMD[DType.float32, NG]](sc.cast[DType.float32]() * _f16(u8, off + 108))
        b = 0
    elif qt == Q4_K or qt == Q5_K:
        # 12 bytes S: sc[j] = S[j] & 63, m[j] = S[j+4] & 63 for j < 4; for j >= 4 the low 4 bits
        # come from S[j+4] (sc low nibble, m high nibble) and the high 2 from the top of S[j-4] / S[j].
        var s = u8.unsafe_load[width=16](off)
        var s0 = s.slice[4, offset=4]()
        var s4 = s.slice[4, offset=8]()
        var s8 = s.slice[4, offset=12]()
        var sc = (s0 & 63).join((s8 & 15) | ((s0 >> 6) << 4))
        var m = (s4 & 63).join((s8 >> 4) | ((s4 >> 6) << 4))
        a = rebind[SIMD[DType.float32, NG]](sc.cast[DType.float32]() * _f16(u8, off))
        b = rebind[SIMD[DType.float32, NG]](-(m.cast[DType.float32]() * _f16(u8, off + 2)))
    else:  # Q6_K
        var sc = bitcast[DType.int8, 16](u8.unsafe_load[width=16](off + 192))
        a = rebind[SIMD[DType.float32, NG]](sc.cast[DType.float32]() * _f16(u8, off + 208))
        b = 0


@always_inline
def _codes[qt: Int, c: Int](u8: U8Ptr, off: Int) -> I16:
    """The unsigned codes of chunk c (weights 16c..16c+15) of the block at byte `off`.
    Loads of the same bytes for different chunks are merged by the compiler."""
    comptime if qt == Q5_0 or qt == Q5_1:
        comptime QH = 2 if qt == Q5_0 else 4
        var q = u8.unsafe_load[width=16](off + QH + 4).cast[DType.int32]()
        var nib = q & 15 if c == 0 else q >> 4
        var qh = I16(I32Ptr(unsafe_from_address=Int(u8.unsafe_offset(off + QH)))[])
        # Rotating lane i's copy of qh left by (4 - 16c - i) mod 32 puts its bit 16c + i at bit 4
        # in one instruction (vprolvd), where shifting needs a right and a left shift.
        comptime ROT = (I16(36 - 16 * c) - I16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)) & 31
        return nib | (llvm_intrinsic["llvm.fshl", I16](qh, qh, ROT) & 16)
    elif qt == Q4_K or qt == Q5_K:
        comptime QS = 16 if qt == Q4_K else 48
        comptime j = c // 4
        comptime r = c % 4
        var q = u8.unsafe_load[width=16](off + QS + 32 * j + 16 * (r % 2)).cast[DType.int32]()
        var nib = q & 15 if r < 2 else q >> 4
        comptime if qt == Q4_K:
            return nib
        else:
            comptime g = c // 2
            var qh = u8.unsafe_load[width=16](off + 16 + 16 * (c % 2)).cast[DType.int32]()
            comptime if g <= 4:
                return nib | ((qh << I16(4 - g)) & 16)
            else:
                return nib | ((qh >> I16(g - 4)) & 16)
    elif qt == Q6_K:
        comptime h = c // 8
        comptime s = (c % 8) // 2
        comptime l0 = 16 * (c % 2)
        var ql = u8.unsafe_load[width=16](off + 64 * h + 32 * (s % 2) + l0).cast[DType.int32]()
        var nib = ql & 15 if s < 2 else ql >> 4
        var qh = u8.unsafe_load[width=16](off + 128 + 32 * h + l0).cast[DType.int32]()
        comptime if 2 * s <= 4:
            return nib | ((qh << I16(4 - 2 * s)) & 48)
        else:
            return nib | ((qh >> I16(2 * s - 4)) & 48)
    elif qt == Q2_K:
        comptime h = c // 8
        comptime s = (c % 8) // 2
        var q = u8.unsafe_load[width=16](off + 16 + 32 * h + 16 * (c % 2)).cast[DType.int32]()
        return (q >> I16(2 * s)) & 3
    else:  # Q3_K
        comptime h = c // 8
        comptime s = (c % 8) // 2
        comptime j = c // 2
        var q = u8.unsafe_load[width=16](off + 32 + 32 * h + 16 * (c % 2)).cast[DType.int32]()
        var hm = u8.unsafe_load[width=16](off + 16 * (c % 2)).cast[DType.int32]()
        var hbit: I16
        comptime if j <= 2:
            hbit = (hm << I16(2 - j)) & 4
        else:
            hbit = (hm >> I16(j - 2)) & 4
        return ((q >> I16(2 * s)) & 3) | hbit


@always_inline
def _dequant_block[qt: Int](u8: U8Ptr, off: Int, dst: F32Ptr, dst_off: Int):
    """The block's QB weights into dst[dst_off:], bit-identical to gguf.quants.dequantize: the
    zero point is removed in integers (so a zero weight keeps numpy's sign of zero) and
    A * code is exact, so the one rounding left is the same as numpy's."""
    comptime NC = _qb[qt]() // 16
    comptime GS = _group[qt]()
    comptime OFF = _offset[qt]()
    comptime HAS_MIN = qt == Q5_1 or qt == Q2_K or qt == Q4_K or qt == Q5_K
    var a = SIMD[DType.float32, _ng[qt]()](0)
    var b = SIMD[DType.float32, _ng[qt]()](0)
    _scales[qt](u8, off, a, b)
    comptime for c in range(NC):
        comptime g = c * 16 // GS
        var q = _codes[qt, c](u8, off)
        comptime if OFF != 0:
            q = q - I16(OFF)
        var w: V16
        comptime if HAS_MIN:
            w = q.cast[DType.float32]().fma(V16(a[g]), V16(b[g]))
        else:
            w = q.cast[DType.float32]() * a[g]
        dst.unsafe_store(dst_off + 16 * c, w)


# ---------------------------------------------------------------- GEMV (small T)


@always_inline
def _ub[qt: Int]() -> Int:
    """Blocks per GEMV step: the 32-weight blocks go four at a time so their scales are
    converted together (one float16 conversion and one min-term FMA per four blocks)."""
    return 4 if _qb[qt]() == 32 else 1


@always_inline
def _unit_scales[qt: Int, UB: Int](u8: U8Ptr, off: Int, mut a: SIMD[DType.float32, UB * _ng[qt]()],
                                   mut b: SIMD[DType.float32, UB * _ng[qt]()]):
    """A and B' = B - OFFSET * A of UB consecutive blocks (group g of block u at lane u NG + g)."""
    comptime BB = _block_bytes[qt]()
    comptime NGU = UB * _ng[qt]()
    comptime if _qb[qt]() == 32 and UB > 1:
        var d = SIMD[DType.float16, UB](0)
        var m = SIMD[DType.float16, UB](0)
        comptime for u in range(UB):
            d[u] = Pointer[Float16, MutAnyOrigin](unsafe_from_address=Int(u8.unsafe_offset(off + u * BB)))[]
            comptime if qt == Q5_1:
                m[u] = Pointer[Float16, MutAnyOrigin](unsafe_from_address=Int(u8.unsafe_offset(off + u * BB + 2)))[]
        a = rebind[SIMD[DType.float32, NGU]](d.cast[DType.float32]())
        b = rebind[SIMD[DType.float32, NGU]](m.cast[DType.float32]())
    else:
        var a1 = SIMD[DType.float32, _ng[qt]()](0)
        var b1 = SIMD[DType.float32, _ng[qt]()](0)
        _scales[qt](u8, off, a1, b1)
        a = rebind[SIMD[DType.float32, NGU]](a1)
        b = rebind[SIMD[DType.float32, NGU]](b1)
    comptime if _offset[qt]() != 0:
        b = b - Float32(_offset[qt]()) * a  # the zero point folded into the min


@always_inline
def _gemv_unit[qt: Int, TT: Int, R: Int, NA: Int, UB: Int](
    u8: Array[U8Ptr, R], blk: Int, x: F32Ptr, k: Int, sx: F32Ptr,
    mut acc: Array[V16, R * NA * TT], mut accb: Array[SIMD[DType.float32, _ub[qt]() * _ng[qt]()], R],
):
    """Add blocks blk..blk+UB-1 of R rows to the accumulators: acc[i, t, chunk % NA] for row i
    and token t; with one token the min terms go to accb[i] (lanes per group)."""
    comptime QB = _qb[qt]()
    comptime BB = _block_bytes[qt]()
    comptime NC = QB // 16
    comptime GS = _group[qt]()
    comptime NG = _ng[qt]()
    comptime NGU = UB * NG
    comptime NT = NA * TT
    comptime for i in range(R):
        comptime for line in range(0, UB * BB, 64):
            prefetch[PrefetchOptions().for_read().medium_locality().to_data_cache()](
                u8[i].unsafe_offset(blk * BB + line + PF_BYTES))
    var a = Array[SIMD[DType.float32, NGU], R](fill=0)
    var b = Array[SIMD[DType.float32, NGU], R](fill=0)
    comptime for i in range(R):
        _unit_scales[qt, UB](u8[i], blk * BB, a[i], b[i])
    comptime if TT == 1:
        # A * dot(code, x) per group; B' * sum(x) per unit (sx holds the group sums of x).
        var part = Array[V16, R](fill=0)
        comptime for u in range(UB):
            comptime for c in range(NC):
                comptime g = u * NG + c * 16 // GS
                comptime n = u * NC + c  # chunk number within the unit
                var xv = x.unsafe_load[width=16]((blk + u) * QB + 16 * c)
                comptime for i in range(R):
                    var q = _codes[qt, c](u8[i], (blk + u) * BB).cast[DType.float32]()
                    comptime if GS == 16:
                        acc[i * NT + n % NA] = (q * xv).fma(V16(a[i][g]), acc[i * NT + n % NA])
                    elif c % 2 == 0:
                        part[i] = q * xv
                    else:
                        var s = q.fma(xv, part[i])
                        acc[i * NT + (n // 2) % NA] = s.fma(V16(a[i][g]), acc[i * NT + (n // 2) % NA])
        var sxv = sx.unsafe_load[width=NGU](blk * NG)
        comptime for i in range(R):
            comptime if UB == _ub[qt]():
                comptime NGA = _ub[qt]() * NG
                accb[i] = rebind[SIMD[DType.float32, NGA]](b[i]).fma(rebind[SIMD[DType.float32, NGA]](sxv), accb[i])
            else:  # a single 32-weight block (the tail): lane 0
                accb[i][0] = b[i][0].fma(sxv[0], accb[i][0])
    else:
        comptime for u in range(UB):
            comptime for c in range(NC):
                comptime g = u * NG + c * 16 // GS
                comptime n = u * NC + c
                var w = Array[V16, R](fill=0)
                comptime for i in range(R):
                    w[i] = _codes[qt, c](u8[i], (blk + u) * BB).cast[DType.float32]().fma(V16(a[i][g]), V16(b[i][g]))
                comptime for t in range(TT):
                    var xv = x.unsafe_load[width=16](t * k + (blk + u) * QB + 16 * c)
                    comptime for i in range(R):
                        comptime ai = i * NT + t * NA + n % NA
                        acc[ai] = w[i].fma(xv, acc[ai])


@always_inline
def _gemv_tile[qt: Int, TT: Int, R: Int](w_addr: Int, row_bytes: Int, nb: Int, x: F32Ptr, k: Int,
                                         sx: F32Ptr, y: F32Ptr, n: Int, r: Int):
    """y[t, r + i] = dot(W[r + i], x[t]) for R rows and TT tokens, streaming the rows once.
    NA accumulators per (row, token) hide the FMA latency; NA depends on TT only, so a row's
    summation order (and result) does not depend on how rows are grouped into tiles."""
    comptime NG = _ng[qt]()
    comptime NA = 4 if TT == 1 else (2 if TT < 4 else 1)
    comptime NT = NA * TT
    comptime UB = _ub[qt]()
    var acc = Array[V16, R * NT](fill=0)
    var accb = Array[SIMD[DType.float32, UB * NG], R](fill=0)
    var u8 = Array[U8Ptr, R](fill=U8Ptr(unsafe_from_address=w_addr))
    comptime for i in range(R):
        u8[i] = U8Ptr(unsafe_from_address=w_addr + (r + i) * row_bytes)
    var blk = 0
    while blk + UB <= nb:
        _gemv_unit[qt, TT, R, NA, UB](u8, blk, x, k, sx, acc, accb)
        blk += UB
    while blk < nb:
        _gemv_unit[qt, TT, R, NA, 1](u8, blk, x, k, sx, acc, accb)
        blk += 1
    comptime for i in range(R):
        comptime for t in range(TT):
            var total = acc[i * NT + t * NA]
            comptime for j in range(1, NA):
                total += acc[i * NT + t * NA + j]
            var s = total.reduce_add()
            comptime if TT == 1:
                s += accb[i].reduce_add()
            y[unsafe_offset=t * n + r + i] = s


def _gemv_rows[qt: Int, TT: Int](w_addr: Int, row_bytes: Int, nb: Int, x: F32Ptr, k: Int,
                                 sx: F32Ptr, y: F32Ptr, n: Int, r0: Int, r1: Int):
    # Several tokens re-read x for every row: two rows at a time halve those loads.
    comptime R = 1 if TT == 1 else 2
    var r = r0
    while r + R <= r1:
        _gemv_tile[qt, TT, R](w_addr, row_bytes, nb, x, k, sx, y, n, r)
        r += R
    while r < r1:
        _gemv_tile[qt, TT, 1](w_addr, row_bytes, nb, x, k, sx, y, n, r)
        r += 1


def _gemv[qt: Int, TT: Int](w_addr: Int, x_addr: Int, y_addr: Int, n: Int, k: Int, max_items: Int,
                           r0: Int = 0, r1: Int = -1) raises:
    comptime QB = _qb[qt]()
    comptime GS = _group[qt]()
    var nb = k // QB
    var row_bytes = nb * _block_bytes[qt]()
    var x = F32Ptr(unsafe_from_address=x_addr)
    var y = F32Ptr(unsafe_from_address=y_addr)
    # One token: the group sums of x for the min term, once per call.
    var ngroups = k // GS if TT == 1 else 1
    var sums = List[Float32](length=ngroups, fill=0)
    var sx = F32Ptr(unsafe_from_address=Int(sums.unsafe_ptr()))
    comptime if TT == 1:
        for g in range(ngroups):
            var s = x.unsafe_load[width=16](g * GS)
            comptime if GS == 32:
                s += x.unsafe_load[width=16](g * GS + 16)
            sx[unsafe_offset=g] = s.reduce_add()
    var items = _work_items(n, row_bytes * TT, 16, GEMV_PARALLEL_MIN_BYTES)
    if max_items > 0:
        items = min(items, max_items)
    if r1 >= 0:  # a share of the rows, on this thread (mojo/decode.mojo's worker team)
        _gemv_rows[qt, TT](w_addr, row_bytes, nb, x, k, sx, y, n, r0, r1)
    elif items == 1:
        _gemv_rows[qt, TT](w_addr, row_bytes, nb, x, k, sx, y, n, 0, n)
    else:
        def work(i: Int) {imm w_addr, imm row_bytes, imm nb, imm x, imm k, imm sx, imm y, imm n, imm items}:
            _gemv_rows[qt, TT](w_addr, row_bytes, nb, x, k, sx, y, n, i * n // items, (i + 1) * n // items)
        parallelize(work, items)
    _ = sums^


# ---------------------------------------------------------------- GEMM (prefill), as in quant.mojo


def _pack_x(x: F32Ptr, xp: F32Ptr, t: Int, k: Int, ntb: Int):
    """Pack xp[tb][kk][j] = x[tb*16 + j, kk] (zero for tokens past t): 16 tokens per vector.
    16 x 16 tiles are transposed in registers by four rounds of interleaving row i with row i + 8."""
    for tb in range(ntb):
        var dst = tb * k * 16
        var kk = 0
        while kk < k:
            var rows = Array[V16, 16](fill=0)
            comptime for j in range(16):
                if tb * 16 + j < t:
                    rows[j] = x.unsafe_load[width=16]((tb * 16 + j) * k + kk)
            comptime for _round in range(4):
                var nxt = Array[V16, 16](fill=0)
                comptime for i in range(8):
                    var both = rows[i].interleave(rows[i + 8])
                    nxt[2 * i] = both.slice[16, offset=0]()
                    nxt[2 * i + 1] = both.slice[16, offset=16]()
                rows = nxt^
            comptime for i in range(16):
                xp.unsafe_store(dst + (kk + i) * 16, rows[i])
            kk += 16


@always_inline
def _micro[NT: Int](a: F32Ptr, lda: Int, bp: F32Ptr, b_off: Int, b_stride: Int, kc: Int,
                    mut acc: Array[V16, MR * NT]):
    """acc[i, j] += sum_kk a[i, kk] * xp[tb + j][kk] for MR rows and NT blocks of 16 tokens."""
    for kk in range(kc):
        var bv = Array[V16, NT](fill=0)
        comptime for j in range(NT):
            bv[j] = bp.unsafe_load[width=16](b_off + j * b_stride + kk * 16)
        comptime for i in range(MR):
            var av = V16(a[unsafe_offset=i * lda + kk])
            comptime for j in range(NT):
                acc[i * NT + j] = av.fma(bv[j], acc[i * NT + j])


@always_inline
def _tile[NT: Int](a: F32Ptr, kc: Int, xp: F32Ptr, k: Int, kc0: Int, tb: Int, t: Int,
                   part: F32Ptr, t_pad: Int, p_row: Int, first: Bool, last: Bool,
                   y: F32Ptr, n: Int, row0: Int, rows: Int):
    """One MR x (16*NT) tile of Y^T over the K chunk [kc0, kc0+kc): start from zero or from the
    partial sums of earlier chunks, and either keep the partials or write Y on the last chunk."""
    var acc = Array[V16, MR * NT](fill=0)
    if not first:
        comptime for i in range(MR):
            comptime for j in range(NT):
                acc[i * NT + j] = part.unsafe_load[width=16]((p_row + i) * t_pad + (tb + j) * 16)
    _micro[NT](a, kc, xp, tb * k * 16 + kc0 * 16, k * 16, kc, acc)
    if last:
        comptime for i in range(MR):
            if i < rows:
                comptime for j in range(NT):
                    var v = acc[i * NT + j]
                    var t0 = (tb + j) * 16
                    comptime for l in range(16):
                        if t0 + l < t:
                            y[unsafe_offset=(t0 + l) * n + row0 + i] = v[l]
    else:
        comptime for i in range(MR):
            comptime for j in range(NT):
                part.unsafe_store((p_row + i) * t_pad + (tb + j) * 16, acc[i * NT + j])


def _gemm_rows[qt: Int](w_addr: Int, row_bytes: Int, xp: F32Ptr, t: Int, k: Int, kc_max: Int,
                        y: F32Ptr, n: Int, r0: Int, r1: Int):
    """Rows r0..r1 of Y^T = W X^T, K in chunks of kc_max so the packed X chunk stays in L2."""
    comptime QB = _qb[qt]()
    comptime BB = _block_bytes[qt]()
    var ntb = (t + 15) // 16
    var t_pad = ntb * 16
    var a_buf = List[Float32](length=MR * kc_max, fill=0)
    var a = F32Ptr(unsafe_from_address=Int(a_buf.unsafe_ptr()))
    var nrows = r1 - r0
    var npanels = (nrows + MR - 1) // MR
    var multi = kc_max < k
    var part_buf = alloc[Float32]((npanels * MR * t_pad) if multi else 1)  # written by the first chunk
    var part = F32Ptr(unsafe_from_address=Int(part_buf))
    var kc0 = 0
    while kc0 < k:
        var kc = min(kc_max, k - kc0)
        var first = kc0 == 0
        var last = kc0 + kc == k
        for p in range(npanels):
            var row0 = r0 + p * MR
            var rows = min(MR, r1 - row0)
            # Dequantize the MR x kc tile of W (rows past r1 are zero).
            for i in range(MR):
                if i < rows:
                    var u8 = U8Ptr(unsafe_from_address=w_addr + (row0 + i) * row_bytes)
                    for blk in range(kc // QB):
                        _dequant_block[qt](u8, (kc0 // QB + blk) * BB, a, i * kc + blk * QB)
                else:
                    for kk in range(kc // 16):
                        a.unsafe_store(i * kc + kk * 16, V16(0))
            var tb = 0
            while tb + 2 <= ntb:
                _tile[2](a, kc, xp, k, kc0, tb, t, part, t_pad, p * MR, first, last, y, n, row0, rows)
                tb += 2
            if tb < ntb:
                _tile[1](a, kc, xp, k, kc0, tb, t, part, t_pad, p * MR, first, last, y, n, row0, rows)
        kc0 += kc
    _ = a_buf^
    part_buf.free()


def _gemm[qt: Int](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int, max_items: Int) raises:
    comptime QB = _qb[qt]()
    var row_bytes = (k // QB) * _block_bytes[qt]()
    var x = F32Ptr(unsafe_from_address=x_addr)
    var y = F32Ptr(unsafe_from_address=y_addr)
    var ntb = (t + 15) // 16
    var xp_buf = alloc[Float32](ntb * 16 * k)  # every element is written by _pack_x
    var xp = F32Ptr(unsafe_from_address=Int(xp_buf))
    _pack_x(x, xp, t, k, ntb)
    # K chunk: the packed X chunk (t_pad x kc floats) should fit in about 512 KiB of L2.
    var kc_max = max(QB, min(k, ((1 << 17) // (ntb * 16)) // QB * QB))
    var panels = (n + MR - 1) // MR
    var items = 1 if panels < 2 or 2 * t * n * k < GEMM_PARALLEL_MIN_FLOPS else min(panels, num_physical_cores())
    if max_items > 0:
        items = min(items, max_items)
    if items == 1:
        _gemm_rows[qt](w_addr, row_bytes, xp, t, k, kc_max, y, n, 0, n)
    else:
        def work(i: Int) {imm w_addr, imm row_bytes, imm xp, imm t, imm k, imm kc_max, imm y, imm n, imm items, imm panels}:
            var r0 = (i * panels // items) * MR
            var r1 = min(n, ((i + 1) * panels // items) * MR)
            _gemm_rows[qt](w_addr, row_bytes, xp, t, k, kc_max, y, n, r0, r1)
        parallelize(work, items)
    xp_buf.free()


def _matmul[qt: Int](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int, max_items: Int,
                     path: Int = PATH_FLOAT, r0: Int = 0, r1: Int = -1) raises:
    """`path` (quant.mojo's PATH_*) applies to Q5_0 / Q5_1 only, as for Q4_0 / Q4_1 there: int8
    activations on quant.mojo's GEMV (auto: for T <= 8); the other types stay float32.
    r1 >= 0: only output rows [r0, r1), on the calling thread (T <= SMALL_T)."""
    comptime if qt == Q5_0 or qt == Q5_1:
        if path != PATH_FLOAT and (path != PATH_AUTO or t <= SMALL_T):
            _matmul_i8_path[qt](_best_path() if path == PATH_AUTO else path, w_addr, x_addr, y_addr, t, n, k, max_items,
                                r0, r1)
            return
    if t > SMALL_T:
        if r1 >= 0:
            raise Error("matmul: a row share needs at most ", SMALL_T, " activation rows")
        _gemm[qt](w_addr, x_addr, y_addr, t, n, k, max_items)
        return
    comptime for tt in range(1, SMALL_T + 1):  # one GEMV instance per token count
        if t == tt:
            _gemv[qt, tt](w_addr, x_addr, y_addr, n, k, max_items, r0, r1)


# ---------------------------------------------------------------- dequantize / embedding gather


def _dequant_rows[qt: Int](src_addr: Int, dst: F32Ptr, k: Int, r0: Int, r1: Int):
    comptime QB = _qb[qt]()
    comptime BB = _block_bytes[qt]()
    var nb = k // QB
    for r in range(r0, r1):
        var u8 = U8Ptr(unsafe_from_address=src_addr + r * nb * BB)
        for b in range(nb):
            _dequant_block[qt](u8, b * BB, dst, r * k + b * QB)


def _dequant[qt: Int](src_addr: Int, dst_addr: Int, rows: Int, k: Int) raises:
    var dst = F32Ptr(unsafe_from_address=dst_addr)
    var items = _work_items(rows, k * 4, 4)
    if items == 1:
        _dequant_rows[qt](src_addr, dst, k, 0, rows)
    else:
        def work(i: Int) {imm src_addr, imm dst, imm k, imm rows, imm items}:
            _dequant_rows[qt](src_addr, dst, k, i * rows // items, (i + 1) * rows // items)
        parallelize(work, items)


def _gather_row[qt: Int](table_addr: Int, row_bytes: Int, id: Int, d: Int, dst: F32Ptr, out_off: Int):
    comptime QB = _qb[qt]()
    comptime BB = _block_bytes[qt]()
    var u8 = U8Ptr(unsafe_from_address=table_addr + id * row_bytes)
    for b in range(d // QB):
        _dequant_block[qt](u8, b * BB, dst, out_off + b * QB)


def _gather[qt: Int](table_addr: Int, ids_addr: Int, out_addr: Int, t: Int, d: Int) raises:
    var ids = I32Ptr(unsafe_from_address=ids_addr)
    var dst = F32Ptr(unsafe_from_address=out_addr)
    var row_bytes = (d // _qb[qt]()) * _block_bytes[qt]()
    var items = _work_items(t, d * 4, 4)
    if items == 1:
        for i in range(t):
            _gather_row[qt](table_addr, row_bytes, Int(ids[unsafe_offset=i]), d, dst, i * d)
    else:
        def work(c: Int) {imm table_addr, imm row_bytes, imm ids, imm dst, imm t, imm d, imm items}:
            for i in range(c * t // items, (c + 1) * t // items):
                _gather_row[qt](table_addr, row_bytes, Int(ids[unsafe_offset=i]), d, dst, i * d)
        parallelize(work, items)


# ---------------------------------------------------------------- Python entries


def matmul(qtype: PythonObject, w: PythonObject, x: PythonObject, y: PythonObject, dims: PythonObject) raises -> PythonObject:
    """y[T, N] = x[T, K] @ W[N, K]^T with W as GGUF blocks; dims = (T, N, K, max_work_items, path)
    where max_work_items 0 lets the kernel choose and 1 keeps it on the calling thread, and path is
    quant.mojo's PATH_* code (used by Q5_0 / Q5_1: int8 activations; the other types ignore it)."""
    var qt = Int(py=qtype)
    var wa = Int(py=w)
    var xa = Int(py=x)
    var ya = Int(py=y)
    var t = Int(py=dims[0])
    var n = Int(py=dims[1])
    var k = Int(py=dims[2])
    var mi = Int(py=dims[3])
    var path = Int(py=dims[4])
    if qt == Q5_0:
        _matmul[Q5_0](wa, xa, ya, t, n, k, mi, path)
    elif qt == Q5_1:
        _matmul[Q5_1](wa, xa, ya, t, n, k, mi, path)
    elif qt == Q2_K:
        _matmul[Q2_K](wa, xa, ya, t, n, k, mi)
    elif qt == Q3_K:
        _matmul[Q3_K](wa, xa, ya, t, n, k, mi)
    elif qt == Q4_K:
        _matmul[Q4_K](wa, xa, ya, t, n, k, mi)
    elif qt == Q5_K:
        _matmul[Q5_K](wa, xa, ya, t, n, k, mi)
    elif qt == Q6_K:
        _matmul[Q6_K](wa, xa, ya, t, n, k, mi)
    else:
        raise Error("matmul: unsupported type code ", qt)
    return PythonObject(None)


def dequantize(qtype: PythonObject, src: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Fill dst[rows, K] float32 with the weights of src[rows, K/QB blocks]; dims = (rows, K)."""
    var qt = Int(py=qtype)
    var sa = Int(py=src)
    var da = Int(py=dst)
    var rows = Int(py=dims[0])
    var k = Int(py=dims[1])
    if qt == Q5_0:
        _dequant[Q5_0](sa, da, rows, k)
    elif qt == Q5_1:
        _dequant[Q5_1](sa, da, rows, k)
    elif qt == Q2_K:
        _dequant[Q2_K](sa, da, rows, k)
    elif qt == Q3_K:
        _dequant[Q3_K](sa, da, rows, k)
    elif qt == Q4_K:
        _dequant[Q4_K](sa, da, rows, k)
    elif qt == Q5_K:
        _dequant[Q5_K](sa, da, rows, k)
    elif qt == Q6_K:
        _dequant[Q6_K](sa, da, rows, k)
    else:
        raise Error("dequantize: unsupported type code ", qt)
    return PythonObject(None)


def embedding(qtype: PythonObject, table: PythonObject, ids: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Fill out[T, D] float32 with rows ids[T] (int32) of table[vocab, D]; dims = (T, D)."""
    var qt = Int(py=qtype)
    var ta = Int(py=table)
    var ia = Int(py=ids)
    var oa = Int(py=dst)
    var t = Int(py=dims[0])
    var d = Int(py=dims[1])
    if qt == Q5_0:
        _gather[Q5_0](ta, ia, oa, t, d)
    elif qt == Q5_1:
        _gather[Q5_1](ta, ia, oa, t, d)
    elif qt == Q2_K:
        _gather[Q2_K](ta, ia, oa, t, d)
    elif qt == Q3_K:
        _gather[Q3_K](ta, ia, oa, t, d)
    elif qt == Q4_K:
        _gather[Q4_K](ta, ia, oa, t, d)
    elif qt == Q5_K:
        _gather[Q5_K](ta, ia, oa, t, d)
    elif qt == Q6_K:
        _gather[Q6_K](ta, ia, oa, t, d)
    else:
        raise Error("embedding: unsupported type code ", qt)
    return PythonObject(None)


# ---------------------------------------------------------------- Modular's int8 k-quant matmul
# The max wheel's `quantization` package has Q4_K and Q6_K CPU matmuls that quantize the
# activations to int8 (per 256, as llama.cpp's Q8_K) and use integer dot products; on weights of
# a few MiB they beat the float32 kernels above (bench/RESULTS.md, "CPU kernels: k-quants"), so
# mojollm.kernels.quant routes large Q4_K / Q6_K layers here. Weights are repacked once into its
# layout (same size); rows must come in multiples of 32 (other counts corrupt memory).


def modular_pack(qtype: PythonObject, src: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Repack GGUF blocks src[N, row_bytes] into Modular's layout dst (same size); dims = (N, row_bytes)."""
    var qt = Int(py=qtype)
    var n = Int(py=dims[0])
    var row_bytes = Int(py=dims[1])
    var s = TileTensor(U8Ptr(unsafe_from_address=Int(py=src)), row_major(Coord(n, row_bytes)))
    var d = TileTensor(U8Ptr(unsafe_from_address=Int(py=dst)), row_major(Coord(n, row_bytes)))
    if qt == Q4_K:
        matmul_Q4_K_pack_b(s, d)
    elif qt == Q6_K:
        matmul_Q6_K_pack_b(s, d)
    else:
        raise Error("modular_pack: unsupported type code ", qt)
    return PythonObject(None)


def modular_matmul(qtype: PythonObject, w: PythonObject, x: PythonObject, y: PythonObject, dims: PythonObject) raises -> PythonObject:
    """y[T, N] = x[T, K] @ W[N, K]^T with W packed by modular_pack; dims = (T, N, K)."""
    var qt = Int(py=qtype)
    var t = Int(py=dims[0])
    var n = Int(py=dims[1])
    var k = Int(py=dims[2])
    var row_bytes = (k // 256) * (_block_bytes[Q4_K]() if qt == Q4_K else _block_bytes[Q6_K]())
    var xt = TileTensor(F32Ptr(unsafe_from_address=Int(py=x)), row_major(Coord(t, k)))
    var wt = TileTensor(U8Ptr(unsafe_from_address=Int(py=w)), row_major(Coord(n, row_bytes)))
    var yt = TileTensor(F32Ptr(unsafe_from_address=Int(py=y)), row_major(Coord(t, n)))
    if qt == Q4_K:
        matmul_Q4_K(xt, wt, yt)
    elif qt == Q6_K:
        matmul_Q6_K(xt, wt, yt)
    else:
        raise Error("modular_matmul: unsupported type code ", qt)
    return PythonObject(None)


@export
def PyInit_kquant() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("kquant")
        m.def_function[matmul]("matmul", docstring="y = x @ W^T on GGUF k-quant / Q5 blocks: (qtype, w, x, y, (T, N, K, max_items))")
        m.def_function[dequantize]("dequantize", docstring="GGUF blocks -> float32: (qtype, src, dst, (rows, K))")
        m.def_function[embedding]("embedding", docstring="row gather: (qtype, table, ids, out, (T, D))")
        m.def_function[modular_pack]("modular_pack", docstring="Q4_K/Q6_K -> Modular's layout: (qtype, src, dst, (N, row_bytes))")
        m.def_function[modular_matmul]("modular_matmul", docstring="y = x @ W^T, W from modular_pack: (qtype, w, x, y, (T, N, K))")
        return m.finalize()
    except e:
        abort(String("failed to create the kquant module: ", e))
