# Dense linear algebra on the CPU: f32 GEMM and the weight-stationary "linear" y = x @ W^T.
#
# One register-blocked micro-kernel serves every path (BLIS structure):
#
#   C[MR x NR] (+)= A_panel[MR x kc] @ B_panel[kc x NR]
#
# held in MR * NV SIMD accumulators (NR = NV * W columns, W = f32 lanes). Each k step loads NV
# vectors of B, broadcasts MR scalars of A and issues MR * NV FMAs.
#
# Layouts
#   A (gemm) / X (linear): row-major f32. Packed per thread into MR-row micro-panels,
#       apack[panel][k][i] = A[row0 + panel*MR + i, k0 + k]  (rows past the end are zero).
#   B (gemm): row-major [K, N] f32, packed per thread and per KC block into NR-column panels,
#       bpack[panel][k][j] = B[k0 + k, panel*NR + j]  (columns past N are zero).
#   W (linear): packed ONCE at load time (python/mojollm/kernels/linalg.py) into the same panel
#       form over the full K: wp[panel][k][j] = W[panel*NR + j, k], dtype f32, f16 or bf16 bits.
#       A KC block of a panel is then the contiguous slice wp[panel][k0:k0+kc]. bf16 rows are
#       pair-interleaved: within each 2W-column chunk, element 2j is column j and element 2j+1 is
#       column W + j (load_row widens them with a shift and a mask).
#   The GEMV path (T <= GEMV_MAX_T, gemv_panel) streams those same panels once: for each k it
#   loads NV vectors of W (SIMD along N inside the panel) and broadcasts x[t, k]; no horizontal
#   sums, and no second copy of the weights in another layout.
#
# Cache blocking (Sapphire Rapids: 48 KiB L1d, 2 MiB L2 per core): an A micro-panel of MR x KC
# f32 (12 KiB) stays in L1 while the chunk's B panels (KC x NCP*NR f32 = 1 MiB) stream past it
# from L2, prefetched a few k steps ahead; C tiles are prefetched before their k loop. The
# blocking constants were tuned on this machine (single-thread CPU time against OpenBLAS).
#
# Threads: ONE parallelize region per call (see SERIAL_MACS for its cost). The work is split into one
# task per core either along M (rows of C) or along N (panels), whichever balances better; small
# problems run on the calling thread without a region.

from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder
from std.memory import bitcast
from std.sys import simd_width_of, num_physical_cores, size_of
from std.sys.intrinsics import prefetch, PrefetchOptions
from max.algorithm import parallelize

comptime F32 = DType.float32
comptime W = simd_width_of[F32]()
comptime MR = 12  # rows of A per micro-tile
comptime NV = 2  # SIMD vectors of B per micro-tile row
comptime NR = NV * W  # columns per packed panel
comptime KC = 256  # k depth of one cache block
comptime MC = 144  # rows of A per L2 block (multiple of MR)
comptime NCP = 32  # B panels packed at a time by gemm (KC x NCP*NR f32 = 1 MiB)
comptime GEMM_PREFETCH_K = 4  # software prefetch distance for B in GEMM (k steps)
comptime GEMV_PREFETCH_BYTES = 4096  # how far ahead GEMV prefetches its weight stream
comptime GEMV_MAX_T = 4  # tokens up to which linear skips packing X
# Below these sizes a call stays on the calling thread. A parallel region costs ~7 us when the
# workers are still spinning from the previous one, but 200-300 us on this 2-vCPU VM once they
# have slept (>~40 us idle while the caller was busy: the guest halts idle vCPUs immediately):
# GEMM: 16M multiply-adds is ~110 us on one core; GEMV: 2 MiB of weights is ~30-70 us.
comptime SERIAL_MACS = 1 << 24
comptime SERIAL_GEMV_BYTES = 1 << 21

# Weight dtypes of `linear` (must match python/mojollm/kernels/linalg.py).
comptime WT_F32 = 0
comptime WT_BF16 = 1  # bfloat16 bits stored as uint16
comptime WT_F16 = 2

comptime F32Ptr = Pointer[Float32, MutAnyOrigin]
comptime Acc = SIMD[F32, W]


def _f32(addr: Int) -> F32Ptr:
    return F32Ptr(unsafe_from_address=addr)


def _wptr[wt: DType](addr: Int) -> Pointer[Scalar[wt], MutAnyOrigin]:
    return Pointer[Scalar[wt], MutAnyOrigin](unsafe_from_address=addr)


@always_inline
def load_row[wt: DType](p: Pointer[Scalar[wt], MutAnyOrigin], off: Int) -> Array[Acc, NV]:
    """One NR-wide panel row (starting at element `off`) widened to f32 vectors.
    bf16 rows are stored pair-interleaved (see the layout notes): a 32-bit lane j of chunk c holds
    columns c*2W + j (low half) and c*2W + W + j (high half), so widening is one shift and one
    mask per vector, with no shuffles (vpmovzxwd would load port 5 in the GEMV inner loop)."""
    var row = Array[Acc, NV](fill=0)
    comptime if wt == DType.float32:
        comptime for v in range(NV):
            row[v] = rebind[Acc](p.unsafe_load[width=W](off + v * W))
    elif wt == DType.uint16:
        comptime assert NV % 2 == 0, "bf16 panels pair up vectors"
        var q = Pointer[UInt32, MutAnyOrigin](unsafe_from_address=Int(p.unsafe_offset(off)))
        comptime for c in range(NV // 2):
            var u = q.unsafe_load[width=W](c * W)
            row[2 * c] = bitcast[F32, W](u << 16)
            row[2 * c + 1] = bitcast[F32, W](u & 0xFFFF0000)
    else:
        comptime for v in range(NV):
            row[v] = p.unsafe_load[width=W](off + v * W).cast[F32]()
    return row^


@always_inline
def store_tile[mr: Int](
    acc: Array[Acc, mr * NV], c: F32Ptr, ldc: Int, m_valid: Int, n_valid: Int, accumulate: Bool
):
    """C tile (+)= acc, clipped to m_valid rows and n_valid columns."""
    if m_valid == mr and n_valid == NR:
        comptime for i in range(mr):
            comptime for v in range(NV):
                var off = i * ldc + v * W
                var r = acc[i * NV + v]
                if accumulate:
                    r += c.unsafe_load[width=W](off)
                c.unsafe_store(off, r)
        return
    # Edge tile: spill one row at a time and copy the valid columns.
    var row = Array[Float32, NR](fill=0)
    comptime for i in range(mr):
        if i < m_valid:
            comptime for v in range(NV):
                comptime for l in range(W):
                    row[v * W + l] = acc[i * NV + v][l]
            for j in range(n_valid):
                var x = row[j]
                if accumulate:
                    x += c[unsafe_offset = i * ldc + j]
                c[unsafe_offset = i * ldc + j] = x


@always_inline
def tile_kernel[mr: Int, wt: DType, prefetch_k: Int](
    a: F32Ptr,
    b: Pointer[Scalar[wt], MutAnyOrigin],
    kc: Int,
    c: F32Ptr,
    ldc: Int,
    m_valid: Int,
    n_valid: Int,
    accumulate: Bool,
):
    """C[mr x NR] (+)= A[mr x kc] @ Bpanel[kc x NR], A a packed micro-panel (a[k*mr + i]).
    prefetch_k > 0 prefetches B that many k steps ahead (prefetches never fault past the end)."""
    # The C tile is read-modified-written once per KC block and by then has left L1/L2: ask for
    # its lines now so the misses overlap the k loop instead of stalling the stores (~10%).
    comptime for i in range(mr):
        comptime for v in range(NV):
            prefetch[PrefetchOptions().for_write().high_locality().to_data_cache()](
                c.unsafe_offset(i * ldc + v * W)
            )
    var acc = Array[Acc, mr * NV](fill=0)
    for k in range(kc):
        # B streams from L2 (gemm) or memory (GEMV); the hardware prefetchers leave part of
        # its latency exposed, a software prefetch a few k steps ahead hides it (~+8% GEMM).
        comptime if prefetch_k > 0:
            comptime for line in range(0, NR * size_of[Scalar[wt]](), 64):
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                    b.unsafe_offset((k + prefetch_k) * NR + line // size_of[Scalar[wt]]())
                )
        var bv = load_row[wt](b, k * NR)
        comptime for i in range(mr):
            var av = Acc(a[unsafe_offset = k * mr + i])
            comptime for v in range(NV):
                acc[i * NV + v] = av.fma(bv[v], acc[i * NV + v])
    store_tile[mr](acc, c, ldc, m_valid, n_valid, accumulate)


def pack_a(a: F32Ptr, lda: Int, row0: Int, mc: Int, k0: Int, kc: Int, dst: F32Ptr):
    """A[row0:row0+mc, k0:k0+kc] -> MR-row micro-panels, k-major inside a panel, zero-padded.
    Full panels transpose 4 rows x 4 k at a time in registers (a scalar copy cost ~6% of GEMM)."""
    comptime assert MR % 4 == 0, "pack_a transposes groups of 4 rows"
    var panels = (mc + MR - 1) // MR
    for p in range(panels):
        var d = dst.unsafe_offset(p * kc * MR)
        var rows = min(MR, mc - p * MR)
        var k4 = kc - kc % 4 if rows == MR else 0
        if k4 > 0:
            comptime for g in range(MR // 4):
                var s0 = a.unsafe_offset((row0 + p * MR + 4 * g) * lda + k0)
                var s1 = s0.unsafe_offset(lda)
                var s2 = s1.unsafe_offset(lda)
                var s3 = s2.unsafe_offset(lda)
                for k in range(0, k4, 4):
                    var r0 = s0.unsafe_load[width=4](k)
                    var r1 = s1.unsafe_load[width=4](k)
                    var r2 = s2.unsafe_load[width=4](k)
                    var r3 = s3.unsafe_load[width=4](k)
                    var t0 = r0.shuffle[0, 4, 1, 5](r1)
                    var t1 = r0.shuffle[2, 6, 3, 7](r1)
                    var t2 = r2.shuffle[0, 4, 1, 5](r3)
                    var t3 = r2.shuffle[2, 6, 3, 7](r3)
                    d.unsafe_store(k * MR + 4 * g, t0.shuffle[0, 1, 4, 5](t2))
                    d.unsafe_store((k + 1) * MR + 4 * g, t0.shuffle[2, 3, 6, 7](t2))
                    d.unsafe_store((k + 2) * MR + 4 * g, t1.shuffle[0, 1, 4, 5](t3))
                    d.unsafe_store((k + 3) * MR + 4 * g, t1.shuffle[2, 3, 6, 7](t3))
        # Leftover k columns of a full panel, and every column of a partial one (zero rows).
        for i in range(MR):
            var r = p * MR + i
            if r < mc:
                var src = a.unsafe_offset((row0 + r) * lda + k0)
                for k in range(k4, kc):
                    d[unsafe_offset = k * MR + i] = src[unsafe_offset=k]
            else:
                for k in range(k4, kc):
                    d[unsafe_offset = k * MR + i] = 0


def pack_b(b: F32Ptr, ldb: Int, n: Int, k0: Int, kc: Int, p0: Int, p1: Int, dst: F32Ptr):
    """B[k0:k0+kc, p0*NR : p1*NR] -> NR-column panels, zero-padded past column n.
    Row by row, so that B is read sequentially (a panel at a time jumps a page per row and
    defeats the hardware prefetcher)."""
    var full_end = min(p1, n // NR)  # panels with all NR columns inside B
    for k in range(kc):
        var src = b.unsafe_offset((k0 + k) * ldb)
        for p in range(p0, full_end):
            var d = dst.unsafe_offset((p - p0) * kc * NR + k * NR)
            comptime for v in range(NV):
                d.unsafe_store(v * W, src.unsafe_load[width=W](p * NR + v * W))
        for p in range(max(p0, full_end), p1):
            var d = dst.unsafe_offset((p - p0) * kc * NR + k * NR)
            for j in range(NR):
                var col = p * NR + j
                d[unsafe_offset=j] = src[unsafe_offset=col] if col < n else 0


def gemm_block[wt: DType, prepacked: Bool](
    a: F32Ptr,
    lda: Int,
    b_addr: Int,
    ldb: Int,
    c: F32Ptr,
    ldc: Int,
    n: Int,
    k: Int,
    m_lo: Int,
    m_hi: Int,
    p_lo: Int,
    p_hi: Int,
    apack: F32Ptr,
    bpack: F32Ptr,
):
    """C[m_lo:m_hi, p_lo*NR : p_hi*NR] of one task. prepacked: b_addr holds W panels over the
    full K (dtype wt); otherwise b_addr is row-major f32 B, packed here NCP panels at a time.

    Loop nest: panel chunk (jc) > k block (kb) > row block (mb) > A micro-panel (ir) > B panel (p).
    The A micro-panel (MR x KC, 12 KiB) stays in L1 while the chunk's B panels (<= 1 MiB) stream
    from L2; measured ~10% faster than keeping a B panel in L1 and streaming A micro-panels."""
    var jc = p_lo
    while jc < p_hi:
        # NCP-panel chunks for prepacked W too: this costs nothing measurable (A is re-packed once
        # per 1024 columns) and a single-pass variant crashes the mojo 1.2 compiler.
        var je = min(jc + NCP, p_hi)
        var kb = 0
        while kb < k:
            var kc = min(KC, k - kb)
            comptime if not prepacked:
                pack_b(_f32(b_addr), ldb, n, kb, kc, jc, je, bpack)
            var mb = m_lo
            while mb < m_hi:
                var mc = min(MC, m_hi - mb)
                pack_a(a, lda, mb, mc, kb, kc, apack)
                for ir in range((mc + MR - 1) // MR):
                    var ap = apack.unsafe_offset(ir * kc * MR)
                    var m_valid = min(MR, mc - ir * MR)
                    var crow = c.unsafe_offset((mb + ir * MR) * ldc)
                    for p in range(jc, je):
                        var cp = crow.unsafe_offset(p * NR)
                        var n_valid = min(NR, n - p * NR)
                        comptime if prepacked:
                            var bp = _wptr[wt](b_addr).unsafe_offset(p * k * NR + kb * NR)
                            tile_kernel[MR, wt, GEMM_PREFETCH_K](ap, bp, kc, cp, ldc, m_valid, n_valid, kb > 0)
                        else:
                            var bp = bpack.unsafe_offset((p - jc) * kc * NR)
                            tile_kernel[MR, F32, GEMM_PREFETCH_K](ap, bp, kc, cp, ldc, m_valid, n_valid, kb > 0)
                mb += mc
            kb += kc
        jc = je


@always_inline
def gemv_panel[t: Int, wt: DType, ku: Int](x: F32Ptr, k: Int, w: Pointer[Scalar[wt], MutAnyOrigin], y: F32Ptr, ldy: Int, n_valid: Int):
    """Y[0:t, panel] = x[0:t] @ Wpanel^T: one pass over a K x NR weight panel.
    ku interleaved accumulator sets (k, k+1, ...) keep >= 8 FMAs in flight when t is small
    (one set would serialise on the FMA latency: 4 cycles per k step)."""
    var acc = Array[Acc, ku * t * NV](fill=0)
    var k_main = k - k % ku
    for k0 in range(0, k_main, ku):
        comptime if GEMV_PREFETCH_BYTES > 0:
            comptime for line in range(0, ku * NR * size_of[Scalar[wt]](), 64):
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                    w.unsafe_offset(k0 * NR + (GEMV_PREFETCH_BYTES + line) // size_of[Scalar[wt]]())
                )
        comptime for u in range(ku):
            var bv = load_row[wt](w, (k0 + u) * NR)
            comptime for i in range(t):
                var av = Acc(x[unsafe_offset = i * k + k0 + u])
                comptime for v in range(NV):
                    acc[(u * t + i) * NV + v] = av.fma(bv[v], acc[(u * t + i) * NV + v])
    for kk in range(k_main, k):
        var bv = load_row[wt](w, kk * NR)
        comptime for i in range(t):
            var av = Acc(x[unsafe_offset = i * k + kk])
            comptime for v in range(NV):
                acc[i * NV + v] = av.fma(bv[v], acc[i * NV + v])
    var total = Array[Acc, t * NV](fill=0)
    comptime for u in range(ku):
        comptime for j in range(t * NV):
            total[j] += acc[u * t * NV + j]
    store_tile[t](total, y, ldy, t, n_valid, False)


def gemv_block[t: Int, wt: DType](x: F32Ptr, k: Int, w_addr: Int, y: F32Ptr, n: Int, p_lo: Int, p_hi: Int):
    """Y[0:t, panels p_lo..p_hi] = x[0:t] @ W^T, streaming each weight panel once."""
    comptime ku = max(1, 4 // t)
    var wp = _wptr[wt](w_addr)
    for p in range(p_lo, p_hi):
        gemv_panel[t, wt, ku](x, k, wp.unsafe_offset(p * k * NR), y.unsafe_offset(p * NR), n, min(NR, n - p * NR))


def _span(total: Int, parts: Int, idx: Int) -> Tuple[Int, Int]:
    """Contiguous, balanced share idx of `total` items split into `parts`."""
    var base = total // parts
    var extra = total % parts
    var lo = idx * base + min(idx, extra)
    return (lo, lo + base + (1 if idx < extra else 0))


def num_tasks(serial: Bool, max_tasks: Int) -> Int:
    """One task per core (at most max_tasks when > 0); one task for small problems."""
    if serial:
        return 1
    var cores = num_physical_cores()
    return min(cores, max_tasks) if max_tasks > 0 else cores


def split_along_m(m_tiles: Int, n_panels: Int, tasks: Int) -> Bool:
    """True if splitting rows across tasks balances at least as well as splitting panels."""
    var per_m = (m_tiles + tasks - 1) // tasks
    var per_n = (n_panels + tasks - 1) // tasks
    # Longest task's share of its dimension: smaller is better balanced.
    return per_m * n_panels <= per_n * m_tiles


def workspace_floats() -> Int:
    """The f32 scratch one task needs (A block + B chunk); python allocates tasks x this."""
    return MC * KC + KC * NCP * NR


def _run[wt: DType, prepacked: Bool](
    a: F32Ptr, b_addr: Int, c: F32Ptr, m: Int, n: Int, k: Int, ws: F32Ptr, max_tasks: Int
):
    """Dispatch C[m, n] = A[m, k] @ B over one task per core (A, C row-major, contiguous)."""
    var tasks = num_tasks(m * n * k < SERIAL_MACS, max_tasks)
    var m_tiles = (m + MR - 1) // MR
    var n_panels = (n + NR - 1) // NR
    var along_m = split_along_m(m_tiles, n_panels, tasks)

    def work(t: Int) {imm a, imm b_addr, imm c, imm m, imm n, imm k, imm ws, imm tasks, imm m_tiles, imm n_panels, imm along_m}:
        var m_lo = 0
        var m_hi = m
        var p_lo = 0
        var p_hi = n_panels
        if along_m:
            var s = _span(m_tiles, tasks, t)
            m_lo = s[0] * MR
            m_hi = min(m, s[1] * MR)
        else:
            var s = _span(n_panels, tasks, t)
            p_lo = s[0]
            p_hi = s[1]
        if m_lo >= m_hi or p_lo >= p_hi:
            return
        var apack = ws.unsafe_offset(t * workspace_floats())
        var bpack = apack.unsafe_offset(MC * KC)
        gemm_block[wt, prepacked](a, k, b_addr, n, c, n, n, k, m_lo, m_hi, p_lo, p_hi, apack, bpack)

    if tasks == 1:
        work(0)
    else:
        parallelize(work, tasks)


def _gemv[t: Int, wt: DType](x: F32Ptr, w_addr: Int, y: F32Ptr, n: Int, k: Int, max_tasks: Int):
    var tasks = num_tasks(n * k * size_of[Scalar[wt]]() < SERIAL_GEMV_BYTES, max_tasks)
    var n_panels = (n + NR - 1) // NR

    def work(i: Int) {imm x, imm w_addr, imm y, imm n, imm k, imm tasks, imm n_panels}:
        var s = _span(n_panels, tasks, i)
        gemv_block[t, wt](x, k, w_addr, y, n, s[0], s[1])

    if tasks == 1:
        work(0)
    else:
        parallelize(work, tasks)


def _linear[wt: DType](x: F32Ptr, w_addr: Int, y: F32Ptr, t: Int, n: Int, k: Int, ws: F32Ptr, max_tasks: Int):
    if t == 1:
        _gemv[1, wt](x, w_addr, y, n, k, max_tasks)
    elif t == 2:
        _gemv[2, wt](x, w_addr, y, n, k, max_tasks)
    elif t == 3:
        _gemv[3, wt](x, w_addr, y, n, k, max_tasks)
    elif t == 4:
        _gemv[4, wt](x, w_addr, y, n, k, max_tasks)
    else:
        _run[wt, True](x, w_addr, y, t, n, k, ws, max_tasks)


def fma_peak(iters: Int, tasks: Int) -> Float32:
    """Register-only FMA loop on `tasks` threads (one parallel region): the attainable f32 peak
    for the roofline. 24 independent accumulators cover FMA latency x 2 FMA ports. Returns a
    checksum so the loop is not optimised away; it performs tasks * iters * 24 * W FMAs."""
    var sums = Array[Float32, 64](fill=0)
    var out = Pointer(to=sums)

    def work(t: Int) {imm iters, mut out}:
        var acc = Array[Acc, 24](fill=0)
        var x = Acc(1.0000001)
        var y = Acc(0.9999999)
        comptime for j in range(24):
            acc[j] = Acc(Float32(j))
        for _ in range(iters):
            comptime for j in range(24):
                acc[j] = acc[j].fma(x, y)
        var total = Acc(0)
        comptime for j in range(24):
            total += acc[j]
        out[][t % 64] = total.reduce_add()

    parallelize(work, tasks)
    var r: Float32 = 0
    for i in range(64):
        r += sums[i]
    return r


# ---- Python entry points (addresses and sizes were validated by the Python wrapper) ----


def py_gemm(a: PythonObject, b: PythonObject, c: PythonObject, dims: PythonObject) raises -> PythonObject:
    """C = A @ B; dims = (M, N, K, workspace address, max tasks (0: one per core))."""
    var m = Int(py=dims[0])
    var n = Int(py=dims[1])
    var k = Int(py=dims[2])
    _run[F32, False](_f32(Int(py=a)), Int(py=b), _f32(Int(py=c)), m, n, k, _f32(Int(py=dims[3])), Int(py=dims[4]))
    return PythonObject(None)


def py_linear(x: PythonObject, w: PythonObject, y: PythonObject, dims: PythonObject) raises -> PythonObject:
    """Y[T, N] = X[T, K] @ W^T with W pre-packed; dims = (T, N, K, weight dtype code, workspace,
    max tasks (0: one per core))."""
    var t = Int(py=dims[0])
    var n = Int(py=dims[1])
    var k = Int(py=dims[2])
    var wt = Int(py=dims[3])
    var xp = _f32(Int(py=x))
    var yp = _f32(Int(py=y))
    var ws = _f32(Int(py=dims[4]))
    var wa = Int(py=w)
    var max_tasks = Int(py=dims[5])
    if wt == WT_F32:
        _linear[F32](xp, wa, yp, t, n, k, ws, max_tasks)
    elif wt == WT_BF16:
        _linear[DType.uint16](xp, wa, yp, t, n, k, ws, max_tasks)
    elif wt == WT_F16:
        _linear[DType.float16](xp, wa, yp, t, n, k, ws, max_tasks)
    else:
        raise Error("linear: unknown weight dtype code")
    return PythonObject(None)


def py_fma_peak(iters: PythonObject, tasks: PythonObject) raises -> PythonObject:
    """Run tasks x iters x 24 x W register FMAs; returns the flop count (time it from Python)."""
    var n = Int(py=iters)
    var t = Int(py=tasks)
    if fma_peak(n, t) == -1.0:  # never true: keeps the result alive
        return PythonObject(0)
    return PythonObject(2 * t * n * 24 * W)


def py_config() raises -> PythonObject:
    """[panel width NR, micro-tile rows MR, workspace floats per task, tasks per call, GEMV_MAX_T,
    f32 SIMD width W]."""
    var cfg: PythonObject = [NR, MR, workspace_floats(), num_physical_cores(), GEMV_MAX_T, W]
    return cfg


@export
def PyInit_linalg() abi("C") -> PythonObject:
    try:
        var m = PythonModuleBuilder("linalg")
        m.def_function[py_gemm]("gemm", docstring="C = A @ B (f32, row-major); dims = (M, N, K, workspace)")
        m.def_function[py_linear]("linear", docstring="Y = X @ W^T with W pre-packed; dims = (T, N, K, wtype, workspace)")
        m.def_function[py_fma_peak]("fma_peak", docstring="fma_peak(iters, tasks) -> flops done by a register FMA loop")
        m.def_function[py_config]("config", docstring="[NR, MR, workspace floats per task, tasks, GEMV_MAX_T, W]")
        return m.finalize()
    except e:
        abort(String("failed to create module linalg: ", e))
