# GGUF block-quantized kernels (Q4_0, Q4_1, Q8_0; and F8_E4M3) and the embedding gather (CPU, float32 out);
# also the int8-activation GEMV of Q5_0 / Q5_1 (mojo/kquant.mojo's matmul calls _matmul_path).
#
# Block layouts (ggml; 32 weights per block along a row, see python/mojollm/weights.py):
#     Q4_0: f16 d, 16 B nibbles          w = (q - 8) * d        18 B
#     Q4_1: f16 d, f16 m, 16 B nibbles   w = q * d + m          20 B
#     Q8_0: f16 d, 32 x int8             w = q * d              34 B
#     F8_E4M3: f16 d, 32 x E4M3 (FP8)    w = d * e4m3(q)        34 B   (not ggml's; float path only)
# Nibble byte j holds element j (low 4 bits) and element j + 16 (high 4 bits).
#
# Every entry takes raw addresses and sizes from mojollm.kernels.quant, which has already
# checked shapes, dtypes, contiguity and id ranges; nothing here re-validates.
#
# Y[T, N] = X[T, K] @ W[N, K]^T straight from the blocks, never a dequantized copy of W. The
# `path` argument picks the arithmetic (PATH_*; default: int8 for T <= 8, float above):
#   * int8 activations (decode, T <= 8): the activations are quantized once per call, per
#     32-block, to int8 with a float32 scale (dx = max|x| / 127, q = round-half-even(x * (1/dx)),
#     Q8_0-style, plus the block's sum of codes); each weight block then takes integer dot
#     products, 32 (weight code, activation code) products summed exactly in int32, scaled once
#     per block by float32(dw * dx). The instruction set follows the compile host (see "int8
#     paths" below). As llama.cpp's Q8 activations, this rounds each activation by <= dx/2.
#   * float, T <= 8: each row's blocks are streamed once and decoded in registers. One token: a
#     block adds d * dot(q, x) + m * sum(x) (Q4_0: m = -8d), i.e. one nibble decode and three
#     FMAs. Several tokens: the block is dequantized once in registers (q * d + m) and costs two
#     FMAs per token; two rows share every x load.
#   * float, T > 8 (prefill): a GEMM. X is packed transposed (k-major, 16 tokens per vector); each
#     core dequantizes MR rows x KC columns of W into an L1 tile and runs an MR x 32-token
#     register microkernel over every token block, so each W block is decoded once per call
#     and reused T times. The packed X chunk (T x KC) stays in L2 across row panels.
# GEMVs split rows over the cores in ONE parallel region. The float path keeps activations in
# float32: its results match a float64 product on the dequantized weights to float32 rounding.

from std.math import floor, trunc
from std.memory import alloc, bitcast
from std.os import abort
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import CompilationTarget, llvm_intrinsic, num_physical_cores
from std.sys.intrinsics import PrefetchOptions, prefetch

from max.algorithm import parallelize

comptime F32Ptr = Pointer[Float32, MutAnyOrigin]
comptime F16Ptr = Pointer[Float16, MutAnyOrigin]
comptime U8Ptr = Pointer[UInt8, MutAnyOrigin]
comptime U16Ptr = Pointer[UInt16, MutAnyOrigin]
comptime I32Ptr = Pointer[Int32, MutAnyOrigin]
comptime V16 = SIMD[DType.float32, 16]

# Type codes: ggml's GGMLQuantizationType values.
comptime F32 = 0
comptime F16 = 1
comptime Q4_0 = 2
comptime Q4_1 = 3
comptime Q8_0 = 8
comptime BF16 = 30
# Q5_0 (22 B: f16 d | u32 qh | 16 B nibbles, w = (q - 16) * d) and Q5_1 (24 B: f16 d | f16 m |
# u32 qh | nibbles, w = q * d + m), q = nibble | (bit j of qh) << 4: only their int8-activation
# GEMV lives here (mojo/kquant.mojo calls _matmul_path for them); the rest is in kquant.mojo.
comptime Q5_0 = 6
comptime Q5_1 = 7
# W8A8 (SmoothQuant): Q8_0's blocks, but the activations are quantized to int8 per token (one
# scale per row over all of K, not per 32-block) at every T, prefill included. Not a ggml code.
comptime W8A8 = 101
# F8_E4M3 (mojollm.fp8): Q8_0's layout with OCP FP8 E4M3 codes (sign, 4 exponent bits of bias 7,
# 3 mantissa bits) in place of int8. Not a ggml code. The codes are no integers, so every T takes
# the float32 paths (GEMV, GEMM); _codes decodes them (_e4m3_scaled).
comptime F8_E4M3 = 100

comptime QK = 32
comptime SMALL_T = 8  # up to this many activation rows take the streaming (GEMV) path
comptime MR = 8  # W rows per GEMM microkernel tile
comptime PF_BYTES = 4096  # GEMV software prefetch distance (bytes ahead in the weight rows)
# A parallel region costs ~8 us when the runtime's workers are still spinning from the
# previous one, but they sleep after ~20-50 us idle and waking them took 200-400 us on the
# 2-core VM this was tuned on (a decode step's matmuls are normally that far apart). So work
# stays on the calling thread unless one core would need ~0.2-0.25 ms for it: 2 MiB of blocks
# for a GEMV (a core streams ~8-11 GB/s), 32 MFLOP for a GEMM (~130 GFLOP/s per core), 64 KiB
# of output for the gathers and conversions (not on the hot path).
comptime PARALLEL_MIN_BYTES = 1 << 16
comptime GEMV_PARALLEL_MIN_BYTES = 2 << 20
comptime GEMM_PARALLEL_MIN_FLOPS = 32 << 20
comptime GEMM_PART_BYTES = 1 << 19  # a GEMM row group's partial sums: at most this much


@always_inline
def _block_bytes[qt: Int]() -> Int:
    comptime if qt == Q4_0:
        return 18
    elif qt == Q4_1:
        return 20
    elif qt == Q5_0:
        return 22
    elif qt == Q5_1:
        return 24
    else:
        return 34


@always_inline
def _qs_off[qt: Int]() -> Int:
    """Byte offset of the 16 nibble bytes in a Q4_* / Q5_* block."""
    comptime if qt == Q4_0:
        return 2
    elif qt == Q4_1:
        return 4
    elif qt == Q5_0:
        return 6
    else:
        return 8


@always_inline
def _is_q5[qt: Int]() -> Bool:
    return qt == Q5_0 or qt == Q5_1


@always_inline
def _has_min[qt: Int]() -> Bool:
    """Whether blocks carry an offset m (w = q * d + m), added as m * dx * sum(q)."""
    return qt == Q4_1 or qt == Q5_1


def _work_items(rows: Int, bytes_per_row: Int, min_rows: Int, min_bytes: Int = PARALLEL_MIN_BYTES) -> Int:
    """How many row chunks to split an op into: 1 (no parallel region) when it is small, else
    one per core (`parallelize` hands each worker a fixed, contiguous share of the items, so
    more items than workers would not balance anything)."""
    if rows * bytes_per_row < min_bytes or rows < 2 * min_rows:
        return 1
    return max(1, min(rows // min_rows, num_physical_cores()))


# ---------------------------------------------------------------- block decoding


@always_inline
def _scale(h: F16Ptr, half_off: Int) -> Float32:
    return h[unsafe_offset=half_off].cast[DType.float32]()


@always_inline
def _e4m3_scaled(q: SIMD[DType.uint8, 32], mut lo: V16, mut hi: V16):
    """32 E4M3 codes as float32 values times 2^-8, exactly: elements 0..15 in lo, 16..31 in hi
    (NaN codes are refused at load). A float16 with the code's exponent and mantissa bits one
    place lower has the same exponent field, and float16's bias (15) is 8 more than E4M3's (7):
    so float16 bits = sign << 15 | (code & 0x7F) << 7, which the sign-extended code shifted left
    by 7 gives once bit 14 (a copy of the sign) is cleared. Subnormal codes become float16
    subnormals, which the conversion to float32 (vcvtph2ps on x86) takes exactly whatever the
    denormal flags say. All 32 codes go through the 16-bit steps in one 512-bit vector. Measured
    on one core of an AVX-512 host, codes in L1 with a dot product: 20 GB/s of codes (Q8_0's int8
    widening: 16); 10 GB/s when done 16 codes at a time; Mojo's own float8_e4m3fn cast is
    software (2.5 GB/s), and placing the bits in a float32 to multiply by 2^120 takes a microcode
    assist per subnormal product (0.8 GB/s)."""
    var s = bitcast[DType.int8, 32](q).cast[DType.int16]() << 7
    var h = bitcast[DType.float16, 32](bitcast[DType.uint16, 32](s) & 0xBFFF)
    lo = h.slice[16, offset=0]().cast[DType.float32]()
    hi = h.slice[16, offset=16]().cast[DType.float32]()


@always_inline
def _codes[qt: Int](u8: U8Ptr, off: Int, mut lo: V16, mut hi: V16):
    """Raw codes of the block at byte `off` as float32: elements 0..15 in lo, 16..31 in hi.
    Q4_*: 0..15 (unsigned nibbles); Q8_0: -128..127; F8_E4M3: the E4M3 values times 2^-8 (the
    callers' scales carry the 2^8: _group_scales, _dequant_block)."""
    comptime if qt == Q8_0:
        lo = bitcast[DType.int8, 16](u8.unsafe_load[width=16](off + 2)).cast[DType.float32]()
        hi = bitcast[DType.int8, 16](u8.unsafe_load[width=16](off + 18)).cast[DType.float32]()
    elif qt == F8_E4M3:
        _e4m3_scaled(u8.unsafe_load[width=32](off + 2), lo, hi)
    else:
        comptime qs = 2 if qt == Q4_0 else 4
        var q = u8.unsafe_load[width=16](off + qs).cast[DType.int32]()
        # A table lookup (vpermps reads only the low 4 bits of each index) turns a nibble into
        # its float value in one shuffle, where masking and converting take two instructions.
        comptime if CompilationTarget.has_avx512f():
            comptime codes = V16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
            lo = llvm_intrinsic["llvm.x86.avx512.permvar.sf.512", V16](codes, q)
            hi = llvm_intrinsic["llvm.x86.avx512.permvar.sf.512", V16](codes, q >> 4)
        else:  # other hosts (AVX2, Arm): mask and convert
            lo = (q & 15).cast[DType.float32]()
            hi = (q >> 4).cast[DType.float32]()


@always_inline
def _dequant_block[qt: Int](u8: U8Ptr, h: F16Ptr, off: Int, mut lo: V16, mut hi: V16):
    """The block's 32 weights, computed exactly as gguf.quants.dequantize does (same
    operations in the same order, no fused multiply-add), so results are bit-identical."""
    var d = _scale(h, off >> 1)
    comptime if qt == Q4_0:
        var q = u8.unsafe_load[width=16](off + 2).cast[DType.int32]()
        lo = ((q & 15) - 8).cast[DType.float32]() * d
        hi = ((q >> 4) - 8).cast[DType.float32]() * d
    elif qt == Q4_1:
        var m = _scale(h, (off >> 1) + 1)
        _codes[qt](u8, off, lo, hi)
        # Mojo contracts this into an FMA (one rounding where numpy rounds twice), but q * d is
        # exact in float32 (4-bit code times an 11-bit float16 scale), so the result is the same.
        lo = lo * d + m
        hi = hi * d + m
    elif qt == F8_E4M3:
        # d * 2^8 is exact, so this is float32(d * e4m3(q)), one rounding as in mojollm.fp8
        _codes[qt](u8, off, lo, hi)
        lo = lo * (d * 256)
        hi = hi * (d * 256)
    else:
        _codes[qt](u8, off, lo, hi)
        lo = lo * d
        hi = hi * d


# ---------------------------------------------------------------- GEMV (small T)


@always_inline
def _group_scales[qt: Int](h: F16Ptr, half_off: Int) -> SIMD[DType.float32, 8]:
    """Scales of the 4 blocks starting at half-word `half_off`: [d0, d1, d2, d3, m0, m1, m2, m3]
    (m = 0 for Q8_0 and F8_E4M3; Q4_0's m = -8d is applied by the caller; F8_E4M3's d times 2^8,
    see _codes). For Q4_* all eight halves lie in the group's first 64 bytes: one load and one
    permute instead of eight scalar conversions."""
    comptime if qt == Q4_1:
        var v = h.unsafe_load[width=32](half_off)
        return SIMD[DType.float16, 8](v[0], v[10], v[20], v[30], v[1], v[11], v[21], v[31]).cast[DType.float32]()
    elif qt == Q4_0:
        var v = h.unsafe_load[width=32](half_off)
        return SIMD[DType.float16, 8](v[0], v[9], v[18], v[27], v[0], v[9], v[18], v[27]).cast[DType.float32]()
    else:
        var r = SIMD[DType.float32, 8](0)
        comptime for i in range(4):
            r[i] = h[unsafe_offset=half_off + i * 17].cast[DType.float32]()
        comptime if qt == F8_E4M3:
            r *= 256
        return r


@always_inline
def _gemv_tile[qt: Int, TT: Int, R: Int](w_addr: Int, row_bytes: Int, nb: Int, x: F32Ptr, k: Int,
                                         sx: F32Ptr, y: F32Ptr, n: Int, r: Int):
    """Compute y[t, r + i] = dot(W[r + i], x[t]) for R rows and TT tokens, streaming the rows'
    blocks once. Blocks go four at a time so their scales are decoded together.

    One token: a block adds d * dot(q, x) + m * sum(x) (sx[b] = sum(x[b]) precomputed, Q4_0's
    m = -8d), i.e. 3 vector FMAs per block. Several tokens: each block is dequantized once in
    registers (q * d + m, 2 FMAs) and then costs 2 FMAs per token; R rows share each x load."""
    comptime BB = _block_bytes[qt]()
    comptime HB = BB // 2
    comptime G = 4
    comptime FACTORED = TT == 1
    # Enough independent accumulator chains to hide the FMA latency: with few tokens the lo
    # and hi halves (or even and odd blocks) go to separate accumulators. NA depends on TT only
    # so a row's summation order, and thus its result, does not depend on how rows are grouped.
    comptime NA = 2 if TT < 4 else 1
    comptime NT = NA * TT
    var acc = Array[V16, R * NT](fill=0)
    var accm = Array[SIMD[DType.float32, 4], R * TT](fill=0)
    var u8 = Array[U8Ptr, R](fill=U8Ptr(unsafe_from_address=w_addr))
    var h = Array[F16Ptr, R](fill=F16Ptr(unsafe_from_address=w_addr))
    comptime for i in range(R):
        u8[i] = U8Ptr(unsafe_from_address=w_addr + (r + i) * row_bytes)
        h[i] = F16Ptr(unsafe_from_address=w_addr + (r + i) * row_bytes)
    var b = 0
    while b + G <= nb:
        # Rows stream from memory once per call and the hardware prefetchers alone leave the
        # core waiting (a 3072x576 GEMV on weights not in cache: 5.0 -> 8.1 GB/s on one core,
        # 7.5 -> 13 GB/s on two): ask for the lines PF_BYTES ahead into L2, one prefetch per
        # 64 bytes of blocks. Rows are contiguous, so this runs into the next rows.
        comptime for i in range(R):
            comptime for line in range(0, G * BB, 64):
                prefetch[PrefetchOptions().for_read().medium_locality().to_data_cache()](
                    u8[i].unsafe_offset(b * BB + line + PF_BYTES))
        var sc = Array[SIMD[DType.float32, 8], R](fill=0)
        comptime for i in range(R):
            sc[i] = _group_scales[qt](h[i], b * HB)
        comptime for u in range(G):
            var lo = Array[V16, R](fill=0)
            var hi = Array[V16, R](fill=0)
            comptime for i in range(R):
                _codes[qt](u8[i], (b + u) * BB, lo[i], hi[i])
                comptime if not FACTORED:
                    var d = V16(sc[i][u])
                    var m = V16(0)
                    comptime if qt == Q4_1:
                        m = V16(sc[i][4 + u])
                    elif qt == Q4_0:
                        m = V16(-8 * sc[i][u])
                    lo[i] = lo[i].fma(d, m)
                    hi[i] = hi[i].fma(d, m)
            comptime for t in range(TT):
                var xo = t * k + (b + u) * QK
                var xl = x.unsafe_load[width=16](xo)
                var xh = x.unsafe_load[width=16](xo + 16)
                comptime for i in range(R):
                    comptime if FACTORED:
                        var s = lo[i] * xl
                        s = hi[i].fma(xh, s)
                        comptime a = i * NT + NA * t + u % NA
                        acc[a] = s.fma(V16(sc[i][u]), acc[a])
                    else:
                        comptime a = i * NT + NA * t
                        acc[a] = lo[i].fma(xl, acc[a])
                        acc[a + NA - 1] = hi[i].fma(xh, acc[a + NA - 1])
        comptime if FACTORED and qt != Q8_0 and qt != F8_E4M3:
            comptime for t in range(TT):
                var s4 = sx.unsafe_load[width=4](t * nb + b)
                comptime for i in range(R):
                    accm[i * TT + t] = sc[i].slice[4, offset=4]().fma(s4, accm[i * TT + t])
        b += G
    while b < nb:
        comptime for i in range(R):
            var lo = V16(0)
            var hi = V16(0)
            _dequant_block[qt](u8[i], h[i], b * BB, lo, hi)
            comptime for t in range(TT):
                var xo = t * k + b * QK
                var s = lo * x.unsafe_load[width=16](xo)
                acc[i * NT + NA * t] = hi.fma(x.unsafe_load[width=16](xo + 16), s) + acc[i * NT + NA * t]
        b += 1
    comptime for i in range(R):
        comptime for t in range(TT):
            var total = acc[i * NT + NA * t]
            comptime if NA == 2:
                total += acc[i * NT + NA * t + 1]
            var mterm: Float32 = 0
            comptime if FACTORED and qt != Q8_0 and qt != F8_E4M3:
                mterm = accm[i * TT + t].reduce_add()
                comptime if qt == Q4_0:
                    mterm = -8 * mterm  # Q4_0: m = -8d, accumulated as d * sum(x)
            y[unsafe_offset=t * n + r + i] = total.reduce_add() + mterm


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
    comptime BB = _block_bytes[qt]()
    var nb = k // QK
    var row_bytes = nb * BB
    var x = F32Ptr(unsafe_from_address=x_addr)
    var y = F32Ptr(unsafe_from_address=y_addr)
    # One token: per-block activation sums for the m term, computed once per call.
    comptime NEED_SUMS = qt != Q8_0 and qt != F8_E4M3 and TT == 1
    var sums = List[Float32](length=nb if NEED_SUMS else 1, fill=0)
    var sx = F32Ptr(unsafe_from_address=Int(sums.unsafe_ptr()))
    comptime if NEED_SUMS:
        for i in range(nb):
            sx[unsafe_offset=i] = (x.unsafe_load[width=16](i * QK) + x.unsafe_load[width=16](i * QK + 16)).reduce_add()
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


# ---------------------------------------------------------------- GEMV with int8 activations
#
# y[t, r] = sum_b float32(dw_b * dx_tb) * idot_b + (Q4_1) m_b * sx_tb, where per 32-block b:
#   idot_b = sum_j c_j * q_j exactly in int32: c the weight codes (Q4_0: nibble - 8, Q4_1: nibble,
#            Q8_0: the int8, Q5_0: 5-bit code - 16, Q5_1: 5-bit code), q the activation codes
#            (|q| <= 127);
#   sx_tb  = float32(dx_tb * sum_j q_j), the activation block's sum for Q4_1's / Q5_1's offset m
#            (Q8_1-style).
# x86's byte dot products multiply UNSIGNED bytes by signed ones, so the VNNI paths feed offset
# codes (Q4_0: the nibble 0..15, Q5_0: the 5-bit code 0..31, Q8_0: q + 128) and start each
# block's int32 sum from -offset * sum_j q_j instead of zero (`corr`, computed with the
# activations); integer sums, so this changes nothing in the result. The float work is one FMA
# per 8 int32 lanes. Q5_*: the nibbles are decoded as Q4_*'s, and each code's bit 4 is OR-ed in
# from the block's 32-bit qh (_group_high: a byte shuffle and a bit test per 64 codes); the
# AVX2 pair sums stay below 2^15 (4 * 31 * 127).
#
# int8 paths (PATH_*): every path produces the same int32 block sums; only the float32
# accumulation of the scaled lanes differs in rounding. A path is compiled only when the host's
# compile target has its instructions (_path_ok); the others raise if asked for.

comptime PATH_AUTO = -1  # int8 on the best path for T <= 8, float GEMM above
comptime PATH_FLOAT = 0  # float32 activations (the reference)
comptime PATH_GENERIC = 1  # portable SIMD: int16 products of sign-extended codes (any host)
comptime PATH_AVX2 = 2  # vpmaddubsw + vpmaddwd on 32-byte vectors (Q8_0: vpsignb, no offset)
comptime PATH_VNNI256 = 3  # vpdpbusd on 32-byte vectors (AVX-VNNI, or AVX512-VNNI + VL)
comptime PATH_VNNI512 = 4  # vpdpbusd on 64-byte vectors, two blocks per instruction (AVX512-VNNI + BW)
comptime N_PATHS = 5

comptime I32x8 = SIMD[DType.int32, 8]
comptime I32x16 = SIMD[DType.int32, 16]
comptime U8x32 = SIMD[DType.uint8, 32]
comptime U8x64 = SIMD[DType.uint8, 64]
comptime I8x32 = SIMD[DType.int8, 32]
comptime I8x64 = SIMD[DType.int8, 64]
comptime F32x4 = SIMD[DType.float32, 4]
comptime F32x8 = SIMD[DType.float32, 8]


@always_inline
def _path_ok[path: Int]() -> Bool:
    """Whether the compile target (the host) has the instructions of int8 path `path`."""
    comptime if path == PATH_FLOAT or path == PATH_GENERIC:
        return True
    elif path == PATH_AVX2:
        return CompilationTarget.has_avx2()
    elif path == PATH_VNNI256:
        return CompilationTarget._has_feature["avxvnni"]() or (
            CompilationTarget._has_feature["avx512vnni"]() and CompilationTarget._has_feature["avx512vl"]())
    elif path == PATH_VNNI512:
        return CompilationTarget._has_feature["avx512vnni"]() and CompilationTarget._has_feature["avx512bw"]()
    else:
        return False


def _best_path() -> Int:
    """The int8 path used by default: the widest the host has."""
    comptime if _path_ok[PATH_VNNI512]():
        return PATH_VNNI512
    elif _path_ok[PATH_VNNI256]():
        return PATH_VNNI256
    elif _path_ok[PATH_AVX2]():
        return PATH_AVX2
    else:
        return PATH_GENERIC


@always_inline
def _code_offset[qt: Int, path: Int]() -> Int:
    """What the path's weight codes exceed the true codes by (folded into `corr`): the unsigned
    x86 dot products need the nibble (Q4_0) and q + 128 (Q8_0, VNNI only: AVX2 multiplies |q| by
    sign-adjusted activations instead, since vpmaddubsw saturates 255 * 127 * 2)."""
    comptime if path == PATH_GENERIC or qt == Q4_1 or qt == Q5_1:
        return 0
    elif qt == Q4_0:
        return 8
    elif qt == Q5_0:
        return 16
    elif path == PATH_AVX2:
        return 0
    else:
        return 128


@always_inline
def _block_codes[qt: Int, path: Int](u8: U8Ptr, off: Int) -> U8x32:
    """The 32 weight codes of the block at byte `off`, in element order, as the path's dot takes
    them (generic: the true signed codes as bytes; see _code_offset for the others)."""
    comptime if qt == Q8_0:
        var q = u8.unsafe_load[width=32](off + 2)
        comptime if _code_offset[qt, path]() == 128:
            return q ^ 0x80
        return q
    else:
        var v = u8.unsafe_load[width=16](off + _qs_off[qt]())
        var c = (v & 15).join(v >> 4)
        comptime if _is_q5[qt]():
            var qh = u8.unsafe_load[width=4](off + _qs_off[qt]() - 4)
            var q8 = qh.join(qh)
            var q16 = q8.join(q8)
            var sel = q16.join(q16).shuffle[
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]()
            c |= _bit4[32](rebind[U8x32](sel))
        comptime if path == PATH_GENERIC and qt == Q4_0:
            return c - 8  # wraps to the int8 bit pattern of c - 8
        elif path == PATH_GENERIC and qt == Q5_0:
            return c - 16
        return c


@always_inline
def _pair_codes[qt: Int, path: Int](u8: U8Ptr, off: Int) -> U8x64:
    """Codes of the blocks at byte `off` and `off + block_bytes`, the first block's in bytes 0..31
    (Q8_0, and Q4_* on the generic path; the x86 paths take Q4_* by groups, _group_codes)."""
    comptime BB = _block_bytes[qt]()
    return _block_codes[qt, path](u8, off).join(_block_codes[qt, path](u8, off + BB))


@always_inline
def _block_dot[qt: Int, path: Int](w: U8x32, x: I8x32, corr: I32x8) -> I32x8:
    """Eight int32 lanes summing to corr + sum_j w_j * x_j over one block (w as _block_codes gives
    it; corr is used only where _code_offset is not 0)."""
    comptime if path == PATH_VNNI256 or path == PATH_VNNI512:
        return llvm_intrinsic["llvm.x86.avx512.vpdpbusd.256", I32x8](corr, w, x)
    elif path == PATH_AVX2:
        var p16: SIMD[DType.int16, 16]
        comptime if qt == Q8_0:
            var ws = bitcast[DType.int8, 32](w)
            var xs = llvm_intrinsic["llvm.x86.avx2.psign.b", I8x32](x, ws)
            p16 = llvm_intrinsic["llvm.x86.avx2.pmadd.ub.sw", SIMD[DType.int16, 16]](bitcast[DType.uint8, 32](abs(ws)), xs)
        else:
            p16 = llvm_intrinsic["llvm.x86.avx2.pmadd.ub.sw", SIMD[DType.int16, 16]](w, x)
        var s = llvm_intrinsic["llvm.x86.avx2.pmadd.wd", I32x8](p16, SIMD[DType.int16, 16](1))
        comptime if _code_offset[qt, path]() != 0:
            s += corr
        return s
    else:
        # Products widened to int32 (LLVM multiplies them as 16-bit lanes: x86 vpmaddwd), then
        # halves added: which lanes hold which products does not matter, only their sum.
        var prod = bitcast[DType.int8, 32](w).cast[DType.int32]() * x.cast[DType.int32]()
        var s16 = prod.slice[16, offset=0]() + prod.slice[16, offset=16]()
        return s16.slice[8, offset=0]() + s16.slice[8, offset=8]()


@always_inline
def _pair_dot[qt: Int, path: Int](w: U8x64, x: I8x64, corr: I32x16) -> I32x16:
    """_block_dot of two blocks at once: lanes 0..7 the first, 8..15 the second."""
    comptime if path == PATH_VNNI512:
        return llvm_intrinsic["llvm.x86.avx512.vpdpbusd.512", I32x16](corr, w, x)
    else:
        var lo = _block_dot[qt, path](w.slice[32, offset=0](), x.slice[32, offset=0](), corr.slice[8, offset=0]())
        var hi = _block_dot[qt, path](w.slice[32, offset=32](), x.slice[32, offset=32](), corr.slice[8, offset=8]())
        return lo.join(hi)


@always_inline
def _pair_scale[p: Int](s4: F32x4) -> V16:
    """[s4[2p] x 8, s4[2p + 1] x 8]: one lane shuffle."""
    var s = s4.join(s4).join(s4.join(s4))
    comptime if p == 0:
        return s.shuffle[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]()
    else:
        return s.shuffle[2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]()


@always_inline
def _grouped[qt: Int, path: Int]() -> Bool:
    """Whether the path takes Q4_* weights a four-block group at a time (the x86 paths): the low
    nibbles of the four blocks in one 64-byte vector, the high ones in another, each multiplied
    with the matching activation halves, so a group costs one nibble gather, two byte dot
    products per 64 bytes and one scaled FMA. The activations of a full group are then stored
    grouped too: [x_b[0:16] for the 4 blocks | x_b[16:32] for the 4 blocks] (_quantize_acts),
    which the 32-byte paths take in halves (blocks 0-1, then 2-3)."""
    return qt != Q8_0 and path != PATH_GENERIC


@always_inline
def _group_codes[qt: Int, path: Int](u8: U8Ptr, goff: Int) -> U8x64:
    """The 16 nibble bytes of each block of the four-block group at byte `goff`, in block order.
    VNNI512: two 64-byte loads that stay inside the group and one two-source 16-bit permute
    (nibble arrays start at even offsets); else four 16-byte loads."""
    comptime BB = _block_bytes[qt]()
    comptime qs = _qs_off[qt]()
    comptime if path == PATH_VNNI512 and not _is_q5[qt]():
        var a = bitcast[DType.uint16, 32](u8.unsafe_load[width=64](goff))
        var b = bitcast[DType.uint16, 32](u8.unsafe_load[width=64](goff + 4 * BB - 64))
        comptime if qt == Q5_0:  # nibbles at bytes 6, 28 (a) and 50, 72 (b = bytes 24..87)
            return bitcast[DType.uint8, 64](a.shuffle[
                3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 19, 20, 21,
                45, 46, 47, 48, 49, 50, 51, 52, 56, 57, 58, 59, 60, 61, 62, 63](b))
        elif qt == Q5_1:  # nibbles at bytes 8, 32 (a) and 56, 80 (b = bytes 32..95)
            return bitcast[DType.uint8, 64](a.shuffle[
                4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23,
                44, 45, 46, 47, 48, 49, 50, 51, 56, 57, 58, 59, 60, 61, 62, 63](b))
        elif qt == Q4_1:  # nibbles at bytes 4, 24 (a) and 44, 64 (b = bytes 16..79)
            return bitcast[DType.uint8, 64](a.shuffle[
                2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19,
                46, 47, 48, 49, 50, 51, 52, 53, 56, 57, 58, 59, 60, 61, 62, 63](b))
        else:  # Q4_0: at bytes 2, 20 (a) and 38, 56 (b = bytes 8..71)
            return bitcast[DType.uint8, 64](a.shuffle[
                1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,
                47, 48, 49, 50, 51, 52, 53, 54, 56, 57, 58, 59, 60, 61, 62, 63](b))
    else:
        var b01 = u8.unsafe_load[width=16](goff + qs).join(u8.unsafe_load[width=16](goff + BB + qs))
        var b23 = u8.unsafe_load[width=16](goff + 2 * BB + qs).join(u8.unsafe_load[width=16](goff + 3 * BB + qs))
        return b01.join(b23)


@always_inline
def _bit4[W: Int](sel: SIMD[DType.uint8, W]) -> SIMD[DType.uint8, W]:
    """Q5_*'s high code bits: 16 where bit p % 8 of sel[p] is set, else 0."""
    var bits = SIMD[DType.uint8, W](0)
    comptime for p in range(W):
        bits[p] = UInt8(1 << (p % 8))
    return (sel & bits).ne(0).select(SIMD[DType.uint8, W](16), SIMD[DType.uint8, W](0))


@always_inline
def _group_heads[qt: Int](u8: U8Ptr, goff: Int) -> U8x64:
    """Q5_*: the first 16 bytes of each block of the four-block group at byte `goff` (scales and
    qh), block i in 128-bit lane i: one load and three lane inserts from memory."""
    comptime BB = _block_bytes[qt]()
    var h01 = u8.unsafe_load[width=16](goff).join(u8.unsafe_load[width=16](goff + BB))
    var h23 = u8.unsafe_load[width=16](goff + 2 * BB).join(u8.unsafe_load[width=16](goff + 3 * BB))
    return h01.join(h23)


@always_inline
def _head_scales[qt: Int](heads: U8x64) -> SIMD[DType.float32, 8]:
    """_group_scales from _group_heads: [d0..d3, m0..m3] (Q5_0: d0..d3 twice, m = 0 unused)."""
    var w = bitcast[DType.uint16, 32](heads)
    comptime if qt == Q5_1:
        var p = w.shuffle[0, 8, 16, 24, 1, 9, 17, 25,
                          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]().slice[8, offset=0]()
        return bitcast[DType.float16, 8](p).cast[DType.float32]()
    else:
        var p = w.shuffle[0, 8, 16, 24, 0, 8, 16, 24,
                          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]().slice[8, offset=0]()
        return bitcast[DType.float16, 8](p).cast[DType.float32]()


@always_inline
def _group_high[qt: Int](heads: U8x64, mut hlo: U8x64, mut hhi: U8x64):
    """Q5_*: bit 4 of the codes of the four-block group, in _group_codes's layout: hlo[16 i + j]
    from bit j of block i's qh (elements 0..15), hhi from bit 16 + j (16..31). Block i's qh is in
    lane i of `heads` (_group_heads), so a byte shuffle within the 128-bit lanes gives each output
    byte its qh byte, and a test its bit (no lane crossing: the 32-byte paths take it as well)."""
    comptime if qt == Q5_0:  # qh at byte 2 of each lane
        hlo = _bit4[64](rebind[U8x64](heads.shuffle[
                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
                18, 18, 18, 18, 18, 18, 18, 18, 19, 19, 19, 19, 19, 19, 19, 19,
                34, 34, 34, 34, 34, 34, 34, 34, 35, 35, 35, 35, 35, 35, 35, 35,
                50, 50, 50, 50, 50, 50, 50, 50, 51, 51, 51, 51, 51, 51, 51, 51]()))
        hhi = _bit4[64](rebind[U8x64](heads.shuffle[
                4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                20, 20, 20, 20, 20, 20, 20, 20, 21, 21, 21, 21, 21, 21, 21, 21,
                36, 36, 36, 36, 36, 36, 36, 36, 37, 37, 37, 37, 37, 37, 37, 37,
                52, 52, 52, 52, 52, 52, 52, 52, 53, 53, 53, 53, 53, 53, 53, 53]()))
    else:  # Q5_1: qh at byte 4
        hlo = _bit4[64](rebind[U8x64](heads.shuffle[
                4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                20, 20, 20, 20, 20, 20, 20, 20, 21, 21, 21, 21, 21, 21, 21, 21,
                36, 36, 36, 36, 36, 36, 36, 36, 37, 37, 37, 37, 37, 37, 37, 37,
                52, 52, 52, 52, 52, 52, 52, 52, 53, 53, 53, 53, 53, 53, 53, 53]()))
        hhi = _bit4[64](rebind[U8x64](heads.shuffle[
                6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7,
                22, 22, 22, 22, 22, 22, 22, 22, 23, 23, 23, 23, 23, 23, 23, 23,
                38, 38, 38, 38, 38, 38, 38, 38, 39, 39, 39, 39, 39, 39, 39, 39,
                54, 54, 54, 54, 54, 54, 54, 54, 55, 55, 55, 55, 55, 55, 55, 55]()))


@always_inline
def _group_dot[path: Int, use_corr: Bool](lo: U8x64, hi: U8x64, xlo: I8x64, xhi: I8x64, corr: I32x16) -> I32x16:
    """Four lanes per block (lanes 4i..4i+3: block i of the group) summing to corr + the block's
    dot product, from its low nibbles (lo, against xlo) and high nibbles (hi, against xhi)."""
    comptime if path == PATH_VNNI512:
        var d = llvm_intrinsic["llvm.x86.avx512.vpdpbusd.512", I32x16](corr, lo, xlo)
        return llvm_intrinsic["llvm.x86.avx512.vpdpbusd.512", I32x16](d, hi, xhi)
    else:
        var out = Array[I32x8, 2](fill=0)
        comptime for h in range(2):  # blocks 2h, 2h + 1
            var l = lo.slice[32, offset=32 * h]()
            var u = hi.slice[32, offset=32 * h]()
            var xl = xlo.slice[32, offset=32 * h]()
            var xu = xhi.slice[32, offset=32 * h]()
            comptime if path == PATH_VNNI256:
                var d = llvm_intrinsic["llvm.x86.avx512.vpdpbusd.256", I32x8](corr.slice[8, offset=8 * h](), l, xl)
                out[h] = llvm_intrinsic["llvm.x86.avx512.vpdpbusd.256", I32x8](d, u, xu)
            else:  # AVX2: 16-bit pair sums of both halves (<= 4 * 15 * 127) added before widening
                var p = llvm_intrinsic["llvm.x86.avx2.pmadd.ub.sw", SIMD[DType.int16, 16]](l, xl) + llvm_intrinsic[
                    "llvm.x86.avx2.pmadd.ub.sw", SIMD[DType.int16, 16]](u, xu)
                out[h] = llvm_intrinsic["llvm.x86.avx2.pmadd.wd", I32x8](p, SIMD[DType.int16, 16](1))
                comptime if use_corr:
                    out[h] += corr.slice[8, offset=8 * h]()
        return out[0].join(out[1])


comptime I8U = Pointer[Int8, MutUntrackedOrigin]
comptime I32U = Pointer[Int32, MutUntrackedOrigin]
comptime F32U = Pointer[Float32, MutUntrackedOrigin]


@fieldwise_init
struct Acts(ImplicitlyCopyable, Movable):
    """Activations quantized for the int8 GEMV, T rows of nb blocks, row-major:
    q int8 [T, K] (element order), d float32 [T, nb] (the scales dx), sx float32 [T, nb]
    (dx * sum q, Q4_1's offset term), corr int32 [T, nb, 8] (lane 0: -offset * sum q, the rest 0)."""

    var q: I8U
    var d: F32U
    var sx: F32U
    var corr: I32U
    var k: Int
    var nb: Int

    def rows(self, t0: Int) -> Self:
        """The same activations from row t0 on."""
        return Self(self.q.unsafe_offset(t0 * self.k), self.d.unsafe_offset(t0 * self.nb),
                    self.sx.unsafe_offset(t0 * self.nb), self.corr.unsafe_offset(t0 * self.nb * 8), self.k, self.nb)


def _quantize_acts[grouped: Bool, per_token: Bool = False](x: F32Ptr, t: Int, a: Acts, offset: Int):
    """Q8-style quantization of x[T, K], per 32-block: dx = max|x| / 127, q = round-half-even(x * (1/dx))
    (|q| <= 127), computed in float32 exactly as tests/test_quant_int8.py repeats it. A block with
    max|x| < 1e-30 gets dx = 0 (1/dx would overflow); one holding NaN or inf gets dx = NaN and
    q = 0, so the outputs it reaches are NaN as on the float path. `grouped` (see _grouped): the
    codes and corr of each full four-block group in the grouped layout, 4 corr lanes per block.
    per_token: max|x| over the whole row for every block (W8A8), so dx is the row's one scale."""
    var full = (a.nb // 4) * 4
    for row in range(t):
        var row_amax: Float32 = 0
        comptime if per_token:
            for b in range(a.nb):
                row_amax = max(row_amax, abs(x.unsafe_load[width=32](row * a.k + b * QK)).reduce_max())
        for b in range(a.nb):
            var i = row * a.nb + b
            var v = x.unsafe_load[width=32](row * a.k + b * QK)
            var amax = abs(v).reduce_max()
            comptime if per_token:
                amax = row_amax
            var d: Float32 = 0
            var id: Float32 = 0
            # NaN or inf (all exponent bits set; max() may skip a NaN): d = NaN, q = 0
            var bad = (bitcast[DType.uint32, 32](v) & 0x7F800000).eq(0x7F800000).reduce_or()
            if bad:
                d = bitcast[DType.float32, 1](UInt32(0x7FC00000))
            elif amax >= 1e-30:
                d = amax / 127
                id = 1 / d
            var q = SIMD[DType.int32, 32](0)
            if id != 0:
                q = round(v * id).cast[DType.int32]()
            var q8 = q.cast[DType.int8]()
            var qsum = q.reduce_add()
            a.d[unsafe_offset=i] = d
            a.sx[unsafe_offset=i] = d * qsum.cast[DType.float32]()
            comptime if grouped:
                if b < full:
                    var g0 = b - b % 4  # the group's first block
                    var base = row * a.k + g0 * QK
                    a.q.unsafe_store(base + (b % 4) * 16, q8.slice[16, offset=0]())
                    a.q.unsafe_store(base + 64 + (b % 4) * 16, q8.slice[16, offset=16]())
                    a.corr[unsafe_offset=(row * a.nb + g0) * 8 + (b % 4) * 4] = Int32(-offset) * qsum
                    continue
            a.q.unsafe_store(row * a.k + b * QK, q8)
            var c = I32x8(0)
            c[0] = Int32(-offset) * qsum
            a.corr.unsafe_store(i * 8, c)


@always_inline
def _gemv_i8_row[qt: Int, path: Int, TT: Int](w_addr: Int, row_bytes: Int, a: Acts, y: F32Ptr, n: Int, r: Int):
    """y[t, r] for TT activation rows, streaming W's row r once: blocks four at a time (their
    scales decoded together), as one group (Q4_* on x86, _grouped) or two blocks per 16-lane
    step, the weights decoded once for all TT rows."""
    comptime BB = _block_bytes[qt]()
    comptime HB = BB // 2
    comptime G = 4
    var nb = a.nb
    var k = a.k
    var u8 = U8Ptr(unsafe_from_address=w_addr + r * row_bytes)
    var h = F16Ptr(unsafe_from_address=w_addr + r * row_bytes)
    var acc = Array[V16, 2 * TT](fill=0)  # pairs: one chain per parity, for FMA latency
    var accm = Array[F32x4, TT](fill=0)
    var b = 0
    while b + G <= nb:
        comptime for line in range(0, G * BB, 64):
            prefetch[PrefetchOptions().for_read().medium_locality().to_data_cache()](
                u8.unsafe_offset(b * BB + line + PF_BYTES))
        var heads = U8x64(0)
        var sc: SIMD[DType.float32, 8]
        comptime if _is_q5[qt]():  # scales and high bits from the blocks' first 16 bytes
            heads = _group_heads[qt](u8, b * BB)
            sc = _head_scales[qt](heads)
        else:
            sc = _group_scales[qt](h, b * HB)
        var dw = sc.slice[4, offset=0]()
        var s4 = Array[F32x4, TT](fill=0)
        comptime for t in range(TT):
            s4[t] = dw * a.d.unsafe_load[width=4](t * nb + b)
        comptime if _grouped[qt, path]():
            comptime use_corr = _code_offset[qt, path]() != 0
            var nib = _group_codes[qt, path](u8, b * BB)
            var lo = nib & 15
            var hi = nib >> 4
            comptime if _is_q5[qt]():
                var hlo = U8x64(0)
                var hhi = U8x64(0)
                _group_high[qt](heads, hlo, hhi)
                lo |= hlo
                hi |= hhi
            comptime for t in range(TT):
                var corr = I32x16(0)
                comptime if use_corr:
                    corr = a.corr.unsafe_load[width=16]((t * nb + b) * 8)
                var xo = t * k + b * QK
                var dot = _group_dot[path, use_corr](lo, hi, a.q.unsafe_load[width=64](xo),
                                                     a.q.unsafe_load[width=64](xo + 64), corr)
                var s16 = s4[t].join(s4[t]).join(s4[t].join(s4[t]))
                var sl = s16.shuffle[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]()
                acc[2 * t] = dot.cast[DType.float32]().fma(sl, acc[2 * t])
        else:
            comptime for p in range(2):
                var bb = b + 2 * p
                var w = _pair_codes[qt, path](u8, bb * BB)
                comptime for t in range(TT):
                    var corr = I32x16(0)
                    comptime if _code_offset[qt, path]() != 0:
                        corr = a.corr.unsafe_load[width=16]((t * nb + bb) * 8)
                    var dot = _pair_dot[qt, path](w, a.q.unsafe_load[width=64](t * k + bb * QK), corr)
                    acc[2 * t + p] = dot.cast[DType.float32]().fma(_pair_scale[p](s4[t]), acc[2 * t + p])
        comptime if _has_min[qt]():
            var m = sc.slice[4, offset=4]()
            comptime for t in range(TT):
                accm[t] = m.fma(a.sx.unsafe_load[width=4](t * nb + b), accm[t])
        b += G
    var tail = Array[F32x8, TT](fill=0)
    var tailm = Array[Float32, TT](fill=0)
    while b < nb:
        var dw = _scale(h, b * HB)
        var w = _block_codes[qt, path](u8, b * BB)
        comptime for t in range(TT):
            var corr = I32x8(0)
            comptime if _code_offset[qt, path]() != 0:
                corr = a.corr.unsafe_load[width=8]((t * nb + b) * 8)
            var dot = _block_dot[qt, path](w, a.q.unsafe_load[width=32](t * k + b * QK), corr)
            tail[t] = dot.cast[DType.float32]().fma(F32x8(dw * a.d[unsafe_offset=t * nb + b]), tail[t])
            comptime if _has_min[qt]():
                tailm[t] += _scale(h, b * HB + 1) * a.sx[unsafe_offset=t * nb + b]
        b += 1
    comptime for t in range(TT):
        var total = acc[2 * t] + acc[2 * t + 1]
        var s = total.reduce_add() + tail[t].reduce_add()
        comptime if _has_min[qt]():
            s += accm[t].reduce_add() + tailm[t]
        y[unsafe_offset=t * n + r] = s


def _gemv_i8_rows[qt: Int, path: Int, TT: Int](w_addr: Int, row_bytes: Int, a: Acts, y: F32Ptr, n: Int, r0: Int, r1: Int):
    for r in range(r0, r1):
        _gemv_i8_row[qt, path, TT](w_addr, row_bytes, a, y, n, r)


def _gemv_i8[qt: Int, path: Int, TT: Int](w_addr: Int, a: Acts, y: F32Ptr, n: Int, max_items: Int,
                                          r0: Int, r1: Int) raises:
    comptime BB = _block_bytes[qt]()
    var row_bytes = a.nb * BB
    var items = _work_items(n, row_bytes * TT, 16, GEMV_PARALLEL_MIN_BYTES)
    if max_items > 0:
        items = min(items, max_items)
    if r1 >= 0:
        _gemv_i8_rows[qt, path, TT](w_addr, row_bytes, a, y, n, r0, r1)
    elif items == 1:
        _gemv_i8_rows[qt, path, TT](w_addr, row_bytes, a, y, n, 0, n)
    else:
        def work(i: Int) {imm w_addr, imm row_bytes, imm a, imm y, imm n, imm items}:
            _gemv_i8_rows[qt, path, TT](w_addr, row_bytes, a, y, n, i * n // items, (i + 1) * n // items)
        parallelize(work, items)


def _matmul_i8[qt: Int, path: Int, per_token: Bool](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int,
                                                    max_items: Int, r0: Int, r1: Int) raises:
    """Quantize the T activation rows once, then run the GEMV on them eight rows at a time (more
    than eight only when int8 is forced: the weights are then streamed once per eight rows)."""
    var nb = k // QK
    var q_buf = List[Int8](length=t * k, fill=0)
    var f_buf = List[Float32](length=2 * t * nb, fill=0)
    var c_buf = List[Int32](length=8 * t * nb, fill=0)
    var f = F32U(unsafe_from_address=Int(f_buf.unsafe_ptr()))
    var a = Acts(I8U(unsafe_from_address=Int(q_buf.unsafe_ptr())), f, f.unsafe_offset(t * nb),
                 I32U(unsafe_from_address=Int(c_buf.unsafe_ptr())), k, nb)
    _quantize_acts[_grouped[qt, path](), per_token](F32Ptr(unsafe_from_address=x_addr), t, a, _code_offset[qt, path]())
    var t0 = 0
    while t0 < t:
        var tt = min(SMALL_T, t - t0)
        var y = F32Ptr(unsafe_from_address=y_addr + t0 * n * 4)
        comptime for c in range(1, SMALL_T + 1):  # one GEMV instance per row count
            if tt == c:
                _gemv_i8[qt, path, c](w_addr, a.rows(t0), y, n, max_items, r0, r1)
        t0 += tt
    _ = q_buf^
    _ = f_buf^
    _ = c_buf^


def _matmul_path[qt: Int, per_token: Bool = False](path: Int, w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int,
                                                   k: Int, max_items: Int, r0: Int = 0, r1: Int = -1) raises:
    comptime for p in range(PATH_GENERIC, N_PATHS):
        if path == p:
            comptime if _path_ok[p]():
                _matmul_i8[qt, p, per_token](w_addr, x_addr, y_addr, t, n, k, max_items, r0, r1)
                return
            else:
                raise Error("matmul: int8 path ", p, " needs instructions this host's build does not have")
    raise Error("matmul: unknown path code ", path)


# ---------------------------------------------------------------- GEMM (prefill)


def _pack_x(x: F32Ptr, xp: F32Ptr, t: Int, k: Int, ntb: Int):
    """Pack xp[tb][kk][j] = x[tb*16 + j, kk] (zero for tokens past t): 16 tokens per vector.
    Works on 16 x 16 tiles transposed in registers: four rounds of interleaving row i with
    row i + 8 (a perfect shuffle of both indices) turn rows into columns."""
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
    """Accumulate acc[i, j] += sum_kk a[i, kk] * xp[tb + j][kk] for MR rows and NT blocks of 16 tokens."""
    for kk in range(kc):
        var bv = Array[V16, NT](fill=0)
        comptime for j in range(NT):
            bv[j] = bp.unsafe_load[width=16](b_off + j * b_stride + kk * 16)
        comptime for i in range(MR):
            var av = V16(a[unsafe_offset=i * lda + kk])
            comptime for j in range(NT):
                acc[i * NT + j] = av.fma(bv[j], acc[i * NT + j])


@always_inline
def _tile[NT: Int](a: F32Ptr, kc: Int, xp: F32Ptr, k: Int, kc0: Int, tb: Int,
                   part: F32Ptr, t_pad: Int, p_row: Int, first: Bool):
    """One MR x (16*NT) tile of Y^T over the K chunk [kc0, kc0+kc): start from zero or from the
    partial sums of earlier chunks, and keep the sums (_store_y writes Y from them)."""
    var acc = Array[V16, MR * NT](fill=0)
    if not first:
        comptime for i in range(MR):
            comptime for j in range(NT):
                acc[i * NT + j] = part.unsafe_load[width=16]((p_row + i) * t_pad + (tb + j) * 16)
    _micro[NT](a, kc, xp, tb * k * 16 + kc0 * 16, k * 16, kc, acc)
    comptime for i in range(MR):
        comptime for j in range(NT):
            part.unsafe_store((p_row + i) * t_pad + (tb + j) * 16, acc[i * NT + j])


def _gemm_rows[qt: Int](w_addr: Int, row_bytes: Int, xp: F32Ptr, t: Int, k: Int, kc_max: Int,
                        y: F32Ptr, n: Int, r0: Int, r1: Int):
    """Rows r0..r1 of Y^T = W X^T in groups of rows whose partial sums (rows x t floats) stay
    in L2 beside the packed X chunk (a wide layer's partials spilled: gate_up ran 25% slower)."""
    var t_pad = ((t + 15) // 16) * 16
    var group = max(16, ((GEMM_PART_BYTES // 4) // t_pad) // 16 * 16)
    var g0 = r0
    while g0 < r1:
        var g1 = min(r1, g0 + group)
        _gemm_group[qt](w_addr, row_bytes, xp, t, k, kc_max, y, n, g0, g1)
        g0 = g1


def _gemm_group[qt: Int](w_addr: Int, row_bytes: Int, xp: F32Ptr, t: Int, k: Int, kc_max: Int,
                         y: F32Ptr, n: Int, r0: Int, r1: Int):
    """Rows r0..r1 of Y^T = W X^T, K in chunks of kc_max so the packed X chunk stays in L2."""
    comptime BB = _block_bytes[qt]()
    var ntb = (t + 15) // 16
    var t_pad = ntb * 16
    var a_buf = List[Float32](length=MR * kc_max, fill=0)
    var a = F32Ptr(unsafe_from_address=Int(a_buf.unsafe_ptr()))
    var nrows = r1 - r0
    var npanels = (nrows + MR - 1) // MR
    var part_buf = alloc[Float32](npanels * MR * t_pad)  # written by the first chunk
    var part = F32Ptr(unsafe_from_address=Int(part_buf))
    var kc0 = 0
    while kc0 < k:
        var kc = min(kc_max, k - kc0)
        var first = kc0 == 0
        for p in range(npanels):
            var row0 = r0 + p * MR
            var rows = min(MR, r1 - row0)
            # Dequantize the MR x kc tile of W (rows past r1 are zero).
            for i in range(MR):
                if i < rows:
                    var base = w_addr + (row0 + i) * row_bytes
                    var u8 = U8Ptr(unsafe_from_address=base)
                    var h = F16Ptr(unsafe_from_address=base)
                    for blk in range(kc // QK):
                        var lo = V16(0)
                        var hi = V16(0)
                        _dequant_block[qt](u8, h, (kc0 // QK + blk) * BB, lo, hi)
                        a.unsafe_store(i * kc + blk * QK, lo)
                        a.unsafe_store(i * kc + blk * QK + 16, hi)
                else:
                    for kk in range(kc // 16):
                        a.unsafe_store(i * kc + kk * 16, V16(0))
            var tb = 0
            while tb + 2 <= ntb:
                _tile[2](a, kc, xp, k, kc0, tb, part, t_pad, p * MR, first)
                tb += 2
            if tb < ntb:
                _tile[1](a, kc, xp, k, kc0, tb, part, t_pad, p * MR, first)
        kc0 += kc
    _ = a_buf^
    _store_y(part, t_pad, t, y, n, r0, nrows)
    part_buf.free()


def _transpose16(mut rows: Array[V16, 16]):
    """rows[i][j] <- rows[j][i]: four rounds of interleaving row i with row i + 8."""
    comptime for _round in range(4):
        var nxt = Array[V16, 16](fill=0)
        comptime for i in range(8):
            var both = rows[i].interleave(rows[i + 8])
            nxt[2 * i] = both.slice[16, offset=0]()
            nxt[2 * i + 1] = both.slice[16, offset=16]()
        rows = nxt^


def _store_y(part: F32Ptr, t_pad: Int, t: Int, y: F32Ptr, n: Int, row0: Int, nrows: Int):
    """y[tok, row0 + r] = part[r, tok] for r < nrows, tok < t, by 16 x 16 tiles transposed in
    registers: each token's rows land as one contiguous run (storing the tiles' scalars straight
    into y, a store per token row n floats apart, ran wide layers ~25% slower)."""
    var r = 0
    while r < nrows:
        var rr = min(16, nrows - r)
        var tb = 0
        while tb < t:
            var rows = Array[V16, 16](fill=0)
            comptime for j in range(16):
                if j < rr:
                    rows[j] = part.unsafe_load[width=16]((r + j) * t_pad + tb)
            _transpose16(rows)
            var tt = min(16, t - tb)
            comptime for l in range(16):
                if l < tt:
                    var dst = (tb + l) * n + row0 + r
                    if rr == 16:
                        y.unsafe_store(dst, rows[l])
                    elif rr == 8:
                        y.unsafe_store(dst, rows[l].slice[8, offset=0]())
                    else:
                        for j in range(rr):
                            y[unsafe_offset=dst + j] = rows[l][j]
            tb += 16
        r += rr


def _gemm[qt: Int](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int, max_items: Int) raises:
    comptime BB = _block_bytes[qt]()
    var row_bytes = (k // QK) * BB
    var x = F32Ptr(unsafe_from_address=x_addr)
    var y = F32Ptr(unsafe_from_address=y_addr)
    var ntb = (t + 15) // 16
    var xp_buf = alloc[Float32](ntb * 16 * k)  # every element is written by _pack_x
    var xp = F32Ptr(unsafe_from_address=Int(xp_buf))
    _pack_x(x, xp, t, k, ntb)
    # K chunk: the packed X chunk (t_pad x kc floats) should fit in about 512 KiB of L2.
    var kc_max = max(QK, min(k, ((1 << 17) // (ntb * 16)) // QK * QK))
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


def _matmul[qt: Int](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int, max_items: Int, path: Int,
                     r0: Int = 0, r1: Int = -1) raises:
    """r1 >= 0: only output rows [r0, r1), on the calling thread (T <= SMALL_T). W8A8 runs Q8_0's
    int8 GEMV with per-token activation scales at every T (PATH_FLOAT: the float reference)."""
    comptime if qt == W8A8:
        if path != PATH_FLOAT:
            _matmul_path[Q8_0, True](_best_path() if path == PATH_AUTO else path, w_addr, x_addr, y_addr, t, n, k,
                                     max_items, r0, r1)
        else:
            _matmul[Q8_0](w_addr, x_addr, y_addr, t, n, k, max_items, path, r0, r1)
    elif qt == F8_E4M3:  # no int8 path (the codes are no integers): float32 whatever `path` says
        _matmul_float[qt](w_addr, x_addr, y_addr, t, n, k, max_items, r0, r1)
    else:
        if path != PATH_FLOAT and (path != PATH_AUTO or t <= SMALL_T):
            _matmul_path[qt](_best_path() if path == PATH_AUTO else path, w_addr, x_addr, y_addr, t, n, k, max_items,
                             r0, r1)
            return
        _matmul_float[qt](w_addr, x_addr, y_addr, t, n, k, max_items, r0, r1)


def _matmul_float[qt: Int](w_addr: Int, x_addr: Int, y_addr: Int, t: Int, n: Int, k: Int, max_items: Int,
                           r0: Int, r1: Int) raises:
    """float32 activations: the GEMV up to SMALL_T rows, the GEMM above."""
    if t > SMALL_T:
        if r1 >= 0:
            raise Error("matmul: a row share needs at most ", SMALL_T, " activation rows")
        _gemm[qt](w_addr, x_addr, y_addr, t, n, k, max_items)
        return
    comptime for tt in range(1, SMALL_T + 1):  # one GEMV instance per token count
        if t == tt:
            _gemv[qt, tt](w_addr, x_addr, y_addr, n, k, max_items, r0, r1)


def matmul(qtype: PythonObject, w: PythonObject, x: PythonObject, y: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Compute y[T, N] = x[T, K] @ W[N, K]^T with W as GGUF blocks; dims = (T, N, K, max_work_items,
    path) where max_work_items 0 lets the kernel choose and 1 keeps it on the calling thread, and
    path is a PATH_* code: -1 (auto: int8 for T <= 8, float above), 0 (float), or an int8 path."""
    var qt = Int(py=qtype)
    var w_addr = Int(py=w)
    var x_addr = Int(py=x)
    var y_addr = Int(py=y)
    var t = Int(py=dims[0])
    var n = Int(py=dims[1])
    var k = Int(py=dims[2])
    var max_items = Int(py=dims[3])
    var path = Int(py=dims[4])
    if qt == Q4_0:
        _matmul[Q4_0](w_addr, x_addr, y_addr, t, n, k, max_items, path)
    elif qt == Q4_1:
        _matmul[Q4_1](w_addr, x_addr, y_addr, t, n, k, max_items, path)
    elif qt == Q8_0:
        _matmul[Q8_0](w_addr, x_addr, y_addr, t, n, k, max_items, path)
    elif qt == W8A8:
        _matmul[W8A8](w_addr, x_addr, y_addr, t, n, k, max_items, path)
    elif qt == F8_E4M3:
        _matmul[F8_E4M3](w_addr, x_addr, y_addr, t, n, k, max_items, path)
    else:
        raise Error("matmul: unsupported type code ", qt)
    return PythonObject(None)


# ---------------------------------------------------------------- dequantize / quantize


def _dequant_rows[qt: Int](src_addr: Int, dst: F32Ptr, k: Int, r0: Int, r1: Int):
    comptime BB = _block_bytes[qt]()
    var nb = k // QK
    for r in range(r0, r1):
        var base = src_addr + r * nb * BB
        var u8 = U8Ptr(unsafe_from_address=base)
        var h = F16Ptr(unsafe_from_address=base)
        for b in range(nb):
            var lo = V16(0)
            var hi = V16(0)
            _dequant_block[qt](u8, h, b * BB, lo, hi)
            dst.unsafe_store(r * k + b * QK, lo)
            dst.unsafe_store(r * k + b * QK + 16, hi)


def _dequant[qt: Int](src_addr: Int, dst_addr: Int, rows: Int, k: Int) raises:
    comptime BB = _block_bytes[qt]()
    var dst = F32Ptr(unsafe_from_address=dst_addr)
    var items = _work_items(rows, (k // QK) * BB, 4)
    if items == 1:
        _dequant_rows[qt](src_addr, dst, k, 0, rows)
    else:
        def work(i: Int) {imm src_addr, imm dst, imm k, imm rows, imm items}:
            _dequant_rows[qt](src_addr, dst, k, i * rows // items, (i + 1) * rows // items)
        parallelize(work, items)


def dequantize(qtype: PythonObject, src: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Fill dst[rows, K] float32 with the weights of src[rows, K/32 blocks]; dims = (rows, K)."""
    var qt = Int(py=qtype)
    var rows = Int(py=dims[0])
    var k = Int(py=dims[1])
    if qt == Q4_0:
        _dequant[Q4_0](Int(py=src), Int(py=dst), rows, k)
    elif qt == Q4_1:
        _dequant[Q4_1](Int(py=src), Int(py=dst), rows, k)
    elif qt == Q8_0:
        _dequant[Q8_0](Int(py=src), Int(py=dst), rows, k)
    elif qt == F8_E4M3:
        _dequant[F8_E4M3](Int(py=src), Int(py=dst), rows, k)
    else:
        raise Error("dequantize: unsupported type code ", qt)
    return PythonObject(None)


@always_inline
def _store_nibbles(u8: U8Ptr, off: Int, q: SIMD[DType.int32, 32]):
    """Store 16 bytes: byte j = q[j] | q[j + 16] << 4."""
    var lo = q.slice[16, offset=0]()
    var hi = q.slice[16, offset=16]()
    u8.unsafe_store(off, (lo | (hi << 4)).cast[DType.uint8]())


@always_inline
def _rounded_product(a: SIMD[DType.float32, 32], b: Float32) -> SIMD[DType.float32, 32]:
    """float32(a * b), rounded on its own. Written as `a * b + c`, Mojo (contract=fast by default)
    would fuse the add into an FMA with a single rounding, unlike numpy; the float64 product of
    two float32 values is exact, and rounding it to float32 cannot be fused with what follows."""
    return (a.cast[DType.float64]() * b.cast[DType.float64]()).cast[DType.float32]()


def _quant_block[qt: Int](x: F32Ptr, xo: Int, u8: U8Ptr, h: F16Ptr, off: Int):
    """One block, replicating gguf.quants.quantize's float32 arithmetic step by step (each
    product rounded before the following add, as numpy does)."""
    comptime V32 = SIMD[DType.float32, 32]
    var v = x.unsafe_load[width=32](xo)
    comptime if qt == Q8_0:
        # d = max|x| / 127, id = 1/d (0 when d == 0), q = round-half-away(x * id)
        var d = abs(v).reduce_max() / 127
        var id: Float32 = 0
        if d != 0:
            id = 1 / d
        var s = v * id
        var a = abs(s)
        var fl = floor(a)
        var r = fl + floor(2 * (a - fl))
        var q = s.lt(0).select(-r, r).cast[DType.int32]()
        h[unsafe_offset=off >> 1] = d.cast[DType.float16]()
        u8.unsafe_store(off + 2, q.cast[DType.int8]().slice[16, offset=0]().cast[DType.uint8]())
        u8.unsafe_store(off + 18, q.cast[DType.int8]().slice[16, offset=16]().cast[DType.uint8]())
    elif qt == Q4_0:
        # the element of largest magnitude (first one on ties) keeps its sign: d = max / -8
        var av = abs(v)
        var amax = av.reduce_max()
        var mx: Float32 = 0
        for j in range(32):
            if av[j] == amax:
                mx = v[j]
                break
        var d = mx / -8
        var id: Float32 = 0
        if d != 0:
            id = 1 / d
        var q = trunc(_rounded_product(v, id) + 8.5).cast[DType.int32]()
        q = min(max(q, 0), 15)
        h[unsafe_offset=off >> 1] = d.cast[DType.float16]()
        _store_nibbles(u8, off + 2, q)
    else:
        var mx = v.reduce_max()
        var mn = v.reduce_min()
        var d = (mx - mn) / 15
        var id: Float32 = 0
        if d != 0:
            id = 1 / d
        var q = trunc(_rounded_product(v - mn, id) + 0.5).cast[DType.int32]()
        q = min(max(q, 0), 15)
        h[unsafe_offset=off >> 1] = d.cast[DType.float16]()
        h[unsafe_offset=(off >> 1) + 1] = mn.cast[DType.float16]()
        _store_nibbles(u8, off + 4, q)


def _quant_rows[qt: Int](x: F32Ptr, dst_addr: Int, k: Int, r0: Int, r1: Int):
    comptime BB = _block_bytes[qt]()
    var nb = k // QK
    for r in range(r0, r1):
        var base = dst_addr + r * nb * BB
        var u8 = U8Ptr(unsafe_from_address=base)
        var h = F16Ptr(unsafe_from_address=base)
        for b in range(nb):
            _quant_block[qt](x, r * k + b * QK, u8, h, b * BB)


def _quant[qt: Int](src_addr: Int, dst_addr: Int, rows: Int, k: Int) raises:
    var x = F32Ptr(unsafe_from_address=src_addr)
    var items = _work_items(rows, k * 4, 4)
    if items == 1:
        _quant_rows[qt](x, dst_addr, k, 0, rows)
    else:
        def work(i: Int) {imm x, imm dst_addr, imm k, imm rows, imm items}:
            _quant_rows[qt](x, dst_addr, k, i * rows // items, (i + 1) * rows // items)
        parallelize(work, items)


def quantize(qtype: PythonObject, src: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Fill dst[rows, K/32 blocks] with the GGUF blocks of src[rows, K] float32; dims = (rows, K)."""
    var qt = Int(py=qtype)
    var rows = Int(py=dims[0])
    var k = Int(py=dims[1])
    if qt == Q4_0:
        _quant[Q4_0](Int(py=src), Int(py=dst), rows, k)
    elif qt == Q4_1:
        _quant[Q4_1](Int(py=src), Int(py=dst), rows, k)
    elif qt == Q8_0:
        _quant[Q8_0](Int(py=src), Int(py=dst), rows, k)
    else:
        raise Error("quantize: unsupported type code ", qt)
    return PythonObject(None)


# ---------------------------------------------------------------- embedding gather


def _gather_row[qt: Int](table_addr: Int, row: Int, d: Int, dst: F32Ptr, out_off: Int):
    comptime if qt == F32:
        var src = F32Ptr(unsafe_from_address=table_addr)
        var i = 0
        while i + 16 <= d:
            dst.unsafe_store(out_off + i, src.unsafe_load[width=16](row * d + i))
            i += 16
        while i < d:
            dst[unsafe_offset=out_off + i] = src[unsafe_offset=row * d + i]
            i += 1
    elif qt == F16:
        var src = F16Ptr(unsafe_from_address=table_addr)
        var i = 0
        while i + 16 <= d:
            dst.unsafe_store(out_off + i, src.unsafe_load[width=16](row * d + i).cast[DType.float32]())
            i += 16
        while i < d:
            dst[unsafe_offset=out_off + i] = src[unsafe_offset=row * d + i].cast[DType.float32]()
            i += 1
    elif qt == BF16:
        var src = U16Ptr(unsafe_from_address=table_addr)
        var i = 0
        while i + 16 <= d:
            var bits = src.unsafe_load[width=16](row * d + i).cast[DType.uint32]() << 16
            dst.unsafe_store(out_off + i, bitcast[DType.float32, 16](bits))
            i += 16
        while i < d:
            var bits = src.unsafe_load[width=1](row * d + i).cast[DType.uint32]() << 16
            dst[unsafe_offset=out_off + i] = bitcast[DType.float32, 1](bits)
            i += 1
    else:
        comptime BB = _block_bytes[qt]()
        var base = table_addr + row * (d // QK) * BB
        var u8 = U8Ptr(unsafe_from_address=base)
        var h = F16Ptr(unsafe_from_address=base)
        for b in range(d // QK):
            var lo = V16(0)
            var hi = V16(0)
            _dequant_block[qt](u8, h, b * BB, lo, hi)
            dst.unsafe_store(out_off + b * QK, lo)
            dst.unsafe_store(out_off + b * QK + 16, hi)


def _gather[qt: Int](table_addr: Int, ids_addr: Int, out_addr: Int, t: Int, d: Int) raises:
    var ids = I32Ptr(unsafe_from_address=ids_addr)
    var dst = F32Ptr(unsafe_from_address=out_addr)
    var items = _work_items(t, d * 4, 4)
    if items == 1:
        for i in range(t):
            _gather_row[qt](table_addr, Int(ids[unsafe_offset=i]), d, dst, i * d)
    else:
        def work(c: Int) {imm table_addr, imm ids, imm dst, imm t, imm d, imm items}:
            for i in range(c * t // items, (c + 1) * t // items):
                _gather_row[qt](table_addr, Int(ids[unsafe_offset=i]), d, dst, i * d)
        parallelize(work, items)


def embedding(qtype: PythonObject, table: PythonObject, ids: PythonObject, dst: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Fill out[T, D] float32 with rows ids[T] (int32) of table[vocab, D]; dims = (T, D)."""
    var qt = Int(py=qtype)
    var t = Int(py=dims[0])
    var d = Int(py=dims[1])
    var ta = Int(py=table)
    var ia = Int(py=ids)
    var oa = Int(py=dst)
    if qt == F32:
        _gather[F32](ta, ia, oa, t, d)
    elif qt == F16:
        _gather[F16](ta, ia, oa, t, d)
    elif qt == BF16:
        _gather[BF16](ta, ia, oa, t, d)
    elif qt == Q4_0:
        _gather[Q4_0](ta, ia, oa, t, d)
    elif qt == Q4_1:
        _gather[Q4_1](ta, ia, oa, t, d)
    elif qt == Q8_0:
        _gather[Q8_0](ta, ia, oa, t, d)
    elif qt == F8_E4M3:
        _gather[F8_E4M3](ta, ia, oa, t, d)
    else:
        raise Error("embedding: unsupported type code ", qt)
    return PythonObject(None)


def num_threads() raises -> PythonObject:
    return PythonObject(num_physical_cores())


def int8_paths() raises -> PythonObject:
    """The int8 path codes this build has, the default (best) first."""
    var best = _best_path()
    var out = Python.list()
    out.append(best)
    comptime for p in range(N_PATHS - 1, PATH_GENERIC - 1, -1):
        comptime if _path_ok[p]():
            if p != best:
                out.append(p)
    return out


@export
def PyInit_quant() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("quant")
        m.def_function[matmul]("matmul", docstring="y = x @ W^T on GGUF blocks: (qtype, w, x, y, (T, N, K))")
        m.def_function[dequantize]("dequantize", docstring="GGUF blocks -> float32: (qtype, src, dst, (rows, K))")
        m.def_function[quantize]("quantize", docstring="float32 -> GGUF blocks: (qtype, src, dst, (rows, K))")
        m.def_function[embedding]("embedding", docstring="row gather: (qtype, table, ids, out, (T, D))")
        m.def_function[num_threads]("num_threads")
        m.def_function[int8_paths]("int8_paths", docstring="int8 path codes of this build, the default first")
        return m.finalize()
    except e:
        abort(String("failed to create the quant module: ", e))
