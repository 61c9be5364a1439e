"""Continuous batching with chunked prefill, device-free (vLLM v1's unified token budget).

Every step, each sequence asks for the tokens it has not run yet (num_tokens -
num_computed_tokens): the whole prompt at first, one token per step while decoding, a few more
after a copy-on-write. The scheduler fills a budget of `max_num_batched_tokens`:

1. running sequences first, in priority order (priority, then arrival): decodes cost one token,
   an unfinished prefill takes what is left of the budget (chunked prefill). When the block pool
   runs dry the lowest-priority running sequence is preempted by recompute: its blocks are freed
   and it goes back to the waiting queue, to be prefilled again later (prefix-cache hits make
   that cheap).
2. then waiting sequences, in the same order, while the budget, `max_num_seqs` and the pool
   allow; each first reuses the longest cached prefix of its tokens.

Speculative decoding: a decoding sequence may ask for `num_lookahead` more slots than its one
token (the engine sets it before scheduling); it gets them when the budget and pool allow, and
its drafts (Sequence.spec.drafts, filled by the proposer after scheduling) run as extra rows
whose logits all come back. The rows a verification rejects are rolled back by the engine.

The result is a plan (which sequences run how many tokens), turned into one StepBatch
(engine/step.py) by build_batch once the drafts are known, plus which rows of the returned
logits belong to which sequence.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from mojollm.engine.block_manager import BlockManager
from mojollm.engine.sequence import Sequence, SequenceStatus
from mojollm.engine.step import StepBatch


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    logits_start: int = -1      # first row of this sequence in the step's logits (-1: none)
    num_logits: int = 0         # 1 for the last token of the sequence, all new tokens when scoring
    num_drafts: int = 0         # speculative tokens among the new ones (after its one real token)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    batch: StepBatch | None
    preempted: list[Sequence] = field(default_factory=list)
    num_recomputed_tokens: int = 0
    # KV rows to move before the forward (H2O compaction): (src_slots, dst_slots) int64, or None
    kv_copies: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 kv_policy=None):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        # both kept sorted by Sequence.priority_key: the head runs first, the tail is preempted first
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.on_release = None  # called with a sequence that gives its blocks back (a draft model's too)
        self.kv_policy = kv_policy  # engine.kv_policy.KVPolicy, or None (keep every token)

    # ---------------------------------------------------------------- queue management
    def add(self, seq: Sequence) -> None:
        """A new (or preempted) sequence waits for admission."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority_key)

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence (it already holds shared blocks)."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.priority_key)

    def finish(self, seq: Sequence, uncache: bool = False) -> None:
        """Remove a sequence for good and free its blocks (`uncache`: drop those only it held
        from the prefix cache too)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if not uncache:  # blocks completed by a last verify step's accepted drafts, too
            self.block_manager.cache_computed_blocks(seq)
        self.block_manager.free(seq, uncache=uncache)
        seq.status = SequenceStatus.FINISHED
        seq.pending_logits = None
        seq.num_lookahead = 0
        if self.on_release is not None:
            self.on_release(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.num_lookahead = 0
        self.block_manager.free(seq)
        if self.on_release is not None:
            self.on_release(seq)
        seq.pending_logits = None  # recomputed with the prefix
        seq.request.metrics.num_preemptions += 1
        self.add(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------- the step plan
    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        recomputed = 0

        # 1. running sequences, highest priority first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens == 0:  # a beam waiting for its siblings' logits
                i += 1
                continue
            if bm.needs_copy_on_write(seq):
                recomputed += bm.copy_on_write(seq)
            drafts = seq.num_lookahead if seq.num_uncomputed_tokens == 1 else 0
            n = min(seq.num_uncomputed_tokens + drafts, budget)
            if self.kv_policy is not None:  # evict between steps, before the slots are allocated
                room = self.kv_policy.make_room(seq, n, bm)
                while room is None:  # a compaction needs copy-on-write blocks the pool lacks
                    victim = self.running[-1]
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                    room = self.kv_policy.make_room(seq, n, bm)
                if room is None:
                    break  # `seq` preempted itself: everything after it is gone too
                n = room
            if drafts and not bm.allocate_slots(seq, n):  # no room to speculate: one token then
                n = 1
            while not bm.allocate_slots(seq, n):
                victim = self.running[-1]  # lowest priority
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, n, num_drafts=n - min(n, seq.num_uncomputed_tokens)))
                budget -= n
                i += 1
                continue
            break  # `seq` preempted itself: everything after it is gone too

        # 2. waiting sequences (not in a step that had to preempt: the pool is short)
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = [] if seq.request.score_only else bm.get_computed_blocks(seq)
            n = min(seq.num_tokens - len(hits) * self.block_size, budget)
            if self.kv_policy is not None:
                hits, n = self.kv_policy.admission_cap(seq, hits, n)
            if not bm.allocate_slots(seq, n, hits):
                break
            bm.count_admission(seq, len(hits))
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = len(hits) * self.block_size
            else:  # a preempted sequence: everything not served from the cache is recomputed
                recomputed += seq.num_tokens - len(hits) * self.block_size
            self.waiting.pop(0)
            self.add_running(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        if not scheduled and self.waiting and self.running and not preempted:
            # Every running sequence is a beam waiting for a sibling that cannot be admitted:
            # make room by preempting them, then plan again (the pool is then empty enough).
            victims = list(reversed(self.running))
            for seq in victims:
                self.preempt(seq)
            out = self.schedule()
            out.preempted[:0] = victims
            return out
        drafts = any(s.num_drafts for s in scheduled)
        return SchedulerOutput(scheduled, self._build_batch(scheduled) if scheduled and not drafts else None,
                               preempted, recomputed, self._take_kv_copies(scheduled))

    def _take_kv_copies(self, scheduled: list[ScheduledSeq]):
        """The row moves of this step's compactions, as one (src, dst) pair (None: none)."""
        if self.kv_policy is None:
            return None
        src: list[int] = []
        dst: list[int] = []
        for s in scheduled:
            for a, b in s.seq.kv_copies:
                src.extend(a)
                dst.extend(b)
            s.seq.kv_copies = []
        return (np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)) if src else None

    def _mass_seqs(self, scheduled: list[ScheduledSeq]) -> np.ndarray | None:
        """Sequences of the batch whose attention mass per cache row the step must return (h2o)."""
        if self.kv_policy is None or not self.kv_policy.needs_attention_mass:
            return None
        return np.arange(len(scheduled), dtype=np.int32)

    def build_batch(self, out: SchedulerOutput) -> None:
        """The StepBatch of a plan with speculating sequences (schedule() builds the others), once
        their drafts are known: each gets as many draft rows as it has drafts (at most the
        slots it was given)."""
        if out.batch is not None or not out.scheduled:
            return
        for s in out.scheduled:
            if s.num_drafts:
                s.num_drafts = min(s.num_drafts, len(s.seq.spec.drafts))
                s.num_new_tokens = s.seq.num_uncomputed_tokens + s.num_drafts
        out.batch = self._build_batch(out.scheduled)

    def _build_batch(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        if all(s.num_new_tokens - s.num_drafts == 1 and not s.seq.request.score_only for s in scheduled):
            return self._build_decode_batch(scheduled)
        bs = self.block_size
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        token_ids = np.empty(num_tokens, dtype=np.int32)
        positions = np.empty(num_tokens, dtype=np.int32)
        slot_mapping = np.empty(num_tokens, dtype=np.int64)
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int32)
        context_lens = np.empty(len(scheduled), dtype=np.int32)
        cu_seqlens_q = np.zeros(len(scheduled) + 1, dtype=np.int32)
        logits_indices: list[int] = []
        t = 0
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            table = np.asarray(seq.block_table, dtype=np.int32)
            block_tables[i, :table.shape[0]] = table
            pos = np.arange(start, start + n, dtype=np.int32)
            idx = pos - seq.num_evicted_tokens  # cache rows: positions less the evicted tokens
            token_ids[t:t + n - s.num_drafts] = seq.token_ids[start:start + n - s.num_drafts]
            token_ids[t + n - s.num_drafts:t + n] = seq.spec.drafts[:s.num_drafts] if s.num_drafts else []
            positions[t:t + n] = pos
            slot_mapping[t:t + n] = table[idx // bs].astype(np.int64) * bs + idx % bs
            context_lens[i] = start + n - seq.num_evicted_tokens
            cu_seqlens_q[i + 1] = t + n
            if seq.request.score_only:  # every token's logits (teacher-forced scoring)
                s.logits_start, s.num_logits = len(logits_indices), n
                logits_indices.extend(range(t, t + n))
            elif s.num_drafts:  # the last real token and every draft: the target's verdicts
                s.logits_start, s.num_logits = len(logits_indices), s.num_drafts + 1
                logits_indices.extend(range(t + n - s.num_drafts - 1, t + n))
            elif start + n == seq.num_tokens:  # the chunk reaches the last token: sample after it
                s.logits_start, s.num_logits = len(logits_indices), 1
                logits_indices.append(t + n - 1)
            t += n
        return StepBatch(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
            cu_seqlens_q=cu_seqlens_q,
            logits_indices=np.asarray(logits_indices, dtype=np.int32),
            is_decode=all(s.num_new_tokens == 1 for s in scheduled),
            kv_mass_seqs=self._mass_seqs(scheduled),
        )

    def _build_decode_batch(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        """The same plan when every sequence runs exactly its last token (the steady state of
        decoding), plus any drafts: plain Python ints, one array per field (a decode step of 64
        sequences is otherwise dominated by small numpy calls). A speculating sequence's k + 1
        tokens become k + 1 rows of their own, each with the context up to itself (the decode
        attention's causal mask), sharing the sequence's block table."""
        bs = self.block_size
        ids, pos, slots, tables, lens = [], [], [], [], []
        width = max(len(s.seq.block_table) for s in scheduled)
        for s in scheduled:
            seq = s.seq
            p = seq.num_computed_tokens
            c = p - seq.num_evicted_tokens  # its cache row (= p unless a KV policy evicted)
            table = seq.block_table
            padded = table + [0] * (width - len(table))
            s.logits_start, s.num_logits = len(ids), 1 + s.num_drafts
            for j, tok in enumerate([seq.token_ids[p], *seq.spec.drafts[:s.num_drafts]] if s.num_drafts
                                    else [seq.token_ids[p]]):
                ids.append(tok)
                pos.append(p + j)
                slots.append(table[(c + j) // bs] * bs + (c + j) % bs)
                tables.append(padded)
                lens.append(c + j + 1)
        T = len(ids)
        return StepBatch(
            token_ids=np.array(ids, dtype=np.int32),
            positions=np.array(pos, dtype=np.int32),
            slot_mapping=np.array(slots, dtype=np.int64),
            block_tables=np.array(tables, dtype=np.int32).reshape(T, width),
            context_lens=np.array(lens, dtype=np.int32),
            cu_seqlens_q=np.arange(T + 1, dtype=np.int32),
            logits_indices=np.arange(T, dtype=np.int32),
            is_decode=True,
            kv_mass_seqs=None if any(s.num_drafts for s in scheduled) else self._mass_seqs(scheduled),
        )

    def step_done(self, out: SchedulerOutput) -> None:
        """The model ran the plan: advance the sequences and offer full blocks to the prefix cache.
        Drafts count only once the engine's verification accepts them."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens - s.num_drafts
            self.block_manager.cache_computed_blocks(s.seq)
