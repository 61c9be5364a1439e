"""Sampler and SamplingParams: filters against hand-computed distributions, determinism, beam search.

Expected distributions are computed here in float64 numpy straight from the formulas (not by
calling the sampler's helpers); draws go through Sampler.sample with a seeded generator and are
compared with a chi-square test at significance 1e-4 (fixed seeds, so the test is deterministic).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fake_model import FakeModel
from mojollm.engine.engine import Engine
from mojollm.engine.sampler import Sampler, filtered_candidates, log_softmax, top_logprobs
from mojollm.engine.sequence import Request
from mojollm.sampling_params import SamplingParams

V = 13


def make_seq(params: SamplingParams, prompt=(3, 5, 5, 9), outputs=(), seed=7):
    req = Request("r", list(prompt), params, arrival_time=0.0)
    seq = req.seqs[0]
    for t in outputs:
        seq.append_token(t)
    seq.rng = np.random.default_rng(seed)
    return seq


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Upper chi-square quantile (Wilson-Hilferty), z = 3.719 is the normal 1e-4 upper quantile."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def expected_dist(z, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Reference: the distribution the filters define, written from the definitions."""
    z = np.asarray(z, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        order = sorted(range(len(q)), key=lambda i: (-q[i], i))
        mass, nucleus = 0.0, set()
        for i in order:
            if not keep[i]:
                continue
            nucleus.add(i)
            mass += q[i]
            if mass >= top_p:
                break
        keep &= np.array([i in nucleus for i in range(len(q))])
    if min_p > 0:
        q = np.where(keep, p, 0.0)
        keep &= q >= min_p * q.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def draw_counts(logits, params, n, seed=7, prompt=(3, 5, 5, 9), outputs=()):
    seq = make_seq(params, prompt, outputs, seed)
    s = Sampler(len(logits))
    counts = np.zeros(len(logits), dtype=np.int64)
    for _ in range(n):
        counts[s.sample(np.asarray(logits, dtype=np.float32), seq)] += 1
    return counts


def assert_matches(counts, expected):
    n = counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew excluded tokens {np.nonzero(counts * ~support)[0]}"
    exp = expected[support] * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return
    assert stat < chi2_critical(dof), f"chi2 {stat:.1f} >= {chi2_critical(dof):.1f} (dof {dof})"


LOGITS = np.random.default_rng(42).standard_normal(V).astype(np.float32) * 1.7


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.9),
    dict(temperature=1.0, top_k=4),
    dict(temperature=0.8, top_p=0.55),
    dict(temperature=1.0, min_p=0.15),
    dict(temperature=1.3, top_k=7, top_p=0.8, min_p=0.05),
])
def test_filters_match_hand_computed_distribution(kw):
    params = SamplingParams(max_tokens=1, seed=1, **kw)
    expected = expected_dist(LOGITS, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    counts = draw_counts(LOGITS, params, 12000)
    assert_matches(counts, expected)
    # and the sampler's own candidate set is exactly the support
    ids, p = filtered_candidates(LOGITS.astype(np.float64), params)
    assert set(ids.tolist()) == set(np.nonzero(expected)[0].tolist())
    np.testing.assert_allclose(p, expected[ids], rtol=1e-12)


def test_penalties_match_hand_computed_distribution():
    prompt = (3, 5, 5, 9)
    outputs = (5, 11, 11, 11, 0)
    params = SamplingParams(max_tokens=1, temperature=0.9, repetition_penalty=1.7,
                            presence_penalty=0.4, frequency_penalty=0.3)
    z = LOGITS.astype(np.float64).copy()
    seen = set(prompt) | set(outputs)
    for t in seen:  # CTRL repetition penalty
        z[t] = z[t] / 1.7 if z[t] > 0 else z[t] * 1.7
    for t in set(outputs):  # OpenAI presence / frequency, on generated tokens only
        z[t] -= 0.4 + 0.3 * outputs.count(t)
    counts = draw_counts(LOGITS, params, 12000, prompt=prompt, outputs=outputs)
    assert_matches(counts, expected_dist(z, 0.9))


def test_greedy_takes_argmax_of_penalised_logits():
    z = np.array([0.5, 2.0, 1.9, -1.0, 1.0], dtype=np.float32)
    s = Sampler(5)
    assert s.sample(z, make_seq(SamplingParams(temperature=0), prompt=(0,))) == 1
    # token 1 seen in the prompt: 2.0 / 1.2 = 1.667 < 1.9, so token 2 wins
    seq = make_seq(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(1,))
    assert s.sample(z, seq) == 2
    # ties go to the lower id
    assert s.sample(np.array([1.0, 3.0, 3.0], np.float32), make_seq(SamplingParams(temperature=0), prompt=(0,))) == 1


def test_seeded_draws_are_reproducible_and_seed_dependent():
    params = SamplingParams(temperature=1.0, max_tokens=1)
    a = draw_counts(LOGITS, params, 200, seed=3)
    b = draw_counts(LOGITS, params, 200, seed=3)
    c = draw_counts(LOGITS, params, 200, seed=4)
    assert (a == b).all()
    seq1, seq2 = make_seq(params, seed=3), make_seq(params, seed=4)
    s = Sampler(V)
    d1 = [s.sample(LOGITS, seq1) for _ in range(50)]
    d2 = [s.sample(LOGITS, seq2) for _ in range(50)]
    assert d1 != d2 and c.sum() == 200


def test_top_p_shortlist_equals_full_sort_on_large_vocab():
    rng = np.random.default_rng(5)
    for scale, top_p in ((4.0, 0.9), (0.3, 0.95), (6.0, 0.5)):  # peaky (shortlist) and flat (full sort)
        z = rng.standard_normal(5001) * scale
        params = SamplingParams(temperature=1.0, top_p=top_p)
        ids, p = filtered_candidates(z, params)
        expected = expected_dist(z, 1.0, 0, top_p)
        assert set(ids.tolist()) == set(np.nonzero(expected)[0].tolist())
        np.testing.assert_allclose(p, expected[ids], rtol=1e-10)


def test_logprobs_match_float64_log_softmax():
    z = LOGITS.astype(np.float64)
    ref = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    np.testing.assert_allclose(log_softmax(LOGITS), ref, rtol=1e-6)  # float32 input
    top = top_logprobs(ref, 4)
    assert list(top) == sorted(range(V), key=lambda i: -ref[i])[:4]
    s = Sampler(V)
    lp, entry = s.logprob_entry(LOGITS, 6, 3)
    assert abs(lp - ref[6]) < 1e-6 and len(entry["top"]) == 3


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(n=0), "n must"),
    (dict(seed=-1), "seed"),
    (dict(logprobs=-1), "logprobs"),
    (dict(beam_width=0), "beam_width"),
    (dict(beam_width=2, n=3), "n (3)"),
    (dict(beam_width=2, stop=["x"]), "beam search"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_params_raise_one_line_value_error(kw, msg):
    with pytest.raises(ValueError) as ei:
        SamplingParams(**kw)
    assert msg in str(ei.value) and "\n" not in str(ei.value)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


# ---------------------------------------------------------------- beam search

def _all_continuations(model, prompt, length, vocab):
    """Brute force: every continuation of `length` tokens with its summed log-probability."""
    out = []
    for cont in itertools.product(range(vocab), repeat=length):
        toks, total = list(prompt), 0.0
        for t in cont:
            z = model.reference_logits(toks).astype(np.float64)
            total += z[t] - (z.max() + np.log(np.exp(z - z.max()).sum()))
            toks.append(t)
        out.append((total, list(cont)))
    return out


def test_exhaustive_beam_search_equals_brute_force():
    # vocab 5, 3 new tokens, width 25 >= 5^2: beam search keeps every prefix, so it is exact.
    model = FakeModel(vocab_size=5, max_position_embeddings=32, scale=1.5, eos_bias=0.0)
    prompt = [2, 4, 3]
    engine = Engine(model, block_size=2, num_blocks=200, max_num_seqs=32)
    engine.add_request(prompt, SamplingParams(beam_width=25, n=25, max_tokens=3, ignore_eos=True, length_penalty=0.0))
    (out,) = engine.run_until_done()
    brute = sorted(_all_continuations(model, prompt, 3, 5), key=lambda x: -x[0])[:25]
    assert [o.token_ids for o in out.outputs] == [c for _, c in brute]
    np.testing.assert_allclose([o.cumulative_logprob for o in out.outputs], [s for s, _ in brute], rtol=1e-9)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def reference_beam_search(model, prompt, width, max_tokens, length_penalty, eos):
    """Independent beam search over full contexts (no cache): same rules as documented in the engine."""
    beams = [(0.0, [])]
    finished = []
    max_len = max_tokens
    for _ in range(max_tokens):
        cands = []
        for bi, (cum, toks) in enumerate(beams):
            z = model.reference_logits(list(prompt) + toks).astype(np.float64)
            lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                cands.append((cum + lp[t], bi, int(t)))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:2 * width]
        nxt = []
        for rank, (cum, bi, t) in enumerate(cands):
            if t in eos:
                if rank < width:
                    toks = beams[bi][1] + [t]
                    finished.append((cum / len(toks) ** length_penalty, cum, toks))
                continue
            nxt.append((cum, beams[bi][1] + [t]))
            if len(nxt) == width:
                break
        beams = []
        for cum, toks in nxt:
            if len(toks) >= max_tokens:
                finished.append((cum / len(toks) ** length_penalty, cum, toks))
            else:
                beams.append((cum, toks))
        if not beams:
            break
        if len(finished) >= width:
            worst = sorted((f[0] for f in finished), reverse=True)[width - 1]
            best = max(c / (max_len if length_penalty > 0 else len(t)) ** length_penalty for c, t in beams)
            if best <= worst:
                break
    return sorted(finished, key=lambda f: -f[0])


@pytest.mark.parametrize("width, lp, seed", [(3, 1.0, 11), (4, 0.5, 12), (2, 2.0, 13)])
def test_beam_search_matches_reference_with_eos_and_length_penalty(width, lp, seed):
    model = FakeModel(vocab_size=9, max_position_embeddings=64, scale=1.3, eos_bias=0.8, seed=seed)
    prompt = [3, 7, 2, 5, 5]
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=16, max_num_batched_tokens=6)
    engine.add_request(prompt, SamplingParams(beam_width=width, n=width, max_tokens=6, length_penalty=lp))
    (out,) = engine.run_until_done()
    ref = reference_beam_search(model, prompt, width, 6, lp, {1})[:width]
    assert [o.token_ids for o in out.outputs] == [r[2] for r in ref]
    np.testing.assert_allclose([o.cumulative_logprob for o in out.outputs], [r[1] for r in ref], rtol=1e-9)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
