"""KV caches in every dtype of mojollm.kv_dtypes on the cuda backend, against independent numpy
references (the format: per (slot, head) row the D codes, then a little-endian float32 scale s,
value = s * code; float16 / bfloat16 / float32 rows are plain casts).

  store_kv      the bytes equal a numpy quantizer of the format, exactly: both sides compute
                s = max|row| / 127 (or / 448) and x / s as IEEE float32 divisions and round half
                to even (int8 with np.rint; E4M3 by torch's float8_e4m3fn cast, saturated), so
                there is no tolerance to state.
  attention     decode and paged (chunked) prefill against float64 attention over the cache's
                own dequantized values (the codes and scales read back from the device): the
                kernels see exactly those values, so the error is the kernels' arithmetic alone:
                  float32 arithmetic (decode; the SIMT prefill of head dims 80)     F32 = 1e-5
                  tensor cores (the prefill of head dims 64 / 128): q and the probabilities
                    rounded to bfloat16 (float16 caches: float16), int8 / fp8 tiles' values
                    s * code too, 2^-9 relative each, float32 accumulation          TC = 1e-2
  LLM           a random model behind LLM(kv_cache_dtype=...): see test_llm_round_trip.
  copy_kv_rows  whole W-byte rows move (codes and scale together).

The GPU tests skip without a CUDA device; the ABI codes and the numpy references are checked
everywhere.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import pytest

from mojollm.engine.step import StepBatch
from mojollm.kv_dtypes import KV_CACHE_DTYPES, QUANTIZED, row_bytes, row_width
from mojollm.sampling_params import SamplingParams

F32 = 1e-5
TC = 1e-2
# Random model for the LLM round trip: tests/test_gpu.py's RUNNER_CONFIG (head dim 32)
RUNNER_CONFIG = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=320,
                     num_hidden_layers=3, max_position_embeddings=2048)


def _cuda():
    if not glob.glob("/dev/nvidia*"):
        pytest.skip(reason="no CUDA device on this machine (the cuda KV-cache kernels run on a GPU machine; the "
                           "format's references and the kernel ABI are checked everywhere)")
    from mojollm.backends import registry

    return registry.get_backend("cuda")


# ---- numpy references of the format ------------------------------------------------------------
def quantize_rows(x: np.ndarray, kv: str) -> np.ndarray:
    """float32 [..., D] -> stored rows [..., W] of kv (uint8 for int8 / fp8, else the float type)."""
    import torch

    x = np.asarray(x, np.float32)
    if kv == "float32":
        return x.copy()
    if kv == "float16":
        return x.astype(np.float16)
    if kv == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    qmax = np.float32(127.0 if kv == "int8" else 448.0)
    bad = ~np.isfinite(x).all(axis=-1, keepdims=True)
    amax = np.abs(np.where(bad, 0, x)).max(axis=-1, keepdims=True)
    s = (amax / qmax).astype(np.float32)                          # IEEE float32 division
    ok = (s > 0) & ~bad
    y = np.where(ok, np.where(ok, x, 0) / np.where(ok, s, 1), 0).astype(np.float32)
    if kv == "int8":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8).view(np.uint8)
    else:
        codes = torch.from_numpy(np.clip(y, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    s = np.where(bad, np.float32(np.nan), s).astype("<f4")
    return np.concatenate([codes, s.view(np.uint8)], axis=-1)


def dequantize_rows(c: np.ndarray, kv: str) -> np.ndarray:
    """Stored rows [..., W] -> float64 values [..., D] (value = s * code)."""
    import torch

    if kv in ("float32", "float16"):
        return np.asarray(c, np.float64)
    if kv == "bfloat16":
        return (np.asarray(c).view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    c = np.ascontiguousarray(c, np.uint8)
    s = c[..., -4:].copy().view("<f4")[..., 0].astype(np.float64)
    codes = c[..., :-4]
    if kv == "int8":
        vals = codes.view(np.int8).astype(np.float64)
    else:
        vals = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy().astype(np.float64)
    return vals * s[..., None]


def cache_bytes(gpu, cache) -> np.ndarray:
    """A cache's stored elements on the host (bfloat16 as uint16 bits)."""
    import torch

    if cache.dtype == torch.bfloat16:
        return cache.view(torch.int16).cpu().numpy().view(np.uint16)
    return cache.cpu().numpy()


def _rows(rng, n, kvh, d, spread=3.5):
    """[n, kvh, d] float32 rows whose magnitudes span exp(+-spread) (3 decades by default: per-row
    scales matter), with a few outliers and one all-zero row."""
    x = rng.standard_normal((n, kvh, d)).astype(np.float32)
    x *= np.exp(rng.uniform(-spread, spread, (n, kvh, 1))).astype(np.float32)
    x[rng.integers(0, n, 5), rng.integers(0, kvh, 5), rng.integers(0, d, 5)] *= 30
    x[n // 2, 0] = 0
    return x


# ---- everywhere --------------------------------------------------------------------------------
def test_kv_codes_match_gpu_common():
    from mojollm.backends.cuda import backend as cb

    text = (Path(cb.__file__).resolve().parent / "gpu_common.mojo").read_text()
    c = {m[1]: int(m[2]) for m in re.finditer(r"^comptime (\w+) = (\d+)\s*$", text, re.M)}
    want = {"float32": c["DT_F32"], "bfloat16": c["DT_BF16"], "float16": c["DT_F16"], "int8": c["KV_I8"],
            "fp8": c["KV_FP8"]}
    assert cb._KV_CODES == want and set(want) == set(KV_CACHE_DTYPES)
    assert len(set(want.values())) == len(want) and c["KV_SCALE_BYTES"] == 4
    # every (q, cache) pair the attention entries take: float32 q on every cache, bfloat16 q on bfloat16
    assert sorted(cb._KV_PAIRS.values()) == list(range(6))
    assert {kv for _, kv in cb._KV_PAIRS} == set(KV_CACHE_DTYPES)


def test_numpy_references_of_the_format():
    """The references above: the int8 / fp8 bytes decode to within half a step of x, zero rows give
    s = 0, NaN / inf rows s = NaN; E4M3 codes equal mojollm.fp8's encoder (an independent one)."""
    from mojollm import fp8

    rng = np.random.default_rng(0)
    x = _rows(rng, 40, 3, 64)
    for kv in QUANTIZED:
        c = quantize_rows(x, kv)
        assert c.dtype == np.uint8 and c.shape == (40, 3, row_width(kv, 64))
        s = c[..., -4:].copy().view("<f4")[..., 0]
        np.testing.assert_array_equal(s, np.abs(x).max(-1) / np.float32(127 if kv == "int8" else 448))
        got = dequantize_rows(c, kv)
        if kv == "int8":
            assert (np.abs(got - x) <= s[..., None] / 2 * (1 + 1e-6)).all()
        else:
            enc = fp8.encode(np.where(s[..., None] > 0, x / np.where(s > 0, s, 1)[..., None], 0))
            np.testing.assert_array_equal(c[..., :-4], enc)
            assert (np.abs(got - x) <= np.abs(x) / 16 + s[..., None] * 2.0 ** -10).all()
        assert (c[20, 0] == 0).all()  # the zero row: codes 0, s = 0
        bad = x[:2].copy()
        bad[0, 1, 5] = np.inf
        bad[1, 2, 0] = np.nan
        cb = quantize_rows(bad, kv)
        sb = cb[..., -4:].copy().view("<f4")[..., 0]
        assert np.isnan(sb[0, 1]) and np.isnan(sb[1, 2]) and np.isfinite(sb[0, 0])
        assert (cb[0, 1, :-4] == 0).all()


# ---- store_kv ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["int8", "fp8", "float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
def test_store_kv_bytes_equal_the_numpy_quantizer(kv, D):
    gpu = _cuda()
    torch = gpu.torch
    rng = np.random.default_rng(D + len(kv))
    NB, B, KVH, T = 7, 16, 3, 60
    shape = (NB, B, KVH, row_width(kv, D))
    kc, vc = gpu.kv_cache_zeros(shape, kv), gpu.kv_cache_zeros(shape, kv)
    assert kc.dtype == {"int8": torch.uint8, "fp8": torch.uint8, "float16": torch.float16,
                        "bfloat16": torch.bfloat16}[kv]
    k, v = _rows(rng, T, KVH, D), _rows(rng, T, KVH, D)
    slots = rng.permutation(NB * B)[:T].astype(np.int64)
    slots[7] = -1  # a padding token: written nowhere
    gpu.store_kv(kc, vc, gpu.asarray(k), gpu.asarray(v), gpu.asarray(slots, "int64"))
    gpu.synchronize()
    keep = slots >= 0
    for name, cache, x in (("k", kc, k), ("v", vc, v)):
        want = np.zeros((NB * B, KVH, shape[3]), cache_bytes(gpu, cache).dtype)
        want[slots[keep]] = quantize_rows(x[keep], kv)
        np.testing.assert_array_equal(cache_bytes(gpu, cache).reshape(want.shape), want, err_msg=name)
    if kv in QUANTIZED:  # a row with inf: its scale is NaN (the row reads as NaN), its codes 0
        bad = k[:2].copy()
        bad[1, 2, 3] = np.inf
        gpu.store_kv(kc, vc, gpu.asarray(bad), gpu.asarray(v[:2]), gpu.asarray(np.array([0, 1], np.int64), "int64"))
        row = cache_bytes(gpu, kc).reshape(NB * B, KVH, -1)[1, 2]
        assert np.isnan(row[-4:].copy().view("<f4")[0]) and (row[:-4] == 0).all()
    slots[0] = NB * B
    gpu.store_kv(kc, vc, gpu.asarray(k), gpu.asarray(v), gpu.asarray(slots, "int64"))
    with pytest.raises(ValueError, match="slot"):
        gpu.synchronize()


def test_quantized_caches_need_their_dtype():
    gpu = _cuda()
    raw = gpu.zeros((2, 4, 1, 68), "uint8")  # bytes alone: int8 or fp8?
    k = gpu.asarray(np.ones((1, 1, 64), np.float32))
    with pytest.raises(ValueError, match="kv_cache_zeros"):
        gpu.store_kv(raw, raw, k, k, gpu.asarray(np.zeros(1, np.int64), "int64"))
    a, b = gpu.kv_cache_zeros((2, 4, 1, 68), "int8"), gpu.kv_cache_zeros((2, 4, 1, 68), "fp8")
    with pytest.raises(ValueError, match="differ"):
        gpu.store_kv(a, b, k, k, gpu.asarray(np.zeros(1, np.int64), "int64"))
    odd = gpu.kv_cache_zeros((2, 4, 1, 44), "int8")  # D = 40: not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        gpu.store_kv(odd, odd, gpu.asarray(np.ones((1, 1, 40), np.float32)), gpu.asarray(np.ones((1, 1, 40), np.float32)),
                     gpu.asarray(np.zeros(1, np.int64), "int64"))
    assert set(gpu.kv_cache_dtypes()) == set(KV_CACHE_DTYPES)


# ---- attention ---------------------------------------------------------------------------------
def _filled_cache(gpu, rng, kv, n_blocks, B, KVH, D):
    """Caches of kv with every slot written by store_kv (random rows of varied scale); returns the
    device caches and their dequantized values [n_blocks, B, KVH, D] float64 (read back)."""
    shape = (n_blocks, B, KVH, row_width(kv, D))
    kc, vc = gpu.kv_cache_zeros(shape, kv), gpu.kv_cache_zeros(shape, kv)
    n = n_blocks * B
    # keys of moderate spread (scores of O(1), not one-hot softmaxes), values over 3 decades
    k, v = _rows(rng, n, KVH, D, spread=1.0), _rows(rng, n, KVH, D)
    gpu.store_kv(kc, vc, gpu.asarray(k), gpu.asarray(v), gpu.asarray(np.arange(n, dtype=np.int64), "int64"))
    kd = dequantize_rows(cache_bytes(gpu, kc), kv)
    vd = dequantize_rows(cache_bytes(gpu, vc), kv)
    return kc, vc, kd, vd, k.reshape(kd.shape), v.reshape(vd.shape)


def _tables(rng, lens, B, n_blocks):
    """Block tables [S, M]: each sequence's blocks drawn from a permutation of the pool."""
    M = max(-(-c // B) for c in lens)
    perm = rng.permutation(n_blocks)
    tables = np.zeros((len(lens), M), np.int32)
    used = 0
    for s, c in enumerate(lens):
        nb = -(-c // B)
        tables[s, :nb] = perm[used:used + nb]
        used += nb
    return tables


def _reference(q, kc, vc, table, ctx, qlen, scale):
    """float64 causal attention of q [qlen, H, D] (the last qlen positions of a ctx-long sequence)
    over cache values kc, vc [n_blocks, B, KVH, D]."""
    B, KVH, D = kc.shape[1:]
    H = q.shape[1]
    G = H // KVH
    pos = np.arange(ctx)
    keys = kc[np.asarray(table)[pos // B], pos % B]
    vals = vc[np.asarray(table)[pos // B], pos % B]
    out = np.zeros(q.shape, np.float64)
    for i in range(qlen):
        p = ctx - qlen + i
        for h in range(H):
            s = keys[:p + 1, h // G] @ q[i, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vals[:p + 1, h // G]
    return out


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# (H, KVH, D, block size): GQA 4:1 and 3:1, MQA, head dims 64 / 128 (and 80: the SIMT prefill)
ATTN_SHAPES = [(8, 2, 64, 16), (12, 4, 128, 16), (6, 1, 128, 5), (8, 2, 80, 7)]


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("H,KVH,D,B", ATTN_SHAPES)
def test_attention_decode(kv, H, KVH, D, B):
    """Several sequences (1 .. 1100 keys: split-K over several blocks) on permuted block tables."""
    gpu = _cuda()
    rng = np.random.default_rng(H * 10 + D + B)
    lens = [1, 17, 300, 1100, 64]
    n_blocks = sum(-(-c // B) for c in lens) + 3
    kc, vc, kd, vd, kf, vf = _filled_cache(gpu, rng, kv, n_blocks, B, KVH, D)
    tables = _tables(rng, lens, B, n_blocks)
    q = rng.standard_normal((len(lens), H, D)).astype(np.float32)
    scale = D ** -0.5
    got = gpu.to_numpy(gpu.attention_decode(gpu.asarray(q), kc, vc, gpu.asarray(tables, "int32"),
                                            gpu.asarray(np.array(lens, np.int32), "int32"), scale))
    ref = np.stack([_reference(q[s:s + 1], kd, vd, tables[s], c, 1, scale)[0] for s, c in enumerate(lens)])
    # float32 scores, probabilities and sums over exactly the dequantized values
    assert rel_err(got, ref) < F32
    if kv in QUANTIZED:  # the reference really differs from the unquantized cache's
        full = np.stack([_reference(q[s:s + 1], kf, vf, tables[s], c, 1, scale)[0] for s, c in enumerate(lens)])
        assert 10 * F32 < rel_err(ref, full) < (0.03 if kv == "int8" else 0.2)


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("H,KVH,D,B", ATTN_SHAPES)
def test_attention_prefill_paged(kv, H, KVH, D, B):
    """Chunked prefill / prefix-cache hits: (new tokens, context) a fresh prompt, a chunk after 30
    cached tokens, one token, a prompt over several 64-key tiles, a chunk after 200 cached."""
    gpu = _cuda()
    rng = np.random.default_rng(H * 100 + D + B)
    seqs = [(13, 13), (40, 70), (1, 9), (150, 150), (77, 277)]
    lens = [c for _, c in seqs]
    n_blocks = sum(-(-c // B) for c in lens) + 3
    kc, vc, kd, vd, _, _ = _filled_cache(gpu, rng, kv, n_blocks, B, KVH, D)
    tables = _tables(rng, lens, B, n_blocks)
    T = sum(n for n, _ in seqs)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    scale = D ** -0.5
    got = gpu.to_numpy(gpu.attention_prefill(gpu.asarray(q), kc, vc, gpu.asarray(tables, "int32"),
                                             gpu.asarray(cu, "int32"), gpu.asarray(np.array(lens, np.int32), "int32"),
                                             scale))
    ref = np.concatenate([_reference(q[cu[s]:cu[s + 1]], kd, vd, tables[s], c, n, scale)
                          for s, (n, c) in enumerate(seqs)])
    tensor_cores = kv != "float32" and D in (64, 128)
    assert rel_err(got, ref) < (TC if tensor_cores else F32)


def test_attention_flags_bad_block_ids_on_quantized_caches():
    gpu = _cuda()
    rng = np.random.default_rng(3)
    kc, vc, *_ = _filled_cache(gpu, rng, "fp8", 4, 8, 2, 64)
    q = gpu.asarray(rng.standard_normal((2, 4, 64)).astype(np.float32))
    tables = gpu.asarray(np.array([[0, 1], [2, 9]], np.int32), "int32")  # block 9 does not exist
    lens = gpu.asarray(np.array([5, 12], np.int32), "int32")
    gpu.attention_decode(q, kc, vc, tables, lens, 0.125)
    with pytest.raises(ValueError, match="block id"):
        gpu.synchronize()
    gpu.attention_prefill(q, kc, vc, tables, gpu.asarray(np.array([0, 1, 2], np.int32), "int32"), lens, 0.125)
    with pytest.raises(ValueError, match="block id"):
        gpu.synchronize()


# ---- copy_kv_rows ------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["int8", "fp8", "float16"])
def test_copy_kv_rows_moves_whole_rows(kv):
    gpu = _cuda()
    rng = np.random.default_rng(9)
    NB, B, KVH, D = 5, 8, 2, 64
    kc, vc, *_ = _filled_cache(gpu, rng, kv, NB, B, KVH, D)
    before = [cache_bytes(gpu, c).reshape(NB * B, KVH, -1) for c in (kc, vc)]
    # a compaction inside one block (sources read before any write) and moves across blocks
    src = np.array([3, 4, 5, 6, 17, 30, 2], np.int64)
    dst = np.array([2, 3, 4, 5, 9, 39, 31], np.int64)
    gpu.copy_kv_rows(kc, vc, gpu.asarray(src, "int64"), gpu.asarray(dst, "int64"))
    for c, b in zip((kc, vc), before):
        want = b.copy()
        want[dst] = b[src]
        np.testing.assert_array_equal(cache_bytes(gpu, c).reshape(want.shape), want)


# ---- through LLM -------------------------------------------------------------------------------
def _logits_chunked(model, ids, n_prompt, block):
    """The prompt in two chunks (the second reads the first's cache: chunked prefill), then the
    rest one token at a time: [len(ids), vocab] float64. A new KV pool of the model's dtype."""
    n_blocks = -(-len(ids) // block)
    model.allocate_kv_cache(n_blocks + 2, block)
    table = np.random.default_rng(31).permutation(n_blocks + 2)[:n_blocks].tolist()
    c = n_prompt // 3
    out = [model.forward(StepBatch.single_sequence(ids[:c], 0, table, block, all_logits=True)),
           model.forward(StepBatch.single_sequence(ids[c:n_prompt], c, table, block, all_logits=True))]
    for p in range(n_prompt, len(ids)):
        out.append(model.forward(StepBatch.single_sequence(ids[p:p + 1], p, table, block)))
    return np.concatenate(out).astype(np.float64)


def test_llm_round_trip(make_hf_model, monkeypatch):
    """LLM(kv_cache_dtype=...) on a random bfloat16 model (head dim 32, 3 layers).

    Pool: at kv_cache_memory = 64 MiB the engine holds budget // (2 L B KVH row_bytes) blocks:
    bfloat16 rows of 64 bytes against int8 / fp8 rows of 32 + 4: 64 / 36 = 1.78x the blocks.

    Logits (chunked prefill and decode, every row reading the quantized cache) against the
    bfloat16 cache's. Per stored element the rounding error, RMS relative to its row's RMS:
        bfloat16 (8 significant bits)   2^-8 / sqrt(12) x E[1/m]              ~1.6e-3
        int8     s / sqrt(12), s = max|row| / 127, max|row| ~2.2 RMS (D = 32)  ~5e-3    (3.1x)
        fp8      E4M3 keeps 4 significant bits                                  ~2.6e-2  (16x)
    This random model amplifies such a perturbation of K and V ~10-15x into its logits; the float32
    cache's distance from the bfloat16 one (e16) measures that on the device. So the int8 cache
    should sit ~3x e16 from bfloat16's and fp8 ~13-16x (a CPU emulation of the quantizer in
    transformers gave 3.2x and 12.7x); the bounds allow 2x: e8 < 6.5 e16, ef < 32 e16, and the
    ordering e16 < e8 < ef shows the codes really are quantized. A float16 cache is read exactly
    by decode, but the tensor-core paged prefill runs its tiles as bfloat16 like every 16-bit
    cache (measured on the H200: 0.54 e16), so it is only held to no worse than bfloat16: < e16.

    Graphs: the int8 and fp8 engines capture their decode graphs and replay the eager tokens.
    """
    gpu = _cuda()
    import torch

    from mojollm.llm import LLM

    path, _ = make_hf_model("llama", dtype=torch.bfloat16, seed=6, **RUNNER_CONFIG)
    budget = 64 << 20
    kw = dict(backend="cuda", kv_cache_memory=budget, max_num_seqs=4, max_model_len=512)
    llms = {kv: LLM(model=str(path), kv_cache_dtype=kv, **kw) for kv in KV_CACHE_DTYPES}
    c = llms["int8"].model.config
    D, L, KVH, B = c.head_dim, c.num_hidden_layers, c.num_key_value_heads, llms["int8"].engine.block_size
    for kv, llm in llms.items():
        eng = llm.engine
        assert llm.model.kv_dtype == kv and eng.runner.graphs, kv
        per_block = 2 * L * B * KVH * row_bytes(kv, D)
        assert llm.model.kv_cache_bytes_per_block(B) == per_block
        assert eng.num_blocks == budget // per_block, kv
        k0 = llm.model.kv_caches[0][0]
        assert tuple(k0.shape) == (eng.num_blocks + 1, B, KVH, row_width(kv, D))  # + the runner's scratch block
        assert k0.numel() * k0.element_size() * 2 * L == (eng.num_blocks + 1) * per_block
    ratio = llms["int8"].engine.num_blocks / llms["bfloat16"].engine.num_blocks
    assert abs(ratio - 64 / 36) < 0.01, ratio
    assert llms["fp8"].engine.num_blocks == llms["int8"].engine.num_blocks

    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 300, size=int(n)).tolist() for n in (150, 97, 220)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for kv, llm in llms.items():
        outs = llm.generate(prompts, params)
        assert all(o.finished and not o.error and len(o.token_ids) == 24 for o in outs), kv
        tokens[kv] = [o.token_ids for o in outs]
    monkeypatch.setenv("MOJOLLM_CUDA_GRAPHS", "0")
    for kv in QUANTIZED:
        eager = LLM(model=str(path), kv_cache_dtype=kv, **kw)
        assert not eager.engine.runner.graphs
        assert [o.token_ids for o in eager.generate(prompts, params)] == tokens[kv], kv
        del eager
    monkeypatch.delenv("MOJOLLM_CUDA_GRAPHS")

    ref_ids = [p + t for p, t in zip(prompts, tokens["bfloat16"])]
    logits = {kv: np.concatenate([_logits_chunked(llm.model, ids, len(p), B) for ids, p in zip(ref_ids, prompts)])
              for kv, llm in llms.items()}
    e16 = rel_err(logits["float32"], logits["bfloat16"])
    e8 = rel_err(logits["int8"], logits["bfloat16"])
    ef = rel_err(logits["fp8"], logits["bfloat16"])
    eh = rel_err(logits["float16"], logits["float32"])
    msg = f"e16 {e16:.3g}, int8 {e8:.3g} ({e8 / e16:.2f} e16), fp8 {ef:.3g} ({ef / e16:.2f} e16), f16 {eh:.3g}"
    print(msg)
    assert 0 < e16 < 0.1, msg
    assert e16 < e8 < 6.5 * e16, msg
    assert e8 < ef < 32 * e16, msg
    assert eh < e16, msg


def test_fresh_prefill_reads_no_cache(tmp_path):
    """attention_prefill_fresh (Modular's flash attention on the step's own k, v) serves fresh
    prompts whatever the cache dtype: with an int8 cache the prompt's logits equal the bfloat16
    cache's bit for bit, and only the decode rows (which read the int8 cache) move."""
    gpu = _cuda()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from random_llama import write_random_llama

    from mojollm.models import load_model

    path = write_random_llama(tmp_path / "m", "small-gqa", "bfloat16", seed=2, std=0.1)
    model = load_model(path, gpu)
    if model.fresh_heads is None or not gpu._lib_attn:
        pytest.skip(reason="no flash-attention build for small-gqa's heads (bench/build_gpu.py --model-shape small-gqa)")
    ids = np.random.default_rng(3).integers(0, 1000, 90).tolist()
    n, block = 70, 16
    out = {}
    for kv in ("bfloat16", "int8"):
        model.set_kv_cache_dtype(kv)
        n_blocks = -(-len(ids) // block)
        model.allocate_kv_cache(n_blocks + 1, block)
        table = list(range(n_blocks))
        rows = [model.forward(StepBatch.single_sequence(ids[:n], 0, table, block, all_logits=True))]
        rows += [model.forward(StepBatch.single_sequence(ids[p:p + 1], p, table, block)) for p in range(n, len(ids))]
        out[kv] = np.concatenate(rows)
    np.testing.assert_array_equal(out["int8"][:n], out["bfloat16"][:n])
    assert 0 < rel_err(out["int8"][n:], out["bfloat16"][n:]) < 0.1
