"""What each KV cache dtype buys on the cuda backend: long-context decode speed through LLM.

    python bench/kvcache_cuda.py [--shape llama-3.2-1b] [--dtypes bfloat16,float16,int8,fp8]
                                 [--batches 1,16] [--prompt-len 4096] [--new-tokens 128] [--json PATH]

On the random-weight bf16 model of --shape (bench/random_llama.py, written once to --dir), one
LLM per KV dtype (the model's weights loaded once and shared), each decoding --new-tokens greedy
tokens after distinct --prompt-len-token prompts, at each batch size:

- kv_bytes_per_token: every layer's K and V of one token (int8 / fp8: D codes and a 4-byte
  scale per head row), and the tokens the pool holds;
- decode_tok_s: tokens after each sequence's first, summed over the batch, over the time from the
  batch's last first token to the end (gpu_e2e's measure); vs_bfloat16: its ratio to the
  bfloat16 cache's;
- replay_ms: the GPU time of one decode step alone (its CUDA graph replayed 50 times), and the
  bytes that step reads: the weights once plus batch x context x kv_bytes_per_token, over the
  replay time (GB/s) and the device's copy bandwidth (roofline share);
- greedy_agree: tokens equal to the bfloat16 cache's run before the first difference (random
  weights: near-uniform logits, so a small perturbation can flip a near tie early).

At 4k tokens of context the 1B shape's decode reads ~130 MB of bf16 KV per sequence against
2.5 GB of weights: batch 16 reads about as much KV as weights, so the cache's bytes show there.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_e2e import agree, mojollm_decode  # noqa: E402  (bench/ on the path first)


def replay_ms(llm, batch: int, context: int) -> float | None:
    """GPU time of one decode step: the graph of (batch bucket, width bucket of `context`) replayed."""
    import torch

    from mojollm.backends.cuda.runner import bucket_for

    runner = llm.engine.runner
    width = bucket_for(-(-context // llm.engine.block_size), runner.width_buckets)
    keys = [k for k in runner.graphs if k[0] == bucket_for(batch, runner.batch_buckets) and k[1] == width]
    if not keys:
        return None
    g = runner.graphs[keys[0]].graph
    for _ in range(3):
        g.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        g.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--dtypes", default="bfloat16,float16,int8,fp8")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where the model is written (default /tmp/<shape>)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from random_llama import write_random_llama

    from mojollm import LLM
    from mojollm.backends import get_backend
    from mojollm.models import load_model

    dtypes = args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    path = Path(args.dir or f"/tmp/{args.shape}")
    t = time.perf_counter()
    if not (path / "model.safetensors").exists():
        write_random_llama(path, args.shape, "bfloat16", seed=0, device="cuda")
    backend = get_backend("cuda")
    model = load_model(path, backend)
    print(f"[model] {args.shape} random bf16 at {path}, loaded in {time.perf_counter() - t:.1f} s", flush=True)
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1000, vocab // 2, size=(max(batches), args.prompt_len)).tolist()
    context = args.prompt_len + args.new_tokens
    bw = backend.memory_bandwidth_gbs()
    wbytes = model.weight_bytes
    res = dict(shape=args.shape, date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(0),
               command=" ".join(sys.argv), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
               copy_GBps=bw, weight_GB=wbytes / 1e9, rows=[])
    base: dict[int, dict] = {}
    for kv in dtypes:
        t = time.perf_counter()
        llm = LLM(model, backend="cuda", kv_cache_dtype=kv, max_num_seqs=max(batches), max_model_len=context + 16)
        load_s = time.perf_counter() - t
        eng = llm.engine
        per_tok = model.kv_cache_bytes_per_block(eng.block_size) / eng.block_size
        print(f"[{kv}] {per_tok / 1024:.1f} KiB of KV per token; pool {eng.num_blocks} blocks "
              f"({eng.num_blocks * eng.block_size} tokens); engine up in {load_s:.1f} s "
              f"({len(eng.runner.graphs)} graphs)", flush=True)
        for b in batches:
            mojollm_decode(llm, prompts[:b], 8)  # warm-up: prefills (the prompts' blocks stay cached)
            run = mojollm_decode(llm, prompts[:b], args.new_tokens)
            tps, toks = run["decode_tok_s"], run["tokens"]
            ms = replay_ms(llm, b, context)
            step_bytes = wbytes + b * context * per_tok
            row = dict(kv_dtype=kv, batch=b, kv_bytes_per_token=per_tok, pool_tokens=eng.num_blocks * eng.block_size,
                       decode_tok_s=tps, replay_ms=ms, step_GB=step_bytes / 1e9,
                       replay_GBps=step_bytes / ms / 1e6 if ms else None,
                       roofline_share=step_bytes / ms / 1e6 / bw if ms and bw else None)
            if kv == dtypes[0]:
                base[b] = dict(tps=tps, tokens=toks)
            row[f"vs_{dtypes[0]}"] = tps / base[b]["tps"]
            row["greedy_agree"] = float(np.mean([agree(a, r) for a, r in zip(toks, base[b]["tokens"])]))
            res["rows"].append(row)
            print(f"[{kv}] batch {b}: decode {tps:.0f} tok/s ({row[f'vs_{dtypes[0]}']:.2f}x {dtypes[0]}), step "
                  f"{ms if ms is None else round(ms, 3)} ms GPU reading {step_bytes / 1e9:.2f} GB"
                  + (f" = {row['replay_GBps']:.0f} GB/s ({100 * row['roofline_share']:.0f}% of copy)" if ms and bw else "")
                  + f"; greedy agree {row['greedy_agree']:.0f} tokens", flush=True)
        del llm, eng
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| kv dtype | KiB/token | batch | decode tok/s | vs " + dtypes[0] + " | step ms (GPU) | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['kv_dtype']} | {r['kv_bytes_per_token'] / 1024:.1f} | {r['batch']} | {r['decode_tok_s']:.0f} | "
              f"{r[f'vs_{dtypes[0]}']:.2f} | {r['replay_ms'] or float('nan'):.3f} | {r['replay_GBps'] or float('nan'):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
