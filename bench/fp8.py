"""FP8 E4M3 weights (`mojollm quantize --method fp8`) against Q8_0 and float32 on one model:
perplexity, decode tok/s, size.

    python bench/fp8.py [--model M.gguf] [--eval-tokens 1024] [--json PATH]

Rows: the model's tensors dequantized to float32 (the baseline), Q8_0 by round to nearest
(`--method rtn --bits 8`: the same 34 bytes per 32 projection weights as FP8, and a Q8_0
embedding / LM head), and FP8 per output channel (a HF directory: float16 embedding and LM
head, as FP8 checkpoints keep them). Perplexity and decode tok/s as bench/quant.py measures them
(its held-out text; batch 1, 128 greedy tokens, median of 3). Decode bytes per token
(weight_mib) differ by the LM head: on a tied model it is the embedding, Q8_0 in one and float16
in the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a Llama-family GGUF (default: the default model)")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kernels import print_table
    from quant import eval_text, measure

    from mojollm.measure import bench_document
    from mojollm.model_quantizer import quantize_model, write_float_gguf
    from mojollm.model_store import resolve_model_path

    src = Path(resolve_model_path(args.model))
    text = eval_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copies = [("float32 (dequantized source)", "F32", write_float_gguf(src, Path(tmp) / "float32.gguf"), None)]
        for label, kind, out, method, bits in (("Q8_0 (rtn)", "Q8_0", Path(tmp) / "q8.gguf", "rtn", 8),
                                               ("FP8 E4M3 per channel", "F8_E4M3", Path(tmp) / "fp8", "fp8", 8)):
            t = time.perf_counter()
            quantize_model(src, out, method=method, bits=bits)
            copies.append((label, kind, out, round(time.perf_counter() - t, 1)))
        base = None
        for label, kind, path, took in copies:
            m = measure(path, "cpu", args.eval_tokens, text)
            base = base or m["ppl"]
            size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
            rows.append({"weights": label, "type": kind, "mib": round(size / 2**20, 1), **m,
                         "ppl_vs_float": round(m["ppl"] / base - 1, 4), "quantize_s": took})
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows, title=f"FP8 vs Q8_0 on {src.name} (cpu)")
    if args.json:
        Path(args.json).write_text(json.dumps(bench_document("fp8", vars(args), rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
