"""The cuda backend's model runner: a step with no Python between the launches that matter.

    decode step (every sequence one token)      padded to a captured (batch, table width) shape:
        pinned host -> persistent device inputs (one async copy each), then one CUDA graph replay
        of the whole forward + the sampler; int32 tokens back (one small copy, one sync)
    prefill / mixed steps, or batches above the largest bucket
        the same forward and sampler launched eagerly on the same persistent buffers

Shapes are what a graph freezes, so every decode step is padded (StepBatch.padded_decode) to:
  * a batch bucket: 1, 2, 4, 8, 16, 32, ... up to max_num_seqs;
  * a block-table width bucket: a power of two of blocks (at least 256 tokens), up to the
    context. The decode attention's split count follows (batch, width) on the host, so a
    replay always runs the split count it was captured with.
Padding rows decode token 0 at position 0 into one scratch KV block that no sequence owns (the
runner allocates it beyond the engine's pool), with greedy sampling params.

Sampling (backends/cuda/sampler.py) runs on the device for the rows the engine marks; the rest
(beam search, scores, penalties, logprobs, the first draw of n > 1) come back as float32 rows.
Graphs are keyed by (batch bucket, width bucket, sampler plan); the all-greedy ones are captured
when the KV cache is allocated, the others on first use. All graphs share one memory pool; a
replay's outputs are read before the next replay.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mojollm.engine.runner import (TOKEN_HOST, TOKEN_NOT_FINITE, ModelRunner, StepOutput, batch_buckets, bucket_for,
                                   width_buckets)
from mojollm.engine.step import StepBatch
from mojollm.backends.cuda.sampler import DeviceSampler, SamplePlan, rng_key

_MIN_WIDTH_TOKENS = 256


def pack_sampling_rows(rows, vocab_size: int, fparams: np.ndarray, iparams: np.ndarray,
                       steps: np.ndarray) -> SamplePlan:
    """Fill the DeviceSampler's per-row params (host arrays [n, 6] / [n, 3] / [n]) for a step's
    logits rows (a Sequence to sample, or None); returns the tightest SamplePlan. Rows that are
    None (host rows, padding) get greedy params: their draws are ignored. The RNG step of a row is
    its sequence's number of output tokens, so a stream does not depend on graphs, batches or
    recomputation."""
    fparams[:] = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    iparams[:] = (vocab_size, 0, 0)
    steps[:] = 0
    greedy_only, sort = True, False
    for r, seq in enumerate(rows):
        if seq is None:
            continue
        p = seq.request.params
        if p.temperature == 0.0:
            continue
        greedy_only = False
        top_k = p.top_k if 0 < p.top_k < vocab_size else vocab_size
        sort = sort or top_k < vocab_size or p.top_p < 1.0
        key = seq.device_rng_key
        if key is None:
            key = seq.device_rng_key = rng_key(seq.request.base_seed, seq.sample_index)
        fparams[r] = (p.temperature, p.top_p, p.min_p, 1.0, 0.0, 0.0)
        iparams[r] = (top_k, key & 0xFFFFFFFF, key >> 32)
        steps[r] = seq.num_output_tokens
    return SamplePlan(greedy_only=greedy_only, penalties=False, sort=sort, logprobs=-1)


class _Graph:
    __slots__ = ("graph", "logits", "tokens")

    def __init__(self, graph, logits, tokens):
        self.graph, self.logits, self.tokens = graph, logits, tokens


class CudaRunner(ModelRunner):
    samples_on_device = True

    def __init__(self, model, max_num_seqs: int, max_model_len: int, use_graphs: bool = True):
        super().__init__(model, max_num_seqs, max_model_len)
        be = model.backend
        self.be = be
        self.torch = torch = be.torch
        self.vocab_size = int(model.config.vocab_size)
        self.sampler = DeviceSampler(max_num_seqs, self.vocab_size, be.device)
        self.use_graphs = use_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.capture_time = 0.0
        # per-row sampling params, host side, for rows 0..S-1 of a step (see _load_sampling)
        self._fparams = torch.zeros((max_num_seqs, 6), dtype=torch.float32).pin_memory()
        self._iparams = torch.zeros((max_num_seqs, 3), dtype=torch.int64).pin_memory()
        self._steps = torch.zeros(max_num_seqs, dtype=torch.int64).pin_memory()
        self._tokens_host = torch.zeros(max_num_seqs, dtype=torch.int32).pin_memory()
        self._errors_host = torch.zeros_like(be.error_flags, device="cpu").pin_memory()
        self._done = torch.cuda.Event()

    # ---------------------------------------------------------------- KV cache and buffers
    def allocate_kv_cache(self, num_blocks: int, block_size: int, progress=None) -> None:
        torch = self.torch
        self.model.allocate_kv_cache(num_blocks + 1, block_size)
        self.block_size = block_size
        self.scratch_block = num_blocks  # padding rows of a graph write here and nowhere else
        self.max_blocks = max(1, math.ceil(self.max_model_len / block_size))
        self.batch_buckets = batch_buckets(self.max_num_seqs)
        self.width_buckets = width_buckets(self.max_blocks, math.ceil(_MIN_WIDTH_TOKENS / block_size))
        S, dev = self.max_num_seqs, self.be.device
        # the graphs' static inputs: decode steps are copied into these, then replayed
        # rows of one int32 buffer (token ids, positions, context lengths): one copy fills all three
        self._rows = torch.zeros((3, S), dtype=torch.int32, device=dev)
        self.ids, self.positions, self.context_lens = self._rows[0], self._rows[1], self._rows[2]
        self.slots = torch.zeros(S, dtype=torch.int64, device=dev)
        self.cu_seqlens = torch.arange(S + 1, dtype=torch.int32, device=dev)
        self.tables = {w: torch.zeros((S, w), dtype=torch.int32, device=dev) for w in self.width_buckets}
        self._rows_host = torch.zeros((3, S), dtype=torch.int32).pin_memory()
        self._slots_host = torch.zeros(S, dtype=torch.int64).pin_memory()
        self._tables_host = {w: torch.zeros((S, w), dtype=torch.int32).pin_memory() for w in self.width_buckets}
        if self.use_graphs:
            self.capture(greedy_only=True, progress=progress)

    # ---------------------------------------------------------------- the step
    def execute(self, batch: StepBatch, device_rows=None, layers=None) -> StepOutput:
        torch = self.torch
        if layers is not None:  # a self-speculative draft: eager, every row to the host
            with torch.no_grad():
                logits = self.model.device_logits(batch, layers)
                return StepOutput(tokens=None, logits=logits.float().cpu().numpy())
        L = batch.logits_indices.shape[0]
        # the sampler has max_num_seqs rows; a step with more logits rows (scoring) samples nothing
        rows = device_rows if device_rows is not None and L <= self.max_num_seqs else [None] * L
        plan = self._load_sampling(rows)
        S = batch.num_seqs
        shape = None  # (batch bucket, width bucket) of a decode step that fits the graphs
        if (batch.is_decode and L == S and S <= self.max_num_seqs
                and batch.block_tables.shape[1] <= self.max_blocks):
            shape = (bucket_for(S, self.batch_buckets), bucket_for(batch.block_tables.shape[1], self.width_buckets))
        with torch.no_grad():
            if shape is not None and self.use_graphs:
                logits, tokens = self._replay(batch, (*shape, plan))
            elif shape is not None:
                # Eager decode runs the graphs' padded shape too: GEMMs pick their algorithm by
                # M, so the same shape gives the same numbers with graphs on or off.
                logits, tokens = self._eager(batch.padded_decode(*shape, self.scratch_block, self.block_size),
                                             plan, rows=L)
            else:
                logits, tokens = self._eager(batch, plan)
            host = [i for i, r in enumerate(rows) if r is None]
            if tokens is not None:
                self._tokens_host[:L].copy_(tokens[:L], non_blocking=True)
            self._errors_host.copy_(self.be.error_flags, non_blocking=True)
            host_logits = None
            if host:
                idx = torch.tensor(host, dtype=torch.int64).to(self.be.device, non_blocking=True)
                host_logits = logits.index_select(0, idx).to("cpu", non_blocking=False)
            self._done.record()
            self._done.synchronize()
        self.be.raise_error_flags(self._errors_host)
        out_tokens = self._tokens_host[:L].numpy().copy() if tokens is not None else np.empty(L, np.int32)
        out_tokens[host] = TOKEN_HOST
        logits_np = (host_logits.numpy() if host_logits is not None
                     else np.zeros((0, self.vocab_size), dtype=np.float32))
        return StepOutput(tokens=out_tokens, logits=logits_np)

    def _load_sampling(self, rows) -> SamplePlan:
        """Sampling params of the step's logits rows into the sampler's rows 0..n-1."""
        n = min(max(len(rows), 1), self.max_num_seqs)
        plan = pack_sampling_rows(rows[:n], self.vocab_size, self._fparams.numpy()[:n], self._iparams.numpy()[:n],
                                  self._steps.numpy()[:n])
        if not plan.greedy_only:  # a greedy plan reads no params (argmax only): nothing to copy
            sp = self.sampler
            sp.fparams[:n].copy_(self._fparams[:n], non_blocking=True)
            sp.iparams[:n].copy_(self._iparams[:n], non_blocking=True)
            sp.step[:n].copy_(self._steps[:n], non_blocking=True)
        return plan

    def _sample(self, logits, plan: SamplePlan):
        """Tokens [rows] int32; TOKEN_NOT_FINITE where a row's logits hold NaN/inf."""
        torch = self.torch
        tokens = self.sampler.sample(logits, plan=plan).token_ids
        finite = logits.amax(dim=1) < math.inf  # NaN compares False
        return torch.where(finite, tokens, torch.full_like(tokens, TOKEN_NOT_FINITE))

    # ---------------------------------------------------------------- eager steps
    def _eager(self, batch: StepBatch, plan: SamplePlan, rows: int | None = None):
        """The forward + sampler launched eagerly; `rows`: keep only the first rows (a padded step)."""
        logits = self.model.device_logits(batch)
        if logits is None:
            return None, None
        if rows is not None:
            logits = logits[:rows]
        if logits.shape[0] > self.max_num_seqs:  # more rows than sampler rows: all go to the host
            return logits, None
        return logits, self._sample(logits, plan)

    # ---------------------------------------------------------------- graphs
    def _graph_step(self, sb: int, w: int, plan: SamplePlan):
        """The forward + sampler on the static inputs of shape (sb, w)."""
        logits = self.model.compute_logits(
            self.ids[:sb], self.positions[:sb], self.slots[:sb], self.tables[w][:sb], self.context_lens[:sb],
            self.cu_seqlens[:sb + 1], True, ...)
        return logits, self._sample(logits, plan)

    def _capture_one(self, key) -> _Graph:
        torch = self.torch
        sb, w, plan = key
        t0 = time.perf_counter()
        steps = self.sampler.step.clone()  # the warm-up and capture advance the RNG steps: restore them
        # static inputs describe sb padding rows (scratch block): a valid step to warm up on
        self._fill_static(None, sb, w)
        self._graph_step(sb, w, plan)  # warm-up outside the graph (lazy allocations, autotuning)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # on the backend's stream: Modular's kernels launch there whatever the current stream is
        with torch.cuda.graph(graph, pool=self._pool, stream=self.be.stream):
            logits, tokens = self._graph_step(sb, w, plan)
        self.sampler.step.copy_(steps)
        torch.cuda.synchronize(self.be.device)
        self.capture_time += time.perf_counter() - t0
        return _Graph(graph, logits, tokens)

    def capture(self, greedy_only: bool = True, progress=None) -> None:
        """Capture the decode graphs of every (batch, width) bucket for one kind of plan, largest
        first (the shared pool is sized by the largest)."""
        plan = SamplePlan(greedy_only=greedy_only, penalties=False, sort=not greedy_only, logprobs=-1)
        keys = [(sb, w, plan) for sb in reversed(self.batch_buckets) for w in reversed(self.width_buckets)]
        keys = [k for k in keys if k not in self.graphs]
        with self.torch.no_grad():
            for i, key in enumerate(keys):
                if progress:
                    progress(f"capturing CUDA graphs of the decode step: {i + 1}/{len(keys)}")
                self.graphs[key] = self._capture_one(key)
        self.be.synchronize()

    def _fill_static(self, batch: StepBatch | None, sb: int, w: int) -> None:
        """Copy a decode step (None: padding only), padded to (sb, w), into the static inputs."""
        if batch is None:
            batch = StepBatch(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
                              np.zeros((0, 1), np.int32), np.zeros(0, np.int32), np.zeros(1, np.int32),
                              np.zeros(0, np.int32), True)
        padded = batch.padded_decode(sb, w, self.scratch_block, self.block_size)
        rows = self._rows_host.numpy()
        rows[0, :sb], rows[1, :sb], rows[2, :sb] = padded.token_ids, padded.positions, padded.context_lens
        self._rows.copy_(self._rows_host, non_blocking=True)
        self._slots_host.numpy()[:sb] = padded.slot_mapping
        self.slots[:sb].copy_(self._slots_host[:sb], non_blocking=True)
        tables = self._tables_host[w]
        tables.numpy()[:sb] = padded.block_tables
        self.tables[w][:sb].copy_(tables[:sb], non_blocking=True)

    def _replay(self, batch: StepBatch, key):
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture_one(key)
        sb, w, _ = key
        self._fill_static(batch, sb, w)
        g.graph.replay()
        return g.logits, g.tokens
