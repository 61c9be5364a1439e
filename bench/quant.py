"""Quantization methods side by side on one model: file size, perplexity, decode speed.

    python bench/quant.py [--model M.gguf | HF_DIR] [--specs rtn:4,gptq:4:g128,smoothquant:8,fp8]
                          [--backend cpu|cuda] [--eval-tokens 1024] [--calib-tokens N] [--json PATH]

A spec is method:bits[:gGROUP][:sym] (group 32 by default; "fp8" alone is FP8 E4M3). The baseline
is the model's own tensors dequantized to float32. Every other row is that model quantized by
`mojollm quantize` (mojollm.model_quantizer.quantize_model, the CLI's function): a GGUF where the
format is a GGUF block type (group 32 at 8 / 4 bits, W8A8), else a HF directory (GPTQ / AWQ packed
safetensors, FP8 safetensors) that mojollm's loader maps onto its kernels' formats. Perplexity is
measured on the same text for every row: the compound-statements chapter of the language
reference that ships with CPython (pydoc_data), which is not the calibration text. Decode tok/s is
batch 1 through LLM.generate (128 greedy tokens, median of 3); "weight_mib" is what the backend
holds in memory for the weights.
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


DEFAULT_SPECS = ("rtn:8,gptq:8,awq:8,smoothquant:8,w8a8:8,fp8,rtn:4,gptq:4,awq:4,rtn:4:g128,gptq:4:g128,awq:4:g128,"
                 "rtn:3:g128,gptq:3:g128,awq:3:g128")


def parse_spec(spec: str) -> dict:
    parts = spec.strip().split(":")
    method, rest = parts[0], parts[1:]
    out = {"method": method, "bits": 8 if method == "fp8" else int(rest.pop(0)), "group_size": 32, "symmetric": False}
    for p in rest:
        if p == "sym":
            out["symmetric"] = True
        elif p.startswith("g"):
            out["group_size"] = int(p[1:])
        else:
            raise SystemExit(f"bad spec {spec!r}: method:bits[:gGROUP][:sym]")
    return out


def _is_gguf_output(spec: dict) -> bool:
    return spec["method"] != "fp8" and spec["group_size"] == 32 and spec["bits"] in (8, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a Llama-family GGUF or HF directory (default: the default model)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--specs", default=DEFAULT_SPECS)
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
        base = src if src.is_dir() else write_float_gguf(src, Path(tmp) / "float32.gguf")
        ref = measure(base, args.backend, args.eval_tokens, text)
        rows.append({"method": "float (source)" if src.is_dir() else "float32 (dequantized source)", "bits": None,
                     "group": None, "file_mib": round(_size(base) / 2**20, 1), **ref, "ppl_vs_float": 0.0,
                     "quantize_s": None})
        print(json.dumps(rows[-1]), flush=True)
        for spec in map(parse_spec, args.specs.split(",")):
            name = f"{spec['method']}-{spec['bits']}-g{spec['group_size']}{'-sym' if spec['symmetric'] else ''}"
            out = Path(tmp) / (name + ".gguf" if _is_gguf_output(spec) and not src.is_dir() else name)
            t = time.perf_counter()
            summary = quantize_model(src, out, method=spec["method"], bits=spec["bits"], symmetric=spec["symmetric"],
                                     group_size=spec["group_size"], calib_tokens=args.calib_tokens)
            took = time.perf_counter() - t
            m = measure(out, args.backend, args.eval_tokens, text)
            rows.append({"method": spec["method"], "bits": spec["bits"], "group": spec["group_size"],
                         "format": summary.get("type") or summary.get("format"), "file_mib": round(_size(out) / 2**20, 1),
                         **m, "ppl_vs_float": round(m["ppl"] / ref["ppl"] - 1, 4), "quantize_s": round(took, 1)})
            print(json.dumps(rows[-1]), flush=True)
    from kernels import print_table

    print_table(rows, title=f"quantization of {src.name} ({args.backend})")
    if args.json:
        Path(args.json).write_text(json.dumps(bench_document("quant", vars(args), rows), indent=2) + "\n")


def _size(path: Path) -> int:
    """A file's bytes, or a directory's weight files' (safetensors)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


if __name__ == "__main__":
    main()
