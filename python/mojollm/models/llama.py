"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) written against the backend ops.

    hidden = embed(ids)
    for each layer:
        x = rms_norm(hidden)
        q, k, v = split(x @ Wqkv.T (+ b))          one fused matmul
        q, k = rope(q), rope(k)
        cache[slots] = k, v                          paged KV cache
        hidden += attention(q, cache) @ Wo.T         causal, GQA: query head h reads kv head h // (H/KVH)
        x = rms_norm(hidden)
        hidden += (silu(x @ Wg.T) * (x @ Wu.T)) @ Wd.T   one fused gate/up matmul
    logits = rms_norm(hidden)[rows] @ Wlm.T          only the rows the engine asks for

Each residual add is fused with the rms_norm that follows it (add_rms_norm). The model owns no
device code: it calls `self.backend` ops and moves host arrays with asarray/to_numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mojollm.backends.base import Backend
from mojollm.engine.step import StepBatch
from mojollm.errors import ModelLoadError
from mojollm.models.config import ModelConfig
from mojollm.models.rope import cos_sin_table
from mojollm.tokenizer import Tokenizer
from mojollm.weights import WeightTensor


@dataclass
class LayerWeights:
    attn_norm: Any
    qkv: Any | None          # fused [q_size + 2 kv_size, hidden], or None when q/k/v stay separate
    qkv_bias: Any | None
    q_k_v: tuple | None      # (q, k, v, q_bias, k_bias, v_bias) when the types did not allow fusion
    o_proj: Any
    mlp_norm: Any
    gate_up: Any             # fused [2 * intermediate, hidden]
    down: Any


def fusable(parts: list[WeightTensor]) -> bool:
    return len({p.qtype for p in parts}) == 1 and len({p.shape[1:] for p in parts}) == 1


def fuse_rows(name: str, parts: list[WeightTensor]) -> WeightTensor | None:
    """Stack weights along the output (row) dimension; None when their types differ.
    Quantized rows are self-contained blocks, so stacking the raw bytes is exact."""
    if not fusable(parts):
        return None
    data = np.concatenate([np.asarray(p.data) for p in parts], axis=0)
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return WeightTensor(name, shape, parts[0].qtype, data)


def rope_frequencies(config: ModelConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    """The head_dim/2 rotary inverse frequencies (float64), after the config's scaling."""
    from mojollm.models.rope import rope_inv_freq

    if freq_factors is None:
        return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    # llama.cpp stores llama3-style scaling as per-frequency divisors (rope_freqs.weight).
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None)
    return inv_freq / np.asarray(freq_factors, dtype=np.float64).reshape(inv_freq.shape)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, WeightTensor], tokenizer: Tokenizer,
                 backend: Backend, progress=None):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.kv_caches: list[tuple[Any, Any]] | None = None
        self.path = None  # set by load_model
        self.block_size: int | None = None
        b, c = backend, config
        _check_shapes(c, weights)

        say = progress or (lambda msg: None)
        say(f"preparing {c.num_hidden_layers} layers on the {b.name} backend")
        self.embed = b.prepare_embedding(weights["embed_tokens"])
        self.layers: list[LayerWeights] = []
        for i in range(c.num_hidden_layers):
            w = lambda n: weights[f"layers.{i}.{n}"]  # noqa: E731
            qkv = fuse_rows(f"layers.{i}.qkv_proj", [w("q_proj"), w("k_proj"), w("v_proj")])
            biases = [weights.get(f"layers.{i}.{n}_proj.bias") for n in "qkv"] if c.attention_bias else [None] * 3
            gate_up = fuse_rows(f"layers.{i}.gate_up_proj", [w("gate_proj"), w("up_proj")])
            if gate_up is None:  # mixed types: silu_mul needs one [T, 2F] tensor, so widen both to float32
                gate_up = WeightTensor(f"layers.{i}.gate_up_proj", (2 * c.intermediate_size, c.hidden_size), "F32",
                                       np.concatenate([w("gate_proj").to_float32(), w("up_proj").to_float32()]))
            self.layers.append(LayerWeights(
                attn_norm=b.prepare_vector(w("input_layernorm")),
                qkv=b.prepare_linear(qkv) if qkv is not None else None,
                qkv_bias=(b.asarray(np.concatenate([x.to_float32() for x in biases]))
                          if qkv is not None and c.attention_bias else None),
                q_k_v=None if qkv is not None else (
                    b.prepare_linear(w("q_proj")), b.prepare_linear(w("k_proj")), b.prepare_linear(w("v_proj")),
                    *[b.prepare_vector(x) if x is not None else None for x in biases]),
                o_proj=b.prepare_linear(w("o_proj")),
                mlp_norm=b.prepare_vector(w("post_attention_layernorm")),
                gate_up=b.prepare_linear(gate_up),
                down=b.prepare_linear(w("down_proj")),
            ))
        self.final_norm = b.prepare_vector(weights["norm"])
        lm_head = weights["embed_tokens"] if c.tie_word_embeddings else weights["lm_head"]
        self.lm_head = b.prepare_linear(lm_head)
        freq_factors = weights["rope_freqs"].to_float32() if "rope_freqs" in weights else None
        self.inv_freq = rope_frequencies(c, freq_factors)
        # allocate_kv_cache builds the cos/sin table for the positions its cache can hold: a
        # checkpoint may claim millions of positions that no cache here will ever reach.
        self.max_positions = 0
        self.cos_sin = None
        # positions the RoPE table must reach beyond the cache's size: an engine whose KV policy
        # streams past the context (sink-window) sets it before allocating the cache
        self.rope_positions = 0
        self._kv_mass: dict[int, np.ndarray] | None = None
        self.scale = float(c.head_dim) ** -0.5
        self.weight_qtype = _attention_qtype(c, weights)
        self.kv_dtype = b.kv_cache_dtype(self.weight_qtype)  # set_kv_cache_dtype changes it

        # Bytes a decode step reads: every matrix and vector once, lm_head included. An untied
        # embedding table is not counted: a step reads only the rows of its tokens.
        counted = [k for k in weights if k != "rope_freqs" and (k != "embed_tokens" or c.tie_word_embeddings)]
        self.weight_bytes = int(sum(weights[k].nbytes for k in counted))
        shapes, self.fresh_heads = kernel_specialisation(c, weights, b.kv_cache_dtype)
        b.specialise(shapes, self.fresh_heads, progress=progress)

    # ---- KV cache ----
    def set_kv_cache_dtype(self, name: str) -> str:
        """Use KV dtype `name` (mojollm.kv_dtypes: "auto" is the backend's choice) for the caches
        allocated from now on; returns the dtype. A dtype the backend cannot run: ValueError."""
        from mojollm.kv_dtypes import resolve

        kv = resolve(name, self.backend, self.weight_qtype)
        if kv != self.kv_dtype:
            self.kv_dtype, self.kv_caches = kv, None
        return kv

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block of every layer's K and V (int8 / fp8 rows carry their scale)."""
        from mojollm.kv_dtypes import row_bytes

        c = self.config
        return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * row_bytes(self.kv_dtype, c.head_dim)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[Any, Any]]:
        """Per layer (k_cache, v_cache), each [num_blocks, block_size, KVH, W] in kv_dtype's
        format (mojollm.kv_dtypes: W = D, or D + 4 bytes for int8 / fp8)."""
        from mojollm.kv_dtypes import row_width

        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        c = self.config
        shape = (num_blocks, block_size, c.num_key_value_heads, row_width(self.kv_dtype, c.head_dim))
        b = self.backend
        self.kv_caches = None  # the old pool goes before the new one is allocated
        self.kv_caches = [(b.kv_cache_zeros(shape, self.kv_dtype), b.kv_cache_zeros(shape, self.kv_dtype))
                          for _ in range(c.num_hidden_layers)]
        self.block_size = block_size
        self.max_positions = min(c.max_position_embeddings, max(num_blocks * block_size, self.rope_positions))
        self.cos_sin = self.backend.asarray(cos_sin_table(self.inv_freq, self.max_positions))
        return self.kv_caches

    def copy_kv_rows(self, src_slots: np.ndarray, dst_slots: np.ndarray) -> None:
        """Move KV rows in every layer (a KV policy's compaction; Backend.copy_kv_rows)."""
        from mojollm.backends.base import check_kv_copies

        b = self.backend
        k0 = self.kv_caches[0][0]
        check_kv_copies(int(k0.shape[0]) * int(k0.shape[1]), src_slots, dst_slots)  # before any device sees them
        src, dst = b.asarray(src_slots, "int64"), b.asarray(dst_slots, "int64")
        for k_cache, v_cache in self.kv_caches:
            b.copy_kv_rows(k_cache, v_cache, src, dst)

    @property
    def supports_kv_mass(self) -> bool:
        """Whether forward can also return each cache row's attention mass (the h2o policy)."""
        return bool(getattr(self.backend, "supports_key_mass", False)) and self.kv_dtype == "float32"

    def take_kv_mass(self) -> dict[int, np.ndarray] | None:
        """The last forward's attention mass per cache row of batch.kv_mass_seqs, summed over
        layers (sequence index in the batch -> float64 [context_len])."""
        mass, self._kv_mass = self._kv_mass, None
        return mass

    # ---- forward ----
    def forward(self, batch: StepBatch, layers: list[int] | None = None) -> np.ndarray:
        """Run one step; returns float32 logits [len(batch.logits_indices), vocab] on the host.
        layers: run only these layers, in order, then the final norm and the LM head (a draft of
        the model itself for speculative decoding; their KV rows are written as usual)."""
        logits = self.device_logits(batch, layers)
        if logits is None:  # a step of prefill chunks that all stop short of their last token
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        return self.backend.to_numpy(logits)

    def device_logits(self, batch: StepBatch, layers: list[int] | None = None):
        """forward's logits left on the backend (None when no row wants logits)."""
        self._check_batch(batch)
        b = self.backend
        rows = batch.logits_indices
        if rows.shape[0] == 0:
            rows_t = None
        elif rows.shape[0] == batch.num_tokens and np.array_equal(rows, np.arange(batch.num_tokens)):
            rows_t = ...  # every row
        else:
            rows_t = b.asarray(rows, "int64")
        q_lens = np.diff(batch.cu_seqlens_q)
        fresh = (tuple(int(n) for n in q_lens)
                 if not batch.is_decode and np.array_equal(q_lens, batch.context_lens) else None)
        mass = None
        if batch.kv_mass_seqs is not None:
            mass = (batch.block_tables, batch.cu_seqlens_q, batch.context_lens, batch.kv_mass_seqs)
            fresh = None  # the mass reads q against the paged cache; keep the paged attention too
        return self.compute_logits(
            b.asarray(batch.token_ids, "int32"), b.asarray(batch.positions, "int32"),
            b.asarray(batch.slot_mapping, "int64"), b.asarray(batch.block_tables, "int32"),
            b.asarray(batch.context_lens, "int32"), b.asarray(batch.cu_seqlens_q, "int32"),
            batch.is_decode, rows_t, fresh_lens=fresh, layers=layers, kv_mass=mass)

    def compute_logits(self, ids, positions, slots, block_tables, context_lens, cu_seqlens_q, is_decode: bool,
                       logits_rows, fresh_lens: tuple[int, ...] | None = None, layers: list[int] | None = None,
                       kv_mass=None):
        """The step on backend tensors (the StepBatch fields, already on the device); returns the
        logits [L, vocab] of rows `logits_rows` (an int64 tensor, `...` for every row, None for no
        row: then only the KV cache is written and None is returned). No host synchronisation, so
        a runner can capture it in a graph. fresh_lens: the sequences' lengths when this is a
        prefill of sequences without a cached prefix (attention may then skip the paged cache).
        kv_mass: host (block_tables, cu_seqlens_q, context_lens, seqs): also sum, over the layers,
        the attention mass each cache row of those sequences receives (take_kv_mass; h2o)."""
        b, c = self.backend, self.config
        T = ids.shape[0]
        H, KVH, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        run = range(len(self.layers)) if layers is None else layers
        residual = b.embedding(self.embed, ids)                             # [T, hidden]
        x = b.rms_norm(residual, self.layers[run[0]].attn_norm, c.rms_norm_eps)
        for n, i in enumerate(run):
            layer = self.layers[i]
            last = n + 1 == len(run)
            k_cache, v_cache = self.kv_caches[i]
            # -- attention --
            if layer.qkv is not None:
                qkv = b.linear(x, layer.qkv, layer.qkv_bias)                # [T, (H + 2 KVH) D]
                q, k, v = _split_heads(qkv, T, (H, KVH, KVH), D)
            else:
                wq, wk, wv, bq, bk, bv = layer.q_k_v
                q = b.linear(x, wq, bq).reshape(T, H, D)
                k = b.linear(x, wk, bk).reshape(T, KVH, D)
                v = b.linear(x, wv, bv).reshape(T, KVH, D)
            q = b.rope(q, positions, self.cos_sin, c.rope_neox)
            k = b.rope(k, positions, self.cos_sin, c.rope_neox)
            b.store_kv(k_cache, v_cache, k, v, slots)
            if is_decode:
                attn = b.attention_decode(q, k_cache, v_cache, block_tables, context_lens, self.scale)
            else:
                attn = (b.attention_prefill_fresh(q, k, v, fresh_lens, self.scale)
                        if fresh_lens is not None and self.fresh_heads is not None else None)
                if attn is None:
                    attn = b.attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                               self.scale)
            if kv_mass is not None:
                self._add_kv_mass(q, k_cache, kv_mass, first=n == 0)
            attn_out = b.linear(attn.reshape(T, H * D), layer.o_proj)
            x, residual = b.add_rms_norm(attn_out, residual, layer.mlp_norm, c.rms_norm_eps)
            if logits_rows is None and last:
                return None  # the last MLP only feeds the logits, and no row wants them
            # -- MLP (SwiGLU) --
            gate_up = b.linear(x, layer.gate_up)                            # [T, 2F]
            mlp_out = b.linear(b.silu_mul(gate_up), layer.down)
            next_norm = self.final_norm if last else self.layers[run[n + 1]].attn_norm
            x, residual = b.add_rms_norm(mlp_out, residual, next_norm, c.rms_norm_eps)

        # x is now the final-normed hidden state; project only the rows the engine samples from.
        if logits_rows is not ...:
            x = x[logits_rows]
        return b.linear(x, self.lm_head)

    def _add_kv_mass(self, q, k_cache, spec, first: bool) -> None:
        tables, cu, lens, seqs = spec
        per_seq = self.backend.attention_key_mass(q, k_cache, tables, cu, lens, seqs, self.scale)
        if first or self._kv_mass is None:
            self._kv_mass = {int(s): m for s, m in zip(np.asarray(seqs).tolist(), per_seq)}
        else:
            for s, m in zip(np.asarray(seqs).tolist(), per_seq):
                self._kv_mass[int(s)] += m

    def _check_batch(self, batch: StepBatch) -> None:
        if self.kv_caches is None:
            raise ValueError("allocate_kv_cache() must be called before forward()")
        T = batch.num_tokens
        if T == 0:
            raise ValueError("a step needs at least one token")
        if batch.positions.shape != (T,) or batch.slot_mapping.shape != (T,):
            raise ValueError(f"positions {batch.positions.shape} and slot_mapping {batch.slot_mapping.shape} "
                             f"must both have shape ({T},)")
        if batch.token_ids.min() < 0 or batch.token_ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) (the model's vocabulary)")
        if batch.positions.min() < 0 or batch.positions.max() >= self.max_positions:
            raise ValueError(f"positions must lie in [0, {self.max_positions}) (the model's context length)")
        li = batch.logits_indices
        if li.ndim != 1 or (li.shape[0] and (li.min() < 0 or li.max() >= T)):
            raise ValueError(f"logits_indices must be a list of rows in [0, {T})")
        if batch.is_decode and batch.num_seqs != T:
            raise ValueError("a decode step has exactly one token per sequence")


def gemm_shapes(config: ModelConfig, weights: dict[str, WeightTensor]) -> list[tuple[int, int]]:
    """The [N, K] of every matrix the model multiplies by in 16-bit or quantized form (float32
    weights excluded), as LlamaModel fuses them: what a backend specialises its GEMMs for."""
    c = config
    shapes = []
    for i in range(c.num_hidden_layers):
        w = lambda n: weights[f"layers.{i}.{n}"]  # noqa: E731
        qkv = [w("q_proj"), w("k_proj"), w("v_proj")]
        gate_up = [w("gate_proj"), w("up_proj")]
        parts = [qkv] if fusable(qkv) else [[p] for p in qkv]
        parts += [gate_up] if fusable(gate_up) else []  # else widened to float32 (see __init__)
        parts += [[w("o_proj")], [w("down_proj")]]
        for ps in parts:
            if ps[0].qtype != "F32":
                shapes.append((sum(p.shape[0] for p in ps), ps[0].shape[1]))
    lm_head = weights["embed_tokens"] if c.tie_word_embeddings else weights["lm_head"]
    if lm_head.qtype != "F32":
        shapes.append(tuple(lm_head.shape))
    return sorted(set(shapes))


def _attention_qtype(config: ModelConfig, weights: dict[str, WeightTensor]) -> str:
    """The type of the attention weights, which sets the KV cache's element type."""
    return weights["layers.0.q_proj"].qtype if config.num_hidden_layers else "F32"


def kernel_specialisation(config: ModelConfig, weights: dict[str, WeightTensor], kv_cache_dtype):
    """(GEMM shapes, attention heads or None): what LlamaModel asks Backend.specialise for at load
    and `mojollm build --model` builds ahead. kv_cache_dtype is the backend's rule (weight type ->
    cache type); attention specialises only over a 16-bit cache (its kernels take bf16 q/k/v)."""
    c = config
    fresh = kv_cache_dtype(_attention_qtype(c, weights)) != "float32"
    heads = (c.num_attention_heads, c.num_key_value_heads, c.head_dim) if fresh else None
    return gemm_shapes(c, weights), heads


def _split_heads(qkv, T: int, heads: tuple[int, int, int], D: int):
    """[T, (H + KVH + KVH) * D] -> q [T, H, D], k, v [T, KVH, D].
    Column slices are strided views; the kernels take dense tensors, so each part is copied
    (numpy/jax: .copy(), torch: .contiguous())."""
    out, start = [], 0
    for n in heads:
        part = qkv[:, start:start + n * D].reshape(T, n, D)
        out.append(part.contiguous() if hasattr(part, "contiguous") else part.copy())
        start += n * D
    return out


def _check_shapes(c: ModelConfig, weights: dict[str, WeightTensor]) -> None:
    """Every tensor the forward needs exists with the shape the config implies (clear error otherwise)."""
    hidden, inter = c.hidden_size, c.intermediate_size
    want = {"embed_tokens": (c.vocab_size, hidden), "norm": (hidden,)}
    if not c.tie_word_embeddings:
        want["lm_head"] = (c.vocab_size, hidden)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        want.update({
            p + "input_layernorm": (hidden,), p + "post_attention_layernorm": (hidden,),
            p + "q_proj": (c.q_size, hidden), p + "k_proj": (c.kv_size, hidden), p + "v_proj": (c.kv_size, hidden),
            p + "o_proj": (hidden, c.q_size),
            p + "gate_proj": (inter, hidden), p + "up_proj": (inter, hidden), p + "down_proj": (hidden, inter),
        })
        if c.attention_bias:
            want.update({p + "q_proj.bias": (c.q_size,), p + "k_proj.bias": (c.kv_size,),
                         p + "v_proj.bias": (c.kv_size,)})
    for name, shape in want.items():
        if name not in weights:
            raise ModelLoadError(f"checkpoint lacks tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")
