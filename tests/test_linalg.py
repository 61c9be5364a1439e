"""Dense CPU kernels (mojo/linalg.mojo via mojollm.kernels.linalg) against float64 numpy.

Error bound: every output element c_ij must satisfy |c_ij - ref_ij| <= TOL * sum_k |a_ik| |b_kj|
(the natural scale of f32 rounding in a dot product). TOL = 1e-5 is a few times the deterministic
bound for blocked f32 summation at these depths (observed errors are ~3e-7). F16 and BF16 weights
are checked against the float64 product with the *same* rounded weights (widened here, bit by bit),
so the same f32 bound applies: the kernel adds no error beyond f32 accumulation.
"""

import numpy as np
import pytest

from mojollm.kernels.linalg import DenseLinear, gemm
from mojollm.weights import WeightTensor

TOL = 1e-5


def _rng(*key):
    return np.random.default_rng(list(key))


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _assert_close(got, a64, b64, tol=TOL):
    """got ~= a64 @ b64 elementwise, relative to sum |a||b|."""
    ref = a64 @ b64
    scale = np.abs(a64) @ np.abs(b64)
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - ref)
    worst = float(np.max(err / scale)) if err.size else 0.0
    assert worst <= tol, f"max error {worst:.3g} x sum|a||b| exceeds {tol}"


def _bf16_bits(a):
    """float32 -> bfloat16 bits, round to nearest even (independent of mojollm.weights)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _weight(rng, n, k, qtype):
    """A WeightTensor of type qtype and its exact values as float64 [n, k]."""
    w = _normal(rng, (n, k))
    if qtype == "F32":
        return WeightTensor("w", (n, k), "F32", w), w.astype(np.float64)
    if qtype == "F16":
        h = w.astype(np.float16)
        return WeightTensor("w", (n, k), "F16", h), h.astype(np.float64)
    bits = _bf16_bits(w)
    return WeightTensor("w", (n, k), "BF16", bits), _bf16_to_f64(bits)


# ---- gemm ----

GEMM_SHAPES = [(1, 1, 1), (1, 7, 33), (7, 1, 577), (7, 33, 1), (33, 577, 7), (130, 33, 577),
               (577, 130, 33), (13, 577, 300)]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_matches_float64(m, n, k):
    rng = _rng(1, m, n, k)
    a, b = _normal(rng, (m, k)), _normal(rng, (k, n))
    _assert_close(gemm(a, b), a.astype(np.float64), b.astype(np.float64))


def test_gemm_all_blocking_levels_and_threads():
    # M > MC (144) row blocks, N > 1024 (two B-panel chunks, ragged last panel), K > KC (256)
    # k blocks with a ragged tail, and enough work for every core: one call covers them all.
    rng = _rng(2)
    m, n, k = 157, 1057, 531
    a, b = _normal(rng, (m, k)), _normal(rng, (k, n))
    c = gemm(a, b)
    _assert_close(c, a.astype(np.float64), b.astype(np.float64))
    # Each element is summed in the same order whatever the split: one thread gives the same bits.
    np.testing.assert_array_equal(gemm(a, b, max_threads=1), c)


def test_gemm_degenerate_sizes():
    rng = _rng(3)
    a, b = _normal(rng, (5, 0)), _normal(rng, (0, 4))
    np.testing.assert_array_equal(gemm(a, b), np.zeros((5, 4), np.float32))
    assert gemm(_normal(rng, (0, 3)), _normal(rng, (3, 4))).shape == (0, 4)
    assert gemm(_normal(rng, (2, 3)), _normal(rng, (3, 0))).shape == (2, 0)


# ---- DenseLinear ----

@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("n,k", [(1, 7), (7, 33), (33, 577), (577, 130), (130, 300)])
def test_linear_matches_float64(qtype, t, n, k):
    rng = _rng(4, t, n, k, len(qtype))
    w, w64 = _weight(rng, n, k, qtype)
    x = _normal(rng, (t, k))
    lin = DenseLinear(w)
    assert (lin.out_features, lin.in_features, lin.qtype) == (n, k, qtype)
    _assert_close(lin.forward(x), x.astype(np.float64), w64.T)


@pytest.mark.parametrize("qtype", ["F32", "BF16"])
@pytest.mark.parametrize("t", [1, 3, 200])
def test_linear_large_threaded(qtype, t):
    # Enough work for the parallel region on both paths (GEMV t<=4, GEMM otherwise), K > KC,
    # N > 1024 with a ragged last panel; one thread must give the same bits as all cores.
    rng = _rng(5, t, len(qtype))
    w, w64 = _weight(rng, 1100, 1000, qtype)  # >= 2 MiB of weights even as bf16
    x = _normal(rng, (t, 1000))
    lin = DenseLinear(w)
    y = lin.forward(x)
    _assert_close(y, x.astype(np.float64), w64.T)
    np.testing.assert_array_equal(lin.forward(x, max_threads=1), y)


def test_bf16_weights_are_half_the_bytes_and_close_to_f32():
    rng = _rng(6)
    w = _normal(rng, (64, 96))
    f32 = DenseLinear(WeightTensor.from_float("w", w))
    bf16 = DenseLinear(WeightTensor("w", w.shape, "BF16", _bf16_bits(w)))
    assert bf16.nbytes * 2 == f32.nbytes >= w.nbytes
    x = _normal(rng, (3, 96))
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    # bf16 keeps 8 significant bits: relative rounding <= 2^-9 per weight.
    assert np.max(np.abs(bf16.forward(x) - f32.forward(x)) / scale) <= 2.0 ** -9


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_weight_round_trips_through_packing(qtype):
    rng = _rng(7, len(qtype))
    w, _ = _weight(rng, 37, 19, qtype)
    back = DenseLinear(w).weight
    assert (back.shape, back.qtype) == (w.shape, qtype)
    np.testing.assert_array_equal(back.data, w.data)


def test_linear_zero_tokens():
    rng = _rng(8)
    lin = DenseLinear(_weight(rng, 9, 5, "F32")[0])
    assert lin.forward(np.empty((0, 5), np.float32)).shape == (0, 9)


def test_stack_and_concat_fuse_rows():
    rng = _rng(9)
    (wq, q64), (wk, k64), (wv, v64) = (_weight(rng, n, 65, "BF16") for n in (96, 33, 33))
    x = _normal(rng, (5, 65))
    ref = np.concatenate([q64, k64, v64]).T
    stacked = DenseLinear.stack([wq, wk, wv], name="qkv")
    assert (stacked.parts, stacked.out_features, stacked.qtype, stacked.name) == ((96, 33, 33), 162, "BF16", "qkv")
    _assert_close(stacked.forward(x), x.astype(np.float64), ref)
    fused = DenseLinear.concat([DenseLinear(wq), DenseLinear.stack([wk, wv])])
    assert fused.parts == (96, 33, 33)
    np.testing.assert_array_equal(fused.forward(x), stacked.forward(x))
    for t in (1, 4):  # the GEMV path on a fused layer
        _assert_close(fused.forward(x[:t].copy()), x[:t].astype(np.float64), ref)


def test_stack_mixed_dtypes_widens_to_f32():
    rng = _rng(10)
    (w1, a64), (w2, b64) = _weight(rng, 8, 40, "F16"), _weight(rng, 8, 40, "BF16")
    fused = DenseLinear.stack([w1, w2])
    assert fused.qtype == "F32"
    x = _normal(rng, (3, 40))
    _assert_close(fused.forward(x), x.astype(np.float64), np.concatenate([a64, b64]).T)


# ---- bad input: one clear ValueError, never a crash in Mojo ----

def test_gemm_rejects_bad_input():
    a, b = np.ones((4, 3), np.float32), np.ones((3, 5), np.float32)
    cases = {
        "must be float32": (a.astype(np.float64), b),
        "must be C-contiguous": (np.ones((4, 6), np.float32)[:, ::2], b),
        "shape mismatch": (a, np.ones((4, 5), np.float32)),
        "2 dimensions": (a.ravel(), b),
        "numpy array": (a.tolist(), b),
    }
    for msg, (x, y) in cases.items():
        with pytest.raises(ValueError, match=msg):
            gemm(x, y)
    with pytest.raises(ValueError, match="max_threads"):
        gemm(a, b, max_threads=-1)


def test_linear_rejects_bad_input():
    lin = DenseLinear(WeightTensor.from_float("w", np.ones((6, 4), np.float32)))
    with pytest.raises(ValueError, match="expects 4"):
        lin.forward(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="must be float32"):
        lin.forward(np.ones((2, 4), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        lin.forward(np.ones((4, 2), np.float32).T)
    with pytest.raises(ValueError, match="2 dimensions"):
        lin.forward(np.ones(4, np.float32))


def test_dense_linear_rejects_bad_weights():
    q = WeightTensor("q", (4, 32), "Q8_0", np.zeros((4, 34), np.uint8))
    bad = {
        "QuantLinear": q,
        "must be 2-D": WeightTensor("w", (2, 3, 4), "F32", np.ones((2, 3, 4), np.float32)),
        "must be float16": WeightTensor("w", (3, 4), "F16", np.ones((3, 4), np.float32)),
        "12 elements": WeightTensor("w", (3, 4), "F32", np.ones((3, 5), np.float32)),
        "needs a WeightTensor": np.ones((3, 4), np.float32),
    }
    for msg, w in bad.items():
        with pytest.raises(ValueError, match=msg):
            DenseLinear(w)
    with pytest.raises(ValueError, match="one in_features"):
        DenseLinear.stack([WeightTensor.from_float("a", np.ones((2, 4), np.float32)),
                           WeightTensor.from_float("b", np.ones((2, 5), np.float32))])
    with pytest.raises(ValueError, match="non-empty"):
        DenseLinear.concat([])

