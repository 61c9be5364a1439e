"""Decode speed of the default model with float vs int8 activations in the quantized GEMVs.

    python bench/int8_decode.py [--rounds 3] [--tokens 128] [--json PATH]

One process, one LLM (cpu backend, every core); the two arithmetics alternate round by round
(the machine is shared: alternation spreads load changes over both), each round a greedy
generation of --tokens tokens after a short prompt (ignore_eos), decode tok/s from the request's
metrics. "float" is QuantLinear's float path (the state before int8 activations), "int8" the
default (auto: int8 for decode-sized calls). The fused decode step (mojo/decode.mojo) takes its
matmul path from its program table (slot 12), set here to the same choice; with
MOJOLLM_CPU_FUSED_DECODE=0 every op runs through QuantLinear.forward instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    from mojollm import LLM, SamplingParams
    from mojollm.kernels import quant

    llm = LLM()
    program = getattr(llm.engine.runner, "program", None)  # the fused decode step, if the model has one
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([args.prompt], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up

    def run(dot: str) -> float:
        quant.set_default_dot(dot)
        if program is not None:
            program.table[12] = quant.default_dot()
        llm.generate([args.prompt], SamplingParams(max_tokens=2, temperature=0.0))  # warm this setting
        out = llm.generate([args.prompt], greedy)
        return float(out[0].metrics.decode_tokens_per_s)

    runs: dict[str, list[float]] = {"float": [], "auto": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for dot in runs:
            runs[dot].append(run(dot))
        loads.append(os.getloadavg()[0])
    quant.set_default_dot(None)
    summary = {dot: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for dot, v in runs.items()}
    speedup = summary["auto"]["median"] / summary["float"]["median"]
    path = "fused decode step" if program is not None else "per-op forward"
    print(f"default model, {path}, {args.tokens} greedy tokens, {args.rounds} rounds, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    for dot, s in summary.items():
        name = "float" if dot == "float" else f"int8 ({quant.int8_paths()[0]})"
        print(f"  {name:>16}: decode {s['median']:.1f} tok/s (median; {s['min']:.1f}-{s['max']:.1f})")
    print(f"  int8 / float: {speedup:.3f}x")
    if args.json_path:
        doc = {"kind": "mojollm.bench.int8_decode", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "decode_step": path, "tokens": args.tokens, "rounds": args.rounds, "load_average": loads,
               "int8_path": quant.int8_paths()[0], "results": summary, "int8_over_float": speedup}
        with open(args.json_path, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
