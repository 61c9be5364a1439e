"""GGUF block-quantized kernels (mojo/quant.mojo) against the `gguf` package and float64 numpy.

References, all independent of the code under test:
  * quantize / dequantize: gguf.quants.quantize / dequantize, compared byte for byte
    (bit-exact: our kernels repeat numpy's float32 operations in the same order);
  * matmul (the float path, dot="float"; the int8-activation path is tests/test_quant_int8.py):
    float64 numpy on gguf's dequantized weights. float32 bound, per output:
        |y - ref| <= 1e-5 * sum_k |x_k| |w_k|
    (float32 accumulation over <= 1536 terms in SIMD partial sums; a wrong block, scale or
    nibble order gives errors of order 1 in these units);
  * embedding rows: gguf's dequantize (quantized tables), numpy widening (F16 / BF16 / F32),
    compared exactly.
Sizes: odd N and T (1, 3, 7, 33; plus 8/9 around the GEMV/GEMM switch and 129 for the K-chunked
GEMM), K in {32, 96, 576, 1536}, and the real default model's Q8_0 token_embd and Q4_1 weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mojollm.kernels import quant
from mojollm.kernels.quant import EmbeddingTable, QuantLinear
from mojollm.weights import WeightTensor

QTYPES = ["Q4_0", "Q4_1", "Q8_0"]
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
MATMUL_RTOL = 1e-5


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(abs(hash(tuple(str(k) for k in key))) % (2**32))


def ref_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_quantize(x, GGMLQuantizationType[qtype])


def ref_dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_dequantize(np.asarray(raw), GGMLQuantizationType[qtype]).astype(np.float32)


def random_weights(rng, n: int, k: int) -> np.ndarray:
    """Rows of varied scale (quantization is per block, so scale changes matter)."""
    scales = np.exp(rng.uniform(-4, 1, size=(n, 1)))
    return (rng.standard_normal((n, k)) * scales).astype(np.float32)


def quant_linear(rng, qtype: str, n: int, k: int) -> tuple[QuantLinear, np.ndarray]:
    raw = ref_quantize(random_weights(rng, n, k), qtype)
    return QuantLinear(WeightTensor("w", (n, k), qtype, raw)), ref_dequantize(raw, qtype)


def assert_matmul_close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    bound = MATMUL_RTOL * (np.abs(x64) @ np.abs(w64).T)
    assert y.shape == ref.shape and y.dtype == np.float32
    excess = np.abs(y.astype(np.float64) - ref) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"output {worst}: got {y[worst]!r}, want {ref[worst]!r} "
                               f"(allowed {bound[worst]:.3g})")


# ---------------------------------------------------------------- quantize / dequantize


def edge_case_rows(k: int) -> np.ndarray:
    """Blocks that exercise the rounding rules: zero block (d = 0), constant block (Q4_1 d = 0),
    +a/-a tie for the largest magnitude (Q4_0 keeps the first one's sign), values exactly on
    .5 after scaling, tiny magnitudes (float16 subnormal scales) and large ones."""
    rows = np.zeros((6, k), dtype=np.float32)
    rows[1] = 0.75
    rows[2, ::2], rows[2, 1::2] = -2.0, 2.0
    rows[3] = np.tile(np.arange(32, dtype=np.float32) - 15.5, k // 32) * (127 / 16)
    rows[4] = np.linspace(-3e-6, 2e-6, k, dtype=np.float32)
    rows[5] = np.linspace(-4e4, 6e4, k, dtype=np.float32)
    return rows


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,k", [(1, 32), (7, 96), (33, 576), (3, 1536)])
def test_quantize_matches_gguf_bytes(qtype, rows, k):
    x = random_weights(rng_for("q", qtype, rows, k), rows, k)
    got = quant.quantize(x, qtype)
    want = ref_quantize(x, qtype)
    assert got.shape == want.shape == (rows, k // 32 * BLOCK_BYTES[qtype]) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_edge_cases_match_gguf_bytes(qtype):
    x = edge_case_rows(96)
    np.testing.assert_array_equal(quant.quantize(x, qtype), ref_quantize(x, qtype))


def fused_rounding_block(qtype: str) -> np.ndarray:
    """One block holding values where rounding x * id before adding the offset (numpy, gguf)
    and a fused multiply-add (one rounding) give different codes: they sit just beside the
    half-way points k - offset, found by scanning float32 neighbours of each. Q4_0: max 0.7,
    trunc(x * id + 8.5); Q4_1: min 0.1, max 2.7, trunc((x - min) * id + 0.5)."""
    f32 = np.float32
    if qtype == "Q4_0":  # the first largest magnitude is +0.7: d = 0.7 / -8
        lo, hi, shift = f32(-0.69), f32(0.7), f32(0)
        idv = f32(1) / f32(f32(0.7) / f32(-8))
        offset = 8.5
    else:
        lo, hi, shift = f32(0.1), f32(2.7), f32(0.1)
        idv = f32(1) / f32((f32(2.7) - f32(0.1)) / f32(15))
        offset = 0.5
    found = []
    for k in range(1, 16):
        target = f32(float(shift) + (k - offset) / float(idv))
        near = (np.array([target]).view(np.int32) + np.arange(-3000, 3001, dtype=np.int32)).view(np.float32)
        near = near[(near >= lo) & (near <= hi)]
        p = (near - shift).astype(np.float64) * np.float64(idv)  # exact product
        unfused = np.trunc((p.astype(np.float32) + f32(offset)).astype(np.float32))
        fused = np.trunc((p + offset).astype(np.float32))
        found += list(near[unfused != fused])
    assert found, "no value separates fused from unfused rounding: the test would prove nothing"
    block = np.linspace(hi, lo, 32, dtype=np.float32)  # block[0] and block[31] fix d (and m)
    block[1:1 + min(len(found), 30)] = found[:30]
    return block[None, :]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_quantize_rounds_like_numpy_not_fma(qtype):
    # Mojo fuses `a * b + c` by default; quantize must still round the product first.
    x = fused_rounding_block(qtype)
    np.testing.assert_array_equal(quant.quantize(x, qtype), ref_quantize(x, qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_keeps_leading_dims(qtype):
    x = random_weights(rng_for("lead", qtype), 6, 64).reshape(2, 3, 64)
    got = quant.quantize(x, qtype)
    assert got.shape == (2, 3, 2 * BLOCK_BYTES[qtype])
    np.testing.assert_array_equal(got, ref_quantize(x, qtype))


def random_blocks(rng, qtype: str, rows: int, k: int) -> np.ndarray:
    """Arbitrary codes (including ones quantize never emits, e.g. Q8_0's -128) with finite
    random float16 scales."""
    nb = k // 32
    raw = rng.integers(0, 256, size=(rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    n_scales = 2 if qtype == "Q4_1" else 1
    scales = (rng.standard_normal((rows, nb, n_scales)) * 0.05).astype(np.float16)
    raw[:, :, : 2 * n_scales] = scales.view(np.uint8).reshape(rows, nb, 2 * n_scales)
    return raw.reshape(rows, nb * BLOCK_BYTES[qtype])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,k", [(1, 32), (7, 96), (33, 576), (65, 1536)])
def test_dequantize_matches_gguf_bits(qtype, rows, k):
    raw = random_blocks(rng_for("dq", qtype, rows, k), qtype, rows, k)
    got = quant.dequantize(raw, qtype, (rows, k))
    want = ref_dequantize(raw, qtype)
    assert got.dtype == np.float32 and got.shape == (rows, k)
    np.testing.assert_array_equal(got.view(np.uint32), want.reshape(rows, k).view(np.uint32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_row_range(qtype):
    raw = random_blocks(rng_for("range", qtype), qtype, 9, 64)
    got = quant.dequantize(raw[3:7], qtype, (4, 64))
    np.testing.assert_array_equal(got, ref_dequantize(raw, qtype)[3:7])


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_dequantize_round_trip_error(qtype):
    # Independent of gguf: the round trip must land within half a quantization step of x
    # (Q4_0: a whole step, since codes stop at +7 while the scale is set by -8 * d).
    x = random_weights(rng_for("rt", qtype), 5, 96)
    back = quant.dequantize(quant.quantize(x, qtype), qtype, x.shape)
    blocks, back_b = x.reshape(-1, 32).astype(np.float64), back.reshape(-1, 32)
    if qtype == "Q4_1":
        step = (blocks.max(1) - blocks.min(1)) / 15
    else:
        step = np.abs(blocks).max(1) / (8 if qtype == "Q4_0" else 127)
    # plus the float16 rounding of the scale(s) times the largest code
    allowed = step * ((1.0 if qtype == "Q4_0" else 0.5) + 16 * 2**-11) + np.abs(blocks).max(1) * 2**-10
    assert np.all(np.abs(back_b - blocks).max(1) <= allowed)


# ---------------------------------------------------------------- matmul


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 3, 7, 33])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 96), (33, 576), (65, 1536)])
def test_matmul_vs_float64(qtype, t, n, k):
    rng = rng_for("mm", qtype, t, n, k)
    lin, w = quant_linear(rng, qtype, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    assert_matmul_close(lin.forward(x, dot="float"), x, w)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t,n,k", [
    (2, 9, 64),      # register-dequant GEMV path, odd rows (row pairs + tail)
    (8, 577, 576),   # largest GEMV batch
    (9, 17, 160),    # smallest GEMM batch, N not a multiple of the 8-row tile
    (16, 64, 32),    # exactly one 16-token vector
    (129, 23, 1536), # GEMM with K split into chunks (partial sums kept between chunks)
])
def test_matmul_paths(qtype, t, n, k):
    rng = rng_for("paths", qtype, t, n, k)
    lin, w = quant_linear(rng, qtype, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    assert_matmul_close(lin.forward(x, dot="float"), x, w)


@pytest.mark.parametrize("t", [1, 5, 40])
def test_matmul_threads_agree(t):
    # 2201 x 1536 Q4_1 (2.1 MB) is above the size where the kernel splits rows over the cores.
    # The split must not change any output (each row is computed the same way), and it must
    # match float64.
    rng = rng_for("threads", t)
    lin, w = quant_linear(rng, "Q4_1", 2201, 1536)
    x = rng.standard_normal((t, 1536)).astype(np.float32)
    y = lin.forward(x, dot="float")
    np.testing.assert_array_equal(y, lin.forward(x, max_threads=1, dot="float"))
    assert_matmul_close(y, x, w)


def test_matmul_empty_batch():
    lin, _ = quant_linear(rng_for("empty"), "Q8_0", 5, 64)
    y = lin.forward(np.zeros((0, 64), dtype=np.float32))
    assert y.shape == (0, 5) and y.dtype == np.float32


def test_quant_linear_attributes():
    lin, w = quant_linear(rng_for("attrs"), "Q4_1", 7, 96)
    assert (lin.out_features, lin.in_features, lin.nbytes, lin.qtype) == (7, 96, 7 * 3 * 20, "Q4_1")
    np.testing.assert_array_equal(lin.dequantize(), w)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
def test_concat_fuses_along_n(qtype, t):
    rng = rng_for("concat", qtype, t)
    parts = [quant_linear(rng, qtype, n, 96) for n in (9, 3, 3)]  # q/k/v-like shapes
    fused = QuantLinear.concat([p[0] for p in parts])
    assert fused.parts == (9, 3, 3) and fused.out_features == 15 and fused.in_features == 96
    assert fused.nbytes == sum(p[0].nbytes for p in parts)
    x = rng.standard_normal((t, 96)).astype(np.float32)
    assert_matmul_close(fused.forward(x, dot="float"), x, np.concatenate([p[1] for p in parts]))


def test_concat_rejects_mixed_layers():
    rng = rng_for("concat-bad")
    a, _ = quant_linear(rng, "Q4_1", 4, 64)
    with pytest.raises(ValueError, match="one quantization type"):
        QuantLinear.concat([a, quant_linear(rng, "Q8_0", 4, 64)[0]])
    with pytest.raises(ValueError, match="one in_features"):
        QuantLinear.concat([a, quant_linear(rng, "Q4_1", 4, 96)[0]])
    with pytest.raises(ValueError, match="non-empty"):
        QuantLinear.concat([])


# ---------------------------------------------------------------- embedding


def float_table(rng, qtype: str, vocab: int, dim: int) -> tuple[WeightTensor, np.ndarray]:
    """A float table and its exact float32 values, widened independently here."""
    values = rng.standard_normal((vocab, dim)).astype(np.float32)
    if qtype == "F32":
        return WeightTensor("emb", (vocab, dim), "F32", values), values
    if qtype == "F16":
        data = values.astype(np.float16)
        return WeightTensor("emb", (vocab, dim), "F16", data), data.astype(np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncated bfloat16
    return WeightTensor("emb", (vocab, dim), "BF16", bits), (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("dim", [1, 37, 576])
def test_embedding_float_tables(qtype, dim):
    rng = rng_for("emb", qtype, dim)
    w, values = float_table(rng, qtype, 101, dim)
    ids = np.array([0, 100, 7, 7, 55, 3, 99], dtype=np.int32)
    np.testing.assert_array_equal(EmbeddingTable(w).lookup(ids), values[ids])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("t", [1, 7, 333])
def test_embedding_quantized_tables(qtype, t):
    rng = rng_for("qemb", qtype, t)
    raw = random_blocks(rng, qtype, 257, 96)
    table = EmbeddingTable(WeightTensor("emb", (257, 96), qtype, raw))
    ids = rng.integers(0, 257, size=t).astype(np.int32)
    ids[0] = 256
    got = table.lookup(ids)
    np.testing.assert_array_equal(got, ref_dequantize(raw[ids], qtype).reshape(t, 96))


def test_embedding_accepts_other_int_dtypes_and_empty():
    w, values = float_table(rng_for("int64"), "F32", 11, 8)
    table = EmbeddingTable(w)
    np.testing.assert_array_equal(table.lookup(np.array([10, 2], dtype=np.int64)), values[[10, 2]])
    assert table.lookup(np.zeros(0, dtype=np.int32)).shape == (0, 8)


# ---------------------------------------------------------------- the default model's tensors


@pytest.fixture(scope="module")
def gguf_tensors(default_gguf):
    reader = GGUFReader(str(default_gguf))
    return {t.name: t for t in reader.tensors}


def model_weight(tensors, name: str) -> WeightTensor:
    t = tensors[name]
    n_rows = int(t.data.shape[0])
    k = int(t.shape[0])  # GGUF lists the row length first
    return WeightTensor(name, (n_rows, k), t.tensor_type.name, np.asarray(t.data))


def test_model_token_embd_lookup(gguf_tensors):
    w = model_weight(gguf_tensors, "token_embd.weight")
    assert w.qtype == "Q8_0" and w.shape == (49152, 576)
    ids = rng_for("model-ids").integers(0, 49152, size=33).astype(np.int32)
    ids[:2] = [0, 49151]
    got = EmbeddingTable(w).lookup(ids)
    np.testing.assert_array_equal(got, ref_dequantize(w.data[ids], "Q8_0").reshape(33, 576))


@pytest.mark.parametrize("t", [1, 3])
def test_model_tied_lm_head(gguf_tensors, t):
    # The tied embedding doubles as lm_head: the same Q8_0 WeightTensor through QuantLinear.
    w = model_weight(gguf_tensors, "token_embd.weight")
    lm_head = QuantLinear(w)
    rng = rng_for("lm_head", t)
    x = rng.standard_normal((t, 576)).astype(np.float32)
    y = lm_head.forward(x, dot="float")
    assert y.shape == (t, 49152)
    rows = np.sort(rng.choice(49152, size=1500, replace=False))  # a reference for a sample of vocab rows
    rows[-1] = 49151
    assert_matmul_close(np.ascontiguousarray(y[:, rows]), x, ref_dequantize(w.data[rows], "Q8_0").reshape(-1, 576))


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.7.attn_k.weight"])
@pytest.mark.parametrize("t", [1, 7, 33])
def test_model_q4_1_layer(gguf_tensors, name, t):
    w = model_weight(gguf_tensors, name)
    assert w.qtype == "Q4_1"
    x = rng_for("layer", name, t).standard_normal((t, w.shape[1])).astype(np.float32)
    assert_matmul_close(QuantLinear(w).forward(x, dot="float"), x, ref_dequantize(w.data, "Q4_1"))


# ---------------------------------------------------------------- bad input


def test_bad_linear_inputs():
    lin, _ = quant_linear(rng_for("bad"), "Q4_1", 4, 64)
    good = np.ones((2, 64), dtype=np.float32)
    cases = [
        (good.astype(np.float64), "float32"),
        (good[0], "2 dimensions"),
        (np.ones((2, 128), dtype=np.float32)[:, ::2], "C-contiguous"),
        (np.ones((2, 96), dtype=np.float32), "expects 64"),
        (good.tolist(), "numpy array"),
    ]
    for x, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lin.forward(x)


def test_bad_linear_weights():
    with pytest.raises(ValueError, match="WeightTensor"):
        QuantLinear(np.zeros((4, 36), dtype=np.uint8))
    with pytest.raises(ValueError, match="unsupported type 'F32'"):
        QuantLinear(WeightTensor.from_float("w", np.ones((4, 32), dtype=np.float32)))
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear(WeightTensor("w", (2, 2, 32), "Q8_0", np.zeros((4, 34), dtype=np.uint8)))


def test_bad_quantize_inputs():
    x = np.ones((2, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.ones((2, 48), dtype=np.float32), "Q8_0")
    with pytest.raises(ValueError, match="float32"):
        quant.quantize(x.astype(np.float16), "Q8_0")
    with pytest.raises(ValueError, match="C-contiguous"):
        quant.quantize(np.ones((2, 128), dtype=np.float32)[:, ::2], "Q4_0")
    with pytest.raises(ValueError, match="finite"):
        quant.quantize(np.where(np.arange(64) == 5, np.nan, x).astype(np.float32), "Q4_1")
    with pytest.raises(ValueError, match="unsupported type 'Q5_0'"):
        quant.quantize(x, "Q5_0")


def test_bad_dequantize_inputs():
    raw = np.zeros((2, 40), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs 80 bytes"):
        quant.dequantize(raw[:1], "Q4_1", (2, 64))
    with pytest.raises(ValueError, match="uint8"):
        quant.dequantize(raw.astype(np.int8), "Q4_1", (2, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.dequantize(raw, "Q4_1", (4, 20))
    with pytest.raises(ValueError, match="unsupported type"):
        quant.dequantize(raw, "TQ2_0", (2, 64))


def test_bad_embedding_ids():
    w, _ = float_table(rng_for("bad-emb"), "F16", 10, 4)
    table = EmbeddingTable(w)
    with pytest.raises(ValueError, match="token id 10 is out of range"):
        table.lookup(np.array([1, 10], dtype=np.int32))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        table.lookup(np.array([-1], dtype=np.int32))
    with pytest.raises(ValueError, match="integers"):
        table.lookup(np.array([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        table.lookup(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="numpy integer array"):
        table.lookup([1, 2])
    with pytest.raises(ValueError, match="multiple of 32"):
        EmbeddingTable(_bad_quant_table())


def _bad_quant_table() -> WeightTensor:
    # A quantized table whose row length is not a whole number of blocks cannot be built as a
    # WeightTensor; bypass its check to make sure the table validates on its own.
    w = WeightTensor("e", (3, 32), "Q8_0", np.zeros((3, 34), dtype=np.uint8))
    w.shape = (3, 48)
    return w
