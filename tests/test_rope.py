"""RoPE: the cos/sin tables (models/rope.py) against transformers' own rope init functions, and
the rotation kernel (nn.rope) against numpy rotations written here, in both pair layouts.

Bounds: inverse frequencies match HF's float32 computation to 1e-6 relative; the float32 table
matches float64 cos/sin to 1e-7 absolute; rotated vectors match the float64 rotation of the same
float32 table to 1e-6 of their scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mojollm.kernels import nn
from mojollm.models.rope import rope_cos_sin, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def hf_inv_freq(head_dim: int, base: float, scaling: dict | None) -> np.ndarray:
    params = {"rope_type": "default", "rope_theta": base}
    if scaling:
        params.update(scaling)
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=131072, rope_parameters=params)
    if params["rope_type"] == "default":
        inv, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, device="cpu")
    assert factor == 1.0  # these types never rescale cos/sin
    return inv.double().numpy()


@pytest.mark.parametrize("head_dim,base,scaling", [
    (64, 100000.0, None),                       # the default model (SmolLM2-135M)
    (128, 500000.0, LLAMA3),                    # Llama 3.1 / 3.2
    (64, 500000.0, dict(LLAMA3, factor=32.0)),  # Llama 3.2 1B/3B
    (128, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (96, 10000.0, {"type": "default"}),        # old-style key
])
def test_inv_freq_matches_transformers(head_dim, base, scaling):
    ours = rope_inv_freq(head_dim, base, scaling)
    theirs = hf_inv_freq(head_dim, base, scaling)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_llama3_scaling_changes_only_low_frequencies():
    plain = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, LLAMA3)
    wavelen = 2 * np.pi / plain
    assert np.array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8.0, rtol=1e-15)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8.0)


def test_table_is_float64_accurate_at_large_positions():
    tab = rope_cos_sin(64, 100000.0, 131072)
    assert tab.dtype == np.float32 and tab.shape == (131072, 64)
    inv = 1.0 / 100000.0 ** (np.arange(0, 64, 2) / 64.0)
    for p in (0, 1, 777, 131071):
        ang = p * inv
        np.testing.assert_allclose(tab[p, :32], np.cos(ang), atol=1e-7)
        np.testing.assert_allclose(tab[p, 32:], np.sin(ang), atol=1e-7)


def test_table_matches_hf_rotary_embedding_small_positions():
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(0, 50)[None, :]
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), pos)
    tab = rope_cos_sin(64, 100000.0, 50)
    # HF forms p * theta in float32: its angle error grows like p * 6e-8 rad (~3e-6 at p = 49).
    np.testing.assert_allclose(tab[:, :32], cos[0, :, :32].numpy(), atol=5e-6)
    np.testing.assert_allclose(tab[:, 32:], sin[0, :, :32].numpy(), atol=5e-6)


def test_bad_table_arguments():
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(63, 10000.0, 8)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        rope_cos_sin(64, 10000.0, 8, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_cos_sin(64, 10000.0, 8, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="max_positions"):
        rope_cos_sin(64, 10000.0, 0)
    with pytest.raises(ValueError, match="base"):
        rope_cos_sin(64, 0.5, 8)


# ---- the rotation kernel ----


def ref_rope(x, positions, tab, neox):
    """float64 rotation of the first R features of every head, from the same table."""
    x = x.astype(np.float64)
    r = tab.shape[1]
    half = r // 2
    cos = tab[positions, :half].astype(np.float64)[:, None, :]
    sin = tab[positions, half:].astype(np.float64)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:r]
        out[..., :half] = a * cos - b * sin
        out[..., half:r] = b * cos + a * sin
    else:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = b * cos + a * sin
    return out


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("t,h,d,rot", [
    (1, 9, 64, 64), (7, 3, 64, 64), (33, 4, 128, 128), (5, 2, 80, 80), (3, 5, 128, 64),
    (4, 3, 96, 24), (2, 1, 18, 18), (300, 8, 64, 64),
])
def test_rope_kernel(neox, t, h, d, rot):
    rng = np.random.default_rng(t * 1000 + h * 10 + d + rot)
    x = rng.standard_normal((t, h, d)).astype(np.float32)
    positions = rng.integers(0, 4000, size=t).astype(np.int32)
    tab = rope_cos_sin(rot, 10000.0, 4000)
    want = ref_rope(x, positions, tab, neox)
    got = nn.rope(x, positions, tab, neox)
    assert got is x
    np.testing.assert_allclose(x, want, atol=1e-6 * max(1.0, np.abs(want).max()))


def test_rope_neox_matches_hf_apply_rotary_pos_emb():
    rng = np.random.default_rng(11)
    t, h, d = 13, 9, 64
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k = rng.standard_normal((t, 3, d)).astype(np.float32)
    pos = np.arange(100, 100 + t, dtype=np.int32)
    tab = rope_cos_sin(d, 100000.0, 200)
    cos = np.concatenate([tab[pos, :32]] * 2, axis=1)  # HF repeats the half-table
    sin = np.concatenate([tab[pos, 32:]] * 2, axis=1)
    qt = torch.from_numpy(q).transpose(0, 1)[None]  # [1, H, T, D]
    kt = torch.from_numpy(k).transpose(0, 1)[None]
    hq, hk = apply_rotary_pos_emb(qt, kt, torch.from_numpy(cos)[None], torch.from_numpy(sin)[None])
    nn.rope(q, pos, tab, True)
    nn.rope(k, pos, tab, True)
    np.testing.assert_allclose(q, hq[0].transpose(0, 1).numpy(), atol=2e-6)
    np.testing.assert_allclose(k, hk[0].transpose(0, 1).numpy(), atol=2e-6)


def test_interleaved_equals_neox_on_permuted_features():
    # llama.cpp permutes q/k rows of llama GGUFs so that pairs (2i, 2i+1) hold what HF pairs as
    # (i, i + D/2): rotating the permuted vector interleaved == permuting the neox rotation.
    rng = np.random.default_rng(3)
    d = 64
    x = rng.standard_normal((6, 2, d)).astype(np.float32)
    perm = np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], axis=1).reshape(-1)
    pos = np.array([0, 1, 2, 50, 51, 99], np.int32)
    tab = rope_cos_sin(d, 10000.0, 100)
    inter = np.ascontiguousarray(x[..., perm])
    nn.rope(inter, pos, tab, False)
    nn.rope(x, pos, tab, True)
    np.testing.assert_allclose(inter, x[..., perm], atol=1e-6)


def test_rope_bad_inputs():
    tab = rope_cos_sin(64, 10000.0, 16)
    x = np.ones((3, 2, 64), np.float32)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 16\)"):
        nn.rope(x, np.array([0, 16, 1], np.int32), tab, True)
    with pytest.raises(ValueError, match=r"positions must lie"):
        nn.rope(x, np.array([0, -1, 1], np.int32), tab, True)
    with pytest.raises(ValueError, match="int32"):
        nn.rope(x, np.array([0, 1, 2], np.int64), tab, True)
    with pytest.raises(ValueError, match="3 tokens"):
        nn.rope(x, np.array([0, 1], np.int32), tab, True)
    with pytest.raises(ValueError, match="rotary width"):
        nn.rope(np.ones((3, 2, 32), np.float32), np.zeros(3, np.int32), tab, True)
    with pytest.raises(ValueError, match="3 dimensions"):
        nn.rope(np.ones((3, 64), np.float32), np.zeros(3, np.int32), tab, True)
