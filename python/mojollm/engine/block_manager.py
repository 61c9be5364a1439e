"""The paged KV-cache block pool: device-free bookkeeping of which sequence owns which block.

The model's KV cache is `num_blocks` blocks of `block_size` token rows. A sequence's token at
position p lives in block `block_table[p // block_size]`, row `p % block_size`, i.e. in slot
`block * block_size + row` (vLLM's slot_mapping).

- Allocation, free and lookup are O(1): a free list of never-cached blocks, an LRU dict of
  unreferenced blocks that still hold a cached prefix, and a hash -> block dict.
- Blocks are reference counted: forks (n > 1 samples, beams) share them.
- Copy-on-write: a sequence never writes into a block another sequence also references. The copy
  is made by recomputation: the sequence drops the shared partial block and runs its rows again
  into a fresh one (at most block_size - 1 tokens). That keeps the engine-model contract a single
  forward step (StepBatch) with no separate block-copy op.
- Prefix cache: every fully computed block is keyed by hash(parent block's hash, its token ids);
  a new sequence reuses the longest chain of cached blocks that matches its prompt. Unreferenced
  cached blocks stay cached until the free list runs dry, then the least recently used is evicted.
  Lookups verify the stored (parent hash, tokens), so a hash collision can never reuse wrong KV.
"""

from __future__ import annotations

from collections import OrderedDict

from mojollm.engine.sequence import Sequence


def block_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # stack: block 0 handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()      # cached, unreferenced; LRU first
        self._hash_to_block: dict[int, int] = {}
        self._block_key: dict[int, tuple[int, int | None, tuple[int, ...]]] = {}  # block -> (hash, parent, tokens)
        # prefix-cache counters (tokens), counted when a sequence is admitted
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # ---------------------------------------------------------------- pool state
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_key.clear()

    def _take_free_block(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently used cached block
            self._uncache(b)
            self.num_evictions += 1
        assert self.ref_counts[b] == 0
        self.ref_counts[b] = 1
        return b

    def _uncache(self, b: int) -> None:
        key = self._block_key.pop(b, None)
        if key is not None and self._hash_to_block.get(key[0]) == b:
            del self._hash_to_block[key[0]]

    def _decref(self, b: int) -> None:
        rc = self.ref_counts[b] - 1
        assert rc >= 0, f"block {b} freed twice"
        self.ref_counts[b] = rc
        if rc == 0:
            if b in self._block_key:
                self._evictable[b] = None  # most recently used end
            else:
                self._free.append(b)

    def _incref(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            self._evictable.pop(b)  # a cache hit on an unreferenced block: it leaves the LRU
        self.ref_counts[b] += 1

    # ---------------------------------------------------------------- hashing
    def _update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to every full block of its tokens (tokens only ever append)."""
        bs = self.block_size
        hashes = seq.block_hashes
        n_full = seq.num_tokens // bs
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), n_full):
            parent = block_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)

    def _lookup(self, seq: Sequence, i: int) -> int | None:
        h = seq.block_hashes[i]
        b = self._hash_to_block.get(h)
        if b is None:
            return None
        _, parent, tokens = self._block_key[b]
        bs = self.block_size
        want_parent = seq.block_hashes[i - 1] if i else None
        if parent != want_parent or tokens != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
            return None  # hash collision: not the same prefix
        return b

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix of a sequence that holds no blocks yet.

        At most (num_tokens - 1) tokens are reused, so at least one token is run and yields the
        logits of the next token; a fully cached last block is recomputed into a fresh block
        rather than written in place.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        self._update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for i in range(max_blocks):
            b = self._lookup(seq, i)
            if b is None:
                break
            hits.append(b)
        return hits

    # ---------------------------------------------------------------- allocation
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, num_hits: int = 0) -> int:
        total = -(-(seq.num_kv_tokens + num_hits * self.block_size + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table) - num_hits)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Give `seq` blocks for its next `num_new_tokens` tokens; all or nothing.

        `computed_blocks` (from get_computed_blocks, only for a sequence with no blocks) become the
        head of its block table and count as computed tokens.
        """
        hits = computed_blocks or []
        if hits:
            assert not seq.block_table and seq.num_computed_tokens == 0
        new = self.blocks_needed(seq, num_new_tokens, len(hits))
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits that leave the free pool
        if new + revived > self.num_free_blocks:
            return False
        for b in hits:
            self._incref(b)
        if hits:
            seq.block_table.extend(hits)
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.num_registered_blocks = len(hits)
        for _ in range(new):
            seq.block_table.append(self._take_free_block())
        return True

    def count_admission(self, seq: Sequence, num_hit_blocks: int) -> None:
        """Prefix-cache counters: a sequence asked for its prompt and got num_hit_blocks blocks."""
        if self.enable_prefix_caching:
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += num_hit_blocks * self.block_size

    def needs_copy_on_write(self, seq: Sequence) -> bool:
        """The next token would be written into a partial block another sequence also uses."""
        if seq.num_kv_tokens % self.block_size == 0 or not seq.block_table:
            return False
        return self.ref_counts[seq.block_table[-1]] > 1

    def copy_on_write(self, seq: Sequence) -> int:
        """Drop the shared partial last block; its rows will be recomputed into a fresh block.

        Returns the number of tokens the sequence must run again.
        """
        redo = seq.num_kv_tokens % self.block_size  # the newest rows (the cache keeps position order)
        self._decref(seq.block_table.pop())  # still referenced by the other sequence: never freed here
        seq.num_computed_tokens -= redo
        return redo

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (parent.fork()) shares every block of `parent`."""
        child.block_table = list(parent.block_table)
        for b in child.block_table:
            self.ref_counts[b] += 1

    def free(self, seq: Sequence, uncache: bool = False) -> None:
        """Release a sequence's blocks (tail first, so a cached prefix outlives its tail in the LRU).

        `uncache`: blocks nobody else holds also leave the prefix cache (their KV is not trusted)."""
        for b in reversed(seq.block_table):
            if uncache and self.ref_counts[b] == 1:
                self._uncache(b)
            self._decref(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_evicted_tokens = 0
        seq.kv_positions = seq.kv_scores = None
        seq.kv_copies = []

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's computed tokens (slots of rejected speculative
        drafts: they were never offered to the prefix cache)."""
        keep = -(-seq.num_kv_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._decref(seq.block_table.pop())

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache (after a step ran them)."""
        if not self.enable_prefix_caching or seq.num_evicted_tokens:
            return  # after an eviction block i no longer holds positions [i*B, (i+1)*B)
        n_full = seq.num_computed_tokens // self.block_size
        if n_full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, n_full):
            b = seq.block_table[i]
            h = seq.block_hashes[i]
            if b in self._block_key or h in self._hash_to_block:
                continue  # already cached (a hit), or the same prefix is cached in another block
            self._hash_to_block[h] = b
            self._block_key[b] = (h, seq.block_hashes[i - 1] if i else None,
                                  tuple(seq.token_ids[i * bs:(i + 1) * bs]))
        seq.num_registered_blocks = n_full

    # ---------------------------------------------------------------- eviction (engine/kv_policy.py)
    def drop_block(self, seq: Sequence, index: int) -> None:
        """Take block `index` out of the sequence's table (its rows were evicted); a block another
        sequence or the prefix cache still holds stays theirs."""
        self._decref(seq.block_table.pop(index))

    def compact(self, seq: Sequence, keep) -> bool:
        """Keep only the cache rows `keep` (ascending indices) of `seq`, moved down to rows
        0..len(keep)-1 in order; the blocks past them are released. The moves are appended to
        seq.kv_copies as (src_slots, dst_slots): the runner performs them before the next forward,
        every source read before any destination is written. A block that gets written (a row
        moves into it, or it is the new partial last block) and that another sequence holds is
        copied to a fresh block first (copy-on-write); one registered in the prefix cache is
        copied too while blocks are free, else it leaves the prefix cache. False (nothing done)
        when the pool cannot give the copies of the shared blocks."""
        bs = self.block_size
        old = list(seq.block_table)
        m = len(keep)
        n_blocks = -(-m // bs)
        moved = {i // bs for i in range(m) if keep[i] != i}
        written = sorted(moved | ({n_blocks - 1} if m % bs else set()))
        trailing = old[n_blocks:]
        freed = sum(1 for b in trailing if self.ref_counts[b] == 1)
        shared = sum(1 for j in written if self.ref_counts[old[j]] > 1)
        spare = self.num_free_blocks + freed - shared
        if spare < 0:
            return False
        for b in reversed(trailing):  # released first: their rows are read before any write
            self._decref(b)
        table = old[:n_blocks]
        src: list[int] = []
        dst: list[int] = []
        for j in written:
            b = old[j]
            cached = b in self._block_key
            fresh = self.ref_counts[b] > 1 or (cached and spare > 0)
            if fresh:
                if self.ref_counts[b] == 1:
                    spare -= 1
                nb = self._take_free_block()
                self._decref(b)  # still held by the other sequence, or cached and evictable
                table[j] = nb
            elif cached:
                self._uncache(b)  # ours alone and no block to spare: its hash would lie
            for r in range(bs):
                i = j * bs + r
                if i >= m:
                    break
                if fresh or keep[i] != i:
                    k = int(keep[i])
                    src.append(old[k // bs] * bs + k % bs)
                    dst.append(table[j] * bs + r)
        seq.block_table = table
        if src:
            seq.kv_copies.append((src, dst))
        return True

    def slot(self, seq: Sequence, position: int) -> int:
        i = position - seq.num_evicted_tokens  # the cache index of that (not evicted) position
        return seq.block_table[i // self.block_size] * self.block_size + i % self.block_size
