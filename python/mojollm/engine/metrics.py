"""Latency and throughput measurements: per request (TTFT, inter-token latency, tokens/s),
per engine (steps, preemptions, prefix-cache hit rate), and the throughput workload used by
`mojollm bench throughput` and bench/throughput.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mojollm.measure import percentile


@dataclass
class RequestMetrics:
    arrival_time: float
    num_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0          # prompt tokens reused from the prefix cache
    num_generated_tokens: int = 0       # over all samples / beams
    num_preemptions: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds between token steps

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival (seconds)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first one per second of decoding (None with fewer than 2 tokens)."""
        t = self.decode_time
        if not t or self.num_generated_tokens < 2:
            return None
        return (len(self.inter_token_latencies) or self.num_generated_tokens - 1) / t

    def as_dict(self) -> dict:
        def ms(v):
            return None if v is None else round(v * 1e3, 3)

        return {
            "prompt_tokens": self.num_prompt_tokens,
            "cached_tokens": self.num_cached_tokens,
            "generated_tokens": self.num_generated_tokens,
            "queue_ms": ms(self.queue_time),
            "ttft_ms": ms(self.ttft),
            "e2e_ms": ms(self.e2e_latency),
            "mean_itl_ms": ms(sum(self.inter_token_latencies) / len(self.inter_token_latencies))
            if self.inter_token_latencies else None,
            "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 3),
            "preemptions": self.num_preemptions,
        }


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0     # tokens run through the model as part of a prefill chunk
    decode_tokens: int = 0      # tokens run as single-token decodes
    recomputed_tokens: int = 0  # tokens run again after a preemption or a copy-on-write
    preemptions: int = 0
    forward_time: float = 0.0
    sample_time: float = 0.0
    schedule_time: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(outputs, wall_time: float) -> dict:
    """Throughput and latency percentiles over finished RequestOutputs of one run."""
    ttfts = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    itls = [x for o in outputs for x in o.metrics.inter_token_latencies]
    out_tokens = sum(o.metrics.num_generated_tokens for o in outputs)
    in_tokens = sum(o.metrics.num_prompt_tokens for o in outputs)

    def r(v):
        return None if v is None else round(v, 6)

    return {
        "requests": len(outputs),
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "wall_s": round(wall_time, 3),
        "output_tokens_per_s": round(out_tokens / wall_time, 2) if wall_time > 0 else None,
        "total_tokens_per_s": round((in_tokens + out_tokens) / wall_time, 2) if wall_time > 0 else None,
        "ttft_p50_s": r(percentile(ttfts, 50)),
        "ttft_p99_s": r(percentile(ttfts, 99)),
        "itl_p50_s": r(percentile(itls, 50)),
        "itl_p99_s": r(percentile(itls, 99)),
        "errors": sum(1 for o in outputs if o.error),
    }


# ---------------------------------------------------------------- throughput workload

def make_workload(tokenizer, vocab_size: int, num_prompts: int, input_len: int, output_len: int,
                  seed: int = 0, shared_prefix_len: int = 0, mixed: bool = True):
    """Random-token prompts of mixed lengths (uniform in [len/2, 3 len/2] when `mixed`).

    Returns [(prompt_token_ids, max_tokens)]. Token ids avoid the tokenizer's special tokens so
    that no prompt ends early; a shared prefix (a "system prompt") opens every prompt when
    shared_prefix_len > 0.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    special = set(getattr(tokenizer, "eos_token_ids", set()) or set())
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        special.add(bos)
    low = min(1000, vocab_size // 2)  # ordinary tokens sit above the special ones in every BPE vocab

    def tokens(n):
        ids = rng.integers(low, vocab_size, size=n).tolist()
        return [t if t not in special else low for t in ids]

    prefix = tokens(shared_prefix_len)
    work = []
    for _ in range(num_prompts):
        il = int(rng.integers(max(1, input_len // 2), input_len * 3 // 2 + 1)) if mixed else input_len
        ol = int(rng.integers(max(1, output_len // 2), output_len * 3 // 2 + 1)) if mixed else output_len
        work.append((prefix + tokens(il), ol))
    return work


def run_workload(engine, workload, sequential: bool = False) -> dict:
    """Run `workload` on `engine` (all requests at once, or one at a time) and summarize it."""
    from mojollm.sampling_params import SamplingParams

    outputs = []
    t0 = time.perf_counter()
    if sequential:
        for ids, max_tokens in workload:
            engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            while engine.has_unfinished():
                outputs.extend(o for o in engine.step() if o.finished)
    else:
        for ids, max_tokens in workload:
            engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        while engine.has_unfinished():
            outputs.extend(o for o in engine.step() if o.finished)
    wall = time.perf_counter() - t0
    summary = summarize(outputs, wall)
    st = engine.stats
    summary["prefix_cache_hit_rate"] = round(engine.block_manager.hit_rate, 4)
    summary["preemptions"] = st.preemptions
    summary["steps"] = st.steps
    summary["mean_tokens_per_step"] = round((st.prefill_tokens + st.decode_tokens) / st.steps, 2) if st.steps else None
    summary["forward_s"] = round(st.forward_time, 3)
    summary["engine_overhead_s"] = round(wall - st.forward_time, 3)  # scheduling, sampling, detokenizing
    weight_bytes = getattr(engine.model, "weight_bytes", 0) or 0
    # every step streams all the weights once, however many sequences it carries
    summary["weight_read_gbs"] = round(st.steps * weight_bytes / wall / 1e9, 3) if weight_bytes and wall > 0 else None
    return summary


def throughput_benchmark(model, num_prompts: int = 64, input_len: int = 64, output_len: int = 64,
                         seed: int = 0, sequential_prompts: int | None = None, shared_prefix_len: int = 256,
                         engine_kwargs: dict | None = None, progress=None) -> dict:
    """Continuous batching vs one request at a time, and prefix cache on vs off.

    The sequential run uses `sequential_prompts` of the same requests (default: all) so that a slow
    machine can compare per-token rates without running the whole workload twice.
    """
    from mojollm.engine.engine import Engine

    engine_kwargs = dict(engine_kwargs or {})
    vocab = model.config.vocab_size
    work = make_workload(model.tokenizer, vocab, num_prompts, input_len, output_len, seed)
    result = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len}

    def note(msg):
        if progress is not None:
            progress(msg)

    note(f"batched: {num_prompts} requests")
    result["batched"] = run_workload(Engine(model, **engine_kwargs), work)
    seq_work = work[: sequential_prompts or num_prompts]
    note(f"sequential: {len(seq_work)} requests one at a time")
    result["sequential"] = run_workload(Engine(model, **engine_kwargs), seq_work, sequential=True)
    b, s = result["batched"]["output_tokens_per_s"], result["sequential"]["output_tokens_per_s"]
    result["batched_over_sequential"] = round(b / s, 2) if b and s else None

    if shared_prefix_len > 0:
        shared = make_workload(model.tokenizer, vocab, num_prompts, max(1, input_len // 4), output_len // 2 or 1,
                               seed + 1, shared_prefix_len=shared_prefix_len)
        for flag in (True, False):
            note(f"shared {shared_prefix_len}-token system prompt, prefix cache {'on' if flag else 'off'}")
            kw = dict(engine_kwargs, enable_prefix_caching=flag)
            result[f"shared_prefix_cache_{'on' if flag else 'off'}"] = run_workload(Engine(model, **kw), shared)
        on = result["shared_prefix_cache_on"]["total_tokens_per_s"]
        off = result["shared_prefix_cache_off"]["total_tokens_per_s"]
        result["prefix_cache_speedup"] = round(on / off, 2) if on and off else None
    return result


def throughput_rows(result: dict, backend: str | None) -> list[dict]:
    """Flat rows (bench/SCHEMA.md) of a throughput_benchmark result, one per run."""
    rows = []
    peers = {"batched": "sequential", "shared_prefix_cache_on": "shared_prefix_cache_off"}
    for mode in ("batched", "sequential", "shared_prefix_cache_on", "shared_prefix_cache_off"):
        if mode not in result:
            continue
        row = {"mode": mode, "backend": backend, **result[mode]}
        peer = peers.get(mode)
        if peer in result:
            key = "output_tokens_per_s" if mode == "batched" else "total_tokens_per_s"
            a, b = result[mode][key], result[peer][key]
            row["vs_peer"] = round(a / b, 3) if a and b else None
        row["ok"] = result[mode]["errors"] == 0
        rows.append(row)
    return rows
