"""`mojollm quantize` end to end on a tiny Llama GGUF (tests/test_loader_hardening.py's, every
weight type) and, for one run, the default model: the file's blocks against the `gguf`
package's own quantizer, AWQ's folded scales leaving the float model's function unchanged,
GPTQ / AWQ files that load and decode on the cpu backend, and the CLI's one-line refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mojollm import model_quantizer as mq
from test_loader_hardening import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("quant") / "tiny.gguf")


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: (np.asarray(t.data), t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    from mojollm.backends import get_backend
    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    model = load_model(str(path), get_backend("cpu"))
    model.allocate_kv_cache(8, 16)
    return model.forward(StepBatch.single_sequence(ids, 0, list(range(-(-len(ids) // 16))), 16, all_logits=True))


@pytest.mark.parametrize("bits, symmetric, qtype", [(8, False, "Q8_0"), (4, False, "Q4_1"), (4, True, "Q4_0")])
def test_rtn_file_holds_the_gguf_package_quantization_of_the_float_weights(tiny, tmp_path, bits, symmetric, qtype):
    import gguf
    from gguf.quants import dequantize, quantize

    out = tmp_path / "q.gguf"
    summary = mq.quantize_model(tiny, out, method="rtn", bits=bits, symmetric=symmetric)
    assert summary["type"] == qtype
    src, got = _tensors(tiny), _tensors(out)
    assert list(got) == list(src)  # every tensor, in the source's order
    for name, (data, kind) in got.items():
        w, wkind = src[name]
        shape = tuple(int(d) for d in data.shape)
        ref = dequantize(w, wkind).astype(np.float32)
        if ref.ndim == 1:
            assert kind == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(data, ref)
            continue
        want = "Q8_0" if name in ("token_embd.weight", "output.weight") else qtype
        assert kind == gguf.GGMLQuantizationType[want], name
        ref = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref
        np.testing.assert_array_equal(data.reshape(-1), quantize(ref, gguf.GGMLQuantizationType[want]).reshape(-1),
                                      err_msg=name)
        assert shape[0] == ref.shape[0]


def test_awq_folding_leaves_the_float_model_unchanged(tiny, tmp_path):
    """Scales searched on real calibration inputs, folded into norms / up / v, and the weights kept
    float: the logits equal the source's to float32 rounding."""
    import gguf

    reader, tensors = mq.read_gguf(tiny)
    floatpath = mq.write_float_gguf(tiny, tmp_path / "f.gguf")
    inputs, _ = mq.calibrate(floatpath, mq.default_calibration_text(), 200)
    weights = {n: w for n, (w, _) in tensors.items()}
    before = {n: w.copy() for n, w in weights.items()}
    n_layers = 1 + max(int(n.split(".")[1]) for n in weights if n.startswith("blk."))
    for i in range(n_layers):
        mq.fold_awq_scales(weights, inputs, i, "Q4_1")
    assert any(not np.array_equal(weights[n], before[n]) for n in weights if "ffn_norm" in n)  # it did scale
    folded = tmp_path / "folded.gguf"
    mq.write_gguf(reader, folded, {n: (weights[n], None) for n in weights}, gguf.LlamaFileType.ALL_F32)
    ids = list(np.random.default_rng(3).integers(2, 250, size=37))
    a, b = _logits(floatpath, ids), _logits(folded, ids)
    np.testing.assert_allclose(b, a, atol=2e-4 * np.abs(a).max(), rtol=0)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_write_a_model_that_loads_and_runs(tiny, tmp_path, method):
    from mojollm import LLM, SamplingParams

    out = tmp_path / f"{method}.gguf"
    summary = mq.quantize_model(tiny, out, method=method, bits=4, calib_tokens=300)
    assert summary["calibration_tokens"] >= 16 and out.stat().st_size < tiny.stat().st_size * 2
    llm = LLM(str(out), backend="cpu")
    res = llm.generate(["the the"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(res.token_ids) == 5
    ids = list(np.random.default_rng(5).integers(2, 250, size=29))
    ref = _logits(mq.write_float_gguf(tiny, tmp_path / "f.gguf"), ids)
    got = _logits(out, ids)
    assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()  # 4-bit noise, not garbage


def test_bad_requests_are_refused_in_one_line(tiny, tmp_path):
    from click.testing import CliRunner

    from mojollm.cli import cli

    run = CliRunner().invoke
    for args, msg in ((["--bits", "3"], "bits must be 8 or 4"), (["--group-size", "64"], "group_size must be 32"),
                      (["--method", "rtn", "--act-order"], "apply to gptq"),
                      (["--bits", "8", "--symmetric"], "--symmetric applies to 4 bits")):
        res = run(cli, ["quantize", str(tiny), "--out", str(tmp_path / "x.gguf"), *args])
        assert res.exit_code != 0 and msg in res.output, (args, res.output)
    (tmp_path / "x.bin").write_bytes(b"")  # an existing file: neither a .gguf nor a directory
    res = run(cli, ["quantize", str(tiny), "--out", str(tmp_path / "x.bin")])
    assert res.exit_code == 2 and ".gguf" in res.output
    res = run(cli, ["quantize", str(tiny), "--out", str(tmp_path / "ok.gguf"), "--bits", "8", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["type"] == "Q8_0"
    with pytest.raises(ValueError, match="Llama-family|.gguf"):
        mq.quantize_model(tmp_path / "missing.gguf", tmp_path / "y.gguf")


def test_a_model_too_large_for_memory_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    from mojollm.backends import base

    monkeypatch.setattr(base, "host_available_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="memory is available"):
        mq.quantize_model(tiny, tmp_path / "z.gguf", method="gptq")
    assert not (tmp_path / "z.gguf").exists()


def test_cli_writes_gptq_directories_and_refuses_impossible_grids(tiny, tmp_path, make_hf_model):
    """--out DIR: GPTQ packed integers at any bits / group size, from a GGUF or a float HF directory;
    a .gguf keeps GGUF's 8 / 4 bits in groups of 32."""
    from click.testing import CliRunner

    from mojollm import LLM, SamplingParams
    from mojollm.cli import cli

    run = CliRunner().invoke
    hf, _ = make_hf_model("llama", seed=2)
    for src, args in ((tiny, ["--bits", "3", "--group-size", "64"]), (hf, ["--bits", "2", "--group-size", "-1"])):
        out = tmp_path / f"dir-{args[1]}"
        res = run(cli, ["quantize", str(src), "--out", str(out), "--json", "-q", *args])
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output.strip().splitlines()[-1])
        assert summary["format"] == "gptq_v2" and summary["bits"] == int(args[1])
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (int(args[1]), int(args[3]), False, False)
        assert (out / "tokenizer.json").is_file()
        r = LLM(str(out), backend="cpu").generate(["the"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(r[0].token_ids) == 3
    for src, args, msg in (
            (tiny, ["--bits", "5"], "--bits must be 8, 4, 3 or 2"),
            (tiny, ["--group-size", "48"], "--group-size must be 32, 64, 128 or -1"),
            (tiny, ["--bits", "3", "--out", str(tmp_path / "y.gguf")], "--out DIR writes other bits"),
            (hf, ["--out", str(tmp_path / "y.gguf")], "give --out a directory"),
            (tiny, ["--method", "w8a8", "--bits", "8", "--group-size", "64"], "one scale per output channel")):
        cmd = ["quantize", str(src), *args] + ([] if "--out" in args else ["--out", str(tmp_path / "d")])
        res = run(cli, cmd)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)


def test_gguf_source_becomes_the_same_model_as_a_hf_directory(tiny, tmp_path):
    """The GGUF's llama.cpp-permuted q/k rows go back to HF's order, and its tokenizer is written as
    tokenizer.json: 8-bit symmetric per-channel GPTQ of it runs like the float GGUF."""
    out = tmp_path / "q8"
    mq.quantize_model(tiny, out, method="rtn", bits=8, symmetric=True, group_size=-1)
    from mojollm.models import load_model

    a, b = load_model(str(tiny)), load_model(str(out))
    text = "the the he t"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    ids = list(np.random.default_rng(4).integers(2, 250, size=23))
    ref = _logits(mq.write_float_gguf(tiny, tmp_path / "f.gguf"), ids)
    got = _logits(out, ids)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
