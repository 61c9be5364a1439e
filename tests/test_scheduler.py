"""Scheduler: exact step plans (block ids, slots, positions) on small cases, the chunked-prefill
token budget, priorities, max_num_seqs, prefix-cache admission and preemption by recompute.
No model: the test plays the engine (advance, append a token)."""

from __future__ import annotations

import numpy as np

from mojollm.engine.block_manager import BlockManager
from mojollm.engine.scheduler import Scheduler
from mojollm.engine.sequence import Request, SequenceStatus
from mojollm.sampling_params import SamplingParams


def make(tokens, priority=0, rid="r"):
    req = Request(rid, list(tokens), SamplingParams(), 0.0, priority=priority)
    return req.seqs[0]


def finish_step(sched, out, new_token=7):
    """Play the engine: the plan ran; sequences that got logits receive one new token."""
    sched.step_done(out)
    for s in out.scheduled:
        if s.num_logits:
            s.seq.append_token(new_token)


def test_prefill_then_decode_exact_plan():
    sched = Scheduler(BlockManager(16, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a, b = make(range(10, 16), rid="a"), make([20, 21, 22], rid="b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    batch = out.batch
    assert a.block_table == [0, 1] and b.block_table == [2]
    np.testing.assert_array_equal(batch.token_ids, [10, 11, 12, 13, 14, 15, 20, 21, 22])
    np.testing.assert_array_equal(batch.positions, [0, 1, 2, 3, 4, 5, 0, 1, 2])
    np.testing.assert_array_equal(batch.slot_mapping, [0, 1, 2, 3, 4, 5, 8, 9, 10])
    np.testing.assert_array_equal(batch.block_tables, [[0, 1], [2, 0]])
    np.testing.assert_array_equal(batch.context_lens, [6, 3])
    np.testing.assert_array_equal(batch.cu_seqlens_q, [0, 6, 9])
    np.testing.assert_array_equal(batch.logits_indices, [5, 8])
    assert not batch.is_decode
    assert batch.token_ids.dtype == np.int32 and batch.slot_mapping.dtype == np.int64
    finish_step(sched, out, new_token=30)

    out = sched.schedule()
    batch = out.batch
    assert batch.is_decode
    np.testing.assert_array_equal(batch.token_ids, [30, 30])
    np.testing.assert_array_equal(batch.positions, [6, 3])
    np.testing.assert_array_equal(batch.slot_mapping, [6, 11])   # block 1 row 2, block 2 row 3
    np.testing.assert_array_equal(batch.context_lens, [7, 4])
    finish_step(sched, out)
    out = sched.schedule()                                        # b's 5th token opens block 3
    assert b.block_table == [2, 3]
    np.testing.assert_array_equal(out.batch.slot_mapping, [7, 12])


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched = Scheduler(BlockManager(32, 4), max_num_batched_tokens=8, max_num_seqs=8)
    d = make([1, 2, 3], rid="d")
    sched.add(d)
    finish_step(sched, sched.schedule())                          # d is now decoding
    long = make(range(100, 120), rid="long")                      # 20 tokens
    sched.add(long)
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        assert out.batch.num_tokens <= 8
        assert out.scheduled[0].seq is d and out.scheduled[0].num_new_tokens == 1   # decode first
        chunk = [s for s in out.scheduled if s.seq is long]
        chunks.append(chunk[0].num_new_tokens if chunk else 0)
        has_long_logits = any(s.seq is long and s.num_logits for s in out.scheduled)
        finish_step(sched, out)
        if long.num_output_tokens:
            assert has_long_logits
            break
        assert not has_long_logits                               # no logits mid-prefill
    assert chunks == [7, 7, 6]
    # positions of the chunks continue where the cache stopped
    assert long.num_computed_tokens == 20 and long.num_tokens == 21


def test_max_num_seqs_and_fcfs_order():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=100, max_num_seqs=2)
    seqs = [make([5] * 3, rid=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert sched.waiting == [seqs[2]]


def test_priority_admits_urgent_request_first():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=4, max_num_seqs=8)
    low = make(range(3, 7), priority=5, rid="low")
    high = make(range(3, 7), priority=-1, rid="high")            # arrives later, runs first
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [high]


def test_prefix_cache_admission_skips_cached_tokens():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=8)
    a = make(range(40, 50), rid="a")
    sched.add(a)
    finish_step(sched, sched.schedule())
    b = make(list(range(40, 48)) + [1, 2], rid="b")
    sched.add(b)
    out = sched.schedule()
    sb = [s for s in out.scheduled if s.seq is b][0]
    assert sb.num_new_tokens == 2 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    i = [s.seq for s in out.scheduled].index(b)
    lo, hi = out.batch.cu_seqlens_q[i], out.batch.cu_seqlens_q[i + 1]
    np.testing.assert_array_equal(out.batch.positions[lo:hi], [8, 9])
    assert out.batch.context_lens[i] == 10


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(4, 2)                                      # 8 slots in all
    sched = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=8)
    a, b = make([1, 2, 3], rid="a"), make([4, 5, 6], rid="b")
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())                         # a: 2 blocks, b: 2 blocks, pool empty
    assert bm.num_free_blocks == 0
    # a's 4th token fits its block 1; b's too; the 5th tokens need new blocks
    finish_step(sched, sched.schedule())
    out = sched.schedule()                                       # a needs a 3rd block: b (later) is preempted
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert [s.seq for s in out.scheduled] == [a] and len(a.block_table) == 3
    assert b.request.metrics.num_preemptions == 1
    finish_step(sched, out)
    # when a finishes, b comes back: its first block [4, 5] is still in the prefix cache, the rest
    # (prompt token 6 and its two generated tokens) is recomputed in one chunk
    sched.finish(a)
    out = sched.schedule()
    (sb,) = out.scheduled
    assert sb.seq is b and b.num_tokens == 5 and sb.num_new_tokens == 3 and sb.num_logits == 1
    assert out.num_recomputed_tokens == 3
    np.testing.assert_array_equal(out.batch.positions, [2, 3, 4])
    np.testing.assert_array_equal(out.batch.token_ids, b.token_ids[2:])


def test_lowest_priority_sequence_preempts_itself():
    bm = BlockManager(3, 2)
    sched = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=8)
    a, b = make([1, 2, 3], rid="a"), make([4, 5], rid="b")     # 2 blocks + 1 block: the whole pool
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())
    out = sched.schedule()        # a's next token fits its block; b (last in line) needs one: b yields
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert sched.waiting == [b] and bm.num_free_blocks == 1
    np.testing.assert_array_equal(out.batch.slot_mapping, [a.block_table[1] * 2 + 1])
