# Host harness of tests/test_gpu_kquant_host.py: runs gpu_kquant's GEMV step (_kq_step, lanes
# emulated one after another, then summed) and its element dequantization (kq_dequant_one) on the
# CPU, on arrays written by the test: the decoding and integer arithmetic of the cuda kernels are
# checked without a GPU (dp4a takes its portable path here; the launch geometry, shuffles and
# stores of gemv_kq_kernel are not covered).
# usage: gpu_kquant_host QCODE NT R N K T DIR  (DIR: qs d m h qx xs .bin in; y deq .bin out)

from std.sys import argv
from std.memory import alloc
from gpu_common import Ptr, F32P, U8P, F16P, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
from gpu_kquant import _kq_step, kq_dequant_one, kq_unit

def load_bytes(path: String) raises -> U8P:
    var f = open(path, "r")
    var b = f.read_bytes()
    f.close()
    var p = alloc[UInt8](len(b) + 64)
    for i in range(len(b)):
        p[unsafe_offset=i] = b[i]
    return U8P(unsafe_from_address=Int(p))

def save_f32(path: String, p: F32P, n: Int) raises:
    var f = open(path, "w")
    var bytes = List[UInt8]()
    var u = Ptr[DType.uint8](unsafe_from_address=Int(p))
    for i in range(n * 4):
        bytes.append(u[unsafe_offset=i])
    f.write_bytes(bytes)
    f.close()

def run[QT: Int, NT: Int, R: Int](N: Int, K: Int, T: Int, dir: String) raises:
    var w = load_bytes(dir + "/qs.bin")
    var d = load_bytes(dir + "/d.bin")
    var m = load_bytes(dir + "/m.bin")
    var h = load_bytes(dir + "/h.bin")
    var qx = load_bytes(dir + "/qx.bin")
    var xs = load_bytes(dir + "/xs.bin")
    var y = alloc[Float32](T * N)
    var deq = alloc[Float32](N * K)
    var W = Ptr[DType.uint32](unsafe_from_address=Int(w))
    var D = F16P(unsafe_from_address=Int(d))
    var M = F16P(unsafe_from_address=Int(m))
    var H = Ptr[DType.uint32](unsafe_from_address=Int(h))
    var QX = Ptr[DType.uint32](unsafe_from_address=Int(qx))
    var XS = F32P(unsafe_from_address=Int(xs))
    comptime U = 2 if NT == 1 and R <= 2 else 1
    var units = K // kq_unit[QT]()
    for n0 in range(0, N, R):
        for t0 in range(0, T, NT):
            var tot = SIMD[DType.float32, R * NT](0)
            for lane in range(32):
                var acc = SIMD[DType.float32, R * NT](0)
                var u = lane
                comptime if U > 1:
                    while u + (U - 1) * 32 < units:
                        _kq_step[QT, NT, R, U, 32](QX, XS, W, D, M, H, acc, u, n0, t0, N, T, K)
                        u += U * 32
                while u < units:
                    _kq_step[QT, NT, R, 1, 32](QX, XS, W, D, M, H, acc, u, n0, t0, N, T, K)
                    u += 32
                tot += acc
            for r in range(R):
                for t in range(NT):
                    if n0 + r < N and t0 + t < T:
                        y[unsafe_offset=(t0 + t) * N + n0 + r] = tot[r * NT + t]
    for i in range(N * K):
        deq[unsafe_offset=i] = kq_dequant_one[QT](w, D, M, H, i // K, K, i % K)
    save_f32(dir + "/y.bin", F32P(unsafe_from_address=Int(y)), T * N)
    save_f32(dir + "/deq.bin", F32P(unsafe_from_address=Int(deq)), N * K)

def dispatch[QT: Int](nt: Int, r: Int, N: Int, K: Int, T: Int, dir: String) raises:
    if nt == 1:
        if r == 1: run[QT, 1, 1](N, K, T, dir)
        elif r == 2: run[QT, 1, 2](N, K, T, dir)
        else: run[QT, 1, 4](N, K, T, dir)
    else:
        if r == 1: run[QT, 8, 1](N, K, T, dir)
        elif r == 2: run[QT, 8, 2](N, K, T, dir)
        else: run[QT, 8, 4](N, K, T, dir)

def main() raises:
    var a = argv()
    var qt = Int(a[1])
    var nt = Int(a[2]); var r = Int(a[3]); var N = Int(a[4]); var K = Int(a[5]); var T = Int(a[6])
    var dir = String(a[7])
    if qt == Q5_0: dispatch[Q5_0](nt, r, N, K, T, dir)
    elif qt == Q5_1: dispatch[Q5_1](nt, r, N, K, T, dir)
    elif qt == Q4_K: dispatch[Q4_K](nt, r, N, K, T, dir)
    elif qt == Q5_K: dispatch[Q5_K](nt, r, N, K, T, dir)
    else: dispatch[Q6_K](nt, r, N, K, T, dir)
