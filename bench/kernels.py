"""Kernel benchmarks: each Mojo CPU kernel against a peer measured in the same run.

    python bench/kernels.py                        # every section
    python bench/kernels.py gemm                   # one section (gemm | all | any name in SECTIONS)
    python bench/kernels.py gemm --json out.json   # + the result document (bench/SCHEMA.md)
    python bench/kernels.py gemm --quick           # fewer sizes and repeats (smoke run)

Sections live in SECTIONS (name -> function(opts) -> rows); each row is a flat dict (bench/SCHEMA.md,
kind mojollm.bench.kernels) and the table printed is the union of the rows' keys. Helpers for
sections: `time_blocks` (medians over alternating blocks of repeats, warm-up excluded), `numpy_threads`.
Rooflines of memory-bound kernels divide by the host read bandwidth of the cpu backend's one probe
(`backend.memory_bandwidth_gbs()`: the best streaming read by numpy and by the Mojo thread pool).

Timing protocol: every implementation runs in blocks (warm-up call, then `repeats` timed calls),
blocks of the implementations alternate for `rounds` rounds, with a pause before each block so
that the other library's worker threads (OpenBLAS spins after a call) have gone idle. Reported:
the median and the best of all timed calls. The machine is shared, so medians are what to quote.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------------------------------------
# shared helpers (other sections import these)


@dataclass
class Options:
    quick: bool = False
    repeats: int | None = None  # None: the section's default
    rounds: int = 3

    def reps(self, default: int) -> int:
        if self.repeats is not None:
            return self.repeats
        return max(2, default // 3) if self.quick else default


def time_blocks(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 3,
                pause_s: float = 0.3) -> dict[str, dict[str, float]]:
    """{name: {"median_s", "best_s"}} over rounds x repeats timed calls of each function, the
    functions taking turns block by block (see the module docstring). The pause must outlast
    OpenBLAS's spin-wait (2^28 cycles, ~0.1 s): a Mojo call made while OpenBLAS threads still
    spin on both cores measured 5-10x slow on this 2-core machine."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause_s)
            fn()  # warm-up: caches, page faults, thread wake-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(np.median(ts)), "best_s": float(min(ts))} for name, ts in times.items()}


def _openblas_lib():
    """numpy's bundled OpenBLAS (scipy-openblas wheels), or None when numpy uses another BLAS."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _openblas_fn(*names):
    lib = _openblas_lib()
    for sym in names:
        fn = getattr(lib, sym, None) if lib is not None else None
        if fn is not None:
            return fn
    return None


def numpy_threads() -> int | None:
    """Threads numpy's BLAS uses (None if it cannot be asked)."""
    fn = _openblas_fn("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
    if fn is not None:
        return int(fn())
    env = os.environ.get("OPENBLAS_NUM_THREADS")
    return int(env) if env and env.isdigit() else None


def set_numpy_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count (False when numpy's BLAS cannot be reached)."""
    fn = _openblas_fn("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
    if fn is None:
        return False
    fn(int(n))
    return True


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(list(key))


# ---------------------------------------------------------------------------------------------
# gemm: f32 GEMM vs numpy (OpenBLAS), GEMV f32 / bf16 / f16 weights vs numpy f32 GEMV


def bench_gemm(opts: Options) -> list[dict]:
    from mojollm.backends import get_backend
    from mojollm.kernels import linalg
    from mojollm.weights import WeightTensor, float32_to_bf16

    cfg = linalg.config()
    peak = linalg.fma_peak_gflops()
    np_threads = numpy_threads()
    rows: list[dict] = []
    common = {"section": "gemm"}
    threads = {"threads": cfg.tasks, "peer": "numpy (OpenBLAS)", "peer_threads": np_threads}

    sizes = (512, 1024) if opts.quick else (512, 1024, 2048)
    for n in sizes:
        rng = _rng(1, n)
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        c = linalg.gemm(a, b)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        err = float(np.max(np.abs(c - ref) / (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))))
        t = time_blocks({"mojo": lambda: linalg.gemm(a, b), "numpy": lambda: a @ b},
                        opts.reps(5 if n >= 2048 else 10), opts.rounds)
        flops = 2.0 * n**3
        gflops = flops / t["mojo"]["median_s"] / 1e9
        rows.append({**common, "op": "gemm", "shape": f"{n}x{n}x{n}", "dtype": "f32", **threads,
                     "median_s": t["mojo"]["median_s"], "best_s": t["mojo"]["best_s"],
                     "gflops": gflops, "peer_median_s": t["numpy"]["median_s"],
                     "peer_gflops": flops / t["numpy"]["median_s"] / 1e9,
                     "vs_peer": t["numpy"]["median_s"] / t["mojo"]["median_s"],
                     "peak_gflops": peak, "fraction_of_peak": gflops / peak, "gbs": None,
                     "max_rel_err": err, "ok": err < 1e-5})

    # One core each: the kernels' own efficiency, and less exposed to other load on the machine.
    if set_numpy_threads(1):
        try:
            n = 1024
            rng = _rng(4, n)
            a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
            t = time_blocks({"mojo": lambda: linalg.gemm(a, b, max_threads=1), "numpy": lambda: a @ b},
                            opts.reps(5), opts.rounds)
            flops = 2.0 * n**3
            gflops = flops / t["mojo"]["median_s"] / 1e9
            peak1 = linalg.fma_peak_gflops(threads=1)
            rows.append({**common, "op": "gemm", "shape": f"{n}x{n}x{n}", "dtype": "f32", "threads": 1,
                         "peer": "numpy (OpenBLAS)", "peer_threads": 1,
                         "median_s": t["mojo"]["median_s"], "best_s": t["mojo"]["best_s"], "gflops": gflops,
                         "peer_median_s": t["numpy"]["median_s"], "peer_gflops": flops / t["numpy"]["median_s"] / 1e9,
                         "vs_peer": t["numpy"]["median_s"] / t["mojo"]["median_s"], "peak_gflops": peak1,
                         "fraction_of_peak": gflops / peak1, "gbs": None, "max_rel_err": None, "ok": None})
        finally:
            set_numpy_threads(np_threads or os.cpu_count() or 1)

    # Prefill-shaped linear: T tokens through a pre-packed [N, K] weight (f32 and bf16) against
    # numpy's x @ W.T on the f32 weight.
    linear_shapes = [(128, 1536, 576)] if opts.quick else [(128, 1536, 576), (512, 4096, 4096)]
    for t_tok, n, k in linear_shapes:
        rng = _rng(3, t_tok, n, k)
        w = rng.standard_normal((n, k), dtype=np.float32)
        x = rng.standard_normal((t_tok, k), dtype=np.float32)
        layers = {"f32": linalg.DenseLinear(WeightTensor.from_float("w", w)),
                  "bf16": linalg.DenseLinear(WeightTensor("w", (n, k), "BF16", float32_to_bf16(w)))}
        fns = {name: (lambda lin=lin: lin.forward(x)) for name, lin in layers.items()}
        fns["numpy"] = lambda: x @ w.T
        t = time_blocks(fns, opts.reps(5 if n * k * t_tok > 1e9 else 10), opts.rounds)
        flops = 2.0 * t_tok * n * k
        for name, lin in layers.items():
            wref = lin.to_float32().astype(np.float64)
            scale = np.abs(x.astype(np.float64)) @ np.abs(wref).T
            err = float(np.max(np.abs(lin.forward(x) - x.astype(np.float64) @ wref.T) / scale))
            gflops = flops / t[name]["median_s"] / 1e9
            rows.append({**common, "op": "linear", "shape": f"{t_tok}x{n}x{k}", "dtype": name, **threads,
                         "median_s": t[name]["median_s"], "best_s": t[name]["best_s"], "gflops": gflops,
                         "peer_median_s": t["numpy"]["median_s"], "peer_gflops": flops / t["numpy"]["median_s"] / 1e9,
                         "vs_peer": t["numpy"]["median_s"] / t[name]["median_s"], "peak_gflops": peak,
                         "fraction_of_peak": gflops / peak, "gbs": None, "max_rel_err": err, "ok": err < 1e-5})

    # Decode-shaped GEMV: one token through an [N, K] weight. The peer is numpy's f32 GEMV on the
    # row-major weight; bf16 / f16 weights stream half the bytes, so GB/s counts bytes stored.
    bw = get_backend("cpu").memory_bandwidth_gbs()
    gemv_shapes = [(1, 4096, 4096), (1, 1536, 576)] if opts.quick else [(1, 4096, 4096), (4, 4096, 4096),
                                                                      (1, 1536, 576), (1, 49152, 576)]
    for t_tok, n, k in gemv_shapes:
        rng = _rng(2, t_tok, n, k)
        w = rng.standard_normal((n, k), dtype=np.float32)
        x = rng.standard_normal((t_tok, k), dtype=np.float32)
        layers = {"f32": linalg.DenseLinear(WeightTensor.from_float("w", w)),
                  "bf16": linalg.DenseLinear(WeightTensor("w", (n, k), "BF16", float32_to_bf16(w))),
                  "f16": linalg.DenseLinear(WeightTensor("w", (n, k), "F16", w.astype(np.float16)))}
        fns = {name: (lambda lin=lin: lin.forward(x)) for name, lin in layers.items()}
        fns["numpy"] = lambda: x @ w.T
        t = time_blocks(fns, opts.reps(30), opts.rounds)
        peer_gbs = w.nbytes / t["numpy"]["median_s"] / 1e9
        for name, lin in layers.items():
            wref = lin.to_float32().astype(np.float64)
            y = lin.forward(x)
            scale = np.abs(x.astype(np.float64)) @ np.abs(wref).T
            err = float(np.max(np.abs(y - x.astype(np.float64) @ wref.T) / scale))
            weight_bytes = n * k * (4 if name == "f32" else 2)
            gbs = weight_bytes / t[name]["median_s"] / 1e9
            rows.append({**common, "op": "gemv" if t_tok == 1 else "linear", "shape": f"{t_tok}x{n}x{k}",
                         "dtype": name, **threads, "median_s": t[name]["median_s"], "best_s": t[name]["best_s"],
                         "gflops": 2.0 * t_tok * n * k / t[name]["median_s"] / 1e9,
                         "peer_median_s": t["numpy"]["median_s"], "peer_gflops": None,
                         "vs_peer": t["numpy"]["median_s"] / t[name]["median_s"],
                         "gbs": gbs, "peer_gbs": peer_gbs, "read_bw_gbs": bw, "fraction_of_peak": gbs / bw,
                         "max_rel_err": err, "ok": err < 1e-5})
    return rows


# ---------------------------------------------------------------------------------------------
# attention: paged flash-style prefill and (split-K) decode vs numpy and torch SDPA


def bench_attention(opts: Options) -> list[dict]:
    """The Mojo paged-attention kernels against numpy (batched matmul + softmax) and torch SDPA
    (CPU flash attention), both on contiguous [KVH, ctx, D] copies of the same K/V (the paged
    gather is not timed for them) and on the same number of threads.

    gflops counts QK^T and PV (4 * H * D per query-key pair; causal pairs only in prefill)
    against the machine's FMA peak; decode rows add GB/s of K/V read (2 * ctx * KVH * D * 4 B
    per sequence) against the host read bandwidth (read_bw_gbs, the cpu backend's probe); a K/V
    working set (kv_mib) that fits in the caches can beat that DRAM figure. ok: the Mojo output matches torch SDPA (or numpy
    without torch) to 1e-4 absolute."""
    import math

    from mojollm.backends import get_backend
    from mojollm.kernels import attention as attn
    from mojollm.kernels import linalg

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # the numpy peer still runs
        torch = None
    threads = attn._workers()
    if torch is not None:
        torch.set_num_threads(threads)
    peak = linalg.fma_peak_gflops()
    bw = get_backend("cpu").memory_bandwidth_gbs()
    common = {"section": "attention", "threads": threads, "peer": "torch SDPA" if torch else "numpy",
              "peer_threads": threads, "block_size": 16}

    def case(ctx_lens, q_lens, h, kvh, d, block=16):
        rng = _rng(3, len(ctx_lens), ctx_lens[0], q_lens[0], h, kvh, d)
        m = max(math.ceil(c / block) for c in ctx_lens)
        tables = rng.permutation(len(ctx_lens) * m).astype(np.int32).reshape(len(ctx_lens), m)  # shuffled blocks
        kc = rng.standard_normal((len(ctx_lens) * m, block, kvh, d), dtype=np.float32)
        vc = rng.standard_normal((len(ctx_lens) * m, block, kvh, d), dtype=np.float32)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        q = rng.standard_normal((int(cu[-1]), h, d), dtype=np.float32)
        k_seq = np.stack([kc[tables[s]].reshape(-1, kvh, d)[:c].transpose(1, 0, 2) for s, c in enumerate(ctx_lens)])
        v_seq = np.stack([vc[tables[s]].reshape(-1, kvh, d)[:c].transpose(1, 0, 2) for s, c in enumerate(ctx_lens)])
        return q, kc, vc, tables, cu, np.array(ctx_lens, np.int32), k_seq, v_seq

    def numpy_attention(q, k, v, scale, causal):
        """q [B, q, H, D], k/v [B, KVH, ctx, D] -> [B, q, H, D]; GQA as [B, KVH, G*q, D] matmuls."""
        b, nq, h, d = q.shape
        kvh, ctx = k.shape[1], k.shape[2]
        g = h // kvh
        qg = q.reshape(b, nq, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * nq, d)
        s = np.matmul(qg, k.transpose(0, 1, 3, 2)) * np.float32(scale)
        if causal:
            pos = np.tile(np.arange(ctx - nq, ctx), g)
            s = np.where(np.arange(ctx)[None, None, None, :] <= pos[None, None, :, None], s, np.float32(-np.inf))
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.matmul(s, v)
        return o.reshape(b, kvh, g, nq, d).transpose(0, 3, 1, 2, 4).reshape(b, nq, h, d)

    prefill = [(512, 9, 3, 64), (1024, 32, 8, 128)]  # the default model's shape; a Llama-3-8B layer
    decode = [(b, c, h, kvh, d) for (h, kvh, d) in ((9, 3, 64), (32, 8, 128)) for b in (1, 16) for c in (1024, 4096)]
    if opts.quick:
        prefill, decode = prefill[:1], [decode[0], decode[3]]
    rows: list[dict] = []
    for is_decode, shapes in ((False, prefill), (True, decode)):
        for shape in shapes:
            if is_decode:
                b, c, h, kvh, d = shape
                q, kc, vc, bt, cu, ctx, k_seq, v_seq = case([c] * b, [1] * b, h, kvh, d)
                flops, kv_bytes = 4.0 * h * d * c * b, 2 * b * c * kvh * d * 4
                label, op = f"{b}x1 ctx{c} H{h}/KV{kvh} D{d}", "attention_decode"
                run = lambda: attn.attention_decode(q, kc, vc, bt, ctx, scale)
                qb = q[:, None]  # [B, 1, H, D]
            else:
                t, h, kvh, d = shape
                q, kc, vc, bt, cu, ctx, k_seq, v_seq = case([t], [t], h, kvh, d)
                flops, kv_bytes = 4.0 * h * d * t * (t + 1) / 2, None
                label, op = f"1x{t} H{h}/KV{kvh} D{d}", "attention_prefill"
                run = lambda: attn.attention_prefill(q, kc, vc, bt, cu, ctx, scale)
                qb = q[None]
            scale = 1.0 / math.sqrt(d)
            fns = {"mojo": run, "numpy": lambda: numpy_attention(qb, k_seq, v_seq, scale, not is_decode)}
            ref = numpy_attention(qb, k_seq, v_seq, scale, not is_decode)
            if torch is not None:
                tq = torch.from_numpy(np.ascontiguousarray(qb.transpose(0, 2, 1, 3)))  # [B, H, q, D]
                tk, tv = torch.from_numpy(k_seq), torch.from_numpy(v_seq)
                fns["torch"] = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=not is_decode,
                                                                      scale=scale, enable_gqa=True)
                ref = fns["torch"]().numpy().transpose(0, 2, 1, 3)
            tm = time_blocks(fns, opts.reps(5 if flops > 1e9 else 20), opts.rounds, pause_s=0.1)
            out = run().reshape(ref.shape)
            err = float(np.max(np.abs(out - ref)))
            med = tm["mojo"]["median_s"]
            row = {**common, "op": op, "shape": label, "median_s": med, "best_s": tm["mojo"]["best_s"],
                   "gflops": flops / med / 1e9, "peak_gflops": peak, "fraction_of_peak": flops / med / 1e9 / peak,
                   "numpy_median_s": tm["numpy"]["median_s"], "vs_numpy": tm["numpy"]["median_s"] / med,
                   "peer_median_s": tm["torch"]["median_s"] if torch else None,
                   "vs_peer": tm["torch"]["median_s"] / med if torch else None,
                   "kv_mib": (kv_bytes if kv_bytes else 2 * k_seq.nbytes) / 2**20,
                   "gbs": kv_bytes / med / 1e9 if kv_bytes else None,
                   "peer_gbs": kv_bytes / tm["torch"]["median_s"] / 1e9 if kv_bytes and torch else None,
                   "read_bw_gbs": bw if kv_bytes else None,
                   "fraction_of_read_bw": kv_bytes / med / 1e9 / bw if kv_bytes else None,
                   "max_abs_err": err, "ok": err < 1e-4}
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# quant: GGUF Q4_0 / Q4_1 / Q8_0 matmul on the blocks (mojo/quant.mojo), float and int8 activations,
# vs numpy f32 on the dequantized W


def bench_quant(opts: Options) -> list[dict]:
    """Q4_0 / Q4_1 / Q8_0 matmul on the blocks, per dot-product path (`dot`): "float" (float32
    activations) and each int8-activation path this host's build has (int8_paths(), the default
    first; "generic" is plain Mojo SIMD without x86 intrinsics).
    Decode GEMV (one token through [N, K]): GB/s of weight bytes as stored (18 / 20 / 34 B per 32
    weights) against numpy's f32 GEMV on the dequantized weight and against the host read
    bandwidth (read_bw_gbs, the cpu backend's probe); gbs_1core: the same on one core. A weight
    that fits in the caches (576x1536: 0.55 MB) can beat that DRAM figure. Prefill (T = 64, 512 tokens): GFLOP/s of "float" (the GEMM)
    and "int8" (the GEMV on 8 rows at a time) against numpy's f32 GEMM on the dequantized weight
    and the machine's FMA peak. max_rel_err: |y - float64 on the dequantized weight| / sum |x| |w|;
    ok: float within 1e-5 of that; int8 within its activation-rounding bound
    (sum_b dx_b / 2 * sum_j |w_j|, dx = the block's max |x| / 127) plus the same 1e-5."""
    from mojollm.backends import get_backend
    from mojollm.kernels import linalg
    from mojollm.kernels.quant import QuantLinear, int8_paths, quantize
    from mojollm.kernels.quant import _kernels as quant_kernels
    from mojollm.weights import WeightTensor

    threads = int(quant_kernels().num_threads())
    peak = linalg.fma_peak_gflops()
    bw = get_backend("cpu").memory_bandwidth_gbs()
    paths = int8_paths()
    common = {"section": "quant", "threads": threads, "peer": "numpy f32 (OpenBLAS) on dequantized W",
              "peer_threads": numpy_threads()}
    shapes = [(576, 1536), (4096, 4096)] if opts.quick else [(576, 1536), (4096, 4096), (4096, 14336)]
    tokens = (64,) if opts.quick else (64, 512)
    gemv_dots = ["float", *(paths[:1] if opts.quick else paths)]
    rows: list[dict] = []
    for n, k in shapes:
        rng = _rng(4, n, k)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
        for qtype in ("Q4_0", "Q4_1", "Q8_0"):
            lin = QuantLinear(WeightTensor(f"w{n}x{k}", (n, k), qtype, quantize(w, qtype)))
            wd = lin.dequantize()  # the peer's weight: exactly what the blocks hold, as float32
            wd64 = wd.astype(np.float64)
            wblock = np.abs(wd64).reshape(n, k // 32, 32).sum(-1)  # sum_j |w_j| per block
            for t_tok in (1, *tokens):
                x = rng.standard_normal((t_tok, k), dtype=np.float32)
                x64 = x.astype(np.float64)
                ref, scale = x64 @ wd64.T, np.abs(x64) @ np.abs(wd64).T
                dx = np.abs(x64).reshape(t_tok, k // 32, 32).max(-1) / 127
                int8_bound = 0.5 * dx @ wblock.T + 1e-5 * scale
                flops = 2.0 * t_tok * n * k
                dots = gemv_dots if t_tok == 1 else ["float", "int8"]
                fns = {d: (lambda d=d: lin.forward(x, dot=d)) for d in dots}
                if t_tok == 1:
                    x1 = x[0].copy()
                    fns["numpy"] = lambda: wd @ x1
                    # and each dot on one core: per-core speed, and less exposed to a busy neighbour
                    fns.update({f"{d}/1": (lambda d=d: lin.forward(x, 1, dot=d)) for d in dots})
                    reps = max(5, min(200, int(2e9 / lin.nbytes)))
                    t = time_blocks(fns, opts.reps(reps), opts.rounds, pause_s=0.1)
                else:
                    fns["numpy"] = lambda: x @ wd.T
                    t = time_blocks(fns, opts.reps(max(2, min(20, int(5e9 / flops)))), opts.rounds)
                for dot in dots:
                    diff = np.abs(lin.forward(x, dot=dot) - ref)
                    err = float(np.max(diff / scale))
                    ok = err < 1e-5 if dot == "float" else bool(np.all(diff <= int8_bound))
                    med = t[dot]["median_s"]
                    row = {**common, "op": "quant_gemv" if t_tok == 1 else "quant_gemm", "dot": dot,
                           "shape": f"{t_tok}x{n}x{k}", "dtype": qtype, "weight_mib": lin.nbytes / 2**20,
                           "median_s": med, "best_s": t[dot]["best_s"], "gflops": flops / med / 1e9,
                           "vs_float": t["float"]["median_s"] / med,
                           "peer_median_s": t["numpy"]["median_s"], "vs_peer": t["numpy"]["median_s"] / med}
                    if t_tok == 1:
                        gbs = lin.nbytes / med / 1e9
                        row.update({"gbs": gbs, "best_gbs": lin.nbytes / t[dot]["best_s"] / 1e9,
                                    "gbs_1core": lin.nbytes / t[f"{dot}/1"]["median_s"] / 1e9,
                                    "peer_gbs": wd.nbytes / t["numpy"]["median_s"] / 1e9,
                                    "read_bw_gbs": bw, "fraction_of_read_bw": gbs / bw})
                    else:
                        row.update({"peer_gflops": flops / t["numpy"]["median_s"] / 1e9, "peak_gflops": peak,
                                    "fraction_of_peak": flops / med / 1e9 / peak})
                    rows.append({**row, "max_rel_err": err, "ok": ok})
    return rows


# ---------------------------------------------------------------------------------------------
# fp8: FP8 E4M3 blocks (mojollm.fp8; float32 activations, E4M3 decoded in registers) against Q8_0,
# which stores the same 34 bytes per 32 weights, on the default model's (SmolLM2-135M) shapes


def bench_fp8(opts: Options) -> list[dict]:
    """GEMV (one token) and prefill GEMM (T = 64) on F8_E4M3 and Q8_0 blocks of the same weights:
    GB/s of the blocks (34 B per 32 weights for both), on every core and on one (`/1`). Q8_0 runs
    its float32 path and its default int8-activation path (the decode default); F8_E4M3 has only
    the float32 path. Shapes: qkv, o, gate_up, down and the LM head of SmolLM2-135M, and
    4096x4096 (16 MiB, beyond the caches: a DRAM-bound figure). max_rel_err: |y - float64 on the
    dequantized weight| / sum |x| |w|."""
    from mojollm import fp8
    from mojollm.backends import get_backend
    from mojollm.kernels.quant import QuantLinear, quantize
    from mojollm.kernels.quant import _kernels as quant_kernels
    from mojollm.weights import WeightTensor

    threads = int(quant_kernels().num_threads())
    bw = get_backend("cpu").memory_bandwidth_gbs()
    shapes = [(960, 576), (3072, 576), (4096, 4096)] if opts.quick else \
        [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (4096, 4096)]
    rows: list[dict] = []
    for n, k in shapes:
        rng = _rng(7, n, k)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
        layers = {"F8_E4M3": QuantLinear(WeightTensor("w", (n, k), "F8_E4M3", fp8.quantize_blocks(w))),
                  "Q8_0": QuantLinear(WeightTensor("w", (n, k), "Q8_0", quantize(w, "Q8_0")))}
        for t_tok in (1, 64):
            x = rng.standard_normal((t_tok, k), dtype=np.float32)
            cases = {"F8_E4M3 float": (layers["F8_E4M3"], "float"), "Q8_0 float": (layers["Q8_0"], "float"),
                     "Q8_0 int8": (layers["Q8_0"], "int8")}
            if t_tok > 1:
                del cases["Q8_0 int8"]  # prefill's default is the float GEMM
            fns = {name: (lambda lin=lin, d=d: lin.forward(x, dot=d)) for name, (lin, d) in cases.items()}
            if t_tok == 1:
                fns.update({f"{name}/1": (lambda lin=lin, d=d: lin.forward(x, 1, dot=d))
                            for name, (lin, d) in cases.items()})
                reps = max(5, min(300, int(2e9 / layers["Q8_0"].nbytes)))
            else:
                reps = max(2, min(20, int(5e9 / (2.0 * t_tok * n * k))))
            t = time_blocks(fns, opts.reps(reps), opts.rounds, pause_s=0.1)
            for name, (lin, d) in cases.items():
                wd = lin.dequantize().astype(np.float64)
                x64 = x.astype(np.float64)
                err = float(np.max(np.abs(lin.forward(x, dot=d) - x64 @ wd.T) / (np.abs(x64) @ np.abs(wd).T)))
                med = t[name]["median_s"]
                row = {"section": "fp8", "threads": threads, "op": "gemv" if t_tok == 1 else "gemm",
                       "shape": f"{t_tok}x{n}x{k}", "dtype": lin.qtype, "dot": d, "weight_mib": lin.nbytes / 2**20,
                       "median_s": med, "best_s": t[name]["best_s"], "gflops": 2.0 * t_tok * n * k / med / 1e9,
                       "vs_q8_0_float": t["Q8_0 float"]["median_s"] / med, "max_rel_err": err,
                       "ok": err < (1e-5 if d == "float" else 1e-2)}
                if t_tok == 1:
                    row.update({"gbs": lin.nbytes / med / 1e9, "gbs_1core": lin.nbytes / t[f"{name}/1"]["median_s"] / 1e9,
                                "vs_q8_0_int8": t["Q8_0 int8"]["median_s"] / med, "read_bw_gbs": bw,
                                "fraction_of_read_bw": lin.nbytes / med / 1e9 / bw})
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Options], list[dict]]] = {
    "gemm": bench_gemm,
    "attention": bench_attention,
    "quant": bench_quant,
    "fp8": bench_fp8,
}


def print_table(rows: list[dict], title: str | None = None) -> None:
    """One table; columns are the union of the rows' keys, minus those that are null in every row."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and any(x.get(k) is not None for x in rows)]

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "ok" if v else "FAILED"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\t".join(cols))
        for r in rows:
            print("\t".join(cell(r.get(c)) for c in cols))
        return
    table = Table(*cols, title=title)
    for r in rows:
        table.add_row(*(cell(r.get(c)) for c in cols))
    Console(width=max(120, 14 * len(cols))).print(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", default=["all"], metavar="SECTION",
                    help=f"{' | '.join(SECTIONS)} | all (default: all)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the result document here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per block (default: per section)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per implementation")
    args = ap.parse_args(argv)
    names = list(SECTIONS) if "all" in args.sections else args.sections
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)} or all")
    if args.repeats is not None and args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")

    opts = Options(quick=args.quick, repeats=args.repeats, rounds=args.rounds)
    load_at_start = os.getloadavg()[0]
    rows: list[dict] = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        section_rows = SECTIONS[name](opts)
        print_table(section_rows, title=name)
        rows += section_rows
    if args.json_path:
        from mojollm.measure import bench_document

        config = {"sections": names, "quick": args.quick, "repeats": args.repeats, "rounds": args.rounds,
                  "load_average_1m": load_at_start, "load_average_1m_end": os.getloadavg()[0]}
        command = shlex.join(["python", "bench/kernels.py", *(argv if argv is not None else sys.argv[1:])])
        doc = bench_document("kernels", config, rows, command)
        with open(args.json_path, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0 if all(r.get("ok", True) is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
