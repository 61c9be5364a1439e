"""Engine end to end on a deterministic fake model whose logits depend on the whole context read
back through the paged cache (tests/fake_model.py), plus the LLM API on top of it.

The reference for greedy output is decoding straight from the model's pure logits function, with
no engine and no cache; for seeded sampling it is the same request run alone.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fake_model import FakeModel, reference_greedy
from mojollm.engine.engine import Engine, parse_bytes
from mojollm.llm import LLM
from mojollm.sampling_params import SamplingParams


def prompts(n, seed=0, lo=1, hi=40, vocab=300, first=3):
    """Random prompts; first=259 gives whole-word tokens only (text with no split characters)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(first, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def run(engine, items):
    """items: [(prompt, params)] -> {index: RequestOutput}"""
    ids = [engine.add_request(p, sp) for p, sp in items]
    done = {o.request_id: o for o in engine.run_until_done()}
    return [done[i] for i in ids]


def engine_for(model, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 256)
    return Engine(model, **kw)


# ---------------------------------------------------------------- batch invariance

def test_greedy_matches_reference_alone_and_batched():
    model = FakeModel()
    ps = prompts(6, seed=1) + prompts(6, seed=13, first=259)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    batched = run(engine_for(model, max_num_batched_tokens=24, max_num_seqs=8), [(p, params) for p in ps])
    for p, out in zip(ps, batched):
        ref = reference_greedy(model, p, 10)
        assert out.token_ids == ref
        alone = run(engine_for(model), [(p, params)])[0]
        assert alone.token_ids == ref
        assert out.finish_reason in ("stop", "length")
        if min(p) >= 259:  # the prompt ends on a character boundary: text is the plain decode
            assert out.text == model.tokenizer.decode(out.token_ids)


def test_seeded_sampling_is_independent_of_batch_composition():
    model = FakeModel()
    ps = prompts(8, seed=2)
    sp = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=100 + i) for i in range(8)]
    alone = [run(engine_for(model), [(p, s)])[0].token_ids for p, s in zip(ps, sp)]
    batched = run(engine_for(model, max_num_batched_tokens=16, max_num_seqs=5), list(zip(ps, sp)))
    assert [o.token_ids for o in batched] == alone
    # another composition: reversed order, different chunking
    rev = run(engine_for(model, max_num_batched_tokens=7, block_size=2), list(zip(ps, sp))[::-1])
    assert [o.token_ids for o in rev][::-1] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_prefix_cache_hits_do_not_change_outputs():
    model = FakeModel()
    system = prompts(1, seed=3, lo=30, hi=31)[0]
    ps = [system + tail for tail in prompts(6, seed=4, lo=1, hi=9)]
    params = [SamplingParams(temperature=0.7, max_tokens=8, seed=i) for i in range(6)]
    cold = [run(engine_for(model, enable_prefix_caching=False), [(p, s)])[0] for p, s in zip(ps, params)]
    eng = engine_for(model)
    run(eng, [(ps[0], params[0])])                         # warms the cache with the system prompt
    warm = run(eng, list(zip(ps, params)))
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    assert all(o.metrics.num_cached_tokens >= 28 for o in warm)
    assert eng.block_manager.hit_rate > 0.5
    assert all(o.metrics.num_cached_tokens == 0 for o in cold)


def test_preemption_does_not_change_outputs():
    model = FakeModel()
    ps = prompts(6, seed=5, lo=5, hi=20)
    params = [SamplingParams(temperature=0.8, max_tokens=24, seed=i, ignore_eos=True) for i in range(6)]
    roomy = run(engine_for(model), list(zip(ps, params)))
    tight = engine_for(model, num_blocks=14, max_num_batched_tokens=32)   # 56 slots for ~6 x 36 tokens
    squeezed = run(tight, list(zip(ps, params)))
    assert tight.stats.preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert tight.block_manager.num_free_blocks == 14


def test_n_samples_share_the_prompt_and_are_reproducible():
    model = FakeModel()
    p = prompts(1, seed=6, lo=23, hi=24)[0]
    eng = engine_for(model)
    out = run(eng, [(p, SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=9, ignore_eos=True))])[0]
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert eng.stats.prefill_tokens <= len(p) + 3 * 4       # prompt once (+ at most B-1 rows per fork)
    again = run(engine_for(model, block_size=2), [(prompts(2, seed=60)[0], SamplingParams(max_tokens=3)),
                                                  (p, SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=9,
                                                                     ignore_eos=True))])[1]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = run(engine_for(model), [(p, SamplingParams(n=3, temperature=0, max_tokens=6))])[0]
    assert all(o.token_ids == reference_greedy(model, p, 6) for o in greedy.outputs)


# ---------------------------------------------------------------- stopping, text

def test_stop_strings_truncate_at_first_occurrence():
    model = FakeModel(vocab_size=300)
    p = [0] + [3 + ord(c) for c in "hello"]
    base = run(engine_for(model), [(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])[0]
    text = base.text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = text.index(stop)
    out = run(engine_for(model), [(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop=["zzzz-never", stop]))])[0]
    assert out.text == text[:cut]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.token_ids == base.token_ids[:len(out.token_ids)]


def test_stop_token_ids_and_eos():
    model = FakeModel(eos_bias=0.0)
    p = prompts(1, seed=7)[0]
    ref = reference_greedy(model, p, 40, eos=False)
    tok = ref[5]
    out = run(engine_for(model), [(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                     stop_token_ids=[tok]))])[0]
    assert out.token_ids == ref[:ref.index(tok) + 1]
    assert out.outputs[0].stop_reason == tok and out.finish_reason == "stop"
    eos_model = FakeModel(eos_bias=50.0)                     # EOS always wins
    out = run(engine_for(eos_model), [(p, SamplingParams(temperature=0, max_tokens=10))])[0]
    assert out.token_ids == [1] and out.finish_reason == "stop" and out.text == ""
    out = run(engine_for(eos_model), [(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))])[0]
    assert out.token_ids == [1, 1, 1] and out.finish_reason == "length"


def test_streamed_text_is_incremental_and_holds_back_stop_prefixes():
    model = FakeModel()
    llm = LLM(model=model, block_size=4, num_blocks=128)
    full = llm.generate([[0, 50, 60]], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))[0]
    stream = llm.stream([0, 50, 60], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, stop=["\x00\x00\x00"]))
    deltas = list(stream)
    assert "".join(deltas) == stream.output.text
    assert stream.output.token_ids == full.token_ids and len(deltas) > 3
    # two streams interleaved on one LLM each get all of their own text
    sa = iter(llm.stream([0, 90], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    sb_stream = llm.stream([0, 91], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    sb = iter(sb_stream)
    got_a = [next(sa)]
    got_b = list(sb)                                         # runs b to the end, stepping a along
    got_a += list(sa)
    assert "".join(got_b) == sb_stream.output.text
    assert "".join(got_a) == model.tokenizer.decode(reference_greedy(model, [0, 90], 12, eos=False))
    # an aborted stream frees its blocks
    s2 = llm.stream([0, 70, 80], SamplingParams(max_tokens=50, ignore_eos=True))
    it = iter(s2)
    next(it)
    it.close()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks and not llm.engine.has_unfinished()


def test_utf8_split_across_tokens_is_decoded_whole():
    model = FakeModel()
    eng = engine_for(model)
    rid = eng.add_request([0, 3 + 65], SamplingParams(max_tokens=1))
    req = eng.requests[rid]
    seq = req.seqs[0]
    deltas = []
    for b in "é€".encode():                                 # 2- and 3-byte characters, one byte a token
        seq.token_ids.append(b + 3)
        deltas.append(eng._detokenize(seq))
    assert deltas == ["", "é", "", "", "€"]


# ---------------------------------------------------------------- errors, aborts, limits

def test_abort_frees_blocks_and_others_continue():
    model = FakeModel()
    eng = engine_for(model, num_blocks=64)
    ps = prompts(3, seed=8, lo=10, hi=20)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)) for p in ps]
    for _ in range(3):
        eng.step()
    held = eng.num_blocks - eng.block_manager.num_free_blocks
    assert eng.abort(ids[1]) and not eng.abort("nope")
    assert eng.num_blocks - eng.block_manager.num_free_blocks < held
    done = {o.request_id: o for o in eng.run_until_done()}
    assert set(done) == {ids[0], ids[2]}
    assert done[ids[0]].token_ids == reference_greedy(model, ps[0], 15, eos=False)
    assert eng.block_manager.num_free_blocks == 64


def test_nan_logits_fail_only_that_request():
    model = FakeModel()
    model.nan_token = 299
    eng = engine_for(model)
    good, bad = prompts(1, seed=9)[0], prompts(1, seed=10)[0] + [299]
    outs = run(eng, [(good, SamplingParams(temperature=0, max_tokens=8)), (bad, SamplingParams(max_tokens=8))])
    assert outs[0].error is None and outs[0].token_ids == reference_greedy(model, good, 8)
    assert "NaN" in outs[1].error and outs[1].finish_reason == "error"
    assert eng.block_manager.num_free_blocks == eng.num_blocks
    # the failed request's blocks did not enter the prefix cache: a rerun recomputes them
    model.nan_token = None
    rerun = run(eng, [(bad, SamplingParams(temperature=0, max_tokens=4))])[0]
    assert rerun.error is None and rerun.token_ids == reference_greedy(model, bad, 4)


def test_postprocessing_exception_fails_only_that_request():
    model = FakeModel()
    eng = engine_for(model)
    real_decode = model.tokenizer.decode

    def decode(ids, skip_special_tokens=True):
        if 298 in list(ids):
            raise UnicodeError("tokenizer exploded")
        return real_decode(ids, skip_special_tokens)

    eng.tokenizer.decode = decode
    outs = run(eng, [([5, 6, 7], SamplingParams(temperature=0, max_tokens=6)),
                     ([298, 7], SamplingParams(temperature=0, max_tokens=6))])
    assert outs[0].error is None and len(outs[0].token_ids) >= 1
    assert "tokenizer exploded" in outs[1].error
    assert eng.block_manager.num_free_blocks == eng.num_blocks


def test_forward_failure_fails_the_batch_and_engine_recovers():
    model = FakeModel()
    model.raise_on_token = 297
    eng = engine_for(model)
    outs = run(eng, [([297, 5], SamplingParams(max_tokens=3)), ([5, 6], SamplingParams(max_tokens=3))])
    assert all("fake kernel failure" in o.error for o in outs)
    later = run(eng, [([5, 6], SamplingParams(temperature=0, max_tokens=3))])[0]
    assert later.error is None and later.token_ids == reference_greedy(model, [5, 6], 3)
    assert eng.block_manager.num_free_blocks == eng.num_blocks


def test_prompt_longer_than_context_is_an_error_for_that_request():
    model = FakeModel(max_position_embeddings=32)
    eng = engine_for(model)
    outs = run(eng, [(list(range(3, 40)), SamplingParams()), ([5, 6], SamplingParams(temperature=0, max_tokens=4))])
    assert "37 tokens" in outs[0].error and outs[1].error is None
    # generation stops at the context length
    out = run(eng, [(list(range(3, 30)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))])[0]
    assert len(out.token_ids) == 32 - 27 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([5, 300], SamplingParams())


def test_kv_pool_from_memory_budget_caps_context():
    model = FakeModel(max_position_embeddings=1000)
    eng = Engine(model, block_size=8, kv_cache_memory="4KiB")          # 16 bytes per slot -> 32 blocks
    assert eng.num_blocks == 4096 // (8 * 16) and eng.max_model_len == 256
    assert parse_bytes("1.5GiB") == 3 << 29 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")
    with pytest.raises(ValueError, match="smaller than one KV block"):
        Engine(model, block_size=8, kv_cache_memory=10)


# ---------------------------------------------------------------- metrics, logprobs

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.001
        return self.t


def test_metrics_ttft_and_inter_token_latencies():
    eng = engine_for(FakeModel(), clock=FakeClock())
    out = run(eng, [(prompts(1, seed=11)[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))])[0]
    m = out.metrics
    assert m.num_generated_tokens == 7 and len(m.inter_token_latencies) == 6
    assert 0 < m.queue_time < m.ttft < m.e2e_latency
    assert m.decode_tokens_per_s == pytest.approx(6 / (m.last_token_time - m.first_token_time))
    assert all(x > 0 for x in m.inter_token_latencies)


def test_arrival_time_counts_the_wait_before_the_engine_and_n_fits_the_batch():
    clock = FakeClock()
    eng = engine_for(FakeModel(), clock=clock, max_num_seqs=4)
    arrived = clock()  # a server took the request here, then queued it for the engine
    clock()
    rid = eng.add_request(prompts(1, seed=12)[0], SamplingParams(temperature=0, max_tokens=2), arrival_time=arrived)
    later = eng.add_request(prompts(1, seed=13)[0], SamplingParams(temperature=0, max_tokens=2))
    done = {o.request_id: o for o in eng.run_until_done()}
    assert done[rid].metrics.arrival_time == arrived < done[later].metrics.arrival_time
    assert done[rid].metrics.queue_time > done[later].metrics.queue_time
    with pytest.raises(ValueError, match="exceeds max_num_seqs"):
        eng.add_request([5, 6], SamplingParams(n=5))


def test_logprobs_match_reference_distribution():
    model = FakeModel()
    p = prompts(1, seed=12)[0]
    out = run(engine_for(model), [(p, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))])[0]
    ctx = list(p)
    total = 0.0
    for tok, entry in zip(out.token_ids, out.outputs[0].logprobs):
        z = model.reference_logits(ctx).astype(np.float64)
        lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        assert entry["logprob"] == pytest.approx(lp[tok], abs=1e-9)
        assert list(entry["top"]) == list(np.argsort(-lp, kind="stable")[:3])
        total += lp[tok]
        ctx.append(tok)
    assert out.outputs[0].cumulative_logprob == pytest.approx(total, abs=1e-9)


# ---------------------------------------------------------------- LLM API

def test_llm_score_and_perplexity_are_teacher_forced():
    model = FakeModel(max_position_embeddings=64)
    text = "The paged cache keeps blocks."
    ids = model.tokenizer.encode(text)
    ref = []
    for i in range(1, len(ids)):
        z = model.reference_logits(ids[:i]).astype(np.float64)
        ref.append(z[ids[i]] - (z.max() + np.log(np.exp(z - z.max()).sum())))
    for chunk in (512, 7):                                    # one step, and several chunks
        llm = LLM(model=model, block_size=4, num_blocks=64, max_num_batched_tokens=chunk)
        sc = llm.score(text)
        assert sc.token_ids == ids
        np.testing.assert_allclose(sc.logprobs, ref, rtol=1e-9, atol=1e-9)
    ppl = llm.perplexity(text)
    assert ppl["tokens"] == len(ids) - 1 and ppl["ppl"] == pytest.approx(np.exp(-np.mean(ref)))
    # text longer than the context: windows of 64 tokens, first token of each unscored
    long = "abcdefghij" * 13                                   # 131 tokens with BOS
    res = llm.perplexity(long)
    assert res["tokens"] == 131 - 3
    assert llm.perplexity(long, max_tokens=20)["tokens"] == 19
    with pytest.raises(ValueError):
        llm.score("x" * 100)


def test_llm_generate_chat_and_validation():
    model = FakeModel(max_position_embeddings=48)
    llm = LLM(model=model, block_size=4, num_blocks=64)
    outs = llm.generate(["ab", "cde"], SamplingParams(temperature=0, max_tokens=4))
    assert [o.prompt_token_ids for o in outs] == [model.tokenizer.encode("ab"), model.tokenizer.encode("cde")]
    assert outs[0].token_ids == reference_greedy(model, model.tokenizer.encode("ab"), 4)
    one = llm.generate([0, 70, 71], SamplingParams(temperature=0, max_tokens=2))
    assert len(one) == 1 and one[0].prompt_token_ids == [0, 70, 71]
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))
    templ = model.tokenizer.encode("<user>hi\n<assistant>", add_special_tokens=False)
    assert chat.prompt_token_ids == templ and chat.token_ids == reference_greedy(model, templ, 3)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="context holds 48"):
        llm.generate("x" * 60)
    assert llm.prompt_ids("ab") == model.tokenizer.encode("ab") and llm.prompt_ids([0, 70]) == [0, 70]
    for bad, match in (("", "empty"), ("x" * 60, "context holds 48"), ([0, 300], r"in \[0, 300\)")):
        with pytest.raises(ValueError, match=match):
            llm.prompt_ids(bad)
    assert llm.chat_template_ids([{"role": "user", "content": "x" * 60}]) == \
        model.tokenizer.encode("<user>" + "x" * 60 + "\n<assistant>", add_special_tokens=False)
    assert not llm.engine.has_unfinished()


def test_import_mojollm_is_light():
    code = ("import sys, mojollm; heavy = [m for m in ('numpy', 'torch', 'jax', 'mojollm.llm', 'rich') "
            "if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ---------------------------------------------------------------- a real (tiny, random-weight) model

def _hf_greedy_check(hf, prompt, tokens, rel_margin=1e-3):
    """`tokens` must be transformers' greedy continuation of `prompt`, except that after a position
    where transformers' own top-2 logits are within rel_margin of its logit range (a near tie that
    float32 rounding may break either way) nothing more is compared."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + tokens])).logits[0].double().numpy()
    scale = np.abs(logits).max()
    for i, t in enumerate(tokens):
        row = logits[len(ids) - 1 + i]
        best = int(np.argmax(row))
        if best != t:
            assert row[best] - row[t] <= rel_margin * scale, f"token {i}: {t} vs transformers' {best}"
            return i
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_llm_path(make_hf_model):
    path, hf = make_hf_model("llama", seed=3)
    return path, hf


def test_real_tiny_model_batching_prefix_cache_and_preemption(tiny_llm_path, cpu_backend):
    path, hf = tiny_llm_path
    llm = LLM(model=str(path), backend="cpu", block_size=4, num_blocks=200, max_num_batched_tokens=32)
    tok = llm.tokenizer
    texts = ["The quick brown fox", "Paged attention stores keys and values in fixed-size blocks of rows.",
             "def f", "A user asks a question and the assistant answers it politely, then", "Numbers like 12"]
    ids = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(texts, params)]
    alone = [llm.generate(t, params)[0].token_ids for t in texts]        # now with prefix-cache hits
    assert llm.engine.block_manager.num_hit_tokens > 0
    compared = 0
    agree = []                                                           # tokens checked per prompt
    for p, b, a in zip(ids, batched, alone):
        n = min(_hf_greedy_check(hf, p, b), _hf_greedy_check(hf, p, a))
        assert a[:n] == b[:n]
        agree.append(n)
        compared += n
    assert compared >= 0.7 * 12 * len(texts), "greedy tokens leave transformers' too early (not near ties?)"
    # seeded sampling: same tokens alone and batched on the real kernels
    sp = SamplingParams(temperature=0.8, max_tokens=8, seed=5, ignore_eos=True)
    one = llm.generate(texts[1], sp)[0].token_ids
    many = llm.generate(texts, [SamplingParams(temperature=0.8, max_tokens=8, seed=5 + i, ignore_eos=True)
                                for i in range(-1, 4)])
    assert many[1].token_ids == one
    # a small pool over the same model object (it replaces llm's KV cache: llm is done)
    tight = LLM(model=llm.model, num_blocks=12, block_size=4, max_num_batched_tokens=32)
    squeezed = [o.token_ids for o in tight.generate(texts, params)]
    assert tight.engine.stats.preemptions > 0
    compared = 0
    for p, s, b, nb in zip(ids, squeezed, batched, agree):
        n = min(_hf_greedy_check(hf, p, s), nb)
        assert s[:n] == b[:n]
        compared += n
    assert compared >= 0.7 * 12 * len(texts)


def test_real_tiny_model_score_matches_transformers(tiny_llm_path, cpu_backend):
    import torch

    path, hf = tiny_llm_path
    llm = LLM(model=str(path), backend="cpu", block_size=4, num_blocks=100, max_num_batched_tokens=16)
    text = "Paged attention stores keys and values in fixed-size blocks. The quick brown fox jumps."
    sc = llm.score(text)
    with torch.no_grad():
        logits = hf(torch.tensor([sc.token_ids])).logits[0].double()
    ref = torch.log_softmax(logits, dim=-1)[torch.arange(len(sc.token_ids) - 1), torch.tensor(sc.token_ids[1:])]
    # float32 kernels vs float32 torch over 2 layers: log-probs agree to ~1e-4 absolute
    np.testing.assert_allclose(sc.logprobs, ref.numpy(), atol=2e-3, rtol=1e-3)


def test_a_second_engine_on_one_model_object_stops_the_first_instead_of_sharing_its_cache():
    """The KV cache lives on the model object: a newer engine over the same object replaces it, so
    the older one refuses to step (a clear error) rather than decode from the newer one's cache."""
    model = FakeModel()
    params = SamplingParams(temperature=0.0, max_tokens=6)
    first = engine_for(model)
    second = engine_for(model)
    first.add_request([5, 6, 7], params)
    with pytest.raises(RuntimeError, match="newer LLM"):
        first.step()
    out = run(second, [([5, 6, 7], params)])[0]
    assert out.token_ids == reference_greedy(model, [5, 6, 7], 6)
