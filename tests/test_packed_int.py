"""GPTQ / AWQ packed-integer checkpoints (mojollm.models.packed_int) against references written here.

  * layout: numpy packers written in this file from the libraries' documented layouts (AutoGPTQ's
    QuantLinear.pack loop, including its three-word 3-bit scheme and v1's "zero - 1"; AutoAWQ's
    WQLinear_GEMM order 0 2 4 6 1 3 5 7), never calling packed_int: ours must write their bytes
    and read them back, on odd shapes (partial last groups, N not a multiple of 32);
  * end to end: a tiny random HF Llama quantized by `mojollm quantize` into a GPTQ / AWQ directory
    loads through LLM / load_model. The test unpacks that directory itself, writes the dequantized
    weights as a float32 checkpoint, and compares: the loaded blocks equal the dequantized weights
    (exactly for Q4_0 / Q8_0, within scale / 128 for Q4_1's float16 m), and the logits agree within
    LOGIT_RTOL of their range (the quantized path runs int8-activation kernels; measured ~1e-2);
  * an AutoGPTQ-style checkpoint made here (desc_act with a permuted g_idx, v1 zeros) loads, with
    its one log line; static-group act-order maps exactly;
  * bad configs and tensors: one-line ModelLoadErrors.
transformers 5 cannot serve as a reference here: its GPTQ and AWQ loaders need gptqmodel (and
optimum), which are not installed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mojollm.errors import ModelLoadError
from mojollm.models import packed_int as pi
from mojollm.quantization import Grid, rtn

LOGIT_RTOL = 0.05  # of max |logit|: int8 activations against float32; measured 0.5-1.5e-2


# ---------------------------------------------------------------------------------------------- references


def ref_pack_along_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop: v [R, C] codes -> uint32 words packed along R."""
    v = v.astype(np.uint64)
    out = []
    i = 0
    if bits in (2, 4, 8):
        per = 32 // bits
        while i < v.shape[0]:
            word = np.zeros(v.shape[1], np.uint64)
            for j in range(per):
                word |= v[i + j] << np.uint64(bits * j)
            out.append(word)
            i += per
    else:  # 3 bits: 32 codes in three words, codes 10 and 21 split across the boundaries
        while i < v.shape[0]:
            a = np.zeros(v.shape[1], np.uint64)
            for j in range(10):
                a |= v[i + j] << np.uint64(3 * j)
            a |= v[i + 10] << np.uint64(30)
            b = (v[i + 10] >> np.uint64(2)) & np.uint64(1)
            for j in range(10):
                b |= v[i + 11 + j] << np.uint64(3 * j + 1)
            b |= v[i + 21] << np.uint64(31)
            c = (v[i + 21] >> np.uint64(1)) & np.uint64(3)
            for j in range(10):
                c |= v[i + 22 + j] << np.uint64(3 * j + 2)
            out += [a, b, c]
            i += 32
    return (np.stack(out) & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def ref_gptq_pack(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx, bits: int, v1: bool) -> dict:
    """q [K, N], zeros / scales [G, N]; N padded with zero codes to whole words of zero points."""
    n = q.shape[1]
    pad = 32 if bits == 3 else 32 // bits
    z = np.zeros((zeros.shape[0], -(-n // pad) * pad), np.int64)
    z[:, :n] = zeros - (1 if v1 else 0)
    z &= (1 << bits) - 1  # (v1 never stores -1 here: callers keep zeros >= 1)
    return {"qweight": ref_pack_along_rows(q, bits), "qzeros": np.ascontiguousarray(ref_pack_along_rows(z.T, bits).T),
            "scales": scales.astype(np.float16), "g_idx": np.asarray(g_idx, np.int32)}


def ref_gptq_unpack(t: dict, bits: int, v1: bool):
    """(q [K, N], zeros [G, N]) by AutoGPTQ's dequantize path: shifts and masks per field."""
    def unpack(words, rows):
        w = words.view(np.uint32).astype(np.uint64)
        if bits != 3:
            per = 32 // bits
            vals = [(w >> np.uint64(bits * j)) & np.uint64((1 << bits) - 1) for j in range(per)]
            return np.stack(vals, axis=1).reshape(-1, w.shape[1])[:rows]
        out = []
        for r in range(0, w.shape[0], 3):
            a, b, c = w[r], w[r + 1], w[r + 2]
            vals = [(a >> np.uint64(3 * j)) & np.uint64(7) for j in range(10)]
            vals.append(((a >> np.uint64(30)) | (b << np.uint64(2))) & np.uint64(7))
            vals += [(b >> np.uint64(3 * j + 1)) & np.uint64(7) for j in range(10)]
            vals.append(((b >> np.uint64(31)) | (c << np.uint64(1))) & np.uint64(7))
            vals += [(c >> np.uint64(3 * j + 2)) & np.uint64(7) for j in range(10)]
            out.append(np.stack(vals))
        return np.concatenate(out)[:rows]
    n = t["scales"].shape[1]
    k = t["qweight"].shape[0] * 32 // bits
    q = unpack(t["qweight"], k).astype(np.int64)
    z = unpack(np.ascontiguousarray(t["qzeros"].T), n).T.astype(np.int64) + (1 if v1 else 0)
    return q, z


AWQ = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_awq_pack(q: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM.from_linear loop: q [R, N] -> int32 [R, N / 8]."""
    q = q.astype(np.uint64)
    out = np.zeros((q.shape[0], q.shape[1] // 8), np.uint64)
    for col in range(q.shape[1] // 8):
        for i in range(8):
            out[:, col] |= q[:, col * 8 + AWQ[i]] << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def ref_awq_unpack(words: np.ndarray) -> np.ndarray:
    """AutoAWQ's unpack_awq + reverse_awq_order."""
    w = words.view(np.uint32).astype(np.uint64)
    vals = np.stack([(w >> np.uint64(4 * i)) & np.uint64(15) for i in range(8)], axis=-1)  # [R, N/8, 8]
    out = np.empty((w.shape[0], w.shape[1] * 8), np.int64)
    for col in range(w.shape[1]):
        for i in range(8):
            out[:, col * 8 + AWQ[i]] = vals[:, col, i]
    return out


def _random_grid_weights(rng, n, k, grid):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return rtn(w, grid)


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n, k, gs", [(40, 96, 64), (64, 160, 32), (24, 128, -1), (32, 96, 128)])
def test_gptq_layout_matches_the_reference_packer(bits, n, k, gs):
    rng = np.random.default_rng(bits * 100 + n)
    sym = bits % 2 == 0 and n == 64  # some symmetric (v1), the rest asymmetric (v2)
    iq = _random_grid_weights(rng, n, k, Grid(bits, gs, sym))
    ours = pi.gptq_tensors(iq, "gptq" if sym else "gptq_v2")
    g_idx = np.arange(k) // (k if gs == -1 else gs)
    ref = ref_gptq_pack(iq.q.T, iq.zeros.T.astype(np.int64), iq.scales.T, g_idx, bits, v1=sym)
    for key in ("qweight", "qzeros", "g_idx"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(ours["scales"].view(np.uint16), ref["scales"].view(np.uint16))
    assert ours["qweight"].shape == (k * bits // 32, n) and ours["qweight"].dtype == np.int32
    # read back what the reference wrote, and check our unpacking against the reference's
    p = pi.read_gptq(ref, bits, not sym, gs, "t")
    rq, rz = ref_gptq_unpack(ref, bits, v1=sym)
    np.testing.assert_array_equal(p.q, rq)
    np.testing.assert_array_equal(p.zeros, rz)
    np.testing.assert_array_equal(p.dequantize(), iq.dequantize())


def test_three_bit_words_by_hand():
    """32 codes 0..7 repeating: bits 0-29 of word 0 hold codes 0-9, code 10 spans words 0 and 1."""
    codes = (np.arange(32) % 8)[:, None]
    words = pi.pack_rows(codes, 3).view(np.uint32)[:, 0]
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[:, 0]))  # the 96-bit little-endian stream
    assert [int(w) for w in words] == [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]
    assert (int(words[0]) >> 30) | ((int(words[1]) & 1) << 2) == 10 % 8


@pytest.mark.parametrize("n, k, gs", [(40, 96, 32), (64, 128, 64), (16, 256, 128)])
def test_awq_layout_matches_the_reference_packer(n, k, gs):
    rng = np.random.default_rng(n + k)
    iq = _random_grid_weights(rng, n, k, Grid(4, gs, False))
    ours = pi.awq_tensors(iq)
    np.testing.assert_array_equal(ours["qweight"], ref_awq_pack(iq.q.T))
    np.testing.assert_array_equal(ours["qzeros"], ref_awq_pack(iq.zeros.T))
    np.testing.assert_array_equal(ours["scales"].view(np.uint16), iq.scales.T.view(np.uint16))
    assert ours["qweight"].shape == (k, n // 8)
    p = pi.read_awq(ours, 4, gs, "t")
    np.testing.assert_array_equal(p.q, ref_awq_unpack(ours["qweight"]))
    np.testing.assert_array_equal(p.dequantize(), iq.dequantize())


@pytest.mark.parametrize("grid, qtype", [(Grid(4, 128), "Q4_1"), (Grid(4, 64, True), "Q4_0"), (Grid(3, 32), "Q4_0"),
                                         (Grid(2, -1), "Q4_0"), (Grid(8, 32, True), "Q8_0"), (Grid(8, 64), None)])
def test_blocks_hold_the_packed_weights(grid, qtype):
    rng = np.random.default_rng(7)
    iq = _random_grid_weights(rng, 24, 192, grid)
    p = pi.read_gptq(pi.gptq_tensors(iq, "gptq" if grid.symmetric else "gptq_v2"), grid.bits, not grid.symmetric,
                     grid.group_size, "t")
    blocks, exact = pi.to_blocks(p)
    want = iq.dequantize()
    got = blocks.dequantize()
    if qtype is None:  # 8-bit asymmetric: Q8_0 by RTN of the dequantized weights
        assert not exact and blocks.qtype == "Q8_0"
        assert np.abs(got - want).max() <= np.abs(want).max() / 254 * 1.01
        return
    assert exact and blocks.qtype == qtype
    if qtype == "Q4_1":  # m = -scale * zero rounded to float16: under 1/128 of a step
        step = np.repeat(np.abs(iq.scales.astype(np.float32)), grid.group_size, axis=1)[:, :192]
        assert np.all(np.abs(got - want) <= step / 128)
        assert np.any(got != want)
    else:
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------- end to end


def _dequantized_float_dir(qdir: Path, dst: Path) -> Path:
    """A float32 HF directory of a GPTQ / AWQ directory's weights, unpacked by the references above."""
    cfg = json.loads((qdir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    t = load_file(str(qdir / "model.safetensors"))
    out = {}
    for name, a in t.items():
        prefix, part = name.rsplit(".", 1)
        if part in ("qzeros", "scales", "g_idx"):
            continue
        if part != "qweight":
            out[name] = a.astype(np.float32)
            continue
        scales = t[prefix + ".scales"].astype(np.float32)
        if qc["quant_method"] == "awq":
            q = ref_awq_unpack(t[prefix + ".qweight"])
            z = ref_awq_unpack(t[prefix + ".qzeros"])
            g_idx = np.arange(q.shape[0]) // qc["group_size"]
        else:
            q, z = ref_gptq_unpack({k: t[prefix + "." + k] for k in ("qweight", "qzeros", "scales")}, qc["bits"],
                                   v1=qc["checkpoint_format"] == "gptq")
            g_idx = t[prefix + ".g_idx"]
        out[prefix + ".weight"] = (scales[g_idx] * (q - z[g_idx, :q.shape[1]])).T.astype(np.float32).copy()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(qdir / f, dst / f)
    return dst


def _logits(path, ids):
    from mojollm.backends import get_backend
    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    model = load_model(str(path), get_backend("cpu"))
    model.allocate_kv_cache(8, 16)
    return model, model.forward(StepBatch.single_sequence(ids, 0, list(range(-(-len(ids) // 16))), 16, all_logits=True))


@pytest.mark.parametrize("method, bits, gs, sym, fmt", [
    ("rtn", 4, 32, False, "gptq_v2"), ("gptq", 3, 64, False, "gptq_v2"), ("gptq", 4, 128, True, "gptq"),
    ("awq", 4, 32, False, "awq"), ("rtn", 8, -1, True, "gptq")])
def test_written_directory_loads_as_its_dequantized_weights(make_hf_model, tmp_path, method, bits, gs, sym, fmt):
    from mojollm import LLM, SamplingParams
    from mojollm.model_quantizer import quantize_model

    src, _ = make_hf_model("llama", seed=3)
    qdir = tmp_path / "q"
    s = quantize_model(src, qdir, method=method, bits=bits, group_size=gs, symmetric=sym, calib_tokens=200)
    assert s["format"] == fmt
    qc = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("awq" if fmt == "awq" else "gptq") and qc["bits"] == bits
    assert qc["group_size"] == gs and (qc.get("sym") == sym or fmt == "awq")
    fdir = _dequantized_float_dir(qdir, tmp_path / "f")
    ids = list(np.random.default_rng(1).integers(0, 300, size=21))
    qmodel, got = _logits(qdir, ids)
    fmodel, ref = _logits(fdir, ids)
    for name, w in qmodel._checkpoint.weights.items():  # the blocks hold the dequantized weights
        want = fmodel._checkpoint.weights[name].to_float32()
        tol = 0.0 if w.qtype != "Q4_1" else np.abs(want).max() / 100  # Q4_1: m's float16 rounding
        assert np.abs(w.to_float32() - want).max() <= tol, (name, w.qtype)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < LOGIT_RTOL, err
    res = LLM(str(qdir), backend="cpu").generate(["The quick"], SamplingParams(temperature=0, max_tokens=4,
                                                                               ignore_eos=True))[0]
    assert len(res.token_ids) == 4


def _autogptq_style_checkpoint(make_hf_model, tmp_path: Path, static_groups: bool) -> tuple[Path, dict]:
    """A HF Llama whose projections are 4-bit GPTQ as AutoGPTQ writes them with desc_act: groups
    assigned in a random column order (g_idx non-monotone unless static_groups), v1 zeros (zero - 1),
    packed by ref_gptq_pack. Returns (dir, {module: its dequantized weight [N, K]})."""
    src, _ = make_hf_model("llama", seed=5)
    d = tmp_path / ("static" if static_groups else "desc_act")
    shutil.copytree(src, d)
    t = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(11)
    out, want = {}, {}
    gs = 32
    for name, w in t.items():
        if not name.endswith("_proj.weight"):
            out[name] = w
            continue
        n, k = w.shape
        perm = np.arange(k) if static_groups else rng.permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // gs  # AutoGPTQ: the i-th column in act order joins group i // gs
        ng = k // gs
        scales = (rng.uniform(0.01, 0.05, (ng, n))).astype(np.float16)
        zeros = rng.integers(1, 16, (ng, n))  # v1 cannot hold 0
        q = rng.integers(0, 16, (k, n))
        prefix = name[:-len(".weight")]
        for key, v in ref_gptq_pack(q, zeros, scales, g_idx, 4, v1=True).items():
            out[f"{prefix}.{key}"] = v
        want[prefix] = (scales.astype(np.float32)[g_idx] * (q - zeros[g_idx])).T
    (d / "model.safetensors").unlink()
    save_file(out, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": True,
                                  "static_groups": static_groups, "sym": False, "damp_percent": 0.01,
                                  "true_sequential": True, "model_name_or_path": None,
                                  "model_file_base_name": "model"}  # no checkpoint_format: v1
    (d / "config.json").write_text(json.dumps(cfg))
    return d, want


@pytest.mark.parametrize("static_groups", [False, True])
def test_autogptq_style_desc_act_checkpoint_loads(make_hf_model, tmp_path, caplog, static_groups):
    from mojollm.models.hf_loader import load_hf
    from mojollm.models.hf_loader import our_name

    d, want = _autogptq_style_checkpoint(make_hf_model, tmp_path, static_groups)
    with caplog.at_level(logging.WARNING, logger="mojollm.models"):
        ckpt = load_hf(d)
    lines = [r.getMessage() for r in caplog.records if r.name == "mojollm.models"]
    for prefix, w in want.items():
        got = ckpt.weights[our_name(prefix + ".weight")]
        if static_groups:
            assert got.qtype == "Q4_1"
            assert np.abs(got.to_float32() - w).max() <= 0.05 / 128 * 1.01  # m's float16 rounding only
        else:  # Q8_0 of the dequantized weights: within half a Q8_0 step
            assert got.qtype == "Q8_0"
            step = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2, keepdims=True) / 127
            err = np.abs(got.to_float32() - w).reshape(w.shape[0], -1, 32)
            assert np.all(err <= step * (0.5 + 127 / 2048) + 1e-7)
    if static_groups:
        assert not lines
    else:
        assert len(lines) == 1 and "14 of 14 GPTQ linears" in lines[0] and "\n" not in lines[0]
    from mojollm import LLM, SamplingParams

    out = LLM(str(d), backend="cpu").generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_configs_and_tensors_are_one_line_errors(make_hf_model, tmp_path):
    from mojollm.models.hf_loader import load_hf
    from mojollm.model_quantizer import quantize_model

    src, _ = make_hf_model("llama", seed=3)
    good = tmp_path / "good"
    quantize_model(src, good, method="rtn", bits=4, group_size=32)

    def variant(tag, config_change=None, tensors_change=None):
        d = tmp_path / tag
        shutil.copytree(good, d)
        if config_change:
            cfg = json.loads((d / "config.json").read_text())
            config_change(cfg["quantization_config"])
            (d / "config.json").write_text(json.dumps(cfg))
        if tensors_change:
            t = load_file(str(d / "model.safetensors"))
            tensors_change(t)
            save_file(t, str(d / "model.safetensors"))
        return d

    cases = [
        (dict(config_change=lambda q: q.update(quant_method="bitsandbytes")),
         "quant_method 'bitsandbytes' is not supported"),
        (dict(config_change=lambda q: q.update(bits=5)), "bits=5 is not supported"),
        (dict(config_change=lambda q: q.update(checkpoint_format="marlin", format="marlin")),
         "checkpoint_format 'marlin'"),
        (dict(config_change=lambda q: q.update(quant_method="awq", version="gemv")), "AWQ version 'gemv'"),
        (dict(config_change=lambda q: q.update(group_size=0)), "group_size must be -1 or a positive integer"),
        (dict(tensors_change=lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros")), "lacks its qzeros"),
        (dict(tensors_change=lambda t: t.update({"model.layers.0.mlp.up_proj.g_idx":
                                                 np.full(64, 99, np.int32)})), "g_idx must hold 64 group indices"),
        (dict(tensors_change=lambda t: t.update({"model.layers.0.mlp.up_proj.qweight":
                                                 t["model.layers.0.mlp.up_proj.qweight"][:3]})), "no 4-bit packing"),
        (dict(tensors_change=lambda t: t.update({"model.layers.0.mlp.up_proj.qzeros":
                                                 t["model.layers.0.mlp.up_proj.qzeros"][:, :5]})), "qzeros has shape"),
        (dict(tensors_change=lambda t: t.update({"model.layers.0.mlp.up_proj.scales":
                                                 t["model.layers.0.mlp.up_proj.qzeros"]})), "scales must be a float16"),
    ]
    for i, (change, msg) in enumerate(cases):
        with pytest.raises(ModelLoadError, match=msg) as info:
            load_hf(variant(f"v{i}", **change))
        assert "\n" not in str(info.value)
    # an int32 tensor in a float checkpoint
    d = tmp_path / "int-in-float"
    shutil.copytree(src, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"] = np.zeros(64, np.int32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="int32"):
        load_hf(d)
