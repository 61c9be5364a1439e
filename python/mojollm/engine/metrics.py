"""Latency and throughput measurements: per request (TTFT, inter-token latency, tokens/s), per
engine (steps, token counts, time in the model), and their summary over the outputs of one run.

The throughput benchmark that drives an engine with a workload is the `mojollm bench throughput`
command's (mojollm.cli): this module only counts, so the engine can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mojollm.measure import percentile


def acceptance_rate(accepted: int, proposed: int) -> float | None:
    """Speculative decoding: accepted / proposed draft tokens (None without speculation)."""
    return accepted / proposed if proposed else None


def mean_accepted_length(accepted: int, steps: int) -> float | None:
    """Tokens a verify step yields on average: accepted drafts + the target's own one."""
    return (accepted + steps) / steps if steps else None


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
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds between tokens
    num_spec_steps: int = 0             # speculative decoding: verify steps,
    num_spec_proposed: int = 0          # draft tokens proposed,
    num_spec_accepted: int = 0          # and accepted by the target

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

    @property
    def spec_acceptance_rate(self) -> float | None:
        return acceptance_rate(self.num_spec_accepted, self.num_spec_proposed)

    @property
    def spec_mean_accepted_length(self) -> float | None:
        return mean_accepted_length(self.num_spec_accepted, self.num_spec_steps)

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
            "spec_acceptance_rate": self.spec_acceptance_rate,
            "spec_mean_accepted_length": self.spec_mean_accepted_length,
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
    propose_time: float = 0.0   # speculative decoding: drafting,
    spec_steps: int = 0         # sequences' verify steps,
    spec_proposed: int = 0      # draft tokens proposed,
    spec_accepted: int = 0      # and accepted

    @property
    def spec_acceptance_rate(self) -> float | None:
        return acceptance_rate(self.spec_accepted, self.spec_proposed)

    @property
    def spec_mean_accepted_length(self) -> float | None:
        return mean_accepted_length(self.spec_accepted, self.spec_steps)

    def as_dict(self) -> dict:
        return {**self.__dict__, "spec_acceptance_rate": self.spec_acceptance_rate,
                "spec_mean_accepted_length": self.spec_mean_accepted_length}


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
