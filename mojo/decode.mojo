# One call per decode step on the CPU: every layer of a Llama-family model for 1..8 sequences
# (one new token each), so the Mojo worker pool stays busy from op to op.
#
# Why: the per-op path pays ~4-5 ms of Python per token on the default model (30 layers x ~12
# calls with their checks), and a parallel region costs 200-400 us once the workers have idled
# ~40 us, which every Python call between kernels gave them. Here the same kernels
# (quant._matmul, kquant._matmul, attention's decode jobs) run back to back with no Python
# between them, on a team of threads that shares out every op (below: "the worker team").
#
# The step, per layer (x is the normed input, residual the running sum; both [T, hidden]):
#     qkv = x @ Wqkv^T                      [T, (H + 2 KVH) D], fused rows q | k | v
#     rope(q), rope(k) in place; k, v -> cache slots; q copied out dense for the attention
#     attn = paged decode attention         [T, H D]
#     o = attn @ Wo^T;  residual += o;  x = rms_norm(residual) * mlp_norm
#     gu = x @ Wgu^T [T, 2F];  act = silu(g) * u;  d = act @ Wd^T
#     residual += d;  x = rms_norm(residual) * (next layer's attn_norm, or the final norm)
# The caller (mojollm.kernels.decode) checked every shape, type and index and owns the buffers.
#
# Layout of the int64 `model` array (built once per model):
#     [0] layers [1] hidden [2] H [3] KVH [4] D [5] F [6] rot_dim [7] neox [8] final_norm
#     [9] cos_sin [10] block_size [11] threads of the worker team that shares out every op of
#     steps of up to SMALL_T rows (1: every op alone, with its kernel's own threads)
#     [12] matmul path (quant.PATH_*: -1 = int8 activations where the kernel prefers them; the
#     per-op path's choice, mojollm.kernels.quant.default_dot)
#     [13] LM head blocks (0: the caller runs the LM head) [14] its type code [15] its rows (vocab)
#     [16] KV cache dtype code (attention.mojo's KV_*: the caches' format, written and read there)
#     then per layer, LAYER_FIELDS values:
#     attn_norm, qkv_w, qkv_qtype, o_w, o_qtype, mlp_norm, gu_w, gu_qtype, down_w, down_qtype,
#     k_cache, v_cache, k_w, k_qtype, v_w, v_qtype
#     (k_w = 0: qkv_w holds the fused q | k | v rows; else q, k and v are separate weights, as in
#     GGUF files whose q/k/v tensors have different types, e.g. llama.cpp's Q4_K_M)
# Layout of the int64 `step` array (per call):
#     [0] T [1] x [2] residual [3] positions (int32) [4] slots (int64) [5] block_tables (int32)
#     [6] M (table width) [7] context_lens (int32) [8] qkv buf [9] q buf [10] attn buf
#     [11] hidden buf [12] gate_up buf [13] act buf [14] attention scratch [15] attention
#     partials [16] attention chunk prefix sums (int32 [T + 1]) [17] workers [18] logits [T, vocab] (with an LM head)

from std.math import exp, sqrt
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import simd_width_of

from std.atomic import Atomic

from max.algorithm import parallelize

from attention import DecodeJobs, decode_attention, store_token
from quant import _matmul, Q4_0, Q4_1, Q8_0, W8A8, F8_E4M3, PATH_FLOAT, SMALL_T
from kquant import _matmul as _kmatmul, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

comptime F32Ptr = Pointer[Float32, MutUntrackedOrigin]
comptime I32Ptr = Pointer[Int32, MutUntrackedOrigin]
comptime I64Ptr = Pointer[Int64, MutUntrackedOrigin]
comptime AttnMeta = Pointer[Int64, MutUntrackedOrigin]
comptime W = simd_width_of[DType.float32]()
comptime Vec = SIMD[DType.float32, W]
comptime HEADER = 17
comptime LAYER_FIELDS = 16
comptime HEAD_W = 13  # the LM head's blocks (0: the caller runs it), its type code, its rows
comptime HEAD_QTYPE = 14
comptime HEAD_VOCAB = 15
comptime KV_DTYPE = 16
comptime META = 17  # entries of the attention's meta array (attention.mojo)


@always_inline
def _f32(addr: Int64) -> F32Ptr:
    return F32Ptr(unsafe_from_address=Int(addr))


def _linear(qt: Int, w: Int64, x: Int, y: Int, t: Int, n: Int, k: Int, items: Int, path: Int,
           r0: Int = 0, r1: Int = -1) raises:
    """y = x @ W^T; r1 >= 0: only output rows [r0, r1), on this thread."""
    if qt == Q4_0:
        _matmul[Q4_0](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == Q4_1:
        _matmul[Q4_1](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == Q8_0:
        _matmul[Q8_0](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == W8A8:
        _matmul[W8A8](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == F8_E4M3:  # float32 activations whatever the path (quant._matmul)
        _matmul[F8_E4M3](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == Q5_0:  # mojo/kquant.mojo: int8 activations on quant.mojo's GEMV as Q4_0 (path)
        _kmatmul[Q5_0](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == Q5_1:
        _kmatmul[Q5_1](Int(w), x, y, t, n, k, items, path, r0, r1)
    elif qt == Q2_K:  # the k-quants: float32 activations
        _kmatmul[Q2_K](Int(w), x, y, t, n, k, items, PATH_FLOAT, r0, r1)
    elif qt == Q3_K:
        _kmatmul[Q3_K](Int(w), x, y, t, n, k, items, PATH_FLOAT, r0, r1)
    elif qt == Q4_K:
        _kmatmul[Q4_K](Int(w), x, y, t, n, k, items, PATH_FLOAT, r0, r1)
    elif qt == Q5_K:
        _kmatmul[Q5_K](Int(w), x, y, t, n, k, items, PATH_FLOAT, r0, r1)
    elif qt == Q6_K:
        _kmatmul[Q6_K](Int(w), x, y, t, n, k, items, PATH_FLOAT, r0, r1)
    else:
        raise Error("decode_step: unsupported weight type code ", qt)


# The row ops below repeat mojo/nn.mojo's few lines on purpose: `from nn import ...` resolves to
# Modular's own `nn` package (in the max wheel), which shadows ours on the import path.
@always_inline
def _add_rms_norm(x: F32Ptr, res: F32Ptr, w: F32Ptr, dst: F32Ptr, rows: Int, n: Int, eps: Float32):
    """res += x; dst = res / sqrt(mean(res^2) + eps) * w, row by row (decode rows are short)."""
    for r in range(rows):
        var base = r * n
        var acc = Vec(0)
        var i = 0
        while i + W <= n:
            var s = res.unsafe_load[width=W](base + i) + x.unsafe_load[width=W](base + i)
            res.unsafe_store(base + i, s)
            acc += s * s
            i += W
        var ss = acc.reduce_add()
        while i < n:
            var s = res[unsafe_offset=base + i] + x[unsafe_offset=base + i]
            res[unsafe_offset=base + i] = s
            ss += s * s
            i += 1
        var inv = 1.0 / sqrt(ss / Float32(n) + eps)
        i = 0
        while i + W <= n:
            dst.unsafe_store(base + i, res.unsafe_load[width=W](base + i) * inv * w.unsafe_load[width=W](i))
            i += W
        while i < n:
            dst[unsafe_offset=base + i] = res[unsafe_offset=base + i] * inv * w[unsafe_offset=i]
            i += 1


@always_inline
def _rope_head(x: F32Ptr, base: Int, cs: F32Ptr, crow: Int, half: Int, neox: Bool):
    """Rotate one head in place: neox pairs (i, i + half), else interleaved pairs (2i, 2i + 1)."""
    for i in range(half):
        var c = cs[unsafe_offset=crow + i]
        var s = cs[unsafe_offset=crow + half + i]
        var a = base + i if neox else base + 2 * i
        var b = base + half + i if neox else base + 2 * i + 1
        var x1 = x[unsafe_offset=a]
        var x2 = x[unsafe_offset=b]
        x[unsafe_offset=a] = x1 * c - x2 * s
        x[unsafe_offset=b] = x2 * c + x1 * s


@always_inline
def _silu_mul(gu: F32Ptr, dst: F32Ptr, rows: Int, f: Int, c0: Int, c1: Int):
    """Columns [c0, c1) of act = silu(g) * u over rows of [g | u]."""
    for r in range(rows):
        var g0 = r * 2 * f
        for i in range(c0, c1):
            var g = gu[unsafe_offset=g0 + i]
            # silu(g) = g / (1 + e^-g), with e^-g taken as 0 beyond exp's float range
            var e = exp(-g) if g > -87.0 else Float32(0)
            dst[unsafe_offset=r * f + i] = g / (1.0 + e) * gu[unsafe_offset=g0 + f + i]


# ---------------------------------------------------------------- the worker team
#
# A step is a fixed sequence of phases (per layer: q/k/v GEMVs, rope + cache writes, attention
# jobs, the split merge, o GEMV, norm, gate/up GEMV, silu, down GEMV, norm; then the LM head).
# Each phase is cut into chunks (GEMV row shares, attention jobs); every thread of the team
# walks the phases in order, claims chunks of the current phase from its counter, runs them,
# and waits until all of the phase's chunks are done before the next phase. A thread never waits
# on a chunk nobody has claimed, so a team whose second thread starts late (or is descheduled
# by a busy host) still finishes: the first thread claims everything. With one parallel region
# per step the workers never fall asleep between ops (each region after a sleep costs 200-400 us
# on the 2-vCPU VMs this was tuned on), and every GEMV uses every core instead of the one core
# that a sub-2-MiB matrix got from its own kernel.

comptime PHASES_PER_LAYER = 10
comptime ROW_ALIGN = 16  # GEMV shares start on 64-byte lines of y (no false sharing between threads)


@always_inline
def _claim(ctr: I64Ptr, phase: Int) -> Int:
    return Int(Atomic[Int64].fetch_add(ctr.unsafe_offset(2 * phase), 1))


@always_inline
def _done(ctr: I64Ptr, phase: Int):
    _ = Atomic[Int64].fetch_add(ctr.unsafe_offset(2 * phase + 1), 1)


@always_inline
def _wait(ctr: I64Ptr, phase: Int, chunks: Int):
    while Int(Atomic[Int64].load(ctr.unsafe_offset(2 * phase + 1))) < chunks:
        pass


@always_inline
def _share(n: Int, c: Int, chunks: Int) -> Tuple[Int, Int]:
    """Rows [r0, r1) of chunk c of n rows cut into `chunks` aligned shares."""
    var r0 = (c * n // chunks) // ROW_ALIGN * ROW_ALIGN
    var r1 = n if c + 1 == chunks else ((c + 1) * n // chunks) // ROW_ALIGN * ROW_ALIGN
    return (r0, r1)


@fieldwise_init
struct Step(ImplicitlyCopyable, Movable):
    var m: I64Ptr  # the model table
    var layers: Int
    var hidden: Int
    var h: Int
    var kvh: Int
    var d: Int
    var f: Int
    var rot: Int
    var neox: Bool
    var cs: F32Ptr
    var path: Int
    var t: Int
    var x: Int
    var res: F32Ptr
    var pos: I32Ptr
    var slots: I64Ptr
    var qkv: Int
    var qbuf: Int
    var attn: Int
    var hbuf: Int
    var gu: Int
    var act: Int
    var logits: Int  # [T, vocab] (0: the caller runs the LM head)
    var meta: AttnMeta
    var eps: Float32
    var scale: Float32
    var team: Int  # threads; 1: every op alone on the calling thread, with its own parallelism
    var gemv_chunks: Int

    def gemv(self, qt: Int, w: Int64, x: Int, y: Int, n: Int, k: Int, c: Int) raises:
        """Chunk c of y = x @ W^T (the whole op, with the kernel's own threads, on a team of one)."""
        if self.team == 1:
            _linear(qt, w, x, y, self.t, n, k, 0, self.path)
        else:
            var r = _share(n, c, self.gemv_chunks)
            _linear(qt, w, x, y, self.t, n, k, 1, self.path, r[0], r[1])

    def gemv_phase(self, ctr: I64Ptr, phase: Int, qt: Int, w: Int64, x: Int, y: Int, n: Int, k: Int) raises:
        """A phase that is one GEMV: claim its row shares until none is left, then wait for all."""
        var c = _claim(ctr, phase)
        while c < self.gemv_chunks:
            self.gemv(qt, w, x, y, n, k, c)
            _done(ctr, phase)
            c = _claim(ctr, phase)
        _wait(ctr, phase, self.gemv_chunks)

    def serial_phase(self, ctr: I64Ptr, phase: Int, layer: Int, op: Int) raises:
        """A phase of one chunk (`serial`), run by whichever thread claims it first."""
        if _claim(ctr, phase) == 0:
            self.serial(layer, op)
            _done(ctr, phase)
        _wait(ctr, phase, 1)

    def serial(self, layer: Int, op: Int) raises:
        """The phases that run as one chunk: 1 rope + cache writes, 5 / 9 the residual norms."""
        var m = self.m
        var L = HEADER + layer * LAYER_FIELDS
        var t = self.t
        var h = self.h
        var kvh = self.kvh
        var d = self.d
        var row = (h + 2 * kvh) * d
        var xp = _f32(Int64(self.x))
        if op == 1:
            var qkvp = _f32(Int64(self.qkv))
            var qp = _f32(Int64(self.qbuf))
            if m[unsafe_offset=L + 12] != 0:  # q, k, v were written apart into gate_up's buffer
                var kvd = kvh * d
                var gp = _f32(Int64(self.gu))
                for tok in range(t):
                    for i in range(h * d):
                        qkvp[unsafe_offset=tok * row + i] = gp[unsafe_offset=tok * h * d + i]
                    for i in range(kvd):
                        qkvp[unsafe_offset=tok * row + h * d + i] = gp[unsafe_offset=t * h * d + tok * kvd + i]
                        qkvp[unsafe_offset=tok * row + h * d + kvd + i] = gp[unsafe_offset=t * (h * d + kvd) + tok * kvd + i]
            var kv = Int(m[unsafe_offset=KV_DTYPE])
            for tok in range(t):
                var crow = Int(self.pos[unsafe_offset=tok]) * self.rot
                var base = tok * row
                for hh in range(h + kvh):  # q heads, then k heads
                    _rope_head(qkvp, base + hh * d, self.cs, crow, self.rot // 2, self.neox)
                for i in range(h * d):
                    qp[unsafe_offset=tok * h * d + i] = qkvp[unsafe_offset=base + i]
                var slot = Int(self.slots[unsafe_offset=tok])
                store_token(kv, Int(m[unsafe_offset=L + 10]), slot, kvh, d, qkvp, base + h * d)
                store_token(kv, Int(m[unsafe_offset=L + 11]), slot, kvh, d, qkvp, base + (h + kvh) * d)
        elif op == 5:
            _add_rms_norm(_f32(Int64(self.hbuf)), self.res, _f32(m[unsafe_offset=L + 5]), xp, t, self.hidden, self.eps)
        else:
            var next_norm = m[unsafe_offset=8] if layer + 1 == self.layers else m[unsafe_offset=L + LAYER_FIELDS]
            _add_rms_norm(_f32(Int64(self.hbuf)), self.res, _f32(next_norm), xp, t, self.hidden, self.eps)

    def run(self, w: Int, ctr: I64Ptr) raises:
        """Thread w's walk through every phase of the step."""
        var m = self.m
        var t = self.t
        var hd = self.h * self.d
        var kvd = self.kvh * self.d
        var row = hd + 2 * kvd
        var gc = self.gemv_chunks
        # this thread's own copy of the attention's meta array (only the caches change per layer)
        var meta_list = List[Int64](length=META, fill=0)
        var meta = AttnMeta(unsafe_from_address=Int(meta_list.unsafe_ptr()))
        for i in range(META):
            meta[unsafe_offset=i] = self.meta[unsafe_offset=i]
        for layer in range(self.layers):
            var L = HEADER + layer * LAYER_FIELDS
            var p0 = layer * PHASES_PER_LAYER
            var apart = m[unsafe_offset=L + 12] != 0
            # 0: q | k | v (one fused weight, or three into gate_up's buffer)
            var n0 = 3 * gc if apart else gc
            var c = _claim(ctr, p0)
            while c < n0:
                if not apart:
                    self.gemv(Int(m[unsafe_offset=L + 2]), m[unsafe_offset=L + 1], self.x, self.qkv, row, self.hidden, c)
                elif c < gc:
                    self.gemv(Int(m[unsafe_offset=L + 2]), m[unsafe_offset=L + 1], self.x, self.gu, hd, self.hidden, c)
                elif c < 2 * gc:
                    self.gemv(Int(m[unsafe_offset=L + 13]), m[unsafe_offset=L + 12], self.x, self.gu + 4 * t * hd, kvd,
                              self.hidden, c - gc)
                else:
                    self.gemv(Int(m[unsafe_offset=L + 15]), m[unsafe_offset=L + 14], self.x,
                              self.gu + 4 * t * (hd + kvd), kvd, self.hidden, c - 2 * gc)
                _done(ctr, p0)
                c = _claim(ctr, p0)
            _wait(ctr, p0, n0)
            # 1: rope, cache writes
            self.serial_phase(ctr, p0 + 1, layer, 1)
            # 2, 3: attention (jobs on the team; alone: the kernel's own threads), then the split merge
            meta[unsafe_offset=1] = m[unsafe_offset=L + 10]
            meta[unsafe_offset=2] = m[unsafe_offset=L + 11]
            if self.team == 1:
                decode_attention(meta, self.scale)
            else:
                var jobs = DecodeJobs.of(meta, self.scale)
                c = _claim(ctr, p0 + 2)
                while c < jobs.n_jobs:
                    jobs.run(c, w)
                    _done(ctr, p0 + 2)
                    c = _claim(ctr, p0 + 2)
                _wait(ctr, p0 + 2, jobs.n_jobs)
                if jobs.n_jobs > jobs.n_seqs:  # some sequence has several chunks: merge them
                    if _claim(ctr, p0 + 3) == 0:
                        jobs.merge()
                        _done(ctr, p0 + 3)
                    _wait(ctr, p0 + 3, 1)
            # 4: o; 5: residual + norm; 6: gate | up
            self.gemv_phase(ctr, p0 + 4, Int(m[unsafe_offset=L + 4]), m[unsafe_offset=L + 3], self.attn, self.hbuf,
                            self.hidden, hd)
            self.serial_phase(ctr, p0 + 5, layer, 5)
            self.gemv_phase(ctr, p0 + 6, Int(m[unsafe_offset=L + 7]), m[unsafe_offset=L + 6], self.x, self.gu,
                            2 * self.f, self.hidden)
            # 7: silu(g) * u, by column shares
            c = _claim(ctr, p0 + 7)
            while c < gc:
                var r = _share(self.f, c, gc)
                _silu_mul(_f32(Int64(self.gu)), _f32(Int64(self.act)), t, self.f, r[0], r[1])
                _done(ctr, p0 + 7)
                c = _claim(ctr, p0 + 7)
            _wait(ctr, p0 + 7, gc)
            # 8: down; 9: residual + the next norm
            self.gemv_phase(ctr, p0 + 8, Int(m[unsafe_offset=L + 9]), m[unsafe_offset=L + 8], self.act, self.hbuf,
                            self.hidden, self.f)
            self.serial_phase(ctr, p0 + 9, layer, 9)
        # the LM head on the final-normed rows
        if self.logits != 0:
            self.gemv_phase(ctr, self.layers * PHASES_PER_LAYER, Int(m[unsafe_offset=HEAD_QTYPE]),
                            m[unsafe_offset=HEAD_W], self.x, self.logits, Int(m[unsafe_offset=HEAD_VOCAB]), self.hidden)
        _ = meta_list^


def decode_step(model_addr: PythonObject, step_addr: PythonObject, eps_py: PythonObject,
                scale_py: PythonObject) raises -> PythonObject:
    var m = I64Ptr(unsafe_from_address=Int(py=model_addr))
    var st = I64Ptr(unsafe_from_address=Int(py=step_addr))
    var t = Int(st[unsafe_offset=0])
    var workers = Int(st[unsafe_offset=17])
    # the attention's meta array, caches left out (each thread fills them in its own copy)
    var meta_list = List[Int64](length=META, fill=0)
    var meta = AttnMeta(unsafe_from_address=Int(meta_list.unsafe_ptr()))
    meta[unsafe_offset=0] = st[unsafe_offset=9]
    meta[unsafe_offset=3] = st[unsafe_offset=5]
    meta[unsafe_offset=4] = st[unsafe_offset=7]
    meta[unsafe_offset=5] = st[unsafe_offset=10]
    meta[unsafe_offset=6] = st[unsafe_offset=14]
    meta[unsafe_offset=7] = st[unsafe_offset=15]
    meta[unsafe_offset=8] = Int64(t)
    meta[unsafe_offset=9] = m[unsafe_offset=2]
    meta[unsafe_offset=10] = m[unsafe_offset=3]
    meta[unsafe_offset=11] = m[unsafe_offset=4]
    meta[unsafe_offset=12] = m[unsafe_offset=10]
    meta[unsafe_offset=13] = st[unsafe_offset=6]
    meta[unsafe_offset=14] = st[unsafe_offset=16]
    meta[unsafe_offset=15] = Int64(workers)
    meta[unsafe_offset=16] = m[unsafe_offset=KV_DTYPE]
    # A team for the GEMV sizes (up to SMALL_T rows); more rows take the GEMM and its own threads.
    var team = min(workers, Int(m[unsafe_offset=11])) if t <= SMALL_T else 1
    var step = Step(m, Int(m[unsafe_offset=0]), Int(m[unsafe_offset=1]), Int(m[unsafe_offset=2]),
                    Int(m[unsafe_offset=3]), Int(m[unsafe_offset=4]), Int(m[unsafe_offset=5]),
                    Int(m[unsafe_offset=6]), m[unsafe_offset=7] != 0, _f32(m[unsafe_offset=9]),
                    Int(m[unsafe_offset=12]), t, Int(st[unsafe_offset=1]),
                    _f32(st[unsafe_offset=2]), I32Ptr(unsafe_from_address=Int(st[unsafe_offset=3])),
                    I64Ptr(unsafe_from_address=Int(st[unsafe_offset=4])), Int(st[unsafe_offset=8]),
                    Int(st[unsafe_offset=9]), Int(st[unsafe_offset=10]), Int(st[unsafe_offset=11]),
                    Int(st[unsafe_offset=12]), Int(st[unsafe_offset=13]), Int(st[unsafe_offset=18]), meta,
                    Float32(py=eps_py), Float32(py=scale_py), team, team)
    var phases = Int(m[unsafe_offset=0]) * PHASES_PER_LAYER + 1
    var counters = List[Int64](length=2 * phases, fill=0)
    var ctr = I64Ptr(unsafe_from_address=Int(counters.unsafe_ptr()))
    if team == 1:
        step.run(0, ctr)
    else:
        def work(w: Int) {imm step, imm ctr}:
            try:
                step.run(w, ctr)
            except e:
                # Python checked every type, path and shape first, so no kernel should refuse
                # here; if one did, the others would wait forever for its chunks: stop loudly
                abort(String("decode_step: a kernel raised inside the worker team: ", e))

        parallelize(work, team)
    _ = meta_list^
    _ = counters^
    return PythonObject(None)


@export
def PyInit_decode() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("decode")
        m.def_function[decode_step]("decode_step", docstring="every layer of one decode step: (model, step, eps, scale)")
        return m.finalize()
    except e:
        abort(String("failed to create the decode module: ", e))
