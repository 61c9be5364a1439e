"""Decode speed of the product on a GPU, through its public API, against peers in the same run.

    python bench/gpu_e2e.py --shape llama-3.2-1b [--batches 1,16,64] [--new-tokens 128] [--json FILE]

On one GPU, in one process, on the same random bf16 weights (an HF directory written by
bench/random_llama.py, real shapes):
  mojollm      `LLM(model=dir, backend="cuda").generate(prompts, greedy)`: the engine, the cuda runner
               (CUDA graphs, sampling on the device), exactly what a user runs
  torch peer   bench/torch_peer.py: gpt-fast-style plain PyTorch, static KV cache, decode under
               torch.compile(mode="reduce-overhead")
  transformers `generate` (batch 1 only)
and the roofline: the weights' bytes read once per decode step over the measured copy bandwidth
(`backend.memory_bandwidth_gbs()`).

Decode tok/s (both engines): tokens after each sequence's first, summed over the batch, over the
decode time. mojollm's comes from each request's metrics (first token -> finish); the peer's from
its decode loop. TTFT: batch 1, prompt of --prompt-len tokens.
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


def mojollm_decode(llm, prompts, new_tokens):
    from mojollm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    first = min(o.metrics.first_token_time for o in outs)
    last_first = max(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    # decode window: from the batch's last first token (every sequence decoding) to the end
    decode_tps = len(outs) * (new_tokens - 1) / (end - last_first) if end > last_first else float("nan")
    return dict(decode_tok_s=decode_tps, ttft_s=outs[0].metrics.first_token_time - outs[0].metrics.arrival_time,
                wall_s=wall, output_tok_s=len(outs) * new_tokens / wall, prefill_window_s=last_first - first,
                tokens=[o.token_ids for o in outs])


def mojollm_ttft(llm, prompt, repeats=3):
    """Median time to the first token of one fresh prompt (prefix caching would serve a repeat
    from the cache, so each repeat changes the first token)."""
    from mojollm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        out = llm.generate([[1000 + r] + prompt[1:]], params)[0]
        assert out.error is None, out.error
        times.append(out.metrics.first_token_time - out.metrics.arrival_time)
    return float(np.median(times[1:]))  # the first run warms up (kernels' first call)


def peer_ttft(path, prompt, repeats=3):
    import torch
    import torch_peer

    ids = torch.tensor([prompt], device="cuda")
    model = torch_peer.load_model(path, "cuda", max_batch=1, max_seq_len=len(prompt) + 8)
    times = [torch_peer.generate(model, ids, 1)[1] for _ in range(repeats + 1)]
    del model
    return float(np.median(times[1:]))


def peer_decode(path, prompts_t, new_tokens, compile_s):
    import torch
    import torch_peer

    B, S = prompts_t.shape
    model = torch_peer.load_model(path, "cuda", max_batch=B, max_seq_len=S + new_tokens)
    decode = torch_peer.compile_decode()
    t = time.perf_counter()
    torch_peer.generate(model, prompts_t, 8, decode)   # compile + capture
    torch_peer.generate(model, prompts_t, 8, decode)
    compile_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    tokens, ttft, tps = torch_peer.generate(model, prompts_t, new_tokens, decode)
    wall = time.perf_counter() - t
    del model
    return dict(decode_tok_s=tps, ttft_s=ttft, wall_s=wall, output_tok_s=B * new_tokens / wall,
                tokens=tokens.tolist())


def hf_decode(path, prompt, new_tokens):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    p = torch.tensor([prompt], device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(4)
    t1, _ = run(1)
    tn, toks = run(new_tokens)
    del hf
    return dict(decode_tok_s=(new_tokens - 1) / (tn - t1), tokens=toks)


def agree(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=0,
                    help="also time the first token of one prompt this long, batch 1 (ours vs the peer's prefill)")
    ap.add_argument("--dir", default=None, help="where the model is written (default /tmp/<shape>)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from random_llama import write_random_llama

    from mojollm import LLM

    batches = [int(b) for b in args.batches.split(",")]
    path = Path(args.dir or f"/tmp/{args.shape}")
    t = time.perf_counter()
    if not (path / "model.safetensors").exists():
        write_random_llama(path, args.shape, "bfloat16", seed=0, device="cuda")
    print(f"[model] {args.shape} random bf16 at {path} ({time.perf_counter() - t:.1f} s)", flush=True)
    rng = np.random.default_rng(0)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = rng.integers(1000, vocab // 2, size=(max(batches), args.prompt_len)).tolist()
    res = dict(shape=args.shape, date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(0),
               torch=torch.__version__, command=" ".join(sys.argv), prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, rows=[])

    # ---- mojollm, through the public API
    t = time.perf_counter()
    llm = LLM(model=str(path), backend="cuda", max_num_seqs=max(batches))
    runner = llm.engine.runner
    load_s = time.perf_counter() - t
    bw = llm.backend.memory_bandwidth_gbs()
    wbytes = llm.model.weight_bytes
    res.update(copy_GBps=bw, weight_GB=wbytes / 1e9, roofline_bs1_tok_s=bw * 1e9 / wbytes, load_s=load_s,
               graphs=len(runner.graphs), capture_s=runner.capture_time, kv_blocks=llm.engine.num_blocks)
    print(f"[mojollm] loaded in {load_s:.1f} s ({len(runner.graphs)} CUDA graphs captured in "
          f"{runner.capture_time:.1f} s); copy bandwidth {bw:.0f} GB/s; {wbytes / 1e9:.2f} GB of weights per step "
          f"-> batch-1 roofline {res['roofline_bs1_tok_s']:.0f} tok/s", flush=True)
    ours = {}
    for b in batches:
        mojollm_decode(llm, prompts[:b], 16)  # warm-up (lazy captures for this shape)
        ours[b] = mojollm_decode(llm, prompts[:b], args.new_tokens)
        print(f"[mojollm] batch {b}: decode {ours[b]['decode_tok_s']:.0f} tok/s, ttft {ours[b]['ttft_s'] * 1e3:.1f} ms, "
              f"output {ours[b]['output_tok_s']:.0f} tok/s over {ours[b]['wall_s']:.2f} s", flush=True)
    # GPU time of one decode step alone: replay the graph the last step of each batch used
    from mojollm.backends.cuda.runner import bucket_for

    for b in batches:
        width = bucket_for(-(-(args.prompt_len + args.new_tokens) // llm.engine.block_size), runner.width_buckets)
        keys = [k for k in runner.graphs if k[0] == bucket_for(b, runner.batch_buckets) and k[1] == width]
        if keys:
            g = runner.graphs[keys[0]].graph
            for _ in range(3):
                g.replay()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                g.replay()
            stop.record()
            stop.synchronize()
            ours[b]["replay_ms"] = start.elapsed_time(stop) / 50
            step_ms = b * 1e3 / ours[b]["decode_tok_s"]
            print(f"[mojollm] batch {b}: one decode step {step_ms:.2f} ms, of which the graph replay (GPU) "
                  f"{ours[b]['replay_ms']:.2f} ms and the host {step_ms - ours[b]['replay_ms']:.2f} ms", flush=True)
    if args.ttft_len:
        long_prompt = rng.integers(1000, vocab // 2, size=args.ttft_len).tolist()
        res["ttft_len"] = args.ttft_len
        res["mojollm_ttft_long_s"] = mojollm_ttft(llm, long_prompt)
        print(f"[mojollm] TTFT of a {args.ttft_len}-token prompt: {res['mojollm_ttft_long_s'] * 1e3:.1f} ms", flush=True)
    res["engine_stats"] = {k: v for k, v in vars(llm.engine.stats).items() if isinstance(v, (int, float))}
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()

    # ---- peers on the same weights
    peer, compile_s = {}, []
    if not args.no_peer:
        for b in batches:
            pt = torch.tensor(prompts[:b], device="cuda")
            peer[b] = peer_decode(path, pt, args.new_tokens, compile_s)
            print(f"[torch.compile] batch {b}: decode {peer[b]['decode_tok_s']:.0f} tok/s, "
                  f"ttft {peer[b]['ttft_s'] * 1e3:.1f} ms (compile + capture {compile_s[-1]:.0f} s)", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    if args.ttft_len and not args.no_peer:
        res["peer_ttft_long_s"] = peer_ttft(path, long_prompt)
        print(f"[torch peer] TTFT of a {args.ttft_len}-token prompt: {res['peer_ttft_long_s'] * 1e3:.1f} ms "
              f"(ours / peer speed {res['peer_ttft_long_s'] / res['mojollm_ttft_long_s']:.2f}x)", flush=True)
    hf = None
    if not args.no_hf:
        hf = hf_decode(str(path), prompts[0], 32)
        print(f"[transformers] batch 1: decode {hf['decode_tok_s']:.0f} tok/s", flush=True)

    for b in batches:
        row = dict(batch=b, mojollm_decode_tok_s=ours[b]["decode_tok_s"], mojollm_ttft_ms=ours[b]["ttft_s"] * 1e3,
                   mojollm_output_tok_s=ours[b]["output_tok_s"], mojollm_replay_ms=ours[b].get("replay_ms"))
        if b in peer:
            row.update(peer_decode_tok_s=peer[b]["decode_tok_s"], peer_ttft_ms=peer[b]["ttft_s"] * 1e3,
                       ratio_vs_peer=ours[b]["decode_tok_s"] / peer[b]["decode_tok_s"],
                       greedy_agree_first_seq=agree(ours[b]["tokens"][0], peer[b]["tokens"][0]))
        if b == 1:
            row["frac_roofline"] = ours[b]["decode_tok_s"] / res["roofline_bs1_tok_s"]
            if hf:
                row.update(hf_decode_tok_s=hf["decode_tok_s"], ratio_vs_hf=ours[b]["decode_tok_s"] / hf["decode_tok_s"])
        res["rows"].append(row)

    print(f"\n{args.shape} on {res['device']}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print("| batch | mojollm decode tok/s | torch.compile peer | ratio | TTFT ours / peer (ms) | roofline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        peer_s = f"{r['peer_decode_tok_s']:.0f}" if "peer_decode_tok_s" in r else "-"
        ratio = f"{r['ratio_vs_peer']:.2f}x" if "ratio_vs_peer" in r else "-"
        ttft = f"{r['mojollm_ttft_ms']:.1f} / {r['peer_ttft_ms']:.1f}" if "peer_ttft_ms" in r else f"{r['mojollm_ttft_ms']:.1f}"
        roof = f"{r['frac_roofline']:.0%} of {res['roofline_bs1_tok_s']:.0f}" if "frac_roofline" in r else "-"
        print(f"| {r['batch']} | {r['mojollm_decode_tok_s']:.0f} | {peer_s} | {ratio} | {ttft} | {roof} |")
    if hf:
        print(f"transformers generate, batch 1: {hf['decode_tok_s']:.0f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
