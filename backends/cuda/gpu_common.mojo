# Shared helpers of the GPU kernels: pointer aliases, vector loads, block reductions, error flags.
#
# Every kernel takes raw device addresses (torch tensors' data_ptr()) as typed pointers and
# fixed-width scalars (Int64 / Float32): kernel arguments cross to the device by value, so their
# widths must not depend on the host.

from std.memory import stack_allocation, bitcast
from std.sys import size_of, llvm_intrinsic
from max.gpu import thread_idx, lane_id, WARP_SIZE
from max.gpu.sync import barrier
from max.gpu.primitives import warp
from max.gpu.memory import AddressSpace

comptime Ptr[dt: DType] = Pointer[Scalar[dt], MutAnyOrigin]
comptime SharedPtr[dt: DType] = Pointer[Scalar[dt], MutUntrackedOrigin, address_space=AddressSpace.SHARED]
comptime F32P = Ptr[DType.float32]
comptime I32P = Ptr[DType.int32]
comptime I64P = Ptr[DType.int64]
comptime U8P = Ptr[DType.uint8]
comptime I8P = Ptr[DType.int8]
comptime F16P = Ptr[DType.float16]

# Data-dependent indices (token ids, slots, block ids, positions, context lengths) live on the
# device, so the host cannot check them without a synchronisation. Kernels check them instead:
# an out-of-range index is skipped (its output is written as zeros) and its kind is flagged in
# the error words below, which the Python side reads at its next synchronisation point and turns
# into a ValueError. One int32 word per kind; racing stores of the same value 1 are benign.
comptime ERR_TOKEN = 0
comptime ERR_SLOT = 1
comptime ERR_BLOCK = 2
comptime ERR_POSITION = 3
comptime ERR_CONTEXT = 4
comptime ERR_WORDS = 8

# The kernel ABI's tables: every entry of gpu_ops / gpu_library takes element types and quant
# formats as these codes (backend.py's _DTYPE_CODES / _QCODES; tests/test_kernel_abi.py checks
# that both sides agree), and refuses a code it was not built for.
comptime DT_F32 = 0
comptime DT_BF16 = 1
comptime DT_F16 = 2
# KV caches (mojollm.kv_dtypes): the float ones are DT_F32 / DT_BF16 / DT_F16; int8 and fp8 caches are
# uint8 rows of W = D + 4 bytes per (slot, head), the D codes (int8 two's complement, or OCP E4M3)
# then the row's little-endian float32 scale s, value = s * code.
comptime KV_I8 = 3
comptime KV_FP8 = 4
comptime KV_SCALE_BYTES = 4

# Quantized block formats (GGUF). Q4_0 / Q4_1 / Q8_0: 32 weights per block, repacked on the device
# into qs [rows, nblocks, 16 or 32] bytes + d (and m) [rows, nblocks] float16 (gpu_linear). Q5_0 / Q5_1
# and the k-quants Q4_K / Q5_K / Q6_K: the layouts of gpu_kquant. F8_E4M3: Q8_0's layout with OCP
# e4m3fn codes instead of int8 (w = d e4m3(q)), repacked as Q8_0 is. W8A8: Q8_0's blocks whose
# GEMV quantizes the activations with one scale per token (quantize_q8_token_kernel).
comptime Q4_0 = 0
comptime Q4_1 = 1
comptime Q8_0 = 2
comptime Q5_0 = 3
comptime Q5_1 = 4
comptime Q4_K = 5
comptime Q5_K = 6
comptime Q6_K = 7
comptime F8_E4M3 = 8
# W8A8: Q8_0's layout; the GEMV's activations are quantized per token (SmoothQuant)
comptime W8A8 = 9


@always_inline
def flag(err: I32P, kind: Int):
    err[unsafe_offset=kind] = 1


@always_inline
def vload[W: Int, dt: DType](p: Ptr[dt], off: Int) -> SIMD[dt, W]:
    """W contiguous elements at p[off], as one aligned vector load (the caller guarantees alignment)."""
    comptime A = W * size_of[dt]() if W * size_of[dt]() <= 16 else 16
    return p.unsafe_load[width=W, alignment=A](off)


@always_inline
def vstore[W: Int, dt: DType](p: Ptr[dt], off: Int, v: SIMD[dt, W]):
    comptime A = W * size_of[dt]() if W * size_of[dt]() <= 16 else 16
    p.unsafe_store[alignment=A](off, v)


@always_inline
def block_sum[BLOCK: Int](v: Float32) -> Float32:
    """Sum of v over the whole block (BLOCK threads, a multiple of the warp size); all threads get it."""
    comptime NW = BLOCK // WARP_SIZE
    var partial = stack_allocation[NW, Float32, address_space=AddressSpace.SHARED]()
    var w = warp.sum(v)
    if lane_id() == 0:
        partial[unsafe_offset=thread_idx.x // WARP_SIZE] = w
    barrier()
    var total: Float32 = 0
    comptime for i in range(NW):
        total += partial[unsafe_offset=i]
    return total


@always_inline
def block_max[BLOCK: Int](v: Float32) -> Float32:
    """Maximum of v over the whole block (BLOCK threads, a multiple of the warp size); all threads get it."""
    comptime NW = BLOCK // WARP_SIZE
    var partial = stack_allocation[NW, Float32, address_space=AddressSpace.SHARED]()
    var w = warp.max(v)
    if lane_id() == 0:
        partial[unsafe_offset=thread_idx.x // WARP_SIZE] = w
    barrier()
    var total = partial[unsafe_offset=0]
    comptime for i in range(1, NW):
        total = max(total, partial[unsafe_offset=i])
    return total


# ---- quantized KV rows (KV_I8 / KV_FP8) ---------------------------------------------------------
@always_inline
def kv_codes_f32[QK: Int, n: Int](c: SIMD[DType.uint8, n]) -> SIMD[DType.float32, n]:
    """n stored codes -> their float32 values (exact; the row's scale is applied by the caller).
    int8: without a conversion instruction: (c ^ 0x80) = code + 128 goes into the low mantissa bits
    of 2^23, and 2^23 + 128 comes off (integer ops and one add, all full rate). fp8: the E4M3 cast
    (cvt on sm_89+)."""
    comptime if QK == KV_I8:
        var u = (c ^ 0x80).cast[DType.uint32]() | 0x4B000000
        return bitcast[DType.float32, n](u) - 8388736.0
    else:
        return bitcast[DType.float8_e4m3fn, n](c).cast[DType.float32]()


@always_inline
def roundeven[n: Int](x: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    return llvm_intrinsic["llvm.roundeven", SIMD[DType.float32, n]](x)


@always_inline
def e4m3_codes[n: Int](y: SIMD[DType.float32, n]) -> SIMD[DType.uint8, n]:
    """OCP E4M3 codes of y (finite), round to nearest even, saturating at +-448 (mojo/attention.mojo's
    encoder, so both backends write the same bytes). Normal values round the float32 mantissa to 3
    bits (a carry moves up the exponent) and drop E4M3's exponent offset (127 - 7 = 120 binades,
    960 = 120 << 3); below 2^-6 the spacing is 2^-9."""
    comptime V = SIMD[DType.float32, n]
    var a = min(abs(y), V(448.0))
    var u = bitcast[DType.uint32, n](a)
    var r = (u + 0x7FFFF + ((u >> 20) & 1)) >> 20
    var sub = roundeven[n](a * 512.0).cast[DType.uint32]()
    var code = a.lt(V(0.015625)).select(sub, r - 960)
    var sign = (bitcast[DType.uint32, n](y) >> 24) & 0x80
    return (code | sign).cast[DType.uint8]()
