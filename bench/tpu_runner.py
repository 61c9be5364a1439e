"""The tpu backend's two ways to run a step, through the product, in one process: the jitted runner
(backends/tpu/runner.py: one XLA program per step, KV caches donated) against the old path (the
lazy op tracer of backends/tpu/backend.py at --old-commit, compiled per layer segment, driven by
the engine's base runner).

    python bench/tpu_runner.py                          # default model (SmolLM2-135M Q4_1), batch 1 and 8
    python bench/tpu_runner.py --tiny                   # bench/random_llama.py's "tiny" random Llama
    python bench/tpu_runner.py --synthetic --batch 1,8,32   # default model's shapes, random weights
                                                        # (a GPU machine without the GGUF: XLA:GPU)

Both paths run on whatever JAX device exists (XLA:CPU, XLA:GPU, TPU). Each run is `LLM.generate`
of --output-len greedy tokens for --batch prompts of --prompt-len random tokens, set up and timed as
`mojollm compare` does it (compare.engine_options and greedy_run: one prefill step, then one decode
step per token). The first run of each path (compilation) is reported apart; then the timed runs
alternate between the paths (old, new, old, new, ...) so that both see the same machine load, and
the median and best of --repeats are reported, with the process CPU time of a run (less sensitive to
other processes on a shared machine than wall time). The two paths' greedy tokens must be equal.

The old backend is read from git (`git show <commit>:backends/tpu/backend.py`) or --old-backend FILE,
and imported beside the current one (it uses the current xla_ops / pallas_kernels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "d43a5de710ccb8089f574cb7761c65e38734151f"   # the last commit with the lazy op tracer


def old_backend_class(path: str | None, commit: str):
    """TpuBackend of the old path, imported as its own module."""
    if path is None:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:backends/tpu/backend.py"],
                             check=True, capture_output=True, text=True).stdout
        path = str(Path(tempfile.mkdtemp()) / "tpu_backend_old.py")
        Path(path).write_text(src)
    spec = importlib.util.spec_from_file_location("tpu_backend_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.TpuBackend


def load(backend, args):
    from mojollm.models import load_model

    if args.tiny:
        return load_model(args.tiny_dir, backend=backend)
    if args.synthetic:
        sys.path.insert(0, str(ROOT / "bench"))
        import tpu_decode

        return tpu_decode.load(backend, argparse.Namespace(synthetic=True, model=None))
    return load_model(args.model, backend=backend)


def measure(args, batch: int) -> dict:
    from mojollm.backends.tpu.backend import TpuBackend
    from mojollm.compare import engine_options, greedy_run
    from mojollm.llm import LLM

    backends = {"old": old_backend_class(args.old_backend, args.old_commit)(), "new": TpuBackend()}
    llms, first, runs = {}, {}, {}
    for name, be in backends.items():
        llms[name] = LLM(load(be, args), **engine_options(batch, args.prompt_len, args.output_len, args.block_size))
    runner = {name: type(llm.engine.runner).__name__ for name, llm in llms.items()}
    assert runner == {"old": "ModelRunner", "new": "TpuRunner"}, runner
    vocab = llms["new"].model.config.vocab_size
    prompts = np.random.default_rng(0).integers(min(100, vocab // 2), vocab, (batch, args.prompt_len))
    for name, llm in llms.items():
        t0 = time.perf_counter()
        first[name] = greedy_run(llm, prompts, args.output_len)
        first[name]["first_run_s"] = time.perf_counter() - t0
        runs[name] = []
    loadavg = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, llm in llms.items():
            cpu0 = time.process_time()
            runs[name].append(greedy_run(llm, prompts, args.output_len))
            runs[name][-1]["cpu_s"] = time.process_time() - cpu0
        loadavg.append(os.getloadavg()[0])
    same = all(np.array_equal(r["tokens"], first["old"]["tokens"]) for rs in runs.values() for r in rs)
    out = {"batch": batch, "device": backends["new"].device_name, "greedy_tokens_equal": bool(same),
           "load_average_1min": [min(loadavg), max(loadavg)]}
    steps = args.output_len - 1
    for name, rs in runs.items():
        dec = [1e3 * r["decode_s"] / steps for r in rs]
        ttft = [1e3 * r["ttft_s"] for r in rs]
        out[name] = {"runner": runner[name], "first_run_s": first[name]["first_run_s"],
                     "decode_ms_per_step": statistics.median(dec), "decode_ms_per_step_best": min(dec),
                     "decode_tokens_per_s": 1e3 * batch / statistics.median(dec),
                     "ttft_ms": statistics.median(ttft), "ttft_ms_best": min(ttft),
                     "cpu_s_per_run": statistics.median(r["cpu_s"] for r in rs)}
    if hasattr(llms["new"].engine.runner, "num_compilations"):
        out["new"]["compilations"] = llms["new"].engine.runner.num_compilations()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / HF dir (default: the default model)")
    ap.add_argument("--tiny", action="store_true", help="bench/random_llama.py's 'tiny' random Llama (float32)")
    ap.add_argument("--synthetic", action="store_true", help="random weights with the default model's shapes/types")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=33, help="greedy tokens per prompt (>= 2)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    ap.add_argument("--old-backend", default=None, help="the old backend.py (default: read from git at --old-commit)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "bench"))
        from random_llama import write_random_llama

        args.tiny_dir = write_random_llama(tempfile.mkdtemp(), shape="tiny", dtype="float32", std=0.15)
    results = []
    for batch in (int(b) for b in args.batch.split(",")):
        r = measure(args, batch)
        results.append(r)
        print(f"batch {batch} on {r['device']}: greedy tokens equal {r['greedy_tokens_equal']}, "
              f"load average {r['load_average_1min'][0]:.1f}-{r['load_average_1min'][1]:.1f}")
        for name in ("old", "new"):
            x = r[name]
            print(f"  {name} ({x['runner']}): decode {x['decode_tokens_per_s']:.1f} tok/s "
                  f"({x['decode_ms_per_step']:.1f} ms/step, best {x['decode_ms_per_step_best']:.1f}), "
                  f"TTFT {x['ttft_ms']:.1f} ms (best {x['ttft_ms_best']:.1f}), process CPU {x['cpu_s_per_run']:.2f} s/run, "
                  f"first run {x['first_run_s']:.1f} s"
                  + (f", {x['compilations']} compilations" if "compilations" in x else ""))
        print(f"  new/old decode speed {r['old']['decode_ms_per_step'] / r['new']['decode_ms_per_step']:.2f}, "
              f"TTFT {r['old']['ttft_ms'] / r['new']['ttft_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "config": {k: str(v) for k, v in vars(args).items()},
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
