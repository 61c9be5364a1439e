"""Speculative decoding through the product: batch-1 decode tok/s with and without each method,
same process, same prompts, greedy (the outputs are checked token for token).

    python bench/specdec.py [--backend cpu] [--model M] [--methods ngram,self] [--draft-model D]
                            [--num-tokens 4] [--max-tokens 128] [--repeats 3] [--json PATH]
    python bench/specdec.py --backend cuda --random-shape llama-3-8b --methods ngram   # GPU

Tasks: `edit` and `summarise` ground the answer in a given text (prompt lookup's case), `story`
is open-ended (the self-speculative case). With --random-shape the model is a random-weight
Llama of that shape (bench/random_llama.py) and the task is `repeat`, a repetitive input.
Each method runs in its own LLM, one after the other (an 8B model is loaded once at a time);
the plain baseline is the same LLM with speculation turned off per request
(SamplingParams(num_speculative_tokens=0)), alternating with the speculative runs, and the
median of the repeats is quoted with the acceptance rate and mean accepted length.
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

_CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def normalise(values):
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [0.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]
'''

_TEXT = ("The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
         "Supporters said the lanes would make cycling safer and reduce traffic in the town centre. "
         "Shop owners worried that removing parking spaces would keep customers away. After two hours "
         "of debate the council agreed to test the lanes for six months and to count both cyclists and "
         "shoppers before making a final decision. The test will start in the spring.")

TASKS = {
    "edit": f"Rename the function moving_average to rolling_mean in this code and return the whole "
            f"code:\n\n{_CODE}",
    "summarise": f"Summarise this news story in three sentences, reusing its words:\n\n{_TEXT}",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def build(args, method: str | None):
    from mojollm import LLM

    spec = None
    if method:
        spec = {"method": method, "num_tokens": args.num_tokens}
        if method == "draft":
            spec["draft_model"] = args.draft_model
    return LLM(model=args.model, backend=args.backend, speculative=spec, enable_prefix_caching=False,
               max_num_seqs=8, kv_cache_memory=args.kv_cache_memory)


def prompt_ids(llm, task: str, args) -> list[int]:
    if task == "repeat":
        # A random-weight model copies nothing, but it is deterministic: the prompt is a random
        # phrase, the model's own greedy continuation of it, and the phrase again, so the answer
        # that follows tends to repeat that continuation (prompt lookup's case: code edits, RAG).
        from mojollm import SamplingParams

        rng = np.random.default_rng(0)
        phrase = rng.integers(100, llm.model.config.vocab_size - 100, size=48).tolist()
        plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, num_speculative_tokens=0)
        return phrase + llm.generate([phrase], plain)[0].token_ids + phrase
    return llm.chat_prompt_ids([{"role": "user", "content": TASKS[task]}])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-shape", default=None, help="a random-weight Llama of this shape (GPU runs)")
    ap.add_argument("--context-free", action="store_true",
                    help="zero the random model's attention output: its next token depends on the last one only, "
                         "so `repeat` is an exact copy task (prompt lookup's best case)")
    ap.add_argument("--methods", default="ngram,self")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--random-draft-shape", default=None, help="a random-weight draft of this shape")
    ap.add_argument("--tasks", default=None, help="default: edit,summarise,story (repeat with --random-shape)")
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mojollm import SamplingParams
    from mojollm.measure import bench_document

    if args.random_shape:
        from random_llama import write_random_llama

        path = Path(f"/tmp/{args.random_shape}{'-context-free' if args.context_free else ''}")
        if not (path / "model.safetensors").exists():
            write_random_llama(path, args.random_shape, "bfloat16", seed=0,
                               device="cuda" if args.backend == "cuda" else "cpu",
                               zero=("o_proj.weight",) if args.context_free else ())
        args.model = str(path)
    if args.random_draft_shape:
        from random_llama import write_random_llama

        path = Path(f"/tmp/{args.random_draft_shape}")
        if not (path / "model.safetensors").exists():
            write_random_llama(path, args.random_draft_shape, "bfloat16", seed=1,
                               device="cuda" if args.backend == "cuda" else "cpu")
        args.draft_model = str(path)
    methods = [m for m in args.methods.split(",") if m]
    tasks = (args.tasks or ("repeat" if args.random_shape else "edit,summarise,story")).split(",")
    greedy = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for method in methods:
        llm = build(args, method)
        for task in tasks:
            ids = prompt_ids(llm, task, args)
            runs = {"none": [], method: []}
            arms = {"none": SamplingParams(num_speculative_tokens=0, **greedy), method: SamplingParams(**greedy)}
            for p in arms.values():  # warm-up: kernels, graphs, the governor's step costs
                llm.generate([ids], SamplingParams(**{**p.__dict__, "max_tokens": 32}))
            for _ in range(args.repeats):
                for arm, p in arms.items():
                    t = time.perf_counter()
                    out = llm.generate([ids], p)[0]
                    runs[arm].append((out, time.perf_counter() - t))
            base_tokens = runs["none"][0][0].token_ids
            base_rate = float(np.median([o.metrics.decode_tokens_per_s for o, _ in runs["none"]]))
            for arm, rs in runs.items():
                rate = float(np.median([o.metrics.decode_tokens_per_s for o, _ in rs]))
                m = rs[-1][0].metrics
                rows.append({
                    "task": task, "method": arm, "prompt_tokens": len(ids),
                    "decode_tok_s": round(rate, 1), "speedup": round(rate / base_rate, 3),
                    "acceptance": None if m.spec_acceptance_rate is None else round(m.spec_acceptance_rate, 3),
                    "mean_accepted_length": None if m.spec_mean_accepted_length is None
                    else round(m.spec_mean_accepted_length, 2),
                    "verify_steps": m.num_spec_steps,
                    "identical_to_plain": all(r.token_ids == base_tokens for r, _ in rs),
                    "wall_s": round(float(np.median([w for _, w in rs])), 3),
                    # what the engine measured a decode step of T rows to cost (ms): the price of k drafts
                    "step_ms_by_rows": " ".join(f"{r}:{c * 1e3:.2f}" for r, c in sorted(llm.engine.governor.step_cost.items())),
                })
                print(json.dumps(rows[-1]), flush=True)
        del llm
        gc.collect()
        if args.backend == "cuda":
            import torch

            torch.cuda.empty_cache()
    try:
        from kernels import print_table

        print_table(rows, title=f"speculative decoding, batch 1, {args.backend}")
    except Exception:
        pass
    if args.json:
        doc = bench_document("specdec", vars(args), rows)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
