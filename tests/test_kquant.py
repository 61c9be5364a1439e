"""GGUF Q5_0 / Q5_1 and k-quant (Q2_K .. Q6_K) kernels (mojo/kquant.mojo) against the `gguf` package
and float64 numpy, and a k-quant model against the same model on float32 weights.

References, all independent of the code under test:
  * dequantize / embedding rows: gguf.quants.dequantize, compared bit for bit (float32 bit
    patterns, so even the sign of zero must match);
  * matmul: float64 numpy on gguf's dequantized weights, per output
        |y - ref| <= 1e-5 * sum_k |x_k| |w_k|
    (float32 accumulation; a wrong block, scale, bit or group order is of order 1 in these units);
  * the model: the default SmolLM2 rewritten with Q5_0 / Q5_1 attention and MLP, a k-quant in every
    ffn_down (the only rows of 256-multiples) and a Q5_0 embedding, scored on a short text against
    the very same weights widened to float32 (dense kernels): perplexity within 1e-4 on the float32
    kernels, within 1% by default (Modular's int8 kernel runs the Q4_K / Q6_K prefill), and its
    greedy answer through the LLM API still says Paris.
  * Modular's int8 Q4_K / Q6_K kernel: activations rounded to int8 per 256, so per output
        |y - ref| <= sum over 256-blocks b of max|x_b| / 254 * sum_b |w|  (+ the float32 bound).
Test weights: gguf.quants.quantize where it can (Q5_0, Q5_1), else random raw blocks (scales set
explicitly, including extreme float16 values) or the small k-quant quantizer below.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mojollm.kernels import quant
from mojollm.kernels.quant import EmbeddingTable, QuantLinear
from mojollm.weights import BLOCK_BYTES, BLOCK_SIZE, WeightTensor
from test_quant import MATMUL_RTOL, assert_matmul_close

QTYPES = ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the float16 fields (d, and dmin / m where the format has one) in each block.
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}
# Largest finite, smallest normal and smallest subnormal float16, a negative zero, and negatives.
EXTREME_F16 = np.array([65504.0, -65504.0, 6.103515625e-05, 5.960464477539063e-08, -5.960464477539063e-08,
                        -0.0, 0.0, 1.0, -3.5], dtype=np.float16)


def ref_dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_dequantize(np.asarray(raw), GGMLQuantizationType[qtype]).astype(np.float32)


def random_blocks(rng, qtype: str, rows: int, blocks_per_row: int, extreme: bool = False) -> np.ndarray:
    """uint8 [rows, blocks * block_bytes]: random codes and packed scales, float16 fields random
    normal (or drawn from EXTREME_F16), never inf or NaN."""
    bb = BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if extreme:
            vals = rng.choice(EXTREME_F16, size=(rows, blocks_per_row))
        else:
            vals = (rng.standard_normal((rows, blocks_per_row)) * 0.02).astype(np.float16)
        raw[:, :, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * bb)


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    bad = np.argwhere(got.view(np.uint32) != want.view(np.uint32))
    assert not len(bad), f"{len(bad)} values differ, first at {tuple(bad[0])}: {got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}"


# ---------------------------------------------------------------- a small k-quant quantizer


def quantize_kquant(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, K] (K a multiple of 256) -> GGUF k-quant blocks. Plain min/max (or absmax)
    scales per group, rounded to nearest: not llama.cpp's search, but valid blocks that gguf
    dequantizes to within a quantization step of x (checked in test_kquant_quantizer)."""
    rows, k = x.shape
    n = rows * k // 256
    v = x.reshape(n, 256).astype(np.float32)
    f16 = lambda a: np.asarray(a, np.float32).astype(np.float16)  # noqa: E731
    if qtype in ("Q4_K", "Q5_K", "Q2_K"):  # w = d * sc * q - dmin * m
        gs, levels, sbits = (16, 3, 4) if qtype == "Q2_K" else (32, 15 if qtype == "Q4_K" else 31, 6)
        g = v.reshape(n, 256 // gs, gs)
        lo = np.minimum(g.min(-1), 0)
        step = (g.max(-1) - lo) / levels
        smax = 2**sbits - 1
        d = f16(step.max(-1) / smax)
        dmin = f16(-lo.min(-1) / smax)
        sc = np.clip(np.rint(step / np.where(d == 0, 1, d.astype(np.float32))[:, None]), 0, smax).astype(np.uint8)
        m = np.clip(np.rint(-lo / np.where(dmin == 0, 1, dmin.astype(np.float32))[:, None]), 0, smax).astype(np.uint8)
        scale = d.astype(np.float32)[:, None] * sc
        offset = dmin.astype(np.float32)[:, None] * m
        q = np.clip(np.rint((g + offset[..., None]) / np.where(scale == 0, 1, scale)[..., None]), 0, levels)
        q = q.astype(np.uint8).reshape(n, 256)
    else:  # Q6_K, Q3_K: w = d * sc * (q - zero), sc signed, no min
        dmin = m = None
        gs, zero, smax = (16, 32, 127) if qtype == "Q6_K" else (16, 4, 31)
        g = v.reshape(n, 16, gs)
        step = np.abs(g).max(-1) / (zero - 1)
        d = f16(step.max(-1) / smax)
        sc = np.clip(np.rint(step / np.where(d == 0, 1, d.astype(np.float32))[:, None]), -smax - 1, smax).astype(np.int8)
        scale = d.astype(np.float32)[:, None] * sc
        q = np.clip(np.rint(g / np.where(scale == 0, 1, scale)[..., None]), -zero, zero - 1) + zero
        q = q.astype(np.uint8).reshape(n, 256)
    return _pack(qtype, q, d, dmin, sc, m).reshape(rows, -1)


def _pack(qtype, q, d, dmin, sc, m) -> np.ndarray:
    """Pack codes q [n, 256] and scales into the ggml block layout (mojo/kquant.mojo's header)."""
    n = q.shape[0]
    h2 = lambda a: np.asarray(a, np.float16).reshape(n, 1).view(np.uint8)  # noqa: E731
    by_hsl = q.reshape(n, 2, 4, 32)  # e = 128 h + 32 s + l: 2-bit fields at byte 32 h + l, bits 2 s
    bits2 = lambda a: sum((a[:, :, s] & 3) << (2 * s) for s in range(4)).astype(np.uint8).reshape(n, 64)  # noqa: E731
    by_jl = q.reshape(n, 8, 32)  # e = 32 j + l: high-bit planes, bit j of byte l
    if qtype in ("Q4_K", "Q5_K"):
        nib = by_jl.reshape(n, 4, 2, 32) & 15  # e = 64 j + 32 nibble + l
        qs = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(n, 128)
        s = np.zeros((n, 12), np.uint8)
        s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        s[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
        parts = [h2(d), h2(dmin), s]
        if qtype == "Q5_K":
            parts.append(sum(((by_jl[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8))
        return np.concatenate(parts + [qs], axis=1)
    if qtype == "Q6_K":
        ql = (by_hsl[:, :, 0:2] & 15) | ((by_hsl[:, :, 2:4] & 15) << 4)  # byte 64 h + 32 (s % 2) + l
        qh = sum(((by_hsl[:, :, s] >> 4) & 3) << (2 * s) for s in range(4)).astype(np.uint8)
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), h2(d)], axis=1)
    if qtype == "Q2_K":
        return np.concatenate([sc | (m << 4), bits2(by_hsl), h2(d), h2(dmin)], axis=1)
    # Q3_K: six-bit scales sc + 32, low 4 bits in bytes 0..7 (two per byte), high 2 bits in 8..11
    s6 = (sc.astype(np.int16) + 32).astype(np.uint8)
    s = np.zeros((n, 12), np.uint8)
    s[:, 0:8] = (s6[:, 0:8] & 15) | ((s6[:, 8:16] & 15) << 4)
    s[:, 8:12] = sum(((s6[:, 4 * kk:4 * kk + 4] >> 4) & 3) << (2 * kk) for kk in range(4)).astype(np.uint8)
    hmask = sum(((by_jl[:, j] >> 2) & 1) << j for j in range(8)).astype(np.uint8)
    return np.concatenate([hmask, bits2(by_hsl), s, h2(d)], axis=1)


def quantize_any(x: np.ndarray, qtype: str) -> np.ndarray:
    if qtype in K_QUANTS:
        return quantize_kquant(x, qtype)
    return gguf_quantize(x, GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_kquant_quantizer(qtype):
    """The test quantizer writes blocks gguf reads back to within a quantization step."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 512)) * np.exp(rng.uniform(-3, 1, (5, 1)))).astype(np.float32)
    back = ref_dequantize(quantize_kquant(x, qtype), qtype)
    rel = np.abs(back - x).max(-1) / np.abs(x).max(-1)
    assert rel.max() < {"Q2_K": 0.5, "Q3_K": 0.3}.get(qtype, 0.1), rel


# ---------------------------------------------------------------- dequantize / embedding


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_dequantize_bit_exact(qtype, extreme):
    rng = np.random.default_rng(QTYPES.index(qtype) * 2 + extreme)
    for rows, nblocks in ((1, 1), (7, 3), (33, 2)):
        raw = random_blocks(rng, qtype, rows, nblocks, extreme)
        want = ref_dequantize(raw, qtype)
        got = quant.dequantize(raw, qtype, (rows, nblocks * BLOCK_SIZE[qtype]))
        assert_bit_exact(got, want)
        lin = QuantLinear(WeightTensor("w", (rows, nblocks * BLOCK_SIZE[qtype]), qtype, raw))
        assert_bit_exact(lin.dequantize(), want)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_dequantize_of_gguf_quantized_rows(qtype):
    """Blocks written by gguf's own quantizer: zero blocks, +-a ties, tiny and huge values."""
    rng = np.random.default_rng(3)
    k = 96
    x = np.zeros((6, k), np.float32)
    x[1] = 0.75
    x[2, ::2], x[2, 1::2] = -2.0, 2.0
    x[3] = rng.standard_normal(k)
    x[4] = np.linspace(-3e-6, 2e-6, k)
    x[5] = np.linspace(-4e4, 6e4, k)
    raw = gguf_quantize(x, GGMLQuantizationType[qtype])
    assert_bit_exact(quant.dequantize(raw, qtype, x.shape), ref_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding_rows_bit_exact(qtype):
    rng = np.random.default_rng(40 + QTYPES.index(qtype))
    vocab, nblocks = 37, 3
    raw = random_blocks(rng, qtype, vocab, nblocks)
    table = EmbeddingTable(WeightTensor("emb", (vocab, nblocks * BLOCK_SIZE[qtype]), qtype, raw))
    ids = np.array([5, 0, 36, 5, 17], dtype=np.int64)
    assert_bit_exact(table.lookup(ids), ref_dequantize(raw, qtype)[ids])
    big = rng.integers(0, vocab, 4000)  # above the gather's parallel threshold
    assert_bit_exact(table.lookup(big), ref_dequantize(raw, qtype)[big])


# ---------------------------------------------------------------- matmul


@pytest.mark.parametrize("qtype", QTYPES)
def test_matmul_matches_float64(qtype):
    rng = np.random.default_rng(10 + QTYPES.index(qtype))
    block = BLOCK_SIZE[qtype]
    for n, nblocks in ((1, 1), (7, 3), (33, 6)):
        k = nblocks * block
        w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 1, (n, 1)))).astype(np.float32)
        raw = quantize_any(w, qtype) if nblocks > 1 else random_blocks(rng, qtype, n, nblocks)
        lin = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
        wref = ref_dequantize(raw, qtype)
        for t in (1, 2, 3, 8, 9, 17, 64):  # float32 activations (Q5_*'s int8: tests/test_quant_int8.py)
            x = rng.standard_normal((t, k)).astype(np.float32)
            assert_matmul_close(lin.forward(x, dot="float"), x, wref)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_K", "Q6_K"])
def test_matmul_threads(qtype):
    """A weight above the kernels' parallel thresholds (2 MiB GEMV, 32 MFLOP GEMM): rows are split
    over the cores, and every row's summation order is the same as on one thread."""
    rng = np.random.default_rng(20)
    n, k = 2049, 2048  # Q5_0: 2.9 MB, Q4_K 2.4 MB, Q6_K 3.4 MB
    raw = random_blocks(rng, qtype, n, k // BLOCK_SIZE[qtype])
    lin = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
    wref = ref_dequantize(raw, qtype)
    for t in (1, 3, 17):
        x = rng.standard_normal((t, k)).astype(np.float32)
        y = lin.forward(x, dot="float")
        assert_matmul_close(y, x, wref)
        assert np.array_equal(y, lin.forward(x, max_threads=1, dot="float"))


@contextmanager
def float_default():
    """Layers loaded inside stay on the float32 kernels (QuantLinear reads default_dot() at load)."""
    previous = quant.set_default_dot("float")
    try:
        yield
    finally:
        quant.set_default_dot(previous)


def assert_int8_close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """Activations rounded to int8 per 256 (scale max|x| / 127, error <= half a step per element):
    |y - ref| <= sum over blocks of max|x_b| / 254 * sum_b |w|, plus float32 rounding."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    t, k = x.shape
    step = np.abs(x64).reshape(t, k // 256, 256).max(-1) / 254  # [T, K/256]
    w_sums = np.abs(w64).reshape(w.shape[0], k // 256, 256).sum(-1)  # [N, K/256]
    bound = 1.01 * step @ w_sums.T + MATMUL_RTOL * (np.abs(x64) @ np.abs(w64).T)
    excess = np.abs(y - x64 @ w64.T) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, f"output {worst}: error {abs(y - x64 @ w64.T)[worst]:.3g}, allowed {bound[worst]:.3g}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_large_layers_use_modulars_int8_kernel(qtype):
    """Q4_K / Q6_K layers from 2 MiB with rows in multiples of 32 run Modular's int8 kernels; with
    MOJOLLM_QUANT_DOT=float at load they stay on the float32 ones."""
    rng = np.random.default_rng(60)
    n, k = 2048, 2048
    raw = random_blocks(rng, qtype, n, k // 256)
    wref = ref_dequantize(raw, qtype)
    lin = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
    assert lin._packed and lin.nbytes == raw.nbytes
    for t in (1, 3, 8, 17, 64):
        x = rng.standard_normal((t, k)).astype(np.float32)
        assert_int8_close(lin.forward(x), x, wref)
    with pytest.raises(ValueError, match="MOJOLLM_QUANT_DOT=float"):
        lin.dequantize()
    assert QuantLinear(WeightTensor("w", (n - 16, k), qtype, raw[16:]))._modular is None  # rows: not 32s
    with float_default():
        exact = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
    assert exact._modular is None
    x = rng.standard_normal((2, k)).astype(np.float32)
    assert_matmul_close(exact.forward(x), x, wref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_small_layers_keep_both_layouts(qtype):
    """Below 2 MiB a Q4_K / Q6_K layer keeps its blocks too: 1-3 rows run the float32 kernel on
    one core, 4 and more Modular's int8 kernel."""
    rng = np.random.default_rng(61)
    n, k = 96, 512
    raw = random_blocks(rng, qtype, n, k // 256)
    wref = ref_dequantize(raw, qtype)
    lin = QuantLinear(WeightTensor("w", (n, k), qtype, raw))
    assert lin._modular is not None and not lin._packed
    assert_bit_exact(lin.dequantize(), wref)
    for t in (1, 3):
        x = rng.standard_normal((t, k)).astype(np.float32)
        assert_matmul_close(lin.forward(x), x, wref)
    for t in (4, 9, 64):
        x = rng.standard_normal((t, k)).astype(np.float32)
        assert_int8_close(lin.forward(x), x, wref)


def test_concat_and_mixed_checks():
    rng = np.random.default_rng(30)
    a = QuantLinear(WeightTensor("a", (5, 256), "Q4_K", random_blocks(rng, "Q4_K", 5, 1)))
    b = QuantLinear(WeightTensor("b", (3, 256), "Q4_K", random_blocks(rng, "Q4_K", 3, 1)))
    fused = QuantLinear.concat([a, b])
    x = rng.standard_normal((2, 256)).astype(np.float32)
    assert np.array_equal(fused.forward(x), np.concatenate([a.forward(x), b.forward(x)], axis=1))
    assert fused.parts == (5, 3)
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.dequantize(np.zeros(144, np.uint8), "Q4_K", (1, 128))
    with pytest.raises(ValueError, match="unsupported type 'Q4_K'"):
        quant.quantize(np.ones((1, 256), np.float32), "Q4_K")


# ---------------------------------------------------------------- loaders and other backends


def test_weight_tensor_checks_k_quant_rows():
    from mojollm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a multiple of 256"):
        WeightTensor("w", (2, 576), "Q4_K", np.zeros((2, 144 * 2), np.uint8))
    with pytest.raises(ModelLoadError, match="expected"):
        WeightTensor("w", (2, 512), "Q6_K", np.zeros((2, 144 * 2), np.uint8))


def test_tpu_backend_widens_types_it_has_no_kernel_for():
    pytest.importorskip("jax", reason="jax is the tpu backend's optional dependency (the test extra "
                                         "installs it); the cpu path needs none of it")
    from mojollm.backends.tpu.backend import TpuBackend

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOJOLLM_TPU_QUANT", "int")  # keep Q4_0/Q4_1/Q8_0 as int8; others widen
        be = TpuBackend()
    rng = np.random.default_rng(50)
    raw = random_blocks(rng, "Q5_K", 9, 2)
    w = WeightTensor("w", (9, 512), "Q5_K", raw)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    wref = ref_dequantize(raw, "Q5_K")
    y = be.to_numpy(be.linear(be.asarray(x), be.prepare_linear(w)))
    assert np.abs(y - x.astype(np.float64) @ wref.T).max() <= 1e-4 * np.abs(x @ wref.T).max()
    emb = be.prepare_embedding(w)
    got = be.to_numpy(be.embedding(emb, be.asarray(np.array([4, 0]), "int32")))
    assert np.array_equal(got, wref[[4, 0]])


# ---------------------------------------------------------------- a k-quant model


TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined \
movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Books \
became cheaper, literacy spread, and ideas travelled faster than ever before. Photosynthesis is the \
process by which green plants use sunlight to turn carbon dioxide and water into sugar and oxygen.
"""


def _mixed_types(name: str, layer: int) -> str | None:
    """The type each tensor of the default model gets (None: keep it)."""
    if name == "token_embd.weight":
        return "Q5_0"  # also the tied lm_head: a 49152 x 576 GEMV over both cores
    if name.endswith("ffn_down.weight"):  # rows of 1536 = 6 super-blocks
        # Q2_K / Q3_K (lossy: 2.6 and 3.4 bits per weight) in one layer each, as in llama.cpp's
        # mixes; Q4_K / Q5_K / Q6_K in the rest.
        return {1: "Q2_K", 2: "Q3_K"}.get(layer, ("Q4_K", "Q5_K", "Q6_K")[layer % 3])
    if name.endswith(("attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight")):
        return "Q5_0"
    if name.endswith(("attn_v.weight", "ffn_up.weight")):
        return "Q5_1" if layer % 2 else "Q5_0"
    return None


def _write_mixed_gguf(src, dst) -> dict[str, str]:
    """Rewrite the default GGUF with _mixed_types: dequantize each tensor, requantize it. Read with
    mojollm's header parser (gguf.GGUFReader takes ~9 s over the 49k-token vocabulary)."""
    import gguf

    from mojollm.models.gguf_loader import open_reader

    reader = open_reader(src)
    writer = gguf.GGUFWriter(str(dst), reader.metadata["general.architecture"])
    kinds = {str: gguf.GGUFValueType.STRING, bool: gguf.GGUFValueType.BOOL,
             int: gguf.GGUFValueType.INT32, float: gguf.GGUFValueType.FLOAT32}
    for key, value in reader.metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=kinds[type(value[0])])
        else:
            writer.add_key_value(key, value, kinds[type(value)])
    types = {}
    for t in reader.tensors:
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        qtype = _mixed_types(t.name, layer)
        source = GGMLQuantizationType[t.qtype]
        shape = tuple(reversed(t.dims))  # logical [rows, K]
        if qtype is None and t.qtype in ("F32", "F16"):
            writer.add_tensor(t.name, np.array(t.data).view({"F32": np.float32, "F16": np.float16}[t.qtype]).reshape(shape))
        elif qtype is None:  # the blocks as they are, one row of bytes per logical row
            writer.add_tensor(t.name, np.array(t.data).reshape(int(np.prod(shape[:-1])), -1), raw_dtype=source)
        if qtype is None:
            types[t.name] = t.qtype
            continue
        w = gguf_dequantize(np.array(t.data), source).astype(np.float32).reshape(shape)
        writer.add_tensor(t.name, quantize_any(w, qtype), raw_dtype=GGMLQuantizationType[qtype])
        types[t.name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


DECODED = 4  # the text's last tokens go through one-token decode steps (the GEMV kernels)


def _perplexity(model, ids: list[int]) -> tuple[float, np.ndarray]:
    """Teacher-forced perplexity of ids: one prefill, then DECODED single-token steps."""
    from mojollm.engine.step import StepBatch

    block = 16
    table = list(range(-(-len(ids) // block)))
    model.allocate_kv_cache(len(table), block)
    split = len(ids) - DECODED
    rows = [model.forward(StepBatch.single_sequence(ids[:split], 0, table, block, all_logits=True))]
    rows += [model.forward(StepBatch.single_sequence(ids[p:p + 1], p, table, block)) for p in range(split, len(ids))]
    logits = np.concatenate(rows)
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    return float(np.exp(nll)), logits


@pytest.mark.slow
def test_mixed_kquant_model_perplexity(default_gguf, cpu_backend, tmp_path):
    from mojollm.models import load_model
    from mojollm.models.llama import LlamaModel

    path = tmp_path / "smollm2-mixed.gguf"
    types = _write_mixed_gguf(default_gguf, path)
    assert set(QTYPES) <= set(types.values())
    with float_default():  # every layer on the float32 kernels: exact arithmetic
        exact = load_model(path, cpu_backend)
    model = load_model(path, cpu_backend)  # the default: Modular's int8 kernel for Q4_K / Q6_K prefill
    ckpt = model._checkpoint
    assert {w.qtype for w in ckpt.weights.values()} >= set(QTYPES)
    float_weights = {name: WeightTensor.from_float(w.name, w.to_float32()) for name, w in ckpt.weights.items()}
    reference = LlamaModel(ckpt.config, float_weights, model.tokenizer, cpu_backend)

    ids = model.tokenizer.encode(TEXT)
    assert 60 <= len(ids) <= 200
    ppl_ref, logits_ref = _perplexity(reference, ids)
    with float_default():  # Q5_0 / Q5_1 pick int8 activations per call (decode): float here too
        ppl_exact, logits = _perplexity(exact, ids)
    ppl, logits_default = _perplexity(model, ids)
    agree = float((logits.argmax(-1) == logits_ref.argmax(-1)).mean())
    print(f"\n{len(ids)} tokens: ppl {ppl_exact:.4f} (float32 kernels), {ppl:.4f} (default: int8 for Q4_K/Q6_K "
          f"prefill and Q5_* decode) vs {ppl_ref:.4f} (float32 weights), top-1 agreement {agree:.3f}, "
          f"max |logit diff| {np.abs(logits - logits_ref).max():.3g}")
    assert abs(ppl_exact / ppl_ref - 1) <= 1e-4 and agree >= 0.99
    assert np.abs(logits - logits_ref).max() <= 1e-3 * np.abs(logits_ref).max()
    assert abs(ppl / ppl_ref - 1) <= 0.01
    assert ppl < 25  # the rewritten model still predicts English (the Q4_1 original: 17.0)

    from mojollm import LLM, SamplingParams  # the engine's path: runner, sampler, stop

    out = LLM(model).generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text
