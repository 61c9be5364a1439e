"""Load test of `mojollm serve`: concurrent streaming clients against offline LLM.generate.

    python bench/serve_load.py                       # 64 clients x 2 requests, 32 prompts
    python bench/serve_load.py --clients 64 --requests-per-client 4 --json bench/results/serve_load_cpu.json

1. Offline: one LLM in a child process runs every request in one `LLM.generate` call (greedy,
   ignore_eos: each request makes exactly its max_tokens), after a warm-up request.
2. Server: `mojollm serve` as a subprocess on 127.0.0.1 (a free port; nothing else is contacted),
   same engine settings; `--clients` asyncio clients with the official `openai` client, each
   streaming its `--requests-per-client` requests one after another (prompts of mixed lengths,
   mixed output lengths), after the same warm-up. TTFT and inter-token latency are measured at
   the client (ITL: gaps between streamed chunks, each one token when the client keeps up).
3. After the load: /metrics must show 0 KV blocks in use and every request finished, and the
   server must exit 0 on SIGTERM.

Passes (exit 0) when every request completed with its token count, the server's output tok/s is
>= 0.9x offline's, and no KV block is left in use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def workload(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int):
    """`num_prompts` text prompts of mixed lengths (slices of README.md, ~[L/2, 3L/2] tokens) and a
    max_tokens for each (uniform in [O/2, 3O/2])."""
    rng = np.random.default_rng(seed)
    ids = tokenizer.encode((ROOT / "README.md").read_text(), add_special_tokens=False)
    prompts, max_tokens = [], []
    for _ in range(num_prompts):
        n = int(rng.integers(max(1, input_len // 2), input_len * 3 // 2 + 1))
        start = int(rng.integers(0, len(ids) - n))
        prompts.append(tokenizer.decode(ids[start:start + n]))
        max_tokens.append(int(rng.integers(max(1, output_len // 2), output_len * 3 // 2 + 1)))
    return prompts, max_tokens


def offline(args, requests) -> dict:
    from mojollm import LLM, SamplingParams

    llm = LLM(args.model, backend=args.backend, max_num_seqs=args.clients)
    llm.generate("Warm up", SamplingParams(max_tokens=4, temperature=0))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in requests]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([p for p, _ in requests], params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(o.token_ids) for o in outs)
    ok = all(len(o.token_ids) == m and not o.error for o, (_, m) in zip(outs, requests))
    ttft = [o.metrics.ttft for o in outs]
    itl = [x for o in outs for x in o.metrics.inter_token_latencies]
    return {"mode": "offline LLM.generate", "requests": len(requests), "output_tokens": tokens,
            "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2), **_latency(ttft, itl),
            "cpu_s_per_1k_tokens": round(cpu / tokens * 1e3, 3), "ok": ok}


def _latency(ttft, itl) -> dict:
    from mojollm.measure import percentile

    def ms(v):
        return None if v is None else round(v * 1e3, 2)

    return {"ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99))}


class ServerProcess:
    def __init__(self, args):
        cmd = [sys.executable, "-m", "mojollm.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--max-num-seqs", str(args.clients), "--max-queue", str(args.clients), "-q"]
        if args.model:
            cmd += ["--model", args.model]
        if args.backend:
            cmd += ["--backend", args.backend]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        found = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if self.url is None and " on http://127.0.0.1:" in line:
                    self.url = line.split(" on ", 1)[1].split()[0]
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(120):
            raise SystemExit("the server did not start:\n" + "\n".join(self.lines))

    def wait_ready(self, timeout=900):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the server exited:\n" + "\n".join(self.lines))
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def _client(client, model, requests, results):
    for prompt, max_tokens in requests:
        t0 = time.perf_counter()
        stamps, text, usage, finish = [], "", None, None
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                stamps.append(time.perf_counter())
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            elif chunk.usage is not None:
                usage = chunk.usage
        results.append({"max_tokens": max_tokens, "t0": t0, "stamps": stamps, "usage": usage, "finish": finish})


async def load(url: str, per_client: list[list[tuple[str, int]]]) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    model = (await client.models.list()).data[0].id
    await _client(client, model, [("Warm up", 4)], [])
    results: list[dict] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(client, model, reqs, results) for reqs in per_client))
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def server_metrics(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value  # summed over labels
    return out


def server_run(args, per_client, num_requests: int) -> dict:
    server = ServerProcess(args)
    try:
        server.wait_ready()
        cpu0, client0 = _cpu_s(server.proc.pid), time.process_time()
        results, wall = asyncio.run(load(server.url, per_client))
        cpu = _cpu_s(server.proc.pid) - cpu0 + time.process_time() - client0
        after = server_metrics(server.url)
    finally:
        code = server.stop()
    tokens = sum(r["usage"].completion_tokens for r in results if r["usage"])
    complete = (len(results) == num_requests
                and all(r["usage"] and r["usage"].completion_tokens == r["max_tokens"] and r["finish"] == "length"
                        for r in results))
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    chunks = sum(len(r["stamps"]) for r in results)
    used_blocks = after.get("mojollm:kv_cache_used_blocks")
    row = {"mode": f"server ({args.clients} streaming clients)", "requests": len(results), "output_tokens": tokens,
           "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2), **_latency(ttft, itl),
           "cpu_s_per_1k_tokens": round(cpu / tokens * 1e3, 3) if tokens else None,
           "chunks_per_token": round(chunks / tokens, 3) if tokens else None,
           "kv_blocks_used_after": used_blocks, "server_exit_code": code}
    row["ok"] = bool(complete and used_blocks == 0 and code == 0
                     and after.get("mojollm:request_success_total") == num_requests + 1)  # + the warm-up
    return row


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median_row(rows: list[dict]) -> dict:
    """The run with the median output tok/s, its `ok` the AND of all runs', and the spread."""
    ranked = sorted(rows, key=lambda r: r["output_tokens_per_s"])
    row = dict(ranked[len(ranked) // 2])
    row["runs_tokens_per_s"] = " ".join(str(r["output_tokens_per_s"]) for r in rows)
    row["ok"] = all(r["ok"] for r in rows)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64, help="mean prompt tokens")
    ap.add_argument("--output-len", type=int, default=48, help="mean output tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="offline/server pairs, alternating; medians compared")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from mojollm.models import load_checkpoint
    from mojollm.tokenizer import Tokenizer

    path, ckpt = load_checkpoint(args.model)  # the tokenizer only: the model loads in each run
    tokenizer = Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf_metadata(ckpt.metadata, str(path))
    del ckpt
    prompts, max_tokens = workload(tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed)
    per_client = [[(prompts[(c * args.requests_per_client + j) % len(prompts)],
                    max_tokens[(c * args.requests_per_client + j) % len(prompts)])
                   for j in range(args.requests_per_client)] for c in range(args.clients)]
    requests = [r for reqs in per_client for r in reqs]
    print(f"{len(requests)} requests ({args.clients} clients x {args.requests_per_client}), "
          f"{sum(m for _, m in requests)} output tokens", file=sys.stderr)

    if args.offline_only:  # the child process of the offline run
        print(json.dumps(offline(args, requests)))
        return 0
    # Offline in its own process, gone before the server starts: nothing of it (memory, the kernel
    # runtime's worker threads) competes with the server for the cores. The two alternate
    # `--repeats` times and the medians are compared: a shared machine's load drifts.
    offs, srvs = [], []
    for rep in range(args.repeats):
        print(f"[{rep + 1}/{args.repeats}] offline LLM.generate ...", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--offline-only", *sys.argv[1:]], stdout=subprocess.PIPE,
                               text=True, check=True)
        offs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {offs[-1]}", file=sys.stderr)
        print(f"[{rep + 1}/{args.repeats}] server ...", file=sys.stderr)
        srvs.append(server_run(args, per_client, len(requests)))
        print(f"  {srvs[-1]}", file=sys.stderr)
    off, srv = _median_row(offs), _median_row(srvs)
    srv["vs_offline"] = round(srv["output_tokens_per_s"] / off["output_tokens_per_s"], 3)
    srv["ok"] = srv["ok"] and srv["vs_offline"] >= 0.9
    rows = [off, srv]
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    if args.json_path:
        from mojollm.measure import bench_document

        config = {k: v for k, v in vars(args).items() if k not in ("json_path", "offline_only")}
        Path(args.json_path).write_text(json.dumps(bench_document("serve_load", config, rows), indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
