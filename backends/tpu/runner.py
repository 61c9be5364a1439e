"""The tpu backend's model runner: every step is one jitted XLA program over donated KV caches.

    program(weights, kv caches (donated), token ids, positions, slots, block tables, context lens,
            cu_seqlens_q, logits rows) -> (logits [rows, V], greedy tokens [rows], new kv caches)

The program is the model's own compute_logits traced on jax arrays (the backend's ops inline into
it), so XLA sees the whole step: it fuses across ops and layers, scatters the new k/v into the
donated caches in place, and no Python runs between ops. Per step, the host pads the StepBatch to
its bucket, dispatches once and reads back the tokens (and the host rows' logits).

XLA compiles once per input shape, so every step is padded to a bucket:
  decode (every sequence one new token)   (batch, block-table width), like the cuda runner's graphs:
        batch 1, 2, 4, ..., max_num_seqs; width 1, 2, 4, ... blocks, then the longest context's
        (StepBatch.padded_decode). Padding rows decode token 0 at position 0. The jnp attention
        gathers every column of the table, so widths start at one block (the cuda runner's start
        at 256 tokens: 16 blocks instead of 8 made a batch-8 decode step of the default model 7%
        slower on XLA:CPU, a 32-token prefill's attention 8x larger).
  prefill / mixed steps                   tokens: a power of two >= 16; sequences and width: as
        decode; static too: the prefill query window (a power of two >= the longest run of new
        tokens of a sequence, backend.prefill_window) and the logits rows (a power of two <= tokens,
        or none). Padding tokens belong to no sequence; padding sequences have no tokens and an
        empty context.
Padding writes only the scratch block: one KV block past the engine's pool, allocated here
(num_blocks + 1), that no sequence owns. Compilations are bounded by the product of the bucket
counts, each logarithmic in its range; XLA's persistent compilation cache keeps them across runs.

Sampling: rows the engine lets the device sample (device_rows) whose request is greedy
(temperature 0) are argmaxed in the program (lowest id on ties, like the host sampler;
TOKEN_NOT_FINITE when the row holds NaN/+inf). Every other row comes back as float32 logits.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import partial

import numpy as np

from mojollm.backends.tpu.backend import CacheTensor, CuSeqlens, check_step, prefill_window
from mojollm.engine.runner import (TOKEN_HOST, TOKEN_NOT_FINITE, ModelRunner, StepOutput, batch_buckets, bucket_for,
                                   width_buckets)
from mojollm.engine.step import StepBatch

_MIN_TOKENS = 16          # smallest token bucket of a prefill step


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n; past the last one, the next power of two."""
    return bucket_for(n, buckets) or _pow2(n)


class TpuRunner(ModelRunner):
    samples_on_device = True
    layer_subsets = False  # one jitted program per step shape, all layers (no self-speculative drafts)

    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        super().__init__(model, max_num_seqs, max_model_len)
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.vocab_size = int(model.config.vocab_size)
        self._programs: dict = {}

    # ---------------------------------------------------------------- KV cache and weights
    def allocate_kv_cache(self, num_blocks: int, block_size: int, progress=None) -> None:
        if (num_blocks + 1) * block_size > np.iinfo(np.int32).max:
            raise ValueError(f"{num_blocks} blocks of {block_size} tokens exceed int32 slot numbers")
        self.model.allocate_kv_cache(num_blocks + 1, block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks   # padding writes here and nowhere else
        self.max_blocks = max(1, math.ceil(self.max_model_len / block_size))
        self.batch_buckets = batch_buckets(self.max_num_seqs)
        self.width_buckets = width_buckets(self.max_blocks)
        self._weights, self._template = _split_arrays(self.model)

    def _caches(self) -> list:
        return [c.array for kv in self.model.kv_caches for c in kv]

    def num_compilations(self) -> int:
        """Programs compiled so far (one per distinct padded shape and static key)."""
        return sum(p._cache_size() for p in self._programs.values())

    # ---------------------------------------------------------------- the program
    def _program(self, key):
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self.jax.jit(partial(self._step, *key), donate_argnums=(1,))
        return program

    def _step(self, is_decode, q_window, want_rows, weights, caches, ids, positions, slots, tables, lens, cu, rows):
        """The traced step: the model bound to traced weights and caches, then greedy argmax."""
        jnp = self.jnp
        m = copy.copy(self.model)
        for name, template in self._template.items():
            setattr(m, name, _rebuild(template, weights))
        it = iter(caches)
        m.kv_caches = [(CacheTensor(next(it), k.kv_dtype), CacheTensor(next(it), v.kv_dtype))
                       for k, v in self.model.kv_caches]
        logits = m.compute_logits(ids, positions, slots, tables, lens, cu if is_decode else CuSeqlens(cu, q_window),
                                  is_decode, (... if is_decode else rows) if want_rows else None)
        new_caches = [c.array for kv in m.kv_caches for c in kv]
        if logits is None:
            return None, None, new_caches
        finite = jnp.max(logits, axis=1) < jnp.inf   # NaN compares False
        tokens = jnp.where(finite, jnp.argmax(logits, axis=1).astype(jnp.int32), TOKEN_NOT_FINITE)
        return logits, tokens, new_caches

    # ---------------------------------------------------------------- the step
    def execute(self, batch: StepBatch, device_rows=None, layers=None) -> StepOutput:
        if layers is not None:  # a program per layer subset is not built here
            raise ValueError("the tpu runner compiles the whole model: speculative method 'self' "
                             "(a subset of layers) is not supported on the tpu backend")
        self.model._check_batch(batch)
        check_step(batch, self.num_blocks, self.block_size)
        S, L = batch.num_seqs, batch.logits_indices.shape[0]
        width = bucket(max(batch.block_tables.shape[1], 1), self.width_buckets)
        if batch.is_decode:
            p = batch.padded_decode(bucket(S, self.batch_buckets), width, self.scratch_block, self.block_size)
            key = (True, 0, L > 0)
            args = (p.token_ids, p.positions, p.slot_mapping.astype(np.int32), p.block_tables, p.context_lens,
                    p.cu_seqlens_q, None)
            out_rows = batch.logits_indices          # the program returns every (padded) row
        else:
            args, q_window = self._pad_prefill(batch, bucket(S, self.batch_buckets), width)
            key = (False, q_window, L > 0)
            out_rows = np.arange(L)                  # the program returns the logits rows, padded
        logits, tokens, new_caches = self._program(key)(self._weights, self._caches(), *args)
        it = iter(new_caches)
        for k, v in self.model.kv_caches:
            k.array, v.array = next(it), next(it)
        self.model.backend._last = new_caches   # what backend.synchronize() waits for
        if logits is None:
            return StepOutput(tokens=None, logits=np.zeros((0, self.vocab_size), np.float32))
        out = np.asarray(tokens)[out_rows]
        host = [r for r in range(L) if device_rows is None or device_rows[r] is None
                or device_rows[r].request.params.temperature != 0.0]
        out[host] = TOKEN_HOST
        host_logits = (np.asarray(logits)[out_rows[host]].astype(np.float32, copy=False) if host
                       else np.zeros((0, self.vocab_size), np.float32))
        return StepOutput(tokens=out, logits=host_logits)

    def _pad_prefill(self, batch: StepBatch, num_seqs: int, width: int):
        """The step's arrays padded to (tokens, sequences, width, rows) buckets, and its query window."""
        T, S, L = batch.num_tokens, batch.num_seqs, batch.logits_indices.shape[0]
        tb = max(_MIN_TOKENS, _pow2(T))
        ids, positions = np.zeros(tb, np.int32), np.zeros(tb, np.int32)
        ids[:T], positions[:T] = batch.token_ids, batch.positions
        slots = np.full(tb, self.scratch_block * self.block_size, np.int32)
        slots[:T] = batch.slot_mapping
        tables = np.full((num_seqs, width), self.scratch_block, np.int32)
        tables[:S, :batch.block_tables.shape[1]] = batch.block_tables
        lens = np.zeros(num_seqs, np.int32)
        lens[:S] = batch.context_lens
        cu = np.full(num_seqs + 1, T, np.int32)
        cu[:S + 1] = batch.cu_seqlens_q
        rows = np.zeros(min(_pow2(L), tb) if L else 0, np.int32)
        rows[:L] = batch.logits_indices
        return (ids, positions, slots, tables, lens, cu, rows), prefill_window(np.diff(batch.cu_seqlens_q).max(), tb)


# ---- the model's jax arrays, as program arguments ----
def _split_arrays(model):
    """(arrays, templates): every jax array the model holds (weights, rope table), KV caches
    excepted, found through its attributes, dataclasses, lists and tuples; `_rebuild` puts other
    arrays (the program's tracers) in their places."""
    import jax

    arrays: list = []

    def walk(o):
        if isinstance(o, jax.Array):
            arrays.append(o)
            return ("array", len(arrays) - 1)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            fields = {f.name: walk(getattr(o, f.name)) for f in dataclasses.fields(o)}
            fields = {k: t for k, t in fields.items() if t is not None}
            return ("dataclass", o, fields) if fields else None
        if isinstance(o, (list, tuple)):
            items = [walk(x) for x in o]
            return ("sequence", o, items) if any(t is not None for t in items) else None
        return None

    templates = {}
    for name, value in vars(model).items():
        if name != "kv_caches" and (t := walk(value)) is not None:
            templates[name] = t
    return tuple(arrays), templates


def _rebuild(template, arrays):
    kind, *rest = template
    if kind == "array":
        return arrays[rest[0]]
    if kind == "dataclass":
        obj, fields = rest
        return dataclasses.replace(obj, **{k: _rebuild(t, arrays) for k, t in fields.items()})
    seq, items = rest
    return type(seq)(x if t is None else _rebuild(t, arrays) for x, t in zip(seq, items))
