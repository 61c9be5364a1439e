"""Regression tests for the adversarial pass of issue 11 (engine, LLM API, CLI): each failed before
its fix. Loader and kernel-module cases live in test_loader_hardening.py / test_kernel_modules.py.

References: unchunked prefill for chunked prefill; the fake model's pure logits function
(reference_greedy) for threaded and batched use; exact block accounting for leaks.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fake_model import FakeModel, reference_greedy
from mojollm.errors import BackendUnavailable, RequestFailed
from mojollm.llm import LLM
from mojollm.sampling_params import SamplingParams


def no_leaks(llm: LLM) -> None:
    """Nothing queued, nothing held: every KV block is back in the pool."""
    eng = llm.engine
    assert not eng.has_unfinished() and not llm._latest
    assert eng.block_manager.num_free_blocks == eng.num_blocks
    assert eng.scheduler.num_unfinished == 0


# ---------------------------------------------------------------- 1. chunked prefill (real kernels)

@pytest.fixture(scope="module")
def long_context_model(make_hf_model):
    path, _ = make_hf_model("llama", seed=11, max_position_embeddings=8192)
    return path


LENGTHS = [1, 511, 512, 513, 1500, 5000]


def _first_token(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=5, ignore_eos=True)
    return llm.generate(prompts, params)


def test_prompts_longer_than_the_token_budget_match_unchunked_prefill(long_context_model, cpu_backend):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, 300, size=n).tolist() for n in LENGTHS]
    # the reference: every prompt in one forward (budget above the longest prompt)
    whole = LLM(model=str(long_context_model), backend="cpu", max_num_batched_tokens=8192,
                enable_prefix_caching=False, kv_cache_memory="64MiB")
    ref = [_first_token(whole, [p])[0] for p in prompts]
    chunked = LLM(model=whole.model, max_num_batched_tokens=512, enable_prefix_caching=False,
                  kv_cache_memory="64MiB")
    alone = [_first_token(chunked, [p])[0] for p in prompts]
    batched = _first_token(chunked, prompts)
    for n, r, a, b in zip(LENGTHS, ref, alone, batched):
        for out in (a, b):
            assert out.error is None, (n, out.error)
            top_r, top_o = r.outputs[0].logprobs[0]["top"], out.outputs[0].logprobs[0]["top"]
            assert list(top_o) == list(top_r), n
            np.testing.assert_allclose(list(top_o.values()), list(top_r.values()), atol=2e-4, err_msg=str(n))
            assert out.token_ids == r.token_ids, n
    no_leaks(chunked)


def test_long_prompt_streams_and_chats(long_context_model, cpu_backend):
    llm = LLM(model=str(long_context_model), backend="cpu", kv_cache_memory="16MiB")
    text = "The quick brown fox jumps over the lazy dog. " * 80       # ~700+ tokens
    assert len(llm.tokenizer.encode(text)) > 2 * 512
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = llm.generate(text, params)[0]
    assert want.error is None and len(want.token_ids) == 6
    streamed = "".join(llm.stream(text, params))
    assert streamed == want.text
    chat = llm.chat([{"role": "user", "content": text}], params)
    assert chat.error is None and len(chat.token_ids) == 6
    no_leaks(llm)


# ---------------------------------------------------------------- 2. one backend rule for API and CLI

def test_llm_honours_mojollm_backend(monkeypatch):
    model = FakeModel()
    monkeypatch.setenv("MOJOLLM_BACKEND", "nosuch")
    with pytest.raises(BackendUnavailable, match="nosuch"):
        LLM(model="unused.gguf")                       # the environment picks the backend...
    with pytest.raises(Exception) as e:
        LLM(model="unused.gguf", backend="cpu")        # ...unless the caller names one
    assert not isinstance(e.value, BackendUnavailable)
    assert LLM(model=model).engine is not None          # a loaded model keeps its own backend


# ---------------------------------------------------------------- 3. input validation

def test_bytes_prompts_are_refused():
    llm = LLM(model=FakeModel(), block_size=4, num_blocks=64)
    for bad in (b"Hi", bytearray(b"Hi"), [b"Hi"]):
        with pytest.raises(ValueError, match="bytes|string"):
            llm.generate(bad)
    with pytest.raises(ValueError):
        llm.stream(b"Hi")
    no_leaks(llm)


def test_priority_list_must_match_the_prompts():
    llm = LLM(model=FakeModel(), block_size=4, num_blocks=64)
    with pytest.raises(ValueError, match="2 priorities for 3 prompts"):
        llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2), priority=[0, 1])
    no_leaks(llm)


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("n", 0), ("max_tokens", -1),
                                          ("top_p", 2.0), ("stop", [""]), ("seed", -3),
                                          ("stop_token_ids", [10**9])])
def test_sampling_params_mutated_after_construction_are_checked(field, value):
    model = FakeModel()
    llm = LLM(model=model, block_size=4, num_blocks=64)
    sp = SamplingParams(max_tokens=3)
    setattr(sp, field, value)
    with pytest.raises(ValueError):
        llm.generate("hi", sp)
    with pytest.raises(ValueError):
        llm.engine.add_request([3, 4], sp)
    no_leaks(llm)


def test_queued_request_keeps_the_params_it_was_given():
    model = FakeModel()
    llm = LLM(model=model, block_size=4, num_blocks=64)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    stream = llm.stream([5, 6, 7], sp)
    sp.max_tokens, sp.temperature = 1, float("nan")       # the caller reuses its object
    text = "".join(stream)
    assert stream.output.token_ids == reference_greedy(model, [5, 6, 7], 4)
    assert text == stream.output.text
    no_leaks(llm)


def test_invalid_unicode_prompts_are_one_line_errors():
    llm = LLM(model=FakeModel(), block_size=4, num_blocks=64)
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.generate("ab\udcffcd")
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.chat([{"role": "user", "content": "\ud800"}])
    with pytest.raises(ValueError, match="content"):
        llm.chat([{"role": "user", "content": None}])
    no_leaks(llm)


def _cli(*args, stdout=None, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "mojollm.cli", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=120)


def test_cli_with_stdout_closed_or_full_fails_loudly():
    # `>&-`: the interpreter starts with sys.stdout None and click would print nowhere
    res = subprocess.run(f"{sys.executable} -m mojollm.cli backends --json >&-", shell=True,
                         stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "error: standard output is closed"
    with open("/dev/full", "w") as full:
        res = _cli("backends", "--json", stdout=full)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_rejects_undecodable_prompt_before_loading_the_model():
    # The bytes arrive as lone surrogates (surrogateescape); MOJOLLM_BACKEND=nosuch proves the
    # check runs before the backend and model load.
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mojollm.cli", "generate", b"caf\xe9 \xff"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                         env={**__import__("os").environ, "MOJOLLM_BACKEND": "nosuch"})
    assert res.returncode == 2 and "lone surrogate" in res.stderr and "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 30


# ---------------------------------------------------------------- 4. beam search that cannot fit

def test_beams_that_cannot_fit_the_pool_fail_at_once():
    llm = LLM(model=FakeModel(max_position_embeddings=256), block_size=4, num_blocks=24)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="beam search .* needs up to"):
        llm.generate([5, 6, 7, 8, 9], SamplingParams(beam_width=6, max_tokens=60, ignore_eos=True))
    assert time.perf_counter() - t0 < 1
    no_leaks(llm)


def test_beams_that_fit_finish_beside_competing_requests():
    """The largest beam request the pool admits, with other requests competing for blocks: it
    finishes in a bounded number of steps (no livelock) and nothing leaks."""
    model = FakeModel(max_position_embeddings=256)
    llm = LLM(model=model, block_size=4, num_blocks=24)
    beams = SamplingParams(beam_width=4, max_tokens=14, ignore_eos=True)   # 2 + 4 * (4 + 1) = 22 blocks
    others = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] * 3
    outs = llm.generate([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]], [beams] + others, priority=[1, 0, 0, 0])
    assert all(o.error is None for o in outs)
    assert len(outs[0].outputs) == 1 and len(outs[0].outputs[0].token_ids) == 14
    for p, o in zip([[10, 11], [12, 13, 14], [15]], outs[1:]):
        assert o.token_ids == reference_greedy(model, p, 20)
    assert llm.engine.stats.steps < 400
    no_leaks(llm)


# ---------------------------------------------------------------- 7. several threads on one LLM

def test_threads_share_one_llm():
    model = FakeModel(max_position_embeddings=128)
    llm = LLM(model=model, block_size=4, num_blocks=128)
    rng = np.random.default_rng(3)
    jobs = [[rng.integers(3, 300, size=int(rng.integers(1, 30))).tolist() for _ in range(8)] for _ in range(4)]
    errors, results = [], {}

    def worker(k):
        try:
            for i, p in enumerate(jobs[k]):
                params = SamplingParams(temperature=0.0, max_tokens=int(3 + (i % 5)), ignore_eos=True)
                if i % 3 == 2:
                    stream = llm.stream(p, params)
                    "".join(stream)
                    results[k, i] = stream.output.token_ids
                else:
                    results[k, i] = llm.generate(p, params)[0].token_ids
        except Exception as e:  # noqa: BLE001 - reported below with the thread's name
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (k, i), toks in results.items():
        assert toks == reference_greedy(model, jobs[k][i], 3 + (i % 5)), (k, i)
    assert len(results) == 32
    no_leaks(llm)


# ---------------------------------------------------------------- 8. memory budget

def test_kv_budget_beyond_the_machine_is_refused_before_allocating(make_hf_model, cpu_backend):
    path, _ = make_hf_model("llama", seed=2)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="free on the cpu device"):
        LLM(model=str(path), backend="cpu", kv_cache_memory="64TiB")
    assert time.perf_counter() - t0 < 20


# ---------------------------------------------------------------- 9. leaks

def test_rejected_batch_queues_nothing():
    llm = LLM(model=FakeModel(), block_size=4, num_blocks=64)
    bad = SamplingParams()
    bad.top_k = -5
    with pytest.raises(ValueError, match="top_k"):
        llm.generate(["ab", "cd"], [SamplingParams(max_tokens=2), bad])
    no_leaks(llm)
    out = llm.generate("ef", SamplingParams(max_tokens=2))  # the next call sees only its own request
    assert len(out) == 1
    no_leaks(llm)


def test_dropped_streams_never_run():
    model = FakeModel()
    model.record = True
    llm = LLM(model=model, block_size=4, num_blocks=64)
    s = llm.stream([7, 7, 7, 7, 7, 7, 7, 7, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    del s
    gc.collect()
    llm.generate([5], SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(7 not in b.token_ids.tolist() for b in model.batches)
    no_leaks(llm)
    # left after a few deltas: aborted on the spot
    s = llm.stream([8, 9], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    it = iter(s)
    next(it)
    it.close()
    no_leaks(llm)


def test_failed_stream_raises_instead_of_ending_quietly():
    model = FakeModel()
    model.nan_token = 42
    llm = LLM(model=model, block_size=4, num_blocks=64)
    with pytest.raises(RequestFailed, match="NaN"):
        "".join(llm.stream([3, 42], SamplingParams(max_tokens=5)))
    no_leaks(llm)
