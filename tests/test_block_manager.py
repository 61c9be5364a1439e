"""KV block manager: exact block ids, prefix cache, LRU eviction, copy-on-write, and a property test
that simulates the physical cache contents to prove no block is ever shared or reused wrongly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_model import FakeModel
from mojollm.engine import block_manager as bm_mod
from mojollm.engine.block_manager import BlockManager
from mojollm.engine.engine import Engine
from mojollm.engine.sequence import Request
from mojollm.sampling_params import SamplingParams


def new_seq(tokens):
    return Request("r", list(tokens), SamplingParams(), 0.0).seqs[0]


def run(bm, seq, n):
    """What a step does to the bookkeeping: allocate, 'compute', offer full blocks to the cache."""
    assert bm.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_computed_blocks(seq)


def test_allocate_exact_ids_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = new_seq(range(10, 20))           # 10 tokens -> 3 blocks
    run(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert bm.ref_counts[:4] == [1, 1, 1, 0] and bm.num_free_blocks == 5
    assert bm.slot(a, 9) == 2 * 4 + 1
    b = new_seq(range(50, 55))
    run(bm, b, 5)
    assert b.block_table == [3, 4]
    a.append_token(99)
    a.append_token(98)                   # 12 tokens: still fits block 2
    run(bm, a, 2)
    assert a.block_table == [0, 1, 2]
    a.append_token(97)                   # 13th token opens block 5
    run(bm, a, 1)
    assert a.block_table == [0, 1, 2, 5]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(rc == 0 for rc in bm.ref_counts)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = new_seq(range(3, 12))            # needs 3 blocks
    b = new_seq(range(3, 8))
    run(bm, b, 5)                        # b holds 2
    assert not bm.allocate_slots(a, 9)
    assert a.block_table == [] and bm.num_free_blocks == 1


def test_prefix_cache_hit_reuses_longest_prefix_and_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = new_seq(range(100, 110))         # blocks: [100..103] [104..107] [108, 109]
    run(bm, a, 10)
    b = new_seq(list(range(100, 108)) + [7, 7, 7])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, 3, hits)
    bm.count_admission(b, len(hits))
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.num_hit_tokens == 8 and bm.num_query_tokens == 11 and bm.hit_rate == pytest.approx(8 / 11)
    # a prompt that differs inside the first block hits nothing
    c = new_seq([100, 101, 0, 103, 104, 105, 106, 107, 1])
    assert bm.get_computed_blocks(c) == []


def test_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = new_seq(range(20, 28))           # exactly 2 full blocks
    run(bm, a, 8)
    b = new_seq(range(20, 28))
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:1]     # at most num_tokens - 1 tokens are reused
    assert bm.allocate_slots(b, 4, hits)
    assert b.block_table[1] != a.block_table[1]


def test_lru_eviction_order_and_cache_survives_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = new_seq([5, 6, 7, 8, 9])         # blocks 0, 1 full (cached), 2 partial
    run(bm, a, 5)
    bm.free(a)                           # 2 -> free list; 1 then 0 -> LRU (tail first)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # the cache still serves a's prefix after a is gone
    again = new_seq([5, 6, 7, 8, 1])
    assert bm.get_computed_blocks(again) == [0, 1]
    # fresh allocations use never-cached blocks first (2 was freed last: top of the stack), then
    # evict the least recently used cached block: 1 (freed before 0)
    c = new_seq([40, 41, 42, 43, 44, 45])
    assert bm.allocate_slots(c, 6)
    assert c.block_table == [2, 3, 1] and bm.num_evictions == 1
    assert bm.get_computed_blocks(again) == [0]


def test_fork_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    p = new_seq(range(30, 36))           # 6 tokens: block 0 full, block 1 has 2 rows
    run(bm, p, 6)
    child = p.fork(1)
    bm.fork(p, child)
    assert child.block_table == p.block_table and bm.ref_counts[p.block_table[1]] == 2
    for s, t in ((p, 1), (child, 2)):
        s.append_token(t)
    assert bm.needs_copy_on_write(child) and bm.needs_copy_on_write(p)
    redo = bm.copy_on_write(child)       # child drops the shared partial block
    assert redo == 2 and child.num_computed_tokens == 4 and child.block_table == [p.block_table[0]]
    assert not bm.needs_copy_on_write(p)  # p is now the only user: writes in place
    run(bm, child, 3)                    # rows 4, 5 recomputed + the new token
    assert child.block_table[1] not in p.block_table
    assert bm.ref_counts[p.block_table[0]] == 2
    bm.free(p)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_hash_collision_never_reuses_wrong_blocks(monkeypatch):
    monkeypatch.setattr(bm_mod, "block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=8, block_size=2)
    a = new_seq([1, 2, 3, 4, 5])
    run(bm, a, 5)
    b = new_seq([1, 2, 9, 9, 5])
    assert bm.get_computed_blocks(b) == [a.block_table[0]] or bm.get_computed_blocks(b) == []
    hits = bm.get_computed_blocks(b)
    for i, blk in enumerate(hits):       # whatever is reused holds b's own tokens
        assert a.token_ids[2 * i:2 * i + 2] == b.token_ids[2 * i:2 * i + 2]


# ---------------------------------------------------------------- property test

class CacheSim:
    """Drives a BlockManager the way the scheduler does and writes token ids into a simulated
    physical cache, then checks every live sequence can read its own tokens back."""

    def __init__(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.content = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.seqs = []

    def admit(self, tokens) -> bool:
        seq = new_seq(tokens)
        hits = self.bm.get_computed_blocks(seq)
        n = seq.num_tokens - len(hits) * self.bm.block_size
        if not self.bm.allocate_slots(seq, n, hits):
            return False
        self.write(seq, n)
        self.seqs.append(seq)
        return True

    def write(self, seq, n):
        bs = self.bm.block_size
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            blk = seq.block_table[p // bs]
            assert self.bm.ref_counts[blk] == 1, "writing into a shared block"
            self.content[blk * bs + p % bs] = seq.token_ids[p]
        seq.num_computed_tokens += n
        self.bm.cache_computed_blocks(seq)

    def extend(self, seq, token) -> bool:
        seq.append_token(token)
        if self.bm.needs_copy_on_write(seq):
            self.bm.copy_on_write(seq)
        n = seq.num_uncomputed_tokens
        if not self.bm.allocate_slots(seq, n):
            return False
        self.write(seq, n)
        return True

    def fork(self, seq):
        child = seq.fork(len(self.seqs))
        self.bm.fork(seq, child)
        self.seqs.append(child)

    def drop(self, seq):
        self.bm.free(seq)
        self.seqs.remove(seq)

    def check(self):
        bm, bs = self.bm, self.bm.block_size
        refs = [0] * bm.num_blocks
        for s in self.seqs:
            assert len(s.block_table) == -(-s.num_computed_tokens // bs)
            for b in s.block_table:
                refs[b] += 1
            for p in range(s.num_computed_tokens):  # every computed token reads back correctly
                assert self.content[s.block_table[p // bs] * bs + p % bs] == s.token_ids[p]
        assert refs == bm.ref_counts
        free = list(bm._free) + list(bm._evictable)
        assert len(free) == len(set(free)) == bm.num_free_blocks
        assert set(free) == {b for b in range(bm.num_blocks) if refs[b] == 0}
        for h, b in bm._hash_to_block.items():   # cached blocks hold the tokens they are keyed by
            _, _, toks = bm._block_key[b]
            assert list(self.content[b * bs:(b + 1) * bs]) == list(toks)


ops = st.lists(st.tuples(st.sampled_from(["admit", "extend", "fork", "drop", "preempt"]),
                         st.integers(0, 1 << 30)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(4, 24))
def test_block_accounting_property(ops, block_size, num_blocks):
    sim = CacheSim(num_blocks, block_size)
    for op, r in ops:
        rng = np.random.default_rng(r)
        if op == "admit":
            # a small alphabet and shared stems make prefix hits frequent
            stem = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [7, 7]][r % 3][: 1 + r % 6]
            sim.admit(stem + rng.integers(0, 3, size=int(rng.integers(0, 6))).tolist())
        elif sim.seqs:
            seq = sim.seqs[r % len(sim.seqs)]
            if op == "extend":
                if not sim.extend(seq, int(rng.integers(0, 3))):
                    sim.drop(seq)                    # out of blocks: preempted by recompute
            elif op == "fork":
                sim.fork(seq)
            elif op == "drop":
                sim.drop(seq)
            elif op == "preempt":                    # free and re-admit its tokens (prefix hits)
                tokens = list(seq.token_ids)
                sim.drop(seq)
                sim.admit(tokens)
        sim.check()
    for s in list(sim.seqs):
        sim.drop(s)
    assert sim.bm.num_free_blocks == num_blocks and not any(sim.bm.ref_counts)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.tuples(st.sampled_from(["add", "add_n", "add_beam", "abort", "step"]),
                                 st.integers(0, 1 << 30)), min_size=1, max_size=40),
       num_blocks=st.integers(12, 40))
def test_engine_never_leaks_blocks(events, num_blocks):
    """Random arrivals, n > 1 forks, beams, aborts and completions through the whole engine."""
    model = FakeModel(vocab_size=40, max_position_embeddings=48, eos_bias=-1.0)
    engine = Engine(model, block_size=2, num_blocks=num_blocks, max_num_batched_tokens=10, max_num_seqs=6)
    live = []
    for ev, r in events:
        rng = np.random.default_rng(r)
        prompt = rng.integers(3, 8, size=int(rng.integers(1, 12))).tolist()
        if ev == "add":
            live.append(engine.add_request(prompt, SamplingParams(max_tokens=int(rng.integers(1, 8)), seed=r)))
        elif ev == "add_n":
            live.append(engine.add_request(prompt, SamplingParams(n=3, max_tokens=5, seed=r)))
        elif ev == "add_beam":
            live.append(engine.add_request(prompt, SamplingParams(beam_width=2, max_tokens=4)))
        elif ev == "abort" and live:
            engine.abort(live.pop(r % len(live)))
        else:
            engine.step()
        held = [b for s in engine.scheduler.running for b in s.block_table]
        assert sum(engine.block_manager.ref_counts) == len(held)
        assert all(not s.block_table for s in engine.scheduler.waiting)
    outs = engine.run_until_done()
    assert all(o.error is None for o in outs)
    assert engine.block_manager.num_free_blocks == num_blocks and not any(engine.block_manager.ref_counts)
