"""A small deterministic stand-in for a model, for engine tests (numpy only, no kernels).

Its logits at position p are a fixed pseudo-random function of the whole context (tokens 0..p),
and that context is read back *through the paged KV cache* using the step's block tables: the
cache stores (token id, position) per slot, every read checks the position, so a wrong block
table, slot mapping or a block overwritten while shared changes the logits (or fails loudly).
`reference_logits(tokens)` is the same function computed directly, for independent references.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np


class FakeTokenizer:
    """ids 0,1,2: <s>, </s>, <pad>; ids 3..258: single bytes; above: words " w<id>"."""

    bos_token_id = 0
    eos_token_ids = {1}
    _special = {0: b"<s>", 1: b"</s>", 2: b"<pad>"}

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def piece(self, i: int) -> bytes:
        if i in self._special:
            return self._special[i]
        return bytes([i - 3]) if i - 3 < 256 else f" w{i}".encode()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        if any(i >= self.vocab_size for i in ids):
            raise ValueError("text not representable in this fake vocabulary")
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = b"".join(b"" if (skip_special_tokens and int(i) in self._special) else self.piece(int(i)) for i in ids)
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeModel:
    def __init__(self, vocab_size: int = 300, max_position_embeddings: int = 256, scale: float = 2.0,
                 eos_bias: float = -4.0, seed: int = 1234):
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                      num_hidden_layers=1, num_key_value_heads=1, head_dim=2)
        self.tokenizer = FakeTokenizer(vocab_size)
        self.scale = scale
        self.eos_bias = eos_bias   # EOS (id 1) logit offset: negative makes stops rare
        self.seed = seed
        self.weight_bytes = 0
        self.cache = None
        self.block_size = None
        self.nan_token: int | None = None  # logits are NaN right after this token (error-path tests)
        self.raise_on_token: int | None = None
        self.batches = []                   # every StepBatch seen (scheduler tests)
        self.record = False

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size * 16

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cache = np.full((num_blocks * block_size, 2), -1, dtype=np.int64)  # (token, position)

    def reference_logits(self, tokens) -> np.ndarray:
        """Logits after the context `tokens` (a pure function of the token sequence)."""
        arr = np.asarray(tokens, dtype=np.int64)
        digest = hashlib.blake2b(arr.tobytes(), digest_size=8, key=self.seed.to_bytes(8, "little")).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        z = rng.standard_normal(self.config.vocab_size) * self.scale
        if self.config.vocab_size > 1:
            z[1] += self.eos_bias
        if self.nan_token is not None and arr[-1] == self.nan_token:
            z[:] = np.nan
        return z.astype(np.float32)

    def forward(self, batch) -> np.ndarray:
        if self.record:
            self.batches.append(batch)
        B = self.block_size
        assert batch.token_ids.dtype == np.int32 and batch.positions.dtype == np.int32
        assert batch.slot_mapping.dtype == np.int64 and batch.block_tables.dtype == np.int32
        T, S = batch.num_tokens, batch.num_seqs
        assert batch.cu_seqlens_q.shape == (S + 1,) and batch.cu_seqlens_q[-1] == T
        assert batch.block_tables.shape[0] == S
        if self.raise_on_token is not None and (batch.token_ids == self.raise_on_token).any():
            raise RuntimeError("fake kernel failure")
        assert (batch.slot_mapping >= 0).all() and (batch.slot_mapping < self.cache.shape[0]).all()
        # write k/v of the new tokens (the slots of one step are distinct)
        assert len(set(batch.slot_mapping.tolist())) == T, "two tokens written to one slot"
        self.cache[batch.slot_mapping, 0] = batch.token_ids
        self.cache[batch.slot_mapping, 1] = batch.positions
        seq_of_row = np.searchsorted(batch.cu_seqlens_q, np.arange(T), side="right") - 1
        out = np.empty((batch.logits_indices.shape[0], self.config.vocab_size), dtype=np.float32)
        for j, r in enumerate(batch.logits_indices.tolist()):
            s = seq_of_row[r]
            q_len = batch.cu_seqlens_q[s + 1] - batch.cu_seqlens_q[s]
            p = int(batch.positions[r])
            assert p == batch.context_lens[s] - q_len + (r - batch.cu_seqlens_q[s])
            pos = np.arange(p + 1)
            slots = batch.block_tables[s, pos // B].astype(np.int64) * B + pos % B
            ctx = self.cache[slots]
            assert (ctx[:, 1] == pos).all(), "the paged cache returned a token of another position"
            out[j] = self.reference_logits(ctx[:, 0])
        return out


def reference_greedy(model: FakeModel, prompt: list[int], max_tokens: int, eos: bool = True) -> list[int]:
    """Greedy decoding straight from reference_logits (no engine, no cache)."""
    toks = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = int(np.argmax(model.reference_logits(toks)))
        out.append(t)
        toks.append(t)
        if eos and t in model.tokenizer.eos_token_ids:
            break
    return out
