"""Where a decode step's time goes, through the product (LLM on the cuda backend).

    python bench/profile_decode.py --shape llama-3.2-1b [--batch 1]

Prints (1) the host side of one engine step, split by phase (perf_counter around the runner's
pieces, device synchronised at the end of each step as the runner does), and (2) the GPU time of
each kernel of one eager decode step (torch.profiler), grouped by kernel name, against the bytes
that kernel class must read at the copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    import torch
    from random_llama import write_random_llama

    from mojollm import LLM, SamplingParams

    path = Path(f"/tmp/{args.shape}")
    if not (path / "model.safetensors").exists():
        write_random_llama(path, args.shape, "bfloat16", seed=0, device="cuda")
    llm = LLM(model=str(path), backend="cuda", max_num_seqs=max(args.batch, 1))
    runner, eng = llm.engine.runner, llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1000, 60000, size=(args.batch, 128)).tolist()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))

    # ---- host phases of a step
    phases = defaultdict(float)

    def timed(obj, name):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - t
        setattr(obj, name, wrapper)

    for name in ("_load_sampling", "_fill_static", "_replay", "execute"):
        timed(runner, name)
    for name in ("schedule",):
        timed(eng.scheduler, name)
    for name in ("step",):
        timed(eng, name)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    steps = eng.stats.steps
    print(f"{args.shape} batch {args.batch}: {wall / args.steps * 1e3:.3f} ms per generated token step (wall)")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v / args.steps * 1e3:8.3f} ms/step")
    assert all(o.error is None for o in outs)

    # ---- GPU kernels of one eager decode step
    from torch.profiler import ProfilerActivity, profile

    batch_out = []
    orig = runner.use_graphs
    runner.use_graphs = False
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    runner.use_graphs = orig
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        if e.device_time_total > 0:
            per[e.key][0] += e.device_time_total
            per[e.key][1] += e.count
    total = sum(v[0] for v in per.values())
    print(f"GPU kernels over 4 decode steps + 1 prefill (eager), total {total / 1e3:.2f} ms:")
    for k, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:18]:
        print(f"  {us / 1e3:8.3f} ms  {n:6d}x  {k[:100]}")
    del batch_out


if __name__ == "__main__":
    main()
