"""int8-activation GEMV (mojo/quant.mojo, QuantLinear.forward(dot=...)) against numpy references.

Q4_0 / Q4_1 / Q8_0, and Q5_0 / Q5_1 (mojo/kquant.mojo hands their int8 paths to quant.mojo's GEMV).
The kernel quantizes each activation row per 32-block (dx = max|x| / 127, q = rint(x * (1/dx)) in
float32), sums code products exactly in int32 and adds float32(dw * dx) * sum + (Q4_1 / Q5_1)
m * dx * sum(q) in float32. The reference here repeats the quantization in numpy (the same float32 operations,
so the codes are identical) and sums in float64 from the raw block bytes, independently of the
kernels. Checks, for every int8 path this host's build has (the others skip, naming the path):
  * exact: power-of-two scales and small codes put every float32 partial sum on a grid it can
    hold exactly, so the kernel must equal the reference bit for bit (any wrong code, offset,
    nibble order, block or scale shows);
  * random realistic data: within the float32 accumulation bound over the lanes' magnitudes;
  * against the float path: within the activation-rounding bound sum_b dx_b / 2 * sum_j |w_j|;
  * rows split over threads, the T > 8 chunking, dispatch (auto / float / int8 / env), NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from mojollm.kernels import quant
from mojollm.kernels.quant import QuantLinear
from mojollm.weights import WeightTensor

QTYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"]
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22, "Q5_1": 24}
CODE_OFFSET = {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128, "Q5_0": 16, "Q5_1": 0}  # the VNNI paths' (lane bound)
ALL_PATHS = ["vnni512", "vnni256", "avx2", "generic"]
F32 = np.float32


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(abs(hash(tuple(str(k) for k in key))) % (2**32))


@pytest.fixture(params=ALL_PATHS)
def path(request):
    if request.param not in quant.int8_paths():
        pytest.skip(f"int8 path {request.param} is not built for this host (it has: {', '.join(quant.int8_paths())})")
    return request.param


# ---------------------------------------------------------------- references


def decode_blocks(raw: np.ndarray, qtype: str, n: int, k: int):
    """(codes int64 [n, nb, 32] (true signed codes), dw float32 [n, nb], m float32 [n, nb] or None)."""
    b = np.ascontiguousarray(raw).reshape(n, k // 32, BLOCK_BYTES[qtype])
    dw = b[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
    if qtype == "Q8_0":
        return b[..., 2:34].copy().view(np.int8).astype(np.int64), dw, None
    qs0 = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[qtype]
    qs = b[..., qs0:qs0 + 16]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
    if qtype in ("Q5_0", "Q5_1"):  # bit j of the little-endian u32 qh before the nibbles: code j's bit 4
        qh = b[..., qs0 - 4:qs0].copy().view("<u4")[..., 0].astype(np.int64)
        codes |= ((qh[..., None] >> np.arange(32)) & 1) << 4
    if qtype in ("Q4_0", "Q5_0"):
        return codes - (8 if qtype == "Q4_0" else 16), dw, None
    return codes, dw, b[..., 2:4].copy().view(np.float16)[..., 0].astype(F32)


def quantize_acts(x: np.ndarray):
    """(q int64 [t, nb, 32], dx float32 [t, nb]) exactly as the kernel computes them."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    amax = np.abs(xb).max(-1)
    ok = (amax >= F32(1e-30)) & np.isfinite(amax)
    dx = np.where(ok, amax / F32(127), F32(0)).astype(F32)
    inv = np.where(ok, F32(1) / np.where(ok, dx, F32(1)), F32(0)).astype(F32)
    q = np.rint(xb * inv[..., None]).astype(np.int64)
    assert np.abs(q).max(initial=0) <= 127
    return q, dx


def int8_reference(raw: np.ndarray, qtype: str, x: np.ndarray):
    """(y float64 [t, n], A: the sum of the absolute values the kernel's float32 lanes add up,
    an upper bound every path respects: offset codes as the VNNI paths use them)."""
    t, k = x.shape
    n = raw.shape[0]
    codes, dw, m = decode_blocks(raw, qtype, n, k)
    q, dx = quantize_acts(x)
    s = (dw[None, :, :] * dx[:, None, :]).astype(F32).astype(np.float64)  # float32(dw * dx)
    idot = np.einsum("rbj,tbj->trb", codes, q)
    y = (s * idot).sum(-1)
    off = CODE_OFFSET[qtype]
    lanes = np.einsum("rbj,tbj->trb", np.abs(codes) + off, np.abs(q)) + off * np.abs(q.sum(-1))[:, None, :]
    a = (np.abs(s) * lanes).sum(-1)
    if m is not None:
        sx = (dx * q.sum(-1).astype(F32)).astype(F32).astype(np.float64)  # float32(dx * sum q)
        mterm = m[None, :, :].astype(np.float64) * sx[:, None, :]
        y += mterm.sum(-1)
        a += np.abs(mterm).sum(-1)
    return y, a


def accumulation_bound(a: np.ndarray, k: int) -> np.ndarray:
    # float32 sums of at most k/32 + 16 terms per lane chain and reduction step
    return (k // 32 + 16) * 2.0**-24 * a


def assert_int8_close(y: np.ndarray, raw: np.ndarray, qtype: str, x: np.ndarray) -> None:
    ref, a = int8_reference(raw, qtype, x)
    assert y.shape == ref.shape and y.dtype == np.float32
    excess = np.abs(y.astype(np.float64) - ref) - accumulation_bound(a, x.shape[1])
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, f"output {worst}: got {y[worst]!r}, want {ref[worst]!r}"


def linear(raw: np.ndarray, qtype: str, n: int, k: int) -> QuantLinear:
    return QuantLinear(WeightTensor("w", (n, k), qtype, raw))


def random_layer(rng, qtype: str, n: int, k: int):
    """A quantized layer from rows of varied scale (per-block scales matter)."""
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 1, size=(n, 1)))).astype(F32)
    if qtype in quant.QUANTIZE_TYPES:
        raw = quant.quantize(w, qtype)
    else:  # Q5_*: gguf's quantizer
        raw = np.ascontiguousarray(gguf_quantize(w, GGMLQuantizationType[qtype]))
    return linear(raw, qtype, n, k), raw


def activations(rng, t: int, k: int) -> np.ndarray:
    """Normal rows with a few large outliers (as hidden states have), scale varying by row."""
    x = rng.standard_normal((t, k)) * np.exp(rng.uniform(-2, 2, size=(t, 1)))
    hot = rng.random((t, k)) < 0.01
    x[hot] *= 20
    return x.astype(F32)


# ---------------------------------------------------------------- exact


def exact_case(rng, qtype: str, t: int, n: int, k: int):
    """Blocks and activations on which float32 arithmetic is exact: scales are powers of two
    (dw = +-2^-10 or 2^-9; dx = 2^-3 or 2^-2, set by one +-127 code per block), m a multiple of
    2^-10 and the other activation codes within +-15, so every product is a multiple of 2^-13
    and every partial sum stays below 2^24 of those (checked below)."""
    nb = k // 32
    raw = rng.integers(0, 256, size=(n, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    dw = (rng.choice([-1, 1], size=(n, nb)) * 2.0 ** rng.choice([-10, -9], size=(n, nb))).astype(np.float16)
    raw[..., 0:2] = dw.view(np.uint8).reshape(n, nb, 2)
    if qtype in ("Q4_1", "Q5_1"):
        m = (rng.integers(-32, 33, size=(n, nb)) * 2.0**-10).astype(np.float16)
        raw[..., 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    raw = raw.reshape(n, nb * BLOCK_BYTES[qtype])
    q = rng.integers(-15, 16, size=(t, nb, 32))
    where = rng.integers(0, 32, size=(t, nb))
    np.put_along_axis(q, where[..., None], rng.choice([-127, 127], size=(t, nb, 1)), axis=-1)
    ex = rng.choice([-3, -2], size=(t, nb, 1))
    x = (q * 2.0**ex).astype(F32).reshape(t, k)
    return raw, x


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(7, 96), (33, 160), (5, 352)])
def test_int8_exact(path, qtype, t, n, k):
    raw, x = exact_case(rng_for("exact", qtype, t, n, k), qtype, t, n, k)
    ref, a = int8_reference(raw, qtype, x)
    assert a.max() < 2.0**24 * 2.0**-13, "the data no longer make float32 exact: the test would prove nothing"
    y = linear(raw, qtype, n, k).forward(x, dot=path)
    np.testing.assert_array_equal(y, ref.astype(F32))


# ---------------------------------------------------------------- realistic data


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(1, 32), (33, 576), (65, 1536)])
def test_int8_vs_reference(path, qtype, t, n, k):
    rng = rng_for("ref", qtype, t, n, k)
    lin, raw = random_layer(rng, qtype, n, k)
    x = activations(rng, t, k)
    assert_int8_close(lin.forward(x, dot=path), raw, qtype, x)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 5])
def test_int8_vs_float_path(path, qtype, t):
    # The int8 result may differ from float32 activations by the rounding of each activation
    # (at most dx/2) times the weight: |y8 - y| <= sum_b dx_b / 2 * sum_j |w_bj| (+ float32 sums).
    rng = rng_for("vs-float", qtype, t)
    n, k = 67, 800
    lin, _ = random_layer(rng, qtype, n, k)
    x = activations(rng, t, k)
    y8 = lin.forward(x, dot=path).astype(np.float64)
    yf = lin.forward(x, dot="float").astype(np.float64)
    w = np.abs(lin.dequantize().astype(np.float64)).reshape(n, k // 32, 32).sum(-1)  # [n, nb]
    _, dx = quantize_acts(x)
    bound = 0.5 * dx.astype(np.float64) @ w.T + 2e-5 * (np.abs(x).astype(np.float64) @ np.abs(lin.dequantize()).T)
    assert np.all(np.abs(y8 - yf) <= bound)
    rel = np.abs(y8 - yf).max() / np.abs(yf).max()
    assert 0 < rel < 0.05  # it is int8 (not the float path), and its error is the expected size


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q5_1"])
def test_paths_agree(path, qtype):
    # Every path sums the same integers; only float32 rounding of the scaled lanes may differ.
    rng = rng_for("agree", qtype)
    lin, raw = random_layer(rng, qtype, 129, 1536)
    x = activations(rng, 2, 1536)
    best = lin.forward(x, dot="int8")
    y = lin.forward(x, dot=path)
    _, a = int8_reference(raw, qtype, x)
    assert np.all(np.abs(y.astype(np.float64) - best) <= 2 * accumulation_bound(a, 1536))


# ---------------------------------------------------------------- threads, chunking, dispatch


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0"])
@pytest.mark.parametrize("t", [1, 5])
def test_int8_threads_agree(path, qtype, t):
    # 2201 x 1536 Q4_1 (2.1 MB) / Q5_0 (2.3 MB) is above the size where the kernel splits rows
    # over the cores; a row's result must not depend on the split.
    rng = rng_for("threads8", qtype, t)
    lin, raw = random_layer(rng, qtype, 2201, 1536)
    x = activations(rng, t, 1536)
    y = lin.forward(x, dot=path)
    np.testing.assert_array_equal(y, lin.forward(x, max_threads=1, dot=path))
    assert_int8_close(y, raw, qtype, x)


@pytest.mark.parametrize("qtype", QTYPES)
def test_int8_forced_above_eight_rows(qtype):
    # T > 8 with int8 forced: eight rows at a time over the same quantized activations.
    rng = rng_for("chunks", qtype)
    lin, raw = random_layer(rng, qtype, 37, 288)
    x = activations(rng, 19, 288)
    y = lin.forward(x, dot="int8")
    assert_int8_close(y, raw, qtype, x)
    np.testing.assert_array_equal(y[8:16], lin.forward(np.ascontiguousarray(x[8:16]), dot="int8"))
    np.testing.assert_array_equal(y[16:], lin.forward(np.ascontiguousarray(x[16:]), dot="int8"))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q5_1"])
def test_auto_dispatch(qtype):
    rng = rng_for("auto", qtype)
    lin, _ = random_layer(rng, qtype, 40, 256)
    for t in (1, 8):  # decode sizes: int8 on the host's best path
        x = activations(rng, t, 256)
        np.testing.assert_array_equal(lin.forward(x, dot="auto"), lin.forward(x, dot=quant.int8_paths()[0]))
        assert not np.array_equal(lin.forward(x, dot="auto"), lin.forward(x, dot="float"))
    x = activations(rng, 9, 256)  # the GEMM: float
    np.testing.assert_array_equal(lin.forward(x, dot="auto"), lin.forward(x, dot="float"))


def test_default_dot_setting(monkeypatch):
    rng = rng_for("default")
    lin, _ = random_layer(rng, "Q8_0", 24, 128)
    x = activations(rng, 2, 128)
    monkeypatch.setattr(quant, "_default_dot_code", None)
    monkeypatch.setattr(quant, "_default_dot_set", None)
    monkeypatch.setenv("MOJOLLM_QUANT_DOT", "float")
    np.testing.assert_array_equal(lin.forward(x), lin.forward(x, dot="float"))
    assert quant.set_default_dot("generic") is None
    np.testing.assert_array_equal(lin.forward(x), lin.forward(x, dot="generic"))
    assert quant.set_default_dot(None) == "generic"
    monkeypatch.setenv("MOJOLLM_QUANT_DOT", "int8")  # None re-reads the environment
    np.testing.assert_array_equal(lin.forward(x), lin.forward(x, dot="int8"))
    monkeypatch.setattr(quant, "_default_dot_code", None)
    monkeypatch.setenv("MOJOLLM_QUANT_DOT", "fp8")
    with pytest.raises(ValueError, match="MOJOLLM_QUANT_DOT: unknown dot product 'fp8'"):
        lin.forward(x)


def test_bad_dot_names():
    lin, _ = random_layer(rng_for("bad-dot"), "Q4_0", 4, 64)
    x = np.ones((1, 64), dtype=F32)
    with pytest.raises(ValueError, match="unknown dot product 'int4'.*auto, float, int8"):
        lin.forward(x, dot="int4")
    missing = [p for p in ALL_PATHS if p not in quant.int8_paths()]
    for p in missing:
        with pytest.raises(ValueError, match="not built for this host"):
            lin.forward(x, dot=p)


# ---------------------------------------------------------------- special activations


@pytest.mark.parametrize("qtype", QTYPES)
def test_zero_tiny_and_nan_blocks(path, qtype):
    rng = rng_for("special", qtype)
    lin, raw = random_layer(rng, qtype, 21, 128)
    x = activations(rng, 3, 128)
    x[0, 32:64] = 0  # dx = 0
    x[1, 64:96] = 1e-35  # below 1e-30: taken as zero (1/dx would overflow)
    y = lin.forward(x, dot=path)
    assert_int8_close(y[:2], raw, qtype, x[:2])
    x[2, 100] = np.nan
    y = lin.forward(x, dot=path)
    assert np.isnan(y[2]).all() and np.isfinite(y[:2]).all()
    x[2, 100] = np.inf
    assert not np.isfinite(lin.forward(x, dot=path)[2]).any()


# ---------------------------------------------------------------- the default model's weights


@pytest.fixture(scope="module")
def model_layer(default_gguf):
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(default_gguf)).tensors if t.name == "blk.3.ffn_down.weight")
    return np.asarray(t.data), (int(t.data.shape[0]), int(t.shape[0]))


@pytest.mark.parametrize("t", [1, 4])
def test_model_q4_1_layer_int8(model_layer, t):
    raw, (n, k) = model_layer
    lin = linear(raw, "Q4_1", n, k)
    x = activations(rng_for("model8", t), t, k)
    assert_int8_close(lin.forward(x, dot="int8"), raw.reshape(n, -1), "Q4_1", x)


@pytest.mark.slow
def test_default_model_perplexity_int8_within_half_percent(default_gguf, cpu_backend):
    # The model-level check: teacher-forced over a few hundred tokens, every quantized layer on
    # int8 activations (forced: the kernel takes the 128-token chunks eight rows at a time, the
    # arithmetic of decode steps), perplexity within 0.5% of the float path's.
    from test_model_gguf import TEXT, _log_softmax

    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    model = load_model(default_gguf, cpu_backend)
    ids = model.tokenizer.encode(TEXT)
    n_blocks = -(-len(ids) // 16)
    model.allocate_kv_cache(n_blocks, 16)
    table = list(range(n_blocks))
    targets = np.array(ids[1:])

    def perplexity(dot: str) -> float:
        previous = quant.set_default_dot(dot)
        try:
            logits = np.concatenate([
                model.forward(StepBatch.single_sequence(ids[s:s + 128], s, table, 16, all_logits=True))
                for s in range(0, len(ids), 128)])
        finally:
            quant.set_default_dot(previous)
        return float(np.exp(-_log_softmax(logits[:-1])[np.arange(len(targets)), targets].mean()))

    ppl_float, ppl_int8 = perplexity("float"), perplexity("int8")
    print(f"\n{len(ids)} tokens: perplexity float {ppl_float:.4f}, int8 {ppl_int8:.4f} "
          f"({100 * (ppl_int8 / ppl_float - 1):+.3f}%)")
    assert ppl_int8 != ppl_float
    assert abs(ppl_int8 / ppl_float - 1) <= 0.005
