"""The KV cache through the product (LLM): what each cache dtype, and each cache policy, costs and saves.

    python bench/kvcache.py [--backend cpu] [--model M] [--dtypes float32,bfloat16,float16,int8,fp8]
                            [--policies full] [--prompt-len 2048] [--max-tokens 64] [--eval-tokens 2560]
                            [--repeats 3] [--json PATH]

One row per (dtype, policy):
- kv_bytes_per_token: every layer's K and V of one token in the pool (int8 / fp8: D codes and a
  4-byte scale per head row), and the blocks / tokens a fixed --kv-cache-memory budget holds;
- decode_tok_s: batch-1 greedy decode of --max-tokens after a --prompt-len prompt (the median of
  --repeats, the rows' runs interleaved so that a busy host slows all alike; the prompt's blocks
  stay in the prefix cache, so only a warm-up run prefills), and its ratio to the float32 row of
  the same policy;
- ppl: LLM.perplexity over --eval-tokens of public-domain text (CPython's own documentation,
  pydoc_data topics joined), its difference to float32's, and whether the greedy tokens of the
  decode run equal float32's (greedy_same_as_float32; a near tie may flip one, then they part).

Policies: POLICIES maps a name to the extra LLM keyword arguments that select it ("full": keep
every token, the engine's default). The eviction policies add their entries there.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

TOPICS = ("compound", "datamodel", "types", "execmodel", "exprlists", "import", "assignment", "function")
POLICIES: dict[str, dict] = {"full": {}}
# KV compression (engine/kv_policy.py; bench/kvcache_policy.py measures streaming and budgets in
# depth). Budgets are fractions of the sequence length. h2o runs over a float32 cache only (its
# attention mass is a numpy pass on the cpu backend): pair it with --dtypes float32.
POLICIES.update({
    "sink-window-0.5": {"kv_policy": "sink-window", "kv_budget": 0.5},
    "h2o-0.5": {"kv_policy": "h2o", "kv_budget": 0.5},
    "h2o-0.2": {"kv_policy": "h2o", "kv_budget": 0.2},
})


def eval_text(min_chars: int = 40_000) -> str:
    """CPython's language reference topics (pydoc_data, public domain), joined until min_chars."""
    from pydoc_data.topics import topics

    parts, n = [], 0
    for name in TOPICS:
        parts.append(topics[name])
        n += len(topics[name])
        if n >= min_chars:
            break
    return "\n\n".join(parts)


def measure_ppl(model, backend, dtype: str, policy: str, text: str, args) -> dict:
    """The pool's size and the perplexity, on a fresh engine without the prefix cache (every window
    really prefills)."""
    from mojollm import LLM

    llm = LLM(model=model, backend=backend, kv_cache_dtype=dtype, kv_cache_memory=args.kv_cache_memory,
              enable_prefix_caching=False, max_num_seqs=1, **POLICIES[policy])
    bs = llm.engine.block_size
    per_block = llm.model.kv_cache_bytes_per_block(bs)
    ppl = llm.perplexity(text, max_tokens=args.eval_tokens)
    row = {"dtype": dtype, "policy": policy, "kv_dtype": llm.model.kv_dtype, "kv_bytes_per_token": per_block / bs,
           "kv_blocks": llm.engine.num_blocks, "kv_tokens": llm.engine.num_blocks * bs,
           "ppl": round(ppl["ppl"], 4), "eval_tokens": ppl["tokens"]}
    del llm
    gc.collect()
    return row


def measure_decode(model, backend, rows: list[dict], text: str, args) -> list[list[int]]:
    """Decode tok/s of every row, the rows' runs interleaved (round r runs every row once), so a
    busy host slows all of them alike. The prompt's blocks stay in each engine's prefix cache: the
    warm-up run prefills, the timed runs decode only. Returns each row's greedy tokens."""
    from mojollm import LLM, SamplingParams

    llms = [LLM(model=model, backend=backend, kv_cache_dtype=r["dtype"], kv_cache_memory=args.kv_cache_memory,
                max_num_seqs=1, **POLICIES[r["policy"]]) for r in rows]
    ids = llms[0].tokenizer.encode(text)
    prompt = (ids * (args.prompt_len // max(len(ids), 1) + 1))[:args.prompt_len]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens = [llm.generate([prompt], sp)[0].outputs[0].token_ids for llm in llms]
    rates: list[list[float]] = [[] for _ in rows]
    for _ in range(args.repeats):
        for i, llm in enumerate(llms):
            rates[i].append(llm.generate([prompt], sp)[0].metrics.decode_tokens_per_s)
    for r, llm, rr in zip(rows, llms, rates):
        r.update(prompt_len=len(prompt), decode_tokens=args.max_tokens,
                 decode_tok_s=round(float(np.median(rr)), 2), decode_tok_s_min=round(min(rr), 2),
                 decode_tok_s_max=round(max(rr), 2),
                 fused_decode=getattr(llm.engine.runner, "program", None) is not None)
    return tokens


def main(argv=None) -> int:
    from mojollm.kv_dtypes import KV_CACHE_DTYPES, check_kv_cache_dtype
    from mojollm.measure import bench_document

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--model", default=None, help="GGUF / HF directory (default: the default model)")
    ap.add_argument("--dtypes", default=",".join(KV_CACHE_DTYPES))
    ap.add_argument("--policies", default="full", help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=2560)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtypes = [check_kv_cache_dtype(d) for d in args.dtypes.split(",") if d.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    text = eval_text()
    rows = []
    for policy in policies:
        for dtype in dtypes:
            print(f"[kvcache] perplexity: {dtype} / {policy}", file=sys.stderr, flush=True)
            rows.append(measure_ppl(args.model, args.backend, dtype, policy, text, args))
    print("[kvcache] decode, every row in turn", file=sys.stderr, flush=True)
    tokens = measure_decode(args.model, args.backend, rows, text, args)
    for policy in policies:
        base = next((i for i, r in enumerate(rows) if r["policy"] == policy and r["kv_dtype"] == "float32"), None)
        if base is None:
            continue
        b = rows[base]
        for i, row in enumerate(rows):
            if row["policy"] != policy:
                continue
            row["decode_vs_float32"] = round(row["decode_tok_s"] / b["decode_tok_s"], 3)
            row["ppl_minus_float32"] = round(row["ppl"] - b["ppl"], 4)
            row["kv_tokens_vs_float32"] = round(row["kv_tokens"] / b["kv_tokens"], 3)
            diff = next((j for j, (x, y) in enumerate(zip(tokens[i], tokens[base])) if x != y), None)
            row["greedy_same_as_float32"] = diff is None
            row["greedy_first_difference"] = diff
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        config["eval_text"] = f"pydoc_data.topics {'+'.join(TOPICS)} (first {args.eval_tokens} tokens)"
        Path(args.json).write_text(json.dumps(bench_document("kvcache", config, rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
