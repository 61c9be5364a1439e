"""16-bit and 8-bit KV caches (mojollm.kv_dtypes) on the cpu and tpu backends.

The reference here is independent of the kernels: a numpy quantizer of the storage format
(int8: s = max|row| / 127 in float32, codes = round-half-even(x / s); fp8: s = max|row| / 448,
codes = torch's float8_e4m3fn cast of x / s; bfloat16: torch's cast; float16: numpy's), and
float64 attention over the dequantized cache values (test_attention's reference).

- store_kv writes exactly the reference's bytes (codes and little-endian scales, zero rows with
  s = 0), from the kernel wrapper and from the fused decode step.
- Attention over a 16/8-bit cache equals float64 attention over its dequantized values within
  the float32 bound of test_attention (2e-5 on outputs of N(0, 1) data): the dequantization is
  fused into the loads, and the scale of a quantized row multiplies its score / probability.
- Against attention over the float32 cache the error is the cache's rounding: on N(0, 1) keys,
  values and queries (the CASES below: D 37..128, contexts up to 300) the largest
  |out - out_f32| measured is float16 1.7e-3, bfloat16 1.1e-2, int8 1.8e-2, fp8 9.8e-2 (outputs
  are O(1); asserted below with ~2x margin). Relative to a row's largest entry: float16 2^-11,
  bfloat16 2^-9, int8 1/254, fp8 2^-4 per element.
- The fused decode step gives the per-op path's logits (to 2e-5 of their scale) and cache bytes
  for every dtype, so decode stays on the fast path.
- Pool sizing: int8 / fp8 blocks hold (D + 4) bytes per head row, 3.76x float32's blocks at D = 64.
- Greedy output on the default model with a bfloat16 / float16 cache equals float32's, except
  where float32's top two logits are within 0.05 of each other (a near tie that a 1e-3 relative
  change of the cache may flip); from the first such step on the texts may part.
"""

from __future__ import annotations

import numpy as np
import pytest

from mojollm.kernels import attention as attn
from mojollm.kv_dtypes import KV_CACHE_DTYPES, row_bytes, row_width

def _torch():
    """torch, imported where a reference cast needs it, so the cpu checks that do not still run
    without it."""
    return pytest.importorskip("torch", reason="torch gives the reference bfloat16 / float8_e4m3fn casts (a test "
                               "extra); the float32 / float16 / int8 checks run without it")

ATOL = 2e-5
# max |attention(cache) - attention(float32 cache)| on N(0, 1) data (see the docstring)
VS_FLOAT32 = {"float32": 0.0, "float16": 4e-3, "bfloat16": 2.5e-2, "int8": 4e-2, "fp8": 2e-1}
STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16, "int8": np.uint8, "fp8": np.uint8}


# ---------------------------------------------------------------- the reference format
def ref_encode(x: np.ndarray, kv: str) -> np.ndarray:
    """float32 rows [..., D] -> the stored rows [..., W] of dtype kv."""
    x = np.ascontiguousarray(x, np.float32)
    if kv == "float32":
        return x.copy()
    if kv == "float16":
        return x.astype(np.float16)
    if kv == "bfloat16":
        torch = _torch()
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    qmax = np.float32(127 if kv == "int8" else 448)
    s = (np.abs(x).max(axis=-1, keepdims=True) / qmax).astype(np.float32)
    y = np.where(s > 0, x / np.where(s > 0, s, np.float32(1)), np.float32(0)).astype(np.float32)
    if kv == "int8":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8).view(np.uint8)
    else:
        y = np.clip(y, -448, 448)
        torch = _torch()
        codes = torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return np.concatenate([codes, s.astype("<f4").view(np.uint8)], axis=-1)


def ref_decode(c: np.ndarray, kv: str) -> np.ndarray:
    """Stored rows [..., W] -> float64 values [..., D]."""
    if kv in ("float32", "float16"):
        return c.astype(np.float64)
    if kv == "bfloat16":
        return (c.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    codes, s = c[..., :-4], np.ascontiguousarray(c[..., -4:]).view("<f4").astype(np.float64)
    if kv == "int8":
        vals = codes.view(np.int8).astype(np.float64)
    else:
        torch = _torch()
        vals = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    return vals * s


def ref_attention(q, k_vals, v_vals, tables, cu, ctx_lens, scale):
    """float64 causal attention over caches of float64 values [NB, B, KVH, D]."""
    _, h, d = q.shape
    block, kvh = k_vals.shape[1], k_vals.shape[2]
    g = h // kvh
    out = np.zeros(q.shape, np.float64)
    for s in range(len(ctx_lens)):
        q_len, ctx = int(cu[s + 1] - cu[s]), int(ctx_lens[s])
        if q_len == 0:
            continue
        pos = np.arange(ctx)
        k = k_vals[tables[s][pos // block], pos % block]               # [ctx, KVH, D]
        v = v_vals[tables[s][pos // block], pos % block]
        mask = pos[None, :] <= np.arange(ctx - q_len, ctx)[:, None]
        qs = q[cu[s]:cu[s + 1]].astype(np.float64)
        for head in range(h):
            sc = np.where(mask, qs[:, head] @ k[:, head // g].T * scale, -np.inf)
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[cu[s]:cu[s + 1], head] = (p / p.sum(axis=1, keepdims=True)) @ v[:, head // g]
    return out


def filled_caches(rng, kv, ctx_lens, block, kvh, d):
    """(k_cache, v_cache, their float32 twins, tables): every sequence's context written by
    store_kv through a permuted block table (each sequence's blocks in random order)."""
    m = max(-(-c // block) for c in ctx_lens) + 1
    nb = len(ctx_lens) * m + 3
    tables = rng.permutation(nb).astype(np.int32)[: len(ctx_lens) * m].reshape(len(ctx_lens), m).copy()
    shape = (nb, block, kvh, row_width(kv, d))
    kc, vc = attn.kv_cache_zeros(shape, kv), attn.kv_cache_zeros(shape, kv)
    k32, v32 = attn.kv_cache_zeros((nb, block, kvh, d), "float32"), attn.kv_cache_zeros((nb, block, kvh, d), "float32")
    for s, ctx in enumerate(ctx_lens):
        pos = np.arange(ctx)
        slots = (tables[s][pos // block].astype(np.int64) * block + pos % block)
        k = rng.standard_normal((ctx, kvh, d)).astype(np.float32)
        v = rng.standard_normal((ctx, kvh, d)).astype(np.float32)
        attn.store_kv(kc, vc, k, v, slots)
        attn.store_kv(k32, v32, k, v, slots)
    return kc, vc, k32, v32, tables


# ---------------------------------------------------------------- store_kv
@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("kvh, d", [(3, 64), (2, 37), (1, 128)])
def test_store_kv_writes_the_reference_bytes(kv, kvh, d):
    rng = np.random.default_rng(d + kvh)
    nb, block, t = 7, 5, 23
    k = (rng.standard_normal((t, kvh, d)) * rng.choice([1e-3, 1.0, 50.0], size=(t, kvh, 1))).astype(np.float32)
    v = rng.standard_normal((t, kvh, d)).astype(np.float32)
    k[3] = 0.0                                          # zero rows: s = 0, codes 0
    k[4, 0, 1] = 1e4                                    # one large entry: the rest of the row rounds to 0
    v[5, :, :2] = [-0.0, 6e-5]                          # -0 and tiny values (fp8 subnormals)
    slots = rng.permutation(nb * block)[:t].astype(np.int64)
    kc = attn.kv_cache_zeros((nb, block, kvh, row_width(kv, d)), kv)
    vc = attn.kv_cache_zeros(kc.shape, kv)
    attn.store_kv(kc, vc, k, v, slots)
    for cache, x in ((kc, k), (vc, v)):
        got = np.asarray(cache).reshape(-1, kvh, row_width(kv, d))[slots]
        want = ref_encode(x, kv)
        assert got.dtype == STORAGE[kv] and np.array_equal(got.view(np.uint8), want.view(np.uint8)), kv
        untouched = np.setdiff1d(np.arange(nb * block), slots)
        assert not np.asarray(cache).reshape(-1, kvh, row_width(kv, d))[untouched].any()
    if kv in ("int8", "fp8"):                           # the round trip's error: half a step of the row's grid
        back = ref_decode(np.asarray(vc).reshape(-1, kvh, row_width(kv, d))[slots], kv)
        amax = np.abs(v).max(axis=-1, keepdims=True)
        bound = amax / 254 if kv == "int8" else np.maximum(np.abs(v) / 16, amax / 448 * 2.0 ** -10)
        assert (np.abs(back - v) <= bound * (1 + 1e-6)).all()
    assert np.asarray(kc).reshape(-1, kvh, row_width(kv, d))[slots[3]].view(np.uint8).max() == 0


def test_a_uint8_cache_must_say_int8_or_fp8():
    c = np.zeros((2, 4, 1, 68), np.uint8)
    x = np.ones((1, 1, 64), np.float32)
    with pytest.raises(ValueError, match="needs kv_dtype"):
        attn.store_kv(c, c.copy(), x, x, np.zeros(1, np.int64))
    attn.store_kv(c, c.copy(), x, x, np.zeros(1, np.int64), kv_dtype="int8")
    assert c[0, 0, 0, :64].view(np.int8).tolist() == [127] * 64
    with pytest.raises(ValueError, match="must be uint8"):
        attn.store_kv(c.astype(np.float32), c.astype(np.float32), x, x, np.zeros(1, np.int64), kv_dtype="fp8")


# ---------------------------------------------------------------- attention
CASES = [
    # q_lens (prefill), ctx_lens, H, KVH, D, B
    ([5, 70, 0], [5, 131, 9], 9, 3, 64, 16),       # the default model's heads, a cached prefix, GQA 3
    ([13, 2], [29, 40], 6, 2, 37, 5),              # odd head dim and block size, row-major tiles
    ([33], [300], 8, 1, 128, 16),                  # MQA 8, head dim 128, several key blocks
]


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("q_lens, ctx_lens, h, kvh, d, block", CASES)
def test_prefill_and_decode_attention_read_the_cache_as_its_values(kv, q_lens, ctx_lens, h, kvh, d, block):
    rng = np.random.default_rng(sum(ctx_lens) + d)
    kc, vc, k32, v32, tables = filled_caches(rng, kv, ctx_lens, block, kvh, d)
    k_vals, v_vals = ref_decode(np.asarray(kc), kv), ref_decode(np.asarray(vc), kv)
    ctx = np.array(ctx_lens, np.int32)
    scale = 1 / np.sqrt(d)
    # prefill: the last q_len positions of each sequence
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), h, d)).astype(np.float32)
    got = attn.attention_prefill(q, kc, vc, tables, cu, ctx, scale)
    np.testing.assert_allclose(got, ref_attention(q, k_vals, v_vals, tables, cu, ctx, scale), atol=ATOL, rtol=0)
    f32 = attn.attention_prefill(q, k32, v32, tables, cu, ctx, scale)
    assert np.abs(got - f32).max() <= VS_FLOAT32[kv]
    # decode: one query per sequence, one and several flash-decoding chunks
    qd = rng.standard_normal((len(ctx_lens), h, d)).astype(np.float32)
    cu1 = np.arange(len(ctx_lens) + 1, dtype=np.int32)
    want = ref_attention(qd, k_vals, v_vals, tables, cu1, ctx, scale)
    for splits in (None, 1, 3):
        got = attn.attention_decode(qd, kc, vc, tables, ctx, scale, num_splits=splits)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    f32 = attn.attention_decode(qd, k32, v32, tables, ctx, scale)
    assert np.abs(attn.attention_decode(qd, kc, vc, tables, ctx, scale) - f32).max() <= VS_FLOAT32[kv]


def test_float32_caches_keep_their_bits():
    """A float32 cache through the dtype-aware kernels: the same bits as a plain float32 array."""
    rng = np.random.default_rng(1)
    kc, vc, _, _, tables = filled_caches(rng, "float32", [40, 7], 16, 3, 64)
    plain_k, plain_v = np.asarray(kc).copy(), np.asarray(vc).copy()
    q = rng.standard_normal((2, 9, 64)).astype(np.float32)
    ctx = np.array([40, 7], np.int32)
    assert np.array_equal(attn.attention_decode(q, kc, vc, tables, ctx, 0.125),
                          attn.attention_decode(q, plain_k, plain_v, tables, ctx, 0.125))


# ---------------------------------------------------------------- the model: fused step, pool, LLM
@pytest.fixture(scope="module")
def tiny(make_hf_model, cpu_backend):
    from mojollm.models import load_model

    path, _ = make_hf_model("llama", seed=5, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                            num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=1024)
    return lambda: load_model(str(path), cpu_backend)


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
def test_fused_decode_step_equals_the_per_op_path(tiny, kv):
    from test_decode_fused import _decode_batch, _quantized

    from mojollm.engine.step import StepBatch
    from mojollm.kernels.decode import DecodeProgram, unsupported_reason

    model = _quantized(tiny(), ("Q8_0",))
    assert model.set_kv_cache_dtype(kv) == kv
    B = 16
    model.allocate_kv_cache(80, B)
    assert unsupported_reason(model) is None
    rng = np.random.default_rng(3)
    lens, tables, start = [3, 300, 40], [], 0
    for n in lens:
        tables.append(list(range(start, start + -(-(n + 1) // B))))
        start += len(tables[-1])
        model.forward(StepBatch.single_sequence(rng.integers(3, 200, size=n), 0, tables[-1], B))
    batch = _decode_batch(rng, lens, tables, B, model.config.vocab_size)
    saved = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    want = model.forward(batch)
    written = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    for (k, v), (k0, v0) in zip(model.kv_caches, saved):
        k[...], v[...] = k0, v0
    _, got = DecodeProgram(model, max_seqs=4).run(batch)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    for (k, v), (kw, vw) in zip(model.kv_caches, written):   # the step writes the same bytes
        assert np.array_equal(np.asarray(k), np.asarray(kw)) and np.array_equal(np.asarray(v), np.asarray(vw))


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
def test_the_pool_holds_the_blocks_of_the_format(tiny, kv):
    from mojollm.engine.engine import Engine

    model = tiny()
    c = model.config
    eng = Engine(model, block_size=16, kv_cache_memory="8MiB", kv_cache_dtype=kv, max_num_seqs=2)
    per_block = 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * row_bytes(kv, c.head_dim)
    assert model.kv_cache_bytes_per_block(16) == per_block
    assert eng.num_blocks == (8 << 20) // per_block
    k, _ = model.kv_caches[0]
    assert k.nbytes == eng.num_blocks * per_block // (2 * c.num_hidden_layers)
    assert getattr(k, "kv_dtype") == kv == eng.kv_cache_dtype


def test_int8_and_fp8_blocks_on_the_default_model_size():
    """D = 64: 68 bytes per head row against 256 in float32."""
    assert row_bytes("float32", 64) / row_bytes("int8", 64) == pytest.approx(3.765, abs=1e-3)
    assert row_bytes("bfloat16", 64) == row_bytes("float16", 64) == 128


def test_a_bad_kv_cache_dtype_is_a_one_line_error(tiny, cpu_backend):
    from mojollm.engine.engine import Engine
    from mojollm.kv_dtypes import resolve

    with pytest.raises(ValueError, match=r"^kv_cache_dtype must be one of auto, float32, .*; got 'int4'$"):
        Engine(tiny(), kv_cache_memory="1MiB", kv_cache_dtype="int4")

    class Fp32Only:
        name = "fake"

        def kv_cache_dtype(self, qtype):
            return "float32"

        def kv_cache_dtypes(self):
            return ()

    with pytest.raises(ValueError, match=r"^kv_cache_dtype 'fp8' is not supported on the fake backend \(it runs: float32\)$"):
        resolve("fp8", Fp32Only(), "Q4_0")
    assert resolve("AUTO", cpu_backend, "Q4_0") == "float32"


def test_cli_refuses_a_bad_kv_cache_dtype_in_one_line():
    from click.testing import CliRunner

    from mojollm.cli import cli

    for argv in (["generate", "hi", "--kv-cache-dtype", "int4"], ["perplexity", __file__, "--kv-cache-dtype", "q"]):
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 2
        assert res.output.count("\n") == 1 and "--kv-cache-dtype" in res.output


def test_default_model_greedy_output_with_16bit_caches(default_gguf):
    """bfloat16 / float16 KV: float32's greedy tokens, up to the first near tie of float32's
    logits (top two within NEAR_TIE)."""
    from mojollm.llm import LLM
    from mojollm.sampling_params import SamplingParams

    NEAR_TIE = 0.05
    prompts = ["The capital of France is", "def fib(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    ref = LLM(str(default_gguf), backend="cpu", kv_cache_memory="16MiB").generate(prompts, params)
    for kv in ("bfloat16", "float16"):
        outs = LLM(str(default_gguf), backend="cpu", kv_cache_memory="16MiB", kv_cache_dtype=kv).generate(prompts, params)
        for r, o in zip(ref, outs):
            want, got = r.outputs[0], o.outputs[0]
            for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)):
                if a != b:
                    top = sorted(want.logprobs[i]["top"].values(), reverse=True)
                    assert top[0] - top[1] < NEAR_TIE, (kv, i)
                    break


# ---------------------------------------------------------------- the tpu backend (JAX; XLA:CPU here)
@pytest.fixture(scope="module")
def tpu():
    pytest.importorskip("jax", reason="jax is the tpu backend's optional dependency (the test extra installs it)")
    from mojollm.backends.tpu.backend import TpuBackend

    return TpuBackend()


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
def test_tpu_store_kv_and_attention_on_each_dtype(tpu, kv):
    """The tpu backend writes the format (16-bit: the reference's bytes; int8 / fp8: XLA:CPU divides
    by multiplying with the reciprocal, so a scale may be 1 ulp off the reference's and a code one
    step off at a tie: the row's values stay within half a step of x, plus that ulp) and attends
    over the dequantized values (jnp, inside the jitted op) to the float64 reference."""
    q_lens, ctx_lens, h, kvh, d, block = [13, 2, 0], [29, 40, 7], 6, 2, 37, 5
    rng = np.random.default_rng(7)
    m = max(-(-c // block) for c in ctx_lens) + 1
    nb = len(ctx_lens) * m + 3
    tables = rng.permutation(nb).astype(np.int32)[: len(ctx_lens) * m].reshape(len(ctx_lens), m).copy()
    kc = tpu.kv_cache_zeros((nb, block, kvh, row_width(kv, d)), kv)
    vc = tpu.kv_cache_zeros(kc.shape, kv)
    for s, ctx in enumerate(ctx_lens):
        pos = np.arange(ctx)
        slots = tables[s][pos // block].astype(np.int64) * block + pos % block
        k = rng.standard_normal((ctx, kvh, d)).astype(np.float32)
        v = rng.standard_normal((ctx, kvh, d)).astype(np.float32)
        if s == 0:
            k[2] = 0.0
        tpu.store_kv(kc, vc, tpu.asarray(k), tpu.asarray(v), tpu.asarray(slots, "int64"))
        for cache, x in ((kc, k), (vc, v)):
            got = np.asarray(cache.array).reshape(-1, kvh, row_width(kv, d))[slots].view(np.uint8)
            want = ref_encode(x, kv).view(np.uint8)
            if kv not in ("int8", "fp8"):
                assert np.array_equal(got, want), kv
                continue
            s_got, s_want = (np.ascontiguousarray(c[..., -4:]).view("<f4")[..., 0] for c in (got, want))
            assert (np.abs(s_got - s_want) <= np.spacing(s_want)).all()
            amax = np.abs(x).max(axis=-1, keepdims=True)
            step = amax / 127 if kv == "int8" else np.maximum(np.abs(x) / 8, amax / 448 * 2.0 ** -9)
            assert (np.abs(ref_decode(got, kv) - x) <= step * (0.5 + 1e-5)).all()
            assert (got[..., :-4] == want[..., :-4]).mean() > 0.99
    k_vals, v_vals = (ref_decode(np.asarray(c.array).view(STORAGE[kv]), kv) for c in (kc, vc))
    ctx = np.array(ctx_lens, np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), h, d)).astype(np.float32)
    got = tpu.to_numpy(tpu.attention_prefill(tpu.asarray(q), kc, vc, tpu.asarray(tables, "int32"),
                                             tpu.asarray(cu, "int32"), tpu.asarray(ctx, "int32"), 0.2))
    np.testing.assert_allclose(got, ref_attention(q, k_vals, v_vals, tables, cu, ctx, 0.2), atol=ATOL, rtol=0)
    qd = rng.standard_normal((3, h, d)).astype(np.float32)
    got = tpu.to_numpy(tpu.attention_decode(tpu.asarray(qd), kc, vc, tpu.asarray(tables, "int32"),
                                            tpu.asarray(ctx, "int32"), 0.2))
    want = ref_attention(qd, k_vals, v_vals, tables, np.arange(4, dtype=np.int32), ctx, 0.2)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv", ["bfloat16", "int8", "fp8"])
def test_tpu_runner_steps_over_a_quantized_cache(tpu, kv, cpu_backend):
    """LLM on the tpu backend (its runner: one jitted program per step, caches donated) with a
    16/8-bit cache: the greedy tokens of the cpu backend with the same cache dtype (the 2-layer
    model of test_tpu_runner has sharp logits: no near ties), every block back at the end."""
    from test_tpu_runner import tiny_model

    from mojollm.backends.tpu.runner import TpuRunner
    from mojollm.llm import LLM
    from mojollm.sampling_params import SamplingParams

    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, 300, n).tolist() for n in (30, 5, 12)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = LLM(tiny_model(cpu_backend), block_size=4, num_blocks=64, kv_cache_dtype=kv).generate(prompts, sp)
    llm = LLM(tiny_model(tpu), block_size=4, num_blocks=64, max_num_batched_tokens=16, kv_cache_dtype=kv)
    assert isinstance(llm.engine.runner, TpuRunner) and llm.model.kv_caches[0][0].kv_dtype == kv
    assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in ref]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
