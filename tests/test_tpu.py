"""The tpu backend (JAX/XLA + Pallas) against float64 numpy references written here, the gguf
package's dequantizer, HF transformers, and the cpu backend.

Runs on whatever JAX device exists (XLA:CPU in CI). The Pallas kernels run in interpret mode.
Error bounds (max |got - ref| / max |ref|): float32 paths 2e-5 (elementwise 1e-5), bfloat16 weights 2e-2.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is the tpu backend's optional dependency (the test extra "
                                         "installs it); the cpu path needs none of it")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from mojollm.backends.tpu import pallas_kernels, xla_ops  # noqa: E402
from mojollm.backends.tpu.backend import TpuBackend  # noqa: E402
from mojollm.weights import WeightTensor  # noqa: E402

F32_TOL, ELEM_TOL, BF16_TOL = 2e-5, 1e-5, 2e-2


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def make_backend(**env) -> TpuBackend:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        return TpuBackend()


@pytest.fixture(scope="module")
def xb():
    """Default configuration on this machine: jnp/XLA ops, float32 weights on CPU, GGUF widened."""
    return make_backend()


@pytest.fixture(scope="module")
def pb():
    """Pallas kernels in interpret mode and GGUF weights kept as int8 + group scales."""
    return make_backend(MOJOLLM_TPU_PALLAS="interpret")


# ------------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------------
def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ref_rope(x, pos, theta, rot, neox):
    x = x.astype(np.float64).copy()
    inv = theta ** (-np.arange(rot // 2) * 2.0 / rot)
    ang = pos[:, None].astype(np.float64) * inv[None]                # [T, rot/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    if neox:
        i1, i2 = np.arange(rot // 2), np.arange(rot // 2) + rot // 2
    else:
        i1, i2 = np.arange(0, rot, 2), np.arange(1, rot, 2)
    a, b = x[..., i1].copy(), x[..., i2].copy()
    x[..., i1], x[..., i2] = a * c - b * s, b * c + a * s
    return x


def ref_attention(q, kc, vc, tables, cu, ctx, scale):
    """Each query i of sequence s sits at position ctx[s] - q_len + i and sees positions 0..itself."""
    t, h, d = q.shape
    _, bs, kvh, _ = kc.shape
    g = h // kvh
    out = np.zeros((t, h, d))
    for s in range(len(ctx)):
        q_len = cu[s + 1] - cu[s]
        for i in range(q_len):
            pos = ctx[s] - q_len + i
            p = np.arange(pos + 1)
            k = kc[tables[s, p // bs], p % bs].astype(np.float64)       # [P, KVH, D]
            v = vc[tables[s, p // bs], p % bs].astype(np.float64)
            for hh in range(h):
                sc = k[:, hh // g] @ q[cu[s] + i, hh].astype(np.float64) * scale
                w = np.exp(sc - sc.max())
                out[cu[s] + i, hh] = (w / w.sum()) @ v[:, hh // g]
    return out


def quantized(name, rng, rows, cols, qtype) -> tuple[WeightTensor, np.ndarray]:
    """A GGUF-quantized weight (gguf's quantizer) and its float64 dequantization (gguf's dequantizer)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == "F32":
        return WeightTensor.from_float(name, w), w.astype(np.float64)
    data = quantize(w, GGMLQuantizationType[qtype])
    return WeightTensor(name, (rows, cols), qtype, data), dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)


def random_paged_cache(rng, num_blocks, bs, kvh, d):
    kc = rng.standard_normal((num_blocks, bs, kvh, d)).astype(np.float32)
    vc = rng.standard_normal((num_blocks, bs, kvh, d)).astype(np.float32)
    return kc, vc


def block_tables_for(rng, ctx, bs, num_blocks, extra_cols=1):
    """Distinct shuffled blocks per sequence, one spare (garbage) column beyond the longest context."""
    need = [(c + bs - 1) // bs for c in ctx]
    width = max(need) + extra_cols
    ids = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, (len(ctx), width)).astype(np.int32)   # garbage past the context
    at = 0
    for s, n in enumerate(need):
        tables[s, :n] = ids[at:at + n]
        at += n
    return tables


def put_cache(backend, kc, vc):
    return backend.asarray(kc), backend.asarray(vc)


# ------------------------------------------------------------------------------------------------
# discovery and import hygiene
# ------------------------------------------------------------------------------------------------
def test_import_mojollm_does_not_import_jax():
    code = ("import mojollm, mojollm.backends, sys\n"
            "from mojollm.backends import registry\n"
            "registry.backend_class('tpu')\n"            # the registry imports the module to probe it
            "assert 'jax' not in sys.modules, 'jax imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_probe_without_jax_gives_install_hint():
    code = ("import sys; sys.modules['jax'] = None\n"  # makes `import jax` raise ImportError
            "from mojollm.backends.tpu.backend import TpuBackend\n"
            "p = TpuBackend.probe()\n"
            "assert not p.available and p.device == '', p\n"
            "assert p.reason == \"jax not installed (pip install 'mojollm[tpu]')\", p.reason\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_probe_names_the_platform(xb):
    p = TpuBackend.probe()
    assert p.available and p.reason == ""
    platform = jax.devices()[0].platform
    if platform == "tpu":
        assert "TPU" in p.device
    else:
        assert f"tpu backend on XLA:{platform.upper()}" in p.device and "no TPU" in p.device
    assert p.device in xb.describe()


# ------------------------------------------------------------------------------------------------
# elementwise ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,k", [(1, 7), (7, 577)])
def test_norms_add_silu(xb, t, k):
    rng = np.random.default_rng(t * 1000 + k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    r = rng.standard_normal((t, k)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, k).astype(np.float32)
    gu = rng.standard_normal((t, 2 * k)).astype(np.float32)
    eps = 1e-5
    assert rel_err(xb.to_numpy(xb.rms_norm(xb.asarray(x), xb.asarray(w), eps)), ref_rms_norm(x, w, eps)) < ELEM_TOL
    normed, new_res = xb.add_rms_norm(xb.asarray(x), xb.asarray(r), xb.asarray(w), eps)
    s64 = x.astype(np.float64) + r
    assert rel_err(xb.to_numpy(new_res), s64) < ELEM_TOL
    assert rel_err(xb.to_numpy(normed), ref_rms_norm(s64, w, eps)) < ELEM_TOL
    assert rel_err(xb.to_numpy(xb.add(xb.asarray(x), xb.asarray(r))), s64) < ELEM_TOL
    g, u = gu[:, :k].astype(np.float64), gu[:, k:].astype(np.float64)
    assert rel_err(xb.to_numpy(xb.silu_mul(xb.asarray(gu))), g / (1 + np.exp(-g)) * u) < ELEM_TOL


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("d,rot", [(64, 64), (34, 18)])
def test_rope(xb, neox, d, rot):
    rng = np.random.default_rng(d + rot + neox)
    t, h, theta, max_pos = 7, 3, 10000.0, 300
    x = rng.standard_normal((t, h, d)).astype(np.float32)
    pos = rng.integers(0, max_pos, t).astype(np.int32)
    ang = np.arange(max_pos)[:, None] * theta ** (-np.arange(rot // 2) * 2.0 / rot)[None]
    cos_sin = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    got = xb.rope(xb.asarray(x), xb.asarray(pos, "int32"), xb.asarray(cos_sin), neox)
    assert rel_err(xb.to_numpy(got), ref_rope(x, pos, theta, rot, neox)) < ELEM_TOL


# ------------------------------------------------------------------------------------------------
# weights: GGUF unpacking, embedding, linear (dense / widened / int8 jnp / Pallas interpret)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_unpack_gguf_matches_gguf_dequantize(qtype):
    rng = np.random.default_rng(3)
    w, ref = quantized("w", rng, 33, 96, qtype)
    q, s, m = xla_ops.unpack_gguf(w)
    assert q.dtype == np.int8 and s.shape == (33, 3) and (m is None) == (qtype != "Q4_1")
    deq = q.astype(np.float64).reshape(33, 3, 32) * s[:, :, None] + (0 if m is None else m[:, :, None])
    assert rel_err(deq.reshape(33, 96), ref) < 1e-6


@pytest.mark.parametrize("qtype", ["F32", "Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("which", ["xb", "pb"])
def test_embedding(request, which, qtype):
    be = request.getfixturevalue(which)
    rng = np.random.default_rng(11)
    w, ref = quantized("emb", rng, 37, 96, qtype)
    table = be.prepare_embedding(w)
    ids = rng.integers(0, 37, 9).astype(np.int32)
    assert rel_err(be.to_numpy(be.embedding(table, be.asarray(ids, "int32"))), ref[ids]) < ELEM_TOL
    with pytest.raises(ValueError, match="out of range"):
        be.embedding(table, be.asarray(np.array([0, 37]), "int32"))


@pytest.mark.parametrize("qtype", ["F32", "Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("which", ["xb", "pb", "int_jnp"])
@pytest.mark.parametrize("t", [1, 5])
def test_linear(request, which, qtype, t):
    be = make_backend(MOJOLLM_TPU_QUANT="int") if which == "int_jnp" else request.getfixturevalue(which)
    rng = np.random.default_rng(t * 7 + len(qtype))
    n, k = (33, 577) if qtype == "F32" else (33, 96)
    w, ref_w = quantized("w", rng, n, k, qtype)
    x = rng.standard_normal((t, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    lin = be.prepare_linear(w)
    ref = x.astype(np.float64) @ ref_w.T
    assert rel_err(be.to_numpy(be.linear(be.asarray(x), lin)), ref) < F32_TOL
    assert rel_err(be.to_numpy(be.linear(be.asarray(x), lin, be.asarray(bias))), ref + bias) < F32_TOL
    with pytest.raises(ValueError, match="linear"):
        be.linear(be.asarray(x[:, :-1]), lin)


def test_linear_bfloat16_weights():
    """The TPU default dtype policy (bf16 weights, float32 accumulation), run on this device."""
    be = make_backend(MOJOLLM_TPU_DTYPE="bfloat16")
    rng = np.random.default_rng(5)
    w, ref_w = quantized("w", rng, 65, 577, "F32")
    x = rng.standard_normal((3, 577)).astype(np.float32)
    err = rel_err(be.to_numpy(be.linear(be.asarray(x), be.prepare_linear(w))), x.astype(np.float64) @ ref_w.T)
    assert 1e-5 < err < BF16_TOL   # really rounded to bf16, and within its bound


@pytest.mark.parametrize("t,k,n,mins", [(5, 512, 256, True), (1, 96, 96, False), (3, 768, 384, False)])
def test_pallas_quantized_matmul_interpret(t, k, n, mins):
    """Tiles: (512, 256) -> tk 256, two K steps accumulate; (96, 96) -> whole-array block."""
    rng = np.random.default_rng(k + n)
    q = rng.integers(-8, 16, (k, n)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (k // 32, n)).astype(np.float32)
    m = rng.uniform(-0.2, 0.2, (k // 32, n)).astype(np.float32) if mins else None
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = q.astype(np.float64).reshape(k // 32, 32, n) * s[:, None, :] + (0 if m is None else m[:, None, :])
    got = pallas_kernels.quantized_matmul(x, q, s, m, group=32, interpret=True)
    assert rel_err(got, x.astype(np.float64) @ w.reshape(k, n)) < F32_TOL


# ------------------------------------------------------------------------------------------------
# KV cache and attention
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [1, 16])
def test_store_kv(xb, bs):
    rng = np.random.default_rng(bs)
    nb, kvh, d = 9, 3, 8
    kc, vc = xb.zeros((nb, bs, kvh, d)), xb.zeros((nb, bs, kvh, d))
    ref_k, ref_v = np.zeros((nb * bs, kvh, d)), np.zeros((nb * bs, kvh, d))
    for t in (7, 2):   # a second write must leave the first one's other slots alone
        slots = rng.choice(nb * bs, t, replace=False).astype(np.int64)
        k, v = rng.standard_normal((2, t, kvh, d)).astype(np.float32)
        xb.store_kv(kc, vc, xb.asarray(k), xb.asarray(v), xb.asarray(slots, "int64"))
        ref_k[slots], ref_v[slots] = k, v
    assert np.array_equal(xb.to_numpy(kc).reshape(nb * bs, kvh, d), ref_k)
    assert np.array_equal(xb.to_numpy(vc).reshape(nb * bs, kvh, d), ref_v)
    with pytest.raises(ValueError, match="slot"):
        xb.store_kv(kc, vc, xb.asarray(k), xb.asarray(v), xb.asarray(np.full(2, nb * bs), "int64"))
    with pytest.raises(ValueError, match="zeros"):
        xb.store_kv(kc.array, vc.array, xb.asarray(k), xb.asarray(v), xb.asarray(slots, "int64"))


@pytest.mark.parametrize("which", ["xb", "pb"])
@pytest.mark.parametrize("kvh,g", [(2, 1), (3, 3), (1, 8)])
@pytest.mark.parametrize("bs", [1, 16])
def test_attention_decode(request, which, kvh, g, bs):
    be = request.getfixturevalue(which)
    rng = np.random.default_rng(kvh * 100 + g * 10 + bs)
    d, nb = 16, 40 if bs == 16 else 160
    ctx = np.array([1, 33, bs, 47][: 3 if bs == 1 else 4], np.int32)
    kc, vc = random_paged_cache(rng, nb, bs, kvh, d)
    tables = block_tables_for(rng, ctx, bs, nb)
    q = rng.standard_normal((len(ctx), kvh * g, d)).astype(np.float32)
    k_dev, v_dev = put_cache(be, kc, vc)
    got = be.attention_decode(be.asarray(q), k_dev, v_dev, be.asarray(tables, "int32"), be.asarray(ctx, "int32"), 0.3)
    cu = np.arange(len(ctx) + 1)
    assert rel_err(be.to_numpy(got), ref_attention(q, kc, vc, tables, cu, ctx, 0.3)) < F32_TOL


@pytest.mark.parametrize("kvh,g,bs", [(3, 3, 16), (1, 8, 1), (2, 1, 16)])
def test_attention_prefill_with_cached_prefix(xb, kvh, g, bs):
    """Ragged batch: a fresh prompt, a prompt continuing a cached prefix, a 1-token chunk."""
    rng = np.random.default_rng(kvh + g + bs)
    d, nb = 8, 200
    q_lens = np.array([13, 6, 1])
    ctx = np.array([13, 37, 20], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kc, vc = random_paged_cache(rng, nb, bs, kvh, d)
    tables = block_tables_for(rng, ctx, bs, nb)
    q = rng.standard_normal((cu[-1], kvh * g, d)).astype(np.float32)
    k_dev, v_dev = put_cache(xb, kc, vc)
    got = xb.attention_prefill(xb.asarray(q), k_dev, v_dev, xb.asarray(tables, "int32"), xb.asarray(cu, "int32"),
                               xb.asarray(ctx, "int32"), 0.25)
    assert rel_err(xb.to_numpy(got), ref_attention(q, kc, vc, tables, cu, ctx, 0.25)) < F32_TOL


def test_attention_prefill_long_prompt_chunks(xb):
    """A 300-token prompt runs as two 256-row query chunks (window 512)."""
    rng = np.random.default_rng(300)
    kvh, g, d, bs, nb = 1, 2, 8, 16, 40
    ctx = np.array([300], np.int32)
    cu = np.array([0, 300], np.int32)
    kc, vc = random_paged_cache(rng, nb, bs, kvh, d)
    tables = block_tables_for(rng, ctx, bs, nb)
    q = rng.standard_normal((300, kvh * g, d)).astype(np.float32)
    k_dev, v_dev = put_cache(xb, kc, vc)
    got = xb.attention_prefill(xb.asarray(q), k_dev, v_dev, xb.asarray(tables, "int32"), xb.asarray(cu, "int32"),
                               xb.asarray(ctx, "int32"), 0.5)
    assert rel_err(xb.to_numpy(got), ref_attention(q, kc, vc, tables, cu, ctx, 0.5)) < F32_TOL


def test_pallas_decode_attention_kernel_interpret():
    """The kernel itself (bfloat16 cache, as on TPU) vs the float64 reference of the same bf16 values."""
    rng = np.random.default_rng(77)
    kvh, g, d, bs, nb = 2, 4, 32, 16, 30
    ctx = np.array([5, 16, 17, 64], np.int32)
    kc, vc = random_paged_cache(rng, nb, bs, kvh, d)
    kc16, vc16 = jax.numpy.asarray(kc, jax.numpy.bfloat16), jax.numpy.asarray(vc, jax.numpy.bfloat16)
    tables = block_tables_for(rng, ctx, bs, nb, extra_cols=3)
    q = rng.standard_normal((len(ctx), kvh * g, d)).astype(np.float32)
    got = pallas_kernels.paged_decode_attention(q, kc16, vc16, tables, ctx, scale=0.2, interpret=True)
    ref = ref_attention(q, np.asarray(kc16, np.float32), np.asarray(vc16, np.float32), tables,
                        np.arange(len(ctx) + 1), ctx, 0.2)
    assert rel_err(got, ref) < BF16_TOL


def test_attention_rejects_bad_tables(xb):
    rng = np.random.default_rng(1)
    kc, vc = random_paged_cache(rng, 4, 16, 1, 8)
    k_dev, v_dev = put_cache(xb, kc, vc)
    q = xb.asarray(rng.standard_normal((1, 2, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="block id"):
        xb.attention_decode(q, k_dev, v_dev, xb.asarray(np.array([[0, 4]]), "int32"), xb.asarray(np.array([20]), "int32"), 1.0)
    with pytest.raises(ValueError, match="needs 2 blocks"):
        xb.attention_decode(q, k_dev, v_dev, xb.asarray(np.array([[0]]), "int32"), xb.asarray(np.array([20]), "int32"), 1.0)


def test_pallas_kernels_lower_for_tpu():
    """Pallas -> Mosaic lowering for a TPU v5e target, without a TPU (cross-platform export). Checks
    the block-shape rules and op lowering; Mosaic's own compilation needs libtpu and is not run."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        target = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
        registry = tpu_info.registry
    except (ImportError, AttributeError) as e:
        pytest.skip(reason=f"this jax keeps no TPU target registry for cross-lowering: {e}")
    from functools import partial
    sd, jnp = jax.ShapeDtypeStruct, jax.numpy
    kind = jax.devices()[0].device_kind
    registry[kind] = lambda: target
    try:
        for dt in (jnp.float32, jnp.bfloat16):
            for kvh, g, bs in [(3, 3, 16), (1, 8, 1)]:
                f = jax.jit(partial(pallas_kernels.paged_decode_attention, scale=0.125))
                exp = jax.export.export(f, platforms=["tpu"])(
                    sd((2, kvh * g, 64), dt), sd((40, bs, kvh, 64), dt), sd((40, bs, kvh, 64), dt),
                    sd((2, 8), jnp.int32), sd((2,), jnp.int32))
                assert "tpu_custom_call" in exp.mlir_module()
            for t, k, n, mins in [(1, 576, 1536, True), (7, 1536, 576, False)]:
                f = jax.jit(partial(pallas_kernels.quantized_matmul, group=32))
                exp = jax.export.export(f, platforms=["tpu"])(
                    sd((t, k), dt), sd((k, n), jnp.int8), sd((k // 32, n), jnp.float32),
                    sd((k // 32, n), jnp.float32) if mins else None)
                assert "tpu_custom_call" in exp.mlir_module()
    finally:
        registry.pop(kind, None)


# ------------------------------------------------------------------------------------------------
# model level
# ------------------------------------------------------------------------------------------------
def test_model_logits_match_transformers(make_hf_model):
    """Random-weight Llama (GQA 4/2, safetensors): prefill of 11 tokens + 4 decode steps through a
    shuffled paged cache, every position's logits vs transformers' full forward, with the ops run
    one by one (model.forward; the runner's jitted steps are checked in test_tpu_runner.py)."""
    torch = pytest.importorskip("torch", reason="torch is an optional dependency (the test extra "
                                               "installs it); the cpu path needs none of it")
    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    path, hf = make_hf_model("llama", num_hidden_layers=3)
    model = load_model(path, backend=make_backend())
    bs = 4
    model.allocate_kv_cache(16, bs)
    table = np.random.default_rng(0).permutation(16).astype(np.int32)
    ids = np.random.default_rng(1).integers(2, model.config.vocab_size, 15)
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].double().numpy()
    got = [model.forward(StepBatch.single_sequence(ids[:11], 0, table, bs, all_logits=True))]
    for p in range(11, 15):
        got.append(model.forward(StepBatch.single_sequence(ids[p:p + 1], p, table, bs)))
    assert rel_err(np.concatenate(got), ref) < 1e-4


@pytest.mark.slow
def test_greedy_parity_with_cpu_backend_on_default_model(xb, default_gguf, cpu_backend):
    """The default model (Q4_1 + Q8_0 GGUF): 12 greedy tokens identical to the cpu backend's, and the
    prompt's logits within 1e-4 (both compute with the exactly dequantized weights in float32;
    measured 3.6e-6)."""
    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    def greedy(backend, n):
        model = load_model(default_gguf, backend=backend)
        model.allocate_kv_cache(8, 16)
        table = np.arange(8, dtype=np.int32)
        prompt = model.tokenizer.encode("The three primary colors are")
        prompt_logits = model.forward(StepBatch.single_sequence(prompt, 0, table, 16, all_logits=True))
        out = [int(prompt_logits[-1].argmax())]
        for i in range(n - 1):
            logits = model.forward(StepBatch.single_sequence(out[-1:], len(prompt) + i, table, 16))
            out.append(int(logits[-1].argmax()))
        return out, prompt_logits

    tpu_tokens, tpu_logits = greedy(xb, 12)
    from mojollm.kernels import quant

    previous = quant.set_default_dot("float")  # the cpu backend's float path (int8 activations: ~1e-2)
    try:
        cpu_tokens, cpu_logits = greedy(cpu_backend, 12)
    finally:
        quant.set_default_dot(previous)
    assert rel_err(tpu_logits, cpu_logits) < 1e-4
    assert tpu_tokens == cpu_tokens
