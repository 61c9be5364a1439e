# One call per decode step on the CPU: every layer of a Llama-family model for 1..8 sequences
# (one new token each), so the Mojo worker pool stays busy from op to op.
#
# Why: the per-op path pays ~4-5 ms of Python per token on the default model (30 layers x ~12
# calls with their checks), and a parallel region costs 200-400 us once the workers have idled
# ~40 us, which every Python call between kernels gave them. Here the same kernels
# (quant._matmul, kquant._matmul, attention.decode_attention) run back to back with no Python
# between them. (Splitting the small GEMVs too, now that the workers stay awake, measured slower
# on 2 shared cores: they keep the kernels' own thresholds.)
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
#     [9] cos_sin [10] block_size [11] GEMV work items (0: the kernel's own choice)
#     [12] matmul path (quant.PATH_*: -1 = int8 activations where the kernel prefers them; the
#     per-op path's choice, mojollm.kernels.quant.default_dot)
#     then per layer, LAYER_FIELDS values:
#     attn_norm, qkv_w, qkv_qtype, o_w, o_qtype, mlp_norm, gu_w, gu_qtype, down_w, down_qtype,
#     k_cache, v_cache, k_w, k_qtype, v_w, v_qtype
#     (k_w = 0: qkv_w holds the fused q | k | v rows; else q, k and v are separate weights, as in
#     GGUF files whose q/k/v tensors have different types, e.g. llama.cpp's Q4_K_M)
# Layout of the int64 `step` array (per call):
#     [0] T [1] x [2] residual [3] positions (int32) [4] slots (int64) [5] block_tables (int32)
#     [6] M (table width) [7] context_lens (int32) [8] qkv buf [9] q buf [10] attn buf
#     [11] hidden buf [12] gate_up buf [13] act buf [14] attention scratch [15] attention
#     partials [16] attention splits [17] workers

from std.math import exp, sqrt
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import simd_width_of

from attention import decode_attention
from quant import _matmul, Q4_0, Q4_1, Q8_0
from kquant import _matmul as _kmatmul, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

comptime F32Ptr = Pointer[Float32, MutAnyOrigin]
comptime I32Ptr = Pointer[Int32, MutAnyOrigin]
comptime I64Ptr = Pointer[Int64, MutAnyOrigin]
comptime AttnMeta = Pointer[Int64, MutUntrackedOrigin]
comptime W = simd_width_of[DType.float32]()
comptime Vec = SIMD[DType.float32, W]
comptime HEADER = 13
comptime LAYER_FIELDS = 16


@always_inline
def _f32(addr: Int64) -> F32Ptr:
    return F32Ptr(unsafe_from_address=Int(addr))


def _linear(qt: Int, w: Int64, x: Int, y: Int, t: Int, n: Int, k: Int, items: Int, path: Int) raises:
    if qt == Q4_0:
        _matmul[Q4_0](Int(w), x, y, t, n, k, items, path)
    elif qt == Q4_1:
        _matmul[Q4_1](Int(w), x, y, t, n, k, items, path)
    elif qt == Q8_0:
        _matmul[Q8_0](Int(w), x, y, t, n, k, items, path)
    elif qt == Q5_0:  # mojo/kquant.mojo: int8 activations on quant.mojo's GEMV as Q4_0 (path)
        _kmatmul[Q5_0](Int(w), x, y, t, n, k, items, path)
    elif qt == Q5_1:
        _kmatmul[Q5_1](Int(w), x, y, t, n, k, items, path)
    elif qt == Q2_K:  # the k-quants: float32 activations
        _kmatmul[Q2_K](Int(w), x, y, t, n, k, items)
    elif qt == Q3_K:
        _kmatmul[Q3_K](Int(w), x, y, t, n, k, items)
    elif qt == Q4_K:
        _kmatmul[Q4_K](Int(w), x, y, t, n, k, items)
    elif qt == Q5_K:
        _kmatmul[Q5_K](Int(w), x, y, t, n, k, items)
    elif qt == Q6_K:
        _kmatmul[Q6_K](Int(w), x, y, t, n, k, items)
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
def _silu_mul(gu: F32Ptr, dst: F32Ptr, rows: Int, f: Int):
    for r in range(rows):
        var g0 = r * 2 * f
        for i in range(f):
            var g = gu[unsafe_offset=g0 + i]
            # silu(g) = g / (1 + e^-g), with e^-g taken as 0 beyond exp's float range
            var e = exp(-g) if g > -87.0 else Float32(0)
            dst[unsafe_offset=r * f + i] = g / (1.0 + e) * gu[unsafe_offset=g0 + f + i]


def decode_step(model_addr: PythonObject, step_addr: PythonObject, eps_py: PythonObject,
                scale_py: PythonObject) raises -> PythonObject:
    var m = I64Ptr(unsafe_from_address=Int(py=model_addr))
    var st = I64Ptr(unsafe_from_address=Int(py=step_addr))
    var eps = Float32(py=eps_py)
    var scale = Float32(py=scale_py)
    var layers = Int(m[unsafe_offset=0])
    var hidden = Int(m[unsafe_offset=1])
    var h = Int(m[unsafe_offset=2])
    var kvh = Int(m[unsafe_offset=3])
    var d = Int(m[unsafe_offset=4])
    var f = Int(m[unsafe_offset=5])
    var half = Int(m[unsafe_offset=6]) // 2
    var rot = Int(m[unsafe_offset=6])
    var neox = m[unsafe_offset=7] != 0
    var cs = _f32(m[unsafe_offset=9])
    var bs = Int(m[unsafe_offset=10])
    var items = Int(m[unsafe_offset=11])
    var path = Int(m[unsafe_offset=12])

    var t = Int(st[unsafe_offset=0])
    var x = Int(st[unsafe_offset=1])
    var res = _f32(st[unsafe_offset=2])
    var pos = I32Ptr(unsafe_from_address=Int(st[unsafe_offset=3]))
    var slots = I64Ptr(unsafe_from_address=Int(st[unsafe_offset=4]))
    var qkv = Int(st[unsafe_offset=8])
    var qbuf = Int(st[unsafe_offset=9])
    var attn = Int(st[unsafe_offset=10])
    var hbuf = Int(st[unsafe_offset=11])
    var gu = Int(st[unsafe_offset=12])
    var act = Int(st[unsafe_offset=13])
    var row = (h + 2 * kvh) * d

    # the attention's meta array: only the caches change from layer to layer
    var meta_list = List[Int64](length=16, fill=0)
    var meta = AttnMeta(unsafe_from_address=Int(meta_list.unsafe_ptr()))
    meta[unsafe_offset=0] = Int64(qbuf)
    meta[unsafe_offset=3] = st[unsafe_offset=5]
    meta[unsafe_offset=4] = st[unsafe_offset=7]
    meta[unsafe_offset=5] = Int64(attn)
    meta[unsafe_offset=6] = st[unsafe_offset=14]
    meta[unsafe_offset=7] = st[unsafe_offset=15]
    meta[unsafe_offset=8] = Int64(t)
    meta[unsafe_offset=9] = Int64(h)
    meta[unsafe_offset=10] = Int64(kvh)
    meta[unsafe_offset=11] = Int64(d)
    meta[unsafe_offset=12] = Int64(bs)
    meta[unsafe_offset=13] = st[unsafe_offset=6]
    meta[unsafe_offset=14] = st[unsafe_offset=16]
    meta[unsafe_offset=15] = st[unsafe_offset=17]

    var xp = _f32(Int64(x))
    var qkvp = _f32(Int64(qkv))
    var qp = _f32(Int64(qbuf))
    for layer in range(layers):
        var L = HEADER + layer * LAYER_FIELDS
        # -- attention --
        if m[unsafe_offset=L + 12] == 0:
            _linear(Int(m[unsafe_offset=L + 2]), m[unsafe_offset=L + 1], x, qkv, t, row, hidden, items, path)
        else:  # q, k, v into their own rows (gate_up's buffer is free here), then the fused layout
            var kvd = kvh * d
            _linear(Int(m[unsafe_offset=L + 2]), m[unsafe_offset=L + 1], x, gu, t, h * d, hidden, items, path)
            _linear(Int(m[unsafe_offset=L + 13]), m[unsafe_offset=L + 12], x, gu + 4 * t * h * d, t, kvd, hidden,
                    items, path)
            _linear(Int(m[unsafe_offset=L + 15]), m[unsafe_offset=L + 14], x, gu + 4 * t * (h * d + kvd), t, kvd,
                    hidden, items, path)
            var gp = _f32(Int64(gu))
            for tok in range(t):
                for i in range(h * d):
                    qkvp[unsafe_offset=tok * row + i] = gp[unsafe_offset=tok * h * d + i]
                for i in range(kvd):
                    qkvp[unsafe_offset=tok * row + h * d + i] = gp[unsafe_offset=t * h * d + tok * kvd + i]
                    qkvp[unsafe_offset=tok * row + h * d + kvd + i] = gp[unsafe_offset=t * (h * d + kvd) + tok * kvd + i]
        var kc = _f32(m[unsafe_offset=L + 10])
        var vc = _f32(m[unsafe_offset=L + 11])
        for tok in range(t):
            var crow = Int(pos[unsafe_offset=tok]) * rot
            var base = tok * row
            for hh in range(h + kvh):  # q heads, then k heads
                _rope_head(qkvp, base + hh * d, cs, crow, half, neox)
            for i in range(h * d):
                qp[unsafe_offset=tok * h * d + i] = qkvp[unsafe_offset=base + i]
            var dst = Int(slots[unsafe_offset=tok]) * kvh * d
            for i in range(kvh * d):
                kc[unsafe_offset=dst + i] = qkvp[unsafe_offset=base + h * d + i]
                vc[unsafe_offset=dst + i] = qkvp[unsafe_offset=base + (h + kvh) * d + i]
        meta[unsafe_offset=1] = m[unsafe_offset=L + 10]
        meta[unsafe_offset=2] = m[unsafe_offset=L + 11]
        decode_attention(meta, scale)
        _linear(Int(m[unsafe_offset=L + 4]), m[unsafe_offset=L + 3], attn, hbuf, t, hidden, h * d, items, path)
        _add_rms_norm(_f32(Int64(hbuf)), res, _f32(m[unsafe_offset=L + 5]), xp, t, hidden, eps)
        # -- MLP (SwiGLU) --
        _linear(Int(m[unsafe_offset=L + 7]), m[unsafe_offset=L + 6], x, gu, t, 2 * f, hidden, items, path)
        _silu_mul(_f32(Int64(gu)), _f32(Int64(act)), t, f)
        _linear(Int(m[unsafe_offset=L + 9]), m[unsafe_offset=L + 8], act, hbuf, t, hidden, f, items, path)
        var next_norm = m[unsafe_offset=8] if layer + 1 == layers else m[unsafe_offset=L + LAYER_FIELDS]
        _add_rms_norm(_f32(Int64(hbuf)), res, _f32(next_norm), xp, t, hidden, eps)
    _ = meta_list^
    return PythonObject(None)


@export
def PyInit_decode() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("decode")
        m.def_function[decode_step]("decode_step", docstring="every layer of one decode step: (model, step, eps, scale)")
        return m.finalize()
    except e:
        abort(String("failed to create the decode module: ", e))
