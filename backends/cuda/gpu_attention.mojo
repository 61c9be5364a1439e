# Paged attention over the KV cache [num_blocks, B, KVH, W]: prefill (causal flash attention over
# variable-length sequences) and decode (one query per sequence, split-K flash decoding).
#
# KV dtypes (mojollm.kv_dtypes): float32 / bfloat16 / float16 caches (W = D elements), and int8 /
# fp8 caches (QK = KV_I8 / KV_FP8: uint8 rows of W = D + 4 bytes, the D codes then the row's
# float32 scale s, value = s * code). The quantized rows are read as they are stored (no
# dequantized copy of the cache). Decode and the SIMT prefill turn codes into float32 next to the
# math and fold the scales in where they cost least: a key's s multiplies its scores
# (q . (s k) = s (q . k)), a value's s its probabilities (p (s v) = (p s) v; the softmax sum takes
# p unscaled). The tensor-core prefill turns each 64-key tile into bfloat16 s * code in shared
# memory and runs the 16-bit path on it.
#
# Semantics (Backend.attention_prefill): sequence s owns query rows cu[s]..cu[s+1]; they are its
# last q_len positions, so query i sits at position ctx - q_len + i and sees keys 0..that position.
# Key p of sequence s lives in physical block bt[s, p // B], row p % B.
#
# GQA: the G = H / KVH query heads sharing a kv head are processed by the same block, so every
# K/V tile is read from memory once for all of them. A block's query "rows" are (position, head)
# pairs r = i * G + g.

from std.math import ceildiv, exp, exp2, log, log2
from std.memory import stack_allocation
from std.sys import size_of, is_nvidia_gpu
from std.sys.info import _accelerator_arch
from std.utils.numerics import neg_inf
from max.gpu import thread_idx, block_idx, block_dim, lane_id, WARP_SIZE
from max.gpu.sync import barrier, syncwarp
from max.gpu.primitives import warp
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory,
)
from max.gpu.compute.mma import mma, ld_matrix

from gpu_common import (
    SharedPtr, Ptr, F32P, I32P, flag, ERR_BLOCK, ERR_CONTEXT, KV_SCALE_BYTES, kv_codes_f32,
)

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


@always_inline
def _kv_f32[cdt: DType, QK: Int, n: Int](v: SIMD[cdt, n]) -> SIMD[DType.float32, n]:
    """n stored cache elements as float32: the values (float caches) or the codes (QK: the row's
    scale not applied)."""
    comptime if QK == 0:
        return v.cast[DType.float32]()
    else:
        return kv_codes_f32[QK, n](rebind[SIMD[DType.uint8, n]](v))


# ---- prefill, SIMT (float32 caches, other head dims; the portable path) --------------------------
comptime SP_ROWS = 32  # query rows per block: 8 rows per warp, 4 threads per row
comptime SP_TK = 16  # keys per tile
comptime SP_THREADS = 128


def attn_prefill_simt_kernel[qdt: DType, cdt: DType, D: Int, QK: Int = 0](
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
                    comptime if QK == 0:
                        var idx = ((blk * b_ + key % b_) * kvh + h) * D + dd
                        kv = kc[unsafe_offset=idx].cast[DType.float32]()
                        vv = vc[unsafe_offset=idx].cast[DType.float32]()
                    else:  # the row's code times its scale (a quantized row: D codes, then s)
                        var row = ((blk * b_ + key % b_) * kvh + h) * (D + KV_SCALE_BYTES)
                        var sk = kc.unsafe_offset(row + D).unsafe_bitcast[Float32]()[unsafe_offset=0]
                        var sv = vc.unsafe_offset(row + D).unsafe_bitcast[Float32]()[unsafe_offset=0]
                        kv = _kv_f32[cdt, QK, 1](kc[unsafe_offset=row + dd]) * sk
                        vv = _kv_f32[cdt, QK, 1](vc[unsafe_offset=row + dd]) * sv
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


# ---- prefill, tensor cores (NVIDIA; 16-bit, int8 and fp8 caches): FlashAttention-2 with mma.sync ----
# 16-bit caches: K / V tiles cp.async'd (two stages) straight into the ldmatrix layout. int8 / fp8
# caches: the raw rows (4-byte pieces: a D + 4-byte row is only 4-byte aligned) go into two raw
# stages; each tile's rows become bfloat16 tiles of s * code (rounded as a bfloat16 cache's values
# are, 2^-9 relative), so the MMAs and the softmax are the 16-bit path's, with no scale in the
# fragments (their registers are the kernel's limit).
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


@always_inline
def _fa_load_raw[D: Int](
    cache: Ptr[DType.uint8], raw: SharedPtr[DType.uint8],
    bt: I32P, err: I32P, s: Int, m_: Int, b_: Int, nb: Int, kvh: Int, h: Int, k0: Int, last_key: Int,
):
    """cp.async a tile's quantized rows (D codes and the scale) into raw [FA_TK][D + 4] bytes in
    4-byte pieces; warp w copies keys 16 w .. 16 w + 15 (lane l < 16 looks up key l's block).
    Keys past last_key or in an out-of-range block are zero-filled (codes and scale 0)."""
    comptime RB = D + KV_SCALE_BYTES
    comptime CPK = RB // 4
    comptime KPW = FA_TK // (FA_THREADS // WARP_SIZE)
    comptime N = KPW * CPK
    var lane = Int(lane_id())
    var wk = (thread_idx.x // WARP_SIZE) * KPW
    var slot: Int32 = -1
    if lane < KPW:
        var key = k0 + wk + lane
        if key <= last_key:
            var blk = Int(bt[unsafe_offset=s * m_ + key // b_])
            if blk < 0 or blk >= nb:
                flag(err, ERR_BLOCK)
            else:
                slot = Int32(blk * b_ + key % b_)
    for i in range(ceildiv(N, WARP_SIZE)):  # not unrolled: 17 copies' addresses would all stay live
        var c = i * WARP_SIZE + lane
        var j = min(c // CPK, KPW - 1)
        var part = c % CPK
        var sj = warp.shuffle_idx(slot, UInt32(j))
        var inside = True
        comptime if N % WARP_SIZE != 0:
            inside = c < N
        if inside:
            var ok = sj >= 0
            var src = (Int(sj) * kvh + h) * RB + part * 4 if ok else 0
            async_copy[4, fill=Scalar[DType.uint8](0)](
                cache.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                raw.unsafe_offset((wk + j) * RB + part * 4),
                src_size=Int32(4 if ok else 0),
            )


@always_inline
def _fa_dequant[QK: Int, D: Int](raw: SharedPtr[DType.uint8], tile: SharedPtr[DType.bfloat16]):
    """raw rows [FA_TK][D + 4] -> the bfloat16 tile [FA_TK][D + 8] of their values s * code
    (zero-filled rows: 0)."""
    comptime RB = D + KV_SCALE_BYTES
    comptime LD = D + 8
    comptime C4 = D // 4
    comptime assert FA_TK * C4 % FA_THREADS == 0
    comptime for i in range(FA_TK * C4 // FA_THREADS):
        var c = thread_idx.x + FA_THREADS * i
        var j = c // C4
        var part = c % C4
        var codes = raw.unsafe_load[width=4, alignment=4](j * RB + part * 4)
        var sc = raw.unsafe_offset(j * RB + D).unsafe_bitcast[Float32]()[unsafe_offset=0]
        tile.unsafe_store[alignment=8](j * LD + part * 4, (kv_codes_f32[QK, 4](codes) * sc).cast[DType.bfloat16]())


def attn_prefill_mma_kernel[qdt: DType, cdt: DType, D: Int, QK: Int = 0](
    q: Ptr[qdt], kc: Ptr[cdt], vc: Ptr[cdt], dst: Ptr[qdt], bt: I32P, cu: I32P, cl: I32P, err: I32P,
    S: Int64, T: Int64, H: Int64, KVH: Int64, M: Int64, B: Int64, NB: Int64, scale: Float32,
):
    comptime assert is_nvidia_gpu(), "attn_prefill_mma_kernel needs NVIDIA tensor cores"
    comptime mdt = DType.bfloat16 if QK != 0 else cdt  # the MMA operands' type
    comptime LD = D + 8  # 16-byte row padding: conflict-free ldmatrix
    comptime NT_D = D // 8  # n8 tiles over the head dim
    comptime TILE = FA_TK * LD
    comptime RB = D + KV_SCALE_BYTES  # a quantized row's bytes
    comptime RAW = 2 * FA_TK * RB  # one raw stage: K rows, then V rows
    # (cp.async needs `fill` to honour src_size: without it a zero-size copy still reads 16 bytes.)
    # 16-bit caches: two stages of (K tile, V tile), tile t + 1 streams in while tile t is used.
    # int8 / fp8: the bfloat16 (K tile, V tile), then two raw stages of (K rows, V rows).
    var smem = external_memory[Scalar[mdt], address_space=AddressSpace.SHARED, alignment=16]()
    var raw0 = smem.unsafe_offset(2 * TILE).unsafe_bitcast[UInt8]()
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

    # Q (unscaled, rounded to the MMA type) -> smem (borrowing stage 1; quantized: the K tile) ->
    # A fragments.
    var Qst = smem.unsafe_offset(2 * TILE if QK == 0 else 0)
    for e in range(tid, FA_ROWS * D, FA_THREADS):
        var r = e // D
        var dd = e % D
        var v: Float32 = 0
        if r < rows:
            var qrow = (qstart + p0 + r // G) * hh + h * G + r % G
            v = q[unsafe_offset=qrow * D + dd].cast[DType.float32]()
        Qst[unsafe_offset=r * LD + dd] = v.cast[mdt]()
    barrier()
    var qf = Array[SIMD[mdt, 8], D // 16](fill=SIMD[mdt, 8](0))
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

    var kc8 = kc.unsafe_bitcast[UInt8]()
    var vc8 = vc.unsafe_bitcast[UInt8]()
    comptime if QK == 0:
        _fa_load_kv[mdt, D](rebind[Ptr[mdt]](kc), smem, bt, err, s, m_, b_, nb, kvh, h, 0, last_key)
        _fa_load_kv[mdt, D](rebind[Ptr[mdt]](vc), smem.unsafe_offset(TILE), bt, err, s, m_, b_, nb, kvh, h, 0,
                            last_key)
    else:
        _fa_load_raw[D](kc8, raw0, bt, err, s, m_, b_, nb, kvh, h, 0, last_key)
        _fa_load_raw[D](vc8, raw0.unsafe_offset(FA_TK * RB), bt, err, s, m_, b_, nb, kvh, h, 0, last_key)
    async_copy_commit_group()
    var first_pos = off + p0  # smallest query position of the block: tiles below it need no mask

    for t in range(n_tiles):
        if t + 1 < n_tiles:
            var k1 = (t + 1) * FA_TK
            comptime if QK == 0:
                var nx = smem.unsafe_offset(((t + 1) % 2) * 2 * TILE)
                _fa_load_kv[mdt, D](rebind[Ptr[mdt]](kc), nx, bt, err, s, m_, b_, nb, kvh, h, k1, last_key)
                _fa_load_kv[mdt, D](rebind[Ptr[mdt]](vc), nx.unsafe_offset(TILE), bt, err, s, m_, b_, nb, kvh, h,
                                    k1, last_key)
            else:
                var rx = raw0.unsafe_offset(((t + 1) % 2) * RAW)
                _fa_load_raw[D](kc8, rx, bt, err, s, m_, b_, nb, kvh, h, k1, last_key)
                _fa_load_raw[D](vc8, rx.unsafe_offset(FA_TK * RB), bt, err, s, m_, b_, nb, kvh, h, k1, last_key)
            async_copy_commit_group()
            async_copy_wait_group(1)  # tile t landed; t + 1 in flight
        else:
            async_copy_wait_group(0)
        barrier()
        var Ks = smem.unsafe_offset((t % 2) * 2 * TILE)
        comptime if QK != 0:
            # raw rows -> bfloat16 tiles (the raw stage is refilled next iteration, after the
            # barrier below and the one at the end of this one)
            var rt = raw0.unsafe_offset((t % 2) * RAW)
            _fa_dequant[QK, D](rt, rebind[SharedPtr[DType.bfloat16]](smem))
            _fa_dequant[QK, D](rt.unsafe_offset(FA_TK * RB), rebind[SharedPtr[DType.bfloat16]](smem.unsafe_offset(TILE)))
            barrier()
            Ks = smem
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
            ).cast[mdt]()
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
# Block (kv head, sequence, split) = NW warps. Each warp streams its own 16-key tiles (tile t of
# the split goes to warp t % NW) through its own two shared-memory stages with cp.async (16-byte
# chunks, a key row's chunks coalesced), so the main loop has no block-wide barrier: tile t + 1
# loads while tile t is used. With a bf16 cache, 3 blocks of 4 warps fit an SM (G <= 4), ~150 KB
# in flight per SM. Every K/V byte is read from memory once for all G query heads of the kv head.
#   scores: WARP_SIZE / 16 lanes per key (2 on 32-wide warps), each over interleaved 16-byte
#     chunks of the key row (rows padded so a quarter-warp hits 8 distinct bank groups), q
#     broadcast from shared memory, one xor-shuffle to finish the dot products;
#   softmax: base 2, float32, running max and sum per head in registers (the tile's max by a
#     4-step butterfly);
#   values: each lane owns 4 features of every head; the probabilities [key][head] go through
#     shared memory (broadcast reads).
# int8 / fp8 caches: a row is copied in 4-byte pieces (D + 4 bytes are only 4-byte aligned), 16
# codes at a time become float32 in the scores and 4 in the values; a key's scale multiplies its
# scores, a value's scale its probabilities as they go to shared memory.
# The block-table entry for the next tile to issue is loaded one tile ahead, so its latency hides
# behind the math. At the end the warps' (max, sum, output) are merged through shared memory; one
# split writes the output, several write a normalised partial output and its log-sum-exp for
# attn_combine_kernel. Out-of-range block ids are flagged and their keys skipped (never read).
comptime DEC_TK = 16  # keys per warp tile
comptime DEC_STAGES = 2  # cp.async stages per warp
comptime DEC_MAX_G = 16
comptime LN2: Float32 = 0.6931471805599453
comptime _DEC_NVIDIA = _accelerator_arch().startswith("sm_") or "nvidia" in _accelerator_arch()


def prefill_mma_smem_bytes[D: Int, QK: Int = 0]() -> Int:
    """16-bit caches: two stages of (K, V) tiles. int8 / fp8: one bfloat16 (K, V) pair, then two
    raw stages of (K, V) rows."""
    comptime if QK == 0:
        return 4 * FA_TK * (D + 8) * 2
    return 2 * FA_TK * (D + 8) * 2 + 2 * 2 * FA_TK * (D + KV_SCALE_BYTES)


def decode_warps[cdt: DType]() -> Int:
    """Warps per decode block: 4 (bf16 cache) or 2 (f32) on NVIDIA, sized so 3 blocks fit an SM's
    228 KB of shared memory at G <= 4; 1 elsewhere (64 KB of LDS per workgroup)."""
    comptime if _DEC_NVIDIA:
        return 4 if size_of[cdt]() <= 2 else 2
    return 1


def _ilog2(n: Int) -> Int:
    var r = 0
    while (2 << r) <= n:
        r += 1
    return r


def _dec_ldk[cdt: DType, D: Int, QK: Int]() -> Int:
    """K row stride in elements: padded so that a row is 8 (or 24) banks (mod 32) after the
    previous one: the 4 keys a quarter-warp scores hit distinct bank groups. Quantized rows hold D
    codes and the scale, 16-byte aligned (D + 16 bytes before the padding)."""
    comptime if QK == 0:
        comptime W = D * size_of[cdt]() // 4
        comptime PADW = (8 - W % 32 + 32) % 32
        return D + PADW * 4 // size_of[cdt]()
    var w = (D + 16) // 4
    while w % 32 != 8 and w % 32 != 24:
        w += 4
    return w * 4


def _dec_ldv[D: Int, QK: Int]() -> Int:
    """V row stride in elements: D, or D codes and the scale 16-byte aligned."""
    return D if QK == 0 else D + 16


def _dec_stage_elems[cdt: DType, D: Int, QK: Int]() -> Int:
    """One stage, in cache elements: K [TK][LDK], V [TK][LDV], then TK int32 key-valid flags."""
    return DEC_TK * (_dec_ldk[cdt, D, QK]() + _dec_ldv[D, QK]()) + DEC_TK * 4 // size_of[cdt]()


def _dec_warp_elems[cdt: DType, D: Int, GM: Int, QK: Int]() -> Int:
    """A warp's region, in cache elements: its stages, then probabilities [TK][GM] float32."""
    return DEC_STAGES * _dec_stage_elems[cdt, D, QK]() + DEC_TK * GM * 4 // size_of[cdt]()


def decode_smem_bytes[cdt: DType, D: Int, GM: Int, QK: Int = 0]() -> Int:
    """Per block: NW warp regions, then the scaled query [GM][D] float32."""
    return decode_warps[cdt]() * _dec_warp_elems[cdt, D, GM, QK]() * size_of[cdt]() + GM * D * 4


@always_inline
def _dec_fetch(bt: I32P, s: Int, m_: Int, b_: Int, key: Int, k_hi: Int, mut blk: Int32, mut off: Int32):
    """Start loading the block id of `key` (used one tile later): blk = table entry, off = row in block."""
    if key < k_hi:
        var kb = UInt32(key) // UInt32(b_)
        blk = bt[unsafe_offset=s * m_ + Int(kb)]
        off = Int32(key) - Int32(kb) * Int32(b_)


@always_inline
def _dec_issue[cdt: DType, D: Int, QK: Int](
    kc: Ptr[cdt], vc: Ptr[cdt], st: SharedPtr[cdt], err: I32P, lane: Int,
    key: Int, blk: Int32, off: Int32, k_hi: Int, nb: Int, b_: Int, kvh: Int, h: Int,
):
    """cp.async one tile into stage `st`. Lane l holds key (tile start + l % TK) with its block id;
    keys past the split or in an out-of-range block are zero-filled and marked invalid."""
    comptime SZ = size_of[cdt]()
    comptime CB = 16 if QK == 0 else 4  # bytes per copy
    comptime VW = CB // SZ  # elements per copy
    comptime RW = D if QK == 0 else D + KV_SCALE_BYTES  # a cache row, in elements
    comptime CPK = RW // VW  # copies per row
    comptime LDK = _dec_ldk[cdt, D, QK]()
    comptime LDV = _dec_ldv[D, QK]()
    comptime NCHUNK = DEC_TK * CPK
    var row: Int32 = -1  # cache row (block * B + offset), -1: no key
    if key < k_hi:
        if Int(blk) < 0 or Int(blk) >= nb:
            flag(err, ERR_BLOCK)
        else:
            row = blk * Int32(b_) + off
    if lane < DEC_TK:
        st.unsafe_offset(DEC_TK * (LDK + LDV)).unsafe_bitcast[Int32]()[unsafe_offset=lane] = Int32(1 if row >= 0 else 0)
    comptime for i in range(ceildiv(NCHUNK, WARP_SIZE)):
        var c = i * WARP_SIZE + lane
        var j = min(c // CPK, DEC_TK - 1)
        var part = c % CPK
        var rj = warp.shuffle_idx(row, UInt32(j))
        var inside = True
        comptime if NCHUNK % WARP_SIZE != 0:
            inside = c < NCHUNK
        if inside:
            var ok = rj >= 0
            var src = (Int(rj) * kvh + h) * RW + part * VW if ok else 0
            var n = Int32(CB if ok else 0)
            async_copy[CB, fill=Scalar[cdt](0)](kc.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                                                st.unsafe_offset(j * LDK + part * VW), src_size=n)
            async_copy[CB, fill=Scalar[cdt](0)](vc.unsafe_offset(src).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                                                st.unsafe_offset(DEC_TK * LDK + j * LDV + part * VW), src_size=n)


def attn_decode_kernel[qdt: DType, cdt: DType, D: Int, GM: Int, NW: Int, QK: Int = 0](
    q: Ptr[qdt], kc: Ptr[cdt], vc: Ptr[cdt], dst: Ptr[qdt], part_o: F32P, part_lse: F32P,
    bt: I32P, cl: I32P, err: I32P, H: Int64, KVH: Int64, M: Int64, B: Int64, NB: Int64,
    splits: Int64, chunk: Int64, scale: Float32,
):
    """Block (kv head h, sequence s, split sp) of NW warps attends the G <= GM query heads of h over
    keys [sp * chunk, min(ctx, (sp + 1) * chunk)). With one split it writes the output directly,
    else a normalised partial output and its log-sum-exp (natural log) for attn_combine_kernel."""
    comptime SZ = size_of[cdt]()
    comptime VW = 16 // SZ  # elements of a 16-byte chunk (quantized: 16 codes)
    comptime PW = min(VW, 8)  # width of the partial dot products (registers: 4 PW per lane)
    comptime CPK = D // VW
    comptime LDK = _dec_ldk[cdt, D, QK]()
    comptime LDV = _dec_ldv[D, QK]()
    comptime LPK = WARP_SIZE // DEC_TK  # lanes per key in the scores
    comptime NCH = ceildiv(CPK, LPK)  # chunks per lane per key row
    comptime D4 = D // 4  # lanes owning 4 output features each
    comptime STE = _dec_stage_elems[cdt, D, QK]()
    comptime WE = _dec_warp_elems[cdt, D, GM, QK]()
    comptime NT = NW * WARP_SIZE
    comptime NEG = neg_inf[DType.float32]()
    comptime REC_M = GM * D  # a warp's record at the start of its region: o [GM][D], m [GM], l [GM]
    comptime assert GM % 4 == 0 and GM <= DEC_MAX_G, "GM: 4, 8 or 16"
    comptime assert D % 16 == 0 and D4 <= WARP_SIZE, "head dim: a multiple of 16, at most 4 * WARP_SIZE"
    comptime assert WARP_SIZE % DEC_TK == 0 and WARP_SIZE // DEC_TK <= 4
    comptime assert (GM * D + 2 * GM) * 4 <= DEC_STAGES * STE * SZ, "the merge record must fit the stages"
    var h = block_idx.x
    var s = block_idx.y
    var sp = block_idx.z
    var tid = thread_idx.x
    var lane = Int(lane_id())
    var w = tid // WARP_SIZE
    var hh = Int(H)
    var kvh = Int(KVH)
    var G = hh // kvh
    var m_ = Int(M)
    var b_ = Int(B)
    var nb = Int(NB)
    var nsp = Int(splits)

    var smem = external_memory[Scalar[cdt], address_space=AddressSpace.SHARED, alignment=16]()
    var wbase = smem.unsafe_offset(w * WE)  # this warp's stages, then its probabilities
    var Ps = wbase.unsafe_offset(DEC_STAGES * STE).unsafe_bitcast[Float32]()  # [TK][GM]
    var Qs = smem.unsafe_offset(NW * WE).unsafe_bitcast[Float32]()  # [GM][D], scaled by scale * log2(e)

    var ctx = Int(cl[unsafe_offset=s])
    if ctx < 0 or ctx > m_ * b_:
        if tid == 0:
            flag(err, ERR_CONTEXT)
        ctx = 0
    var k_lo = sp * Int(chunk)
    var k_hi = min(ctx, k_lo + Int(chunk))
    var n_tiles = ceildiv(k_hi - k_lo, DEC_TK) if k_hi > k_lo else 0
    var my_n = ceildiv(n_tiles - w, NW) if n_tiles > w else 0  # this warp's tiles: w, w + NW, ...

    # Prologue: tiles 0 .. STAGES-2 in flight, then the block id for the next one.
    var pk = k_lo + w * DEC_TK + lane % DEC_TK  # this lane's key in the warp's next tile to issue
    var pblk: Int32 = 0
    var poff: Int32 = 0
    _dec_fetch(bt, s, m_, b_, pk, k_hi, pblk, poff)
    comptime for i in range(DEC_STAGES - 1):
        if i < my_n:
            _dec_issue[cdt, D, QK](kc, vc, wbase.unsafe_offset(i * STE), err, lane, pk, pblk, poff, k_hi, nb, b_, kvh, h)
        async_copy_commit_group()
        pk += NW * DEC_TK
        _dec_fetch(bt, s, m_, b_, pk, k_hi, pblk, poff)

    for e in range(tid, GM * D, NT):
        var v: Float32 = 0
        if e < G * D:
            v = q[unsafe_offset=(s * hh + h * G) * D + e].cast[DType.float32]() * (scale * LOG2E)
        Qs[unsafe_offset=e] = v
    barrier()

    var kj = lane // LPK  # the key this lane scores
    var kh = lane % LPK  # which interleaved chunks of it
    var m_run = SIMD[DType.float32, GM](NEG)
    var l_run = SIMD[DType.float32, GM](0)  # per-lane partial sums (lanes kh == 0)
    var acc = Array[SIMD[DType.float32, 4], GM](fill=SIMD[DType.float32, 4](0))  # features 4 lane ..

    for t in range(my_n):
        var nx = t + DEC_STAGES - 1
        if nx < my_n:
            _dec_issue[cdt, D, QK](kc, vc, wbase.unsafe_offset((nx % DEC_STAGES) * STE), err, lane, pk, pblk, poff,
                               k_hi, nb, b_, kvh, h)
        async_copy_commit_group()
        pk += NW * DEC_TK
        _dec_fetch(bt, s, m_, b_, pk, k_hi, pblk, poff)
        async_copy_wait_group(Int32(DEC_STAGES - 1))  # tile t has landed (for this lane)
        syncwarp()  # ... and for the whole warp
        var Kt = wbase.unsafe_offset((t % DEC_STAGES) * STE)
        var Vt = Kt.unsafe_offset(DEC_TK * LDK)
        var valid = Kt.unsafe_offset(DEC_TK * (LDK + LDV)).unsafe_bitcast[Int32]()[unsafe_offset=kj] != 0

        # Scores of key kj for the heads, four at a time. Quantized caches with more than 4 heads
        # per kv head convert each chunk of codes once for all heads and sum per chunk instead
        # (kept over the head groups, the converted row spills registers).
        var sc = SIMD[DType.float32, GM](0)
        comptime if QK != 0 and GM > 4:
            comptime for c in range(NCH):
                var cc = c * LPK + kh
                var inside = True
                comptime if CPK % LPK != 0:
                    inside = cc < CPK
                if inside:
                    var raw = Kt.unsafe_load[width=VW, alignment=16](kj * LDK + cc * VW)
                    var k0 = _kv_f32[cdt, QK, 8](raw.slice[8, offset=0]())
                    var k1 = _kv_f32[cdt, QK, 8](raw.slice[8, offset=8]())
                    comptime for g4 in range(GM // 4):
                        if g4 * 4 < G:
                            comptime for e in range(4):
                                var qo = (g4 * 4 + e) * D + cc * VW
                                var q0 = Qs.unsafe_load[width=8, alignment=16](qo)
                                var q1 = Qs.unsafe_load[width=8, alignment=16](qo + 8)
                                sc[g4 * 4 + e] += k0.fma(q0, k1 * q1).reduce_add()
            comptime for g4 in range(GM // 4):
                if g4 * 4 < G:
                    comptime for e in range(4):
                        comptime for x in range(_ilog2(LPK)):
                            sc[g4 * 4 + e] += warp.shuffle_xor(sc[g4 * 4 + e], UInt32(1 << x))
        comptime for g4 in range(GM // 4):
            if (QK == 0 or GM == 4) and g4 * 4 < G:
                var part = Array[SIMD[DType.float32, PW], 4](fill=SIMD[DType.float32, PW](0))
                comptime for c in range(NCH):
                    var cc = c * LPK + kh
                    var inside = True
                    comptime if CPK % LPK != 0:
                        inside = cc < CPK
                    if inside:
                        var raw = Kt.unsafe_load[width=VW, alignment=16](kj * LDK + cc * VW)
                        comptime for hf in range(VW // PW):
                            var kv = _kv_f32[cdt, QK, PW](raw.slice[PW, offset=hf * PW]())
                            comptime for e in range(4):
                                var qv = Qs.unsafe_load[width=PW, alignment=16]((g4 * 4 + e) * D + cc * VW + hf * PW)
                                part[e] = kv.fma(qv, part[e])
                comptime for e in range(4):
                    var v = part[e].reduce_add()
                    comptime for x in range(_ilog2(LPK)):
                        v += warp.shuffle_xor(v, UInt32(1 << x))
                    sc[g4 * 4 + e] = v
        comptime if QK != 0:  # the key's scale (zero-filled, 0, for an invalid key: masked below)
            sc *= Kt.unsafe_offset(kj * LDK + D).unsafe_bitcast[Float32]()[unsafe_offset=0]

        # Online softmax (base 2) over the tile; probabilities -> Ps[key][head].
        comptime for g4 in range(GM // 4):
            if g4 * 4 < G:
                var pv = SIMD[DType.float32, 4](0)
                comptime for e in range(4):
                    comptime g = g4 * 4 + e
                    var x = sc[g] if valid else NEG
                    var mt = x
                    comptime for k in range(_ilog2(DEC_TK)):
                        mt = max(mt, warp.shuffle_xor(mt, UInt32(LPK << k)))
                    var mn = max(m_run[g], mt)
                    var sh = mn if mn != NEG else 0  # no valid key yet: exp2 gives 0, not NaN
                    var al = exp2(m_run[g] - sh)
                    var p = exp2(x - sh)
                    m_run[g] = mn
                    l_run[g] = l_run[g] * al + (p if kh == 0 else 0)
                    acc[g] = acc[g] * al
                    pv[e] = p
                if kh == 0:
                    comptime if QK != 0:  # the value's scale (l took p unscaled)
                        pv *= Vt.unsafe_offset(kj * LDV + D).unsafe_bitcast[Float32]()[unsafe_offset=0]
                    Ps.unsafe_store[alignment=16](kj * GM + g4 * 4, pv)
        syncwarp()

        # Values: acc[g] += sum over keys of p[key][g] * V[key][4 lane ..].
        if lane < D4:
            comptime for g4 in range(GM // 4):
                if g4 * 4 < G:
                    comptime for j in range(DEC_TK):
                        var vv = _kv_f32[cdt, QK, 4](Vt.unsafe_load[width=4, alignment=4 * SZ](j * LDV + lane * 4))
                        var pp = Ps.unsafe_load[width=4, alignment=16](j * GM + g4 * 4)
                        comptime for e in range(4):
                            acc[g4 * 4 + e] = vv.fma(SIMD[DType.float32, 4](pp[e]), acc[g4 * 4 + e])
        syncwarp()  # the stage and Ps are rewritten next iteration

    # This warp's record over its own (now idle) stages: o, m, l per head.
    async_copy_wait_group(0)
    syncwarp()
    var R = wbase.unsafe_bitcast[Float32]()
    comptime for g4 in range(GM // 4):
        if g4 * 4 < G:
            comptime for e in range(4):
                comptime g = g4 * 4 + e
                var lt = l_run[g]
                comptime for x in range(_ilog2(WARP_SIZE)):
                    lt += warp.shuffle_xor(lt, UInt32(1 << x))
                if lane == 0:
                    R[unsafe_offset=REC_M + g] = m_run[g]
                    R[unsafe_offset=REC_M + GM + g] = lt
                if lane < D4:
                    R.unsafe_store[alignment=16](g * D + lane * 4, acc[g])
    barrier()

    # Merge the warps: head g, features f .. f + 3 per thread.
    for e in range(tid, G * D4, NT):
        var g = e // D4
        var f = (e % D4) * 4
        var mx = NEG
        comptime for ww in range(NW):
            mx = max(mx, smem.unsafe_offset(ww * WE).unsafe_bitcast[Float32]()[unsafe_offset=REC_M + g])
        var o = SIMD[DType.float32, 4](0)
        var l: Float32 = 0
        if mx != NEG:
            comptime for ww in range(NW):
                var Rw = smem.unsafe_offset(ww * WE).unsafe_bitcast[Float32]()
                var wt = exp2(Rw[unsafe_offset=REC_M + g] - mx)
                l += Rw[unsafe_offset=REC_M + GM + g] * wt
                o += Rw.unsafe_load[width=4, alignment=16](g * D + f) * wt
        var res = o / l if l > 0 else SIMD[DType.float32, 4](0)
        var head = s * hh + h * G + g
        if nsp == 1:
            dst.unsafe_store[alignment=4 * size_of[qdt]()](head * D + f, res.cast[qdt]())
        else:
            part_o.unsafe_store[alignment=16]((head * nsp + sp) * D + f, res)
            if f == 0:
                part_lse[unsafe_offset=head * nsp + sp] = (mx + log2(l)) * LN2 if l > 0 else NEG


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
