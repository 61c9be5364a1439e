"""Quantization methods side by side on one model: file size, perplexity, decode speed.

    python bench/quant.py [--model M.gguf] [--methods rtn,gptq,awq] [--bits 4,8] [--symmetric]
                          [--eval-tokens 1024] [--json PATH]

The baseline is the model's own tensors dequantized to float32. Every other row is that model
quantized by `mojollm quantize` (mojollm.model_quantizer) into GGUF blocks. Perplexity is
measured on the same text for every row: the compound-statements chapter of the language reference that ships
with CPython (pydoc_data), which is not the calibration text. Decode tok/s is batch 1 through
LLM.generate (128 greedy tokens, median of 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def eval_text() -> str:
    from pydoc_data.topics import topics

    return topics["compound"]


def measure(path: Path, backend: str, eval_tokens: int, text: str) -> dict:
    from mojollm import LLM, SamplingParams

    llm = LLM(model=str(path), backend=backend, enable_prefix_caching=False)
    ppl = llm.perplexity(text, max_tokens=eval_tokens)
    prompt = llm.tokenizer.encode("The data model of Python describes")
    greedy = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    rates = [llm.generate([prompt], greedy)[0].metrics.decode_tokens_per_s for _ in range(3)]
    return {"ppl": round(ppl["ppl"], 4), "eval_tokens": ppl["tokens"], "decode_tok_s": round(float(np.median(rates)), 1),
            "weight_mib": round(llm.model.weight_bytes / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a Llama-family GGUF (default: the default model)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--symmetric", action="store_true", help="4 bits as Q4_0 instead of Q4_1")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mojollm.measure import bench_document
    from mojollm.model_quantizer import quantize_model, write_float_gguf
    from mojollm.model_store import resolve_model_path

    src = Path(resolve_model_path(args.model))
    text = eval_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = write_float_gguf(src, Path(tmp) / "float32.gguf")
        ref = measure(base, args.backend, args.eval_tokens, text)
        rows.append({"method": "float32 (dequantized source)", "type": "F32", "mib": round(base.stat().st_size / 2**20, 1),
                     **ref, "ppl_vs_float": 0.0, "quantize_s": None})
        print(json.dumps(rows[-1]), flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            for method in args.methods.split(","):
                out = Path(tmp) / f"{method}-{bits}.gguf"
                t = time.perf_counter()
                summary = quantize_model(src, out, method=method, bits=bits, symmetric=args.symmetric,
                                         calib_tokens=args.calib_tokens)
                took = time.perf_counter() - t
                m = measure(out, args.backend, args.eval_tokens, text)
                rows.append({"method": method, "type": summary["type"], "mib": round(out.stat().st_size / 2**20, 1),
                             **m, "ppl_vs_float": round(m["ppl"] / ref["ppl"] - 1, 4), "quantize_s": round(took, 1)})
                print(json.dumps(rows[-1]), flush=True)
    from kernels import print_table

    print_table(rows, title=f"quantization of {src.name} ({args.backend})")
    if args.json:
        Path(args.json).write_text(json.dumps(bench_document("quant", vars(args), rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
