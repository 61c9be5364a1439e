"""The plan of one forward step, handed by the engine to the model (the only contract between them).

The engine flattens every scheduled sequence's new tokens into one batch (vLLM's layout):

    token_ids     [T] int32   new tokens of all sequences, sequence after sequence
    positions     [T] int32   their positions in their sequences
    slot_mapping  [T] int64   KV-cache slot each new token's k/v is written to (block * B + row)
    block_tables  [S, M] int32  each sequence's block ids (padded with 0 past its length)
    context_lens  [S] int32   tokens in the cache for each sequence once this step has written
    cu_seqlens_q  [S+1] int32 prefix sums of new tokens per sequence
    logits_indices [L] int32  rows of the T tokens whose logits the step returns
    is_decode     bool        every sequence has exactly one new token (the decode kernel runs)
    kv_mass_seqs  [K] int32 or None  sequences whose attention mass per cache row the step also
                  returns (the h2o KV policy; engine/kv_policy.py)

Under a KV policy that evicted tokens, a sequence's cache rows are no longer its positions:
context_lens counts the rows, slot_mapping places the new tokens after them, and positions stay
the tokens' own (RoPE); the kept rows keep position order, so causal masks by row still hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepBatch:
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    cu_seqlens_q: np.ndarray
    logits_indices: np.ndarray
    is_decode: bool
    kv_mass_seqs: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @classmethod
    def single_sequence(cls, token_ids, start_pos: int, block_table, block_size: int,
                        all_logits: bool = False) -> "StepBatch":
        """One sequence whose tokens `token_ids` start at position `start_pos` (tests, scoring)."""
        ids = np.asarray(token_ids, dtype=np.int32)
        n = ids.shape[0]
        pos = np.arange(start_pos, start_pos + n, dtype=np.int32)
        table = np.asarray(block_table, dtype=np.int32)
        slots = table[pos // block_size].astype(np.int64) * block_size + pos % block_size
        return cls(
            token_ids=ids,
            positions=pos,
            slot_mapping=slots,
            block_tables=table[None, :],
            context_lens=np.array([start_pos + n], dtype=np.int32),
            cu_seqlens_q=np.array([0, n], dtype=np.int32),
            logits_indices=np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], dtype=np.int32),
            is_decode=(n == 1),
        )

    def padded_decode(self, num_seqs: int, table_width: int, scratch_block: int, block_size: int) -> "StepBatch":
        """This decode step grown to `num_seqs` sequences and block tables `table_width` wide, so
        that it fits a graph captured for that shape. Padding sequences hold one token at position
        0 in `scratch_block` (a KV block no sequence owns: they write and read only it); every row
        keeps its logits, the real ones first."""
        S = self.num_seqs
        if not self.is_decode or num_seqs < S or table_width < self.block_tables.shape[1]:
            raise ValueError(f"cannot pad a step of {S} sequences (decode: {self.is_decode}) to {num_seqs}")
        pad = num_seqs - S
        tables = np.zeros((num_seqs, table_width), dtype=np.int32)
        tables[:S, :self.block_tables.shape[1]] = self.block_tables
        tables[S:, 0] = scratch_block
        return StepBatch(
            token_ids=np.concatenate([self.token_ids, np.zeros(pad, np.int32)]),
            positions=np.concatenate([self.positions, np.zeros(pad, np.int32)]),
            slot_mapping=np.concatenate([self.slot_mapping, np.full(pad, scratch_block * block_size, np.int64)]),
            block_tables=tables,
            context_lens=np.concatenate([self.context_lens, np.ones(pad, np.int32)]),
            cu_seqlens_q=np.arange(num_seqs + 1, dtype=np.int32),
            logits_indices=np.arange(num_seqs, dtype=np.int32),
            is_decode=True,
        )
