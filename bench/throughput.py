"""Engine throughput: continuous batching vs one request at a time, prefix cache on vs off.

    python bench/throughput.py                          # default model, cpu backend, 64 requests
    python bench/throughput.py --num-prompts 128 --json out.json --markdown

Workload: random-token prompts of mixed lengths (uniform in [L/2, 3L/2]) and mixed output lengths,
greedy, ignore_eos (so every run produces the same number of tokens). The same requests run
(a) all at once through continuous batching and (b) one after another; a second workload puts a
shared "system prompt" in front of every request and runs it with the prefix cache on and off.
Reported: output tokens/s, p50/p99 TTFT and inter-token latency, steps and mean tokens per step,
and the weight bytes streamed per second (every step reads all weights once) against the host's
measured read bandwidth: the physical limit of a decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the default model)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--sequential-prompts", type=int, default=None,
                    help="run only this many requests one at a time (default: all)")
    ap.add_argument("--shared-prefix-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None, help="write the result document here")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = ap.parse_args(argv)

    from mojollm.backends import get_backend
    from mojollm.engine.metrics import throughput_benchmark, throughput_rows
    from mojollm.measure import bench_document, cpu_read_bandwidth_gbs
    from mojollm.models import load_model

    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    backend = get_backend(args.backend)
    model = load_model(args.model, backend, progress=say)
    engine_kw = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    res = throughput_benchmark(model, args.num_prompts, args.input_len, args.output_len, seed=args.seed,
                               sequential_prompts=args.sequential_prompts,
                               shared_prefix_len=args.shared_prefix_len, engine_kwargs=engine_kw, progress=say)
    bandwidth = cpu_read_bandwidth_gbs() if backend.name == "cpu" else backend.memory_bandwidth_gbs()
    rows = throughput_rows(res, backend.name)
    for r in rows:
        r["host_read_gbs"] = None if bandwidth is None else round(bandwidth, 2)
        r["fraction_of_bandwidth"] = (round(r["weight_read_gbs"] / bandwidth, 3)
                                      if bandwidth and r.get("weight_read_gbs") else None)
    config = dict(vars(args), model=str(getattr(model, "path", args.model)), weight_bytes=model.weight_bytes,
                  threads=os.cpu_count())
    config.pop("json_path")
    config.pop("markdown")
    doc = bench_document("throughput", config, rows, shlex.join(["python", "bench/throughput.py", *(argv or sys.argv[1:])]))
    doc["summary"] = {"batched_over_sequential": res["batched_over_sequential"],
                      "prefix_cache_speedup": res.get("prefix_cache_speedup")}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
    cols = ["mode", "requests", "prompt_tokens", "output_tokens", "wall_s", "output_tokens_per_s",
            "total_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "steps",
            "mean_tokens_per_step", "prefix_cache_hit_rate", "preemptions", "weight_read_gbs",
            "fraction_of_bandwidth", "vs_peer"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("–" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    print(f"\nbatched / sequential output tokens/s: {res['batched_over_sequential']}x"
          f" (goal >= 4x); prefix cache on / off: {res.get('prefix_cache_speedup')}x;"
          f" host read bandwidth {bandwidth and round(bandwidth, 1)} GB/s, weights {model.weight_bytes / 1e6:.1f} MB")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
