"""The GGUF files people download, made by llama.cpp itself: mojollm vs llama.cpp on each.

    python bench/kquant_llamacpp.py --llama-python /tmp/llamacpp-venv/bin/python [--types Q4_K_M,Q8_0]

1. The default model (SmolLM2-135M, Q4_1) is widened to a float16 GGUF (every key copied with its
   GGUF type, so llama.cpp reads it).
2. llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) writes each --types file:
   Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q3_K_M, Q2_K. With a 576-wide model most tensors fall back to
   Q5_0 / Q5_1 / Q8_0 (k-quant rows must be multiples of 256); the table lists the mix.
3. Both engines score the same token ids (mojollm's tokenizer) teacher-forced: perplexity, and
   mojollm's relative difference to llama.cpp's; then batch-1 greedy decode tokens/s on 2 threads
   (mojollm through LLM.generate, llama.cpp through Llama.eval), as bench/e2e.py measures.
llama-cpp-python is not a mojollm dependency (its source build takes ~10 minutes on 2 cores): it
runs in the Python given by --llama-python, in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

# llama.cpp's LLAMA_FTYPE_MOSTLY_* values.
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q3_K_M": 12, "Q2_K": 10}
TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text()

_LLAMA_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import llama_cpp
    cmd = sys.argv[1]
    if cmd == "quantize":
        src, dst, ftype, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
        print(json.dumps({"rc": int(rc)}))
        sys.exit(0)
    path, threads, ids, decode_len = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    x = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    ppl = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
    rates = []
    for _ in range(3):
        llm.reset(); llm.eval(ids[:16])
        t = time.perf_counter()
        for _ in range(decode_len):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(decode_len / (time.perf_counter() - t))
    print(json.dumps({"ppl": ppl, "decode_tok_s": float(np.median(rates)),
                      "version": llama_cpp.__version__}))
""")


def llama(python: str, *args) -> dict:
    res = subprocess.run([python, "-c", _LLAMA_SCRIPT, *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama.cpp {args[0]} failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_f16_gguf(src: Path, dst: Path) -> None:
    """src widened to float16 (norms stay float32), every metadata key with its own GGUF type."""
    import gguf

    from mojollm.model_quantizer import read_gguf, write_gguf

    reader, tensors = read_gguf(src)
    write_gguf(reader, dst, {n: (w if w.ndim == 1 else w.astype(np.float16), None) for n, (w, _) in tensors.items()},
               gguf.LlamaFileType.MOSTLY_F16)


def mojollm_run(path: Path, ids: list[int], decode_len: int) -> dict:
    from mojollm import LLM, SamplingParams
    from mojollm.engine.step import StepBatch

    llm = LLM(str(path), backend="cpu")
    model = llm.model
    block = 16
    table = list(range(-(-len(ids) // block)))
    model.allocate_kv_cache(len(table), block)
    logits = model.forward(StepBatch.single_sequence(ids, 0, table, block, all_logits=True))
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    ppl = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
    greedy = SamplingParams(max_tokens=decode_len, temperature=0.0, ignore_eos=True)
    llm.generate([ids[:8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    rates = [llm.generate([ids[:16]], greedy)[0].metrics.decode_tokens_per_s for _ in range(3)]
    types = Counter(w.qtype for w in model._checkpoint.weights.values() if w.qtype != "F32")
    return {"ppl": ppl, "decode_tok_s": float(np.median(rates)), "weight_bytes": model.weight_bytes,
            "types": " ".join(f"{k}:{v}" for k, v in sorted(types.items()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    ap.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q3_K_M,Q2_K")
    ap.add_argument("--tokens", type=int, default=512, help="scored tokens")
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    from mojollm.model_store import default_model_path
    from mojollm.models.gguf_loader import load_gguf
    from mojollm.tokenizer import Tokenizer

    src = default_model_path()
    ckpt = load_gguf(src)
    ids = Tokenizer.from_gguf_metadata(ckpt.metadata, where=str(src)).encode(TEXT)[:args.tokens]
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "smollm2-f16.gguf"
        write_f16_gguf(src, f16)
        for name in types:
            path = Path(tmp) / f"smollm2-{name}.gguf"
            t0 = time.perf_counter()
            if llama(args.llama_python, "quantize", f16, path, FTYPES[name], args.threads)["rc"] != 0:
                raise RuntimeError(f"llama.cpp could not quantize to {name}")
            ref = llama(args.llama_python, "run", path, args.threads, json.dumps(ids), args.decode_len)
            ours = mojollm_run(path, ids, args.decode_len)
            rows.append({"file": name, "mib": path.stat().st_size / 2**20, "tensor_types": ours["types"],
                         "tokens": len(ids), "ppl": ours["ppl"], "llama_cpp_ppl": ref["ppl"],
                         "ppl_vs_llama_cpp": ours["ppl"] / ref["ppl"] - 1,
                         "decode_tok_s": ours["decode_tok_s"], "llama_cpp_decode_tok_s": ref["decode_tok_s"],
                         "threads": args.threads, "llama_cpp": ref["version"],
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels import print_table

    print_table(rows, title="k-quant files by llama.cpp")
    if args.json_path:
        from mojollm.measure import bench_document

        config = {"types": types, "tokens": args.tokens, "decode_len": args.decode_len, "threads": args.threads,
                  "load_average_1m": load, "load_average_1m_end": os.getloadavg()[0]}
        command = shlex.join(["python", "bench/kquant_llamacpp.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.json_path, "w") as f:
            f.write(json.dumps(bench_document("e2e", config, rows, command), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
