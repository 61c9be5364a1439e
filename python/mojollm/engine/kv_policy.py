"""KV-cache compression policies: which of a sequence's cached K/V rows to keep (device-free).

    full         keep everything (no policy object: today's engine)
    sink-window  StreamingLLM (Xiao et al. 2023): the first `sinks` tokens (attention sinks, rounded
                 up to whole blocks) and the most recent tokens, within `budget`. Whole blocks that
                 fell out of the window leave the block table (no copy); a sequence may then run
                 past max_model_len with bounded memory (streaming).
    h2o          Heavy-Hitter Oracle (Zhang et al. 2023): a recent window (half the budget) plus the
                 tokens with the largest accumulated attention mass (summed over layers, heads and
                 every query row since the token entered the cache). Eviction compacts the kept
                 rows down inside the sequence's block table (Backend.copy_kv_rows) and frees the
                 trailing blocks.

Budget: an integer is tokens; a float in (0, 1) is that fraction of the sequence's length so far
(prompt plus generated tokens), clamped to [the policy's minimum, max_model_len].

Cache index vs position. Evicted tokens make a sequence's cached rows non-contiguous in position:
`seq.num_evicted_tokens` tokens were dropped, the cache holds `seq.num_kv_tokens` rows, and the
kept rows stay in position order (cache index i < j <=> position_i < position_j). K is stored
after RoPE at its original position, so the attention kernels need only the row count
(context_lens) and that order: a new token at position p goes to cache index p - num_evicted,
and query i of a chunk sees every cached row plus the chunk's earlier tokens, as before.
Eviction runs between steps (in the scheduler, before the step's slots are allocated); the rows
an H2O compaction moves are returned as (src_slots, dst_slots) copies that run before the step's
forward, all sources read before any destination is written.

Prefix cache: blocks stop being offered once a sequence has evicted (their rows no longer match
hash(position block)); a block another sequence holds, or one registered in the prefix cache, is
never written: a compaction that would write into it copies it to a fresh block first (a cached
block of ours with no free block to copy into leaves the prefix cache instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mojollm.engine.sequence import Sequence

POLICIES = ("full", "sink-window", "h2o")
DEFAULT_SINKS = 4


def parse_budget(value) -> int | float | None:
    """'1024' / 1024 -> 1024 tokens; '0.2' / 0.2 -> a fraction of the sequence length; None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"kv_budget must be a token count or a fraction in (0, 1), got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"kv_budget must be a token count or a fraction in (0, 1), got {text!r}") from None
    if isinstance(value, (int, np.integer)):
        if value < 1:
            raise ValueError(f"kv_budget must be >= 1 token, got {value}")
        return int(value)
    if isinstance(value, (float, np.floating)):
        if value.is_integer() and value >= 1:
            return int(value)
        if not 0.0 < value < 1.0:
            raise ValueError(f"kv_budget as a fraction must lie in (0, 1), got {value}")
        return float(value)
    raise ValueError(f"kv_budget must be a token count or a fraction in (0, 1), got {value!r}")


@dataclass
class KVPolicy:
    name: str                  # "sink-window" | "h2o"
    budget: int | float        # tokens, or a fraction of the sequence length
    block_size: int
    max_model_len: int
    sinks: int = DEFAULT_SINKS

    @classmethod
    def of(cls, policy, budget, block_size: int, max_model_len: int, sinks: int | None = None) -> "KVPolicy | None":
        """The policy object for engine arguments (None for "full"); ValueError (one line) otherwise."""
        name = "full" if policy is None else str(policy).strip().lower().replace("_", "-")
        if name not in POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        budget = parse_budget(budget)
        if name == "full":
            if budget is not None:
                raise ValueError("kv_budget needs kv_policy sink-window or h2o (full keeps every token)")
            if sinks is not None:
                raise ValueError("kv_sinks needs kv_policy sink-window")
            return None
        if sinks is not None and name != "sink-window":
            raise ValueError("kv_sinks needs kv_policy sink-window")
        sinks = DEFAULT_SINKS if sinks is None else sinks
        if isinstance(sinks, bool) or not isinstance(sinks, (int, np.integer)) or sinks < 0:
            raise ValueError(f"kv_sinks must be an integer >= 0, got {sinks!r}")
        if budget is None:
            if name == "h2o":
                raise ValueError("kv_policy h2o needs kv_budget (tokens, or a fraction such as 0.2)")
            budget = max_model_len  # StreamingLLM with a cache as large as the context
        p = cls(name, budget, block_size, max_model_len, int(sinks))
        if isinstance(budget, int):
            if budget < p.min_budget:
                raise ValueError(p._too_small(budget))
            if name == "sink-window" and budget > max_model_len:
                raise ValueError(f"kv_budget ({budget}) exceeds max_model_len ({max_model_len}): the window "
                                 f"must fit the context")
        elif p.min_budget > max_model_len:
            raise ValueError(f"max_model_len ({max_model_len}) is smaller than kv_policy {name}'s least budget "
                             f"({p.min_budget} tokens)")
        return p

    # ---------------------------------------------------------------- sizes
    @property
    def sink_tokens(self) -> int:
        """Sinks rounded up to whole blocks (sink-window): what stays of a sequence's start."""
        return -(-self.sinks // self.block_size) * self.block_size if self.name == "sink-window" else 0

    @property
    def min_budget(self) -> int:
        """sink-window: the sinks plus one block (a new token always fits after eviction);
        h2o: two blocks (a block is evicted at a time, at least one block is kept)."""
        return self.sink_tokens + self.block_size if self.name == "sink-window" else 2 * self.block_size

    def _too_small(self, budget: int) -> str:
        if self.name == "sink-window":
            return (f"kv_budget ({budget} tokens) is smaller than the {self.sinks} sink tokens (rounded up to "
                    f"{self.sink_tokens}, whole blocks) plus one block of {self.block_size}: at least {self.min_budget}")
        return f"kv_budget ({budget} tokens) is smaller than two blocks of {self.block_size}: at least {self.min_budget}"

    @property
    def streams(self) -> bool:
        """Whether a sequence may run past max_model_len (bounded memory): sink-window only."""
        return self.name == "sink-window"

    @property
    def needs_attention_mass(self) -> bool:
        return self.name == "h2o"

    def budget_for(self, seq: Sequence) -> int:
        """This sequence's budget now, in tokens."""
        if isinstance(self.budget, int):
            return min(self.budget, self.max_model_len) if self.name == "h2o" else self.budget
        want = math.ceil(self.budget * seq.num_tokens)
        return max(self.min_budget, min(want, self.max_model_len))

    def admission_cap(self, seq: Sequence, hits: list[int], n: int) -> tuple[list[int], int]:
        """A (re)admitted sequence holds no blocks: keep its prefix hits and first chunk within
        the budget (no eviction at admission; later chunks evict between steps)."""
        N = self.budget_for(seq)
        bs = self.block_size
        hits = hits[:max(0, (N - 1) // bs)]
        n = min(n, seq.num_tokens - len(hits) * bs, N - len(hits) * bs)
        if self.name == "h2o":
            n = min(n, N - bs)
        return hits, max(1, n)

    # ---------------------------------------------------------------- eviction
    def make_room(self, seq: Sequence, n: int, bm) -> int | None:
        """Evict from `seq` (between steps) so that its cache rows plus its `n` new tokens fit the
        budget; returns how many new tokens it may run (<= n), or None when an H2O compaction
        needs copy-on-write blocks that the pool lacks (the scheduler preempts, then asks again).
        Sink-window drops whole blocks; H2O compacts and records the row copies in seq.kv_copies."""
        N = self.budget_for(seq)
        E = seq.num_kv_tokens
        if E + n <= N:
            return n
        if self.name == "sink-window":
            return self._drop_window_blocks(seq, n, N, bm)
        return self._h2o_compact(seq, n, N, bm)

    def _drop_window_blocks(self, seq: Sequence, n: int, N: int, bm) -> int:
        bs = self.block_size
        first = self.sink_tokens // bs  # table index of the oldest window block
        E = seq.num_kv_tokens
        while E + n > N and E - first * bs >= bs and len(seq.block_table) > first:
            bm.drop_block(seq, first)  # full, out of the window: the whole block goes
            seq.num_evicted_tokens += bs
            E -= bs
        return max(1, min(n, N - E))

    def _h2o_compact(self, seq: Sequence, n: int, N: int, bm) -> int | None:
        bs = self.block_size
        n = max(1, min(n, N - bs))
        m = N - max(n, bs)  # rows kept: a block's worth (or the chunk) of room, so one eviction per block
        pos, scores = self.state(seq)
        E = pos.shape[0]
        if E <= m:
            return n
        keep = h2o_keep(pos, scores, m, N // 2)
        if not bm.compact(seq, keep):
            return None  # the pool cannot give the copy-on-write blocks of shared rows now
        seq.kv_positions = pos[keep]
        seq.kv_scores = scores[keep]
        seq.num_evicted_tokens += E - m
        return n

    # ---------------------------------------------------------------- h2o scores
    def state(self, seq: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(positions [E] int64, accumulated attention mass [E] float64) of the cache rows."""
        E = seq.num_kv_tokens
        pos, sc = seq.kv_positions, seq.kv_scores
        if pos is None:
            assert seq.num_evicted_tokens == 0, "an evicting sequence lost its positions"
            pos, sc = np.arange(E, dtype=np.int64), np.zeros(E, dtype=np.float64)
        elif pos.shape[0] != E:  # rows recomputed (copy-on-write): they come back with this step
            assert pos.shape[0] > E
            pos, sc = pos[:E], sc[:E]
        seq.kv_positions, seq.kv_scores = pos, sc
        return pos, sc

    def after_step(self, seq: Sequence, num_new: int, mass: np.ndarray | None) -> None:
        """The step wrote `num_new` rows of `seq` (step_done has counted them); `mass` [rows in the
        cache] is the attention they received this step (summed over layers, heads, query rows)."""
        E = seq.num_kv_tokens
        before = E - num_new
        pos, sc = seq.kv_positions, seq.kv_scores
        if pos is None:
            pos, sc = np.arange(before, dtype=np.int64), np.zeros(before, dtype=np.float64)
        p0 = seq.num_computed_tokens - num_new
        pos = np.concatenate([pos[:before], np.arange(p0, p0 + num_new, dtype=np.int64)])
        sc = np.concatenate([sc[:before], np.zeros(num_new, dtype=np.float64)])
        if mass is not None:
            sc += np.asarray(mass, dtype=np.float64)[:E]
        seq.kv_positions, seq.kv_scores = pos, sc


def h2o_keep(positions: np.ndarray, scores: np.ndarray, m: int, recent: int) -> np.ndarray:
    """Indices (ascending) of the m rows H2O keeps: the min(recent, m) newest by position, then
    the highest accumulated scores among the rest (ties: the newer token)."""
    E = positions.shape[0]
    r = min(recent, m)
    order = np.argsort(positions, kind="stable")
    recent_idx = order[E - r:] if r else order[:0]
    rest = order[:E - r]
    # highest score first, newer position first among equal scores
    ranked = rest[np.lexsort((-positions[rest], -scores[rest]))]
    return np.sort(np.concatenate([recent_idx, ranked[:m - r]]))
