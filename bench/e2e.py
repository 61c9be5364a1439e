"""End-to-end speed, side by side in one run: mojollm vs llama.cpp vs transformers.

    python bench/e2e.py [--model M] [--backend cpu] [--threads 2] [--prompt-len 512] [--decode-len 128]
                        [--llama-python PATH] [--requantize Q4_K_M,Q8_0] [--no-transformers] [--json PATH]

--requantize adds versions of the model that llama.cpp's own quantizer makes (the file types
people download), each run by every engine in turn after the model itself.

* prefill tokens/s: one prompt of --prompt-len tokens, time to its first logits (median of repeats);
* decode tokens/s: batch 1, --decode-len greedy tokens after a short prompt (median of repeats);
* bytes per decode token (the model's weights, as stored) against the device's measured memory
  bandwidth (backend.memory_bandwidth_gbs): the roofline a batch-1 decode cannot beat.

mojollm runs through the public API (`LLM.generate`, the engine users get). llama.cpp runs the
same GGUF through `llama-cpp-python` with the same thread count, in the Python given by
--llama-python (it is not a mojollm dependency: its source build takes minutes), in a subprocess.
transformers runs the same GGUF dequantized to float32 (`gguf_file=`), with torch limited to the
same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

_TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n real-text token ids (the README repeated), so every engine sees the same prompt."""
    ids = tokenizer.encode(_TEXT, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def bench_mojollm(llm, prompt, decode_len, repeats):
    from mojollm import SamplingParams

    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate([prompt[:8]], SamplingParams(max_tokens=4, **greedy))  # warm-up: kernels, caches
    prefill, decode = [], []
    for _ in range(repeats):
        out = llm.generate([prompt], SamplingParams(max_tokens=1, **greedy))
        prefill.append(len(prompt) / out[0].metrics.ttft)
        out = llm.generate([prompt[:16]], SamplingParams(max_tokens=decode_len, **greedy))
        decode.append(out[0].metrics.decode_tokens_per_s)
    return {"engine": f"mojollm ({llm.backend.name})", "prefill_tok_s": float(np.median(prefill)),
            "decode_tok_s": float(np.median(decode)), "weight_bytes": llm.model.weight_bytes}


_LLAMA_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, threads, prompt, decode_len, repeats = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512, verbose=False)
    def run(tokens):
        llm.reset(); t = time.perf_counter(); llm.eval(tokens); return time.perf_counter() - t
    run(prompt[:8])
    prefill, decode = [], []
    for _ in range(repeats):
        prefill.append(len(prompt) / run(prompt))
        run(prompt[:16])
        t = time.perf_counter()
        for _ in range(decode_len):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        decode.append(decode_len / (time.perf_counter() - t))
    import llama_cpp
    print(json.dumps({"engine": "llama.cpp (llama-cpp-python " + llama_cpp.__version__ + ")",
                      "prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode))}))
""")


def bench_llama_cpp(python, model_path, threads, prompt, decode_len, repeats):
    res = subprocess.run([python, "-c", _LLAMA_SCRIPT, str(model_path), str(threads), json.dumps(prompt),
                          str(decode_len), str(repeats)], capture_output=True, text=True)
    if res.returncode != 0:
        return {"engine": "llama.cpp", "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_transformers(model_path, threads, prompt, decode_len, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt])
    prefill, decode = [], []
    with torch.inference_mode():
        model(ids[:, :8])
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids)
            prefill.append(len(prompt) / (time.perf_counter() - t))
            out = model(ids[:, :16], use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_len):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(decode_len / (time.perf_counter() - t))
    return {"engine": f"transformers {__import__('transformers').__version__} float32",
            "prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed")
    ap.add_argument("--requantize", default="", help="llama.cpp file types to make from the model, e.g. Q4_K_M,Q8_0")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mojollm.measure import bench_document
    from mojollm.model_store import resolve_model_path

    model_path = str(resolve_model_path(args.model))
    types = [t for t in args.requantize.split(",") if t]
    if types and not args.llama_python:
        ap.error("--requantize needs --llama-python (llama.cpp's quantizer)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [model_path]
        if types:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from kquant_llamacpp import FTYPES, llama, write_f16_gguf

            f16 = Path(tmp) / "f16.gguf"
            write_f16_gguf(Path(model_path), f16)
            for name in types:
                paths.append(str(Path(tmp) / f"{Path(model_path).stem}-{name}.gguf"))
                if llama(args.llama_python, "quantize", f16, paths[-1], FTYPES[name], args.threads)["rc"] != 0:
                    raise SystemExit(f"llama.cpp could not quantize to {name}")
        for path, label in zip(paths, ["model", *types]):
            rows += run_model(args, path, label)
    if args.json:
        doc = bench_document("e2e", vars(args), rows)
        Path(args.json).write_text(json.dumps(doc, indent=2))


def run_model(args, model_path: str, label: str) -> list[dict]:
    from mojollm import LLM
    from mojollm.measure import device_bandwidth

    # Prefix caching off: every repeat must really prefill its prompt.
    llm = LLM(model=model_path, backend=args.backend, enable_prefix_caching=False)
    prompt = prompt_ids(llm.tokenizer, args.prompt_len)

    rows = [bench_mojollm(llm, prompt, args.decode_len, args.repeats)]
    if args.llama_python:
        rows.append(bench_llama_cpp(args.llama_python, model_path, args.threads, prompt, args.decode_len, args.repeats))
    if not args.no_transformers:
        rows.append(bench_transformers(model_path, args.threads, prompt, args.decode_len, args.repeats))

    bw, how = device_bandwidth(llm.backend)
    weight_bytes = rows[0]["weight_bytes"]
    ours = rows[0]
    for r in rows:
        r["threads"] = args.threads
        if "decode_tok_s" in r:
            r["mojollm_decode_speedup"] = round(ours["decode_tok_s"] / r["decode_tok_s"], 3)
            r["mojollm_prefill_speedup"] = round(ours["prefill_tok_s"] / r["prefill_tok_s"], 3)
        if "error" in r:
            r["error"] = " ".join(r["error"])
    if bw:
        ours["bandwidth_gbs"] = round(bw, 2)
        ours["decode_roofline_tok_s"] = round(bw * 1e9 / weight_bytes, 1)
        ours["decode_roofline_fraction"] = round(ours["decode_tok_s"] / ours["decode_roofline_tok_s"], 3)
    for r in rows:
        r["model"] = label if label != "model" else Path(model_path).name
    print(f"model {model_path}  weights {weight_bytes / 1e6:.1f} MB/token  memory bandwidth {bw and round(bw, 1)} GB/s ({how})")
    print(f"{'engine':48s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ours/prefill':>13s} {'ours/decode':>12s}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:48s} error: {r['error']}")
            continue
        print(f"{r['engine']:48s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['mojollm_prefill_speedup']:13.2f} {r['mojollm_decode_speedup']:12.2f}")
    if bw:
        print(f"mojollm decode reads {ours['decode_roofline_fraction']:.0%} of the measured bandwidth "
              f"(roofline {ours['decode_roofline_tok_s']} tok/s)")
    return rows


if __name__ == "__main__":
    main()
