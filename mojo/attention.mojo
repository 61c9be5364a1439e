# Paged attention for the CPU backend (float32): KV-cache writes, flash-style prefill and
# (split-K) decode over the block-paged cache of python/mojollm/backends/base.py:
#
#     k_cache, v_cache [num_blocks, B, KVH, D]; position p of sequence s lives in block
#     block_tables[s, p // B], row p % B.
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
#   sum_d K[j, d] * QT[d, :] is a broadcast-FMA over row vectors (no horizontal sums); with few
#   rows (decode), dot products over d. Softmax statistics are vectors over rows.
#   P.V: O[r, :] += sum_j P[j, r] * V[j, :], register-blocked 4 rows x 4 vectors.
# Threading: one parallel region per call; workers pull tiles from an atomic counter (causal
# tiles differ in cost) and each owns a slice of the scratch buffer passed in from Python.

from std.atomic import Atomic
from std.math import exp
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import num_physical_cores, simd_width_of

from max.algorithm import parallelize

comptime F32Ptr = Pointer[Float32, MutUntrackedOrigin]
comptime I32Ptr = Pointer[Int32, MutUntrackedOrigin]
comptime I64Ptr = Pointer[Int64, MutUntrackedOrigin]
comptime W = simd_width_of[DType.float32]()
comptime Vec = SIMD[DType.float32, W]
comptime ROWS = 4 * W  # query rows per tile (64 with AVX-512)
comptime BK = 64  # keys per online-softmax step
comptime DOT_ROWS = 8  # below this many rows, scores are dot products (decode)
comptime NEG: Float32 = -1.0e30  # "minus infinity" that keeps exp() and max() NaN-free
comptime SERIAL_FLOPS = 400_000  # below this a parallel region (~10 us) costs more than it saves


def _f32(addr: Int64) -> F32Ptr:
    return F32Ptr(unsafe_from_address=Int(addr))


def _i32(addr: Int64) -> I32Ptr:
    return I32Ptr(unsafe_from_address=Int(addr))


@always_inline
def _at(base: Int, floats: Int) -> F32Ptr:
    """Pointer to float number `floats` of the buffer at address `base`."""
    return F32Ptr(unsafe_from_address=base + 4 * floats)


def scratch_floats(d: Int) -> Int:
    """Floats of scratch one worker needs for head dim d (QT, O, S^T and four row vectors)."""
    return 2 * d * ROWS + BK * ROWS + 4 * ROWS


@fieldwise_init
struct Attn(ImplicitlyCopyable, Movable):
    """The operands shared by every tile of one call."""

    var q: F32Ptr  # [T, H, D]
    var kc: F32Ptr  # [NB, B, KVH, D]
    var vc: F32Ptr
    var bt: I32Ptr  # [S, M]
    var h: Int
    var kvh: Int
    var g: Int  # query heads per kv head
    var d: Int
    var b: Int
    var m: Int
    var scale: Float32


# ------------------------------------------------------------------ tile kernel


@always_inline
def _key_offsets(a: Attn, s: Int, kvh: Int, k0: Int, nk: Int, mut offs: Array[Int, BK]):
    """Element offsets of the K/V rows of positions k0..k0+nk-1 (no division per key)."""
    var blk = s * a.m + k0 // a.b
    var row = k0 % a.b
    for j in range(nk):
        offs[j] = ((Int(a.bt[unsafe_offset=blk]) * a.b + row) * a.kvh + kvh) * a.d
        row += 1
        if row == a.b:
            row = 0
            blk += 1


@always_inline
def _scores_transposed[NR: Int](a: Attn, qt: F32Ptr, st: F32Ptr, offs: Array[Int, BK], nk: Int):
    """S^T[j, r] = sum_d K[j, d] QT[d, r] for NR row vectors; 4 keys x NR vectors in registers."""
    var j = 0
    while j + 4 <= nk:
        var acc = Array[Vec, 4 * NR](fill=Vec(0))
        var o0 = offs[j]
        var o1 = offs[j + 1]
        var o2 = offs[j + 2]
        var o3 = offs[j + 3]
        for d in range(a.d):
            var k0 = Vec(a.kc[unsafe_offset=o0 + d])
            var k1 = Vec(a.kc[unsafe_offset=o1 + d])
            var k2 = Vec(a.kc[unsafe_offset=o2 + d])
            var k3 = Vec(a.kc[unsafe_offset=o3 + d])
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
    while j < nk:
        var acc = Array[Vec, NR](fill=Vec(0))
        var o = offs[j]
        for d in range(a.d):
            var k = Vec(a.kc[unsafe_offset=o + d])
            comptime for v in range(NR):
                acc[v] += k * qt.unsafe_load[width=W](d * ROWS + v * W)
        comptime for v in range(NR):
            st.unsafe_store(j * ROWS + v * W, acc[v])
        j += 1


@always_inline
def _scores_dot(a: Attn, qr: F32Ptr, st: F32Ptr, offs: Array[Int, BK], nk: Int, nrows: Int):
    """S^T[j, r] = q_r . K[j] for a few rows (decode): q rows are row-major in qr[r * D]."""
    var d = a.d
    for j in range(nk):
        var o = offs[j]
        st.unsafe_store(j * ROWS, Vec(0))  # padding lanes stay finite
        for r in range(nrows):
            var acc0 = Vec(0)
            var acc1 = Vec(0)
            var i = 0
            while i + 2 * W <= d:
                acc0 += qr.unsafe_load[width=W](r * d + i) * a.kc.unsafe_load[width=W](o + i)
                acc1 += qr.unsafe_load[width=W](r * d + i + W) * a.kc.unsafe_load[width=W](o + i + W)
                i += 2 * W
            if i + W <= d:
                acc0 += qr.unsafe_load[width=W](r * d + i) * a.kc.unsafe_load[width=W](o + i)
                i += W
            var sc = (acc0 + acc1).reduce_add()
            while i < d:
                sc += qr[unsafe_offset=r * d + i] * a.kc[unsafe_offset=o + i]
                i += 1
            st[unsafe_offset=j * ROWS + r] = sc


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
        var alpha = exp(m_old - m_new)
        var sum = Vec(0)
        for j in range(nk):
            var p = exp(st.unsafe_load[width=W](j * ROWS + v * W) - m_new)
            st.unsafe_store(j * ROWS + v * W, p)
            sum += p
        lv.unsafe_store(v * W, lv.unsafe_load[width=W](v * W) * alpha + sum)
        mv.unsafe_store(v * W, m_new)
        av.unsafe_store(v * W, alpha)


@always_inline
def _pv_rows[RG: Int](a: Attn, acc_buf: F32Ptr, st: F32Ptr, av: F32Ptr, offs: Array[Int, BK], nk: Int, r0: Int):
    """O[r0:r0+RG, :] = O * alpha + P^T[:, r0:r0+RG]^T . V (RG rows x 4 vectors in registers)."""
    var d = a.d
    var c0 = 0
    while c0 + 4 * W <= d:
        var acc = Array[Vec, 4 * RG](fill=Vec(0))
        comptime for ri in range(RG):
            var al = av[unsafe_offset=r0 + ri]
            comptime for cv in range(4):
                acc[ri * 4 + cv] = acc_buf.unsafe_load[width=W]((r0 + ri) * d + c0 + cv * W) * al
        for j in range(nk):
            var vo = offs[j] + c0
            var v0 = a.vc.unsafe_load[width=W](vo)
            var v1 = a.vc.unsafe_load[width=W](vo + W)
            var v2 = a.vc.unsafe_load[width=W](vo + 2 * W)
            var v3 = a.vc.unsafe_load[width=W](vo + 3 * W)
            comptime for ri in range(RG):
                var p = Vec(st[unsafe_offset=j * ROWS + r0 + ri])
                acc[ri * 4 + 0] += p * v0
                acc[ri * 4 + 1] += p * v1
                acc[ri * 4 + 2] += p * v2
                acc[ri * 4 + 3] += p * v3
        comptime for ri in range(RG):
            comptime for cv in range(4):
                acc_buf.unsafe_store((r0 + ri) * d + c0 + cv * W, acc[ri * 4 + cv])
        c0 += 4 * W
    while c0 + W <= d:
        var acc = Array[Vec, RG](fill=Vec(0))
        comptime for ri in range(RG):
            acc[ri] = acc_buf.unsafe_load[width=W]((r0 + ri) * d + c0) * av[unsafe_offset=r0 + ri]
        for j in range(nk):
            var vv = a.vc.unsafe_load[width=W](offs[j] + c0)
            comptime for ri in range(RG):
                acc[ri] += Vec(st[unsafe_offset=j * ROWS + r0 + ri]) * vv
        comptime for ri in range(RG):
            acc_buf.unsafe_store((r0 + ri) * d + c0, acc[ri])
        c0 += W
    while c0 < d:  # head dims that are not a multiple of the vector width
        comptime for ri in range(RG):
            var o = acc_buf[unsafe_offset=(r0 + ri) * d + c0] * av[unsafe_offset=r0 + ri]
            for j in range(nk):
                o += st[unsafe_offset=j * ROWS + r0 + ri] * a.vc[unsafe_offset=offs[j] + c0]
            acc_buf[unsafe_offset=(r0 + ri) * d + c0] = o
        c0 += 1


@always_inline
def _pv(a: Attn, acc_buf: F32Ptr, st: F32Ptr, av: F32Ptr, offs: Array[Int, BK], nk: Int, nrows: Int):
    var r0 = 0
    while r0 + 4 <= nrows:
        _pv_rows[4](a, acc_buf, st, av, offs, nk, r0)
        r0 += 4
    if r0 + 2 <= nrows:
        _pv_rows[2](a, acc_buf, st, av, offs, nk, r0)
        r0 += 2
    if r0 < nrows:
        _pv_rows[1](a, acc_buf, st, av, offs, nk, r0)


def _attend[NR: Int](a: Attn, sc: Int, s: Int, kvh: Int, tok0: Int, q_len: Int, ctx: Int,
                     f_lo: Int, nrows: Int, k_lo: Int, k_hi: Int):
    """Online-softmax attention of rows f_lo..f_lo+nrows-1 of (s, kvh) over keys [k_lo, k_hi).
    Row f is query f // G (token tok0 + f // G, position ctx - q_len + f // G) of head
    kvh * G + f % G. Leaves m, l and the unnormalised O of each row in the scratch at `sc`."""
    var d = a.d
    var qt = _at(sc, 0)
    var acc_buf = _at(sc, d * ROWS)
    var st = _at(sc, 2 * d * ROWS)
    var mv = _at(sc, 2 * d * ROWS + BK * ROWS)
    var lv = _at(sc, 2 * d * ROWS + BK * ROWS + ROWS)
    var av = _at(sc, 2 * d * ROWS + BK * ROWS + 2 * ROWS)
    var pv = _at(sc, 2 * d * ROWS + BK * ROWS + 3 * ROWS)
    var use_dot = nrows < DOT_ROWS

    var pos_min = ctx
    var pos_max = 0
    for r in range(NR * W):
        var f = f_lo + min(r, nrows - 1)  # padding rows repeat the last row's position
        var qi = f // a.g
        var pos = ctx - q_len + qi
        pv[unsafe_offset=r] = Float32(pos)
        pos_min = min(pos_min, pos)
        pos_max = max(pos_max, pos)
        mv[unsafe_offset=r] = NEG
        lv[unsafe_offset=r] = 0
        var src = ((tok0 + qi) * a.h + kvh * a.g + f % a.g) * d
        var real = r < nrows
        for i in range(d):
            var x = a.q[unsafe_offset=src + i] * a.scale if real else Float32(0)
            if use_dot:
                qt[unsafe_offset=r * d + i] = x
            else:
                qt[unsafe_offset=i * ROWS + r] = x
            acc_buf[unsafe_offset=r * d + i] = 0

    var offs = Array[Int, BK](fill=0)
    var k_end = min(k_hi, pos_max + 1)  # causal: no row sees past the tile's last position
    var k0 = k_lo
    while k0 < k_end:
        var nk = min(BK, k_end - k0)
        _key_offsets(a, s, kvh, k0, nk, offs)
        if use_dot:
            _scores_dot(a, qt, st, offs, nk, nrows)
        else:
            _scores_transposed[NR](a, qt, st, offs, nk)
        _online_softmax[NR](st, mv, lv, av, pv, k0, nk, k0 + nk - 1 > pos_min)
        _pv(a, acc_buf, st, av, offs, nk, nrows)
        k0 += nk


def _attend_rows(a: Attn, sc: Int, s: Int, kvh: Int, tok0: Int, q_len: Int, ctx: Int,
                 f_lo: Int, nrows: Int, k_lo: Int, k_hi: Int):
    """_attend with the row-vector count NR picked at run time."""
    var nr = (nrows + W - 1) // W
    if nr == 1:
        _attend[1](a, sc, s, kvh, tok0, q_len, ctx, f_lo, nrows, k_lo, k_hi)
    elif nr == 2:
        _attend[2](a, sc, s, kvh, tok0, q_len, ctx, f_lo, nrows, k_lo, k_hi)
    elif nr == 3:
        _attend[3](a, sc, s, kvh, tok0, q_len, ctx, f_lo, nrows, k_lo, k_hi)
    else:
        _attend[4](a, sc, s, kvh, tok0, q_len, ctx, f_lo, nrows, k_lo, k_hi)


def _write_rows(a: Attn, dst_buf: F32Ptr, sc: Int, kvh: Int, tok0: Int, f_lo: Int, nrows: Int):
    """out[token, head, :] = O[r] / l[r] for the tile's rows."""
    var d = a.d
    var acc_buf = _at(sc, d * ROWS)
    var lv = _at(sc, 2 * d * ROWS + BK * ROWS + ROWS)
    for r in range(nrows):
        var f = f_lo + r
        var dst = ((tok0 + f // a.g) * a.h + kvh * a.g + f % a.g) * d
        var inv = 1.0 / lv[unsafe_offset=r]
        var i = 0
        while i + W <= d:
            dst_buf.unsafe_store(dst + i, acc_buf.unsafe_load[width=W](r * d + i) * inv)
            i += W
        while i < d:
            dst_buf[unsafe_offset=dst + i] = acc_buf[unsafe_offset=r * d + i] * inv
            i += 1


def _write_partial(d: Int, part: F32Ptr, sc: Int, nrows: Int):
    """Split decode: keep (m, l, unnormalised O) of each row for the merge. part: [ROWS*(D+2)]."""
    var acc_buf = _at(sc, d * ROWS)
    var mv = _at(sc, 2 * d * ROWS + BK * ROWS)
    var lv = _at(sc, 2 * d * ROWS + BK * ROWS + ROWS)
    for r in range(nrows):
        part[unsafe_offset=r] = mv[unsafe_offset=r]
        part[unsafe_offset=ROWS + r] = lv[unsafe_offset=r]
        for i in range(d):
            part[unsafe_offset=2 * ROWS + r * d + i] = acc_buf[unsafe_offset=r * d + i]


def _empty_partial(part: F32Ptr, nrows: Int):
    for r in range(nrows):
        part[unsafe_offset=r] = NEG
        part[unsafe_offset=ROWS + r] = 0


# ------------------------------------------------------------------ entry points


def attention_prefill(meta_addr: PythonObject, scale: PythonObject) raises -> PythonObject:
    """Meta (int64): q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
    scratch, T, H, KVH, D, B, S, M, workers. Causal: query i of sequence s sits at position
    context_lens[s] - q_len + i and sees keys 0..that position."""
    var meta = I64Ptr(unsafe_from_address=Int(py=meta_addr))
    var h = Int(meta[unsafe_offset=9])
    var kvh_n = Int(meta[unsafe_offset=10])
    var d = Int(meta[unsafe_offset=11])
    var a = Attn(_f32(meta[unsafe_offset=0]), _f32(meta[unsafe_offset=1]), _f32(meta[unsafe_offset=2]),
                 _i32(meta[unsafe_offset=3]), h, kvh_n, h // kvh_n, d, Int(meta[unsafe_offset=12]),
                 Int(meta[unsafe_offset=14]), Float32(py=scale))
    var cu = _i32(meta[unsafe_offset=4])
    var ctx_lens = _i32(meta[unsafe_offset=5])
    var out = _f32(meta[unsafe_offset=6])
    var scratch = Int(meta[unsafe_offset=7])
    var n_seqs = Int(meta[unsafe_offset=13])
    var workers = Int(meta[unsafe_offset=15])
    var per_worker = scratch_floats(d)

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

    def worker(w: Int) {imm a, imm cu, imm ctx_lens, imm out, imm scratch, imm per_worker, imm first_job, imm n_jobs, imm n_seqs, imm next_job}:
        var sc = scratch + 4 * w * per_worker
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
            _attend_rows(a, sc, s, kvh, tok0, q_len, ctx, f_lo, nrows, 0, ctx)
            _write_rows(a, out, sc, kvh, tok0, f_lo, nrows)

    if n_workers <= 1:
        worker(0)
    else:
        parallelize(worker, n_workers)
    return PythonObject(None)


def attention_decode(meta_addr: PythonObject, scale: PythonObject) raises -> PythonObject:
    """Meta (int64): q, k_cache, v_cache, block_tables, context_lens, out, scratch, partial,
    S, H, KVH, D, B, M, n_splits, workers. One query per sequence at position ctx - 1. With
    n_splits > 1 each sequence's keys are cut into n_splits chunks (flash-decoding) whose
    partial softmaxes are merged at the end; partial holds S*KVH*row_tiles*n_splits slots of
    ROWS*(D+2) floats."""
    var meta = I64Ptr(unsafe_from_address=Int(py=meta_addr))
    var h = Int(meta[unsafe_offset=9])
    var kvh_n = Int(meta[unsafe_offset=10])
    var d = Int(meta[unsafe_offset=11])
    var a = Attn(_f32(meta[unsafe_offset=0]), _f32(meta[unsafe_offset=1]), _f32(meta[unsafe_offset=2]),
                 _i32(meta[unsafe_offset=3]), h, kvh_n, h // kvh_n, d, Int(meta[unsafe_offset=12]),
                 Int(meta[unsafe_offset=13]), Float32(py=scale))
    var ctx_lens = _i32(meta[unsafe_offset=4])
    var out = _f32(meta[unsafe_offset=5])
    var scratch = Int(meta[unsafe_offset=6])
    var part = Int(meta[unsafe_offset=7])
    var n_seqs = Int(meta[unsafe_offset=8])
    var n_splits = Int(meta[unsafe_offset=14])
    var workers = Int(meta[unsafe_offset=15])
    var per_worker = scratch_floats(d)
    var row_tiles = (a.g + ROWS - 1) // ROWS
    var slot = ROWS * (d + 2)

    var flops = 0
    for s in range(n_seqs):
        flops += 4 * h * Int(ctx_lens[unsafe_offset=s]) * d
    var n_jobs = n_seqs * kvh_n * row_tiles * n_splits
    var n_workers = 1 if flops < SERIAL_FLOPS else min(workers, n_jobs)

    var counter = Atomic[Int64](0)
    var next_job = Pointer(to=counter)

    def worker(w: Int) {imm a, imm ctx_lens, imm out, imm scratch, imm part, imm per_worker, imm n_jobs, imm n_splits, imm row_tiles, imm slot, imm next_job}:
        var sc = scratch + 4 * w * per_worker
        while True:
            var job = Int(next_job[].fetch_add(1))
            if job >= n_jobs:
                break
            var c = job % n_splits
            var rest = job // n_splits
            var f_lo = (rest % row_tiles) * ROWS
            rest //= row_tiles
            var kvh = rest % a.kvh
            var s = rest // a.kvh
            var nrows = min(ROWS, a.g - f_lo)
            var ctx = Int(ctx_lens[unsafe_offset=s])
            if n_splits == 1:
                _attend_rows(a, sc, s, kvh, s, 1, ctx, f_lo, nrows, 0, ctx)
                _write_rows(a, out, sc, kvh, s, f_lo, nrows)
                continue
            # Chunks are whole BK key blocks so that every chunk but the last is full.
            var chunk = ((ctx + n_splits - 1) // n_splits + BK - 1) // BK * BK
            var k_lo = c * chunk
            var k_hi = min(ctx, k_lo + chunk)
            var dst = _at(part, job * slot)
            if k_lo >= k_hi:
                _empty_partial(dst, nrows)
            else:
                _attend_rows(a, sc, s, kvh, s, 1, ctx, f_lo, nrows, k_lo, k_hi)
                _write_partial(a.d, dst, sc, nrows)

    if n_workers <= 1:
        worker(0)
    else:
        parallelize(worker, n_workers)

    if n_splits > 1:
        _merge_splits(a, out, part, n_seqs, n_splits, row_tiles, slot)
    return PythonObject(None)


def _merge_splits(a: Attn, dst_buf: F32Ptr, part: Int, n_seqs: Int, n_splits: Int, row_tiles: Int, slot: Int):
    """out = sum_c e^(m_c - M) O_c / sum_c e^(m_c - M) l_c over the chunks c of each row."""
    var d = a.d
    for s in range(n_seqs):
        for kvh in range(a.kvh):
            for t in range(row_tiles):
                var f_lo = t * ROWS
                var job0 = ((s * a.kvh + kvh) * row_tiles + t) * n_splits
                for r in range(min(ROWS, a.g - f_lo)):
                    var m_all = NEG
                    for c in range(n_splits):
                        m_all = max(m_all, _at(part, (job0 + c) * slot)[unsafe_offset=r])
                    var dst = (s * a.h + kvh * a.g + f_lo + r) * d
                    for i in range(d):
                        dst_buf[unsafe_offset=dst + i] = 0
                    var l_all: Float32 = 0
                    for c in range(n_splits):
                        var p = _at(part, (job0 + c) * slot)
                        var l_c = p[unsafe_offset=ROWS + r]
                        if l_c == 0:  # an empty chunk (short sequence)
                            continue
                        var wgt = exp(p[unsafe_offset=r] - m_all)
                        l_all += l_c * wgt
                        for i in range(d):
                            dst_buf[unsafe_offset=dst + i] += wgt * p[unsafe_offset=2 * ROWS + r * d + i]
                    var inv = 1.0 / l_all
                    for i in range(d):
                        dst_buf[unsafe_offset=dst + i] *= inv


def store_kv(meta_addr: PythonObject) raises -> PythonObject:
    """Meta (int64): k_cache, v_cache, k, v, slot_mapping, T, row (= KVH * D).
    k_cache.reshape(-1, row)[slot_mapping[t]] = k[t], likewise v."""
    var meta = I64Ptr(unsafe_from_address=Int(py=meta_addr))
    var kc = _f32(meta[unsafe_offset=0])
    var vc = _f32(meta[unsafe_offset=1])
    var k = _f32(meta[unsafe_offset=2])
    var v = _f32(meta[unsafe_offset=3])
    var slots = I64Ptr(unsafe_from_address=Int(meta[unsafe_offset=4]))
    var t_n = Int(meta[unsafe_offset=5])
    var row = Int(meta[unsafe_offset=6])
    var chunks = 1 if t_n * row < (1 << 16) else min(t_n, 4 * num_physical_cores())
    var per = (t_n + chunks - 1) // chunks

    def work(c: Int) {imm kc, imm vc, imm k, imm v, imm slots, imm t_n, imm row, imm per}:
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


def workers() raises -> PythonObject:
    return PythonObject(num_physical_cores())


def scratch_per_worker(d: PythonObject) raises -> PythonObject:
    return PythonObject(scratch_floats(Int(py=d)))


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
        m.def_function[scratch_per_worker]("scratch_per_worker")
        m.def_function[tile_rows]("tile_rows")
        return m.finalize()
    except e:
        abort(String("failed to initialise the attention kernel module: ", e))
