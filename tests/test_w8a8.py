"""SmoothQuant W8A8: the per-token int8 kernel against a float64 numpy reference of its
arithmetic, the fused decode step against the per-op path, the smoothing's folds leaving the
float model unchanged, and `mojollm quantize --method smoothquant | w8a8` files that the `gguf`
package reads as per-channel Q8_0 and mojollm runs as W8A8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mojollm import model_quantizer as mq
from mojollm.errors import ModelLoadError
from mojollm.kernels.quant import QuantLinear, int8_paths, quantize
from mojollm.weights import WeightTensor
from test_loader_hardening import write_tiny_gguf
from test_model_quantizer import _logits


def _per_token_reference(x: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """float64: each row of x rounded to int8 codes on its own scale max|x| / 127 (half to even,
    with the kernel's float32 reciprocal), times the dequantized weights."""
    x = x.astype(np.float32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d)).astype(np.float32)
    q = np.rint(x * inv)
    return (q.astype(np.float64) * d.astype(np.float64)) @ wd.astype(np.float64).T


@pytest.mark.parametrize("n, k", [(37, 96), (5, 1024), (130, 576)])
def test_w8a8_kernel_matches_the_per_token_reference(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    raw = quantize(rng.standard_normal((n, k)).astype(np.float32), "Q8_0")
    lin = QuantLinear(WeightTensor("w", (n, k), "W8A8", raw))
    wd = lin.dequantize().astype(np.float64)
    for t in (1, 2, 5, 8, 9, 23):
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[:, 3] *= 40  # an outlier channel: per-token scales feel it, per-block ones would not
        x[0] = 0 if t > 3 else x[0]  # a zero row: scale 0, output 0
        want = _per_token_reference(x, wd)
        scale = np.abs(want).max() + 1
        for dot in [None] + int8_paths():
            got = lin.forward(x, dot=dot)
            np.testing.assert_allclose(got, want, atol=2e-6 * scale * np.sqrt(k), rtol=0, err_msg=f"t={t} dot={dot}")
        # the per-token rounding is what differs from float: the reference must see it
        assert np.abs(lin.forward(x, dot="float") - x.astype(np.float64) @ wd.T).max() < 1e-3 * scale
        if t > 1:
            assert np.abs(want - x.astype(np.float64) @ wd.T).max() > 1e-3 * scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("w8a8") / "tiny.gguf")


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_smoothing_leaves_the_float_model_unchanged(tiny, tmp_path):
    import gguf

    reader, tensors = mq.read_gguf(tiny)
    floatpath = mq.write_float_gguf(tiny, tmp_path / "f.gguf")
    inputs, _ = mq.calibrate(floatpath, mq.default_calibration_text(), 200)
    weights = {n: w for n, (w, _) in tensors.items()}
    before = {n: w.copy() for n, w in weights.items()}
    n_layers = 1 + max(int(n.split(".")[1]) for n in weights if n.startswith("blk."))
    for i in range(n_layers):
        mq.fold_smoothing(weights, inputs, i, 0.5)
    for part in ("attn_norm", "ffn_norm", "ffn_up"):
        assert any(not np.array_equal(weights[n], before[n]) for n in weights if part in n), part
    folded = tmp_path / "folded.gguf"
    mq.write_gguf(reader, folded, {n: (weights[n], None) for n in weights}, gguf.LlamaFileType.ALL_F32)
    ids = list(np.random.default_rng(3).integers(2, 250, size=41))
    a, b = _logits(floatpath, ids), _logits(folded, ids)
    np.testing.assert_allclose(b, a, atol=2e-4 * np.abs(a).max(), rtol=0)


def test_smoothing_moves_the_outlier_channels_into_the_weights():
    """A hand-derived case: one input channel 100x the others; with alpha 0.5 its scale is
    sqrt(100 * amax_x / amax_w) times the others', so the smoothed activations' max shrinks."""
    rng = np.random.default_rng(1)
    k = 64
    x = rng.standard_normal((50, k)).astype(np.float32)
    x[:, 7] *= 100
    w = rng.standard_normal((32, k)).astype(np.float32)
    inputs = {(0, "mlp"): mq._Inputs(k)}
    inputs[(0, "mlp")].add(x)
    weights = {"blk.0.ffn_gate.weight": w.copy(), "blk.0.ffn_up.weight": w.copy(),
               "blk.0.ffn_norm.weight": np.ones(k, np.float32)}
    mq.fold_smoothing(weights, inputs, 0, 0.5)
    s = 1 / weights["blk.0.ffn_norm.weight"]
    want = np.sqrt(np.abs(x).max(axis=0).astype(np.float64)) / np.sqrt(np.abs(w).max(axis=0))
    np.testing.assert_allclose(s, want, rtol=1e-5)
    np.testing.assert_allclose(weights["blk.0.ffn_gate.weight"], w * s[None, :], rtol=1e-6)
    xs = x / s
    assert np.abs(xs).max() / np.median(np.abs(xs).max(axis=0)) < 0.2 * np.abs(x).max() / np.median(np.abs(x).max(axis=0))


@pytest.mark.parametrize("method", ["smoothquant", "w8a8"])
def test_w8a8_file_is_per_channel_q8_0_that_runs_as_w8a8(tiny, tmp_path, method):
    import gguf
    from gguf.quants import dequantize

    from mojollm import LLM, SamplingParams
    from mojollm.models.gguf_loader import W8A8_KEY, load_gguf

    out = tmp_path / f"{method}.gguf"
    summary = mq.quantize_model(tiny, out, method=method, bits=8, calib_tokens=300)
    assert summary["type"] == "Q8_0"
    got = _tensors(out)
    names = gguf.GGUFReader(str(out)).fields[W8A8_KEY].contents()
    assert names and all(n.startswith("blk.") for n in names)
    src = {n: dequantize(np.asarray(t.data), t.tensor_type) for n, t in _tensors(tiny).items()}
    for n in names:
        t = got[n]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        blocks = np.asarray(t.data).reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").reshape(int(t.shape[1]), -1)
        assert (d == d[:, :1]).all(), n  # one scale per output channel
        if method == "w8a8":  # no smoothing: the codes are round(w / (max|row| / 127))
            w = src[n].reshape(d.shape[0], -1)
            want = np.rint(w / d[:, :1].astype(np.float32)).astype(np.int8)
            np.testing.assert_array_equal(blocks[:, 2:].copy().view(np.int8).reshape(w.shape), want, err_msg=n)
    weights = load_gguf(out).weights
    assert {weights[k].qtype for k in weights if k.endswith(("q_proj", "down_proj"))} == {"W8A8"}
    llm = LLM(str(out), backend="cpu")
    res = llm.generate(["the the"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(res.token_ids) == 5
    ids = list(np.random.default_rng(5).integers(2, 250, size=29))
    ref = _logits(mq.write_float_gguf(tiny, tmp_path / "f.gguf"), ids)
    assert np.abs(_logits(out, ids) - ref).max() < 0.1 * np.abs(ref).max()


def test_fused_decode_runs_w8a8_as_the_per_op_path(tiny, tmp_path, monkeypatch):
    """The worker team's GEMV row shares take the per-token activations of the whole row."""
    from mojollm import LLM, SamplingParams

    out = tmp_path / "sq.gguf"
    mq.quantize_model(tiny, out, method="w8a8", bits=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("MOJOLLM_CPU_FUSED_DECODE", fused)
        llm = LLM(str(out), backend="cpu")
        assert (llm.engine.runner.program is not None) == (fused == "1")
        runs[fused] = llm.generate(["the the the", "a b"], params)
        del llm
    for a, b in zip(runs["1"], runs["0"]):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose([e["logprob"] for e in a.outputs[0].logprobs],
                                   [e["logprob"] for e in b.outputs[0].logprobs], atol=1e-4)


def test_bad_w8a8_requests_and_files_are_refused_in_one_line(tiny, tmp_path):
    import gguf
    from click.testing import CliRunner

    from mojollm.cli import cli
    from mojollm.models.gguf_loader import W8A8_KEY, load_gguf

    with pytest.raises(ValueError, match="bits=8"):
        mq.quantize_model(tiny, tmp_path / "x.gguf", method="smoothquant", bits=4)
    with pytest.raises(ValueError, match="alpha"):
        mq.quantize_model(tiny, tmp_path / "x.gguf", method="smoothquant", bits=8, alpha=1.5)
    res = CliRunner().invoke(cli, ["quantize", str(tiny), "--out", str(tmp_path / "x.gguf"), "--method", "w8a8"])
    assert res.exit_code == 2 and "--bits 8" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(tiny), "--out", str(tmp_path / "x.gguf"), "--method",
                                   "smoothquant", "--bits", "8", "--alpha", "2"])
    assert res.exit_code == 2 and "alpha" in res.output.lower()
    # a file naming a tensor that is not Q8_0 (the tiny model's projections are F32 / other types)
    reader, tensors = mq.read_gguf(tiny)
    bad = tmp_path / "bad.gguf"
    mq.write_gguf(reader, bad, {n: (w, None) for n, (w, _) in tensors.items()}, gguf.LlamaFileType.ALL_F32,
                  w8a8=["blk.0.attn_q.weight"])
    with pytest.raises(ModelLoadError, match=W8A8_KEY):
        load_gguf(bad)


def _cuda():
    import glob

    if not glob.glob("/dev/nvidia*"):
        pytest.skip(reason="no CUDA device on this machine (the cuda W8A8 path runs on a GPU machine; the cpu "
                           "path is tested everywhere)")
    from mojollm.backends import registry

    return registry.get_backend("cuda")


@pytest.mark.parametrize("t", [1, 5, 16, 17, 300])
def test_cuda_w8a8_linear_matches_the_per_token_reference(t):
    gpu = _cuda()
    rng = np.random.default_rng(t)
    n, k = 200, 1024
    raw = mq.per_channel_q8(rng.standard_normal((n, k)).astype(np.float32)).gguf_blocks()
    w = WeightTensor("w", (n, k), "W8A8", raw)
    wd = QuantLinear(w).dequantize()
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, 9] *= 30
    bias = rng.standard_normal(n).astype(np.float32)
    got = gpu.to_numpy(gpu.linear(gpu.asarray(x), gpu.prepare_linear(w), gpu.asarray(bias)))
    want = _per_token_reference(x, wd) + bias
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_cuda_runs_a_w8a8_model_like_the_cpu(make_hf_model):
    """A random Llama whose projections are W8A8 (per-channel int8, as quantize writes them)
    through LLM on cuda (CUDA graphs) and on the cpu. Both quantize each token's activations by
    the same rule and sum the int8 products exactly, so W8A8 adds no difference of its own: the
    two backends' W8A8 logits (teacher-forced on cuda's tokens) are as close as the same
    weights dequantized are on both (cuda: bf16 weights and KV cache, cpu: float32), within 3x:
    where the backends' inputs to a W8A8 projection differ, an activation code can flip (a step
    of dx, as large as a bf16 rounding), and this model amplifies every such difference (measured
    on the H200: 0.077 against 0.037; a wrong scale or layout gives ~1)."""
    from mojollm import LLM, SamplingParams
    from mojollm.backends import registry
    from mojollm.models import load_checkpoint
    from mojollm.models.llama import LlamaModel
    from mojollm.tokenizer import Tokenizer
    from mojollm.weights import float32_to_bf16
    from test_gpu import RUNNER_CONFIG, _logits as teacher_logits, _texts, rel_err

    gpu = _cuda()
    cpu = registry.get_backend("cpu")
    path, _ = make_hf_model("llama", seed=4, **RUNNER_CONFIG)
    _, ckpt = load_checkpoint(path)
    w8a8, f32, bf16 = {}, {}, {}
    for n, w in ckpt.weights.items():
        if n.startswith("layers.") and len(w.shape) == 2:
            w8a8[n] = WeightTensor(n, w.shape, "W8A8", mq.per_channel_q8(w.to_float32()).gguf_blocks())
            deq = w8a8[n].to_float32()
            f32[n], bf16[n] = WeightTensor.from_float(n, deq), WeightTensor(n, w.shape, "BF16", float32_to_bf16(deq))
        else:
            w8a8[n] = f32[n] = bf16[n] = w
    tokenizer = Tokenizer.from_hf_dir(path)

    def llm(weights, backend):
        return LLM(LlamaModel(ckpt.config, weights, tokenizer, backend), backend=backend.name,
                   kv_cache_memory="64MiB", max_num_seqs=8)

    q_cuda, q_cpu, r_cuda, r_cpu = llm(w8a8, gpu), llm(w8a8, cpu), llm(bf16, gpu), llm(f32, cpu)
    assert q_cuda.engine.runner.graphs and q_cuda.model.layers[0].down.qtype == "W8A8"
    prompts = _texts(4, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for p, out in zip(prompts, q_cuda.generate(prompts, params)):
        ids = p + out.token_ids
        err_q = rel_err(*(teacher_logits(m.model, ids, len(p), block=16) for m in (q_cuda, q_cpu)))
        err_ref = rel_err(*(teacher_logits(m.model, ids, len(p), block=16) for m in (r_cuda, r_cpu)))
        assert err_q < 3 * err_ref + 1e-3, (err_q, err_ref)


# ---------------------------------------------------------------- the HF directory: compressed-tensors int-quantized


@pytest.fixture(scope="module")
def hf_w8a8(make_hf_model, tmp_path_factory) -> tuple[Path, Path]:
    """(float HF source, its `mojollm quantize --method w8a8` directory)."""
    src, _ = make_hf_model("llama", seed=7)
    out = tmp_path_factory.mktemp("w8a8-hf") / "w8a8"
    summary = mq.quantize_model(src, out, method="w8a8", bits=8)
    assert (summary["format"], summary["type"]) == ("int-quantized", "W8A8 int8 per channel")
    return src, out


def _header_dtypes(path: Path) -> dict[str, str]:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return {k: v["dtype"] for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def test_directory_holds_int8_codes_of_each_rows_float16_scale(hf_w8a8):
    """Read back by the safetensors library: every projection is I8 codes round(w / f16(max|row| / 127))
    of the source's float weights with that scale as F32 [out, 1], the rest float16, and the
    quantization_config is compressed-tensors' int-quantized W8A8 (channel weights, dynamic
    per-token activations: the scheme vLLM's CompressedTensorsW8A8Int8 runs)."""
    import json

    from safetensors.numpy import load_file

    src, out = hf_w8a8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "int-quantized", ["lm_head"])
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    pick = ("num_bits", "type", "symmetric", "strategy", "dynamic")
    assert [group["weights"][k] for k in pick] == [8, "int", True, "channel", False]
    assert [group["input_activations"][k] for k in pick] == [8, "int", True, "token", True]
    dtypes = _header_dtypes(out / "model.safetensors")
    got, ref = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    projections = [n for n in ref if n.endswith("_proj.weight")]
    assert len(projections) == 14
    for name, w in ref.items():
        if name not in projections:
            assert dtypes[name] == "F16" and got[name].dtype == np.float16, name
            continue
        codes, scale = got[name], got[name + "_scale"]
        assert (dtypes[name], dtypes[name + "_scale"]) == ("I8", "F32") and codes.dtype == np.int8
        d = (np.abs(w).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(scale, d, err_msg=name)
        np.testing.assert_array_equal(codes, np.clip(np.rint(w / d), -127, 127).astype(np.int8), err_msg=name)


@pytest.mark.parametrize("method", ["w8a8", "smoothquant"])
def test_directory_loads_as_w8a8_with_the_logits_of_the_gguf_file(tiny, tmp_path, method):
    """The same quantization written both ways. The directory keeps the embedding, LM head and
    norms in float16 where the GGUF has Q8_0 / float32, so the GGUF compared is the W8A8 file's
    projection blocks with those float16 values. q / k rows are in HF's order in one, llama.cpp's
    in the other, each row's codes and scale the same: the logits agree to float rounding."""
    import gguf

    from mojollm import LLM, SamplingParams
    from mojollm.models.gguf_loader import W8A8_KEY
    from mojollm.models.hf_loader import load_hf

    gg, hf, same = tmp_path / "w.gguf", tmp_path / "w", tmp_path / "same.gguf"
    mq.quantize_model(tiny, gg, method=method, bits=8, calib_tokens=300)
    mq.quantize_model(tiny, hf, method=method, bits=8, calib_tokens=300)
    reader, source = mq.read_gguf(tiny)
    _, written = mq.read_gguf(gg)
    names = gguf.GGUFReader(str(gg)).fields[W8A8_KEY].contents()
    raw = {t.name: (np.asarray(t.data), t.tensor_type) for t in gguf.GGUFReader(str(gg)).tensors}
    f16 = {n: ((written if w.ndim == 1 else source)[n][0].astype(np.float16).astype(np.float32), None)
           for n, (w, _) in source.items()}  # the norms as smoothing folded them, the rest as the source has them
    mq.write_gguf(reader, same, {n: raw[n] if n in names else f16[n] for n in source}, gguf.LlamaFileType.MOSTLY_Q8_0,
                  w8a8=names)
    weights = load_hf(hf).weights
    assert {w.qtype for n, w in weights.items() if n.startswith("layers.") and len(w.shape) == 2} == {"W8A8"}
    ids = list(np.random.default_rng(6).integers(2, 250, size=33))
    a, b = _logits(same, ids), _logits(hf, ids)
    np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0)  # measured: 7e-7
    res = LLM(str(hf), backend="cpu").generate(["the the"], SamplingParams(temperature=0, max_tokens=5,
                                                                            ignore_eos=True))[0]
    assert len(res.token_ids) == 5


def test_scales_that_are_no_float16_value_keep_their_codes_within_the_bound():
    """compressed_tensors.int8_blocks: a float32 scale of 2^-14 or more keeps every code and moves
    each weight by at most 2^-11 of its size; a smaller one is rounded to steps of 2^-14 (error
    <= 2^-15); a zero row stays zero."""
    from mojollm.models import compressed_tensors as ct
    from mojollm.quantization import Quantized

    rng = np.random.default_rng(2)
    codes = rng.integers(-128, 128, (4, 64)).astype(np.int8)
    s = np.float32([0.0123457, 3.1e-3, 1e-6, 0.0])
    blocks = ct.int8_blocks(codes, s)
    q = Quantized.from_gguf_blocks(blocks, "Q8_0")
    np.testing.assert_array_equal(q.q[:2], codes[:2])
    exact = codes.astype(np.float64) * s[:, None].astype(np.float64)
    got = q.dequantize().astype(np.float64)
    assert np.all(np.abs(got[:2] - exact[:2]) <= 2 ** -11 * np.abs(exact[:2]) + 1e-30)
    assert np.abs(got[2] - exact[2]).max() <= 2 ** -15 and np.all(got[3] == 0)
    assert (q.d == q.d[:, :1]).all()


def _w8a8_variant(good: Path, tmp_path: Path, tag: str, config=None, tensors=None) -> Path:
    import json
    import shutil

    from safetensors.numpy import load_file

    from mojollm.models import compressed_tensors as ct

    d = tmp_path / tag
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    if config:
        config(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        ct.save_safetensors(d / "model.safetensors", t)  # uint8 arrays as F8_E4M3, as safetensors.numpy cannot
    return d


def _weights(c):
    return c["quantization_config"]["config_groups"]["group_0"]["weights"]


def _acts(c):
    return c["quantization_config"]["config_groups"]["group_0"]["input_activations"]


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("case, config, tensors, fragment", [
    ("group strategy", lambda c: _weights(c).update(strategy="group", group_size=32), None,
     "int8 weight strategy 'group' is not supported"),
    ("4 bits", lambda c: _weights(c).update(num_bits=4), None, "int/4 bits are not static symmetric int8"),
    ("asymmetric weights", lambda c: _weights(c).update(symmetric=False), None, "not static symmetric int8"),
    ("static activations", lambda c: _acts(c).update(dynamic=False, strategy="tensor"), None,
     "static activation scales"),
    ("tensor activations", lambda c: _acts(c).update(strategy="tensor"), None, "not symmetric int8 per token"),
    ("weight-only", lambda c: c["quantization_config"]["config_groups"]["group_0"].update(input_activations=None),
     None, "without input_activations"),
    ("float format", lambda c: c["quantization_config"].update(format="float-quantized"), None,
     "not static symmetric FP8"),
    ("mixed groups", lambda c: c["quantization_config"].update(format="naive-quantized") or c["quantization_config"][
        "config_groups"].update(group_1={"targets": ["re:.*lm_head"], "weights": {"num_bits": 8, "type": "float"}}),
     None, "mix FP8 and int8"),
    ("packed format", lambda c: c["quantization_config"].update(format="pack-quantized"), None,
     "format 'pack-quantized' is not supported"),
    ("no config", lambda c: c.pop("quantization_config"), None, "no W8A8 quantization_config"),
    ("missing scale", None, lambda t: t.pop(f"{UP}.weight_scale"), f"has no {UP}.weight_scale"),
    ("scale shape", None, lambda t: t.update({f"{UP}.weight_scale": np.ones((3, 1), np.float32)}),
     "weight_scale has shape"),
    ("zero point", None, lambda t: t.update({f"{UP}.weight_zero_point": np.ones((96, 1), np.int8)}),
     "asymmetric weights are not supported"),
    ("fp8 codes", None, lambda t: t.update({f"{UP}.weight": t[f"{UP}.weight"].view(np.uint8)}),
     "is F8_E4M3 but the quantization_config describes W8A8 int8 weights"),
])
def test_bad_int_quantized_checkpoints_are_refused_in_one_line(hf_w8a8, tmp_path, case, config, tensors, fragment):
    from mojollm.models.hf_loader import load_hf

    d = _w8a8_variant(hf_w8a8[1], tmp_path, case.replace(" ", "-"), config, tensors)
    with pytest.raises(ModelLoadError, match=fragment) as e:
        load_hf(d)
    assert "\n" not in str(e.value)


def test_quantize_to_a_directory_refuses_what_w8a8_cannot_be(tiny, tmp_path):
    from click.testing import CliRunner

    from mojollm.cli import cli

    with pytest.raises(ValueError, match="bits=8"):
        mq.quantize_model(tiny, tmp_path / "d", method="w8a8", bits=4)
    run = CliRunner().invoke
    res = run(cli, ["quantize", str(tiny), "--out", str(tmp_path / "d"), "--method", "w8a8", "--symmetric",
                    "--bits", "8"])
    assert res.exit_code == 2 and "do not apply to --method w8a8" in res.output
    res = run(cli, ["quantize", str(tiny), "--out", str(tmp_path / "d"), "--method", "w8a8", "--bits", "8", "--json"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.output.strip().splitlines()[-1])["format"] == "int-quantized"
