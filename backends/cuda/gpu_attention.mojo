# Paged attention over the KV cache [num_blocks, B, KVH, D]: prefill (causal flash attention over
# variable-length sequences) and decode (one query per sequence, split-K flash decoding).
#
# Semantics (Backend.attention_prefill): sequence s owns query rows cu[s]..cu[s+1]; they are its
# last q_len positions, so query i sits at position ctx - q_len + i and sees keys 0..that position.
# Key p of sequence s lives in physical block bt[s, p // B], row p % B.
#
# GQA: the G = H / KVH query heads sharing a kv head are processed by the same block, so every
# K/V tile is read from memory once for all of them. A block's query "rows" are (position, head)
# pairs r = i * G + g.

from std.math import ceildiv, exp, exp2, log
from std.memory import stack_allocation
from std.sys import size_of, is_nvidia_gpu
from std.utils.numerics import neg_inf
from max.gpu import thread_idx, block_idx, block_dim, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory,
)
from max.gpu.compute.mma import mma, ld_matrix

from gpu_common import SharedPtr, Ptr, F32P, I32P, flag, ERR_BLOCK, ERR_CONTEXT

comptime LOG2E: Float32 = 1.4426950408889634


@always_inline
def _find_tile(cu: I32P, S: Int, P: Int, b: Int, mut s_out: Int, mut tile_out: Int):
    """Block b of the flattened (sequence, query tile) grid -> (s, tile); s = -1 past the end."""
    var seen = 0
    s_out = -1
    tile_out = 0
    for s in range(S):
        var qlen = Int(cu[unsafe_offset=s + 1]) - Int(cu[unsafe_offset=s])
        var nt = ceildiv(qlen, P) if qlen > 0 else 0
        if b < seen + nt:
            s_out = s
            tile_out = b - seen
            return
        seen += nt


@always_inline
def _seq_ok(qstart: Int, qlen: Int, ctx: Int, T: Int, cap: Int) -> Bool:
    return qstart >= 0 and qstart + qlen <= T and ctx >= qlen and ctx <= cap


# ---- prefill, SIMT (float32 caches; the portable path) ----------------------------------------
comptime SP_ROWS = 32  # query rows per block: 8 rows per warp, 4 threads per row
comptime SP_TK = 16  # keys per tile
comptime SP_THREADS = 128


def attn_prefill_simt_kernel[qdt: DType, cdt: DType, D: Int](
    q: Ptr[qdt], kc: Ptr[cdt], vc: Ptr[cdt], dst: Ptr[qdt], bt: I32P, cu: I32P, cl: I32P, err: I32P,
    S: Int64, T: Int64, H: Int64, KVH: Int64, M: Int64, B: Int64, NB: Int64, scale: Float32,
):
    comptime QLD = D + 1
    comptime KLD = D + 1
    comptime PLD = SP_TK + 1
    var Qs = stack_allocation[SP_ROWS * QLD, Float32, address_space=AddressSpace.SHARED]()
    var Ks = stack_allocation[SP_TK * KLD, Float32, address_space=AddressSpace.SHARED]()
    var Vs = stack_allocation[SP_TK * D, Float32, address_space=AddressSpace.SHARED]()
    var Ps = stack_allocation[SP_ROWS * PLD, Float32, address_space=AddressSpace.SHARED]()
    var tid = thread_idx.x
    var h = block_idx.y
    var hh = Int(H)
    var kvh = Int(KVH)
    var G = hh // kvh
    var P = SP_ROWS // G
    var m_ = Int(M)
    var b_ = Int(B)
    var nb = Int(NB)
    var s = 0
    var tile = 0
    _find_tile(cu, Int(S), P, block_idx.x, s, tile)
    if s < 0:
        return
    var qstart = Int(cu[unsafe_offset=s])
    var qlen = Int(cu[unsafe_offset=s + 1]) - qstart
    var ctx = Int(cl[unsafe_offset=s])
    if not _seq_ok(qstart, qlen, ctx, Int(T), m_ * b_):
        if tid == 0:
            flag(err, ERR_CONTEXT)
        return
    var p0 = tile * P
    var npos = min(P, qlen - p0)
    var rows = npos * G
    var off = ctx - qlen
    var last_key = off + p0 + npos - 1

    for e in range(tid, SP_ROWS * D, SP_THREADS):
        var r = e // D
        var dd = e % D
        var v: Float32 = 0
        if r < rows:
            var qrow = (qstart + p0 + r // G) * hh + h * G + r % G
            v = q[unsafe_offset=qrow * D + dd].cast[DType.float32]() * scale
        Qs[unsafe_offset=r * QLD + dd] = v

    var r = tid // 4
    var kg = tid % 4
    var my_pos = off + p0 + r // G
    var row_ok = r < rows
    var m_run = neg_inf[DType.float32]()
    var l_run: Float32 = 0
    var o = Array[Float32, D // 4](fill=0)  # d = kg + 4 i (D/4 need not be a power of two)

    for k0 in range(0, last_key + 1, SP_TK):
        barrier()
        for e in range(tid, SP_TK * D, SP_THREADS):
            var j = e // D
            var dd = e % D
            var key = k0 + j
            var kv: Float32 = 0
            var vv: Float32 = 0
            if key <= last_key:
                var blk = Int(bt[unsafe_offset=s * m_ + key // b_])
                if blk < 0 or blk >= nb:
                    flag(err, ERR_BLOCK)
                else:
                    var idx = ((blk * b_ + key % b_) * kvh + h) * D + dd
                    kv = kc[unsafe_offset=idx].cast[DType.float32]()
                    vv = vc[unsafe_offset=idx].cast[DType.float32]()
            Ks[unsafe_offset=j * KLD + dd] = kv
            Vs[unsafe_offset=j * D + dd] = vv
        barrier()
        var sc = SIMD[DType.float32, 4](0)
        for dd in range(D):
            var qv = Qs[unsafe_offset=r * QLD + dd]
            comptime for i in range(4):
                sc[i] += qv * Ks[unsafe_offset=(kg * 4 + i) * KLD + dd]
        comptime for i in range(4):
            if not row_ok or k0 + kg * 4 + i > my_pos:
                sc[i] = neg_inf[DType.float32]()
        var mt = sc.reduce_max()
        mt = max(mt, warp.shuffle_xor(mt, UInt32(1)))
        mt = max(mt, warp.shuffle_xor(mt, UInt32(2)))
        var m_new = max(m_run, mt)
        var alpha: Float32 = 1
        var p = SIMD[DType.float32, 4](0)
        if m_new != neg_inf[DType.float32]():
            alpha = exp(m_run - m_new)
            comptime for i in range(4):
                p[i] = exp(sc[i] - m_new)
        var ls = p.reduce_add()
        ls += warp.shuffle_xor(ls, UInt32(1))
        ls += warp.shuffle_xor(ls, UInt32(2))
        l_run = l_run * alpha + ls
        m_run = m_new
        comptime for i in range(D // 4):
            o[i] *= alpha
        comptime for i in range(4):
            Ps[unsafe_offset=r * PLD + kg * 4 + i] = p[i]
        barrier()
        for j in range(SP_TK):
            var pj = Ps[unsafe_offset=r * PLD + j]
            comptime for i in range(D // 4):
                o[i] += pj * Vs[unsafe_offset=j * D + kg + 4 * i]

    if row_ok:
        var qrow = (qstart + p0 + r // G) * hh + h * G + r % G
        var inv: Float32 = 1.0 / l_run if l_run > 0 else 0
        comptime for i in range(D // 4):
            dst[unsafe_offset=qrow * D + kg + 4 * i] = (o[i] * inv).cast[qdt]()


# ---- prefill, tensor cores (NVIDIA, 16-bit caches): FlashAttention-2 with mma.sync ------------
comptime FA_ROWS = 64  # 4 warps x 16 query rows
comptime FA_TK = 64  # keys per tile
comptime FA_THREADS = 128


@always_inline
def _fa_load_kv[cdt: DType, D: Int](
    cache: Ptr[cdt], smem: SharedPtr[cdt],
    bt: I32P, err: I32P, s: Int, m_: Int, b_: Int, nb: Int, kvh: Int, h: Int, k0: Int, last_key: Int,
):
    comptime LD = D + 8
    comptime CPK = D // 8  # 16-byte chunks per key
    comptime PER_THREAD = FA_TK * CPK // FA_THREADS
    comptime for i in range(PER_THREAD):
        var c = thread_idx.x + FA_THREADS * i
        var j = c // CPK
        var part = c % CPK
        var key = k0 + j
        var ok = key <= last_key
        var src = 0
        if ok:
            var blk = Int(bt[unsafe_offset=s * m_ + key // b_])
            if blk < 0 or blk >= nb:
                flag(err, ERR_BLOCK)
                ok = False
            else:
                src = ((blk * b_ + key % b_) * kvh + h) * D + part * 8
        async_copy[16, fill=Scalar[cdt](0)](
            cache.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
            smem.unsafe_offset(j * LD + part * 8),
            src_size=Int32(16 if ok else 0),
        )


def attn_prefill_mma_kernel[qdt: DType, cdt: DType, D: Int](
    q: Ptr[qdt], kc: Ptr[cdt], vc: Ptr[cdt], dst: Ptr[qdt], bt: I32P, cu: I32P, cl: I32P, err: I32P,
    S: Int64, T: Int64, H: Int64, KVH: Int64, M: Int64, B: Int64, NB: Int64, scale: Float32,
):
    comptime assert is_nvidia_gpu(), "attn_prefill_mma_kernel needs NVIDIA tensor cores"
    comptime LD = D + 8  # 16-byte row padding: conflict-free ldmatrix
    comptime NT_D = D // 8  # n8 tiles over the head dim
    comptime TILE = FA_TK * LD
    # (cp.async needs `fill` to honour src_size: without it a zero-size copy still reads 16 bytes.)
    # Two stages of (K tile, V tile): tile t + 1 streams in while tile t is used.
    var smem = external_memory[Scalar[cdt], address_space=AddressSpace.SHARED, alignment=16]()
    var tid = thread_idx.x
    var lane = lane_id()
    var warp_id = tid // WARP_SIZE
    var h = block_idx.y
    var hh = Int(H)
    var kvh = Int(KVH)
    var G = hh // kvh
    var P = FA_ROWS // G
    var m_ = Int(M)
    var b_ = Int(B)
    var nb = Int(NB)
    var s = 0
    var tile = 0
    _find_tile(cu, Int(S), P, block_idx.x, s, tile)
    if s < 0:
        return
    var qstart = Int(cu[unsafe_offset=s])
    var qlen = Int(cu[unsafe_offset=s + 1]) - qstart
    var ctx = Int(cl[unsafe_offset=s])
    if not _seq_ok(qstart, qlen, ctx, Int(T), m_ * b_):
        if tid == 0:
            flag(err, ERR_CONTEXT)
        return
    var p0 = tile * P
    var npos = min(P, qlen - p0)
    var rows = npos * G
    var off = ctx - qlen
    var last_key = off + p0 + npos - 1

    # Q (unscaled, rounded to the cache type) -> smem (borrowing stage 1) -> A fragments.
    var Qst = smem.unsafe_offset(2 * TILE)
    for e in range(tid, FA_ROWS * D, FA_THREADS):
        var r = e // D
        var dd = e % D
        var v: Float32 = 0
        if r < rows:
            var qrow = (qstart + p0 + r // G) * hh + h * G + r % G
            v = q[unsafe_offset=qrow * D + dd].cast[DType.float32]()
        Qst[unsafe_offset=r * LD + dd] = v.cast[cdt]()
    barrier()
    var qf = Array[SIMD[cdt, 8], D // 16](fill=SIMD[cdt, 8](0))
    comptime for kk in range(D // 16):
        qf[kk] = ld_matrix[8](Qst.unsafe_offset((warp_id * 16 + lane % 16) * LD + kk * 16 + (lane // 16) * 8))
    barrier()

    # This thread's two rows of the warp's 16: ra = lane/4 and ra + 8.
    var ra = warp_id * 16 + lane // 4
    var rb = ra + 8
    var ok_a = ra < rows
    var ok_b = rb < rows
    var pos_a = off + p0 + ra // G
    var pos_b = off + p0 + rb // G
    var m_a = neg_inf[DType.float32]()
    var m_b = neg_inf[DType.float32]()
    var l_a: Float32 = 0
    var l_b: Float32 = 0
    var o = SIMD[DType.float32, NT_D * 4](0)
    var s2 = scale * LOG2E
    var n_tiles = ceildiv(last_key + 1, FA_TK)

    _fa_load_kv[cdt, D](kc, smem, bt, err, s, m_, b_, nb, kvh, h, 0, last_key)
    _fa_load_kv[cdt, D](vc, smem.unsafe_offset(TILE), bt, err, s, m_, b_, nb, kvh, h, 0, last_key)
    async_copy_commit_group()
    var first_pos = off + p0  # smallest query position of the block: tiles below it need no mask

    for t in range(n_tiles):
        if t + 1 < n_tiles:
            var nx = smem.unsafe_offset(((t + 1) % 2) * 2 * TILE)
            _fa_load_kv[cdt, D](kc, nx, bt, err, s, m_, b_, nb, kvh, h, (t + 1) * FA_TK, last_key)
            _fa_load_kv[cdt, D](vc, nx.unsafe_offset(TILE), bt, err, s, m_, b_, nb, kvh, h, (t + 1) * FA_TK, last_key)
            async_copy_commit_group()
            async_copy_wait_group(1)  # tile t landed; t + 1 in flight
        else:
            async_copy_wait_group(0)
        barrier()
        var Ks = smem.unsafe_offset((t % 2) * 2 * TILE)
        var Vs = Ks.unsafe_offset(TILE)
        var sacc = SIMD[DType.float32, 32](0)  # 8 n8 tiles over the 64 keys
        comptime for kk in range(D // 16):
            comptime for nj in range(4):
                var krow = nj * 16 + (lane % 8) + (lane // 16) * 8
                var bfr = ld_matrix[8](Ks.unsafe_offset(krow * LD + kk * 16 + ((lane // 8) % 2) * 8))
                comptime for hf in range(2):
                    comptime o_ = (nj * 2 + hf) * 4
                    var cf = sacc.slice[4, offset=o_]()
                    mma(cf, qf[kk], bfr.slice[4, offset=hf * 4](), cf)
                    sacc = sacc.insert[offset=o_](cf)

        # Online softmax in base 2 on the fragment: c0, c1 belong to row ra, c2, c3 to row rb.
        # Rows past `rows` hold q = 0: finite scores, never stored.
        sacc *= s2
        if t * FA_TK + FA_TK - 1 > first_pos:  # the tile crosses the causal diagonal
            var kb = t * FA_TK + (lane % 4) * 2
            comptime for ni in range(8):
                comptime for e in range(4):
                    var key = kb + ni * 8 + (e % 2)
                    comptime if e < 2:
                        if key > pos_a:
                            sacc[ni * 4 + e] = neg_inf[DType.float32]()
                    else:
                        if key > pos_b:
                            sacc[ni * 4 + e] = neg_inf[DType.float32]()
        var mt_a = neg_inf[DType.float32]()
        var mt_b = neg_inf[DType.float32]()
        comptime for ni in range(8):
            mt_a = max(mt_a, max(sacc[ni * 4 + 0], sacc[ni * 4 + 1]))
            mt_b = max(mt_b, max(sacc[ni * 4 + 2], sacc[ni * 4 + 3]))
        mt_a = max(mt_a, warp.shuffle_xor(mt_a, UInt32(1)))
        mt_a = max(mt_a, warp.shuffle_xor(mt_a, UInt32(2)))
        mt_b = max(mt_b, warp.shuffle_xor(mt_b, UInt32(1)))
        mt_b = max(mt_b, warp.shuffle_xor(mt_b, UInt32(2)))
        var mn_a = max(m_a, mt_a)
        var mn_b = max(m_b, mt_b)
        # A row with no visible key yet keeps m = -inf: use 0 as the shift so exp2 gives 0, not NaN.
        var sh_a = mn_a if mn_a != neg_inf[DType.float32]() else 0
        var sh_b = mn_b if mn_b != neg_inf[DType.float32]() else 0
        var al_a = exp2(m_a - sh_a)
        var al_b = exp2(m_b - sh_b)
        m_a = mn_a
        m_b = mn_b
        var ps_a: Float32 = 0
        var ps_b: Float32 = 0
        comptime for ni in range(8):
            comptime for e in range(4):
                comptime if e < 2:
                    var p = exp2(sacc[ni * 4 + e] - sh_a)
                    sacc[ni * 4 + e] = p
                    ps_a += p
                else:
                    var p = exp2(sacc[ni * 4 + e] - sh_b)
                    sacc[ni * 4 + e] = p
                    ps_b += p
        l_a = l_a * al_a + ps_a
        l_b = l_b * al_b + ps_b
        comptime for ni in range(NT_D):
            o[ni * 4 + 0] *= al_a
            o[ni * 4 + 1] *= al_a
            o[ni * 4 + 2] *= al_b
            o[ni * 4 + 3] *= al_b

        comptime for kk in range(FA_TK // 16):
            # The S accumulator layout of n-tiles 2kk, 2kk+1 is exactly the A-fragment layout of P.
            var pa = SIMD[DType.float32, 8](
                sacc[(2 * kk) * 4 + 0], sacc[(2 * kk) * 4 + 1], sacc[(2 * kk) * 4 + 2], sacc[(2 * kk) * 4 + 3],
                sacc[(2 * kk + 1) * 4 + 0], sacc[(2 * kk + 1) * 4 + 1],
                sacc[(2 * kk + 1) * 4 + 2], sacc[(2 * kk + 1) * 4 + 3],
            ).cast[cdt]()
            comptime for dj in range(D // 16):
                var vrow = kk * 16 + (lane % 8) + ((lane // 8) % 2) * 8
                var bfr = ld_matrix[8, transpose=True](Vs.unsafe_offset(vrow * LD + dj * 16 + (lane // 16) * 8))
                comptime for hf in range(2):
                    comptime o_ = (dj * 2 + hf) * 4
                    var cf = o.slice[4, offset=o_]()
                    mma(cf, pa, bfr.slice[4, offset=hf * 4](), cf)
                    o = o.insert[offset=o_](cf)
        barrier()  # everyone is done with this stage before it is refilled

    l_a += warp.shuffle_xor(l_a, UInt32(1))
    l_a += warp.shuffle_xor(l_a, UInt32(2))
    l_b += warp.shuffle_xor(l_b, UInt32(1))
    l_b += warp.shuffle_xor(l_b, UInt32(2))
    var inv_a: Float32 = 1.0 / l_a if l_a > 0 else 0
    var inv_b: Float32 = 1.0 / l_b if l_b > 0 else 0
    var qa = (qstart + p0 + ra // G) * hh + h * G + ra % G
    var qb = (qstart + p0 + rb // G) * hh + h * G + rb % G
    comptime for ni in range(NT_D):
        var col = ni * 8 + (lane % 4) * 2
        if ok_a:
            dst[unsafe_offset=qa * D + col] = (o[ni * 4 + 0] * inv_a).cast[qdt]()
            dst[unsafe_offset=qa * D + col + 1] = (o[ni * 4 + 1] * inv_a).cast[qdt]()
        if ok_b:
            dst[unsafe_offset=qb * D + col] = (o[ni * 4 + 2] * inv_b).cast[qdt]()
            dst[unsafe_offset=qb * D + col + 1] = (o[ni * 4 + 3] * inv_b).cast[qdt]()


# ---- decode: one query per sequence, split-K over the context ---------------------------------
# Block (kv head, sequence, split) = 4 warps. K/V tiles of DEC_TK keys stream through shared
# memory with cp.async, two stages deep (the next tile loads while this one is used), as 16-byte
# chunks (each chunk's cache address is looked up once). Scores: one thread per (head, key), with
# 16-byte shared reads along the key row (rows padded by 16 bytes). Output: each thread owns
# (head, 4 features) accumulators in registers.
comptime DEC_TK = 32  # keys per tile: one per lane in the softmax
comptime DEC_THREADS = 128
comptime DEC_MAX_G = 16
comptime DEC_MAX_OWN = 4  # (head, 4-feature) chunks per thread: G * D / 4 <= 4 * 128


def prefill_mma_smem_bytes[D: Int]() -> Int:
    return 4 * FA_TK * (D + 8) * 2


def decode_smem_bytes[cdt: DType, D: Int](G: Int) -> Int:
    comptime VW = 16 // size_of[cdt]()
    comptime LD = D + VW
    return 2 * 2 * DEC_TK * LD * size_of[cdt]() + (G * D + G * DEC_TK + 3 * G) * 4 + 16


@always_inline
def _dec_load_tile[cdt: DType, D: Int](
    kc: Ptr[cdt], vc: Ptr[cdt], ks: SharedPtr[cdt], vs: SharedPtr[cdt], bt: I32P, err: I32P,
    s: Int, m_: Int, b_: Int, nb: Int, kvh: Int, h: Int, k0: Int, k_hi: Int,
):
    comptime VW = 16 // size_of[cdt]()
    comptime LD = D + VW
    comptime CPK = D // VW
    for c in range(thread_idx.x, DEC_TK * CPK, DEC_THREADS):
        var j = c // CPK
        var part = c % CPK
        var key = k0 + j
        var ok = key < k_hi
        var src = 0
        if ok:
            var blk = Int(bt[unsafe_offset=s * m_ + key // b_])
            if blk < 0 or blk >= nb:
                flag(err, ERR_BLOCK)
                ok = False
            else:
                src = ((blk * b_ + key % b_) * kvh + h) * D + part * VW
        async_copy[16, fill=Scalar[cdt](0)](kc.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                       ks.unsafe_offset(j * LD + part * VW), src_size=Int32(16 if ok else 0))
        async_copy[16, fill=Scalar[cdt](0)](vc.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                       vs.unsafe_offset(j * LD + part * VW), src_size=Int32(16 if ok else 0))


def attn_decode_kernel[qdt: DType, cdt: DType, D: Int](
    q: Ptr[qdt], kc: Ptr[cdt], vc: Ptr[cdt], dst: Ptr[qdt], part_o: F32P, part_lse: F32P,
    bt: I32P, cl: I32P, err: I32P, H: Int64, KVH: Int64, M: Int64, B: Int64, NB: Int64,
    splits: Int64, chunk: Int64, scale: Float32,
):
    """Block (kv head h, sequence s, split sp) attends the G query heads of h over keys
    [sp * chunk, min(ctx, (sp + 1) * chunk)). With one split it writes the output directly,
    else a normalised partial output and its log-sum-exp for attn_combine_kernel."""
    comptime VW = 16 // size_of[cdt]()
    comptime LD = D + VW
    comptime TILE = DEC_TK * LD
    comptime D4 = D // 4
    var h = block_idx.x
    var s = block_idx.y
    var sp = block_idx.z
    var tid = thread_idx.x
    var lane = lane_id()
    var warp_id = tid // WARP_SIZE
    comptime NWARPS = DEC_THREADS // WARP_SIZE
    var hh = Int(H)
    var kvh = Int(KVH)
    var G = hh // kvh
    var m_ = Int(M)
    var b_ = Int(B)
    var nb = Int(NB)
    var nsp = Int(splits)

    var kv_smem = external_memory[Scalar[cdt], address_space=AddressSpace.SHARED, alignment=16]()
    var Kb = kv_smem  # [2][TK][LD]
    var Vb = kv_smem.unsafe_offset(2 * TILE)  # [2][TK][LD]
    var fbase = kv_smem.unsafe_offset(4 * TILE).unsafe_bitcast[Float32]()
    var Qs = fbase  # [G][D] scaled query
    var Ss = fbase.unsafe_offset(G * D)  # [G][TK] scores, then probabilities
    var Ms = Ss.unsafe_offset(G * DEC_TK)  # [G] running max
    var Ls = Ms.unsafe_offset(G)  # [G] running sum
    var As = Ls.unsafe_offset(G)  # [G] this tile's rescale factor

    var ctx = Int(cl[unsafe_offset=s])
    if ctx < 0 or ctx > m_ * b_:
        if tid == 0:
            flag(err, ERR_CONTEXT)
        ctx = 0
    var k_lo = sp * Int(chunk)
    var k_hi = min(ctx, k_lo + Int(chunk))
    var n_tiles = ceildiv(k_hi - k_lo, DEC_TK) if k_hi > k_lo else 0

    if n_tiles > 0:
        _dec_load_tile[cdt, D](kc, vc, Kb, Vb, bt, err, s, m_, b_, nb, kvh, h, k_lo, k_hi)
    async_copy_commit_group()
    for e in range(tid, G * D, DEC_THREADS):
        Qs[unsafe_offset=e] = q[unsafe_offset=(s * hh + h * G) * D + e].cast[DType.float32]() * scale
    for g in range(tid, G, DEC_THREADS):
        Ms[unsafe_offset=g] = neg_inf[DType.float32]()
        Ls[unsafe_offset=g] = 0

    var acc = Array[SIMD[DType.float32, 4], DEC_MAX_OWN](fill=SIMD[DType.float32, 4](0))
    var n_own = G * D4

    for t in range(n_tiles):
        var st = t % 2
        if t + 1 < n_tiles:
            var nx = (t + 1) % 2
            _dec_load_tile[cdt, D](kc, vc, Kb.unsafe_offset(nx * TILE), Vb.unsafe_offset(nx * TILE), bt, err,
                                   s, m_, b_, nb, kvh, h, k_lo + (t + 1) * DEC_TK, k_hi)
            async_copy_commit_group()
            async_copy_wait_group(1)
        else:
            async_copy_wait_group(0)
        barrier()
        var kt = Kb.unsafe_offset(st * TILE)
        var vt = Vb.unsafe_offset(st * TILE)
        var k0 = k_lo + t * DEC_TK
        # scores: thread -> (head g, key j)
        for pr in range(tid, G * DEC_TK, DEC_THREADS):
            var g = pr // DEC_TK
            var j = pr % DEC_TK
            var sc = SIMD[DType.float32, VW](0)
            comptime for c in range(D // VW):
                var kv = kt.unsafe_load[width=VW, alignment=16](j * LD + c * VW).cast[DType.float32]()
                var qv = Qs.unsafe_load[width=VW, alignment=16](g * D + c * VW)
                sc += kv * qv
            Ss[unsafe_offset=pr] = sc.reduce_add() if k0 + j < k_hi else neg_inf[DType.float32]()
        barrier()
        for g in range(warp_id, G, NWARPS):
            var v = neg_inf[DType.float32]()
            if lane < DEC_TK:
                v = Ss[unsafe_offset=g * DEC_TK + lane]
            var m_old = Ms[unsafe_offset=g]
            var m_new = max(m_old, warp.max(v))  # a tile's first key is always visible: finite
            var p: Float32 = 0
            if lane < DEC_TK:
                p = exp(v - m_new)
                Ss[unsafe_offset=g * DEC_TK + lane] = p
            var ls = warp.sum(p)
            if lane == 0:
                var alpha = exp(m_old - m_new)
                As[unsafe_offset=g] = alpha
                Ls[unsafe_offset=g] = Ls[unsafe_offset=g] * alpha + ls
                Ms[unsafe_offset=g] = m_new
        barrier()
        comptime for i in range(DEC_MAX_OWN):
            var oc = tid + DEC_THREADS * i
            if oc < n_own:
                var g = oc // D4
                var d0 = (oc % D4) * 4
                var a = acc[i] * As[unsafe_offset=g]
                for j in range(DEC_TK):
                    var vv = vt.unsafe_load[width=4, alignment=4 * size_of[cdt]()](j * LD + d0)
                    a += Ss[unsafe_offset=g * DEC_TK + j] * vv.cast[DType.float32]()
                acc[i] = a
        barrier()  # the stage just read is refilled next iteration; Ss and As are rewritten

    barrier()  # (no tiles: Ms / Ls initialised by other threads)
    comptime for i in range(DEC_MAX_OWN):
        var oc = tid + DEC_THREADS * i
        if oc < n_own:
            var g = oc // D4
            var d0 = (oc % D4) * 4
            var l = Ls[unsafe_offset=g]
            var o = acc[i] / l if l > 0 else SIMD[DType.float32, 4](0)
            var head = s * hh + h * G + g
            if nsp == 1:
                comptime for e in range(4):
                    dst[unsafe_offset=head * D + d0 + e] = o[e].cast[qdt]()
            else:
                comptime for e in range(4):
                    part_o[unsafe_offset=(head * nsp + sp) * D + d0 + e] = o[e]
                if d0 == 0:
                    part_lse[unsafe_offset=head * nsp + sp] = (
                        Ms[unsafe_offset=g] + log(l) if l > 0 else neg_inf[DType.float32]()
                    )


def attn_combine_kernel[qdt: DType](part_o: F32P, part_lse: F32P, dst: Ptr[qdt], splits: Int64, D: Int64):
    """out[row] = sum_i w_i o_i / sum_i w_i with w_i = exp(lse_i - max lse) over the splits."""
    var row = block_idx.x
    var nsp = Int(splits)
    var dd_ = Int(D)
    var mx = neg_inf[DType.float32]()
    for i in range(nsp):
        mx = max(mx, part_lse[unsafe_offset=row * nsp + i])
    for dd in range(thread_idx.x, dd_, block_dim.x):
        var acc: Float32 = 0
        var wsum: Float32 = 0
        if mx != neg_inf[DType.float32]():
            for i in range(nsp):
                var wgt = exp(part_lse[unsafe_offset=row * nsp + i] - mx)
                acc += wgt * part_o[unsafe_offset=(row * nsp + i) * dd_ + dd]
                wsum += wgt
        dst[unsafe_offset=row * dd_ + dd] = (acc / wsum if wsum > 0 else 0).cast[qdt]()
