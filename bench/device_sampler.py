"""DeviceSampler on a CUDA GPU: CUDA-graph capture check and timings.

    PYTHONPATH=python python3 bench/device_sampler.py [--vocab 128256]

1. capture: sample() of a mixed batch (greedy, top-k/top-p, min-p, penalties, logprobs) captured in
   one CUDA graph and replayed over several steps equals eager calls on a twin sampler (tokens,
   logprobs, step counters, output counts); and CUDA tokens vs CPU-torch tokens for the same inputs.
2. timings per call (CUDA events, median of 50 after warm-up), eager and graph replay, for
   batch sizes 1..64 and three plans: all-greedy, sampling without sort/penalties, everything.
   --profile: the kernels of the 'everything' plan at S = 1 and 64 (torch.profiler).

Measured on one H200 (torch 2.11.0+cu130), V = 128256, bf16 logits, us per call:

    plan          S   eager   graph       everything = top-k/top-p sort + penalties + min-p +
    greedy        1      72      40                    logprobs (chosen + top-5)
    greedy       64      98      77
    temp+min_p    1     787     158       graph replays == eager bit for bit (tokens, logprobs,
    temp+min_p   64     764     440       steps, counts); CUDA tokens == CPU-torch tokens 384/384
    everything    1    1399     374
    everything   64    2189    1964       (S=64: the [64, 128k] radix sort ~460 us, the top-5
                                           radix top-k ~100 us, the rest ~20 memory-bound passes)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

try:
    from mojollm.backends.cuda.sampler import DeviceSampler, SamplePlan
except ImportError:  # the device machine: PYTHONPATH=python, the package mapping is not installed
    path = Path(__file__).resolve().parents[1] / "backends" / "cuda" / "sampler.py"
    spec = importlib.util.spec_from_file_location("device_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_sampler"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    DeviceSampler, SamplePlan = mod.DeviceSampler, mod.SamplePlan
from mojollm.sampling_params import SamplingParams

KINDS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, logprobs=5),
         SamplingParams(min_p=0.05), SamplingParams(temperature=1.0, repetition_penalty=1.2,
                                                    presence_penalty=0.3, frequency_penalty=0.2)]


def make(S: int, V: int, device: str, kinds=KINDS) -> DeviceSampler:
    s = DeviceSampler(S, V, device)
    for r in range(S):
        s.assign(r, kinds[r % len(kinds)], seed=r, prompt_token_ids=list(range(r, 4000, 37)),
                 output_token_ids=[r, r + 1, 7])
    return s


def copy_state(dst: DeviceSampler, src: DeviceSampler) -> None:
    for name in ("fparams", "iparams", "step", "counts", "prompt_mask"):
        if getattr(src, name) is not None:
            getattr(dst, name).copy_(getattr(src, name))


def capture_check(V: int) -> None:
    S, steps = 64, 6
    g = torch.Generator("cuda").manual_seed(0)
    logits = [torch.randn(S, V, device="cuda", generator=g).mul(3).to(torch.bfloat16) for _ in range(steps)]
    rows = torch.randperm(S, device="cuda", generator=g).to(torch.int32)
    a, b = make(S, V, "cuda"), make(S, V, "cuda")
    plan = a.plan()
    static_logits = logits[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            a.sample(static_logits, rows, plan)
    torch.cuda.current_stream().wait_stream(side)
    copy_state(b, a)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = a.sample(static_logits, rows, plan)
    for t in range(steps):
        static_logits.copy_(logits[t])
        graph.replay()
        ref = b.sample(logits[t], rows, plan)
        assert torch.equal(out.token_ids, ref.token_ids), t
        assert torch.equal(out.logprobs, ref.logprobs) and torch.equal(out.top_ids, ref.top_ids), t
    assert torch.equal(a.step, b.step) and torch.equal(a.counts, b.counts)
    print(f"capture: {steps} graph replays == eager (tokens, logprobs, steps, counts), S={S}, V={V}")
    # the same draws on CPU torch
    c = make(S, V, "cpu")
    copy_state(c, b)
    c.step.copy_(b.step.cpu())
    d = make(S, V, "cuda")
    copy_state(d, b)
    same = total = 0
    for t in range(steps):
        x = logits[t]
        tc = c.sample(x.cpu(), rows.cpu(), plan).token_ids
        td = d.sample(x, rows, plan).token_ids.cpu()
        same += int((tc == td).sum())
        total += S
    print(f"cuda vs cpu torch: {same}/{total} tokens identical")


def time_call(fn, reps: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e3)
    return statistics.median(ts)


def timings(V: int) -> None:
    plans = {
        "greedy": ([SamplingParams(temperature=0.0)], SamplePlan(greedy_only=True, penalties=False, sort=False)),
        "temp+min_p": ([SamplingParams(temperature=0.8, min_p=0.05)],
                       SamplePlan(greedy_only=False, penalties=False, sort=False)),
        "everything": (KINDS, SamplePlan(logprobs=5)),
    }
    print(f"\n{'plan':<12}{'S':>4}{'eager us':>11}{'graph us':>11}")
    for name, (kinds, plan) in plans.items():
        for S in (1, 8, 32, 64):
            s = make(S, V, "cuda", kinds)
            logits = torch.randn(S, V, device="cuda").to(torch.bfloat16)
            rows = torch.arange(S, device="cuda", dtype=torch.int32)
            for _ in range(3):
                s.sample(logits, rows, plan)
            eager = time_call(lambda: s.sample(logits, rows, plan))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                s.sample(logits, rows, plan)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                s.sample(logits, rows, plan)
            replay = time_call(graph.replay)
            print(f"{name:<12}{S:>4}{eager:>11.1f}{replay:>11.1f}")


def profile(V: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    for S in (1, 64):
        s = make(S, V, "cuda")
        logits = torch.randn(S, V, device="cuda").to(torch.bfloat16)
        rows = torch.arange(S, device="cuda", dtype=torch.int32)
        plan = SamplePlan(logprobs=5)
        for _ in range(3):
            s.sample(logits, rows, plan)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                s.sample(logits, rows, plan)
            torch.cuda.synchronize()
        print(f"--- S={S} everything, 10 calls")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    if args.profile:
        profile(args.vocab)
        raise SystemExit
    capture_check(args.vocab)
    timings(args.vocab)
