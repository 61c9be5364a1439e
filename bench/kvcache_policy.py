"""KV-cache compression policies through the product: perplexity and decode tok/s per policy.

    python bench/kvcache_policy.py [--backend cpu] [--model M] [--max-model-len 1024] [--tokens 4096]
                                   [--chunk 64] [--json PATH] [--csv PATH] [--plot PATH]

Text: CPython's pydoc topics (pydoc_data.topics, public domain documentation) joined, the first
`--tokens` + 1 tokens. Every perplexity is teacher-forced scoring through the engine (LLM
internals: one score-only request, chunks of `--chunk` tokens) so each token's log-probability
comes from the cache the policy left:

- streaming: sink-window (4 sinks, budget = max_model_len) over `--tokens` tokens, 4x the
  context, with the pool sized for ONE context (bounded memory); against the full cache over the
  same tokens (a context of `--tokens`: 4x the memory) and against today's `perplexity`
  (independent windows of max_model_len). Per 256-token window: ppl of each (CSV, PNG).
- budgets: the first max_model_len tokens under H2O and sink-window at 20% and 50% of the
  sequence length, against the full cache.
- decode tok/s per policy: greedy, batch 1, a prompt of 3/4 of the context then 256 tokens
  (sink-window budget 50%: it evicts every block; h2o 50% and h2o with a budget >= the context,
  which computes the attention mass but never evicts: the mass's own cost).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def text_ids(llm, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = llm.tokenizer.encode(text)
    if len(ids) < n + 1:
        raise SystemExit(f"the text has only {len(ids)} tokens")
    return ids[:n + 1]


def score(llm, ids: list[int]) -> tuple[np.ndarray, float, int]:
    """Per-token logprobs of one score-only request, its wall time, the peak KV blocks held."""
    from mojollm.sampling_params import SamplingParams

    eng = llm.engine
    rid = eng.add_request(ids, SamplingParams(max_tokens=1), _score_only=True)
    t = time.perf_counter()
    peak, out = 0, None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid and o.finished:
                out = o
        peak = max(peak, eng.num_blocks - eng.block_manager.num_free_blocks)
    if out.error:
        raise SystemExit(out.error)
    return np.asarray(out.prompt_logprobs), time.perf_counter() - t, peak


def ppl(lp: np.ndarray) -> float:
    return float(math.exp(-lp.mean()))


def windows(lp: np.ndarray, w: int = 256) -> list[float]:
    return [ppl(lp[i:i + w]) for i in range(0, len(lp), w)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=64, help="tokens per scoring step")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: streaming,budgets,decode")
    ap.add_argument("--json", default=None)
    ap.add_argument("--csv", default="bench/results/kvcache_policy_windows.csv")
    ap.add_argument("--plot", default="bench/plots/kvcache_policy_windows.png")
    args = ap.parse_args()
    skip = set(args.skip.split(","))

    from mojollm import LLM, SamplingParams
    from mojollm.backends import get_backend
    from mojollm.models import load_model

    backend = get_backend(args.backend)
    model = load_model(args.model, backend)
    L, bs = args.max_model_len, args.block_size
    one_context = -(-L // bs)  # blocks of one context: the streaming run's whole pool

    def llm(policy="full", budget=None, max_model_len=L, num_blocks=None, **kw):
        return LLM(model, max_model_len=max_model_len, block_size=bs, num_blocks=num_blocks or -(-max_model_len // bs),
                   max_num_batched_tokens=args.chunk, enable_prefix_caching=False, max_num_seqs=1,
                   kv_policy=policy, kv_budget=budget, **kw)

    ids = text_ids(llm(), args.tokens)
    rows, curves = [], {}

    def record(part, name, lp, wall, peak, **extra):
        row = {"part": part, "policy": name, "tokens_scored": int(lp.size), "ppl": round(ppl(lp), 4),
               "peak_kv_blocks": peak, "peak_kv_tokens": peak * bs, "wall_s": round(wall, 2), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "streaming" not in skip:
        # sink-window over 4x the context, the pool one context large
        lp, wall, peak = score(llm("sink-window", L, num_blocks=one_context), ids)
        record("streaming", f"sink-window s=4 budget={L}", lp, wall, peak)
        curves[f"sink-window (s=4, {L} kept, pool {L})"] = lp
        # the full cache over every token: a context of --tokens
        lp_full, wall, peak = score(llm(max_model_len=len(ids)), ids)
        record("streaming", f"full (context {len(ids)})", lp_full, wall, peak)
        curves[f"full cache (context {len(ids)})"] = lp_full
        # today's perplexity: independent windows of the context (each window's first token unscored)
        e = llm()
        parts, wall, peak = [], 0.0, 0
        for start in range(0, len(ids), L):
            chunk = ids[start:start + L]
            if len(chunk) >= 2:
                lp_w, w, p = score(e, chunk)
                parts.append(np.concatenate([[np.nan], lp_w]))  # align: position start is not scored
                wall, peak = wall + w, max(peak, p)
        lp_win = np.concatenate(parts)[1:]
        record("streaming", f"full, windows of {L}", lp_win[~np.isnan(lp_win)], wall, peak)
        curves[f"full, independent windows of {L}"] = lp_win
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            names = list(curves)
            w.writerow(["window_start", "window_end"] + names)
            for i in range(0, len(ids) - 1, 256):
                w.writerow([i + 1, min(i + 256, len(ids) - 1)] +
                           [round(ppl(c[i:i + 256][~np.isnan(c[i:i + 256])]), 4) for c in curves.values()])
        print(f"wrote {args.csv}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4.5))
            for name, c in curves.items():
                xs = [i + 128 for i in range(0, len(c), 256)]
                ys = [ppl(c[i:i + 256][~np.isnan(c[i:i + 256])]) for i in range(0, len(c), 256)]
                ax.plot(xs, ys, marker="o", label=name)
            ax.axvline(L, color="grey", linestyle=":", label=f"max_model_len {L}")
            ax.set_xlabel("token position")
            ax.set_ylabel("perplexity per 256-token window")
            ax.set_title(f"{Path(str(model.path)).name}: streaming with sink-window vs full cache")
            ax.legend(fontsize=8)
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.plot, dpi=120, bbox_inches="tight")
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib not installed: CSV only")

    if "budgets" not in skip:
        first = ids[:L]
        lp, wall, peak = score(llm(), first)
        record("budgets", "full", lp, wall, peak, budget=1.0)
        for frac in (0.5, 0.2):
            for policy in ("h2o", "sink-window"):
                lp, wall, peak = score(llm(policy, frac), first)
                record("budgets", policy, lp, wall, peak, budget=frac)

    if "decode" not in skip:
        prompt = ids[:3 * L // 4]
        greedy = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
        for policy, budget in (("full", None), ("sink-window", 0.5), ("h2o", 0.5), ("h2o", L)):
            e = llm(policy, budget)
            e.generate([prompt[:64]], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
            rates = []
            for _ in range(2):
                out = e.generate([prompt], greedy)[0]
                rates.append(out.metrics.decode_tokens_per_s)
            row = {"part": "decode", "policy": policy, "budget": budget, "prompt_tokens": len(prompt),
                   "decode_tokens": args.decode_tokens, "decode_tok_s": round(float(np.median(rates)), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    try:
        from kernels import print_table

        print_table(rows, title=f"KV-cache policies, {args.backend}")
    except Exception:
        pass
    if args.json:
        from mojollm.measure import bench_document

        Path(args.json).write_text(json.dumps(bench_document("kvcache_policy", vars(args), rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
