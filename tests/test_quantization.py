"""mojollm.quantization (RTN / GPTQ / AWQ into GGUF Q8_0 / Q4_0 / Q4_1 blocks) against independent references.

  * rtn and the block layout: gguf.quants.quantize / dequantize, compared byte for byte and value
    for value (rtn repeats llama.cpp's float32 operations);
  * gptq: a float64 numpy GPTQ written here from the paper, one column at a time with the full
    inverse Hessian updated after each column (OBQ form: no Cholesky, no lazy batches), with its
    own group-parameter rule (llama.cpp's, rounded to float16); codes and scales must match;
  * quality: on correlated calibration inputs with outlier channels, GPTQ's output error is below
    RTN's; AWQ's searched scales beat s = 1 and reach the least loss of the search (recomputed here
    in float64).
Seeded random inputs of odd sizes (N = 37, 20; K = 96, 160).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mojollm import quantization as qz
from mojollm.quantization import Quantized, awq_search, gptq, layer_error, rtn

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _gt(qtype: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[qtype]


def _awkward_weights(rng, n=37, k=160, dtype=np.float32) -> np.ndarray:
    """Row scales over four decades, plus blocks that stress llama.cpp's rule."""
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-6, 2, (n, 1)))
    w[0, :32] = 0.0                                   # all-zero block
    w[1, 32:64] = 0.75                                # constant block (Q4_1: d = 0)
    w[2, :32] = rng.uniform(-1, 1, 32); w[2, 5] = 2.0; w[2, 9] = -2.0   # |max| tie: first wins
    w[3, 64:96] = -np.abs(w[3, 64:96])                # all negative
    w[4, :] = rng.standard_normal(k) * 1e-6           # scales in float16's subnormal range
    w[5, :32] = rng.standard_normal(32) * 1000.0      # large, but in float16 range
    w[6, 96:128] = np.round(rng.standard_normal(32) * 8) / 16   # values on half-steps
    # exact rounding ties of w / d: Q8_0 (d = 1), Q4_0 (d = 1: max -8), Q4_1 (d = 1, min 0)
    halves = np.arange(32) % 7 - 3 + 0.5
    w[7, 0:32] = halves * 9; w[7, 0] = 127.0
    w[7, 32:64] = halves; w[7, 32] = -8.0
    w[7, 64:96] = halves + 4.0; w[7, 64] = 0.0; w[7, 65] = 15.0
    return w.astype(dtype)


# ---------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rtn_bit_identical_to_gguf(qtype, dtype):
    rng = np.random.default_rng(1)
    w = _awkward_weights(rng, dtype=dtype)
    q = rtn(w, qtype)
    ref = gguf_quantize(w, _gt(qtype))
    blocks = q.gguf_blocks()
    assert blocks.dtype == np.uint8 and blocks.shape == (37, 160 // 32 * BLOCK_BYTES[qtype])
    np.testing.assert_array_equal(blocks, ref)
    deq = q.dequantize()
    assert deq.dtype == np.float32 and deq.shape == w.shape
    np.testing.assert_array_equal(deq, gguf_dequantize(ref, _gt(qtype)))
    assert q.d.dtype == np.float16 and q.d.shape == (37, 5)
    assert q.q.dtype == (np.int8 if qtype == "Q8_0" else np.uint8) and q.q.shape == w.shape
    assert (q.m is not None) == (qtype == "Q4_1")
    if qtype == "Q8_0":
        assert np.abs(q.q.astype(int)).max() <= 127
    else:
        assert q.q.max() <= 15


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_blocks_layout_round_trip(qtype):
    """Arbitrary (not RTN-made) params and codes: gguf's dequantize of our bytes is our dequantize."""
    rng = np.random.default_rng(2)
    n, k = 19, 96
    d = (rng.standard_normal((n, k // 32)) * 0.1).astype(np.float16)
    m = (rng.standard_normal((n, k // 32))).astype(np.float16) if qtype == "Q4_1" else None
    if qtype == "Q8_0":
        q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    else:
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    x = Quantized(qtype, d, m, q)
    raw = x.gguf_blocks()
    assert raw.shape == (n, 3 * BLOCK_BYTES[qtype]) and x.nbytes == raw.size
    np.testing.assert_array_equal(gguf_dequantize(raw, _gt(qtype)), x.dequantize())
    # the layout written out by hand for one block of row 4
    blk = raw[4, BLOCK_BYTES[qtype]:2 * BLOCK_BYTES[qtype]]
    assert blk[:2].tobytes() == np.array([d[4, 1]], "<f2").tobytes()
    if qtype == "Q8_0":
        assert blk[2:].tobytes() == q[4, 32:64].tobytes()
    else:
        off = 4 if qtype == "Q4_1" else 2
        if m is not None:
            assert blk[2:4].tobytes() == np.array([m[4, 1]], "<f2").tobytes()
        for i in range(16):
            assert blk[off + i] == q[4, 32 + i] | (q[4, 48 + i] << 4)
    back = Quantized.from_gguf_blocks(raw, qtype)
    np.testing.assert_array_equal(back.q, q)
    np.testing.assert_array_equal(back.d.view(np.uint16), d.view(np.uint16))
    if m is not None:
        np.testing.assert_array_equal(back.m.view(np.uint16), m.view(np.uint16))


# ---------------------------------------------------------------------------------------------- GPTQ reference


def _ref_params(g: np.ndarray, qtype: str):
    """Group params of g [N, 32] (float64): llama.cpp's rule, rounded to float16."""
    out_m = None
    if qtype == "Q8_0":
        d = np.max(np.abs(g), axis=1) / 127
    elif qtype == "Q4_0":
        d = np.array([row[np.argmax(np.abs(row))] for row in g]) / -8
    else:
        d = (g.max(axis=1) - g.min(axis=1)) / 15
        out_m = g.min(axis=1).astype(np.float16).astype(np.float64)
    return d.astype(np.float16).astype(np.float64), out_m


def _ref_code(w: np.ndarray, d: np.ndarray, m, qtype: str):
    """Nearest code per row and the float32 weight it decodes to (as GGUF computes it)."""
    q = np.zeros_like(w)
    nz = d != 0
    if qtype == "Q8_0":
        q[nz] = np.clip(np.round(w[nz] / d[nz]), -127, 127)
        return q, (np.float32(1) * d.astype(np.float32) * q.astype(np.float32)).astype(np.float64)
    if qtype == "Q4_0":
        q[:] = 8
        q[nz] = np.clip(np.round(w[nz] / d[nz]) + 8, 0, 15)
        return q, (d.astype(np.float32) * (q - 8).astype(np.float32)).astype(np.float64)
    q[nz] = np.clip(np.round((w[nz] - m[nz]) / d[nz]), 0, 15)
    return q, (d.astype(np.float32) * q.astype(np.float32) + m.astype(np.float32)).astype(np.float64)


def ref_gptq(w, h, qtype, percdamp=0.01, act_order=False):
    """GPTQ, one column at a time on the full inverse Hessian: after quantizing column j with
    error e, W -= e / Hinv[j,j] * Hinv[j, :], then Hinv -= Hinv[:, j] Hinv[j, :] / Hinv[j, j]
    (the inverse Hessian of the remaining columns). Returns (codes [N, K], d, m)."""
    W = np.array(w, np.float64)
    H = np.array(h, np.float64)
    n, k = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    ng = k // 32
    D = np.zeros((n, ng))
    M = np.zeros((n, ng)) if qtype == "Q4_1" else None
    if act_order:
        for g in range(ng):
            D[:, g], mg = _ref_params(W[:, 32 * g:32 * g + 32], qtype)
            if M is not None:
                M[:, g] = mg
        order = sorted(range(k), key=lambda j: (-H[j, j], j))
    else:
        order = list(range(k))
    Hinv = np.linalg.inv(H + percdamp * np.mean(np.diag(H)) * np.eye(k))
    codes = np.zeros((n, k))
    for j in order:
        g = j // 32
        if not act_order and j % 32 == 0:
            D[:, g], mg = _ref_params(W[:, j:j + 32], qtype)
            if M is not None:
                M[:, g] = mg
        q, wq = _ref_code(W[:, j], D[:, g], None if M is None else M[:, g], qtype)
        codes[:, j] = q
        err = (W[:, j] - wq) / Hinv[j, j]
        W -= np.outer(err, Hinv[j])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return codes, D, M


def _calibration(rng, t, k, outliers=(3, 40, 77), scale=25.0):
    """Correlated activations: x = z @ A, with a few large-magnitude channels."""
    z = rng.standard_normal((t, k))
    a = rng.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    x = z @ a
    x[:, list(outliers)] *= scale
    return x


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [32, 128])
def test_gptq_matches_reference(qtype, act_order, block_size):
    rng = np.random.default_rng(3)
    n, k = 37, 160
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = _calibration(rng, 300, k)
    x[:, 50] = 0.0  # a dead column
    x[:, 10:20] *= rng.uniform(0.2, 3.0, 10)  # varied diag(H): a non-trivial act_order permutation
    h = x.T @ x
    got = gptq(w, h, qtype, block_size=block_size, act_order=act_order)
    codes, d, m = ref_gptq(w, h, qtype, act_order=act_order)
    np.testing.assert_array_equal(got.d.astype(np.float64), d)
    if m is not None:
        np.testing.assert_array_equal(got.m.astype(np.float64), m)
    np.testing.assert_array_equal(got.q.astype(np.float64), codes)
    # the blocks decode to the weights GPTQ assumed, through gguf too
    np.testing.assert_array_equal(gguf_dequantize(got.gguf_blocks(), _gt(qtype)), got.dequantize())
    if qtype != "Q4_1":
        assert np.all(got.dequantize()[:, 50] == 0)  # the dead column holds weight 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_gptq_beats_rtn_on_correlated_inputs(qtype):
    rng = np.random.default_rng(4)
    n, k = 64, 160
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = _calibration(rng, 512, k)
    h = x.T @ x
    e_rtn = layer_error(w, rtn(w, qtype).dequantize(), x)
    for act_order in (False, True):
        e_gptq = layer_error(w, gptq(w, h, qtype, act_order=act_order).dequantize(), x)
        assert e_gptq <= e_rtn
        if qtype != "Q8_0":
            assert e_gptq < 0.8 * e_rtn, (act_order, e_gptq, e_rtn)


def test_gptq_assumed_weights_are_the_decoded_ones():
    """Q4_1 decodes as float32(d * q) + m in float32, which rounds when m dwarfs d: GPTQ's error
    propagation must use that value (a float64 d * q + m would not be what the kernels see)."""
    rng = np.random.default_rng(13)
    n = 50
    d = (rng.uniform(1e-3, 3e-3, n)).astype(np.float16)
    m = (100 + rng.standard_normal(n)).astype(np.float16)
    col = m.astype(np.float64) + rng.uniform(0, 15, n) * d.astype(np.float64)
    q, wq = qz._encode(col, d.astype(np.float64), m.astype(np.float64), "Q4_1")
    blk = Quantized("Q4_1", np.repeat(d[:, None], 1, 1), np.repeat(m[:, None], 1, 1),
                    np.repeat(q.astype(np.uint8)[:, None], 32, 1))
    np.testing.assert_array_equal(wq, blk.dequantize()[:, 0].astype(np.float64))
    assert np.any(wq != d.astype(np.float64) * q + m.astype(np.float64))  # the case is a real one
    # and the whole of GPTQ on such offset weights still equals the reference
    w = (100 + rng.standard_normal((9, 64)) * 0.01).astype(np.float32)
    x = _calibration(rng, 200, 64, outliers=(5,))
    got = gptq(w, x.T @ x, "Q4_1")
    codes, _, _ = ref_gptq(w, x.T @ x, "Q4_1")
    np.testing.assert_array_equal(got.q.astype(np.float64), codes)


def test_gptq_uncorrelated_inputs_is_nearest_rounding():
    """H = c I: no error propagates, every code is the nearest one for its group's params."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((20, 96)).astype(np.float32)
    got = gptq(w, 4.0 * np.eye(96), "Q4_0")
    best = np.abs(got.dequantize() - w)
    for alt in (got.q.astype(int) - 1, got.q.astype(int) + 1):
        ok = (alt >= 0) & (alt <= 15)
        other = np.repeat(got.d.astype(np.float32), 32, axis=1) * (alt - 8)
        assert np.all(best[ok] <= np.abs(other - w)[ok] + 1e-7)


# ---------------------------------------------------------------------------------------------- AWQ


def _folded_error(ws, x, s, qtype):
    """sum_i || (x / s) Q(W_i s)^T - x W_i^T ||^2 / sum_i || x W_i^T ||^2, all float64."""
    x = np.asarray(x, np.float64)
    s = np.asarray(s, np.float64)
    num = den = 0.0
    for w in ws:
        wq = rtn((w.astype(np.float64) * s).astype(np.float32), qtype).dequantize().astype(np.float64)
        ref = x @ w.astype(np.float64).T
        num += np.sum(((x / s) @ wq.T - ref) ** 2)
        den += np.sum(ref ** 2)
    return num / den


@pytest.mark.parametrize("qtype", QTYPES)
def test_awq_search(qtype):
    rng = np.random.default_rng(6)
    k = 96
    ws = [(rng.standard_normal((37, k)) * 0.05).astype(np.float32),
          (rng.standard_normal((20, k)) * 0.05).astype(np.float32)]
    x = rng.standard_normal((400, k)) * rng.uniform(0.5, 1.5, k)
    x[:, [7, 33, 70]] *= 40.0  # salient channels
    grid = 20
    s = awq_search(ws, x, qtype, grid=grid)
    assert s.dtype == np.float32 and s.shape == (k,) and np.all(np.isfinite(s)) and np.all(s > 0)
    e_awq = _folded_error(ws, x, s, qtype)
    e_one = _folded_error(ws, x, np.ones(k), qtype)
    assert e_awq <= e_one
    if qtype != "Q8_0":
        assert e_awq < 0.9 * e_one, (e_awq, e_one)
        assert s[[7, 33, 70]].min() > np.median(s)  # salient channels scaled up
    # the search's optimum, recomputed here: s = mean|x|^alpha / sqrt(max * min), alpha = a / grid
    act = np.abs(x).mean(axis=0)
    losses = []
    for a in range(grid):
        sa = act ** (a / grid)
        losses.append(_folded_error(ws, x, (sa / np.sqrt(sa.max() * sa.min())).astype(np.float32), qtype))
    assert e_awq <= min(losses) * (1 + 1e-6)
    assert losses[0] == pytest.approx(e_one, rel=1e-12)


def test_awq_edge_cases():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((1000, 64))
    np.testing.assert_array_equal(awq_search([w], x, "Q4_0", grid=1), np.ones(64, np.float32))  # alpha 0 only
    np.testing.assert_array_equal(awq_search([w], np.zeros((10, 64)), "Q4_0"), np.ones(64, np.float32))
    s = awq_search([w], x, "Q4_1", max_tokens=100)  # subsampled tokens
    assert s.shape == (64,) and np.all(np.isfinite(s))
    x[:, 5] = 0.0  # a silent channel: still a finite positive scale
    s = awq_search([w], x, "Q4_1")
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    with pytest.raises(ValueError, match="share"):
        awq_search([w, rng.standard_normal((8, 32))], x, "Q4_0")
    with pytest.raises(ValueError, match="tokens, K=64"):
        awq_search([w], x[:, :32], "Q4_0")
    xn = x.copy(); xn[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        awq_search([w], xn, "Q4_0")


# ---------------------------------------------------------------------------------------------- errors and edges


def test_layer_error():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((5, 32))
    x = rng.standard_normal((9, 32))
    assert layer_error(w, w, x) == 0.0
    assert layer_error(w, 0 * w, x) == pytest.approx(1.0)
    assert layer_error(w, 1.1 * w, x) == pytest.approx(0.01)
    assert layer_error(0 * w, 0 * w, x) == 0.0


@pytest.mark.parametrize("qtype", QTYPES)
def test_zero_rows_and_zero_blocks(qtype):
    empty = rtn(np.zeros((0, 64), np.float32), qtype)
    assert empty.dequantize().shape == (0, 64) and empty.gguf_blocks().shape == (0, 2 * BLOCK_BYTES[qtype])
    assert gptq(np.zeros((0, 64)), np.eye(64), qtype).q.shape == (0, 64)
    z = np.zeros((3, 64), np.float32)
    for q in (rtn(z, qtype), gptq(z, np.eye(64), qtype), gptq(z, np.eye(64), qtype, act_order=True)):
        np.testing.assert_array_equal(q.dequantize(), z)
        np.testing.assert_array_equal(q.gguf_blocks(), gguf_quantize(z, _gt(qtype)))
    # an all-zero H (no calibration signal): every column dead, weights quantize to 0 blocks
    w = np.random.default_rng(9).standard_normal((3, 64))
    assert np.all(gptq(w, np.zeros((64, 64)), "Q8_0").dequantize() == 0)


def test_bad_inputs():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((4, 100))
    for call in (lambda: rtn(w, "Q4_0"), lambda: gptq(w, np.eye(100), "Q4_0"),
                 lambda: awq_search([w], rng.standard_normal((5, 100)), "Q4_0")):
        with pytest.raises(ValueError, match="K=100 is not a multiple of 32"):
            call()
    w = rng.standard_normal((4, 64))
    wn = w.copy(); wn[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rtn(wn, "Q8_0")
    with pytest.raises(ValueError, match="NaN"):
        gptq(wn, np.eye(64), "Q8_0")
    hn = np.eye(64); hn[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        gptq(w, hn, "Q8_0")
    with pytest.raises(ValueError, match="qtype"):
        rtn(w, "Q5_0")
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        gptq(w, np.eye(32), "Q4_1")
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, np.eye(64), "Q4_1", block_size=48)
    with pytest.raises(ValueError, match="2-D"):
        rtn(np.zeros(64), "Q4_0")
    with pytest.raises(ValueError, match="float16"):
        rtn(np.full((1, 32), 1e7), "Q4_0")
    with pytest.raises(ValueError, match="NaN"):
        layer_error(w, w, np.full((2, 64), np.nan))


def test_gptq_singular_h_without_damping():
    """percdamp=0 on a rank-deficient H: damping is raised instead of failing."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 64))
    x = rng.standard_normal((10, 64))  # rank 10 < 64
    q = gptq(w, x.T @ x, "Q4_1", percdamp=0.0)
    assert np.all(np.isfinite(q.dequantize()))


def test_gptq_speed_default_model_shape():
    """The default model's largest matrices: well under a second each (loose bound: shared CPUs)."""
    import time

    rng = np.random.default_rng(12)
    w = (rng.standard_normal((576, 1536)) * 0.05).astype(np.float32)
    x = rng.standard_normal((256, 1536))
    t0 = time.perf_counter()
    gptq(w, x.T @ x + np.eye(1536), "Q4_1")
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------------------------- integer grids

from mojollm.quantization import Grid  # noqa: E402


def _ref_grid_params(g: np.ndarray, grid: Grid):
    """(scale, zero) of a group g [N, gs] (float64), written from the rule in quantization's
    docstring: asymmetric over [min(w, 0), max(w, 0)]; symmetric: zero 2^(b-1), llama.cpp's Q4_0 scale
    (8 bits: max|w| / 127); the scale rounded to float16, 1 where it is 0."""
    maxq = 2 ** grid.bits - 1
    if grid.symmetric:
        z = np.full(g.shape[0], 2.0 ** (grid.bits - 1))
        if grid.bits == 8:
            d = np.abs(g).max(axis=1) / 127
        else:
            d = np.array([row[np.argmax(np.abs(row))] for row in g]) / -z
    else:
        lo, hi = np.minimum(g.min(axis=1), 0), np.maximum(g.max(axis=1), 0)
        d = (hi - lo) / maxq
    d = d.astype(np.float16).astype(np.float64)
    d[d == 0] = 1
    if not grid.symmetric:
        z = np.clip(np.round(-lo / d), 0, maxq)
    return d, z


def ref_gptq_grid(w, h, grid: Grid, percdamp=0.01, act_order=False):
    """ref_gptq's OBQ loop on a grid: params of group g from the current W when its first column
    comes (static, from the original W, with act_order). Returns (codes [N, K], scales, zeros)."""
    W = np.array(w, np.float64)
    H = np.array(h, np.float64)
    n, k = W.shape
    gs = k if grid.group_size == -1 else grid.group_size
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    ng = -(-k // gs)
    D, Z = np.zeros((n, ng)), np.zeros((n, ng))
    if act_order:
        for g in range(ng):
            D[:, g], Z[:, g] = _ref_grid_params(W[:, g * gs:(g + 1) * gs], grid)
        order = sorted(range(k), key=lambda j: (-H[j, j], j))
    else:
        order = list(range(k))
    Hinv = np.linalg.inv(H + percdamp * np.mean(np.diag(H)) * np.eye(k))
    codes = np.zeros((n, k))
    for j in order:
        g = j // gs
        if not act_order and j % gs == 0:
            D[:, g], Z[:, g] = _ref_grid_params(W[:, j:j + gs], grid)
        q = np.clip(np.round(W[:, j] / D[:, g]) + Z[:, g], 0, 2 ** grid.bits - 1)
        codes[:, j] = q
        err = (W[:, j] - D[:, g] * (q - Z[:, g])) / Hinv[j, j]
        W -= np.outer(err, Hinv[j])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return codes, D, Z


@pytest.mark.parametrize("grid", [Grid(4, 32), Grid(3, 64), Grid(4, -1), Grid(2, 128, True), Grid(8, 64, True),
                                  Grid(4, 64, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_grids_matches_reference(grid, act_order):
    rng = np.random.default_rng(21)
    n, k = 37, 160  # 160 = 64 + 64 + 32: a short last group
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = _calibration(rng, 300, k)
    x[:, 50] = 0.0
    x[:, 10:20] *= rng.uniform(0.2, 3.0, 10)
    h = x.T @ x
    got = gptq(w, h, grid, act_order=act_order)
    codes, d, z = ref_gptq_grid(w, h, grid, act_order=act_order)
    np.testing.assert_array_equal(got.scales.astype(np.float64), d)
    np.testing.assert_array_equal(got.zeros.astype(np.float64), z)
    np.testing.assert_array_equal(got.q.astype(np.float64), codes)
    # rtn on the grid: GPTQ with nothing to propagate (H = I)
    r = rtn(w, grid)
    c0, d0, z0 = ref_gptq_grid(w, np.eye(k), grid, percdamp=0.0)
    np.testing.assert_array_equal(r.q.astype(np.float64), c0)
    np.testing.assert_array_equal(r.scales.astype(np.float64), d0)


@pytest.mark.parametrize("grid", [Grid(3, 32), Grid(3, 128), Grid(4, 128), Grid(4, 128, True), Grid(2, 64)])
def test_gptq_beats_rtn_on_grids(grid):
    rng = np.random.default_rng(4)
    n, k = 64, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = _calibration(rng, 768, k)
    e_rtn = layer_error(w, rtn(w, grid).dequantize(), x)
    for act_order in (False, True):
        e_gptq = layer_error(w, gptq(w, x.T @ x, grid, act_order=act_order).dequantize(), x)
        assert e_gptq < 0.6 * e_rtn, (grid, act_order, e_gptq, e_rtn)


def test_grid_rules():
    rng = np.random.default_rng(22)
    w = (rng.standard_normal((16, 192)) * 0.1).astype(np.float32)
    w[0, :64] = np.abs(w[0, :64]) + 0.5  # an all-positive group: zero 0, 0 stays a code
    w[1, :64] = 0.0
    for grid in (Grid(4, 64), Grid(3, 32), Grid(2, -1), Grid(8, 128)):
        q = rtn(w, grid)
        assert q.q.max() <= grid.maxq and q.zeros.max() <= grid.maxq and q.scales.dtype == np.float16
        if grid.group_size in (32, 64):
            assert q.zeros[0, 0] == 0
            np.testing.assert_array_equal(q.dequantize()[1, :64], 0)
        assert np.abs(q.dequantize() - w).max() <= np.abs(q.scales.astype(np.float32)).max() * 0.5 * 1.01
    for bits in (2, 3, 4):  # symmetric: the weight of largest |w| is exact, the zero 2^(b-1)
        q = rtn(w, Grid(bits, 32, True))
        assert np.all(q.zeros == 2 ** (bits - 1))
        g = w[:, :32]
        i = np.abs(g).argmax(axis=1)
        np.testing.assert_allclose(q.dequantize()[np.arange(16), i], g[np.arange(16), i], rtol=1e-3)
    q8 = rtn(w, Grid(8, 32, True))
    assert np.abs(q8.q.astype(int) - 128).max() <= 127  # codes fit Q8_0's int8 range
    with pytest.raises(ValueError, match="bits must be one of"):
        Grid(5, 32)
    with pytest.raises(ValueError, match="group_size must be -1"):
        Grid(4, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        rtn(np.zeros((2, 48)), Grid(4, 32))


@pytest.mark.parametrize("grid", [Grid(4, 128), Grid(3, 32)])
def test_awq_search_on_grids(grid):
    rng = np.random.default_rng(23)
    k = 128
    ws = [(rng.standard_normal((40, k)) * 0.05).astype(np.float32)]
    x = rng.standard_normal((400, k)) * rng.uniform(0.5, 1.5, k)
    x[:, [7, 33, 70]] *= 40.0
    s = awq_search(ws, x, grid)
    assert s.shape == (k,) and np.all(s > 0)
    e_awq = _folded_error(ws, x, s, grid)
    e_one = _folded_error(ws, x, np.ones(k), grid)
    assert e_awq < 0.9 * e_one, (e_awq, e_one)
