"""`mojollm compare`: the JSON document of a real run through LLM on a tiny random-weight Llama (cpu,
and tpu on XLA:CPU when jax is installed), the roofline arithmetic against a hand-computed case, and
the cross-check flagging a deliberately perturbed backend.

Independent references: the schema below is written from bench/SCHEMA.md (not from the code);
derived numbers are recomputed here from the raw ones; the tiny model's greedy tokens are checked
against HF transformers' teacher-forced logits; byte counts come from the safetensors file.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mojollm import measure
from mojollm.backends import registry
from mojollm.backends.cpu import CpuBackend
from mojollm.cli_compare import compare
from mojollm.compare import CheckData, CompareConfig, Thresholds, cross_check, run_compare

L, N, B = 9, 6, 2  # prompt tokens, generated tokens, batch (odd sizes on purpose)
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# backends registered for the tests


class NoisyCpuBackend(CpuBackend):
    """The cpu backend with Gaussian noise (5% of the output's spread) added to every linear: what a
    broken kernel on another device looks like to the cross-check."""

    name = "noisy_cpu"

    def __init__(self):
        super().__init__()
        self._rng = np.random.default_rng(7)

    def linear(self, x, w, bias=None):
        y = super().linear(x, w, bias)
        noise = self._rng.normal(0.0, 0.05 * float(np.std(y)) + 1e-3, size=y.shape)
        return (y + noise).astype(np.float32)


class CpuCopyBackend(CpuBackend):
    """The cpu backend under another name: a non-reference backend that must pass the check."""

    name = "cpu_copy"


@pytest.fixture
def extra_backends(monkeypatch):
    monkeypatch.setitem(registry._BUILTIN, "noisy_cpu", f"{__name__}:NoisyCpuBackend")
    monkeypatch.setitem(registry._BUILTIN, "cpu_copy", f"{__name__}:CpuCopyBackend")


def _tpu_available() -> bool:
    return importlib.util.find_spec("jax") is not None and registry.probe("tpu").available


# ---------------------------------------------------------------------------------------------
# the schema, written from bench/SCHEMA.md

NUM = (int, float)
OPT_NUM = (int, float, type(None))
ENVELOPE = {"schema_version": int, "kind": str, "command": (str, type(None)), "config": dict,
            "environment": dict, "ok": bool, "model": dict, "backends": list, "prompt_tokens": list}
ENVIRONMENT = {"date": str, "load_average": (list, type(None)), "host": str, "platform": str, "machine": str, "cpu": str,
               "memory_bytes": (int, type(None)), "git_commit": (str, type(None)), "versions": dict, "threads": dict}
CONFIG = {"model": str, "backends": list, "prompt_len": int, "output_len": int, "batch": int, "reference": str,
          "repeats": int, "warmup": int, "block_size": int, "check_top_k": int, "thresholds": dict}
MODEL = {"path": str, "arch": str, "num_layers": int, "hidden_size": int, "num_heads": int, "num_kv_heads": int,
         "head_dim": int, "vocab_size": int, "weight_bytes": int, "kv_bytes_per_token": NUM}
UNAVAILABLE = {"name": str, "available": bool, "device": str, "reason": str}
RAN = {**UNAVAILABLE, "load_s": NUM, "ttft_s": NUM, "prefill_tokens_per_s": NUM, "decode_tokens_per_s": NUM,
       "itl_p50_s": NUM, "itl_p99_s": NUM, "peak_memory": dict, "energy": dict, "bandwidth": dict,
       "roofline": dict, "greedy_tokens": list, "engine": dict, "check": dict, "ok": bool}
PEAK = {"peak_bytes": (int, type(None)), "kind": str, "baseline_bytes": (int, type(None))}
ENERGY = {"joules": OPT_NUM, "source": (str, type(None)), "joules_per_token": OPT_NUM, "tokens": int}
BANDWIDTH = {"gbs": OPT_NUM, "method": str}
ROOFLINE = {"bytes_per_token": NUM, "achieved_gbs": OPT_NUM, "roofline_tokens_per_s": OPT_NUM, "fraction": OPT_NUM}
ENGINE = {"steps_per_run": int, "forward_fraction": NUM}
CHECK_REF = {"reference": str, "is_reference": bool, "ok": bool, "problems": list}
CHECK = {**CHECK_REF, "logprob_max_abs_diff": NUM, "logprob_scale": NUM, "logprob_rel_diff": NUM,
         "near_tie_margin": NUM, "greedy_match_len": list, "greedy_compared": int}


def _conforms(obj: dict, spec: dict, where: str) -> None:
    assert isinstance(obj, dict), f"{where} is {type(obj).__name__}, not an object"
    for key, types in spec.items():
        assert key in obj, f"{where} lacks {key!r}"
        assert isinstance(obj[key], types) and not (types is int and isinstance(obj[key], bool)), \
            f"{where}.{key} = {obj[key]!r} is not {types}"


def validate_document(doc: dict) -> None:
    _conforms(doc, ENVELOPE, "document")
    assert doc["schema_version"] == 2 and doc["kind"] == "mojollm.compare"
    _conforms(doc["environment"], ENVIRONMENT, "environment")
    _conforms(doc["config"], CONFIG, "config")
    _conforms(doc["model"], MODEL, "model")
    for i, b in enumerate(doc["backends"]):
        where = f"backends[{i}]"
        if not b["available"]:
            _conforms(b, UNAVAILABLE, where)
            assert b["reason"], f"{where}: an unavailable backend must say why"
            continue
        _conforms(b, RAN, where)
        _conforms(b["peak_memory"], PEAK, where + ".peak_memory")
        _conforms(b["energy"], ENERGY, where + ".energy")
        _conforms(b["bandwidth"], BANDWIDTH, where + ".bandwidth")
        _conforms(b["roofline"], ROOFLINE, where + ".roofline")
        _conforms(b["engine"], ENGINE, where + ".engine")
        _conforms(b["check"], CHECK_REF if b["check"]["is_reference"] else CHECK, where + ".check")
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN / Infinity


# ---------------------------------------------------------------------------------------------
# a real run through the CLI


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    return make_hf_model("llama", seed=3)


@pytest.fixture(scope="module")
def cli_run(tiny, tmp_path_factory):
    path, _ = tiny
    out = tmp_path_factory.mktemp("compare")
    backends = "cpu,tpu,rocm" if _tpu_available() else "cpu,rocm"
    args = ["--model", str(path), "--backends", backends, "--prompt-len", str(L), "--output-len", str(N),
            "--batch", str(B), "--repeats", "2", "--warmup", "1", "--quiet",
            "--json", str(out / "out.json"), "--plot", str(out / "out.png")]
    result = CliRunner().invoke(compare, args)
    return result, out


def test_cli_run_writes_schema_conforming_json(cli_run):
    result, out = cli_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    doc = json.loads((out / "out.json").read_text())
    validate_document(doc)
    names = [b["name"] for b in doc["backends"]]
    assert names[0] == "cpu" and "rocm" in names
    rocm = next(b for b in doc["backends"] if b["name"] == "rocm")
    if not rocm["available"]:  # listed with its reason, not an error
        assert "rocm" in result.output and rocm["reason"]
    assert doc["ok"] is True
    assert doc["command"].startswith("mojollm compare --model")
    png = (out / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for word in ("decode tok/s", "correctness against cpu", "cpu"):
        assert word in result.output


def test_derived_numbers_follow_from_raw_ones(cli_run, tiny):
    from safetensors.numpy import load_file

    _, out = cli_run
    path, hf = tiny
    doc = json.loads((out / "out.json").read_text())
    cfg = hf.config
    tensors = load_file(str(path / "model.safetensors"))
    # untied embeddings: a decode step reads only B rows of the table, which the roofline omits
    weight_bytes = sum(t.nbytes for name, t in tensors.items() if name != "model.embed_tokens.weight")
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert doc["model"]["weight_bytes"] == weight_bytes
    assert doc["model"]["kv_bytes_per_token"] == kv_per_token
    bytes_per_token = weight_bytes / B + kv_per_token * (L + N / 2)
    for b in (x for x in doc["backends"] if x["available"]):
        assert b["prefill_tokens_per_s"] == pytest.approx(B * L / b["ttft_s"], rel=1e-9)
        assert 0 < b["itl_p50_s"] <= b["itl_p99_s"]
        assert b["decode_tokens_per_s"] > 0 and b["load_s"] > 0
        # decode tok/s over ITL: a step emits B tokens; medians of sums vs percentiles of steps
        assert B / b["itl_p99_s"] <= b["decode_tokens_per_s"] * 1.0001
        roof, gbs = b["roofline"], b["bandwidth"]["gbs"]
        assert roof["bytes_per_token"] == pytest.approx(bytes_per_token, rel=1e-12)
        assert 0.1 < gbs < 10_000  # a measured host/device bandwidth, GB/s
        achieved = b["decode_tokens_per_s"] * bytes_per_token / 1e9
        assert roof["achieved_gbs"] == pytest.approx(achieved, rel=1e-9)
        assert roof["fraction"] == pytest.approx(achieved / gbs, rel=1e-9)
        assert roof["roofline_tokens_per_s"] == pytest.approx(gbs * 1e9 / bytes_per_token, rel=1e-9)
        assert b["peak_memory"]["peak_bytes"] > 0
        assert b["energy"]["tokens"] == 2 * B * N
        if b["energy"]["joules"] is not None:
            assert b["energy"]["joules_per_token"] == pytest.approx(b["energy"]["joules"] / (2 * B * N))
        toks = np.array(b["greedy_tokens"])
        assert toks.shape == (B, N) and toks.min() >= 0 and toks.max() < cfg.vocab_size
        # the engine ran the plan the roofline assumes: one prefill step, then one step per token
        assert b["engine"]["steps_per_run"] == N and "warnings" not in b
        assert 0 < b["engine"]["forward_fraction"] <= 1
        if not b["check"]["is_reference"]:  # tpu on XLA:CPU: float32 everywhere, so tight
            assert b["check"]["ok"] and b["check"]["logprob_rel_diff"] < 1e-3


def test_cpu_greedy_tokens_match_transformers(cli_run, tiny):
    """LLM.generate's greedy tokens for the batch are HF's greedy continuation."""
    import torch

    _, out = cli_run
    _, hf = tiny
    doc = json.loads((out / "out.json").read_text())
    prompts = np.array(doc["prompt_tokens"])
    assert prompts.shape == (B, L)
    assert len({tuple(p) for p in prompts}) == B  # the sequences of the batch differ
    cpu = next(b for b in doc["backends"] if b["name"] == "cpu")
    tokens = np.array(cpu["greedy_tokens"])
    with torch.no_grad():
        logits = hf(torch.tensor(np.concatenate([prompts, tokens], axis=1))).logits.double().numpy()
    for s in range(B):
        for j in range(N):
            row = logits[s, L - 1 + j]
            top2 = np.sort(row)[-2:]
            if top2[1] - top2[0] < 1e-3 * np.abs(row).max():
                break  # a genuine tie: float32 kernels may pick either; the rest follows another path
            assert tokens[s, j] == row.argmax(), f"sequence {s} token {j}"


def test_plot_without_matplotlib_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = CliRunner().invoke(compare, ["--model", str(tiny[0]), "--backends", "cpu", "--plot",
                                          str(tmp_path / "x.png")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mojollm[bench]" in lines[0], result.output
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# speculative decoding


SPEC = {"steps": int, "proposed": int, "accepted": int, "method": str, "num_tokens": int,
        "acceptance_rate": OPT_NUM, "mean_accepted_length": OPT_NUM}


def test_speculative_run_reports_acceptance_per_backend(tiny, cli_run, extra_backends):
    """Every backend (the reference too) runs with the same speculative config; each reports its
    drafts and acceptance over the timed runs, and greedy decoding yields the same tokens as
    without speculation."""
    path, _ = tiny
    config = CompareConfig(model=str(path), backends=["cpu", "cpu_copy"], prompt_len=L, output_len=N, batch=B,
                           reference="cpu", repeats=1, warmup=0, speculative={"method": "self", "num_tokens": 3})
    doc = run_compare(config)
    validate_document(doc)
    assert doc["ok"] is True and doc["config"]["speculative"] == {"method": "self", "num_tokens": 3}
    plain = json.loads((cli_run[1] / "out.json").read_text())
    plain_cpu = next(b for b in plain["backends"] if b["name"] == "cpu")
    assert "speculative" not in plain_cpu and not plain["config"]["speculative"]
    for b in doc["backends"]:
        spec = b["speculative"]
        _conforms(spec, SPEC, b["name"] + ".speculative")
        assert spec["method"] == "self" and spec["num_tokens"] == 3
        # the first steps of a fresh engine always draft (their cost is not measured yet)
        assert spec["steps"] >= 1 and spec["steps"] <= spec["proposed"] <= 3 * spec["steps"]
        assert 0 <= spec["accepted"] <= spec["proposed"]
        assert spec["acceptance_rate"] == pytest.approx(spec["accepted"] / spec["proposed"])
        assert spec["mean_accepted_length"] == pytest.approx((spec["accepted"] + spec["steps"]) / spec["steps"])
        assert 1 <= spec["mean_accepted_length"] <= 4
        assert b["engine"]["steps_per_run"] <= N and "warnings" not in b
        assert b["greedy_tokens"] == plain_cpu["greedy_tokens"]  # speculation keeps the greedy tokens

    from rich.console import Console

    from mojollm.compare import markdown_table, print_table

    console = Console(record=True, width=250)
    print_table(doc, console)
    text = console.export_text()
    assert "spec accepted" in text and "tok/step" in text and "speculative self" in text
    cpu = doc["backends"][0]["speculative"]
    assert f"{cpu['acceptance_rate']:.1%} of {cpu['proposed']}" in text
    assert f"{cpu['mean_accepted_length']:.2f}" in text
    md = markdown_table(doc)
    assert "| spec accepted | tok/step |" in md
    # a run without speculation keeps its table
    assert "spec accepted" not in markdown_table(plain)


def test_cli_speculative_options(tiny, tmp_path):
    out = tmp_path / "o.json"
    result = CliRunner().invoke(compare, ["--model", str(tiny[0]), "--backends", "cpu", "--prompt-len", "5",
                                          "--output-len", "4", "--repeats", "1", "--warmup", "0", "--quiet",
                                          "--speculative", "ngram", "--num-speculative-tokens", "2",
                                          "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    doc = json.loads(out.read_text())
    assert doc["config"]["speculative"] == {"method": "ngram", "num_tokens": 2}
    assert "--speculative ngram --num-speculative-tokens 2" in doc["command"]
    spec = doc["backends"][0]["speculative"]
    _conforms(spec, SPEC, "cpu.speculative")
    assert spec["method"] == "ngram" and 0 <= spec["accepted"] <= spec["proposed"] <= 2 * spec["steps"]
    assert "spec accepted" in result.output
    for args, fragment in ((["--speculative", "draft"], "--draft-model"),
                           (["--num-speculative-tokens", "3"], "needs --speculative"),
                           (["--speculative", "ngram", "--draft-layers", "1"], "--draft-layers")):
        result = CliRunner().invoke(compare, ["--model", str(tiny[0]), "--backends", "cpu", *args])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output


# ---------------------------------------------------------------------------------------------
# the cross-check


def test_perturbed_backend_is_flagged_and_a_faithful_one_passes(tiny, extra_backends, tmp_path):
    path, _ = tiny
    config = CompareConfig(model=str(path), backends=["cpu_copy", "noisy_cpu"], prompt_len=L, output_len=N,
                           batch=B, reference="cpu", repeats=1, warmup=0)
    doc = run_compare(config)
    validate_document(doc)
    by = {b["name"]: b for b in doc["backends"]}
    assert list(by) == ["cpu", "cpu_copy", "noisy_cpu"]  # the reference is added and runs first
    assert by["cpu_copy"]["ok"] is True and by["cpu_copy"]["check"]["logprob_rel_diff"] < 1e-6
    assert by["cpu_copy"]["greedy_tokens"] == by["cpu"]["greedy_tokens"]
    noisy = by["noisy_cpu"]
    assert noisy["ok"] is False and noisy["check"]["ok"] is False
    assert noisy["check"]["logprob_rel_diff"] > config.thresholds.logprob_rel_tol
    assert any("log-probs differ" in p for p in noisy["check"]["problems"])
    assert doc["ok"] is False

    from rich.console import Console

    from mojollm.compare import markdown_table, print_table

    console = Console(record=True, width=200, force_terminal=True)
    print_table(doc, console)
    text = console.export_text(styles=True)
    assert "FAILED" in text and "log-probs differ" in text
    assert "\x1b[1;31m" in text  # bold red rows and problem lines
    assert "**noisy_cpu**" in markdown_table(doc)


def test_cli_exits_nonzero_when_a_backend_disagrees(tiny, extra_backends, tmp_path):
    result = CliRunner().invoke(compare, ["--model", str(tiny[0]), "--backends", "noisy_cpu", "--prompt-len", "5",
                                          "--output-len", "3", "--repeats", "1", "--warmup", "0", "--quiet",
                                          "--json", str(tmp_path / "o.json")])
    assert result.exit_code == 1 and "noisy_cpu" in result.output.splitlines()[-1]
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["ok"] is False and doc["backends"][1]["ok"] is False


def _data(greedy, scores, tops, path=None):
    """CheckData of one sequence: greedy tokens, teacher-forced scores, the log-prob run's tokens
    (default: the greedy ones) and its top-K per position."""
    return CheckData(np.array([greedy]), np.array([scores], dtype=np.float64), np.array([path or greedy]),
                     [[dict(t) for t in tops]])


def test_cross_check_hand_cases():
    th = Thresholds(logprob_rel_tol=0.02)  # scale max |ref log p| = 10: near-tie margin 2 * min(error, 0.2)
    scores = [-10.0, -0.5, -1.0]  # a 2-token prompt + 2 greedy tokens: 3 scored tokens
    # after the prompt the reference prefers token 1 by 0.3 over 0; after prompt + 1, token 2 by 5
    tops = [[(1, -0.5), (0, -0.8), (2, -3.0)], [(2, -0.1), (0, -5.1), (1, -6.0)]]
    ref = _data([1, 2], scores, tops)
    same = cross_check(ref, _data([1, 2], scores, tops), th)
    assert same["ok"] and same["logprob_max_abs_diff"] == 0 and same["greedy_match_len"] == [2]
    assert same["greedy_compared"] == 2 and same["near_tie_margin"] == 0  # identical: nothing explains a flip

    # log-probs off by <= 0.18 flip the first token: the reference's margin 0.3 <= 2 * 0.18 explains it
    # (the second position is not compared: the two runs followed different tokens)
    near = _data([0, 2], [-10.0, -0.65, -1.0], [[(0, -0.62), (1, -0.65), (2, -3.0)], [(5, -0.01)]])
    r = cross_check(ref, near, th)
    assert r["ok"], r["problems"]
    assert r["logprob_max_abs_diff"] == pytest.approx(0.18) and r["near_tie_margin"] == pytest.approx(0.36)
    assert r["greedy_match_len"] == [0]

    # the second token flipped although the reference prefers token 2 by 5, and the log-probs are
    # beyond the tolerance (the top-K after the shared first token, and the scores)
    bad = _data([1, 0], [-10.0, -0.5, -6.0], [tops[0], [(0, -0.2), (2, -2.0), (1, -6.0)]])
    r = cross_check(ref, bad, th)
    assert not r["ok"] and r["logprob_max_abs_diff"] == pytest.approx(5.0)
    assert r["logprob_rel_diff"] == pytest.approx(0.5)
    assert any("log-probs differ" in p for p in r["problems"])
    assert any("greedy sequence 0 diverges at token 1" in p for p in r["problems"])

    # log-probs identical, but the timed (decode) path picked a token the reference rejects by 5:
    # a broken decode kernel or device sampler is caught by the greedy check
    r = cross_check(ref, _data([1, 0], scores, tops, path=[1, 2]), th)
    assert not r["ok"] and any("diverges at token 1" in p for p in r["problems"])

    # a token outside the reference's top-K: no margin can explain it
    r = cross_check(ref, _data([7, 2], scores, tops, path=[1, 2]), th)
    assert not r["ok"] and any("diverges at token 0 (reference margin inf" in p for p in r["problems"])

    # the reference's log-prob run followed other tokens than its timed runs: no margin to look up
    wobbly = _data([1, 2], scores, tops, path=[0, 2])
    assert not cross_check(wobbly, _data([0, 2], scores, tops, path=[0, 2]), th)["ok"]

    assert not cross_check(ref, _data([1, 2], [np.nan, -0.5, -1.0], tops), th)["ok"]


# ---------------------------------------------------------------------------------------------
# measurement arithmetic


def test_roofline_hand_computed():
    # 1000 weight bytes, 10 KV bytes per position, prompt 4, 3 tokens, batch 2.
    # Decode steps j = 1, 2 attend over 5 and 6 positions: bytes = (1000 + 2*10*5) + (1000 + 2*10*6)
    # = 2220 for 4 tokens -> 555 bytes per token.
    assert measure.decode_bytes_per_token(1000, 10, 4, 3, 2) == pytest.approx(555.0)
    # 100 tok/s at 555 B/token = 55.5 kB/s against 1e-3 GB/s = 1 MB/s -> 5.55 %, roofline 1801.8 tok/s
    r = measure.roofline_fraction(100.0, 555.0, 1e-3)
    assert r["achieved_gbs"] == pytest.approx(5.55e-5)
    assert r["fraction"] == pytest.approx(0.0555)
    assert r["roofline_tokens_per_s"] == pytest.approx(1e6 / 555)
    assert measure.roofline_fraction(100.0, 555.0, None)["fraction"] is None
    with pytest.raises(ValueError):
        measure.decode_bytes_per_token(1000, 10, 4, 1, 2)


def test_time_repeats_excludes_warmup_and_percentiles():
    calls = []
    t = measure.time_repeats(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.samples) == 5 and t.warmup == 2
    vals = list(range(1, 101))  # linear interpolation: p50 = 50.5, p99 at index 98.01 -> 99.01
    assert measure.percentile(vals, 50) == pytest.approx(50.5)
    assert measure.percentile(vals, 99) == pytest.approx(99.01)
    assert measure.percentile([], 50) is None
    # 100 W held for 2 s, sampled at 0.5 and 1.5 s -> 200 J (edges held flat)
    assert measure._integrate_power([(0.5, 100.0), (1.5, 100.0)], 0.0, 2.0) == pytest.approx(200.0)
    # a ramp 0 -> 100 W over 1 s sampled at both ends -> 50 J
    assert measure._integrate_power([(0.0, 0.0), (1.0, 100.0)], 0.0, 1.0) == pytest.approx(50.0)


def test_cpu_bandwidth_is_plausible_and_reset_peak_memory_sees_an_allocation():
    gbs, how = measure.device_bandwidth(registry.get_backend("cpu"))  # measured once per process
    assert 0.5 < gbs < 2000 and how.startswith("Host memory read bandwidth")

    class Broken:
        name = "broken"

        def memory_bandwidth_gbs(self):
            raise RuntimeError("no device")

    assert measure.device_bandwidth(Broken()) == (None, "measurement failed: RuntimeError: no device")
    with measure.PeakMemory("cpu") as pm:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
        del block
    assert pm.kind.startswith("host_rss_hwm")
    if pm.kind == "host_rss_hwm":  # the mark was reset, so it includes the 64 MiB but not much more
        assert pm.peak_bytes >= 64 * 2**20


# ---------------------------------------------------------------------------------------------
# bench/report.py


def test_report_updates_only_its_section(cli_run, tmp_path):
    _, out = cli_run
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Kernels\n\nkeep me\n\n## Backend comparison (CPU machine)\n\nold\n")
    report.main([str(out / "out.json"), "--plots-dir", str(tmp_path / "plots"), "--update", str(md),
                 "--section", "## Backend comparison (CPU machine)"])
    text = md.read_text()
    assert "keep me" in text and "\nold\n" not in text
    section = text.split("## Backend comparison (CPU machine)")[1]
    assert "| cpu |" in section and "Command: `mojollm compare" in section
    assert "![out](plots/out.png)" in section and (tmp_path / "plots" / "out.png").is_file()
    doc = measure.bench_document("e2e", {"n": 1}, [{"backend": "cpu", "tok_s": 12.5, "ok": False}], command="x")
    assert doc["kind"] == "mojollm.bench.e2e" and doc["ok"] is False
    assert "**FAILED**" in report.render(doc, Path("e2e.json"), None, None)
    with pytest.raises(ValueError):
        measure.bench_document("e2e", {}, [{"nested": {"a": 1}}])
