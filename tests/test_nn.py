"""Elementwise / normalisation kernels (mojo/nn.mojo) against float64 numpy written here.

float32 bound: relative error <= 1e-5 of the row's scale (accumulation over <= 4096 terms in
float32 with SIMD partial sums; exp/sqrt of the Mojo stdlib are within a few ulp).
Sizes cover the scalar tails (1, 7, 33, 577 columns) and the parallel path (> 65536 elements).
"""

from __future__ import annotations

import numpy as np
import pytest

from mojollm.kernels import nn

RTOL = 1e-5
SHAPES = [(1, 1), (1, 7), (3, 33), (7, 577), (1, 576), (64, 2049), (130, 1024)]


def rng_for(*shape):
    return np.random.default_rng(abs(hash(shape)) % (2**32))


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(got, want, rtol=RTOL):
    got = np.asarray(got, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert err <= rtol, f"max relative error {err:.3g} > {rtol}"


def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape):
    rng = rng_for(*shape)
    x = randn(rng, *shape, scale=3.0)
    w = randn(rng, shape[1])
    eps = 1e-5
    assert_close(nn.rms_norm(x, w, eps), ref_rms_norm(x, w, eps))


def test_rms_norm_eps_matters():
    # A row of tiny values: eps dominates the mean square, so a kernel ignoring eps fails.
    x = np.full((2, 9), 1e-4, dtype=np.float32)
    x[1] *= -3
    w = np.linspace(0.5, 1.5, 9, dtype=np.float32)
    assert_close(nn.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))


def test_rms_norm_3d_rows():
    rng = np.random.default_rng(5)
    x = randn(rng, 2, 3, 65)
    w = randn(rng, 65)
    assert_close(nn.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_updates_residual(shape):
    rng = rng_for(*shape, 1)
    x = randn(rng, *shape)
    residual = randn(rng, *shape, scale=2.0)
    w = randn(rng, shape[1])
    want_res = residual.astype(np.float64) + x
    normed, res = nn.add_rms_norm(x, residual, w, 1e-5)
    assert res is residual  # updated in place, as the backend contract says
    assert_close(residual, want_res)
    assert_close(normed, ref_rms_norm(want_res, w, 1e-5))


@pytest.mark.parametrize("shape", SHAPES)
def test_add_same_shape_and_bias(shape):
    rng = rng_for(*shape, 2)
    a = randn(rng, *shape)
    b = randn(rng, *shape)
    bias = randn(rng, shape[1])
    assert_close(nn.add(a, b), a.astype(np.float64) + b)
    assert_close(nn.add(a, bias), a.astype(np.float64) + bias[None, :])


@pytest.mark.parametrize("shape", SHAPES)
def test_silu_mul(shape):
    rng = rng_for(*shape, 3)
    gu = randn(rng, shape[0], 2 * shape[1], scale=4.0)
    g = gu[:, : shape[1]].astype(np.float64)
    u = gu[:, shape[1]:].astype(np.float64)
    assert_close(nn.silu_mul(gu), g / (1.0 + np.exp(-g)) * u)


def test_silu_mul_extreme_gates():
    # exp(-g) overflows for g < -88: silu must go to 0, not NaN; large g gives g * u.
    gu = np.array([[-1000.0, -90.0, 0.0, 90.0, 2.0, 3.0, -1.0, 0.5]], dtype=np.float32)
    g = gu[:, :4].astype(np.float64)
    with np.errstate(over="ignore"):
        want = g / (1.0 + np.exp(-g)) * gu[:, 4:]
    got = nn.silu_mul(gu)
    assert np.all(np.isfinite(got))
    assert_close(got, want)


@pytest.mark.parametrize("shape", SHAPES + [(2, 49152)])
def test_softmax(shape):
    rng = rng_for(*shape, 4)
    x = randn(rng, *shape, scale=8.0)
    x[0, 0] = 80.0  # would overflow exp without the max shift
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(axis=-1, keepdims=True))
    assert_close(nn.softmax(x), e / e.sum(axis=-1, keepdims=True))


def test_empty_rows_are_fine():
    x = np.zeros((0, 8), dtype=np.float32)
    assert nn.rms_norm(x, np.ones(8, np.float32), 1e-5).shape == (0, 8)
    assert nn.silu_mul(np.zeros((0, 8), np.float32)).shape == (0, 4)


# ---- bad input: one clear ValueError, never a crash inside Mojo ----


def test_bad_inputs():
    x = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="float32"):
        nn.rms_norm(x.astype(np.float64), w, 1e-5)
    with pytest.raises(ValueError, match="weight has 7"):
        nn.rms_norm(x, np.ones(7, np.float32), 1e-5)
    with pytest.raises(ValueError, match="C-contiguous"):
        nn.rms_norm(np.ones((8, 4), np.float32).T, w[:4].copy(), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        nn.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="numpy array"):
        nn.rms_norm([[1.0]], w, 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        nn.add_rms_norm(x, np.ones((3, 8), np.float32), w, 1e-5)
    ro = np.ones((4, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        nn.add_rms_norm(x, ro, w, 1e-5)
    with pytest.raises(ValueError, match="share memory"):
        nn.add_rms_norm(x, x, w, 1e-5)
    with pytest.raises(ValueError, match="b must have shape"):
        nn.add(x, np.ones(7, np.float32))
    with pytest.raises(ValueError, match="even"):
        nn.silu_mul(np.ones((2, 7), np.float32))
    with pytest.raises(ValueError, match="non-empty last axis"):
        nn.softmax(np.ones((3, 0), np.float32))
