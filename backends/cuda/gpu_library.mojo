# The cuda backend's entries into Modular's own kernel library (the `linalg` and `nn` packages the
# `max` wheel ships): the 16-bit GEMM of prefill and batched decode, and dense causal prefill
# attention. Our own kernels (gpu_ops) keep the shapes where they win: the GEMV of 1-8 tokens,
# quantized weights, paged decode attention.
#
# Specialised per model. Modular's Hopper GEMM takes its TMA/wgmma path only when the weight's N
# and K are compile-time constants, and flash attention wants the head counts and head dim static;
# so the model's shapes arrive as -D defines (MOJOLLM_GEMM<i>_N / _K for up to 8 bf16 weight
# shapes, MOJOLLM_ATTN_H / _KVH / _D) and the module is built and cached per shape set
# (python/mojollm/kernels/build.py keys the cache on them). Built without defines, it has only the
# all-dynamic GEMM, which the library serves through the vendor BLAS (cuBLAS / rocBLAS).
#
# mojollm: nvidia-only
# For AMD targets (gfx942) Modular's 26.7 GEMM wants N static even in its dynamic path and a
# static-shape build crashes the compiler (fdot2 bf16 selection in its split-K GEMV): the rocm
# backend does not build this module and keeps our kernels (built anyway, its entries refuse).
#
# Library entries launch on a DeviceContext's own stream, so every call wraps gpu_ops' context (its
# C++ handle, retained for the call): the library launches on the very stream torch runs on.
# Arguments arrive as one tuple of ints/floats per call, validated by backend.py.

from std.os import abort
from std.python import PythonObject, Python
from std.python.bindings import PythonModuleBuilder
from std.sys import get_defined_int
from std.sys.info import _accelerator_arch
from max.gpu.host import DeviceContext
from max.gpu.host.device_context import _DeviceContextCpp
from layout import TileTensor, row_major, Coord, Idx
from linalg.matmul import matmul
from nn.attention.gpu.mha import flash_attention
from nn.attention.mha_mask import CausalMask

comptime BF16 = DType.bfloat16
comptime F16 = DType.float16
comptime F32 = DType.float32
comptime NVIDIA_TARGET = _accelerator_arch().startswith("sm_") or "nvidia" in _accelerator_arch()

# The model's bf16 weight shapes [N, K] (0: an unused slot).
comptime GEMM0_N = get_defined_int["MOJOLLM_GEMM0_N", 0]()
comptime GEMM0_K = get_defined_int["MOJOLLM_GEMM0_K", 0]()
comptime GEMM1_N = get_defined_int["MOJOLLM_GEMM1_N", 0]()
comptime GEMM1_K = get_defined_int["MOJOLLM_GEMM1_K", 0]()
comptime GEMM2_N = get_defined_int["MOJOLLM_GEMM2_N", 0]()
comptime GEMM2_K = get_defined_int["MOJOLLM_GEMM2_K", 0]()
comptime GEMM3_N = get_defined_int["MOJOLLM_GEMM3_N", 0]()
comptime GEMM3_K = get_defined_int["MOJOLLM_GEMM3_K", 0]()
comptime GEMM4_N = get_defined_int["MOJOLLM_GEMM4_N", 0]()
comptime GEMM4_K = get_defined_int["MOJOLLM_GEMM4_K", 0]()
comptime GEMM5_N = get_defined_int["MOJOLLM_GEMM5_N", 0]()
comptime GEMM5_K = get_defined_int["MOJOLLM_GEMM5_K", 0]()
comptime GEMM6_N = get_defined_int["MOJOLLM_GEMM6_N", 0]()
comptime GEMM6_K = get_defined_int["MOJOLLM_GEMM6_K", 0]()
comptime GEMM7_N = get_defined_int["MOJOLLM_GEMM7_N", 0]()
comptime GEMM7_K = get_defined_int["MOJOLLM_GEMM7_K", 0]()
# The model's attention heads (0: no flash attention in this build).
comptime ATTN_H = get_defined_int["MOJOLLM_ATTN_H", 0]()
comptime ATTN_KVH = get_defined_int["MOJOLLM_ATTN_KVH", 0]()
comptime ATTN_D = get_defined_int["MOJOLLM_ATTN_D", 0]()


@always_inline
def _i(a: PythonObject, i: Int) raises -> Int:
    return Int(py=a[i])


@always_inline
def _mp[dt: DType](a: PythonObject, i: Int) raises -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=Int(py=a[i]))


@always_inline
def _ip[dt: DType](a: PythonObject, i: Int) raises -> Pointer[Scalar[dt], ImmutAnyOrigin]:
    return Pointer[Scalar[dt], ImmutAnyOrigin](unsafe_from_address=Int(py=a[i]))


@always_inline
def _ctx(a: PythonObject) raises -> DeviceContext:
    """gpu_ops' DeviceContext, from the C++ handle in argument 0."""
    return DeviceContext(Optional(Pointer[_DeviceContextCpp, MutUntrackedOrigin](unsafe_from_address=_i(a, 0))))


# ---- GEMM: C[M, N] = A[M, K] @ W[N, K]^T, 16-bit in, float32 out ----------------------------------
def _gemm_static[N: Int, K: Int](a: PythonObject) raises:
    # (ctx, c, a, w, M, N, K, code)
    var M = _i(a, 4)
    var ct = TileTensor(_mp[F32](a, 1), row_major(Coord(M, Idx[N])))
    var at = TileTensor(_ip[BF16](a, 2), row_major(Coord(M, Idx[K])))
    var wt = TileTensor(_ip[BF16](a, 3), row_major[N, K]())
    matmul[transpose_b=True, target="gpu"](ct, at, wt, _ctx(a))


def _gemm_dynamic[dt: DType](a: PythonObject) raises:
    comptime if NVIDIA_TARGET:
        var M = _i(a, 4)
        var N = _i(a, 5)
        var K = _i(a, 6)
        var ct = TileTensor(_mp[F32](a, 1), row_major(Coord(M, N)))
        var at = TileTensor(_ip[dt](a, 2), row_major(Coord(M, K)))
        var wt = TileTensor(_ip[dt](a, 3), row_major(Coord(N, K)))
        matmul[transpose_b=True, target="gpu"](ct, at, wt, _ctx(a))
    else:
        raise Error("gemm: the dynamic-shape GEMM is built for NVIDIA GPUs only")


def _static[N: Int, K: Int](n: Int, k: Int, a: PythonObject) raises -> Bool:
    """Run the [N, K] specialisation if it is the one asked for (an unused slot compiles nothing)."""
    comptime if NVIDIA_TARGET and N > 0 and K > 0:
        if n == N and k == K:
            _gemm_static[N, K](a)
            return True
    return False


def op_gemm(a: PythonObject) raises -> PythonObject:
    """(ctx, c, a, w, M, N, K, code, static): c float32; a, w code 1 bf16 or 2 f16. static 1 asks
    for the compiled [N, K] specialisation (an error if this build lacks it), 0 for the
    dynamic-shape path."""
    var code = _i(a, 7)
    if _i(a, 8) == 0:
        if code == 1:
            _gemm_dynamic[BF16](a)
        elif code == 2:
            _gemm_dynamic[F16](a)
        else:
            raise Error("gemm: unknown dtype code ", code)
        return PythonObject(None)
    var n = _i(a, 5)
    var k = _i(a, 6)
    if code != 1:
        raise Error("gemm: the static-shape GEMM is built for bfloat16 only")
    if not (_static[GEMM0_N, GEMM0_K](n, k, a) or _static[GEMM1_N, GEMM1_K](n, k, a)
            or _static[GEMM2_N, GEMM2_K](n, k, a) or _static[GEMM3_N, GEMM3_K](n, k, a)
            or _static[GEMM4_N, GEMM4_K](n, k, a) or _static[GEMM5_N, GEMM5_K](n, k, a)
            or _static[GEMM6_N, GEMM6_K](n, k, a) or _static[GEMM7_N, GEMM7_K](n, k, a)):
        raise Error("gemm: [", n, ", ", k, "] is not a shape this module was built for")
    return PythonObject(None)


# ---- causal prefill attention of one sequence, dense BSHD, bf16 ------------------------------------
def op_flash_attention(a: PythonObject) raises -> PythonObject:
    """(ctx, out, q, k, v, S, scale): out, q [S, H, D]; k, v [S, KVH, D]; bf16, contiguous; the
    sequence attends to itself only (no cached prefix), causally."""
    comptime if NVIDIA_TARGET and ATTN_H > 0 and ATTN_KVH > 0 and ATTN_D > 0:
        var S = _i(a, 5)
        var scale = Float32(Float64(py=a[6]))
        var ot = TileTensor(_mp[BF16](a, 1), row_major(Coord(1, S, Idx[ATTN_H], Idx[ATTN_D])))
        var qt = TileTensor(_ip[BF16](a, 2), row_major(Coord(1, S, Idx[ATTN_H], Idx[ATTN_D])))
        var kt = TileTensor(_ip[BF16](a, 3), row_major(Coord(1, S, Idx[ATTN_KVH], Idx[ATTN_D])))
        var vt = TileTensor(_ip[BF16](a, 4), row_major(Coord(1, S, Idx[ATTN_KVH], Idx[ATTN_D])))
        flash_attention(ot, qt, kt, vt, CausalMask(), scale, _ctx(a))
    else:
        raise Error("flash_attention: this module was built without attention heads")
    return PythonObject(None)


def op_shapes(a: PythonObject) raises -> PythonObject:
    """What this build was specialised for: ((N, K) ..., (H, KVH, D))."""
    var gemms = Python.list()
    comptime if GEMM0_N > 0:
        gemms.append(Python.tuple(GEMM0_N, GEMM0_K))
    comptime if GEMM1_N > 0:
        gemms.append(Python.tuple(GEMM1_N, GEMM1_K))
    comptime if GEMM2_N > 0:
        gemms.append(Python.tuple(GEMM2_N, GEMM2_K))
    comptime if GEMM3_N > 0:
        gemms.append(Python.tuple(GEMM3_N, GEMM3_K))
    comptime if GEMM4_N > 0:
        gemms.append(Python.tuple(GEMM4_N, GEMM4_K))
    comptime if GEMM5_N > 0:
        gemms.append(Python.tuple(GEMM5_N, GEMM5_K))
    comptime if GEMM6_N > 0:
        gemms.append(Python.tuple(GEMM6_N, GEMM6_K))
    comptime if GEMM7_N > 0:
        gemms.append(Python.tuple(GEMM7_N, GEMM7_K))
    return Python.tuple(gemms, Python.tuple(ATTN_H, ATTN_KVH, ATTN_D))


@export
def PyInit_gpu_library() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("gpu_library")
        m.def_function[op_gemm]("gemm")
        m.def_function[op_flash_attention]("flash_attention")
        m.def_function[op_shapes]("shapes")
        return m.finalize()
    except e:
        abort(String("failed to create module gpu_library: ", e))
