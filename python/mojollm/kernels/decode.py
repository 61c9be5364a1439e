"""Every layer of a decode step in one Mojo call (mojo/decode.mojo), for the cpu backend.

    program = DecodeProgram.for_model(model, max_seqs)  # None when the model has no fused path
    hidden, logits = program.run(batch)  # final-normed hidden states [S, hidden], logits [S, vocab] or None

Between per-op calls from Python the Mojo workers fall asleep and waking them costs 200-400 us,
so the per-op path keeps small matrices on one core; one call per step keeps every core busy
(a team of threads shares out every op) and drops the Python glue between ops. The LM head
runs inside the call when its weight is a supported block format; the embedding lookup and
the first norm stay per-op calls.

Supported: Llama-family layers whose projections are GGUF blocks (Q4_0 / Q4_1 / Q8_0 / Q5_0 /
Q5_1 / Q2_K..Q6_K, not repacked for Modular's kernel) or FP8 E4M3 blocks, q/k/v fused or
apart, gate/up fused (as LlamaModel builds them), no attention bias, and a KV cache of any of
mojollm.kv_dtypes' types (the step writes and reads it with attention.mojo's kernels). Anything
else runs the per-op path (`unsupported_reason` says why).
"""

from __future__ import annotations

import numpy as np

from mojollm.engine.step import StepBatch
from mojollm.kernels import attention
from mojollm.kernels.build import kernel_loader
from mojollm.kernels.quant import TYPE_CODES, QuantLinear, default_dot

_kernels = kernel_loader("decode")
# the block formats decode.mojo dispatches (quant.mojo's and kquant.mojo's matmuls)
_CODES = {t: TYPE_CODES[t] for t in ("Q4_0", "Q4_1", "Q8_0", "W8A8", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                     "Q6_K", "F8_E4M3")}
_HEADER = 17
TEAM_BYTES = 256 << 10  # weight bytes of one layer per team thread, at least
_LAYER_FIELDS = 16


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the fused decode step (None when it can)."""
    c = model.config
    if getattr(model.backend, "name", None) != "cpu":
        return "not on the cpu backend"
    if c.attention_bias:
        return "attention bias"
    if model.kv_dtype not in attention.KV_CODES:
        return f"{model.kv_dtype} KV cache"
    for i, layer in enumerate(model.layers):
        projections = [(name, getattr(layer, name)) for name in ("qkv", "o_proj", "gate_up", "down")]
        if layer.qkv is None:  # q, k, v kept apart (their types differ)
            projections[0:1] = [("q", layer.q_k_v[0]), ("k", layer.q_k_v[1]), ("v", layer.q_k_v[2])]
        for name, w in projections:
            if not isinstance(w, QuantLinear) or w.qtype not in _CODES:
                kind = type(w).__name__ if not isinstance(w, QuantLinear) else w.qtype
                return f"layer {i} {name} is {kind} (fused decode takes {', '.join(_CODES)})"
            if w._packed:
                return f"layer {i} {name} is repacked for Modular's int8 kernel (per-op only)"
    return None


class DecodeProgram:
    def __init__(self, model, max_seqs: int = 1, team: bool = True, layers: list[int] | None = None):
        """team=False runs every op alone on the calling thread with its kernel's own threads
        (the layout before the worker team; tests compare both). layers: run only these layers,
        in order, then the final norm and the LM head (a self-speculative draft)."""
        c = model.config
        self.model = model
        self.layers = list(range(len(model.layers))) if layers is None else list(layers)
        self.hidden, self.h, self.kvh, self.d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.f = c.intermediate_size
        self.eps, self.scale = float(c.rms_norm_eps), float(model.scale)
        self._arrays = []  # everything whose address the program holds stays alive here
        rot = int(np.asarray(model.cos_sin).shape[1])
        table = [len(self.layers), self.hidden, self.h, self.kvh, self.d, self.f, rot, int(c.rope_neox),
                 self._addr(model.final_norm), self._addr(model.cos_sin), model.block_size,
                 self._team_threads(model) if team else 1,
                 default_dot()]
        head = model.lm_head
        self.fused_head = isinstance(head, QuantLinear) and head.qtype in _CODES and not head._packed
        table += [head._addr, _CODES[head.qtype], head.out_features] if self.fused_head else [0, 0, 0]
        table += [attention.KV_CODES[model.kv_dtype]]
        assert len(table) == _HEADER
        self.vocab = head.out_features if self.fused_head else 0
        for i in self.layers:
            layer = model.layers[i]
            k_cache, v_cache = model.kv_caches[i]
            q, k, v = (layer.qkv, None, None) if layer.qkv is not None else layer.q_k_v[:3]
            table += [self._addr(layer.attn_norm), q._addr, _CODES[q.qtype],
                      layer.o_proj._addr, _CODES[layer.o_proj.qtype], self._addr(layer.mlp_norm),
                      layer.gate_up._addr, _CODES[layer.gate_up.qtype], layer.down._addr,
                      _CODES[layer.down.qtype], self._addr(k_cache), self._addr(v_cache),
                      k._addr if k is not None else 0, _CODES[k.qtype] if k is not None else 0,
                      v._addr if v is not None else 0, _CODES[v.qtype] if v is not None else 0]
        self.table = np.array(table, dtype=np.int64)
        self.buffers = self._step_buffers(max_seqs)

    def _step_buffers(self, rows: int) -> dict[str, np.ndarray]:
        """Every intermediate of a step of `rows` rows (they grow with the largest step seen)."""
        row = (self.h + 2 * self.kvh) * self.d
        return {name: np.empty((rows, n), np.float32) for name, n in (
            ("x", self.hidden), ("residual", self.hidden), ("qkv", row), ("q", self.h * self.d),
            ("attn", self.h * self.d), ("hbuf", self.hidden), ("gate_up", 2 * self.f), ("act", self.f))}

    def _team_threads(self, model) -> int:
        """Threads of the worker team: every core, but at least TEAM_BYTES of a layer's weights
        per thread, so a small model on a many-core host does not pay more in hand-offs between
        phases (an atomic per chunk, a wait per phase) than the extra cores read."""
        layer = model.layers[self.layers[0]]
        parts = [layer.o_proj, layer.gate_up, layer.down, *([layer.qkv] if layer.qkv is not None else layer.q_k_v[:3])]
        nbytes = sum(w.nbytes for w in parts)
        return max(2, min(attention._workers(), nbytes // TEAM_BYTES))

    def _addr(self, a) -> int:
        a = np.ascontiguousarray(a)
        self._arrays.append(a)
        return a.ctypes.data

    @classmethod
    def for_model(cls, model, max_seqs: int) -> "DecodeProgram | None":
        return None if unsupported_reason(model) else cls(model, max_seqs)

    def run(self, batch: StepBatch) -> tuple[np.ndarray, np.ndarray | None]:
        """The final-normed hidden states [S, hidden] of a decode step (KV caches written) and,
        when the LM head runs inside the step, its logits [S, vocab] (else None)."""
        m, b = self.model, self.model.backend
        S = batch.num_seqs
        if not batch.is_decode:
            raise ValueError("the fused step runs decode steps (one token per row)")
        m._check_batch(batch)
        if S > self.buffers["x"].shape[0]:
            self.buffers = self._step_buffers(S)
        nb = m.kv_caches[0][0].shape[0]
        attention._check_tables(batch.block_tables, batch.context_lens, S, nb, m.block_size)
        if int(batch.slot_mapping.min()) < 0 or int(batch.slot_mapping.max()) >= nb * m.block_size:
            raise ValueError("a slot in slot_mapping lies outside the KV cache")
        buf = {k: v[:S] for k, v in self.buffers.items()}
        residual = b.embedding(m.embed, batch.token_ids)
        buf["residual"][...] = residual
        buf["x"][...] = b.rms_norm(residual, m.layers[self.layers[0]].attn_norm, m.config.rms_norm_eps)
        positions = np.ascontiguousarray(batch.positions, np.int32)
        slots = np.ascontiguousarray(batch.slot_mapping, np.int64)
        tables = np.ascontiguousarray(batch.block_tables, np.int32)
        lens = np.ascontiguousarray(batch.context_lens, np.int32)
        workers = attention._workers()
        first = attention.decode_splits(lens, workers)
        rows = attention._info["rows"]
        units = self.kvh * -(-(self.h // self.kvh) // rows)
        partial = attention._buffer("partial", attention.partial_floats(first, units, self.h, self.kvh, self.d))
        scratch = attention._scratch(self.d, units)
        step = np.array([S, buf["x"].ctypes.data, buf["residual"].ctypes.data, positions.ctypes.data,
                         slots.ctypes.data, tables.ctypes.data, tables.shape[1], lens.ctypes.data,
                         buf["qkv"].ctypes.data, buf["q"].ctypes.data, buf["attn"].ctypes.data,
                         buf["hbuf"].ctypes.data, buf["gate_up"].ctypes.data, buf["act"].ctypes.data,
                         scratch.ctypes.data, partial.ctypes.data, first.ctypes.data, workers], dtype=np.int64)
        logits = np.empty((S, self.vocab), np.float32) if self.fused_head else None
        step = np.append(step, logits.ctypes.data if logits is not None else 0)
        _kernels().decode_step(self.table.ctypes.data, step.ctypes.data, self.eps, self.scale)
        return buf["x"], logits
