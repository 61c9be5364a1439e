"""The tpu backend's ops as pure jax.numpy functions (jitted by the backend with static shapes).

These are the portable versions XLA compiles for any device (TPU, GPU, CPU) and the maths the
Pallas kernels must match. Shapes and the paged KV layout are the backend interface's (base.py).
GGUF unpacking (numpy, at prepare time) is here too: Q4_0 / Q4_1 / Q8_0 blocks become int8 values
plus float32 per-group scales (and Q4_1's per-group mins), so w = q * scale (+ min).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mojollm.weights import BLOCK_BYTES, QK, WeightTensor

GROUP = QK  # quantization group: one GGUF block of 32 weights along K
# float32 operands are multiplied in float32: XLA's default on GPU (TF32) and TPU (one bf16 pass)
# would silently cost ~1e-3 relative error. bfloat16 operands are unaffected.
HIGHEST = jax.lax.Precision.HIGHEST


# ---- GGUF blocks -> int8 + group scales (numpy, prepare time) ----
UNPACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # what unpack_gguf reads; other GGUF types widen at load


def unpack_gguf(w: WeightTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GGUF-quantized [rows, K] -> (q int8 [rows, K], scales f32 [rows, K//32], mins f32 [rows, K//32] | None)
    with weight = q * scale (+ min). Q4_0 stores q - 8 (range -8..7), Q4_1 q (0..15), Q8_0 q (-128..127)."""
    rows, k = int(np.prod(w.shape[:-1])), w.shape[-1]
    nb = k // QK
    blocks = np.ascontiguousarray(w.data).reshape(rows, nb, BLOCK_BYTES[w.qtype])
    scales = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if w.qtype == "Q8_0":
        q = blocks[:, :, 2:].copy().view(np.int8)
        return q.reshape(rows, k), scales, None
    nibbles = blocks[:, :, 4:] if w.qtype == "Q4_1" else blocks[:, :, 2:]
    # byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8)
    if w.qtype == "Q4_0":
        return (q - 8).reshape(rows, k), scales, None
    mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return q.reshape(rows, k), scales, mins


def dequantize_rows(q, scales, mins):
    """q [R, K] int8, scales/mins [R, K//G] -> [R, K] float32."""
    r, k = q.shape
    w = q.astype(jnp.float32).reshape(r, k // GROUP, GROUP) * scales[:, :, None]
    if mins is not None:
        w = w + mins[:, :, None]
    return w.reshape(r, k)


# ---- embedding / linear ----
def embedding_dense(table, ids):
    return table[ids].astype(jnp.float32)


def embedding_quant(q, scales, mins, ids):
    return dequantize_rows(q[ids], scales[ids], None if mins is None else mins[ids])


def linear_dense(x, w, bias):
    """x [T, K] @ w[N, K].T (+ bias) with float32 accumulation (w may be bfloat16)."""
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((1,), (1,)), ((), ())), precision=HIGHEST,
                            preferred_element_type=jnp.float32)
    return y if bias is None else y + bias


def linear_quant(x, q, scales, mins, bias, compute_dtype):
    """x [T, K] @ dequant(q [K, N], scales/mins [K//G, N]) (+ bias): the jnp twin of the Pallas kernel."""
    k, n = q.shape
    w = q.astype(jnp.float32).reshape(k // GROUP, GROUP, n) * scales[:, None, :]
    if mins is not None:
        w = w + mins[:, None, :]
    y = jnp.dot(x.astype(compute_dtype), w.reshape(k, n).astype(compute_dtype), precision=HIGHEST,
                preferred_element_type=jnp.float32)
    return y if bias is None else y + bias


# ---- elementwise ----
def rms_norm(x, weight, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def add_rms_norm(x, residual, weight, eps):
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rope(x, positions, cos_sin, neox):
    """x [T, H, D]; cos_sin [max_pos, rot] = [cos(p * f_i) for i < rot/2 | sin(p * f_i)].
    neox pairs dims (i, i + rot/2); interleaved (GPT-J, llama.cpp GGUF llama) pairs (2i, 2i + 1)."""
    rot = cos_sin.shape[1]
    half = rot // 2
    cs = cos_sin[positions]                                   # [T, rot]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xr = x[..., :rot]
    if neox:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def silu_mul(gate_up):
    f = gate_up.shape[-1] // 2
    return jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]


# ---- KV cache (formats: mojollm.kv_dtypes) ----
_KV_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "int8": jnp.uint8,
               "fp8": jnp.uint8}


def kv_storage(kv_dtype: str):
    """The jnp element type a cache of kv_dtype is stored in."""
    return _KV_STORAGE[kv_dtype]


def encode_kv(x, kv_dtype: str):
    """float rows [..., D] -> stored rows [..., W]: a cast for the float dtypes; int8 / fp8: the D
    codes of x / s and s's 4 little-endian bytes, s = max|row| / 127 (or / 448), round to nearest
    even (jnp.round; the float8_e4m3fn cast), a zero row s = 0 and codes 0. XLA:CPU divides by
    multiplying with the reciprocal: s may be 1 ulp off the cpu kernels' exact division, and a
    code one step off at a tie. Readers use the stored s, so the values are the format's all the same."""
    x = x.astype(jnp.float32)
    if kv_dtype in ("float32", "bfloat16", "float16"):
        return x.astype(_KV_STORAGE[kv_dtype])
    qmax = 127.0 if kv_dtype == "int8" else 448.0
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / jnp.float32(qmax)
    y = jnp.where(s > 0, x / jnp.where(s > 0, s, jnp.float32(1)), jnp.float32(0))
    if kv_dtype == "int8":
        codes = jax.lax.bitcast_convert_type(jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8), jnp.uint8)
    else:
        codes = jax.lax.bitcast_convert_type(jnp.clip(y, -448, 448).astype(jnp.float8_e4m3fn), jnp.uint8)
    scale_bytes = jax.lax.bitcast_convert_type(s[..., 0], jnp.uint8)          # [..., 4]
    return jnp.concatenate([codes, scale_bytes], axis=-1)


def decode_kv(c, kv_dtype: str):
    """Stored rows [..., W] -> float32 values [..., D] (value = s * code for int8 / fp8)."""
    if kv_dtype in ("float32", "bfloat16", "float16"):
        return c.astype(jnp.float32)
    s = jax.lax.bitcast_convert_type(c[..., -4:], jnp.float32)                # [...]
    code_type = jnp.int8 if kv_dtype == "int8" else jnp.float8_e4m3fn
    return jax.lax.bitcast_convert_type(c[..., :-4], code_type).astype(jnp.float32) * s[..., None]


def store_kv(k_cache, v_cache, k, v, slots, kv_dtype="float32"):
    """Write k/v [T, KVH, D] to slots [T] (block * B + row, validated on the host) of caches
    [NB, B, KVH, W] of kv_dtype. The in-bounds promise keeps the scatter a plain in-place update (a
    clamped or dropping scatter reads the old rows first, and XLA then copies the whole cache)."""
    bs = k_cache.shape[1]
    blocks, rows = slots // bs, slots % bs
    k_new = k_cache.at[blocks, rows].set(encode_kv(k, kv_dtype), mode="promise_in_bounds")
    v_new = v_cache.at[blocks, rows].set(encode_kv(v, kv_dtype), mode="promise_in_bounds")
    return k_new, v_new


def _gather_context(cache, table, kv_dtype="float32"):
    """cache [NB, B, KVH, W], table [M] -> float32 [M * B, KVH, D] (a sequence's positions in order)."""
    g = cache[table]
    return decode_kv(g.reshape(g.shape[0] * g.shape[1], *g.shape[2:]), kv_dtype)


def _softmax_masked(scores, mask):
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, p, 0.0)
    l = p.sum(axis=-1, keepdims=True)
    return p / jnp.where(l > 0, l, 1.0)


def attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, kv_dtype="float32"):
    """q [S, H, D]: one new token per sequence, at position context_lens[s] - 1 -> [S, H, D]."""
    s_n, h, d = q.shape
    kvh = k_cache.shape[2]
    k = jax.vmap(lambda t: _gather_context(k_cache, t, kv_dtype))(block_tables)    # [S, C, KVH, D]
    v = jax.vmap(lambda t: _gather_context(v_cache, t, kv_dtype))(block_tables)
    qg = q.astype(jnp.float32).reshape(s_n, kvh, h // kvh, d)
    scores = jnp.einsum("skgd,sckd->skgc", qg, k, precision=HIGHEST) * scale
    mask = (jnp.arange(k.shape[1])[None, :] < context_lens[:, None])[:, None, None, :]
    p = _softmax_masked(scores, mask)
    return jnp.einsum("skgc,sckd->skgd", p, v, precision=HIGHEST).reshape(s_n, h, d)


def attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, q_window, q_chunk,
                      kv_dtype="float32"):
    """q [T, H, D]; sequence s owns rows cu[s]:cu[s+1], its last positions (the cache holds the rest).

    Work is a loop over (sequence, query chunk) pairs: each takes `q_chunk` rows of a per-sequence
    window of `q_window` rows (static, >= every q_len), attends causally to the sequence's gathered
    context, and the valid rows are scattered back. Memory per step is H * q_chunk * context.
    """
    t, h, d = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    num_seqs = block_tables.shape[0]
    chunks = q_window // q_chunk
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    qf = q.astype(jnp.float32)

    def one(item):
        seq, c = item // chunks, item % chunks
        table, start, q_len, ctx = block_tables[seq], cu_seqlens_q[seq], q_lens[seq], context_lens[seq]
        k = _gather_context(k_cache, table, kv_dtype)                    # [C, KVH, D]
        v = _gather_context(v_cache, table, kv_dtype)
        i = c * q_chunk + jnp.arange(q_chunk)                            # query index within the sequence
        rows = jnp.clip(start + i, 0, t - 1)
        qs = qf[rows].reshape(q_chunk, kvh, g, d)
        q_pos = ctx - q_len + i                                          # absolute positions
        kv_pos = jnp.arange(k.shape[0])
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < ctx)   # [q_chunk, C]
        scores = jnp.einsum("qkgd,ckd->kgqc", qs, k, precision=HIGHEST) * scale
        p = _softmax_masked(scores, mask[None, None])
        out = jnp.einsum("kgqc,ckd->qkgd", p, v, precision=HIGHEST).reshape(q_chunk, h, d)
        dest = jnp.where(i < q_len, start + i, t)                        # rows past q_len -> dropped
        return out, dest

    outs, dests = jax.lax.map(one, jnp.arange(num_seqs * chunks))
    out = jnp.zeros((t, h, d), jnp.float32)
    return out.at[dests.reshape(-1)].set(outs.reshape(-1, h, d), mode="drop")
