"""Pallas kernels of the tpu backend: paged decode attention (GQA) and the int8 group-quantized matmul.

Both are written for Mosaic (the TPU Pallas compiler) and run unchanged in Pallas' interpret mode
(`interpret=True`), which is how CI checks them on XLA:CPU against float64 references. On CPU and
GPU the backend uses the jnp versions in `xla_ops` (same maths) unless MOJOLLM_TPU_PALLAS=interpret.

Layouts are the backend interface's (base.py), never transposed per call:

    paged_decode_attention   q [S, H, D]; k/v cache [num_blocks, B, KVH, D];
                             block_tables [S, M] int32; context_lens [S] int32  -> [S, H, D]
    quantized_matmul         x [T, K]; qweight [K, N] int8; scales/mins [K // G, N]  -> [T, N]
                             y = x @ W with W[k, n] = qweight[k, n] * scales[k // G, n] (+ mins[k // G, n])

TPU block-shape rule: the last two dims of every block must be multiples of (8, 128) or the
array's full dims. The attention kernel therefore moves whole cache blocks [B, KVH, D] (last two
dims full) and the matmul tiles K by multiples of 8 * G (scales' second-minor dim) or takes it whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Renamed across JAX releases (TPUCompilerParams -> CompilerParams).
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _precision(dtype):
    """float32 operands multiply in float32 (the MXU's default would be one bfloat16 pass)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------------------------------------
# Paged decode attention: one query token per sequence, ragged context lengths, GQA.
# Grid (S, M): sequence s, its j-th KV block. The block table drives the K/V index maps (scalar
# prefetch into SMEM), so each step DMAs exactly one cache block [B, KVH, D]. Softmax is online
# (flash-style) over j, with the running max m, denominator l and accumulator acc in VMEM scratch.
# Blocks past a sequence's context are skipped, and their index map repeats the last valid block
# so the pipeline issues no DMA for them.
# ------------------------------------------------------------------------------------------------
def _decode_kernel(tables_ref, lens_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   block_size: int, num_kv_heads: int, max_blocks: int, scale: float):
    s, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    length = lens_ref[s]

    @pl.when(j * block_size < length)
    def _accumulate():
        pos = j * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
        valid = pos < length                                            # [1, B]
        for h in range(num_kv_heads):                                   # static: KVH is small
            k = k_ref[:, h, :]                                          # [B, D]
            v = v_ref[:, h, :]
            if block_size == 1:   # 1-wide "matmuls": Mosaic lowers bf16 ones only with float32 operands
                k, v = k.astype(jnp.float32), v.astype(jnp.float32)
            q = q_ref[h].astype(k.dtype)                                # [G, D] query heads of kv head h
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_precision(k.dtype),
                                         preferred_element_type=jnp.float32) * scale   # [G, B]
            scores = jnp.where(valid, scores, -jnp.inf)
            m_prev = m_sc[h]                                            # [G, 1]
            m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
            p = jnp.exp(scores - m_new)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
            acc_sc[h] = alpha * acc_sc[h] + jnp.dot(p.astype(v.dtype), v, precision=_precision(v.dtype),
                                                    preferred_element_type=jnp.float32)
            m_sc[h] = m_new

    @pl.when(j == max_blocks - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale: float,
                           interpret: bool = False):
    """q [S, H, D], caches [num_blocks, B, KVH, D], block_tables [S, M], context_lens [S] -> [S, H, D].
    Every block_tables[s, j] with j * B < context_lens[s] must be a valid block id (not checked here:
    the backend validates on the host)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = num_heads // num_kv_heads
    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)            # heads of one kv head together
    tables = block_tables.reshape(-1).astype(jnp.int32)                # 1-D: 2-D SMEM arrays pad badly
    lens = context_lens.astype(jnp.int32)

    def kv_index(s, j, tables, lens):
        last = jnp.maximum((lens[s] + block_size - 1) // block_size - 1, 0)
        return (tables[s * max_blocks + jnp.minimum(j, last)], 0, 0, 0)

    def q_index(s, j, tables, lens):
        return (s, 0, 0, 0)

    kv_spec = pl.BlockSpec(block_shape=(None, block_size, num_kv_heads, head_dim), index_map=kv_index)
    q_spec = pl.BlockSpec(block_shape=(None, num_kv_heads, group, head_dim), index_map=q_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_seqs, max_blocks),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((num_kv_heads, group, 1), jnp.float32),
                        pltpu.VMEM((num_kv_heads, group, 1), jnp.float32),
                        pltpu.VMEM((num_kv_heads, group, head_dim), jnp.float32)],
    )
    kernel = functools.partial(_decode_kernel, block_size=block_size, num_kv_heads=num_kv_heads,
                               max_blocks=max_blocks, scale=scale)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(tables, lens, q4, k_cache, v_cache)
    return out.reshape(num_seqs, num_heads, head_dim)


# ------------------------------------------------------------------------------------------------
# Group-quantized matmul: int8 weights [K, N] with per-(group of G rows, column) scales and
# optional mins (GGUF Q4_1). Grid (T/tt, N/tn, K/tk), K innermost ("arbitrary"): each step
# dequantizes one [tk, tn] weight tile in VMEM (splitting the sublane dim into groups of G) and
# accumulates x_tile @ w_tile in float32 scratch. HBM traffic is the int8 weights, not floats.
# ------------------------------------------------------------------------------------------------
def _qmm_kernel(x_ref, q_ref, s_ref, *rest, group: int, has_mins: bool, num_k: int):
    if has_mins:
        m_ref, o_ref, acc_ref = rest
    else:
        (o_ref, acc_ref), m_ref = rest, None
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    tk, tn = q_ref.shape
    w = q_ref[...].astype(jnp.float32).reshape(tk // group, group, tn) * s_ref[...][:, None, :]
    if has_mins:
        w = w + m_ref[...][:, None, :]
    x = x_ref[...]
    acc_ref[...] += jnp.dot(x, w.reshape(tk, tn).astype(x.dtype), precision=_precision(x.dtype),
                            preferred_element_type=jnp.float32)

    @pl.when(k == num_k - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _pick_tile(dim: int, unit: int, cap: int) -> int:
    """Largest multiple of `unit` <= cap dividing `dim`; the whole dim when none does (always legal)."""
    t = (min(cap, dim) // unit) * unit
    while t >= unit:
        if dim % t == 0:
            return t
        t -= unit
    return dim


@functools.partial(jax.jit, static_argnames=("group", "interpret"))
def quantized_matmul(x, qweight, scales, mins=None, *, group: int = 32, interpret: bool = False):
    """x [T, K] @ dequant(qweight [K, N] int8, scales [K//G, N], mins [K//G, N] | None) -> [T, N] float32."""
    num_tokens, k_dim = x.shape
    k_dim2, n_dim = qweight.shape
    if k_dim != k_dim2 or k_dim % group or scales.shape != (k_dim // group, n_dim):
        raise ValueError(f"quantized_matmul: x {x.shape}, qweight {qweight.shape}, scales {scales.shape} "
                         f"do not match with group {group}")
    tt = num_tokens if num_tokens <= 256 else _pick_tile(num_tokens, 8, 256)
    tn = _pick_tile(n_dim, 128, 512)
    tk = _pick_tile(k_dim, 8 * group, 1024)   # scales' tile is [tk // G, tn]: tk // G multiple of 8
    num_k = k_dim // tk
    has_mins = mins is not None
    in_specs = [pl.BlockSpec(block_shape=(tt, tk), index_map=lambda i, j, k: (i, k)),
                pl.BlockSpec(block_shape=(tk, tn), index_map=lambda i, j, k: (k, j)),
                pl.BlockSpec(block_shape=(tk // group, tn), index_map=lambda i, j, k: (k, j))]
    operands = [x, qweight, scales]
    if has_mins:
        in_specs.append(pl.BlockSpec(block_shape=(tk // group, tn), index_map=lambda i, j, k: (k, j)))
        operands.append(mins)
    kernel = functools.partial(_qmm_kernel, group=group, has_mins=has_mins, num_k=num_k)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, tt), n_dim // tn, num_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec(block_shape=(tt, tn), index_map=lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, n_dim), jnp.float32),
        scratch_shapes=[pltpu.VMEM((tt, tn), jnp.float32)],
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*operands)
