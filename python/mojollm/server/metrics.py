"""The server's Prometheus metrics, vLLM's names under a `mojollm:` prefix.

The engine loop updates them after every step from the engine's own counters and each request's
RequestMetrics (the loop thread is the only writer; prometheus_client's metrics are thread-safe
for the scrape that reads them). Token counters count what the engine reported: a request's
prompt tokens once it produced its first output, its generated tokens as they come.

Speculative decoding (vLLM's spec_decode names): `spec_decode_num_drafts` counts verify steps
(one per sequence and step that carried drafts), `spec_decode_num_draft_tokens` the draft tokens
proposed, `spec_decode_num_accepted_tokens` those the target accepted. The acceptance rate is
accepted / draft tokens, the mean accepted length (tokens a verify step yields) is
(accepted + drafts) / drafts; `request_spec_acceptance_rate` is the per-request acceptance rate of
the finished requests that speculated. All stay 0 on a server started without --speculative.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets of vLLM's histograms (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(f"mojollm:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc, extra=()):
            c = Counter(f"mojollm:{name}", doc, labels + list(extra), registry=r)
            return c if extra else c.labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"mojollm:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.model_name = model_name
        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a batch slot.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.kv_used_blocks = gauge("kv_cache_used_blocks", "KV-cache blocks held by requests.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests served.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (all samples of a request).")
        self._success = counter("request_success", "Requests finished, by finish reason.", ["finished_reason"])
        self.rejected = counter("request_rejected", "Requests refused because the queue was full (429).")
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's token steps.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to the first step.",
                                    _LATENCY_BUCKETS)
        self.spec_drafts = counter("spec_decode_num_drafts",
                                   "Speculative verify steps (a sequence's drafts checked in one step).")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                            "Speculative draft tokens accepted by the target model.")
        self.spec_acceptance = histogram("request_spec_acceptance_rate",
                                         "Per finished request that speculated: accepted / proposed draft tokens.",
                                         _RATE_BUCKETS)
        self._prefix_seen = (0, 0)
        self._spec_seen = (0, 0, 0)

    def observe_engine(self, engine) -> None:
        """Gauges and prefix-cache counters from the engine's state after a step."""
        sched, bm = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        used = bm.num_blocks - bm.num_free_blocks
        self.kv_used_blocks.set(used)
        self.kv_usage.set(used / bm.num_blocks)
        q, h = bm.num_query_tokens, bm.num_hit_tokens
        self.prefix_queries.inc(q - self._prefix_seen[0])
        self.prefix_hits.inc(h - self._prefix_seen[1])
        self._prefix_seen = (q, h)
        st = engine.stats
        spec = (st.spec_steps, st.spec_proposed, st.spec_accepted)
        for c, now, before in zip((self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens),
                                  spec, self._spec_seen):
            if now > before:
                c.inc(now - before)
        self._spec_seen = spec

    def observe_output(self, out, seen: list) -> None:
        """Token counters for one RequestOutput; `seen` is the request's [prompt counted, generated
        tokens counted] so far. A finished request also lands in the latency histograms."""
        m = out.metrics
        if not seen[0]:
            seen[0] = True
            self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(m.num_generated_tokens - seen[1])
        seen[1] = m.num_generated_tokens
        if not out.finished:
            return
        self._success.labels(self.model_name, out.finish_reason or "unknown").inc()
        for hist, value in ((self.ttft, m.ttft), (self.e2e, m.e2e_latency), (self.queue_time, m.queue_time)):
            if value is not None:
                hist.observe(value)
        for x in m.inter_token_latencies:
            self.itl.observe(x)
        if m.num_spec_proposed:
            self.spec_acceptance.observe(m.spec_acceptance_rate)
