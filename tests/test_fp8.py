"""FP8 E4M3 weights (mojollm.fp8, the F8_E4M3 block type, its kernels in mojo/quant.mojo): E4M3
encode / decode against torch.float8_e4m3fn (every code, random values, midpoints, saturation),
per-channel quantization and the block / checkpoint conversions, the kernel against float64 on
the dequantized weights (T = 1..9 and GEMM sizes, odd N), the fused decode step against the
per-op forward, the HF checkpoint (written by `mojollm quantize --method fp8`, read back by the
safetensors library and by our loader, logits against transformers on the same weights), and
one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mojollm import fp8
from mojollm.errors import ModelLoadError
from mojollm.kernels.quant import EmbeddingTable, QuantLinear, dequantize
from mojollm.models import compressed_tensors as ct
from mojollm.weights import WeightTensor

def _torch():
    """torch, imported where a reference cast needs it, so the cpu checks that do not still run
    without it."""
    return pytest.importorskip("torch", reason="torch's float8_e4m3fn is the independent reference (a test extra); "
                               "the checks against float64 run without it")

ALL_CODES = np.arange(256, dtype=np.uint8)
FINITE_CODES = ALL_CODES[(ALL_CODES & 0x7F) != 0x7F]


def _torch_encode(x: np.ndarray) -> np.ndarray:
    """What vLLM / compressed-tensors store: clamp to +-448, then torch's cast (round to nearest even)."""
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).clamp(-448, 448).to(torch.float8_e4m3fn) \
        .view(torch.uint8).numpy()


def _torch_decode(codes: np.ndarray) -> np.ndarray:
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float().numpy()


# ---------------------------------------------------------------- E4M3 encode / decode


def test_decode_every_code_as_torch():
    ref, got = _torch_decode(ALL_CODES), fp8.decode(ALL_CODES)
    assert np.array_equal(np.isnan(ref), np.isnan(got)) and np.isnan(got).sum() == 2  # 0x7F, 0xFF
    np.testing.assert_array_equal(got[~np.isnan(got)], ref[~np.isnan(ref)])
    assert np.nanmax(got) == 448 and got[1] == 2.0 ** -9  # the largest value, the smallest subnormal


def test_encode_every_value_back_to_its_code():
    np.testing.assert_array_equal(fp8.encode(fp8.decode(FINITE_CODES)), FINITE_CODES)


def test_encode_random_values_midpoints_and_saturation_as_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000).astype(np.float32) * s for s in (1e-4, 3e-3, 0.1, 1, 40, 600)])
    values = np.sort(fp8.decode(FINITE_CODES[FINITE_CODES < 0x80]).astype(np.float64))
    mids = ((values[1:] + values[:-1]) / 2).astype(np.float32)  # exact ties: round to even
    near = np.nextafter(mids, np.float32(np.inf))
    edge = np.float32([0.0, -0.0, 1e-30, -1e-30, 2.0 ** -10, 2.0 ** -10 * 3, 448, 464, 470, 480, 1e6, -1e6, 3e38])
    x = np.concatenate([x, mids, -mids, near, -near, edge])
    np.testing.assert_array_equal(fp8.encode(x), _torch_encode(x))
    assert fp8.encode(np.float64([1e300]))[0] == 0x7E  # float64 saturates too


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_nan_and_inf(bad):
    with pytest.raises(ValueError, match="finite"):
        fp8.encode(np.float32([1.0, bad]))
    with pytest.raises(ValueError, match="float"):
        fp8.encode(np.arange(3))
    with pytest.raises(ValueError, match="uint8"):
        fp8.decode(np.arange(3))


# ---------------------------------------------------------------- per-channel quantization and blocks


def test_quantize_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((9, 64)).astype(np.float32) * np.float32([[10 ** -e] for e in range(9)])
    w[3] = 0  # an all-zero row
    codes, scales = fp8.quantize_per_channel(w)
    assert codes.dtype == np.uint8 and scales.dtype == np.float32 and scales.shape == (9,)
    assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)  # float16 values
    assert scales.min() >= fp8.MIN_SCALE
    amax = np.abs(w).max(axis=1)
    big = amax / 448 >= fp8.MIN_SCALE
    assert np.all(scales[big] >= amax[big] / 448) and np.all(scales[big] <= amax[big] / 448 * (1 + 2 ** -10))
    # each weight is its nearest E4M3 value on the row's scale (torch's cast of w / scale)
    np.testing.assert_array_equal(codes, _torch_encode(w.astype(np.float64) / scales[:, None]))
    deq = fp8.decode(codes) * scales[:, None]
    assert np.all(np.abs(deq - w) <= np.maximum(np.abs(w) * 2 ** -4, 2.0 ** -10 * scales[:, None]))
    assert not np.any(codes[3])


def test_blocks_round_trip_and_dequantize_bit_exact():
    rng = np.random.default_rng(2)
    codes = rng.choice(FINITE_CODES, size=(7, 96)).astype(np.uint8)  # every kind of code, subnormals too
    scales = rng.uniform(1e-3, 2, 7).astype(np.float16).astype(np.float32)
    blocks = fp8.to_blocks(codes, scales)
    assert blocks.shape == (7, 3 * 34)
    c2, s2 = fp8.from_blocks(blocks, 96)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(s2, scales)
    ref = fp8.decode(codes) * scales[:, None]  # float32(d * e4m3): one rounding
    w = WeightTensor("w", (7, 96), "F8_E4M3", blocks)
    np.testing.assert_array_equal(w.to_float32(), ref)
    np.testing.assert_array_equal(dequantize(blocks, "F8_E4M3", (7, 96)), ref)
    np.testing.assert_array_equal(fp8.blocks_to_float32(blocks, (7, 96)), ref)


def test_a_scale_that_is_no_float16_value_is_rounded_and_the_codes_follow():
    rng = np.random.default_rng(3)
    codes = rng.choice(FINITE_CODES, size=(4, 32)).astype(np.uint8)
    s = np.float32([0.1, 1e-7, 3.0, 0.0123456])  # 1e-7: below float16's normals
    c2, d = fp8.from_blocks(fp8.to_blocks(codes, s), 32)
    assert d[1] == fp8.MIN_SCALE
    want = fp8.decode(codes).astype(np.float64) * s[:, None]
    got = fp8.decode(c2).astype(np.float64) * d[:, None]
    ok = np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -4, 2.0 ** -9 * d[:, None])  # <= one E4M3 step
    assert ok.all()
    assert np.mean(c2[[0, 2, 3]] == codes[[0, 2, 3]]) > 0.95  # a relative scale change of 2^-12 moves few codes


def test_block_and_scale_errors_are_one_line():
    with pytest.raises(ValueError, match="NaN"):
        fp8.to_blocks(np.full((1, 32), 0x7F, np.uint8), [1.0])
    with pytest.raises(ValueError, match="multiple of 32"):
        fp8.to_blocks(np.zeros((1, 48), np.uint8), [1.0])
    with pytest.raises(ValueError, match="one scale per row"):
        fp8.to_blocks(np.zeros((3, 32), np.uint8), [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fp8.to_blocks(np.zeros((1, 32), np.uint8), [0.0])
    mixed = np.concatenate([fp8.to_blocks(np.zeros((1, 32), np.uint8), [1.0]),
                            fp8.to_blocks(np.zeros((1, 32), np.uint8), [2.0])], axis=1)
    with pytest.raises(ValueError, match="different scales"):
        fp8.from_blocks(mixed, 64)
    with pytest.raises(ValueError, match="finite"):
        fp8.quantize_per_channel(np.float32([[np.nan] * 32]))
    with pytest.raises(ValueError, match="float16's range"):
        fp8.quantize_per_channel(np.full((1, 32), 1e30, np.float32))


# ---------------------------------------------------------------- the kernel


def _random_layer(rng, n, k):
    codes = rng.choice(FINITE_CODES, size=(n, k)).astype(np.uint8)
    scales = rng.uniform(1e-3, 1e-2, n).astype(np.float16).astype(np.float32)
    w = WeightTensor(f"w{n}x{k}", (n, k), "F8_E4M3", fp8.to_blocks(codes, scales))
    return QuantLinear(w), w.to_float32().astype(np.float64)


@pytest.mark.parametrize("n, k", [(1, 32), (33, 64), (97, 576), (301, 96)])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 40])
def test_matmul_vs_float64(n, k, t):
    rng = np.random.default_rng(n * 1000 + k + t)
    lin, w64 = _random_layer(rng, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    y = lin(x)
    x64 = x.astype(np.float64)
    err = np.abs(y - x64 @ w64.T) / (np.abs(x64) @ np.abs(w64).T)
    assert y.shape == (t, n) and err.max() < 1e-5


def test_every_dot_choice_runs_float32_and_threads_agree():
    rng = np.random.default_rng(5)
    lin, _ = _random_layer(rng, 2048, 1024)  # 2.1 MiB: over the GEMV's parallel threshold
    for t in (1, 8, 20):
        x = rng.standard_normal((t, 1024)).astype(np.float32)
        y = lin(x, dot="float")
        np.testing.assert_array_equal(lin(x, dot="int8"), y)  # no int8 path: E4M3 codes are no integers
        np.testing.assert_array_equal(lin(x, dot="auto"), y)
        np.testing.assert_array_equal(lin(x, max_threads=1), y)


def test_concat_and_embedding():
    rng = np.random.default_rng(6)
    (a, wa), (b, wb) = _random_layer(rng, 5, 64), _random_layer(rng, 11, 64)
    fused = QuantLinear.concat([a, b])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(fused(x), np.concatenate([a(x), b(x)], axis=1))
    table = EmbeddingTable(WeightTensor("e", (11, 64), "F8_E4M3", b.data.copy()))
    ids = np.array([0, 10, 3, 3])
    np.testing.assert_array_equal(table.lookup(ids), wb[ids].astype(np.float32))


def test_fused_decode_step_equals_the_per_op_forward(make_hf_model, cpu_backend):
    from test_decode_fused import _decode_batch

    from mojollm.engine.step import StepBatch
    from mojollm.kernels.decode import DecodeProgram, unsupported_reason
    from mojollm.models import load_model

    path, _ = make_hf_model("llama", seed=11, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                            num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512)
    model = load_model(str(path), cpu_backend)

    def fp8_linear(lin):
        dense = lin.weight.to_float32() if hasattr(lin, "weight") else np.asarray(lin.w)
        return QuantLinear(WeightTensor(lin.name, dense.shape, "F8_E4M3", fp8.quantize_blocks(dense)))

    model.lm_head = fp8_linear(model.lm_head)
    for layer in model.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, name, fp8_linear(getattr(layer, name)))
    B = 16
    model.allocate_kv_cache(64, B)
    assert unsupported_reason(model) is None
    rng = np.random.default_rng(7)
    lens = [0, 37, 5, 200]
    tables, start = [], 0
    for n in lens:
        nb = -(-(n + 1) // B)
        tables.append(list(range(start, start + nb)))
        start += nb
        if n:
            model.forward(StepBatch.single_sequence(rng.integers(3, model.config.vocab_size, size=n), 0, tables[-1], B))
    batch = _decode_batch(rng, lens, tables, B, model.config.vocab_size)
    saved = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    want = model.forward(batch)
    for team in (True, False):
        for (k, v), (k0, v0) in zip(model.kv_caches, saved):
            k[...] = k0
            v[...] = v0
        program = DecodeProgram(model, max_seqs=4, team=team)
        _, got = program.run(batch)
        assert program.fused_head
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


# ---------------------------------------------------------------- the HF checkpoint


@pytest.fixture(scope="module")
def hf_fp8(make_hf_model, tmp_path_factory):
    """(fp8 dir, the float transformers model) from `mojollm quantize --method fp8` on a float HF dir."""
    from mojollm.model_quantizer import quantize_model

    src, model = make_hf_model("llama", seed=3, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    out = tmp_path_factory.mktemp("fp8") / "fp8"
    summary = quantize_model(src, out, method="fp8")
    assert summary["type"] == "F8_E4M3 per channel"
    return out, model


def test_checkpoint_reads_in_the_safetensors_library_as_fp8_with_channel_scales(hf_fp8):
    torch = _torch()
    from safetensors.torch import load_file

    out, model = hf_fp8
    t = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "float-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel" and cfg["ignore"] == ["lm_head"]
    name = "model.layers.1.mlp.down_proj"
    w, s = t[f"{name}.weight"], t[f"{name}.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    assert t["lm_head.weight"].dtype == torch.float16 and t["model.embed_tokens.weight"].dtype == torch.float16
    ref = dict(model.named_parameters())[f"{name}.weight"].detach()
    err = (w.float() * s - ref).abs() / ref.abs().amax(dim=1, keepdim=True)
    assert err.max() < 2 ** -4  # half an E4M3 step at the row's largest value is 2^-4 * 16 / 448


def test_checkpoint_logits_equal_transformers_on_the_dequantized_weights(hf_fp8, cpu_backend):
    torch = _torch()
    """Our loader and kernels against transformers running the checkpoint's own FP8 values
    (weight.float() * weight_scale, read by the safetensors library): independent of mojollm.fp8."""
    import copy

    from safetensors.torch import load_file

    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    out, model = hf_fp8
    t = load_file(str(out / "model.safetensors"))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name + "_scale" in t:
                p.copy_(t[name].float() * t[name + "_scale"])
            else:
                p.copy_(t[name].float())
    ids = list(np.random.default_rng(9).integers(2, model.config.vocab_size, size=21))
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits[0].numpy()
    m = load_model(str(out), cpu_backend)
    assert m.layers[0].qkv.qtype == "F8_E4M3" and m.layers[0].down.qtype == "F8_E4M3"
    m.allocate_kv_cache(4, 16)
    got = m.forward(StepBatch.single_sequence(ids, 0, [0, 1], 16, all_logits=True))
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_gguf_source_quantizes_loads_and_generates(tmp_path):
    """A llama GGUF (q / k rows in llama.cpp's order) to an FP8 HF directory: logits near the float
    source's (FP8 noise, not permuted garbage), and the engine generates from it."""
    from test_loader_hardening import write_tiny_gguf
    from test_model_quantizer import _logits

    from mojollm import LLM, SamplingParams
    from mojollm.model_quantizer import quantize_model, write_float_gguf

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "fp8"
    quantize_model(src, out, method="fp8")
    ids = list(np.random.default_rng(5).integers(2, 250, size=29))
    ref = _logits(write_float_gguf(src, tmp_path / "f.gguf"), ids)
    got = _logits(out, ids)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    res = LLM(str(out), backend="cpu").generate(["the the"], SamplingParams(temperature=0, max_tokens=5,
                                                                            ignore_eos=True))[0]
    assert len(res.token_ids) == 5


def _fp8_dir(tmp_path: Path, tensors: dict, qcfg: dict | None) -> Path:
    """A copy of a tiny float HF config with our own tensors and quantization_config."""
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    ct.save_safetensors(d / "model.safetensors", tensors)
    return d


def _tiny_tensors(rng) -> dict:
    t = {"model.embed_tokens.weight": rng.standard_normal((64, 32)).astype(np.float32),
         "model.norm.weight": np.ones(32, np.float32),
         "model.layers.0.input_layernorm.weight": np.ones(32, np.float32),
         "model.layers.0.post_attention_layernorm.weight": np.ones(32, np.float32)}
    for name, shape in (("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)), ("self_attn.v_proj", (16, 32)),
                        ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
                        ("mlp.down_proj", (32, 64))):
        codes, scales = fp8.quantize_per_channel(rng.standard_normal(shape).astype(np.float32))
        t[f"model.layers.0.{name}.weight"] = codes
        t[f"model.layers.0.{name}.weight_scale"] = scales.reshape(-1, 1)
    return t


@pytest.mark.parametrize("case, fragment", [
    ("no quantization_config", "no FP8 quantization_config"),
    ("missing scale", "has no model.layers.0.mlp.up_proj.weight_scale"),
    ("scale shape", "weight_scale has shape"),
    ("nan codes", "NaN"),
    ("group strategy", "strategy 'group' is not supported"),
    ("int weights", "not static symmetric FP8"),
    ("block fp8", "weight_block_size"),
    ("packed format", "format 'pack-quantized' is not supported"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, case, fragment):
    from mojollm.models.hf_loader import load_hf

    rng = np.random.default_rng(8)
    t = _tiny_tensors(rng)
    q = ct.quantization_config("fp8")
    w = q["config_groups"]["group_0"]["weights"]
    if case == "no quantization_config":
        q = None
    elif case == "missing scale":
        del t["model.layers.0.mlp.up_proj.weight_scale"]
    elif case == "scale shape":
        t["model.layers.0.mlp.up_proj.weight_scale"] = np.ones((3, 1), np.float32)
    elif case == "nan codes":
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].copy()
        t["model.layers.0.mlp.up_proj.weight"][0, 0] = 0xFF
    elif case == "group strategy":
        w.update(strategy="group", group_size=32)
    elif case == "int weights":
        w.update(type="int")
    elif case == "block fp8":
        q = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    elif case == "packed format":
        q["format"] = "pack-quantized"
    with pytest.raises(ModelLoadError, match=fragment) as e:
        load_hf(_fp8_dir(tmp_path, t, q))
    assert "\n" not in str(e.value)


def test_per_tensor_fp8_checkpoint_loads(tmp_path):
    """quant_method "fp8" (vLLM's / transformers' Fp8Config) with one scale per tensor."""
    from mojollm.models.hf_loader import load_hf

    rng = np.random.default_rng(10)
    t = _tiny_tensors(rng)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    s = np.float32(np.abs(w).max() / 448)  # a float32 scale: rounded to float16, codes re-encoded
    t["model.layers.0.mlp.up_proj.weight"] = fp8.encode(w / s)
    t["model.layers.0.mlp.up_proj.weight_scale"] = np.float32([s])
    ckpt = load_hf(_fp8_dir(tmp_path, t, {"quant_method": "fp8", "activation_scheme": "dynamic"}))
    got = ckpt.weights["layers.0.up_proj"]
    assert got.qtype == "F8_E4M3"
    want = fp8.decode(t["model.layers.0.mlp.up_proj.weight"]) * s
    assert np.abs(got.to_float32() - want).max() <= 2 ** -4 * np.abs(want).max()


def test_cli_refuses_options_that_do_not_apply(tmp_path):
    from click.testing import CliRunner

    from mojollm.cli import cli
    from test_loader_hardening import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(src), "--method", "fp8", "--bits", "4", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--bits do not apply to --method fp8" in res.output
    res = runner.invoke(cli, ["quantize", str(src), "--method", "fp8", "--out", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2 and "writes a Hugging Face directory" in res.output
    res = runner.invoke(cli, ["quantize", str(src), "--method", "fp8", "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["method"] == "fp8"


def test_nan_codes_are_refused_by_the_layer():
    blocks = fp8.to_blocks(np.zeros((2, 64), np.uint8), [1.0, 1.0])
    blocks[1, 34 + 5] = 0xFF
    with pytest.raises(ValueError, match="NaN codes"):
        QuantLinear(WeightTensor("w", (2, 64), "F8_E4M3", blocks))
