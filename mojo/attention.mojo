# Paged attention for the CPU backend: KV-cache writes, flash-style prefill and (split-K)
# decode over the block-paged cache of python/mojollm/backends/base.py:
#
#     k_cache, v_cache [num_blocks, B, KVH, W]; position p of sequence s lives in block
#     block_tables[s, p // B], row p % B.
#
# KV dtypes (mojollm.kv_dtypes; the code is a run-time argument, each kernel is compiled once per
# dtype and picked per call): float32, bfloat16 (uint16 bits), float16: W = D elements;
# int8 / fp8: W = D + 4 bytes per (slot, head) row, D codes (int8, or OCP E4M3) then the row's
# little-endian float32 scale s, value = s * code. store_kv quantizes on write (s = max|row| / 127
# or / 448, round to nearest even); the attention kernels read the codes as float32 in registers
# and fold the scale in: a key's s multiplies its scores (q . (s k) = s (q . k)), a value's s its
# probabilities (p (s v) = (p s) v). No dequantized copy of the cache exists.
#
# All entry points take buffer addresses and sizes packed in an int64 `meta` array by
# mojollm.kernels.attention, which has validated every shape and index; nothing here re-checks.
#
# Algorithm (one "tile" = up to ROWS query rows of one (sequence, kv head) x a key range):
#   rows are the flattened (query, group head) pairs served by the kv head, so GQA/MQA heads
#   sharing K/V are processed together and every K/V row is loaded once per tile;
#   keys are walked in blocks of BK with an online softmax (running max m, running sum l,
#   unnormalised accumulator O rescaled by exp(m_old - m_new)); the [rows, keys] score matrix
#   never exists beyond one BK block.
#   Scores: with >= DOT_ROWS rows, Q is stored transposed (QT[d, r]) and S^T[j, :] =
#   sum_d K[j, d] * QT[d, :] is a broadcast-FMA over row vectors (no horizontal sums) and the
#   softmax statistics are vectors over rows. With fewer rows (decode with small G), scores are
#   row-major S[r, j]: dot products of W keys at a time finished by one transpose-reduction,
#   and the softmax runs across keys.
#   P.V: O[r, :] += sum_j P[r, j] * V[j, :], register-blocked 4 rows x 4 vectors.
#   Any head dim works (vector loops with scalar tails); 64 and 128 have unrolled decode dots.
# Decode walks one (sequence, key chunk) per job with all its kv heads: a position's K/V row
# [KVH, D] is contiguous, so the cache streams sequentially from memory (a job per kv head
# would stride by KVH * D floats and defeat the hardware prefetchers).
# Threading: one parallel region per call; workers pull jobs from an atomic counter (causal
# tiles differ in cost) and each owns a slice of the scratch buffer passed in from Python.

from std.atomic import Atomic
from std.memory import bitcast
from std.math import exp
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import llvm_intrinsic, num_physical_cores, simd_width_of

from max.algorithm import parallelize

comptime F32Ptr = Pointer[Float32, MutUntrackedOrigin]
comptime I32Ptr = Pointer[Int32, MutUntrackedOrigin]
comptime I64Ptr = Pointer[Int64, MutUntrackedOrigin]
comptime U8Ptr = Pointer[UInt8, MutUntrackedOrigin]
comptime U16Ptr = Pointer[UInt16, MutUntrackedOrigin]
comptime F16Ptr = Pointer[Float16, MutUntrackedOrigin]
comptime W = simd_width_of[DType.float32]()
comptime Vec = SIMD[DType.float32, W]
comptime ROWS = 4 * W  # query rows per tile (64 with AVX-512)
comptime BK = 64  # keys per online-softmax step
comptime DOT_ROWS = 8  # below this many rows, scores are dot products (decode)
comptime NEG: Float32 = -1.0e30  # "minus infinity" that keeps exp() and max() NaN-free
comptime SERIAL_FLOPS = 400_000  # below this a parallel region (~10 us) costs more than it saves
# KV cache dtype codes (mojollm.kernels.attention.KV_CODES)
comptime KV_F32 = 0
comptime KV_BF16 = 1
comptime KV_F16 = 2
comptime KV_I8 = 3
comptime KV_FP8 = 4
comptime SCALE_BYTES = 4  # the float32 scale after a quantized row's D codes


def _f32(addr: Int64) -> F32Ptr:
    return F32Ptr(unsafe_from_address=Int(addr))


def _i32(addr: Int64) -> I32Ptr:
    return I32Ptr(unsafe_from_address=Int(addr))


@always_inline
def _exp0[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """exp(x), exactly 0 below -87: exp() clamps its argument and would return a subnormal
    (~1e-38) for masked scores, and subnormal operands cost ~100 cycles each on threads that do
    not flush them to zero (the Python thread that runs small calls)."""
    return x.ge(SIMD[DType.float32, n](-87.0)).select(exp(x), SIMD[DType.float32, n](0))


@always_inline
def _at(base: Int, floats: Int) -> F32Ptr:
    """Pointer to float number `floats` of the buffer at address `base`."""
    return F32Ptr(unsafe_from_address=base + 4 * floats)


def unit_floats(d: Int) -> Int:
    """Floats of one row tile's state: Q (transposed or row-major), O, m, l, alpha, pos, S/P."""
    return 2 * d * ROWS + 4 * ROWS + BK * ROWS


def scratch_floats(d: Int, units: Int) -> Int:
    """Floats of scratch one worker needs: `units` row-tile states."""
    return units * unit_floats(d)


@fieldwise_init
struct Attn(ImplicitlyCopyable, Movable):
    """The operands shared by every tile of one call."""

    var q: F32Ptr  # [T, H, D]
    var kc: F32Ptr  # [NB, B, KVH, W] (the float32 view; ka / va: the same addresses for other dtypes)
    var vc: F32Ptr
    var bt: I32Ptr  # [S, M]
    var h: Int
    var kvh: Int
    var g: Int  # query heads per kv head
    var d: Int
    var b: Int
    var m: Int
    var scale: Float32
    var kv: Int  # KV dtype code
    var rw: Int  # elements of one (slot, head) row of the cache: D, or D + 4 bytes (int8 / fp8)
    var ka: Int
    var va: Int


def row_width(kv: Int, d: Int) -> Int:
    """Storage elements (bytes for int8 / fp8) of one (slot, head) row of a cache of dtype kv."""
    return d + SCALE_BYTES if kv >= KV_I8 else d


def make_attn(q: Int64, kc: Int64, vc: Int64, bt: Int64, h: Int, kvh: Int, d: Int, b: Int, m: Int,
              scale: Float32, kv: Int) -> Attn:
    return Attn(_f32(q), _f32(kc), _f32(vc), _i32(bt), h, kvh, h // kvh, d, b, m, scale, kv, row_width(kv, d),
                Int(kc), Int(vc))


# ------------------------------------------------------------------ KV element access
# Offsets are in storage elements of the cache (floats, 16-bit words or bytes).


@always_inline
def _load_kv[KV: Int, n: Int](p: F32Ptr, addr: Int, off: Int) -> SIMD[DType.float32, n]:
    """n cache elements from element off as float32: the value (float dtypes), the int8 code,
    or the E4M3 code's value times 2^-8 (a float16 with the code's bits one place lower: its bias
    is 8 more than E4M3's, and E4M3 subnormals become float16 subnormals; _scale_kv holds 2^8)."""
    comptime if KV == KV_F32:
        return p.unsafe_load[width=n](off)
    elif KV == KV_BF16:
        var u = U16Ptr(unsafe_from_address=addr).unsafe_load[width=n](off)
        return bitcast[DType.float32, n](u.cast[DType.uint32]() << 16)
    elif KV == KV_F16:
        return F16Ptr(unsafe_from_address=addr).unsafe_load[width=n](off).cast[DType.float32]()
    elif KV == KV_I8:
        var c = U8Ptr(unsafe_from_address=addr).unsafe_load[width=n](off)
        return bitcast[DType.int8, n](c).cast[DType.float32]()
    else:
        var c = U8Ptr(unsafe_from_address=addr).unsafe_load[width=n](off).cast[DType.uint16]()
        return bitcast[DType.float16, n](((c & 0x7F) << 7) | ((c & 0x80) << 8)).cast[DType.float32]()


@always_inline
def _scale_kv[KV: Int](addr: Int, row: Int, d: Int) -> Float32:
    """The scale of the quantized row starting at byte `row` (times 2^8 for fp8, see _load_kv)."""
    var s = bitcast[DType.float32, 1](U8Ptr(unsafe_from_address=addr + row + d).unsafe_load[width=4](0))
    comptime if KV == KV_FP8:
        return s * 256.0
    return s


@always_inline
def _kload[KV: Int, n: Int](a: Attn, off: Int) -> SIMD[DType.float32, n]:
    return _load_kv[KV, n](a.kc, a.ka, off)


@always_inline
def _vload[KV: Int, n: Int](a: Attn, off: Int) -> SIMD[DType.float32, n]:
    return _load_kv[KV, n](a.vc, a.va, off)


@always_inline
def _kscale[KV: Int](a: Attn, row: Int) -> Float32:
    """Scale of the key row at element `row` (1 for float dtypes: folded away at compile time)."""
    comptime if KV >= KV_I8:
        return _scale_kv[KV](a.ka, row, a.d)
    return 1.0


@always_inline
def _vscale[KV: Int](a: Attn, row: Int) -> Float32:
    comptime if KV >= KV_I8:
        return _scale_kv[KV](a.va, row, a.d)
    return 1.0


@always_inline
def _roundeven[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    return llvm_intrinsic["llvm.roundeven", SIMD[DType.float32, n]](x)


@always_inline
def _bf16_bits[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.uint16, n]:
    """bfloat16 bits of x, round to nearest even (NaN stays a quiet NaN)."""
    var u = bitcast[DType.uint32, n](x)
    var r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    var nan = (u & 0x7FFFFFFF).gt(0x7F800000)
    return nan.select((u >> 16) | 0x40, r).cast[DType.uint16]()


@always_inline
def _e4m3_codes[n: Int](y: SIMD[DType.float32, n]) -> SIMD[DType.uint8, n]:
    """OCP E4M3 codes of y (|y| <= 448 after clamping), round to nearest even. Normal values
    round the float32 mantissa to 3 bits (a carry moves up the exponent), and the code is the
    top bits less E4M3's exponent offset (127 - 7 = 120 binades); below 2^-6 the spacing is 2^-9."""
    comptime V = SIMD[DType.float32, n]
    var a = min(abs(y), V(448.0))
    var u = bitcast[DType.uint32, n](a)
    var r = (u + 0x7FFFF + ((u >> 20) & 1)) >> 20
    var sub = _roundeven[n](a * 512.0).cast[DType.uint32]()
    var code = a.lt(V(0.015625)).select(sub, r - 960)
    var sign = (bitcast[DType.uint32, n](y) >> 24) & 0x80
    return (code | sign).cast[DType.uint8]()


@always_inline
def _store_row[KV: Int](addr: Int, dst: Int, src: F32Ptr, s: Int, d: Int):
    """Write one head row src[s : s + D] at element dst of the cache at addr, in dtype KV."""
    comptime if KV == KV_F32:
        var c = F32Ptr(unsafe_from_address=addr)
        var i = 0
        while i + W <= d:
            c.unsafe_store(dst + i, src.unsafe_load[width=W](s + i))
            i += W
        while i < d:
            c[unsafe_offset=dst + i] = src[unsafe_offset=s + i]
            i += 1
    elif KV == KV_BF16:
        var c = U16Ptr(unsafe_from_address=addr)
        var i = 0
        while i + W <= d:
            c.unsafe_store(dst + i, _bf16_bits[W](src.unsafe_load[width=W](s + i)))
            i += W
        while i < d:
            c.unsafe_store(dst + i, _bf16_bits[1](src.unsafe_load[width=1](s + i)))
            i += 1
    elif KV == KV_F16:
        var c = F16Ptr(unsafe_from_address=addr)
        var i = 0
        while i + W <= d:
            c.unsafe_store(dst + i, src.unsafe_load[width=W](s + i).cast[DType.float16]())
            i += W
        while i < d:
            c.unsafe_store(dst + i, src.unsafe_load[width=1](s + i).cast[DType.float16]())
            i += 1
    else:
        # s = max|row| / 127 (int8) or / 448 (fp8); codes of x / s (a float32 division, as the
        # format specifies); a zero row keeps s = 0 and zero codes
        var c = U8Ptr(unsafe_from_address=addr)
        var mv = Vec(0)
        var i = 0
        while i + W <= d:
            mv = max(mv, abs(src.unsafe_load[width=W](s + i)))
            i += W
        var amax = mv.reduce_max()
        while i < d:
            amax = max(amax, abs(src[unsafe_offset=s + i]))
            i += 1
        var sc = amax / (Float32(127.0) if KV == KV_I8 else Float32(448.0))
        var inv_ok = sc > 0
        i = 0
        while i + W <= d:
            var y = src.unsafe_load[width=W](s + i) / Vec(sc) if inv_ok else Vec(0)
            comptime if KV == KV_I8:
                var q = max(min(_roundeven[W](y), Vec(127.0)), Vec(-127.0))
                c.unsafe_store(dst + i, bitcast[DType.uint8, W](q.cast[DType.int8]()))
            else:
                c.unsafe_store(dst + i, _e4m3_codes[W](y))
            i += W
        while i < d:
            var y = src.unsafe_load[width=1](s + i) / sc if inv_ok else Float32(0)
            comptime if KV == KV_I8:
                var q = max(min(_roundeven[1](y), Float32(127.0)), Float32(-127.0))
                c.unsafe_store(dst + i, bitcast[DType.uint8, 1](q.cast[DType.int8]()))
            else:
                c.unsafe_store(dst + i, _e4m3_codes[1](y))
            i += 1
        c.unsafe_store(dst + d, bitcast[DType.uint8, 4](sc))


def store_token(kv: Int, addr: Int, slot: Int, kvh: Int, d: Int, src: F32Ptr, s: Int):
    """Write one token's [KVH, D] float32 row src[s:] to cache slot `slot` in dtype kv."""
    var rw = row_width(kv, d)
    var dst = slot * kvh * rw
    for hh in range(kvh):
        if kv == KV_F32:
            _store_row[KV_F32](addr, dst + hh * rw, src, s + hh * d, d)
        elif kv == KV_BF16:
            _store_row[KV_BF16](addr, dst + hh * rw, src, s + hh * d, d)
        elif kv == KV_F16:
            _store_row[KV_F16](addr, dst + hh * rw, src, s + hh * d, d)
        elif kv == KV_I8:
            _store_row[KV_I8](addr, dst + hh * rw, src, s + hh * d, d)
        else:
            _store_row[KV_FP8](addr, dst + hh * rw, src, s + hh * d, d)


# ------------------------------------------------------------------ tile kernel
# A row tile's state lives at address u: QT/Q [D*ROWS] | O [ROWS*D] | m | l | alpha | pos | S/P [BK*ROWS].


@always_inline
def _q_of(u: Int) -> F32Ptr:
    return _at(u, 0)


@always_inline
def _o_of(u: Int, d: Int) -> F32Ptr:
    return _at(u, d * ROWS)


@always_inline
def _stat(u: Int, d: Int, which: Int) -> F32Ptr:
    """which: 0 running max m, 1 running sum l, 2 rescale alpha, 3 row position."""
    return _at(u, 2 * d * ROWS + which * ROWS)


@always_inline
def _s_of(u: Int, d: Int) -> F32Ptr:
    """Scores, then probabilities, of the current key block: S^T[j * ROWS + r] or S[r * BK + j]."""
    return _at(u, 2 * d * ROWS + 4 * ROWS)


@always_inline
def _key_offsets(a: Attn, s: Int, k0: Int, nk: Int, mut offs: Array[Int, BK]):
    """Offsets of the [KVH, D] cache rows of positions k0..k0+nk-1 (no division per key)."""
    var blk = s * a.m + k0 // a.b
    var row = k0 % a.b
    var row_floats = a.kvh * a.rw
    for j in range(nk):
        offs[j] = (Int(a.bt[unsafe_offset=blk]) * a.b + row) * row_floats
        row += 1
        if row == a.b:
            row = 0
            blk += 1


@always_inline
def _scores_transposed[KV: Int, NR: Int](a: Attn, qt: F32Ptr, st: F32Ptr, offs: Array[Int, BK], kv_off: Int,
                                j_lo: Int, j_hi: Int):
    """S^T[j, r] = sum_d K[j, d] QT[d, r] for NR row vectors; 4 keys x NR vectors in registers."""
    var j = j_lo
    while j + 4 <= j_hi:
        var acc = Array[Vec, 4 * NR](fill=Vec(0))
        var o0 = offs[j] + kv_off
        var o1 = offs[j + 1] + kv_off
        var o2 = offs[j + 2] + kv_off
        var o3 = offs[j + 3] + kv_off
        for d in range(a.d):
            var k0 = Vec(_kload[KV, 1](a, o0 + d))
            var k1 = Vec(_kload[KV, 1](a, o1 + d))
            var k2 = Vec(_kload[KV, 1](a, o2 + d))
            var k3 = Vec(_kload[KV, 1](a, o3 + d))
            comptime for v in range(NR):
                var qv = qt.unsafe_load[width=W](d * ROWS + v * W)
                acc[v] += k0 * qv
                acc[NR + v] += k1 * qv
                acc[2 * NR + v] += k2 * qv
                acc[3 * NR + v] += k3 * qv
        comptime for jj in range(4):
            comptime for v in range(NR):
                st.unsafe_store((j + jj) * ROWS + v * W, acc[jj * NR + v])
        j += 4
    while j < j_hi:
        var acc = Array[Vec, NR](fill=Vec(0))
        var o = offs[j] + kv_off
        for d in range(a.d):
            var k = Vec(_kload[KV, 1](a, o + d))
            comptime for v in range(NR):
                acc[v] += k * qt.unsafe_load[width=W](d * ROWS + v * W)
        comptime for v in range(NR):
            st.unsafe_store(j * ROWS + v * W, acc[v])
        j += 1


@always_inline
def _pair_sum(x: Vec, y: Vec) -> Vec:
    """[x0+x1, x2+x3, .., y0+y1, y2+y3, ..]: one level of a 16-vector transpose-reduction."""
    var halves = x.join(y).deinterleave()
    return rebind[Vec](halves[0]) + rebind[Vec](halves[1])


@always_inline
def _sum_each(mut acc: Array[Vec, W]) -> Vec:
    """Lane k = horizontal sum of acc[k]: log2(W) levels of pair sums (~3 instructions per
    vector) instead of a full horizontal reduction per vector."""
    comptime levels = 4 if W == 16 else (3 if W == 8 else 2)
    comptime for lvl in range(levels):
        comptime for i in range(W >> (lvl + 1)):
            acc[i] = _pair_sum(acc[2 * i], acc[2 * i + 1])
    return acc[0]


@always_inline
def _dot_rows_w[KV: Int, DV: Int](a: Attn, qr: F32Ptr, st: F32Ptr, offs: Array[Int, BK], kv_off: Int, j: Int, nrows: Int):
    """Scores of W consecutive keys j.. for each row, head dim DV*W known at compile time: the q
    row stays in registers, one accumulator per key, then one transpose-reduction."""
    for r in range(nrows):
        var qv = Array[Vec, DV](fill=Vec(0))
        comptime for c in range(DV):
            qv[c] = qr.unsafe_load[width=W](r * DV * W + c * W)
        var acc = Array[Vec, W](fill=Vec(0))
        comptime for jj in range(W):
            var o = offs[j + jj] + kv_off
            var s0 = qv[0] * _kload[KV, W](a, o)
            var s1 = qv[1] * _kload[KV, W](a, o + W) if DV > 1 else Vec(0)
            comptime for c in range(2, DV):
                if c % 2 == 0:
                    s0 += qv[c] * _kload[KV, W](a, o + c * W)
                else:
                    s1 += qv[c] * _kload[KV, W](a, o + c * W)
            acc[jj] = s0 + s1
        st.unsafe_store(r * BK + j, _sum_each(acc))


@always_inline
def _dot_rows_one[KV: Int](a: Attn, qr: F32Ptr, st: F32Ptr, offs: Array[Int, BK], kv_off: Int, j: Int, nrows: Int):
    """Scores of key j for each row, any head dim."""
    var d = a.d
    var o = offs[j] + kv_off
    for r in range(nrows):
        var acc0 = Vec(0)
        var acc1 = Vec(0)
        var i = 0
        while i + 2 * W <= d:
            acc0 += qr.unsafe_load[width=W](r * d + i) * _kload[KV, W](a, o + i)
            acc1 += qr.unsafe_load[width=W](r * d + i + W) * _kload[KV, W](a, o + i + W)
            i += 2 * W
        if i + W <= d:
            acc0 += qr.unsafe_load[width=W](r * d + i) * _kload[KV, W](a, o + i)
            i += W
        var sc = (acc0 + acc1).reduce_add()
        while i < d:
            sc += qr[unsafe_offset=r * d + i] * _kload[KV, 1](a, o + i)
            i += 1
        st[unsafe_offset=r * BK + j] = sc


@always_inline
def _scores_rowmajor[KV: Int](a: Attn, qr: F32Ptr, st: F32Ptr, offs: Array[Int, BK], kv_off: Int, j_lo: Int, j_hi: Int,
                     nrows: Int):
    """S[r, j] = q_r . K[j] for a few rows (decode): q rows row-major in qr[r * D], scores
    row-major in st[r * BK + j] so that the softmax runs across keys."""
    var j = j_lo
    if a.d == 4 * W:
        while j + W <= j_hi:
            _dot_rows_w[KV, 4](a, qr, st, offs, kv_off, j, nrows)
            j += W
    elif a.d == 8 * W:
        while j + W <= j_hi:
            _dot_rows_w[KV, 8](a, qr, st, offs, kv_off, j, nrows)
            j += W
    while j < j_hi:
        _dot_rows_one[KV](a, qr, st, offs, kv_off, j, nrows)
        j += 1


@always_inline
def _online_softmax_rowmajor(st: F32Ptr, mv: F32Ptr, lv: F32Ptr, av: F32Ptr, pv: F32Ptr,
                             k0: Int, nk: Int, nrows: Int, masked: Bool):
    """_online_softmax for row-major scores: statistics are per-row scalars, vectors run over keys."""
    var lane = Vec(0)
    for i in range(W):
        lane[i] = Float32(i)
    for r in range(nrows):
        var base = r * BK
        if masked:  # keys past the row's position get NEG
            var pos = pv[unsafe_offset=r]
            var j = 0
            while j + W <= nk:
                var kp = lane + Float32(k0 + j)
                st.unsafe_store(base + j, kp.le(Vec(pos)).select(st.unsafe_load[width=W](base + j), Vec(NEG)))
                j += W
            while j < nk:
                if Float32(k0 + j) > pos:
                    st[unsafe_offset=base + j] = NEG
                j += 1
        var mt = Vec(NEG)
        var j = 0
        while j + W <= nk:
            mt = max(mt, st.unsafe_load[width=W](base + j))
            j += W
        var m_tile = mt.reduce_max()
        while j < nk:
            m_tile = max(m_tile, st[unsafe_offset=base + j])
            j += 1
        var m_old = mv[unsafe_offset=r]
        var m_new = max(m_old, m_tile)
        var sv = Vec(0)
        j = 0
        while j + W <= nk:
            var p = _exp0(st.unsafe_load[width=W](base + j) - m_new)
            st.unsafe_store(base + j, p)
            sv += p
            j += W
        var sum = sv.reduce_add()
        while j < nk:
            var p = _exp0[1](st[unsafe_offset=base + j] - m_new)
            st[unsafe_offset=base + j] = p
            sum += p
            j += 1
        var alpha = _exp0[1](m_old - m_new)
        lv[unsafe_offset=r] = lv[unsafe_offset=r] * alpha + sum
        mv[unsafe_offset=r] = m_new
        av[unsafe_offset=r] = alpha


@always_inline
def _online_softmax[NR: Int](st: F32Ptr, mv: F32Ptr, lv: F32Ptr, av: F32Ptr, pv: F32Ptr,
                             k0: Int, nk: Int, masked: Bool):
    """Per row: mask keys past the row's position, update running max/sum, turn S^T into P^T
    (exp(s - m_new)) in place and leave the rescale factor exp(m_old - m_new) in av."""
    comptime for v in range(NR):
        var mt = Vec(NEG)
        if masked:
            var pos = pv.unsafe_load[width=W](v * W)
            for j in range(nk):
                var s = st.unsafe_load[width=W](j * ROWS + v * W)
                s = pos.ge(Vec(Float32(k0 + j))).select(s, Vec(NEG))
                st.unsafe_store(j * ROWS + v * W, s)
                mt = max(mt, s)
        else:
            for j in range(nk):
                mt = max(mt, st.unsafe_load[width=W](j * ROWS + v * W))
        var m_old = mv.unsafe_load[width=W](v * W)
        var m_new = max(m_old, mt)
        var alpha = _exp0(m_old - m_new)
        var sum = Vec(0)
        for j in range(nk):
            var p = _exp0(st.unsafe_load[width=W](j * ROWS + v * W) - m_new)
            st.unsafe_store(j * ROWS + v * W, p)
            sum += p
        lv.unsafe_store(v * W, lv.unsafe_load[width=W](v * W) * alpha + sum)
        mv.unsafe_store(v * W, m_new)
        av.unsafe_store(v * W, alpha)


@always_inline
def _pv_rows[KV: Int, RG: Int, PT: Bool](a: Attn, o_buf: F32Ptr, st: F32Ptr, av: F32Ptr, offs: Array[Int, BK],
                                kv_off: Int, j_lo: Int, j_hi: Int, rescale: Bool, r0: Int):
    """O[r0:r0+RG, :] = O (* alpha if rescale) + P[r0:r0+RG, j_lo:j_hi] . V[j_lo:j_hi] (RG rows x
    4 vectors in registers). P is read from st transposed (PT: st[j * ROWS + r]) or row-major
    (st[r * BK + j])."""
    comptime js = ROWS if PT else 1
    comptime rs = 1 if PT else BK
    var d = a.d
    var c0 = 0
    while c0 + 4 * W <= d:
        var acc = Array[Vec, 4 * RG](fill=Vec(0))
        comptime for ri in range(RG):
            var al = av[unsafe_offset=r0 + ri] if rescale else Float32(1)
            comptime for cv in range(4):
                acc[ri * 4 + cv] = o_buf.unsafe_load[width=W]((r0 + ri) * d + c0 + cv * W) * al
        for j in range(j_lo, j_hi):
            var vo = offs[j] + kv_off + c0
            var v0 = _vload[KV, W](a, vo)
            var v1 = _vload[KV, W](a, vo + W)
            var v2 = _vload[KV, W](a, vo + 2 * W)
            var v3 = _vload[KV, W](a, vo + 3 * W)
            var sv = _vscale[KV](a, offs[j] + kv_off)
            comptime for ri in range(RG):
                var p = Vec(st[unsafe_offset=j * js + (r0 + ri) * rs] * sv)
                acc[ri * 4 + 0] += p * v0
                acc[ri * 4 + 1] += p * v1
                acc[ri * 4 + 2] += p * v2
                acc[ri * 4 + 3] += p * v3
        comptime for ri in range(RG):
            comptime for cv in range(4):
                o_buf.unsafe_store((r0 + ri) * d + c0 + cv * W, acc[ri * 4 + cv])
        c0 += 4 * W
    while c0 + W <= d:
        var acc = Array[Vec, RG](fill=Vec(0))
        comptime for ri in range(RG):
            acc[ri] = o_buf.unsafe_load[width=W]((r0 + ri) * d + c0) * (av[unsafe_offset=r0 + ri] if rescale else Float32(1))
        for j in range(j_lo, j_hi):
            var vv = _vload[KV, W](a, offs[j] + kv_off + c0)
            var sv = _vscale[KV](a, offs[j] + kv_off)
            comptime for ri in range(RG):
                acc[ri] += Vec(st[unsafe_offset=j * js + (r0 + ri) * rs] * sv) * vv
        comptime for ri in range(RG):
            o_buf.unsafe_store((r0 + ri) * d + c0, acc[ri])
        c0 += W
    while c0 < d:  # head dims that are not a multiple of the vector width
        comptime for ri in range(RG):
            var o = o_buf[unsafe_offset=(r0 + ri) * d + c0] * (av[unsafe_offset=r0 + ri] if rescale else Float32(1))
            for j in range(j_lo, j_hi):
                o += (st[unsafe_offset=j * js + (r0 + ri) * rs] * _vscale[KV](a, offs[j] + kv_off)
                      * _vload[KV, 1](a, offs[j] + kv_off + c0))
            o_buf[unsafe_offset=(r0 + ri) * d + c0] = o
        c0 += 1


@always_inline
def _pv[KV: Int, PT: Bool](a: Attn, o_buf: F32Ptr, st: F32Ptr, av: F32Ptr, offs: Array[Int, BK], kv_off: Int, j_lo: Int,
                 j_hi: Int, rescale: Bool, nrows: Int):
    if not PT:  # few rows (decode): one pass over V with every row in registers
        if nrows == 3:
            _pv_rows[KV, 3, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, 0)
            return
        if nrows == 5:
            _pv_rows[KV, 5, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, 0)
            return
        if nrows == 6:
            _pv_rows[KV, 6, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, 0)
            return
        if nrows == 7:
            _pv_rows[KV, 7, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, 0)
            return
    var r0 = 0
    while r0 + 4 <= nrows:
        _pv_rows[KV, 4, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, r0)
        r0 += 4
    if r0 + 2 <= nrows:
        _pv_rows[KV, 2, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, r0)
        r0 += 2
    if r0 < nrows:
        _pv_rows[KV, 1, PT](a, o_buf, st, av, offs, kv_off, j_lo, j_hi, rescale, r0)


def _init_unit(a: Attn, u: Int, kvh: Int, tok0: Int, q_len: Int, ctx: Int, f_lo: Int, nrows: Int):
    """Load the tile's rows f_lo..f_lo+nrows-1 of kv head kvh: row f is query f // G (token
    tok0 + f // G, position ctx - q_len + f // G) of head kvh * G + f % G. Q is pre-scaled;
    stored transposed (QT[d, r]) for the broadcast-FMA score kernel, row-major for dot products."""
    var d = a.d
    var qt = _q_of(u)
    var o_buf = _o_of(u, d)
    var mv = _stat(u, d, 0)
    var lv = _stat(u, d, 1)
    var pv = _stat(u, d, 3)
    var padded = (nrows + W - 1) // W * W
    var i = 0
    while i < padded * d:  # padded * d is a multiple of W
        o_buf.unsafe_store(i, Vec(0))
        i += W
    for r in range(padded):
        var f = f_lo + min(r, nrows - 1)  # padding rows repeat the last row's position
        pv[unsafe_offset=r] = Float32(ctx - q_len + f // a.g)
        mv[unsafe_offset=r] = NEG
        lv[unsafe_offset=r] = 0
        var src = ((tok0 + f // a.g) * a.h + kvh * a.g + f % a.g) * d
        if nrows < DOT_ROWS:  # row-major
            i = 0
            while i + W <= d:
                qt.unsafe_store(r * d + i, a.q.unsafe_load[width=W](src + i) * a.scale)
                i += W
            while i < d:
                qt[unsafe_offset=r * d + i] = a.q[unsafe_offset=src + i] * a.scale
                i += 1
        elif r < nrows:  # transposed; padding rows are zero
            for c in range(d):
                qt[unsafe_offset=c * ROWS + r] = a.q[unsafe_offset=src + c] * a.scale
        else:
            for c in range(d):
                qt[unsafe_offset=c * ROWS + r] = 0


def _scores[KV: Int](a: Attn, u: Int, offs: Array[Int, BK], kv_off: Int, j_lo: Int, j_hi: Int, nrows: Int):
    """Scores of keys j_lo..j_hi-1 of the block for one row tile: row-major dot products for few
    rows (decode), else the transposed kernel with its row-vector count picked at run time."""
    var d = a.d
    var st = _s_of(u, d)
    if nrows < DOT_ROWS:
        _scores_rowmajor[KV](a, _q_of(u), st, offs, kv_off, j_lo, j_hi, nrows)
        comptime if KV >= KV_I8:  # each key's scale: q . (s k) = s (q . k)
            for j in range(j_lo, j_hi):
                var sk = _kscale[KV](a, offs[j] + kv_off)
                for r in range(nrows):
                    st[unsafe_offset=r * BK + j] *= sk
        return
    var nr = (nrows + W - 1) // W
    if nr == 1:
        _scores_transposed[KV, 1](a, _q_of(u), st, offs, kv_off, j_lo, j_hi)
    elif nr == 2:
        _scores_transposed[KV, 2](a, _q_of(u), st, offs, kv_off, j_lo, j_hi)
    elif nr == 3:
        _scores_transposed[KV, 3](a, _q_of(u), st, offs, kv_off, j_lo, j_hi)
    else:
        _scores_transposed[KV, 4](a, _q_of(u), st, offs, kv_off, j_lo, j_hi)
    comptime if KV >= KV_I8:
        for j in range(j_lo, j_hi):
            var sk = Vec(_kscale[KV](a, offs[j] + kv_off))
            for v in range(nr):
                st.unsafe_store(j * ROWS + v * W, st.unsafe_load[width=W](j * ROWS + v * W) * sk)


def _softmax(a: Attn, u: Int, k0: Int, nk: Int, nrows: Int, masked: Bool):
    """Online-softmax update of one row tile over the block's nk scores."""
    var d = a.d
    var st = _s_of(u, d)
    var mv = _stat(u, d, 0)
    var lv = _stat(u, d, 1)
    var av = _stat(u, d, 2)
    var pv = _stat(u, d, 3)
    if nrows < DOT_ROWS:
        _online_softmax_rowmajor(st, mv, lv, av, pv, k0, nk, nrows, masked)
        return
    var nr = (nrows + W - 1) // W
    if nr == 1:
        _online_softmax[1](st, mv, lv, av, pv, k0, nk, masked)
    elif nr == 2:
        _online_softmax[2](st, mv, lv, av, pv, k0, nk, masked)
    elif nr == 3:
        _online_softmax[3](st, mv, lv, av, pv, k0, nk, masked)
    else:
        _online_softmax[4](st, mv, lv, av, pv, k0, nk, masked)


def _accumulate[KV: Int](a: Attn, u: Int, offs: Array[Int, BK], kv_off: Int, j_lo: Int, j_hi: Int, rescale: Bool,
                nrows: Int):
    """O += P[:, j_lo:j_hi] . V[j_lo:j_hi] for one row tile (rescaling O by alpha first if asked)."""
    var d = a.d
    if nrows < DOT_ROWS:
        _pv[KV, False](a, _o_of(u, d), _s_of(u, d), _stat(u, d, 2), offs, kv_off, j_lo, j_hi, rescale, nrows)
    else:
        _pv[KV, True](a, _o_of(u, d), _s_of(u, d), _stat(u, d, 2), offs, kv_off, j_lo, j_hi, rescale, nrows)


def _write_rows(a: Attn, dst_buf: F32Ptr, u: Int, kvh: Int, tok0: Int, f_lo: Int, nrows: Int):
    """out[token, head, :] = O[r] / l[r] for the tile's rows."""
    var d = a.d
    var o_buf = _o_of(u, d)
    var lv = _stat(u, d, 1)
    for r in range(nrows):
        var f = f_lo + r
        var dst = ((tok0 + f // a.g) * a.h + kvh * a.g + f % a.g) * d
        var inv = 1.0 / lv[unsafe_offset=r]
        var i = 0
        while i + W <= d:
            dst_buf.unsafe_store(dst + i, o_buf.unsafe_load[width=W](r * d + i) * inv)
            i += W
        while i < d:
            dst_buf[unsafe_offset=dst + i] = o_buf[unsafe_offset=r * d + i] * inv
            i += 1


def _write_partial(d: Int, part: F32Ptr, u: Int, nrows: Int):
    """Split decode: keep (m, l, unnormalised O) of each row for the merge, row r at r * (D + 2)."""
    var o_buf = _o_of(u, d)
    var mv = _stat(u, d, 0)
    var lv = _stat(u, d, 1)
    for r in range(nrows):
        part[unsafe_offset=r * (d + 2)] = mv[unsafe_offset=r]
        part[unsafe_offset=r * (d + 2) + 1] = lv[unsafe_offset=r]
        for i in range(d):
            part[unsafe_offset=r * (d + 2) + 2 + i] = o_buf[unsafe_offset=r * d + i]


# ------------------------------------------------------------------ entry points


def _prefill_tile[KV: Int](a: Attn, u: Int, mut offs: Array[Int, BK], s: Int, kvh: Int, q_len: Int, ctx: Int,
                           f_lo: Int, nrows: Int):
    """One prefill row tile (loaded by _init_unit) over its causal key range."""
    var pos_min = ctx - q_len + f_lo // a.g
    var pos_max = ctx - q_len + (f_lo + nrows - 1) // a.g
    var k0 = 0
    while k0 <= pos_max:  # causal: no row of the tile sees past its last position
        var nk = min(BK, pos_max + 1 - k0)
        _key_offsets(a, s, k0, nk, offs)
        _scores[KV](a, u, offs, kvh * a.rw, 0, nk, nrows)
        _softmax(a, u, k0, nk, nrows, k0 + nk - 1 > pos_min)
        _accumulate[KV](a, u, offs, kvh * a.rw, 0, nk, True, nrows)
        k0 += nk


def attention_prefill(meta_addr: PythonObject, scale: PythonObject) raises -> PythonObject:
    """Meta (int64): q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
    scratch, T, H, KVH, D, B, S, M, workers, KV dtype code. Causal: query i of sequence s sits at
    position context_lens[s] - q_len + i and sees keys 0..that position."""
    var meta = I64Ptr(unsafe_from_address=Int(py=meta_addr))
    var h = Int(meta[unsafe_offset=9])
    var kvh_n = Int(meta[unsafe_offset=10])
    var d = Int(meta[unsafe_offset=11])
    var a = make_attn(meta[unsafe_offset=0], meta[unsafe_offset=1], meta[unsafe_offset=2], meta[unsafe_offset=3],
                      h, kvh_n, d, Int(meta[unsafe_offset=12]), Int(meta[unsafe_offset=14]), Float32(py=scale),
                      Int(meta[unsafe_offset=16]))
    var cu = _i32(meta[unsafe_offset=4])
    var ctx_lens = _i32(meta[unsafe_offset=5])
    var out = _f32(meta[unsafe_offset=6])
    var scratch = Int(meta[unsafe_offset=7])
    var n_seqs = Int(meta[unsafe_offset=13])
    var workers = Int(meta[unsafe_offset=15])
    var per_worker = scratch_floats(d, 1)

    # Jobs: (sequence, kv head, row tile); within a sequence the last (costliest) tiles first.
    var first_job = List[Int](capacity=n_seqs + 1)
    first_job.append(0)
    var flops = 0
    for s in range(n_seqs):
        var rows = Int(cu[unsafe_offset=s + 1] - cu[unsafe_offset=s]) * a.g
        first_job.append(first_job[s] + kvh_n * ((rows + ROWS - 1) // ROWS))
        flops += 4 * rows * kvh_n * Int(ctx_lens[unsafe_offset=s]) * d
    var n_jobs = first_job[n_seqs]
    var n_workers = 1 if flops < SERIAL_FLOPS else min(workers, n_jobs)

    var counter = Atomic[Int64](0)
    var next_job = Pointer(to=counter)

    def worker(w: Int) {imm a, imm cu, imm ctx_lens, imm out, imm scratch, imm per_worker, imm first_job, imm n_jobs, imm next_job}:
        var u = scratch + 4 * w * per_worker
        var offs = Array[Int, BK](fill=0)
        while True:
            var job = Int(next_job[].fetch_add(1))
            if job >= n_jobs:
                break
            var s = 0
            while first_job[s + 1] <= job:
                s += 1
            var tok0 = Int(cu[unsafe_offset=s])
            var q_len = Int(cu[unsafe_offset=s + 1]) - tok0
            var rows = q_len * a.g
            var tiles = (rows + ROWS - 1) // ROWS
            var jj = job - first_job[s]
            var f_lo = (tiles - 1 - jj // a.kvh) * ROWS
            var kvh = jj % a.kvh
            var nrows = min(ROWS, rows - f_lo)
            var ctx = Int(ctx_lens[unsafe_offset=s])
            _init_unit(a, u, kvh, tok0, q_len, ctx, f_lo, nrows)
            if a.kv == KV_F32:
                _prefill_tile[KV_F32](a, u, offs, s, kvh, q_len, ctx, f_lo, nrows)
            elif a.kv == KV_BF16:
                _prefill_tile[KV_BF16](a, u, offs, s, kvh, q_len, ctx, f_lo, nrows)
            elif a.kv == KV_F16:
                _prefill_tile[KV_F16](a, u, offs, s, kvh, q_len, ctx, f_lo, nrows)
            elif a.kv == KV_I8:
                _prefill_tile[KV_I8](a, u, offs, s, kvh, q_len, ctx, f_lo, nrows)
            else:
                _prefill_tile[KV_FP8](a, u, offs, s, kvh, q_len, ctx, f_lo, nrows)
            _write_rows(a, out, u, kvh, tok0, f_lo, nrows)

    if n_workers <= 1:
        worker(0)
    else:
        parallelize(worker, n_workers)
    return PythonObject(None)


def attention_decode(meta_addr: PythonObject, scale: PythonObject) raises -> PythonObject:
    """Meta (int64): q, k_cache, v_cache, block_tables, context_lens, out, scratch, partial,
    S, H, KVH, D, B, M, chunk prefix sums (int32 [S + 1]), workers, KV dtype code. One query per sequence at
    position ctx - 1. A job is one (sequence, key chunk) with all its kv heads ("units": kv head
    x row tile of up to ROWS group heads). A sequence with several chunks (flash-decoding) has
    their partial softmaxes merged at the end; partial holds one slot of min(ROWS, G) * (D + 2)
    floats per job and unit."""
    decode_attention(I64Ptr(unsafe_from_address=Int(py=meta_addr)), Float32(py=scale))
    return PythonObject(None)


@fieldwise_init
struct DecodeJobs(ImplicitlyCopyable, Movable):
    """One attention_decode call cut into jobs, one (sequence, key chunk) each, that any thread
    may run (`run`, with its own scratch slot w), then `merge` once every job is done.
    Sequence s has first[s + 1] - first[s] chunks: the caller picks them from the sequence's own
    context length, so its result does not depend on the other sequences of the batch."""

    var a: Attn
    var ctx_lens: I32Ptr
    var out: F32Ptr
    var scratch: Int
    var part: Int
    var first: I32Ptr  # [S + 1] prefix sums of the chunk counts
    var n_seqs: Int
    var row_tiles: Int
    var units: Int
    var per_worker: Int
    var slot: Int  # floats of one unit's partial: min(ROWS, G) rows of (m, l, O)
    var n_jobs: Int
    var n_workers: Int  # how many threads the jobs are worth (1 below SERIAL_FLOPS)

    @staticmethod
    def of(meta: I64Ptr, scale: Float32) -> DecodeJobs:
        var h = Int(meta[unsafe_offset=9])
        var kvh_n = Int(meta[unsafe_offset=10])
        var d = Int(meta[unsafe_offset=11])
        var a = make_attn(meta[unsafe_offset=0], meta[unsafe_offset=1], meta[unsafe_offset=2], meta[unsafe_offset=3],
                          h, kvh_n, d, Int(meta[unsafe_offset=12]), Int(meta[unsafe_offset=13]), scale,
                          Int(meta[unsafe_offset=16]))
        var ctx_lens = _i32(meta[unsafe_offset=4])
        var n_seqs = Int(meta[unsafe_offset=8])
        var first = _i32(meta[unsafe_offset=14])
        var row_tiles = (a.g + ROWS - 1) // ROWS
        var units = kvh_n * row_tiles
        var flops = 0
        for s in range(n_seqs):
            flops += 4 * h * Int(ctx_lens[unsafe_offset=s]) * d
        var n_jobs = Int(first[unsafe_offset=n_seqs])
        var workers = Int(meta[unsafe_offset=15])
        return DecodeJobs(a, ctx_lens, _f32(meta[unsafe_offset=5]), Int(meta[unsafe_offset=6]),
                          Int(meta[unsafe_offset=7]), first, n_seqs, row_tiles, units, scratch_floats(d, units),
                          min(ROWS, a.g) * (d + 2), n_jobs, 1 if flops < SERIAL_FLOPS else min(workers, n_jobs))

    def run(self, job: Int, w: Int):
        """Job `job` on scratch slot w (the kernel compiled for the cache's dtype)."""
        if self.a.kv == KV_F32:
            self.run_kv[KV_F32](job, w)
        elif self.a.kv == KV_BF16:
            self.run_kv[KV_BF16](job, w)
        elif self.a.kv == KV_F16:
            self.run_kv[KV_F16](job, w)
        elif self.a.kv == KV_I8:
            self.run_kv[KV_I8](job, w)
        else:
            self.run_kv[KV_FP8](job, w)

    def run_kv[KV: Int](self, job: Int, w: Int):
        var a = self.a
        var row_tiles = self.row_tiles
        var units = self.units
        var base = self.scratch + 4 * w * self.per_worker
        var uf = unit_floats(a.d)
        var offs = Array[Int, BK](fill=0)
        var lo = 0  # the sequence of this job: first[s] <= job < first[s + 1]
        var hi = self.n_seqs
        while hi - lo > 1:
            var mid = (lo + hi) // 2
            if Int(self.first[unsafe_offset=mid]) <= job:
                lo = mid
            else:
                hi = mid
        var s = lo
        var n_splits = Int(self.first[unsafe_offset=s + 1] - self.first[unsafe_offset=s])
        var c = job - Int(self.first[unsafe_offset=s])
        var ctx = Int(self.ctx_lens[unsafe_offset=s])
        # Chunks are whole BK key blocks so that every chunk but the last is full.
        var chunk = ((ctx + n_splits - 1) // n_splits + BK - 1) // BK * BK
        var k_lo = c * chunk
        var k_hi = min(ctx, k_lo + chunk)
        for un in range(units):
            var f_lo = (un % row_tiles) * ROWS
            _init_unit(a, base + 4 * un * uf, un // row_tiles, s, 1, ctx, f_lo, min(ROWS, a.g - f_lo))
        var k0 = k_lo
        while k0 < k_hi:
            var nk = min(BK, k_hi - k0)
            _key_offsets(a, s, k0, nk, offs)
            # Every phase walks keys in short runs and, inside a run, the kv heads in order:
            # the [KVH, D] rows are then read in address order and the prefetchers keep up.
            var j = 0
            while j < nk:
                var j_hi = min(nk, j + W)
                for un in range(units):
                    var f_lo = (un % row_tiles) * ROWS
                    _scores[KV](a, base + 4 * un * uf, offs, (un // row_tiles) * a.rw, j, j_hi, min(ROWS, a.g - f_lo))
                j = j_hi
            for un in range(units):
                var f_lo = (un % row_tiles) * ROWS
                _softmax(a, base + 4 * un * uf, k0, nk, min(ROWS, a.g - f_lo), False)
            j = 0
            while j < nk:
                var j_hi = min(nk, j + W)
                for un in range(units):
                    var f_lo = (un % row_tiles) * ROWS
                    _accumulate[KV](a, base + 4 * un * uf, offs, (un // row_tiles) * a.rw, j, j_hi, j == 0,
                                min(ROWS, a.g - f_lo))
                j = j_hi
            k0 += nk
        for un in range(units):
            var f_lo = (un % row_tiles) * ROWS
            var nrows = min(ROWS, a.g - f_lo)
            if n_splits == 1:
                _write_rows(a, self.out, base + 4 * un * uf, un // row_tiles, s, f_lo, nrows)
            else:
                # An empty chunk (k_lo >= ctx) leaves m = NEG, l = 0: the merge skips it.
                _write_partial(a.d, _at(self.part, (job * units + un) * self.slot), base + 4 * un * uf, nrows)

    def merge(self):
        """out = sum_c e^(m_c - M) O_c / sum_c e^(m_c - M) l_c over the chunks c of each row of
        every sequence with more than one chunk, chunks in order."""
        var a = self.a
        var d = a.d
        var out = self.out
        for s in range(self.n_seqs):
            var j0 = Int(self.first[unsafe_offset=s])
            var n_splits = Int(self.first[unsafe_offset=s + 1]) - j0
            if n_splits == 1:
                continue
            for un in range(self.units):
                var kvh = un // self.row_tiles
                var f_lo = (un % self.row_tiles) * ROWS
                for r in range(min(ROWS, a.g - f_lo)):
                    var m_all = NEG
                    for c in range(n_splits):
                        m_all = max(m_all, _at(self.part, ((j0 + c) * self.units + un) * self.slot)[unsafe_offset=r * (d + 2)])
                    var dst = (s * a.h + kvh * a.g + f_lo + r) * d
                    for i in range(d):
                        out[unsafe_offset=dst + i] = 0
                    var l_all: Float32 = 0
                    for c in range(n_splits):
                        var p = _at(self.part, ((j0 + c) * self.units + un) * self.slot + r * (d + 2))
                        var l_c = p[unsafe_offset=1]
                        if l_c == 0:  # an empty chunk (short sequence)
                            continue
                        var wgt = _exp0[1](p[unsafe_offset=0] - m_all)
                        l_all += l_c * wgt
                        for i in range(d):
                            out[unsafe_offset=dst + i] += wgt * p[unsafe_offset=2 + i]
                    var inv = 1.0 / l_all
                    for i in range(d):
                        out[unsafe_offset=dst + i] *= inv


def decode_attention(meta: I64Ptr, scale: Float32) raises:
    """attention_decode on a meta array."""
    var jobs = DecodeJobs.of(meta, scale)
    var counter = Atomic[Int64](0)
    var next_job = Pointer(to=counter)

    def worker(w: Int) {imm jobs, imm next_job}:
        while True:
            var job = Int(next_job[].fetch_add(1))
            if job >= jobs.n_jobs:
                break
            jobs.run(job, w)

    if jobs.n_workers <= 1:
        worker(0)
    else:
        parallelize(worker, jobs.n_workers)
    jobs.merge()


def store_kv(meta_addr: PythonObject) raises -> PythonObject:
    """Meta (int64): k_cache, v_cache, k, v, slot_mapping, T, row (= KVH * D), KV dtype code, KVH.
    k_cache.reshape(-1, row)[slot_mapping[t]] = k[t], likewise v (converted / quantized per head
    row for the 16-bit and 8-bit dtypes)."""
    var meta = I64Ptr(unsafe_from_address=Int(py=meta_addr))
    var kc = _f32(meta[unsafe_offset=0])
    var vc = _f32(meta[unsafe_offset=1])
    var k = _f32(meta[unsafe_offset=2])
    var v = _f32(meta[unsafe_offset=3])
    var slots = I64Ptr(unsafe_from_address=Int(meta[unsafe_offset=4]))
    var t_n = Int(meta[unsafe_offset=5])
    var row = Int(meta[unsafe_offset=6])
    var kv = Int(meta[unsafe_offset=7])
    var kvh = Int(meta[unsafe_offset=8])
    var ka = Int(meta[unsafe_offset=0])
    var va = Int(meta[unsafe_offset=1])
    var chunks = 1 if t_n * row < (1 << 16) else min(t_n, 4 * num_physical_cores())
    var per = (t_n + chunks - 1) // chunks

    def work(c: Int) {imm kc, imm vc, imm k, imm v, imm slots, imm t_n, imm row, imm per, imm kv, imm kvh, imm ka, imm va}:
        if kv != KV_F32:
            for t in range(c * per, min(t_n, (c + 1) * per)):
                var slot = Int(slots[unsafe_offset=t])
                store_token(kv, ka, slot, kvh, row // kvh, k, t * row)
                store_token(kv, va, slot, kvh, row // kvh, v, t * row)
            return
        for t in range(c * per, min(t_n, (c + 1) * per)):
            var dst = Int(slots[unsafe_offset=t]) * row
            var src = t * row
            var i = 0
            while i + W <= row:
                kc.unsafe_store(dst + i, k.unsafe_load[width=W](src + i))
                vc.unsafe_store(dst + i, v.unsafe_load[width=W](src + i))
                i += W
            while i < row:
                kc[unsafe_offset=dst + i] = k[unsafe_offset=src + i]
                vc[unsafe_offset=dst + i] = v[unsafe_offset=src + i]
                i += 1

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


def stream_read(addr: PythonObject, n: PythonObject, out_addr: PythonObject) raises -> PythonObject:
    """Sum n floats at addr with every worker (4 accumulators each), partial sums to out_addr:
    the read bandwidth the decode kernel's thread pool can reach, for its roofline."""
    var x = _f32(Int64(Int(py=addr)))
    var total = Int(py=n)
    var sums = _f32(Int64(Int(py=out_addr)))
    var n_workers = num_physical_cores()
    var per = (total // n_workers) // (4 * W) * (4 * W)

    def work(w: Int) {imm x, imm sums, imm per}:
        var a0 = Vec(0)
        var a1 = Vec(0)
        var a2 = Vec(0)
        var a3 = Vec(0)
        var i = w * per
        var end = i + per
        while i < end:
            a0 += x.unsafe_load[width=W](i)
            a1 += x.unsafe_load[width=W](i + W)
            a2 += x.unsafe_load[width=W](i + 2 * W)
            a3 += x.unsafe_load[width=W](i + 3 * W)
            i += 4 * W
        sums[unsafe_offset=w] = (a0 + a1 + a2 + a3).reduce_add()

    parallelize(work, n_workers)
    return PythonObject(per * n_workers)


def workers() raises -> PythonObject:
    return PythonObject(num_physical_cores())


def scratch_per_worker(d: PythonObject, units: PythonObject) raises -> PythonObject:
    return PythonObject(scratch_floats(Int(py=d), Int(py=units)))


def tile_rows() raises -> PythonObject:
    return PythonObject(ROWS)


@export
def PyInit_attention() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("attention")
        m.def_function[store_kv]("store_kv")
        m.def_function[attention_prefill]("attention_prefill")
        m.def_function[attention_decode]("attention_decode")
        m.def_function[workers]("workers")
        m.def_function[stream_read]("stream_read")
        m.def_function[scratch_per_worker]("scratch_per_worker")
        m.def_function[tile_rows]("tile_rows")
        return m.finalize()
    except e:
        abort(String("failed to initialise the attention kernel module: ", e))
