"""Speculative decoding (engine/speculative.py, Engine._verify, the scheduler's draft slots).

References, all independent of the code under test:
  - greedy output: the same model and engine settings without speculation (tiny random-weight HF
    Llama checkpoints, the default GGUF), or decoding straight from the fake model's pure logits
    function (tests/fake_model.py, whose paged cache stores (token, position) per slot);
  - sampling: the target's exact distribution over whole continuations, enumerated from its logits
    (the fake model's function, or the transformers model), against many seeded samples (chi-square);
  - accept_draft: the target distribution p itself, over many trials;
  - find_continuation: a brute-force Python search;
  - KV accounting: the block pool's reference counts against the live block tables, and the cached
    blocks' contents read back from the fake model's cache.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import shutil
from collections import Counter

import numpy as np
import pytest
from scipy import stats as sps

from fake_model import FakeModel, reference_greedy
from mojollm.engine.engine import Engine
from mojollm.engine.speculative import SpeculativeConfig, accept_draft, find_continuation
from mojollm.llm import LLM
from mojollm.sampling_params import SamplingParams

ALPHA = 1e-3  # significance of every chi-square test (seeded: a passing test passes every time)


# ---------------------------------------------------------------- helpers

def chi2_pvalue(observed: Counter, expected_probs: dict, n: int) -> float:
    """Chi-square goodness of fit of `observed` counts to `expected_probs` (cells with expected
    count < 5 pooled into one). Any observation outside the support fails outright."""
    outside = {c: k for c, k in observed.items() if expected_probs.get(c, 0.0) <= 0.0}
    assert not outside, f"samples outside the target's support: {outside}"
    cells = sorted(expected_probs, key=lambda c: -expected_probs[c])
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for c in cells:
        e = expected_probs[c] * n
        if e >= 5:
            obs.append(observed.get(c, 0))
            exp.append(e)
        else:
            pool_o += observed.get(c, 0)
            pool_e += e
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    exp = np.asarray(exp) * (sum(obs) / sum(exp))  # exact renormalisation (pooled rounding)
    assert len(obs) >= 3, "too few cells for a meaningful test"
    return float(sps.chisquare(obs, exp).pvalue)


def filtered_probs(z: np.ndarray, temperature: float, top_k: int) -> dict[int, float]:
    """The reference's own top-k filter: the k largest logits / T, renormalised."""
    z = np.asarray(z, np.float64) / temperature
    top = np.argsort(-z, kind="stable")[:top_k] if top_k else np.arange(z.shape[0])
    w = np.exp(z[top] - z[top].max())
    return {int(t): float(x) for t, x in zip(top, w / w.sum())}


def exact_continuations(logits_fn, prompt: list[int], depth: int, temperature: float, top_k: int) -> dict:
    """P(t1..t_depth | prompt) for every continuation, enumerated from the target's logits."""
    out = {}

    def walk(ctx, probs_so_far, prefix):
        if len(prefix) == depth:
            out[tuple(prefix)] = probs_so_far
            return
        for t, p in filtered_probs(logits_fn(ctx), temperature, top_k).items():
            walk(ctx + [t], probs_so_far * p, prefix + [t])

    walk(list(prompt), 1.0, [])
    return out


def top_k_margin(logits_fn, prompt, depth, top_k) -> float:
    """Smallest gap between the k-th and (k+1)-th logit over the enumerated contexts."""
    worst = np.inf

    def walk(ctx, d):
        nonlocal worst
        z = np.sort(np.asarray(logits_fn(ctx), np.float64))[::-1]
        worst = min(worst, z[top_k - 1] - z[top_k])
        if d + 1 < depth:
            for t in np.argsort(-np.asarray(logits_fn(ctx)))[:top_k]:
                walk(ctx + [int(t)], d + 1)

    walk(list(prompt), 0)
    return worst


def eager(spec: dict) -> dict:
    """`spec` made to speculate at every decode step whatever it measures (the engine's adaptive
    switch-off weighs acceptance and timings, which would make the tests' draft counts depend on
    the machine's load): it only changes when, never what, a request emits."""
    fields = SpeculativeConfig.__dataclass_fields__
    if "min_gain" in fields:
        spec.setdefault("min_gain", 1e-9)
    if "min_acceptance" in fields:
        spec.setdefault("min_acceptance", 0.0)
    spec.setdefault("max_batch", 64)
    return spec


def run_engine(engine, items):
    """items: [(prompt, params)] -> RequestOutputs in order."""
    ids = [engine.add_request(p, sp) for p, sp in items]
    done = {o.request_id: o for o in engine.run_until_done()}
    return [done[i] for i in ids]


class NoisyDraft(FakeModel):
    """A draft for FakeModel(seed=target_seed): the target's logits plus independent noise, so it
    agrees with the target often but not always (and its top-k set sometimes differs)."""

    def __init__(self, target_seed: int, noise: float, **kw):
        super().__init__(seed=target_seed + 1000, **kw)
        self.base = FakeModel(seed=target_seed, **kw)  # its pure logits function only
        self.noise = noise

    def reference_logits(self, tokens):
        return self.base.reference_logits(tokens) + self.noise * super().reference_logits(tokens)


class StubProposer:
    """Proposes the target's own greedy continuation, corrupted at a random draft index (or not
    at all), so accept/reject patterns are random but known: for a greedy request the engine must
    accept exactly the drafts before the corruption. Point-mass drafts, like ngram."""

    needs_slots = False

    def __init__(self, model: FakeModel, seed: int):
        self.model = model
        self.rng = np.random.default_rng(seed)
        self.expected: dict[str, list[tuple[int, int]]] = {}  # request id -> [(proposed, accepted if greedy)]
        self.released: list[int] = []

    def lookahead(self, seq, k):
        ctx = list(seq.token_ids)
        drafts = []
        for _ in range(k):
            t = int(np.argmax(self.model.reference_logits(ctx)))
            drafts.append(t)
            ctx.append(t)
        bad = int(self.rng.integers(0, k + 1))  # k: every draft is right
        if bad < k:
            drafts[bad] = (drafts[bad] + 1 + int(self.rng.integers(self.model.config.vocab_size - 1))) \
                % self.model.config.vocab_size
        seq.spec.drafts = drafts
        seq.spec.draft_probs = None
        return k

    def propose(self, scheduled):
        for seq, k in scheduled:
            del seq.spec.drafts[k:]
            ctx, ok = list(seq.token_ids), 0
            for d in seq.spec.drafts:
                if d != int(np.argmax(self.model.reference_logits(ctx))):
                    break
                ok += 1
                ctx.append(d)
            self.expected.setdefault(seq.request.request_id, []).append((len(seq.spec.drafts), ok))

    def release(self, seq):
        self.released.append(seq.seq_id)


def install(engine, proposer):
    engine.proposer = proposer
    engine.scheduler.on_release = proposer.release
    return proposer


# ---------------------------------------------------------------- tiny real checkpoints

@pytest.fixture(scope="module")
def tiny(make_hf_model):
    """4 layers (so 'self' drafts with 2), 256 positions."""
    return make_hf_model("llama", seed=3, num_hidden_layers=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_drafts(tiny, make_hf_model, tmp_path_factory):
    """Draft checkpoints with the target's vocabulary: a perturbed copy of the target (agrees
    often, not always), and an unrelated random checkpoint (agrees almost never)."""
    import torch

    path, model = tiny
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    out = tmp_path_factory.mktemp("hf-noisy-draft")
    noisy.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / f, out / f)
    other, _ = make_hf_model("llama", seed=11, max_position_embeddings=256)
    return {"noisy": str(out), "other": str(other)}


def _lossless_cases(vocab: int):
    """Prompts of odd sizes (random, and repetitive so ngram matches) with varied parameters."""
    rng = np.random.default_rng(2024)
    motif = rng.integers(3, vocab, size=7).tolist()
    prompts = [
        rng.integers(3, vocab, size=1).tolist(),
        rng.integers(3, vocab, size=5).tolist(),
        rng.integers(3, vocab, size=17).tolist(),
        rng.integers(3, vocab, size=33).tolist(),
        motif * 5 + rng.integers(3, vocab, size=3).tolist(),
        rng.integers(3, vocab, size=3).tolist() * 9,
        (motif[:4] + rng.integers(3, vocab, size=2).tolist()) * 8 + motif[:3],
        rng.integers(3, vocab, size=11).tolist() * 3,
        rng.integers(3, vocab, size=23).tolist(),
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=37),
        SamplingParams(temperature=0, max_tokens=23),
        SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3),   # penalties see accepted drafts
        SamplingParams(temperature=0, max_tokens=9),
        SamplingParams(temperature=0, max_tokens=45, logprobs=2),
        SamplingParams(temperature=0, max_tokens=31, num_speculative_tokens=1),
        SamplingParams(temperature=0, max_tokens=44, num_speculative_tokens=0),  # this one never speculates
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=29, num_speculative_tokens=3),
    ]
    return prompts, params


@pytest.fixture(scope="module")
def lossless_reference(tiny):
    """Greedy outputs without speculation, each prompt alone; plus a stop token taken from one
    output (the stop case is then run by both sides)."""
    path, _ = tiny
    prompts, params = _lossless_cases(_vocab(tiny))
    ref = LLM(str(path), backend="cpu", enable_prefix_caching=False, block_size=8, num_blocks=200)
    base = [ref.generate([p], dataclasses.replace(sp, num_speculative_tokens=None))[0]
            for p, sp in zip(prompts, params)]
    stop_tok = base[0].token_ids[12]
    params.append(SamplingParams(temperature=0, max_tokens=37, stop_token_ids=[stop_tok]))
    prompts.append(prompts[0])
    base.append(ref.generate([prompts[-1]], params[-1])[0])
    assert base[-1].finish_reason == "stop" and len(base[-1].token_ids) <= 13
    text = base[4].text  # a stop string inside the motif prompt's output (where ngram drafts pass)
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    params.append(SamplingParams(temperature=0, max_tokens=45, stop=[stop]))
    prompts.append(prompts[4])
    base.append(ref.generate([prompts[-1]], params[-1])[0])
    assert base[-1].finish_reason == "stop" and base[-1].outputs[0].stop_reason == stop
    return prompts, params, base


def _vocab(tiny) -> int:
    return int(tiny[1].config.vocab_size)


SPEC_CASES = {
    "ngram": lambda d: {"method": "ngram", "num_tokens": 4},
    "self": lambda d: {"method": "self", "num_tokens": 3},
    "self-skip": lambda d: {"method": "self", "num_tokens": 3, "draft_layers": [0, 2]},
    "draft-noisy": lambda d: {"method": "draft", "num_tokens": 4, "draft_model": d["noisy"]},
    "draft-other": lambda d: {"method": "draft", "num_tokens": 3, "draft_model": d["other"]},
}


def _same_output(got, want, what):
    assert got.token_ids == want.token_ids, what
    assert got.text == want.text, what
    assert got.finish_reason == want.finish_reason, what
    assert got.outputs[0].stop_reason == want.outputs[0].stop_reason, what
    if want.outputs[0].logprobs is not None:
        assert [e["token_id"] for e in got.outputs[0].logprobs] == want.token_ids
        np.testing.assert_allclose([e["logprob"] for e in got.outputs[0].logprobs],
                                   [e["logprob"] for e in want.outputs[0].logprobs], atol=2e-3, rtol=0)


# ---------------------------------------------------------------- 1. greedy is lossless

@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_greedy_speculation_is_lossless_alone_and_batched(tiny, tiny_drafts, lossless_reference, case):
    path, _ = tiny
    prompts, params, base = lossless_reference
    spec = eager(SPEC_CASES[case](tiny_drafts))
    llm = LLM(str(path), backend="cpu", enable_prefix_caching=False, block_size=8, num_blocks=200,
              max_num_batched_tokens=32, speculative=spec)   # chunked prefills run beside verify rows
    batched = llm.generate(prompts, params)
    s = llm.engine.stats
    per_request = [(o.metrics.num_spec_steps, o.metrics.num_spec_proposed, o.metrics.num_spec_accepted)
                   for o in batched]
    assert [sum(x) for x in zip(*per_request)] == [s.spec_steps, s.spec_proposed, s.spec_accepted]
    for i, (got, want) in enumerate(zip(batched, base)):
        _same_output(got, want, f"{case}: batched prompt {i}")
        if params[i].num_speculative_tokens == 0 or params[i].max_tokens == 1:
            assert got.metrics.num_spec_proposed == 0
        if params[i].num_speculative_tokens:
            assert got.metrics.num_spec_proposed <= params[i].num_speculative_tokens * got.metrics.num_spec_steps
    assert s.spec_proposed > 0
    if case != "draft-other":  # a related draft (or the prompt) gets drafts accepted ...
        assert s.spec_accepted > 0
    if case in ("self", "draft-noisy"):  # ... and rejected, so the rollback runs too
        assert s.spec_accepted < s.spec_proposed
    proposed_batched = s.spec_proposed
    for i, (p, sp) in enumerate(zip(prompts, params)):
        _same_output(llm.generate([p], sp)[0], base[i], f"{case}: prompt {i} alone")
    assert s.spec_proposed > proposed_batched
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_ngram_on_the_default_model_is_lossless(default_gguf, cpu_backend):
    from mojollm.models import load_model

    model = load_model(default_gguf, cpu_backend)
    rng = np.random.default_rng(5)
    words = ["red", "green", "blue", "cat", "dog", "sat", "on", "the", "mat", "log"]
    sentence = " ".join(rng.choice(words, size=9)) + "."
    text = " ".join([sentence] * 9)
    sp = SamplingParams(temperature=0, max_tokens=48)
    ref = LLM(model, enable_prefix_caching=False, kv_cache_memory="32MiB")
    ids = ref.tokenizer.encode(text)
    assert 80 <= len(ids) <= 140
    want = ref.generate([ids], sp)[0]
    llm = LLM(model, enable_prefix_caching=False, kv_cache_memory="32MiB",  # the model's cache is re-allocated
              speculative=eager({"method": "ngram", "num_tokens": 5}))
    got = llm.generate([ids], sp)[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    s = llm.engine.stats
    assert s.spec_proposed > 0 and s.spec_accepted > 0
    assert s.steps < ref.engine.stats.steps  # accepted drafts saved steps


# ---------------------------------------------------------------- 2. sampling keeps the distribution

def test_accept_draft_output_follows_the_target():
    rng = np.random.default_rng(0)
    V, N = 11, 30000
    # the target's filtered candidates: 7 of 11 tokens, with a dense draft living partly elsewhere
    p_ids = np.sort(rng.choice(V, size=7, replace=False))
    p = rng.dirichlet(np.full(7, 0.8))
    q = np.zeros(V)
    q_support = rng.choice(V, size=6, replace=False)
    q[q_support] = rng.dirichlet(np.full(6, 0.8))
    p_dense = np.zeros(V)
    p_dense[p_ids] = p
    want = {int(t): float(x) for t, x in zip(p_ids, p)}
    r = np.random.default_rng(1)
    out, acc = Counter(), 0
    for _ in range(N):
        d = int(r.choice(V, p=q))
        ok, tok = accept_draft(p_ids, p, d, q, r)
        assert not ok or tok == d
        acc += ok
        out[tok] += 1
    assert chi2_pvalue(out, want, N) > ALPHA
    # acceptance probability: sum_t min(p(t), q(t))
    assert sps.binomtest(acc, N, float(np.minimum(p_dense, q).sum())).pvalue > ALPHA

    # point-mass drafts (ngram, q=None): a likely token, an unlikely one, one outside the support
    for d in (int(p_ids[np.argmax(p)]), int(p_ids[np.argmin(p)]), int(np.setdiff1d(np.arange(V), p_ids)[0])):
        out, acc = Counter(), 0
        for _ in range(N // 3):
            ok, tok = accept_draft(p_ids, p, d, None, r)
            assert not ok or tok == d
            acc += ok
            out[tok] += 1
        assert chi2_pvalue(out, want, N // 3) > ALPHA
        assert sps.binomtest(acc, N // 3, float(p_dense[d])).pvalue > ALPHA


def _fake_sampling_engine(method, V, seed):
    target = FakeModel(vocab_size=V, scale=1.5, eos_bias=0.0, seed=seed)
    spec = eager({"method": method, "num_tokens": 3})
    draft = None
    if method == "draft":
        draft = NoisyDraft(seed, 0.6, vocab_size=V, scale=1.5, eos_bias=0.0)
        spec["draft_model"] = draft
    return Engine(target, block_size=4, num_blocks=1500, max_num_seqs=64, speculative=spec,
                  draft_model=draft), target


def ngram_first_step(logits_fn, prompt, temperature, top_k, k=2):
    """(P(the first verify step has an ngram draft), P(its first draft is accepted)), exact:
    the draft after t1 is what followed the latest earlier occurrence of the prompt's suffix."""
    covered = accepted = 0.0
    for t1, p1 in filtered_probs(logits_fn(prompt), temperature, top_k).items():
        drafts = brute_force_continuation(prompt + [t1], k, 1, 4)
        if drafts:
            covered += p1
            accepted += p1 * filtered_probs(logits_fn(prompt + [t1]), temperature, top_k).get(drafts[0], 0.0)
    return covered, accepted


def _assert_follows(got: Counter, want: dict, n: int) -> None:
    assert chi2_pvalue(got, want, n) > ALPHA
    for pos in range(1, len(next(iter(want)))):  # each later token alone, pooled over the others
        marg_got, marg_want = Counter(), Counter()
        for key, c in got.items():
            marg_got[key[pos]] += c
        for key, pr in want.items():
            marg_want[key[pos]] += pr
        assert chi2_pvalue(marg_got, dict(marg_want), n) > ALPHA, f"token {pos + 1}"


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_continuations_follow_the_target_fake_model(method):
    """Whole continuations t1..t4 (t1 from the prefill, then a verify step of up to 2 drafts, and
    its bonus token or another verify step) against the exact distribution, temperature 0.8 and
    top-k 3 (81 continuations)."""
    V, N, depth, T, K = 13, 4000, 4, 0.8, 3
    engine, target = _fake_sampling_engine(method, V, seed=77)
    rng = np.random.default_rng(3)
    for _ in range(200):  # every t1 occurs twice in the prompt; its ngram draft is accepted now and then
        prompt = rng.permutation(V).tolist() + rng.permutation(V).tolist() + [int(rng.integers(V))]
        covered, accepted = ngram_first_step(target.reference_logits, prompt, T, K)
        if 0.25 < accepted < 0.7:
            break
    else:
        pytest.fail("no prompt whose ngram drafts are sometimes accepted")
    assert covered == pytest.approx(1.0)
    want = exact_continuations(target.reference_logits, prompt, depth, T, K)
    outs = run_engine(engine, [(prompt, SamplingParams(temperature=T, top_k=K, max_tokens=depth,
                                                       ignore_eos=True, seed=i)) for i in range(N)])
    got = Counter(tuple(o.token_ids) for o in outs)
    s = engine.stats
    # every request speculated, and both outcomes of the rule were exercised often
    assert s.spec_steps >= N and 0.1 * s.spec_proposed < s.spec_accepted < 0.9 * s.spec_proposed
    _assert_follows(got, want, N)


@pytest.mark.parametrize("method", ["ngram", "self", "draft"])
def test_sampled_continuations_follow_the_target_tiny_model(tiny, tiny_drafts, method):
    """The same on a real (tiny) checkpoint, the reference distribution from transformers
    (temperature 1, top-k 3, t1..t4)."""
    import torch

    path, torch_model = tiny
    V, N, depth, T, K = _vocab(tiny), 2000, 4, 1.0, 3

    @torch.no_grad()
    def logits_fn(ctx):
        return torch_model(torch.tensor([ctx])).logits[0, -1].double().numpy()

    rng = np.random.default_rng(16)
    for _ in range(40):
        prompt = rng.integers(3, V, size=4).tolist()
        if method == "ngram":  # the model's own greedy text (it falls into loops): t1 often occurred before
            with torch.no_grad():
                prompt = torch_model.generate(torch.tensor([prompt]), max_new_tokens=int(rng.integers(16, 40)),
                                              do_sample=False)[0].tolist()
            covered, accepted = ngram_first_step(logits_fn, prompt, T, K)
            if covered < 0.3 or not 0.1 * covered < accepted < 0.9 * covered:
                continue
        if top_k_margin(logits_fn, prompt, depth, K) > 1e-3:  # kernel rounding cannot swap a top-3 set
            break
    else:
        pytest.fail("no suitable prompt")
    want = exact_continuations(logits_fn, prompt, depth, T, K)
    spec = {"ngram": {"method": "ngram", "num_tokens": 2},
            "self": {"method": "self", "num_tokens": 2},
            "draft": {"method": "draft", "num_tokens": 2, "draft_model": tiny_drafts["noisy"]}}[method]
    # two sequences at a time: their 2 x (1 + 2) verify rows stay within what the cpu runner verifies
    llm = LLM(str(path), backend="cpu", block_size=8, num_blocks=800, max_num_seqs=2, speculative=eager(spec))
    outs = llm.generate([prompt] * N, [SamplingParams(temperature=T, top_k=K, max_tokens=depth, ignore_eos=True,
                                                      seed=1000 + i) for i in range(N)])
    got = Counter(tuple(o.token_ids) for o in outs)
    s = llm.engine.stats
    assert s.spec_steps >= (0.2 if method == "ngram" else 1) * N
    assert 0.05 * s.spec_proposed < s.spec_accepted < 0.95 * s.spec_proposed
    _assert_follows(got, want, N)


# ---------------------------------------------------------------- 3. KV accounting

def _check_pool(engine, model: FakeModel):
    """Between steps: reference counts equal the live block tables' references; a running
    sequence holds exactly the blocks of its computed tokens; every block in the prefix cache
    holds, in the model's cache, exactly the tokens (and positions) it is keyed by."""
    bm, bs = engine.block_manager, engine.block_size
    live = engine.scheduler.running + engine.scheduler.waiting
    refs = Counter(b for s in live for b in s.block_table)
    assert [refs.get(b, 0) for b in range(bm.num_blocks)] == bm.ref_counts
    for s in engine.scheduler.running:
        assert len(s.block_table) == -(-s.num_computed_tokens // bs), s
    for b, (_, _, tokens) in bm._block_key.items():
        rows = model.cache[b * bs:(b + 1) * bs]
        assert rows[:, 0].tolist() == list(tokens), f"cached block {b} holds other tokens (a rejected draft?)"
        assert rows[0, 1] % bs == 0 and (np.diff(rows[:, 1]) == 1).all()
    drafter = engine.proposer
    if hasattr(drafter, "blocks"):  # a draft model's own pool
        dref = Counter(b for d in drafter._seqs.values() for b in d.block_table)
        assert [dref.get(b, 0) for b in range(drafter.blocks.num_blocks)] == drafter.blocks.ref_counts
        live_ids = {s.seq_id for s in engine.scheduler.running}
        assert set(drafter._seqs) <= live_ids


def _step_clock(seed: int):
    """A clock whose steps take seeded random times: the governor sizes drafts from measured step
    costs, so a wall clock would make the schedule (and which paths run) depend on the machine."""
    rng, now = np.random.default_rng(seed), [0.0]

    def clock():
        now[0] += float(rng.exponential(0.01))
        return now[0]

    return clock


@pytest.mark.parametrize("proposer", ["stub", "ngram", "draft"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kv_blocks_are_accounted_under_random_speculation(proposer, seed, clock_seed=0):
    V = 40
    model = FakeModel(vocab_size=V, eos_bias=-1.0, seed=31 + seed)
    spec = eager({"method": "ngram", "num_tokens": 4, "max_batch": 5})
    draft = None
    if proposer == "draft":
        draft = NoisyDraft(31 + seed, 0.5, vocab_size=V, eos_bias=-1.0)
        spec.update(method="draft", draft_model=draft)
    engine = Engine(model, block_size=4, num_blocks=22, max_num_batched_tokens=16, max_num_seqs=7,
                    speculative=spec, draft_model=draft, clock=_step_clock(clock_seed))
    stub = install(engine, StubProposer(model, seed)) if proposer == "stub" else None
    rng = np.random.default_rng(100 + seed)

    def random_request():
        n = int(rng.integers(1, 26))
        if rng.random() < 0.1:  # up against the context: drafts are cut to fit it
            n = engine.max_model_len - int(rng.integers(2, 7))
        prompt = (rng.integers(3, V, size=n) if rng.random() < 0.5
                  else np.resize(rng.integers(3, V, size=int(rng.integers(1, 5))), n)).tolist()
        kind = rng.random()
        if kind < 0.55:
            sp = SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 40)),
                                num_speculative_tokens=[None, None, 1, 2, 0][int(rng.integers(5))])
        elif kind < 0.85:
            sp = SamplingParams(temperature=float(rng.uniform(0.5, 1.2)), top_k=int(rng.integers(0, 6)),
                                max_tokens=int(rng.integers(1, 30)), seed=int(rng.integers(1 << 30)))
        else:
            sp = SamplingParams(n=2, temperature=0.9, max_tokens=int(rng.integers(1, 12)), seed=int(rng.integers(99)))
        return prompt, sp

    requests, aborted, done = {}, set(), {}
    pending = [random_request() for _ in range(40)]
    while pending or engine.has_unfinished():
        for _ in range(int(rng.integers(0, 3))):  # arrivals while others run
            if pending:
                p, sp = pending.pop()
                requests[engine.add_request(p, sp)] = (p, sp)
        if engine.requests and rng.random() < 0.08:  # an abort mid-way
            rid = list(engine.requests)[int(rng.integers(len(engine.requests)))]
            assert engine.abort(rid)
            aborted.add(rid)
        if not engine.has_unfinished():
            continue
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        _check_pool(engine, model)

    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
    if draft is not None:
        assert not engine.proposer._seqs
        assert engine.proposer.blocks.num_free_blocks == engine.num_blocks and not any(engine.proposer.blocks.ref_counts)
    s = engine.stats
    assert s.preemptions > 0 and aborted and s.spec_proposed > 0
    if proposer != "ngram":
        assert 0 < s.spec_accepted < s.spec_proposed
    assert set(done) == set(requests) - aborted
    for rid, o in done.items():
        p, sp = requests[rid]
        assert o.error is None
        limit = min(sp.max_tokens, engine.max_model_len - len(p))
        if sp.greedy:
            assert o.token_ids == reference_greedy(model, p, limit), rid
        else:
            assert all(len(c.token_ids) <= limit for c in o.outputs)
        if stub is not None and sp.greedy:  # exactly the drafts before the corrupted one were accepted
            exp = stub.expected.get(rid, [])
            assert o.metrics.num_spec_proposed == sum(k for k, _ in exp)
            if o.finish_reason == "length":  # (an EOS among accepted drafts ends the step early)
                assert o.metrics.num_spec_accepted == sum(a for _, a in exp)

    # the prefix cache never offers rejected-draft KV: a prompt equal to a full earlier output
    # (prompt + generated tokens) reuses its blocks and still decodes like the reference
    p = rng.integers(3, V, size=9).tolist()
    first = run_engine(engine, [(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])[0]
    full = p + first.token_ids
    again = run_engine(engine, [(full, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])[0]
    assert again.metrics.num_cached_tokens >= len(p) // 4 * 4 and again.metrics.num_cached_tokens > 0
    assert again.token_ids == reference_greedy(model, full, 12, eos=False)
    _check_pool(engine, model)
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.xfail(strict=True, reason="known bug, open: with these step timings a greedy request that was "
                   "preempted while speculating emits tokens that differ from plain greedy decoding from its "
                   "first token on (found 2026-11-29; present since speculative decoding landed)")
@pytest.mark.parametrize("clock_seed", [12, 27])
def test_speculation_after_preemption_keeps_greedy_output(clock_seed):
    test_kv_blocks_are_accounted_under_random_speculation("stub", 1, clock_seed=clock_seed)



def test_stub_acceptance_is_counted_exactly():
    """Greedy, no EOS, roomy pool: each verify step accepts exactly the drafts before the stub's
    corruption, and the metrics count exactly that."""
    model = FakeModel(vocab_size=50, seed=4)
    engine = Engine(model, block_size=4, num_blocks=200, speculative=eager({"method": "ngram", "num_tokens": 5}))
    stub = install(engine, StubProposer(model, 9))
    rng = np.random.default_rng(12)
    ps = [rng.integers(3, 50, size=n).tolist() for n in (1, 7, 13, 30)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (33, 17, 50, 26)]
    outs = run_engine(engine, list(zip(ps, params)))
    for o, p, sp in zip(outs, ps, params):
        assert o.token_ids == reference_greedy(model, p, sp.max_tokens, eos=False)
        exp = stub.expected[o.request_id]
        assert o.metrics.num_spec_steps == len(exp)
        assert o.metrics.num_spec_proposed == sum(k for k, _ in exp)
        assert o.metrics.num_spec_accepted == sum(a for _, a in exp)
    assert engine.stats.spec_accepted == sum(a for e in stub.expected.values() for _, a in e)


def test_a_finished_speculating_request_leaves_all_its_blocks_cached():
    """Speculation does not change what the prefix cache keeps: a follow-up request (the prompt
    plus the whole output, a chat's next turn) reuses as many tokens as after plain decoding,
    including the blocks that the final verify step's accepted drafts completed."""
    model = FakeModel(vocab_size=50, seed=4)
    rng = np.random.default_rng(1)
    for trial in range(8):
        p = rng.integers(3, 50, size=int(rng.integers(5, 14))).tolist()
        max_tokens = int(rng.integers(10, 31))
        hits = []
        for speculate in (False, True):
            engine = Engine(model, block_size=4, num_blocks=100,
                            speculative=eager({"method": "ngram", "num_tokens": 4}) if speculate else None)
            if speculate:
                install(engine, StubProposer(model, trial))
            a = run_engine(engine, [(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))])[0]
            full = p + a.token_ids
            b = run_engine(engine, [(full, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))])[0]
            assert b.token_ids == reference_greedy(model, full, 5, eos=False)
            hits.append(b.metrics.num_cached_tokens)
        assert hits[1] == hits[0], f"prompt of {len(p)}, {max_tokens} tokens: {hits[1]} cached tokens " \
                                   f"after speculation, {hits[0]} after plain decoding"


def test_prefix_cache_after_speculation_real_model(tiny):
    """A prompt equal to an earlier prompt + output reuses the speculating run's cached blocks and
    decodes like the same two requests without speculation."""
    path, _ = tiny
    rng = np.random.default_rng(21)
    p = (rng.integers(3, _vocab(tiny), size=5).tolist() * 4)[:19]
    sp1 = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sp2 = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    runs = []
    for spec in (None, eager({"method": "ngram", "num_tokens": 4}), eager({"method": "self", "num_tokens": 3})):
        llm = LLM(str(path), backend="cpu", block_size=8, num_blocks=64, speculative=spec)
        a = llm.generate([p], sp1)[0]
        b = llm.generate([p + a.token_ids], sp2)[0]
        runs.append((a, b, llm.engine.stats.spec_accepted))
        assert b.metrics.num_cached_tokens >= 16
    (a0, b0, _), *spec_runs = runs
    for a, b, accepted in spec_runs:
        assert accepted > 0
        assert a.token_ids == a0.token_ids
        assert b.token_ids == b0.token_ids


# ---------------------------------------------------------------- 4. find_continuation

def brute_force_continuation(tokens, k, n_min, n_max):
    L = len(tokens)
    if k < 1:
        return []
    for n in range(n_max, n_min - 1, -1):
        if n > L - 1:
            continue
        suffix = tokens[L - n:]
        for start in range(L - n - 1, -1, -1):  # latest occurrence first, followed by >= 1 token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_find_continuation_matches_brute_force():
    rng = np.random.default_rng(7)
    found = Counter()
    for _ in range(3000):
        alphabet = int(rng.integers(2, 7))
        tokens = rng.integers(0, alphabet, size=int(rng.integers(0, 41))).tolist()
        n_min = int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 4))
        k = int(rng.integers(0, 7))
        want = brute_force_continuation(tokens, k, n_min, n_max)
        got = find_continuation(tokens, k, n_min, n_max)
        assert got == want, (tokens, k, n_min, n_max)
        assert all(isinstance(t, int) for t in got)
        found["hit" if want else "miss"] += 1
        found["short" if 0 < len(want) < k else "full"] += 1
    assert min(found.values()) > 100  # hits, misses, and continuations cut short by the list's end


def test_find_continuation_prefers_longest_suffix_then_latest_match():
    rng = np.random.default_rng(8)
    for _ in range(200):
        a, b, x, y = (rng.permutation(50)[:4] + 10).tolist()
        filler = rng.integers(100, 200, size=int(rng.integers(0, 4))).tolist()
        # the suffix "a b" occurred first, followed by x; a later "b" alone is followed by y:
        # the longer match wins even though it is older
        tokens = [a, b, x, x] + filler + [b, y, y] + filler + [a, b]
        assert find_continuation(tokens, 2, 1, 3) == brute_force_continuation(tokens, 2, 1, 3)
        assert find_continuation(tokens, 2, 1, 3)[0] == x
        assert find_continuation(tokens, 2, 1, 1)[0] == y  # n = 1 only: the latest "b"
        assert find_continuation(tokens, 5, 3, 4) == []    # no earlier "x.. a b" of 3
        assert find_continuation(tokens, 0, 1, 3) == []


# ---------------------------------------------------------------- 5. configuration

@pytest.mark.parametrize("spec, match", [
    ({"method": "ngram", "num_token": 4}, "unknown speculative option.*num_token"),
    ({"method": "beam"}, "method must be one of"),
    ("medusa", "method must be one of"),
    ({"num_tokens": 3}, "needs a 'method'"),
    ({"method": "ngram", "num_tokens": 0}, "num_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_tokens": 2.5}, "num_tokens must be an integer"),
    ({"method": "ngram", "num_tokens": True}, "num_tokens must be an integer"),
    ({"method": "ngram", "num_tokens": 17}, "at most 16"),
    ({"method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min"),
    ({"method": "self", "draft_layers": 0}, "draft_layers"),
    ({"method": "self", "draft_layers": [-1]}, "draft_layers"),
    ({"method": "draft"}, "needs a draft_model"),
    ({"method": "draft", "draft_model": ""}, "needs a draft_model"),
    (7, "method name or a dict"),
])
def test_bad_speculative_config_is_a_clear_value_error(spec, match):
    with pytest.raises(ValueError, match=match):
        LLM(FakeModel(), block_size=4, num_blocks=16, speculative=spec)
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.of(spec)


def test_speculation_that_cannot_run_on_the_model_is_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(FakeModel(vocab_size=300), block_size=4, num_blocks=16,
            speculative={"method": "draft", "draft_model": FakeModel(vocab_size=299)})
    with pytest.raises(ValueError, match="self"):  # no layers to skip
        LLM(FakeModel(), block_size=4, num_blocks=16, speculative="self")


def test_self_draft_layers_must_leave_layers_out(tiny):
    path, _ = tiny
    for layers in (4, [0, 1, 2, 3], [5]):
        with pytest.raises(ValueError, match="draft_layers"):
            LLM(str(path), backend="cpu", num_blocks=8, speculative={"method": "self", "draft_layers": layers})


def test_num_speculative_tokens_needs_speculation():
    plain = LLM(FakeModel(), block_size=4, num_blocks=16)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        plain.generate([[3, 4, 5]], SamplingParams(num_speculative_tokens=2))
    plain.generate([[3, 4, 5]], SamplingParams(num_speculative_tokens=0, max_tokens=2))  # 0 = off: fine anywhere
    spec = LLM(FakeModel(), block_size=4, num_blocks=16, speculative={"method": "ngram", "num_tokens": 3})
    with pytest.raises(ValueError, match="exceeds"):
        spec.generate([[3, 4, 5]], SamplingParams(num_speculative_tokens=4))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=-1)
    assert not plain.engine.has_unfinished() and not spec.engine.has_unfinished()


# ---------------------------------------------------------------- 6. metrics

def test_metrics_count_every_token_and_match_engine_stats():
    model = FakeModel(vocab_size=60, seed=5)
    ticks = itertools.count()
    engine = Engine(model, block_size=4, num_blocks=128, speculative=eager({"method": "ngram", "num_tokens": 4}),
                    clock=lambda: next(ticks) * 0.001, enable_prefix_caching=False)
    stub = install(engine, StubProposer(model, 3))
    rng = np.random.default_rng(13)
    p = rng.integers(3, 60, size=11).tolist()
    out = run_engine(engine, [(p, SamplingParams(temperature=0, max_tokens=41, ignore_eos=True))])[0]
    m, s = out.metrics, engine.stats
    n = len(out.token_ids)
    assert n == 41 == m.num_generated_tokens
    assert (m.num_spec_steps, m.num_spec_proposed, m.num_spec_accepted) == (s.spec_steps, s.spec_proposed, s.spec_accepted)
    assert m.num_spec_proposed == sum(k for k, _ in stub.expected[out.request_id])
    assert 0 < m.num_spec_accepted < m.num_spec_proposed
    assert m.spec_acceptance_rate == pytest.approx(m.num_spec_accepted / m.num_spec_proposed)
    assert m.spec_mean_accepted_length == pytest.approx((m.num_spec_accepted + m.num_spec_steps) / m.num_spec_steps)
    assert m.spec_acceptance_rate == pytest.approx(s.spec_acceptance_rate)
    assert m.spec_mean_accepted_length == pytest.approx(s.spec_mean_accepted_length)
    # one prefill token, then every decode step (plain or verify) yields 1 + its accepted drafts
    assert n == 1 + s.decode_tokens + s.spec_accepted
    assert s.steps == 1 + s.decode_tokens < n
    # every token has its inter-token latency; they add up to the decode time
    assert len(m.inter_token_latencies) == n - 1
    assert sum(m.inter_token_latencies) == pytest.approx(m.decode_time)
    assert m.decode_tokens_per_s == pytest.approx((n - 1) / m.decode_time)
    d = m.as_dict()
    assert d["spec_acceptance_rate"] == m.spec_acceptance_rate
    assert d["spec_mean_accepted_length"] == m.spec_mean_accepted_length
    # a request that did not speculate reports None
    off = run_engine(engine, [(p, SamplingParams(temperature=0, max_tokens=5, num_speculative_tokens=0))])[0]
    assert off.metrics.spec_acceptance_rate is None and off.metrics.spec_mean_accepted_length is None
    assert off.token_ids == out.token_ids[:5]


def test_metrics_of_a_batch_sum_to_engine_stats(tiny):
    path, _ = tiny
    prompts, params = _lossless_cases(_vocab(tiny))
    llm = LLM(str(path), backend="cpu", block_size=8, num_blocks=200, max_num_batched_tokens=24,
              speculative=eager({"method": "ngram", "num_tokens": 3}))
    outs = llm.generate(prompts, params)
    s = llm.engine.stats
    assert sum(o.metrics.num_spec_accepted for o in outs) == s.spec_accepted > 0
    assert sum(o.metrics.num_spec_proposed for o in outs) == s.spec_proposed
    assert sum(o.metrics.num_spec_steps for o in outs) == s.spec_steps
    for o in outs:
        m = o.metrics
        assert m.num_generated_tokens == len(o.token_ids)
        assert len(m.inter_token_latencies) == len(o.token_ids) - 1
        if m.num_spec_steps:
            assert m.spec_mean_accepted_length == pytest.approx(1 + m.num_spec_accepted / m.num_spec_steps)
            assert 0 <= m.spec_acceptance_rate <= 1


def test_self_speculation_is_refused_where_the_runner_cannot_run_a_layer_subset(monkeypatch):
    """The tpu runner jits the whole model per step shape: 'self' says so at construction rather
    than failing in the first step."""
    from mojollm.engine.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "layer_subsets", False, raising=False)
    with pytest.raises(ValueError, match="not supported"):
        Engine(FakeModel(), block_size=4, num_blocks=32, speculative={"method": "self"})
