"""k-quant and Q5 CPU kernels (mojo/kquant.mojo) against numpy and Modular's `quantization` package.

    python bench/kquant.py                       # every type, 576x1536 and 4096x4096
    python bench/kquant.py --full                # + 4096x14336
    python bench/kquant.py --types Q4_K,Q6_K --json out.json

Rows per (type, shape, T):
  * GEMV (T = 1, 4): weights streamed from memory: the call rotates over copies of the weight
    totalling >= 256 MiB, as a decode step reads each matrix once. gbs = weight bytes as stored /
    time, against read_bw_gbs (the cpu backend's read-bandwidth probe).
  * GEMM (T = 64): gflops against numpy's f32 GEMM on the dequantized weight.
  * one_core (T = 1, 4, 8): a 64 x 4096 weight (L2-resident) on one thread, best of 300 calls:
    the kernel's own decode-and-FMA rate, which bounds the GEMV when memory is not the limit
    (least disturbed by other load on a shared machine).
Implementations, alternating block by block (bench/kernels.py time_blocks), medians quoted:
  float32   mojollm's float32-activation kernels on the GGUF blocks (QuantLinear loaded with a
            float default dot product)
  modular   Modular's Q4_K / Q6_K int8 kernels (quantization.qmatmul_k, weights repacked once);
            what QuantLinear uses for those types from 2 MiB (MODULAR_MIN_BYTES), and below that
            from 4 rows (MODULAR_MIN_ROWS); quantlinear_uses says which one a default layer runs
  numpy     f32 x @ W.T on the weight dequantized once (OpenBLAS); T = 1 also reports numpy_deq:
            gguf.quants.dequantize + matmul per call, what a numpy user without kernels pays
err columns: max |y - y64| / (|x| @ |W|^T) against float64 on the dequantized weight.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import numpy_threads, print_table, time_blocks  # noqa: E402

TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
COLD_BYTES = 256 << 20
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rng, qtype: str, rows: int, k: int) -> np.ndarray:
    """Valid random blocks: random codes and packed scales, float16 scales ~N(0, 0.02)."""
    from mojollm.weights import BLOCK_BYTES, BLOCK_SIZE

    nb, bb = k // BLOCK_SIZE[qtype], BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, :, off:off + 2] = (rng.standard_normal((rows, nb, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, nb * bb)


def float32_layer(w):
    """A QuantLinear on the float32-activation kernels whatever its size."""
    from mojollm.kernels.quant import QuantLinear, set_default_dot

    previous = set_default_dot("float")  # read at load: Q4_K / Q6_K then keep the GGUF blocks only
    try:
        return QuantLinear(w)
    finally:
        set_default_dot(previous)


def rel_err(y, x64, w64) -> float:
    return float(np.max(np.abs(y - x64 @ w64.T) / (np.abs(x64) @ np.abs(w64).T)))


def bench(types, shapes, rounds: int) -> list[dict]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from mojollm.backends import get_backend
    from mojollm.kernels.quant import MODULAR_MIN_ROWS, MODULAR_TYPES, QuantLinear, _kquant_kernels
    from mojollm.weights import WeightTensor

    bw = get_backend("cpu").memory_bandwidth_gbs()
    rows: list[dict] = []
    for qtype in types:
        for n, k in shapes:
            rng = np.random.default_rng([n, k, len(qtype)])
            raw = random_blocks(rng, qtype, n, k)
            copies = max(1, COLD_BYTES // raw.nbytes)
            ours = [float32_layer(WeightTensor("w", (n, k), qtype, raw.copy())) for _ in range(copies)]
            modular = []
            if qtype in MODULAR_TYPES and n % 32 == 0:
                for _ in range(copies):
                    packed = np.empty_like(raw)
                    _kquant_kernels().modular_pack(ours[0]._code, raw.ctypes.data, packed.ctypes.data, packed.shape)
                    modular.append(packed)
            wd = gguf_dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)
            wd64 = wd.astype(np.float64)
            np_copies = [wd] + [wd.copy() for _ in range(max(0, COLD_BYTES // wd.nbytes - 1))]
            for t in (1, 4, 64):
                x = rng.standard_normal((t, k)).astype(np.float32)
                x64 = x.astype(np.float64)
                y = np.empty((t, n), np.float32)
                turn = {"float32": 0, "modular": 0, "numpy": 0}

                def run_ours():
                    ours[turn["float32"] % copies].forward(x)
                    turn["float32"] += 1

                def run_modular():
                    w = modular[turn["modular"] % copies]
                    turn["modular"] += 1
                    _kquant_kernels().modular_matmul(ours[0]._code, w.ctypes.data, x.ctypes.data, y.ctypes.data, (t, n, k))

                def run_numpy():
                    w = np_copies[turn["numpy"] % len(np_copies)]
                    turn["numpy"] += 1
                    return x @ w.T

                fns = {"float32": run_ours, "numpy": run_numpy}
                if modular:
                    fns["modular"] = run_modular
                flops = 2.0 * t * n * k
                reps = copies if t < 64 else max(3, min(20, int(4e9 / flops)))
                res = time_blocks(fns, reps, rounds, pause_s=0.1)
                med = res["float32"]["median_s"]
                row = {"section": "kquant", "op": "gemv" if t < 64 else "gemm", "shape": f"{t}x{n}x{k}",
                       "dtype": qtype, "weight_mib": raw.nbytes / 2**20, "threads": None,
                       "median_s": med, "gbs": raw.nbytes / med / 1e9, "gflops": flops / med / 1e9,
                       "err": rel_err(ours[0].forward(x), x64, wd64),
                       "numpy_median_s": res["numpy"]["median_s"], "vs_numpy": res["numpy"]["median_s"] / med}
                if modular:
                    mmed = res["modular"]["median_s"]
                    _kquant_kernels().modular_matmul(ours[0]._code, modular[0].ctypes.data, x.ctypes.data,
                                                     y.ctypes.data, (t, n, k))
                    row.update({"modular_median_s": mmed, "modular_gbs": raw.nbytes / mmed / 1e9,
                                "modular_gflops": flops / mmed / 1e9, "modular_err": rel_err(y, x64, wd64),
                                "float32_vs_modular": mmed / med})
                if t == 1:
                    t0 = time.perf_counter()
                    gguf_dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32) @ x[0]
                    row["numpy_deq_s"] = time.perf_counter() - t0
                    row.update({"read_bw_gbs": bw, "fraction_of_read_bw": row["gbs"] / bw})
                default = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
                uses_modular = default._modular is not None and (default._packed or t >= MODULAR_MIN_ROWS)
                row["quantlinear_uses"] = "modular" if uses_modular else "float32"
                rows.append(row)
            del ours, modular, np_copies
        rows += one_core_rows(qtype)
    return rows


def one_core_rows(qtype: str) -> list[dict]:
    from mojollm.weights import WeightTensor

    n, k = 64, 4096
    rng = np.random.default_rng([n, k, len(qtype), 1])
    lin = float32_layer(WeightTensor("w", (n, k), qtype, random_blocks(rng, qtype, n, k)))
    rows = []
    for t in (1, 4, 8):
        x = rng.standard_normal((t, k)).astype(np.float32)
        lin.forward(x, max_threads=1)
        best = float("inf")
        for _ in range(300):
            t0 = time.perf_counter()
            lin.forward(x, max_threads=1)
            best = min(best, time.perf_counter() - t0)
        rows.append({"section": "kquant", "op": "one_core", "shape": f"{t}x{n}x{k}", "dtype": qtype,
                     "weight_mib": lin.nbytes / 2**20, "threads": 1, "best_s": best, "gbs": lin.nbytes / best / 1e9,
                     "ns_per_256_weights": best * 1e9 / (n * k / 256)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--full", action="store_true", help="add 4096x14336")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        ap.error(f"unknown type(s) {unknown}: choose from {', '.join(TYPES)}")
    shapes = [(576, 1536), (4096, 4096)] + ([(4096, 14336)] if args.full else [])
    load = os.getloadavg()[0]
    from mojollm.kernels.quant import _kquant_kernels

    _kquant_kernels()  # compile before timing anything
    rows = bench(types, shapes, args.rounds)
    threads = os.cpu_count()
    for r in rows:
        if r["op"] != "one_core":
            r["threads"] = threads
            r["peer_threads"] = numpy_threads()
    print_table(rows, title="kquant")
    if args.json_path:
        from mojollm.measure import bench_document

        config = {"types": types, "full": args.full, "rounds": args.rounds, "load_average_1m": load,
                  "load_average_1m_end": os.getloadavg()[0]}
        command = shlex.join(["python", "bench/kquant.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.json_path, "w") as f:
            f.write(json.dumps(bench_document("kernels", config, rows, command), indent=2) + "\n")
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
