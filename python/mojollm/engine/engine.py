"""The decoding engine: requests in, one model step at a time, RequestOutputs out.

    engine = Engine(model)
    rid = engine.add_request(prompt_token_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step: the scheduler plans a StepBatch (continuous batching, chunked prefill, preemption),
the model returns the logits of the rows it asked for, and every sequence that reached its last
token gets its next token (sampling, n > 1 forks, beam search), its text (incremental
detokenization, stop strings) and its metrics. A failure inside one request (NaN logits, an
exception while post-processing it) finishes that request with an error and frees its blocks;
the others go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
from typing import Iterable

import numpy as np

from mojollm.engine.block_manager import BlockManager
from mojollm.engine.kv_policy import KVPolicy
from mojollm.engine.metrics import EngineStats
from mojollm.engine.runner import TOKEN_HOST, TOKEN_NOT_FINITE, create_runner
from mojollm.engine.sampler import Sampler, beam_candidates, beam_score, filtered_candidates, log_softmax
from mojollm.engine.scheduler import Scheduler, SchedulerOutput
from mojollm.engine.sequence import CompletionOutput, Request, RequestOutput, Sequence
from mojollm.engine.speculative import Governor, SpeculativeConfig, SpecState, accept_draft, make_proposer
from mojollm.sampling_params import SamplingParams

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes, when neither num_blocks nor kv_cache_memory is given
                                   # (backends may offer more: Backend.default_kv_cache_bytes)
_SCORE_ROWS = 64  # log-softmax rows at a time while scoring (bounds the float64 temporary)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4,
          "tib": 1 << 40}


def parse_bytes(value) -> int:
    """1073741824, "1GiB", "512MB", "2g" -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    try:
        if unit not in _UNITS:
            raise ValueError
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a memory size (e.g. 1GiB, 512MB)") from None


def _check_kv_fits_memory(model, num_blocks: int, block_size: int) -> None:
    """Refuse a KV pool larger than the memory left on the model's device, before allocating it
    (an allocation that large fails late with MemoryError, or succeeds lazily and is OOM-killed)."""
    backend = getattr(model, "backend", None)
    free = backend.free_memory_bytes() if hasattr(backend, "free_memory_bytes") else None
    want = num_blocks * int(model.kv_cache_bytes_per_block(block_size))
    if free is not None and want > free:
        raise ValueError(f"the KV cache needs {want / 2**30:.2f} GiB ({num_blocks} blocks) but only "
                         f"{free / 2**30:.2f} GiB is free on the {backend.name} device: lower kv_cache_memory")


def _set_kv_cache_dtype(model, name) -> str:
    """Give the model KV dtype `name` (mojollm.kv_dtypes) before the pool is sized; returns it."""
    from mojollm.kv_dtypes import check_kv_cache_dtype

    name = check_kv_cache_dtype(name)
    if hasattr(model, "set_kv_cache_dtype"):
        return model.set_kv_cache_dtype(name)
    if name != "auto":
        raise ValueError(f"this model object ({type(model).__name__}) has no KV dtype choice: "
                         f"kv_cache_dtype must be auto, got {name!r}")
    return getattr(model, "kv_dtype", "auto")


class Engine:
    def __init__(self, model, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int | str | None = None, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, seed: int | None = None, clock=time.perf_counter,
                 progress=None, speculative=None, draft_model=None, kv_cache_dtype: str = "auto",
                 kv_policy: str = "full", kv_budget: int | float | str | None = None, kv_sinks: int | None = None):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.kv_cache_dtype = _set_kv_cache_dtype(model, kv_cache_dtype)
        self.model = model
        self.tokenizer = model.tokenizer
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        model_len = int(cfg.max_position_embeddings)
        if max_model_len is not None:
            if max_model_len < 2:
                raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
            model_len = min(model_len, int(max_model_len))
        if num_blocks is None:
            per_block = int(model.kv_cache_bytes_per_block(block_size))
            if kv_cache_memory is None:
                need = -(-max_num_seqs * model_len // block_size) * per_block
                backend = getattr(model, "backend", None)
                default = (backend.default_kv_cache_bytes() if hasattr(backend, "default_kv_cache_bytes")
                           else DEFAULT_KV_CACHE_MEMORY)
                budget = min(default, need)
            else:
                budget = parse_bytes(kv_cache_memory)
            num_blocks = budget // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory ({budget} bytes) is smaller than one KV block ({per_block} bytes)")
        elif not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        _check_kv_fits_memory(model, num_blocks, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # A sequence must fit in the pool on its own, so preemption can always make room for it.
        self.max_model_len = min(model_len, num_blocks * block_size)
        # KV compression (engine/kv_policy.py): None keeps every token. Under sink-window a
        # sequence may run past max_model_len (its cache stays within the budget) up to the
        # positions the model was trained on; every other policy keeps max_model_len.
        self.kv_policy = KVPolicy.of(kv_policy, kv_budget, block_size, self.max_model_len, kv_sinks)
        self.max_seq_len = self.max_model_len
        if self.kv_policy is not None:
            if speculative is not None:
                raise ValueError(f"kv_policy {self.kv_policy.name} does not combine with speculative decoding")
            if self.kv_policy.needs_attention_mass and not getattr(model, "supports_kv_mass", False):
                raise ValueError(f"kv_policy h2o needs the attention mass per key, which the "
                                 f"{getattr(getattr(model, 'backend', None), 'name', 'model')} backend does not "
                                 f"compute here (the cpu backend does, over a float32 KV cache)")
            if self.kv_policy.streams:
                self.max_seq_len = max(self.max_model_len, int(cfg.max_position_embeddings))
                try:
                    model.rope_positions = self.max_seq_len  # the RoPE table reaches every position
                except AttributeError:
                    pass
        self.runner = create_runner(model, max_num_seqs, self.max_model_len)
        self.runner.allocate_kv_cache(num_blocks, block_size, progress=progress)
        # The KV cache lives on the model object: a second engine over the same object replaces
        # it, so the first must stop rather than read another engine's cache (step() checks).
        try:
            model._kv_owner = weakref.ref(self)
        except AttributeError:  # a model object that takes no attributes: nothing to guard
            pass
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        if max_num_batched_tokens is None:
            backend = getattr(model, "backend", None)
            max_num_batched_tokens = (backend.default_batched_tokens() if hasattr(backend, "default_batched_tokens")
                                      else 512)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens, max_num_seqs, self.kv_policy)
        self.sampler = Sampler(self.vocab_size)
        self.eos_token_ids = set(getattr(self.tokenizer, "eos_token_ids", None) or ())
        self.stats = EngineStats()
        self.clock = clock
        self._seed_rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        # speculative decoding (engine/speculative.py): None, or the config and its proposer
        self.speculative = SpeculativeConfig.of(speculative)
        self.proposer = None if self.speculative is None else make_proposer(self.speculative, self, draft_model)
        if self.proposer is not None:
            self.scheduler.on_release = self.proposer.release
            self.governor = Governor(self.speculative)

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids: Iterable[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, prompt: str | None = None,
                    arrival_time: float | None = None, _score_only: bool = False) -> str:
        """Queue a prompt; returns its request id. Bad input raises ValueError; a prompt that does
        not fit the context finishes at the next step() with an error. `arrival_time` (on the
        engine's clock; default now) is when the request really arrived, for a caller that queues
        it before handing it over (a server), so TTFT and queue time include that wait."""
        params = self.check_params(params)
        ids = self.check_token_ids(prompt_token_ids)
        if params.use_beam_search:
            self._check_beams_fit(len(ids), params)
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = self.clock() if arrival_time is None else float(arrival_time)
        req = Request(request_id, ids, params, arrival, int(priority), prompt, score_only=_score_only)
        req.base_seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2 ** 63))
        req.seqs[0].rng = np.random.default_rng([req.base_seed, 0])
        if self._may_speculate(req):
            req.seqs[0].spec = SpecState()
        self.requests[request_id] = req
        limit = self.max_seq_len if _score_only else self.max_seq_len - 1
        if len(ids) > limit:
            self._fail(req, f"the prompt has {len(ids)} tokens but the context holds {self.max_seq_len} "
                            f"(prompt plus at least one new token)" if not _score_only else
                            f"the text has {len(ids)} tokens but the context holds {self.max_seq_len}")
            return request_id
        self.scheduler.add(req.seqs[0])
        return request_id

    def check_params(self, params: SamplingParams | None) -> SamplingParams:
        """A validated private copy of `params`: a caller mutating its object afterwards (or
        before, past the constructor's checks) changes nothing in a queued request."""
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = dataclasses.replace(params)  # re-runs the constructor's normalisation and checks
        if params.n > self.scheduler.max_num_seqs:  # the n samples run side by side
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.scheduler.max_num_seqs})")
        if params.beam_width > self.scheduler.max_num_seqs:
            raise ValueError(f"beam_width ({params.beam_width}) exceeds max_num_seqs ({self.scheduler.max_num_seqs})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        k = params.num_speculative_tokens
        if k:
            if self.speculative is None:
                raise ValueError("num_speculative_tokens needs an engine with speculative decoding "
                                 "(LLM(..., speculative=...) or --speculative)")
            if k > self.speculative.num_tokens:
                raise ValueError(f"num_speculative_tokens ({k}) exceeds the engine's "
                                 f"({self.speculative.num_tokens})")
        return params

    def _may_speculate(self, req: Request) -> bool:
        """Speculation serves plain requests: one sample, no beams, no scoring, not turned off."""
        p = req.params
        return (self.proposer is not None and not req.score_only and not p.use_beam_search and p.n == 1
                and p.num_speculative_tokens != 0)

    def _check_beams_fit(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Beam search needs all its beams in the pool at once (they advance in lockstep): refuse a
        request whose beams could not all reach their longest length together, which would
        otherwise preempt each other forever. The prompt's blocks are shared; each beam owns its
        output blocks plus one copied-on-write partial prompt block."""
        bs = self.block_size
        out_len = min(params.max_tokens, self.max_model_len - num_prompt_tokens)
        need = -(-num_prompt_tokens // bs) + params.beam_width * (-(-out_len // bs) + 1)
        if need > self.num_blocks:
            raise ValueError(
                f"beam search with beam_width {params.beam_width} and max_tokens {params.max_tokens} needs up "
                f"to {need} KV blocks but the pool has {self.num_blocks}: lower them or give the KV cache more memory")

    def knows(self, request_id: str) -> bool:
        """Whether `request_id` is running, waiting, or has an output not yet returned by step()."""
        return request_id in self.requests or any(o.request_id == request_id for o in self._pending_outputs)

    def check_token_ids(self, token_ids) -> list[int]:
        """`token_ids` as a list of ints in the vocabulary; ValueError otherwise."""
        try:
            arr = np.asarray(list(token_ids))
        except TypeError:
            raise ValueError("prompt_token_ids must be a sequence of integers") from None
        if arr.size == 0:
            raise ValueError("the prompt is empty")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("prompt_token_ids must be a flat sequence of integers")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {int(arr.min())}..{int(arr.max())}")
        return arr.astype(np.int64).tolist()

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; True if it was running or waiting."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        for seq in req.live_seqs:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        req.finished = True
        req.metrics.finished_time = self.clock()
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one model step; returns the outputs of requests that advanced or finished."""
        owner = getattr(self.model, "_kv_owner", None)
        if owner is not None and owner() is not self:
            raise RuntimeError("this LLM's model object now serves a newer LLM, which replaced its KV cache: "
                               "load the model again for a second LLM")
        outputs, self._pending_outputs = self._pending_outputs, []
        t0 = self.clock()
        if self.proposer is not None:
            self._ask_lookahead()
        plan = self.scheduler.schedule()
        self.stats.schedule_time += self.clock() - t0
        if self.proposer is not None:
            self._propose(plan)
        self.stats.preemptions += len(plan.preempted)
        self.stats.recomputed_tokens += plan.num_recomputed_tokens
        if plan.is_empty:
            if self.scheduler.num_unfinished or (self.requests and not outputs):
                # the scheduler always makes progress while anything is unfinished: a bug, not a hang
                raise RuntimeError(f"engine made no progress with {len(self.requests)} unfinished requests")
            return outputs
        self.stats.steps += 1
        for s in plan.scheduled:
            m = s.seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = t0
                m.num_cached_tokens = s.seq.num_cached_tokens
            if s.num_new_tokens - s.num_drafts == 1:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += s.num_new_tokens

        t1 = self.clock()
        device_rows = self._device_rows(plan) if self.runner.samples_on_device else None
        try:
            if plan.kv_copies is not None:  # a KV policy compacted: move the kept rows first
                self.runner.copy_kv_rows(*plan.kv_copies)
            out = self.runner.execute(plan.batch, device_rows)
            logits = np.asarray(out.logits)
            tokens = out.tokens
            is_host = None if tokens is None else tokens == TOKEN_HOST
            num_host = plan.batch.logits_indices.shape[0] if tokens is None else int(is_host.sum())
            if logits.shape != (num_host, self.vocab_size):
                raise ValueError(f"model returned logits of shape {logits.shape}, expected {(num_host, self.vocab_size)}")
        except Exception as e:  # every request of the batch is affected; the engine goes on
            for req in {id(s.seq.request): s.seq.request for s in plan.scheduled}.values():
                if not req.finished:
                    self._fail(req, f"model forward failed: {type(e).__name__}: {e}")
            outputs.extend(self._take_pending())
            return outputs
        t2 = self.clock()
        self.stats.forward_time += t2 - t1
        if self.proposer is not None and plan.batch.is_decode:
            self.governor.record_step(plan.batch.num_tokens, t2 - t1)
        self.scheduler.step_done(plan)
        if self.kv_policy is not None and self.kv_policy.needs_attention_mass:
            mass = out.kv_mass or {}
            for i, s in enumerate(plan.scheduled):
                self.kv_policy.after_step(s.seq, s.num_new_tokens, mass.get(i))

        touched: dict[str, Request] = {}
        # NaN or +inf anywhere in a row makes its max NaN or +inf (one pass over the logits)
        bad_rows = ~(logits.max(axis=1) < np.inf) if logits.size else None
        # logits row r of the batch -> its row in `logits` (host rows only, in order)
        host_row = None if tokens is None else np.cumsum(is_host) - 1
        for s in plan.scheduled:
            seq, req = s.seq, s.seq.request
            if s.num_logits == 0 or req.finished or seq.is_finished:
                continue
            try:
                if tokens is not None and tokens[s.logits_start] != TOKEN_HOST:
                    drawn = tokens[s.logits_start:s.logits_start + s.num_logits]
                    if (drawn == TOKEN_NOT_FINITE).any():
                        raise FloatingPointError("the model produced NaN/inf logits")
                    if s.num_drafts:
                        self._verify(seq, s.num_drafts, argmax=drawn)
                    else:
                        self._append_sampled(seq, int(drawn[0]))
                    touched[req.request_id] = req
                    continue
                first = s.logits_start if host_row is None else int(host_row[s.logits_start])
                rows = logits[first:first + s.num_logits]
                if bad_rows[first:first + s.num_logits].any():
                    raise FloatingPointError("the model produced NaN/inf logits")
                if req.score_only:
                    self._score_rows(seq, rows, seq.num_computed_tokens - s.num_new_tokens)
                elif s.num_drafts:
                    self._verify(seq, s.num_drafts, rows=rows)
                elif req.params.use_beam_search:
                    seq.pending_logits = np.array(rows[0], dtype=np.float32)
                else:
                    self._sample(seq, rows[0], t2)
                touched[req.request_id] = req
            except Exception as e:
                self._fail(req, f"{type(e).__name__}: {e}")
        advanced = []
        for req in touched.values():
            if req.finished:
                continue
            try:
                if req.params.use_beam_search:
                    live = req.live_seqs
                    if live and all(b.pending_logits is not None for b in live):
                        self._beam_step(req, live, t2)
                if self._update_request(req, t2) and not req.finished:
                    advanced.append(req)
            except Exception as e:
                self._fail(req, f"{type(e).__name__}: {e}")
        self.stats.sample_time += self.clock() - t2
        outputs.extend(self._take_pending())
        for req in advanced:
            out = self._make_output(req)
            if out is not None:
                outputs.append(out)
        return outputs

    # ---------------------------------------------------------------- per-request work
    def _sample(self, seq: Sequence, row: np.ndarray, now: float) -> None:
        req = seq.request
        params = req.params
        group = [seq]
        if params.n > 1 and not req.forked:  # the prompt is computed once; the samples share its blocks
            req.forked = True
            for k in range(1, params.n):
                child = seq.fork(k)
                child.rng = np.random.default_rng([req.base_seed, k])
                self.block_manager.fork(seq, child)
                self.scheduler.add_running(child)
                req.seqs.append(child)
                group.append(child)
        for s in group:
            token = self.sampler.sample(row, s)
            if params.logprobs is not None:
                lp, entry = self.sampler.logprob_entry(row, token, params.logprobs)
                s.cumulative_logprob += lp
                s.output_logprobs.append(entry)
            self._append_sampled(s, token)

    def _append_sampled(self, seq: Sequence, token: int) -> None:
        seq.append_token(token)
        seq.request.metrics.num_generated_tokens += 1
        seq.request.new_tokens_this_step += 1
        self._check_stop(seq, token)

    # ---------------------------------------------------------------- speculative decoding
    def _ask_lookahead(self) -> None:
        """Before scheduling: how many draft slots each decoding sequence asks for (0 when the
        batch is too large to gain, or the request stopped speculating for a while). A runner
        whose per-row numerics change above some step size (runner.max_verify_rows) gets no
        more rows than that, so verified tokens are the ones plain decoding would give."""
        running = self.scheduler.running
        on = len(running) <= self.speculative.max_batch
        decoding = sum(1 for seq in running if seq.num_uncomputed_tokens == 1)
        limit = getattr(self.runner, "max_verify_rows", None)
        spare = (limit - decoding) if limit else len(running) * self.speculative.num_tokens
        for seq in running:
            seq.num_lookahead = 0
            spec = seq.spec
            if not on or spec is None or seq.num_uncomputed_tokens != 1 or spare <= 0:
                continue
            p = seq.request.params
            k = min(p.num_speculative_tokens or self.speculative.num_tokens,
                    p.max_tokens - seq.num_output_tokens - 1,       # the bonus token is one more
                    self.max_model_len - seq.num_tokens - 1, spare)
            k = self.governor.choose(spec, decoding, k, self.stats.steps) if k > 0 else 0
            if k > 0:
                seq.num_lookahead = self.proposer.lookahead(seq, k)
                spare -= seq.num_lookahead

    def _propose(self, plan: SchedulerOutput) -> None:
        """After scheduling: the drafts of the sequences that got draft slots, then the batch."""
        spec = [(s.seq, s.num_drafts) for s in plan.scheduled if s.num_drafts]
        if spec:
            t = self.clock()
            self.proposer.propose(spec)
            dt = self.clock() - t
            self.stats.propose_time += dt
            if self.proposer.needs_slots:  # a model drafted: what a draft token costs
                self.governor.record_drafts(sum(len(seq.spec.drafts) for seq, _ in spec), dt)
        self.scheduler.build_batch(plan)

    def _verify(self, seq: Sequence, k: int, rows: np.ndarray | None = None,
                argmax: np.ndarray | None = None) -> None:
        """Keep the drafts the target agrees with (rows[j]: the target after draft j; rows[k]
        gives one token more when all pass), append them and the target's own next token, and
        roll the rejected drafts' slots back. Greedy: exact match with the target's argmax
        (`argmax`: the runner's per-row draws, instead of rows). Sampling: the rejection rule
        (speculative.accept_draft), so tokens follow the target's distribution."""
        req, spec = seq.request, seq.spec
        params = req.params
        drafts, q = spec.drafts[:k], spec.draft_probs
        accepted = 0
        for j in range(k + 1):
            row = None if rows is None else rows[j]
            if argmax is not None:
                token = int(argmax[j])
                ok = j < k and token == drafts[j]
            elif j == k:
                token, ok = self.sampler.sample(row, seq), False
            elif params.greedy:
                token = self.sampler.sample(row, seq)
                ok = token == drafts[j]
            else:
                ids, p = filtered_candidates(self.sampler.processed_logits(row, seq), params)
                ok, token = accept_draft(ids, p, drafts[j], None if q is None else q[j], seq.rng)
            if params.logprobs is not None:
                lp, entry = self.sampler.logprob_entry(row, token, params.logprobs)
                seq.cumulative_logprob += lp
                seq.output_logprobs.append(entry)
            if ok:  # the draft's own row ran with this very token: its KV is in place
                accepted += 1
                seq.num_computed_tokens += 1
            self._append_sampled(seq, token)  # may finish the sequence (its blocks then cached)
            if not ok or seq.is_finished:
                break
        spec.drafts, spec.draft_probs = [], None
        m = req.metrics
        m.num_spec_steps += 1
        m.num_spec_proposed += k
        m.num_spec_accepted += accepted
        self.stats.spec_steps += 1
        self.stats.spec_proposed += k
        self.stats.spec_accepted += accepted
        if not seq.is_finished:
            self.block_manager.cache_computed_blocks(seq)
            self.block_manager.trim(seq)
        self.governor.after_verify(spec, k, accepted)

    def _device_rows(self, plan: SchedulerOutput) -> list[Sequence | None]:
        """Per logits row, the sequence the runner samples on the device, or None when the row
        must come back to the host: scoring, beam search, penalties (they need the token history),
        logprobs, and the first draw of n > 1 samples (one row forks into n). A speculative
        verification samples on the device only when greedy (each row's argmax is all it needs);
        the rejection rule needs the distributions on the host."""
        rows: list[Sequence | None] = [None] * plan.batch.logits_indices.shape[0]
        for s in plan.scheduled:
            if s.num_logits != 1 and not s.num_drafts:
                continue
            req = s.seq.request
            p = req.params
            if (req.score_only or p.use_beam_search or p.has_penalties or p.logprobs is not None
                    or (p.n > 1 and not req.forked) or (s.num_drafts and not p.greedy)):
                continue
            rows[s.logits_start:s.logits_start + s.num_logits] = [s.seq] * s.num_logits
        return rows

    def _check_stop(self, seq: Sequence, token: int) -> None:
        req = seq.request
        params = req.params
        if token in req.stop_token_set:
            self._flush_text(seq, seq.num_tokens - 1)
            return self._finish_seq(seq, "stop", token)
        if not params.ignore_eos and token in self.eos_token_ids:
            self._flush_text(seq, seq.num_tokens - 1)
            return self._finish_seq(seq, "stop", None)
        old_len = len(seq.output_text)
        seq.output_text += self._detokenize(seq)
        if req.stop_strings and len(seq.output_text) > old_len:
            start = max(0, old_len - req.max_stop_len + 1)
            hits = [(seq.output_text.find(st, start), st) for st in req.stop_strings]
            hits = [(i, st) for i, st in hits if i >= 0]
            if hits:
                i, st = min(hits)
                seq.output_text = seq.output_text[:i]
                return self._finish_seq(seq, "stop", st)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._flush_text(seq, seq.num_tokens)
            return self._finish_seq(seq, "length", None)

    def _detokenize(self, seq: Sequence) -> str:
        """New text of `seq` (vLLM's incremental detokenization: decode a short window of tokens
        around the new ones and hold back text that ends in an incomplete character)."""
        skip = seq.request.params.skip_special_tokens
        ids = seq.token_ids
        prefix_text = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return new_text[len(prefix_text):]

    def _flush_text(self, seq: Sequence, upto: int) -> None:
        """At the end, emit held-back text (an incomplete character stays a replacement char)."""
        if seq.read_offset >= upto:
            return
        skip = seq.request.params.skip_special_tokens
        ids = seq.token_ids
        prefix_text = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[seq.prefix_offset:upto], skip_special_tokens=skip)
        seq.output_text += new_text[len(prefix_text):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, upto

    def _finish_seq(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def _score_rows(self, seq: Sequence, rows: np.ndarray, start: int) -> None:
        """Teacher forcing: row j (position start + j) predicts the token at start + j + 1."""
        req = seq.request
        ids = seq.token_ids
        n = min(rows.shape[0], seq.num_tokens - 1 - start)
        for a in range(0, n, _SCORE_ROWS):
            b = min(n, a + _SCORE_ROWS)
            z = rows[a:b].astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            nxt = np.asarray(ids[start + a + 1:start + b + 1])
            req.prompt_logprobs.extend((z[np.arange(b - a), nxt] - lse).tolist())
        if seq.num_computed_tokens == seq.num_tokens:
            self._finish_seq(seq, "length", None)

    def _beam_step(self, req: Request, beams: list[Sequence], now: float) -> None:
        """One step of beam search over the live beams, which all have their logits.

        The best 2w one-token extensions (w = beam width) are taken in order of cumulative
        log-probability: an extension ending in EOS/a stop token becomes a finished hypothesis if it
        ranks in the first w, the others become the next beams until there are w. Hypotheses are
        scored sum(logprob) / len ** length_penalty (len = generated tokens, EOS included).
        """
        params = req.params
        w = params.beam_width
        rows = [b.pending_logits for b in beams]
        for b in beams:
            b.pending_logits = None
        cands = beam_candidates(beams, rows, self.sampler, w)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        chosen: list[tuple[int, int, float, float]] = []  # (beam index, token, cum logprob, token logprob)
        for rank, (cum, bi, tok, tlp) in enumerate(cands):
            if tok in stop_ids:
                if rank < w:
                    self._add_hypothesis(req, beams[bi], [tok], cum, tlp, rows[bi], "stop", tok)
                continue
            chosen.append((bi, tok, cum, tlp))
            if len(chosen) == w:
                break
        # Fork before appending: a beam chosen k times becomes k beams sharing its blocks.
        children: dict[int, list[Sequence]] = {}
        new_beams: list[tuple[Sequence, int, float, float, int]] = []
        for bi, tok, cum, tlp in chosen:
            parent = beams[bi]
            kids = children.setdefault(bi, [])
            if not kids:
                seq = parent
            else:
                seq = parent.fork(parent.sample_index)
                self.block_manager.fork(parent, seq)
                self.scheduler.add_running(seq)
                req.seqs.append(seq)
            kids.append(seq)
            new_beams.append((seq, tok, cum, tlp, bi))
        for bi, b in enumerate(beams):
            if bi not in children:
                b.finish_reason = "pruned"
                self.scheduler.finish(b)
        for seq, tok, cum, tlp, bi in new_beams:
            if params.logprobs is not None:
                _, entry = self.sampler.logprob_entry(rows[bi], tok, params.logprobs)
                seq.output_logprobs.append(entry)
            seq.append_token(tok)
            seq.cumulative_logprob = cum
            req.metrics.num_generated_tokens += 1
            if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
                self._add_hypothesis(req, seq, [], cum, None, None, "length", None)
                seq.finish_reason = "length"
                self.scheduler.finish(seq)
        req.new_tokens_this_step = 1
        req.seqs = [s for s in req.seqs if not s.is_finished]
        if not req.seqs or self._beam_search_done(req):
            for s in req.seqs:
                s.finish_reason = "pruned"
                self.scheduler.finish(s)
            req.seqs = []

    def _add_hypothesis(self, req: Request, seq: Sequence, extra: list[int], cum: float,
                        tlp: float | None, row, reason: str, stop_reason) -> None:
        tokens = seq.output_token_ids + extra
        logprobs = list(seq.output_logprobs)
        if extra and req.params.logprobs is not None:
            logprobs.append(self.sampler.logprob_entry(row, extra[0], req.params.logprobs)[1])
        req.beam_hypotheses.append({
            "score": beam_score(cum, len(tokens), req.params.length_penalty),
            "token_ids": tokens, "cumulative_logprob": cum, "logprobs": logprobs,
            "finish_reason": reason, "stop_reason": stop_reason,
        })

    def _beam_search_done(self, req: Request) -> bool:
        """True once no live beam can beat the w-th best finished hypothesis."""
        w = req.params.beam_width
        if len(req.beam_hypotheses) < w:
            return False
        worst_kept = sorted((h["score"] for h in req.beam_hypotheses), reverse=True)[w - 1]
        lp = req.params.length_penalty
        max_len = min(req.params.max_tokens, self.max_model_len - len(req.prompt_token_ids))
        best = -np.inf
        for s in req.seqs:
            # log-probs are <= 0, so the sum only falls; with lp > 0 the longest length divides most.
            n = max_len if lp > 0 else s.num_output_tokens
            best = max(best, beam_score(s.cumulative_logprob, n, lp))
        return best <= worst_kept

    def _fail(self, req: Request, message: str) -> None:
        for seq in req.live_seqs:
            seq.finish_reason = "error"
            # its KV may be garbage (e.g. NaN): keep what only it computed out of the prefix cache
            self.scheduler.finish(seq, uncache=True)
        req.error = message
        self._finish_request(req, self.clock())

    def _update_request(self, req: Request, now: float) -> bool:
        """Token timing, and the request's end once every sequence has finished.
        Returns whether the request produced tokens this step."""
        m = req.metrics
        count = req.new_tokens_this_step
        advanced = count > 0
        if advanced:
            req.new_tokens_this_step = 0
            if m.first_token_time is None:
                m.first_token_time = now
                count -= 1  # the others came with it (speculative decoding): same instant
            if m.last_token_time is not None and count > 0:
                # one latency per token of a single-stream request (a verified speculative step
                # yields several at once); one per step for n > 1 samples and beams
                per_seq = count if req.params.n == 1 and not req.params.use_beam_search else 1
                m.inter_token_latencies.extend([(now - m.last_token_time) / per_seq] * per_seq)
            m.last_token_time = now
        if req.score_only:
            if req.seqs[0].is_finished:
                self._finish_request(req, now)
        elif req.params.use_beam_search:
            if not req.seqs:
                self._finish_request(req, now)
        elif all(s.is_finished for s in req.seqs) and (req.forked or req.params.n == 1):
            self._finish_request(req, now)
        return advanced

    def _finish_request(self, req: Request, now: float) -> None:
        if req.finished:
            return
        req.finished = True
        req.metrics.finished_time = now
        self.requests.pop(req.request_id, None)
        self._pending_outputs.append(self._make_output(req))

    def _take_pending(self) -> list[RequestOutput]:
        out, self._pending_outputs = self._pending_outputs, []
        return out

    def _make_output(self, req: Request) -> RequestOutput | None:
        params = req.params
        if req.score_only:
            outputs = []
        elif params.use_beam_search:
            if not req.finished:
                return None  # beams reorder every step: only the final hypotheses are meaningful
            hyps = sorted(req.beam_hypotheses, key=lambda h: -h["score"])[:params.n]
            outputs = [CompletionOutput(
                index=i, text=self.tokenizer.decode(h["token_ids"], skip_special_tokens=params.skip_special_tokens),
                token_ids=list(h["token_ids"]), cumulative_logprob=h["cumulative_logprob"],
                logprobs=list(h["logprobs"]) if params.logprobs is not None else None,
                finish_reason=h["finish_reason"], stop_reason=h["stop_reason"]) for i, h in enumerate(hyps)]
        else:
            seqs = sorted(req.seqs, key=lambda s: s.sample_index)
            outputs = [CompletionOutput(
                index=s.sample_index, text=s.output_text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if params.logprobs is not None else None,
                logprobs=list(s.output_logprobs) if params.logprobs is not None else None,
                finish_reason=s.finish_reason if s.is_finished else None, stop_reason=s.stop_reason)
                for s in seqs]
        hold = max(req.max_stop_len - 1, 0)
        stable = [len(o.text) if (o.finish_reason or req.finished) else max(0, len(o.text) - hold) for o in outputs]
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_token_ids),
            outputs=outputs, finished=req.finished, metrics=req.metrics, error=req.error,
            prompt_logprobs=list(req.prompt_logprobs) if req.score_only else None, num_stable_chars=stable)

    # ---------------------------------------------------------------- conveniences
    def run_until_done(self) -> list[RequestOutput]:
        """Step until every queued request has finished; their final outputs in finishing order."""
        done = []
        while self.has_unfinished():
            done.extend(o for o in self.step() if o.finished)
        return done
