# Elementwise and normalisation kernels of the Llama-family forward (CPU, float32).
#
# Every op takes raw buffer addresses plus sizes from mojollm.kernels.nn, which has already
# checked shapes, dtypes, contiguity and index ranges; nothing here re-validates.
#
# Threading: one parallel region per op at most. A region costs ~10 us of thread wake-up, so
# ops smaller than PARALLEL_MIN_ELEMS (decode-sized rows such as T=1 x 576) run on the calling
# thread.

from std.math import exp, sqrt
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import num_physical_cores, simd_width_of

from max.algorithm import parallelize

comptime F32Ptr = Pointer[Float32, MutAnyOrigin]
comptime I32Ptr = Pointer[Int32, MutAnyOrigin]
comptime W = simd_width_of[DType.float32]()
comptime Vec = SIMD[DType.float32, W]
comptime HalfVec = SIMD[DType.float32, W // 2]
comptime PARALLEL_MIN_ELEMS = 1 << 16


@always_inline
def _exp0[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """exp(x), exactly 0 below -87 instead of a subnormal: subnormal operands cost ~100 cycles
    each on threads that do not flush them to zero (the Python thread runs small ops)."""
    return x.ge(SIMD[DType.float32, n](-87.0)).select(exp(x), SIMD[DType.float32, n](0))


def _f32(addr: PythonObject) raises -> F32Ptr:
    return F32Ptr(unsafe_from_address=Int(py=addr))


def _i32(addr: PythonObject) raises -> I32Ptr:
    return I32Ptr(unsafe_from_address=Int(py=addr))


def _num_chunks(rows: Int, row_elems: Int) -> Int:
    """How many row chunks to split an op into: 1 (no parallel region) when it is small."""
    if rows < 2 or rows * row_elems < PARALLEL_MIN_ELEMS:
        return 1
    return min(rows, 4 * num_physical_cores())


# ---------------------------------------------------------------- rms_norm


@always_inline
def _sum_squares(x: F32Ptr, base: Int, n: Int) -> Float32:
    var acc0 = Vec(0)
    var acc1 = Vec(0)
    var i = 0
    while i + 2 * W <= n:
        var a = x.unsafe_load[width=W](base + i)
        var b = x.unsafe_load[width=W](base + i + W)
        acc0 += a * a
        acc1 += b * b
        i += 2 * W
    while i + W <= n:
        var a = x.unsafe_load[width=W](base + i)
        acc0 += a * a
        i += W
    var s = (acc0 + acc1).reduce_add()
    while i < n:
        var a = x[unsafe_offset=base + i]
        s += a * a
        i += 1
    return s


@always_inline
def _scale_by_weight(src: F32Ptr, dst: F32Ptr, w: F32Ptr, base: Int, n: Int, inv: Float32):
    """dst[base:base+n] = src[base:base+n] * inv * w[0:n]."""
    var i = 0
    while i + W <= n:
        dst.unsafe_store(base + i, src.unsafe_load[width=W](base + i) * inv * w.unsafe_load[width=W](i))
        i += W
    while i < n:
        dst[unsafe_offset=base + i] = src[unsafe_offset=base + i] * inv * w[unsafe_offset=i]
        i += 1


def rms_norm(args: PythonObject, eps: PythonObject) raises -> PythonObject:
    """Args (x, weight, out, rows, n): out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight."""
    var x = _f32(args[0])
    var w = _f32(args[1])
    var out = _f32(args[2])
    var rows = Int(py=args[3])
    var n = Int(py=args[4])
    var e = Float32(py=eps)
    var chunks = _num_chunks(rows, n)
    var per = (rows + chunks - 1) // chunks

    def work(c: Int) {imm x, imm w, imm out, imm rows, imm n, imm e, imm per}:
        for r in range(c * per, min(rows, (c + 1) * per)):
            var inv = 1.0 / sqrt(_sum_squares(x, r * n, n) / Float32(n) + e)
            _scale_by_weight(x, out, w, r * n, n, inv)

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


def add_rms_norm(args: PythonObject, eps: PythonObject) raises -> PythonObject:
    """Args (x, residual, weight, out, rows, n): residual += x; out = rms_norm(residual)."""
    var x = _f32(args[0])
    var res = _f32(args[1])
    var w = _f32(args[2])
    var out = _f32(args[3])
    var rows = Int(py=args[4])
    var n = Int(py=args[5])
    var e = Float32(py=eps)
    var chunks = _num_chunks(rows, n)
    var per = (rows + chunks - 1) // chunks

    def work(c: Int) {imm x, imm res, imm w, imm out, imm rows, imm n, imm e, imm per}:
        for r in range(c * per, min(rows, (c + 1) * per)):
            var base = r * n
            # One pass adds and accumulates the squares; a second scales (the row stays in L1).
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
            var inv = 1.0 / sqrt(ss / Float32(n) + e)
            _scale_by_weight(res, out, w, base, n, inv)

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


# ---------------------------------------------------------------- add


def add(args: PythonObject) raises -> PythonObject:
    """Args (a, b, out, rows, n, b_row_stride): out[r] = a[r] + b[r * b_row_stride ...].
    b_row_stride is n for same-shape operands and 0 for a broadcast bias vector [n]."""
    var a = _f32(args[0])
    var b = _f32(args[1])
    var out = _f32(args[2])
    var rows = Int(py=args[3])
    var n = Int(py=args[4])
    var bstride = Int(py=args[5])
    var chunks = _num_chunks(rows, n)
    var per = (rows + chunks - 1) // chunks

    def work(c: Int) {imm a, imm b, imm out, imm rows, imm n, imm bstride, imm per}:
        for r in range(c * per, min(rows, (c + 1) * per)):
            var base = r * n
            var bb = r * bstride
            var i = 0
            while i + W <= n:
                out.unsafe_store(base + i, a.unsafe_load[width=W](base + i) + b.unsafe_load[width=W](bb + i))
                i += W
            while i < n:
                out[unsafe_offset=base + i] = a[unsafe_offset=base + i] + b[unsafe_offset=bb + i]
                i += 1

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


# ---------------------------------------------------------------- silu_mul


def silu_mul(args: PythonObject) raises -> PythonObject:
    """Args (gate_up, out, rows, f): out[r, i] = silu(gate_up[r, i]) * gate_up[r, f + i]."""
    var gu = _f32(args[0])
    var out = _f32(args[1])
    var rows = Int(py=args[2])
    var f = Int(py=args[3])
    var chunks = _num_chunks(rows, 2 * f)
    var per = (rows + chunks - 1) // chunks

    def work(c: Int) {imm gu, imm out, imm rows, imm f, imm per}:
        for r in range(c * per, min(rows, (c + 1) * per)):
            var g0 = r * 2 * f
            var u0 = g0 + f
            var o0 = r * f
            var i = 0
            while i + W <= f:
                var g = gu.unsafe_load[width=W](g0 + i)
                # silu(g) = g / (1 + e^-g); e^-g overflows to inf for g < -88 and g/inf = -0.
                out.unsafe_store(o0 + i, g / (1.0 + _exp0(-g)) * gu.unsafe_load[width=W](u0 + i))
                i += W
            while i < f:
                var g = gu[unsafe_offset=g0 + i]
                out[unsafe_offset=o0 + i] = g / (1.0 + _exp0[1](-g)) * gu[unsafe_offset=u0 + i]
                i += 1

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


# ---------------------------------------------------------------- softmax


def softmax(args: PythonObject) raises -> PythonObject:
    """Args (x, out, rows, n): out[r] = exp(x[r] - max x[r]) / sum(...), per row."""
    var x = _f32(args[0])
    var out = _f32(args[1])
    var rows = Int(py=args[2])
    var n = Int(py=args[3])
    var chunks = _num_chunks(rows, n)
    var per = (rows + chunks - 1) // chunks

    def work(c: Int) {imm x, imm out, imm rows, imm n, imm per}:
        for r in range(c * per, min(rows, (c + 1) * per)):
            var base = r * n
            var mv = Vec(x[unsafe_offset=base])
            var i = 0
            while i + W <= n:
                mv = max(mv, x.unsafe_load[width=W](base + i))
                i += W
            var m = mv.reduce_max()
            while i < n:
                m = max(m, x[unsafe_offset=base + i])
                i += 1
            var sv = Vec(0)
            i = 0
            while i + W <= n:
                var e = _exp0(x.unsafe_load[width=W](base + i) - m)
                out.unsafe_store(base + i, e)
                sv += e
                i += W
            var s = sv.reduce_add()
            while i < n:
                var e = _exp0[1](x[unsafe_offset=base + i] - m)
                out[unsafe_offset=base + i] = e
                s += e
                i += 1
            var inv = 1.0 / s
            i = 0
            while i + W <= n:
                out.unsafe_store(base + i, out.unsafe_load[width=W](base + i) * inv)
                i += W
            while i < n:
                out[unsafe_offset=base + i] = out[unsafe_offset=base + i] * inv
                i += 1

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


# ---------------------------------------------------------------- rope


@always_inline
def _rope_neox(x: F32Ptr, base: Int, cs: F32Ptr, crow: Int, half: Int):
    """Pairs (i, i + half) of one head, HF rotate_half: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
    var i = 0
    while i + W <= half:
        var c = cs.unsafe_load[width=W](crow + i)
        var s = cs.unsafe_load[width=W](crow + half + i)
        var x1 = x.unsafe_load[width=W](base + i)
        var x2 = x.unsafe_load[width=W](base + half + i)
        x.unsafe_store(base + i, x1 * c - x2 * s)
        x.unsafe_store(base + half + i, x2 * c + x1 * s)
        i += W
    while i < half:
        var c = cs[unsafe_offset=crow + i]
        var s = cs[unsafe_offset=crow + half + i]
        var x1 = x[unsafe_offset=base + i]
        var x2 = x[unsafe_offset=base + half + i]
        x[unsafe_offset=base + i] = x1 * c - x2 * s
        x[unsafe_offset=base + half + i] = x2 * c + x1 * s
        i += 1


@always_inline
def _rope_interleaved(x: F32Ptr, base: Int, cs: F32Ptr, crow: Int, half: Int):
    """Pairs (2i, 2i + 1) of one head (llama.cpp "normal" / GPT-J layout), angle i."""
    comptime H = W // 2
    var i = 0
    while i + H <= half:
        var c = cs.unsafe_load[width=H](crow + i)
        var s = cs.unsafe_load[width=H](crow + half + i)
        var pair = x.unsafe_load[width=W](base + 2 * i).deinterleave()
        var even = rebind[SIMD[DType.float32, H]](pair[0])
        var odd = rebind[SIMD[DType.float32, H]](pair[1])
        x.unsafe_store(base + 2 * i, (even * c - odd * s).interleave(odd * c + even * s))
        i += H
    while i < half:
        var c = cs[unsafe_offset=crow + i]
        var s = cs[unsafe_offset=crow + half + i]
        var x0 = x[unsafe_offset=base + 2 * i]
        var x1 = x[unsafe_offset=base + 2 * i + 1]
        x[unsafe_offset=base + 2 * i] = x0 * c - x1 * s
        x[unsafe_offset=base + 2 * i + 1] = x1 * c + x0 * s
        i += 1


def rope(args: PythonObject, neox: PythonObject) raises -> PythonObject:
    """Args (x, positions, cos_sin, tokens, heads, head_dim, rot_dim): rotate x[T, H, D] in
    place. Row p of cos_sin holds cos(p * f_i) for i < rot_dim/2, then sin(p * f_i); only the
    first rot_dim features of each head rotate (partial rotary), the rest pass through."""
    var x = _f32(args[0])
    var pos = _i32(args[1])
    var cs = _f32(args[2])
    var tokens = Int(py=args[3])
    var heads = Int(py=args[4])
    var d = Int(py=args[5])
    var rot = Int(py=args[6])
    var is_neox = Bool(py=neox)
    var half = rot // 2
    var chunks = _num_chunks(tokens, heads * rot)
    var per = (tokens + chunks - 1) // chunks

    def work(c: Int) {imm x, imm pos, imm cs, imm tokens, imm heads, imm d, imm rot, imm is_neox, imm half, imm per}:
        for t in range(c * per, min(tokens, (c + 1) * per)):
            var crow = Int(pos[unsafe_offset=t]) * rot
            for h in range(heads):
                var base = (t * heads + h) * d
                if is_neox:
                    _rope_neox(x, base, cs, crow, half)
                else:
                    _rope_interleaved(x, base, cs, crow, half)

    if chunks == 1:
        work(0)
    else:
        parallelize(work, chunks)
    return PythonObject(None)


def workers() raises -> PythonObject:
    return PythonObject(num_physical_cores())


@export
def PyInit_nn() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("nn")
        m.def_function[rms_norm]("rms_norm")
        m.def_function[add_rms_norm]("add_rms_norm")
        m.def_function[add]("add")
        m.def_function[silu_mul]("silu_mul")
        m.def_function[softmax]("softmax")
        m.def_function[rope]("rope")
        m.def_function[workers]("workers")
        return m.finalize()
    except e:
        abort(String("failed to initialise the nn kernel module: ", e))
