# The cuda backend's kernel module: Python entry points that launch the kernels of
# gpu_elementwise / gpu_linear / gpu_attention on memory owned by torch.
#
# Interop (verified on an H100, torch 2.11):
#   * memory: torch tensors are passed as data_ptr() integers and wrapped as typed device pointers,
#     no copies. Mojo's DeviceContext binds the device's primary CUDA context, the one torch uses,
#     so the addresses are valid as they are.
#   * one GpuState (one DeviceContext) per process: creating a context costs milliseconds.
#   * streams: every launch goes to the CUDA stream whose handle the caller passes (torch's current
#     stream), wrapped once as an external DeviceStream and cached. So Mojo kernels and torch ops
#     are ordered on one stream, and torch.cuda.graph captures Mojo launches like its own. The
#     legacy default stream (handle 0) cannot be wrapped; the Python side therefore makes torch's
#     current stream a real stream before it calls in.
#
# Arguments arrive as one Python tuple of ints/floats per call (stream, addresses, sizes, ...);
# the Python wrapper has validated shapes, dtypes, alignment and bounds before calling.

from std.os import abort
from std.collections import Dict
from std.python import PythonObject, Python
from std.python.bindings import PythonModuleBuilder
from std.sys.info import _accelerator_arch
from std.math import ceildiv
from max.gpu import WARP_SIZE
from max.gpu.host import DeviceContext, DeviceStream, FuncAttribute
from max.gpu.host._nvidia_cuda import CUDA

from gpu_common import (
    Ptr, F32P, I32P, I64P, U8P, F16P, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F8_E4M3, W8A8, DT_F32,
    DT_BF16, DT_F16, KV_I8, KV_FP8,
)
from gpu_elementwise import (
    ROW_BLOCK, TOKEN_BLOCK, embedding_dense_kernel, embedding_quant_kernel, dequant_kernel, rms_norm_kernel,
    add_rms_norm_kernel, add_kernel, rope_kernel, silu_mul_kernel, store_kv_kernel, convert_kernel,
    store_kv_quant_kernel, KVQ_WARPS, quantize_q8_kernel, quantize_q8_token_kernel, f16_blocks_kernel,
)
from gpu_linear import (
    GEMV_WARPS, gemv_dense_kernel, gemv_scalar_kernel, gemv_quant_kernel, QG_THREADS, gemm_simt_kernel, SG_BM, SG_BN,
    gemv_f8_kernel, f8_smem_bytes, dequant_f8_kernel, F8_ROWS,
)
from gpu_kquant import gemv_kq_kernel, dequant_kq_kernel, embedding_kq_kernel, KQ_WARPS
from gpu_attention import (
    attn_prefill_simt_kernel, attn_prefill_mma_kernel, attn_decode_kernel, attn_combine_kernel,
    decode_smem_bytes, decode_warps, prefill_mma_smem_bytes, SP_THREADS, FA_THREADS,
)

# Tensor-core kernels (mma.sync, ldmatrix) exist for NVIDIA targets only; elsewhere the SIMT
# kernels serve every dtype and these entry points refuse.
comptime NVIDIA_TARGET = _accelerator_arch().startswith("sm_") or "nvidia" in _accelerator_arch()

comptime F32 = DType.float32
comptime BF16 = DType.bfloat16
comptime F16 = DType.float16


struct GpuState(Defaultable, Movable, Writable):
    var ctx: DeviceContext
    var streams: Dict[Int, DeviceStream]

    def __init__(out self):
        try:
            self.ctx = DeviceContext()
        except e:
            abort(String("mojollm cuda: cannot create a DeviceContext: ", e))
        self.streams = Dict[Int, DeviceStream]()

    def write_to(self, mut writer: Some[Writer]):
        writer.write("GpuState")

    def write_repr_to(self, mut writer: Some[Writer]):
        writer.write("GpuState()")

    def stream(mut self, handle: Int) raises -> DeviceStream:
        if handle == 0:
            raise Error("the legacy default CUDA stream cannot carry Mojo launches; use a real stream")
        if handle not in self.streams:
            self.streams[handle] = self.ctx.create_external_stream(
                OpaquePointer[MutAnyOrigin](unsafe_from_address=handle)
            )
        return self.streams[handle]

    @staticmethod
    def own_stream(self_ptr: Pointer[Self, MutAnyOrigin]) raises -> PythonObject:
        """Handle of the context's own (non-blocking) stream: the stream torch adopts."""
        return PythonObject(Int(CUDA(self_ptr[].ctx.stream()).value()))

    @staticmethod
    def context_handle(self_ptr: Pointer[Self, MutAnyOrigin]) raises -> PythonObject:
        return PythonObject(Int(CUDA(self_ptr[].ctx).value()))

    @staticmethod
    def device_context(self_ptr: Pointer[Self, MutAnyOrigin]) raises -> PythonObject:
        """Address of the C++ DeviceContext: gpu_library wraps it, so Modular's kernels launch on
        this context's own stream (the one torch adopts)."""
        return PythonObject(Int(self_ptr[].ctx._handle.value()))


comptime GpuPtr = Pointer[GpuState, MutAnyOrigin]


@always_inline
def _i(a: PythonObject, i: Int) raises -> Int:
    return Int(py=a[i])


@always_inline
def _n(a: PythonObject, i: Int) raises -> Int64:
    return Int64(Int(py=a[i]))


@always_inline
def _f(a: PythonObject, i: Int) raises -> Float32:
    return Float32(Float64(py=a[i]))


@always_inline
def _p[dt: DType](a: PythonObject, i: Int) raises -> Ptr[dt]:
    return Ptr[dt](unsafe_from_address=Int(py=a[i]))


@always_inline
def _state(gpu: PythonObject) raises -> GpuPtr:
    return gpu.downcast_value_ptr[GpuState]()


# ---- element-wise ops ----------------------------------------------------------------------------
def _embedding_dense[dt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, code, table, ids, out, err, T, V, Hd)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[embedding_dense_kernel[dt]]()
    st.enqueue_function(f, _p[dt](a, 2), _p[DType.int32](a, 3), _p[F32](a, 4), _p[DType.int32](a, 5),
                        _n(a, 7), _n(a, 8), grid_dim=_i(a, 6), block_dim=ROW_BLOCK)


def op_embedding_dense(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var code = _i(a, 1)
    if code == DT_F32:
        _embedding_dense[F32](g, a)
    elif code == DT_BF16:
        _embedding_dense[BF16](g, a)
    elif code == DT_F16:
        _embedding_dense[F16](g, a)
    else:
        raise Error("embedding_dense: unknown dtype code ", code)
    return PythonObject(None)


def _embedding_quant[QT: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, qs, d, m, ids, out, err, T, V, Hd)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[embedding_quant_kernel[QT]]()
    st.enqueue_function(f, _p[DType.uint8](a, 2), _p[F16](a, 3), _p[F16](a, 4), _p[DType.int32](a, 5),
                        _p[F32](a, 6), _p[DType.int32](a, 7), _n(a, 9), _n(a, 10),
                        grid_dim=_i(a, 8), block_dim=ROW_BLOCK)


def _embedding_kq[QT: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, qs, d, m, ids, out, err, T, V, Hd, h)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[embedding_kq_kernel[QT]]()
    st.enqueue_function(f, _p[DType.uint8](a, 2), _p[F16](a, 3), _p[F16](a, 4), _p[DType.uint32](a, 11),
                        _p[DType.int32](a, 5), _p[F32](a, 6), _p[DType.int32](a, 7), _n(a, 9), _n(a, 10),
                        grid_dim=_i(a, 8), block_dim=ROW_BLOCK)


def op_embedding_quant(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var qt = _i(a, 1)
    if qt == Q4_0:
        _embedding_quant[Q4_0](g, a)
    elif qt == Q4_1:
        _embedding_quant[Q4_1](g, a)
    elif qt == Q8_0:
        _embedding_quant[Q8_0](g, a)
    elif qt == F8_E4M3:
        _embedding_quant[F8_E4M3](g, a)
    elif qt == Q5_0:
        _embedding_kq[Q5_0](g, a)
    elif qt == Q5_1:
        _embedding_kq[Q5_1](g, a)
    elif qt == Q4_K:
        _embedding_kq[Q4_K](g, a)
    elif qt == Q5_K:
        _embedding_kq[Q5_K](g, a)
    elif qt == Q6_K:
        _embedding_kq[Q6_K](g, a)
    else:
        raise Error("embedding_quant: unknown quant code ", qt)
    return PythonObject(None)


def _dequant[QT: Int, odt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, odt, qs, d, m, out, N, K)
    var st = g[].stream(_i(a, 0))
    var total = _i(a, 7) * _i(a, 8)
    var f = g[].ctx.compile_function[dequant_kernel[QT, odt]]()
    st.enqueue_function(f, _p[DType.uint8](a, 3), _p[F16](a, 4), _p[F16](a, 5), _p[odt](a, 6),
                        _n(a, 7), _n(a, 8), grid_dim=ceildiv(total, 256), block_dim=256)


def _dequant_q[QT: Int](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == DT_F32:
        _dequant[QT, F32](g, a)
    elif _i(a, 2) == DT_BF16:
        _dequant[QT, BF16](g, a)
    else:
        raise Error("dequant: unknown output dtype code ", _i(a, 2))


def _dequant_kq[QT: Int, odt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, odt, qs, d, m, out, N, K, h)
    var st = g[].stream(_i(a, 0))
    var total = _i(a, 7) * _i(a, 8)
    var f = g[].ctx.compile_function[dequant_kq_kernel[QT, odt]]()
    st.enqueue_function(f, _p[DType.uint8](a, 3), _p[F16](a, 4), _p[F16](a, 5), _p[DType.uint32](a, 9),
                        _p[odt](a, 6), _n(a, 7), _n(a, 8), grid_dim=ceildiv(total, 256), block_dim=256)


def _dequant_kq_o[QT: Int](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == DT_F32:
        _dequant_kq[QT, F32](g, a)
    elif _i(a, 2) == DT_BF16:
        _dequant_kq[QT, BF16](g, a)
    else:
        raise Error("dequant: unknown output dtype code ", _i(a, 2))


def _dequant_f8[odt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, odt, qs, d, m, out, N, K, h): qs the tiled FP8 weight (d, m, h unused)
    var st = g[].stream(_i(a, 0))
    var threads = ceildiv(_i(a, 7), F8_ROWS) * (_i(a, 8) // 32) * WARP_SIZE
    var f = g[].ctx.compile_function[dequant_f8_kernel[odt]]()
    st.enqueue_function(f, _p[DType.uint32](a, 3), _p[odt](a, 6), _n(a, 7), _n(a, 8),
                        grid_dim=ceildiv(threads, 256), block_dim=256)


def _dequant_f8_o(g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == DT_F32:
        _dequant_f8[F32](g, a)
    elif _i(a, 2) == DT_BF16:
        _dequant_f8[BF16](g, a)
    else:
        raise Error("dequant: unknown output dtype code ", _i(a, 2))


def op_dequant(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var qt = _i(a, 1)
    if qt == Q4_0:
        _dequant_q[Q4_0](g, a)
    elif qt == Q4_1:
        _dequant_q[Q4_1](g, a)
    elif qt == Q8_0:
        _dequant_q[Q8_0](g, a)
    elif qt == F8_E4M3:
        _dequant_f8_o(g, a)
    elif qt == Q5_0:
        _dequant_kq_o[Q5_0](g, a)
    elif qt == Q5_1:
        _dequant_kq_o[Q5_1](g, a)
    elif qt == Q4_K:
        _dequant_kq_o[Q4_K](g, a)
    elif qt == Q5_K:
        _dequant_kq_o[Q5_K](g, a)
    elif qt == Q6_K:
        _dequant_kq_o[Q6_K](g, a)
    else:
        raise Error("dequant: unknown quant code ", qt)
    return PythonObject(None)


def op_rms_norm(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    # (stream, x, w, out, T, K, eps)
    var g = _state(gpu)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[rms_norm_kernel]()
    st.enqueue_function(f, _p[F32](a, 1), _p[F32](a, 2), _p[F32](a, 3), _n(a, 5), _f(a, 6),
                        grid_dim=_i(a, 4), block_dim=ROW_BLOCK)
    return PythonObject(None)


def op_add_rms_norm(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    # (stream, x, res, w, out, T, K, eps)
    var g = _state(gpu)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[add_rms_norm_kernel]()
    st.enqueue_function(f, _p[F32](a, 1), _p[F32](a, 2), _p[F32](a, 3), _p[F32](a, 4), _n(a, 6), _f(a, 7),
                        grid_dim=_i(a, 5), block_dim=ROW_BLOCK)
    return PythonObject(None)


def op_add(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    # (stream, a, b, out, n, bn)
    var g = _state(gpu)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[add_kernel]()
    st.enqueue_function(f, _p[F32](a, 1), _p[F32](a, 2), _p[F32](a, 3), _n(a, 4), _n(a, 5),
                        grid_dim=ceildiv(_i(a, 4), 256), block_dim=256)
    return PythonObject(None)


def _rope[NEOX: Bool](g: GpuPtr, a: PythonObject) raises:
    # (stream, neox, x, pos, cs, err, T, H, D, R, P)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[rope_kernel[NEOX]]()
    var half = _i(a, 9) // 2
    st.enqueue_function(f, _p[F32](a, 2), _p[DType.int32](a, 3), _p[F32](a, 4), _p[DType.int32](a, 5),
                        _n(a, 7), _n(a, 8), _n(a, 9), _n(a, 10),
                        grid_dim=_i(a, 6) * _i(a, 7), block_dim=min(128, ceildiv(half, 32) * 32))


def op_rope(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    if _i(a, 1) != 0:
        _rope[True](g, a)
    else:
        _rope[False](g, a)
    return PythonObject(None)


def op_silu_mul(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    # (stream, gu, out, T, F)
    var g = _state(gpu)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[silu_mul_kernel]()
    st.enqueue_function(f, _p[F32](a, 1), _p[F32](a, 2), _n(a, 3), _n(a, 4),
                        grid_dim=ceildiv(_i(a, 3) * _i(a, 4), 256), block_dim=256)
    return PythonObject(None)


def _store_kv[kdt: DType, cdt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, kcode, ccode, kc, vc, k, v, slots, err, T, E, num_slots)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[store_kv_kernel[kdt, cdt]]()
    st.enqueue_function(f, _p[cdt](a, 3), _p[cdt](a, 4), _p[kdt](a, 5), _p[kdt](a, 6), _p[DType.int64](a, 7),
                        _p[DType.int32](a, 8), _n(a, 10), _n(a, 11), grid_dim=_i(a, 9), block_dim=128)


def _store_kv_quant[QK: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, kcode, ccode, kc, vc, k, v, slots, err, T, E, num_slots, KVH): E = KVH D
    var st = g[].stream(_i(a, 0))
    var kvh = _i(a, 12)
    var f = g[].ctx.compile_function[store_kv_quant_kernel[QK]]()
    st.enqueue_function(f, _p[DType.uint8](a, 3), _p[DType.uint8](a, 4), _p[F32](a, 5), _p[F32](a, 6),
                        _p[DType.int64](a, 7), _p[DType.int32](a, 8), _n(a, 9), Int64(kvh), Int64(_i(a, 10) // kvh),
                        _n(a, 11), grid_dim=ceildiv(_i(a, 9) * kvh, KVQ_WARPS), block_dim=KVQ_WARPS * WARP_SIZE)


def op_store_kv(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    # ccode: the cache's code (DT_F32 / DT_BF16 / DT_F16, or KV_I8 / KV_FP8: then k, v are float32)
    var g = _state(gpu)
    var kcode = _i(a, 1)
    var ccode = _i(a, 2)
    if kcode == DT_F32 and ccode == DT_F32:
        _store_kv[F32, F32](g, a)
    elif kcode == DT_F32 and ccode == DT_BF16:
        _store_kv[F32, BF16](g, a)
    elif kcode == DT_BF16 and ccode == DT_BF16:
        _store_kv[BF16, BF16](g, a)
    elif kcode == DT_F32 and ccode == DT_F16:
        _store_kv[F32, F16](g, a)
    elif kcode == DT_F32 and ccode == KV_I8:
        _store_kv_quant[KV_I8](g, a)
    elif kcode == DT_F32 and ccode == KV_FP8:
        _store_kv_quant[KV_FP8](g, a)
    else:
        raise Error("store_kv: unsupported dtype codes ", kcode, " -> ", ccode)
    return PythonObject(None)


def _convert[sdt: DType, ddt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, scode, dcode, src, dst, n)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[convert_kernel[sdt, ddt]]()
    st.enqueue_function(f, _p[sdt](a, 3), _p[ddt](a, 4), _n(a, 5), grid_dim=ceildiv(_i(a, 5), 256), block_dim=256)


def op_convert(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var scode = _i(a, 1)
    var dcode = _i(a, 2)
    if scode == DT_F32 and dcode == DT_BF16:
        _convert[F32, BF16](g, a)
    elif scode == DT_F32 and dcode == DT_F16:
        _convert[F32, F16](g, a)
    elif scode == DT_BF16 and dcode == DT_F32:
        _convert[BF16, F32](g, a)
    elif scode == DT_F16 and dcode == DT_F32:
        _convert[F16, F32](g, a)
    else:
        raise Error("convert: unsupported dtype codes ", scode, " -> ", dcode)
    return PythonObject(None)


# ---- linear ----------------------------------------------------------------------------------------
def _gemv_dense[wdt: DType, NT: Int, R: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, wcode, nt, rows per warp (0: scalar kernel), x, w, bias, y, has_bias, T, N, K, grid_x)
    var st = g[].stream(_i(a, 0))
    var grid = (_i(a, 12), ceildiv(_i(a, 9), NT))
    comptime if R == 0:
        var f = g[].ctx.compile_function[gemv_scalar_kernel[wdt, NT]]()
        st.enqueue_function(f, _p[F32](a, 4), _p[wdt](a, 5), _p[F32](a, 6), _p[F32](a, 7), _n(a, 8), _n(a, 9),
                            _n(a, 10), _n(a, 11), grid_dim=grid, block_dim=GEMV_WARPS * 32)
    else:
        var f = g[].ctx.compile_function[gemv_dense_kernel[wdt, NT, R]]()
        st.enqueue_function(f, _p[F32](a, 4), _p[wdt](a, 5), _p[F32](a, 6), _p[F32](a, 7), _n(a, 8), _n(a, 9),
                            _n(a, 10), _n(a, 11), grid_dim=grid, block_dim=GEMV_WARPS * 32)


def _gemv_dense_r[wdt: DType, NT: Int](g: GpuPtr, a: PythonObject) raises:
    var r = _i(a, 3)
    if r == 4:
        _gemv_dense[wdt, NT, 4](g, a)
    elif r == 2:
        _gemv_dense[wdt, NT, 2](g, a)
    elif r == 1:
        _gemv_dense[wdt, NT, 1](g, a)
    elif r == 0:
        _gemv_dense[wdt, NT, 0](g, a)
    else:
        raise Error("gemv_dense: unsupported rows per warp ", r)


def _gemv_dense_nt[wdt: DType](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == 1:
        _gemv_dense_r[wdt, 1](g, a)
    else:
        _gemv_dense_r[wdt, 8](g, a)


def op_gemv_dense(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var code = _i(a, 1)
    if code == DT_F32:
        _gemv_dense_nt[F32](g, a)
    elif code == DT_BF16:
        _gemv_dense_nt[BF16](g, a)
    elif code == DT_F16:
        _gemv_dense_nt[F16](g, a)
    else:
        raise Error("gemv_dense: unknown dtype code ", code)
    return PythonObject(None)


def _gemv_quant[QT: Int, NT: Int, R: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, nt, x, qs, d, m, bias, y, has_bias, T, N, K, rows per block, scratch)
    # scratch: T K int8 codes, then T K/32 (dx, sum of codes) float32 pairs (8-byte aligned: K % 32 == 0)
    # W8A8: Q8_0's GEMV on activations quantized per token instead of per 32-block
    var st = g[].stream(_i(a, 0))
    var tk = _i(a, 10) * _i(a, 12)
    var scratch = _i(a, 14)
    comptime if QT == W8A8:
        var ft = g[].ctx.compile_function[quantize_q8_token_kernel]()
        st.enqueue_function(ft, _p[F32](a, 3), Ptr[DType.int8](unsafe_from_address=scratch),
                            Ptr[F32](unsafe_from_address=scratch + tk), _n(a, 12), grid_dim=_i(a, 10),
                            block_dim=TOKEN_BLOCK)
    else:
        var fq = g[].ctx.compile_function[quantize_q8_kernel]()
        st.enqueue_function(fq, _p[F32](a, 3), Ptr[DType.int8](unsafe_from_address=scratch),
                            Ptr[F32](unsafe_from_address=scratch + tk), Int64(tk), grid_dim=ceildiv(tk, 256),
                            block_dim=256)
    var f = g[].ctx.compile_function[gemv_quant_kernel[Q8_0 if QT == W8A8 else QT, NT, R]]()
    st.enqueue_function(f, Ptr[DType.uint32](unsafe_from_address=scratch), Ptr[F32](unsafe_from_address=scratch + tk),
                        _p[DType.uint32](a, 4), _p[F16](a, 5), _p[F16](a, 6), _p[F32](a, 7),
                        _p[F32](a, 8), _n(a, 9), _n(a, 10), _n(a, 11), _n(a, 12),
                        grid_dim=(ceildiv(_i(a, 11), R), ceildiv(_i(a, 10), NT)), block_dim=QG_THREADS)


def _gemv_quant_r[QT: Int, NT: Int](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 13) == 4:
        _gemv_quant[QT, NT, 4](g, a)
    else:
        _gemv_quant[QT, NT, 1](g, a)


def _gemv_quant_nt[QT: Int](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == 1:
        _gemv_quant_r[QT, 1](g, a)
    else:
        _gemv_quant_r[QT, 8](g, a)


def _gemv_kq[QT: Int, NT: Int, R: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, qt, nt, x, qs, d, m, bias, y, has_bias, T, N, K, rows per warp, scratch, h): scratch as
    # in _gemv_quant; a warp per R rows, KQ_WARPS warps per block
    var st = g[].stream(_i(a, 0))
    var tk = _i(a, 10) * _i(a, 12)
    var scratch = _i(a, 14)
    var fq = g[].ctx.compile_function[quantize_q8_kernel]()
    st.enqueue_function(fq, _p[F32](a, 3), Ptr[DType.int8](unsafe_from_address=scratch),
                        Ptr[F32](unsafe_from_address=scratch + tk), Int64(tk), grid_dim=ceildiv(tk, 256), block_dim=256)
    var f = g[].ctx.compile_function[gemv_kq_kernel[QT, NT, R]]()
    st.enqueue_function(f, Ptr[DType.uint32](unsafe_from_address=scratch), Ptr[F32](unsafe_from_address=scratch + tk),
                        _p[DType.uint32](a, 4), _p[F16](a, 5), _p[F16](a, 6), _p[DType.uint32](a, 15), _p[F32](a, 7),
                        _p[F32](a, 8), _n(a, 9), _n(a, 10), _n(a, 11), _n(a, 12),
                        grid_dim=(ceildiv(_i(a, 11), R * KQ_WARPS), ceildiv(_i(a, 10), NT)),
                        block_dim=KQ_WARPS * WARP_SIZE)


def _gemv_kq_r[QT: Int, NT: Int](g: GpuPtr, a: PythonObject) raises:
    var r = _i(a, 13)
    if r == 4:
        _gemv_kq[QT, NT, 4](g, a)
    elif r == 2:
        _gemv_kq[QT, NT, 2](g, a)
    elif r == 1:
        _gemv_kq[QT, NT, 1](g, a)
    else:
        raise Error("gemv_quant: unsupported rows per warp ", r)


def _gemv_kq_nt[QT: Int](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 2) == 1:
        _gemv_kq_r[QT, 1](g, a)
    else:
        _gemv_kq_r[QT, 8](g, a)


def op_gemv_quant(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var qt = _i(a, 1)
    if qt == Q4_0:
        _gemv_quant_nt[Q4_0](g, a)
    elif qt == Q4_1:
        _gemv_quant_nt[Q4_1](g, a)
    elif qt == Q8_0:
        _gemv_quant_nt[Q8_0](g, a)
    elif qt == W8A8:
        _gemv_quant_nt[W8A8](g, a)
    elif qt == Q5_0:
        _gemv_kq_nt[Q5_0](g, a)
    elif qt == Q5_1:
        _gemv_kq_nt[Q5_1](g, a)
    elif qt == Q4_K:
        _gemv_kq_nt[Q4_K](g, a)
    elif qt == Q5_K:
        _gemv_kq_nt[Q5_K](g, a)
    elif qt == Q6_K:
        _gemv_kq_nt[Q6_K](g, a)
    else:
        raise Error("gemv_quant: unknown quant code ", qt)
    return PythonObject(None)


def _gemv_f8[TT: Int, W: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, tiles, x, qs, bias, y, has_bias, T, N, K, scratch, warps)
    # qs: the tiled weight (gpu_linear); scratch: x as T K float16 (f16_blocks_kernel), then the
    # blocks' scales, float32 [K/32, Tp] (Tp = T rounded up to 8; offset 2 T K is 64-byte aligned)
    comptime if NVIDIA_TARGET:
        var st = g[].stream(_i(a, 0))
        var T = _i(a, 7)
        var N = _i(a, 8)
        var K = _i(a, 9)
        var scratch = _i(a, 10)
        var xh = Ptr[F16](unsafe_from_address=scratch)
        var sx = Ptr[F32](unsafe_from_address=scratch + T * K * 2)
        var fc = g[].ctx.compile_function[f16_blocks_kernel]()
        st.enqueue_function(fc, _p[F32](a, 2), xh, sx, Int64(T * K), Int64(K), Int64(ceildiv(T, 8) * 8),
                            grid_dim=ceildiv(T * K, 256), block_dim=256)
        # U units a cp.async stage, S stages a warp (S - 1 in flight while one is multiplied):
        # ~7.6 KB of weights in flight per warp up to 16 tokens, less as the activations' registers
        # (U TT 16-byte loads a stage) and the tensor-core work grow
        comptime U = 2 if TT <= 4 else 1
        comptime S = 8 if TT <= 2 else 4
        comptime smem = f8_smem_bytes[TT, U, W, S]()
        var f = g[].ctx.compile_function[gemv_f8_kernel[TT, U, W, S]](
            func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))
        )
        st.enqueue_function(f, xh, sx, _p[DType.uint32](a, 3), _p[F32](a, 4), _p[F32](a, 5),
                            _n(a, 6), Int64(T), Int64(N), Int64(K),
                            grid_dim=(ceildiv(N, F8_ROWS), ceildiv(T, 8 * TT)), block_dim=W * WARP_SIZE,
                            shared_mem_bytes=smem)
    else:
        raise Error("gemv_f8: the FP8 GEMV runs on NVIDIA tensor cores only")


def _gemv_f8_w[TT: Int](g: GpuPtr, a: PythonObject) raises:
    var w = _i(a, 11)
    if w == 4:
        _gemv_f8[TT, 4](g, a)
    elif w == 8:
        _gemv_f8[TT, 8](g, a)
    else:
        raise Error("gemv_f8: unsupported warps per block ", w)


def op_gemv_f8(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var tiles = _i(a, 1)
    if tiles == 1:
        _gemv_f8_w[1](g, a)
    elif tiles == 2:
        _gemv_f8_w[2](g, a)
    elif tiles == 4:
        _gemv_f8_w[4](g, a)
    elif tiles == 8:
        _gemv_f8_w[8](g, a)
    else:
        raise Error("gemv_f8: unsupported token tiles ", tiles)
    return PythonObject(None)


def _gemm_simt[wdt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, wcode, a, w, bias, c, has_bias, M, N, K)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[gemm_simt_kernel[F32, wdt]]()
    st.enqueue_function(f, _p[F32](a, 2), _p[wdt](a, 3), _p[F32](a, 4), _p[F32](a, 5), _n(a, 6), _n(a, 7),
                        _n(a, 8), _n(a, 9), grid_dim=(ceildiv(_i(a, 8), SG_BN), ceildiv(_i(a, 7), SG_BM)),
                        block_dim=256)


def op_gemm_simt(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var code = _i(a, 1)
    if code == DT_F32:
        _gemm_simt[F32](g, a)
    elif code == DT_BF16:
        _gemm_simt[BF16](g, a)
    elif code == DT_F16:
        _gemm_simt[F16](g, a)
    else:
        raise Error("gemm_simt: unknown dtype code ", code)
    return PythonObject(None)


# ---- attention ------------------------------------------------------------------------------------
# `pair` codes the (q, cache) types: 0 = (f32, f32), 1 = (f32, bf16), 2 = (bf16, bf16), 3 = (f32, f16),
# 4 = (f32, int8 rows), 5 = (f32, fp8 rows); QK = KV_I8 / KV_FP8 for the last two (cache bytes).
comptime U8 = DType.uint8


def _prefill[qdt: DType, cdt: DType, D: Int, MMA: Bool, QK: Int = 0](g: GpuPtr, a: PythonObject) raises:
    # (stream, mma, pair, D, q, kc, vc, out, bt, cu, cl, err, S, T, H, KVH, M, B, NB, scale, grid_x)
    var st = g[].stream(_i(a, 0))
    var grid = (_i(a, 20), _i(a, 15))
    comptime if MMA:
        comptime if NVIDIA_TARGET:
            comptime smem = prefill_mma_smem_bytes[D, QK]()
            var f = g[].ctx.compile_function[attn_prefill_mma_kernel[qdt, cdt, D, QK]](
                func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))
            )
            st.enqueue_function(f, _p[qdt](a, 4), _p[cdt](a, 5), _p[cdt](a, 6), _p[qdt](a, 7),
                                _p[DType.int32](a, 8), _p[DType.int32](a, 9), _p[DType.int32](a, 10),
                                _p[DType.int32](a, 11), _n(a, 12), _n(a, 13), _n(a, 14), _n(a, 15),
                                _n(a, 16), _n(a, 17), _n(a, 18), _f(a, 19), grid_dim=grid, block_dim=FA_THREADS,
                                shared_mem_bytes=smem)
        else:
            raise Error("the tensor-core attention is built for NVIDIA GPUs only")
    else:
        var f = g[].ctx.compile_function[attn_prefill_simt_kernel[qdt, cdt, D, QK]]()
        st.enqueue_function(f, _p[qdt](a, 4), _p[cdt](a, 5), _p[cdt](a, 6), _p[qdt](a, 7),
                            _p[DType.int32](a, 8), _p[DType.int32](a, 9), _p[DType.int32](a, 10),
                            _p[DType.int32](a, 11), _n(a, 12), _n(a, 13), _n(a, 14), _n(a, 15),
                            _n(a, 16), _n(a, 17), _n(a, 18), _f(a, 19), grid_dim=grid, block_dim=SP_THREADS)


def _prefill_simt_d[qdt: DType, cdt: DType, QK: Int = 0](g: GpuPtr, a: PythonObject) raises:
    var d = _i(a, 3)
    if d == 64:
        _prefill[qdt, cdt, 64, False, QK](g, a)
    elif d == 128:
        _prefill[qdt, cdt, 128, False, QK](g, a)
    elif d == 32:
        _prefill[qdt, cdt, 32, False, QK](g, a)
    elif d == 80:
        _prefill[qdt, cdt, 80, False, QK](g, a)
    elif d == 96:
        _prefill[qdt, cdt, 96, False, QK](g, a)
    else:
        raise Error("attention_prefill: unsupported head dim ", d)


def _prefill_mma_d[qdt: DType, cdt: DType, QK: Int = 0](g: GpuPtr, a: PythonObject) raises:
    if _i(a, 3) == 64:
        _prefill[qdt, cdt, 64, True, QK](g, a)
    elif _i(a, 3) == 128:
        _prefill[qdt, cdt, 128, True, QK](g, a)
    else:
        raise Error("attention_prefill: the tensor-core kernel has no head dim ", _i(a, 3))


def op_attention_prefill(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var use_mma = _i(a, 1) != 0
    var pair = _i(a, 2)
    if pair < 0 or pair > 5 or (use_mma and pair == 0):
        raise Error("attention_prefill: unsupported dtype pair ", pair)
    if use_mma:
        if pair == 1:
            _prefill_mma_d[F32, BF16](g, a)
        elif pair == 2:
            _prefill_mma_d[BF16, BF16](g, a)
        elif pair == 3:
            _prefill_mma_d[F32, F16](g, a)
        elif pair == 4:
            _prefill_mma_d[F32, U8, KV_I8](g, a)
        else:
            _prefill_mma_d[F32, U8, KV_FP8](g, a)
    elif pair == 0:
        _prefill_simt_d[F32, F32](g, a)
    elif pair == 1:
        _prefill_simt_d[F32, BF16](g, a)
    elif pair == 2:
        _prefill_simt_d[BF16, BF16](g, a)
    elif pair == 3:
        _prefill_simt_d[F32, F16](g, a)
    elif pair == 4:
        _prefill_simt_d[F32, U8, KV_I8](g, a)
    else:
        _prefill_simt_d[F32, U8, KV_FP8](g, a)
    return PythonObject(None)


def _decode[qdt: DType, cdt: DType, D: Int, GM: Int, QK: Int](g: GpuPtr, a: PythonObject) raises:
    # (stream, pair, D, q, kc, vc, out, part_o, part_lse, bt, cl, err, S, H, KVH, M, B, NB, splits, chunk, scale)
    var st = g[].stream(_i(a, 0))
    comptime NW = decode_warps[cdt]()
    comptime smem = decode_smem_bytes[cdt, D, GM, QK]()
    var f = g[].ctx.compile_function[attn_decode_kernel[qdt, cdt, D, GM, NW, QK]](
        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))
    )
    st.enqueue_function(f, _p[qdt](a, 3), _p[cdt](a, 4), _p[cdt](a, 5), _p[qdt](a, 6), _p[F32](a, 7),
                        _p[F32](a, 8), _p[DType.int32](a, 9), _p[DType.int32](a, 10), _p[DType.int32](a, 11),
                        _n(a, 13), _n(a, 14), _n(a, 15), _n(a, 16), _n(a, 17), _n(a, 18), _n(a, 19), _f(a, 20),
                        grid_dim=(_i(a, 14), _i(a, 12), _i(a, 18)), block_dim=NW * WARP_SIZE,
                        shared_mem_bytes=smem)


def _decode_g[qdt: DType, cdt: DType, D: Int, QK: Int](g: GpuPtr, a: PythonObject) raises:
    # The query heads per kv head, rounded up to the kernel's register tile (4, 8 or 16).
    var G = _i(a, 13) // _i(a, 14)
    if G <= 4:
        _decode[qdt, cdt, D, 4, QK](g, a)
    elif G <= 8:
        _decode[qdt, cdt, D, 8, QK](g, a)
    else:
        _decode[qdt, cdt, D, 16, QK](g, a)


def _decode_d[qdt: DType, cdt: DType, QK: Int = 0](g: GpuPtr, a: PythonObject) raises:
    var d = _i(a, 2)
    if d == 64:
        _decode_g[qdt, cdt, 64, QK](g, a)
    elif d == 128:
        _decode_g[qdt, cdt, 128, QK](g, a)
    elif d == 32:
        _decode_g[qdt, cdt, 32, QK](g, a)
    elif d == 80:
        _decode_g[qdt, cdt, 80, QK](g, a)
    elif d == 96:
        _decode_g[qdt, cdt, 96, QK](g, a)
    else:
        raise Error("attention_decode: unsupported head dim ", d)


def op_attention_decode(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    var pair = _i(a, 1)
    if pair == 0:
        _decode_d[F32, F32](g, a)
    elif pair == 1:
        _decode_d[F32, BF16](g, a)
    elif pair == 2:
        _decode_d[BF16, BF16](g, a)
    elif pair == 3:
        _decode_d[F32, F16](g, a)
    elif pair == 4:
        _decode_d[F32, U8, KV_I8](g, a)
    elif pair == 5:
        _decode_d[F32, U8, KV_FP8](g, a)
    else:
        raise Error("attention_decode: unsupported dtype pair ", pair)
    return PythonObject(None)


def _combine[qdt: DType](g: GpuPtr, a: PythonObject) raises:
    # (stream, qcode, part_o, part_lse, out, rows, splits, D)
    var st = g[].stream(_i(a, 0))
    var f = g[].ctx.compile_function[attn_combine_kernel[qdt]]()
    st.enqueue_function(f, _p[F32](a, 2), _p[F32](a, 3), _p[qdt](a, 4), _n(a, 6), _n(a, 7),
                        grid_dim=_i(a, 5), block_dim=128)


def op_attention_combine(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    if _i(a, 1) == DT_F32:
        _combine[F32](g, a)
    elif _i(a, 1) == DT_BF16:
        _combine[BF16](g, a)
    else:
        raise Error("attention_combine: unknown dtype code ", _i(a, 1))
    return PythonObject(None)


def op_synchronize(gpu: PythonObject, a: PythonObject) raises -> PythonObject:
    var g = _state(gpu)
    g[].stream(_i(a, 0)).synchronize()
    return PythonObject(None)


@export
def PyInit_gpu_ops() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("gpu_ops")
        _ = (
            m.add_type[GpuState]("GpuState")
            .def_init_defaultable[GpuState]()
            .def_method[GpuState.own_stream]("own_stream")
            .def_method[GpuState.context_handle]("context_handle")
            .def_method[GpuState.device_context]("device_context")
        )
        m.def_function[op_embedding_dense]("embedding_dense")
        m.def_function[op_embedding_quant]("embedding_quant")
        m.def_function[op_dequant]("dequant")
        m.def_function[op_rms_norm]("rms_norm")
        m.def_function[op_add_rms_norm]("add_rms_norm")
        m.def_function[op_add]("add")
        m.def_function[op_rope]("rope")
        m.def_function[op_silu_mul]("silu_mul")
        m.def_function[op_store_kv]("store_kv")
        m.def_function[op_convert]("convert")
        m.def_function[op_gemv_dense]("gemv_dense")
        m.def_function[op_gemv_quant]("gemv_quant")
        m.def_function[op_gemv_f8]("gemv_f8")
        m.def_function[op_gemm_simt]("gemm_simt")
        m.def_function[op_attention_prefill]("attention_prefill")
        m.def_function[op_attention_decode]("attention_decode")
        m.def_function[op_attention_combine]("attention_combine")
        m.def_function[op_synchronize]("synchronize")
        return m.finalize()
    except e:
        abort(String("failed to create module gpu_ops: ", e))
