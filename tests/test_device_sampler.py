"""DeviceSampler (backends/cuda/sampler.py) on CPU torch, against the host sampler's own functions.

Reference distributions come from mojollm.engine.sampler (apply_penalties, filtered_candidates),
in float64; the device sampler's draws (20k per case, different seeds) are compared with a
chi-square test at significance 1e-4 (fixed seeds: deterministic), and tokens outside the
reference support must never be drawn.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from mojollm.backends.cuda.sampler import DeviceSampler, SamplePlan, rng_key, uniform
from mojollm.engine.sampler import Sampler, apply_penalties, filtered_candidates
from mojollm.sampling_params import SamplingParams

V = 1000 + 7
PROMPT = [0, 4, 4, 17, 250, 1006]


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 3.719 is the normal 1e-4 upper quantile."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def reference_probs(logits: np.ndarray, params: SamplingParams, prompt, outputs) -> np.ndarray:
    """Dense [V] distribution the host sampler draws from."""
    z = apply_penalties(logits, params, np.unique(np.asarray(prompt, dtype=np.int64)), Counter(outputs))
    ids, p = filtered_candidates(z, params)
    dense = np.zeros(logits.shape[0])
    dense[ids] = p
    return dense


def random_logits(seed: int, rows: int = 1, scale: float = 2.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * scale).astype(np.float32)


CASES = {
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(top_k=20),
    "top_p": SamplingParams(top_p=0.8),
    "min_p": SamplingParams(min_p=0.05),
    "penalties": SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
    "all": SamplingParams(temperature=0.7, top_k=100, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                          presence_penalty=0.5, frequency_penalty=0.2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_host_sampler(name):
    params = CASES[name]
    logits = random_logits(1)[0]
    top = np.argsort(-logits)
    outputs = [int(top[0]), int(top[0]), int(top[2]), int(top[5]), 3]  # penalise likely tokens
    prompt = PROMPT + [int(top[1])]
    ref = reference_probs(logits, params, prompt, outputs)

    rows, rounds = 4000, 5
    sampler = DeviceSampler(rows, V)
    batch = torch.from_numpy(logits)[None].expand(rows, V)
    counts = np.zeros(V, dtype=np.int64)
    for r in range(rounds):
        for row in range(rows):  # fresh seeds each round; assign resets the output counts
            sampler.assign(row, params, seed=r * rows + row, prompt_token_ids=prompt, output_token_ids=outputs)
        tokens = sampler.sample(batch, plan=sampler.plan()).token_ids
        counts += np.bincount(tokens.numpy(), minlength=V)
    n = rows * rounds

    assert counts[ref == 0].sum() == 0, "drew a token outside the reference support"
    expected = n * ref
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_critical(len(exp) - 1), (name, stat, len(exp) - 1)


def test_greedy_equals_host_argmax_with_ties():
    logits = random_logits(2, rows=5)
    # row 1: exact tie between 100 and 40 (lowest id wins); row 2: a tie made by the penalty
    logits[1, [40, 100]] = logits[1].max() + 1.0
    top2 = logits[2].max() + 1.0
    logits[2, [30, 300]] = [top2, 2.0 * top2]     # 300 is seen: penalised to top2, a tie with 30
    logits[3, [7, 900]] = logits[3].max() + 1.0   # tie, then frequency penalty on 7 breaks it
    plain = SamplingParams(temperature=0.0)
    pen = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.1, presence_penalty=0.1)
    params = [plain, plain, pen, freq, pen]
    prompts = [PROMPT, PROMPT, [300, 5], PROMPT, [int(np.argmax(logits[4])), 2]]
    outputs = [[], [], [], [7], [3]]
    sampled = SamplingParams(temperature=1.0, top_p=0.5)

    def host_argmax(i):
        return int(np.argmax(apply_penalties(logits[i], params[i], np.unique(prompts[i]), Counter(outputs[i]))))

    expect = [host_argmax(i) for i in range(5)]
    assert expect[1] == 40 and expect[2] == 30 and expect[3] == 900
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.from_numpy(logits).to(dtype)
        if dtype == torch.bfloat16:
            logits_used = x.float().numpy().astype(np.float64)
            exp_dt = [int(np.argmax(apply_penalties(logits_used[i], params[i], np.unique(prompts[i]),
                                                    Counter(outputs[i])))) for i in range(5)]
        else:
            exp_dt = expect
        for mixed in (False, True):  # all-greedy fast path, and the general path next to a sampled row
            s = DeviceSampler(6, V)
            for i in range(5):
                s.assign(i, params[i], seed=i, prompt_token_ids=prompts[i], output_token_ids=outputs[i])
            rows = torch.arange(5)
            if mixed:
                s.assign(5, sampled, seed=9)
                rows = torch.arange(6)
                x2 = torch.cat([x, x[:1]])
            else:
                x2 = x
            plan = s.plan(rows.tolist())
            assert plan.greedy_only is not mixed
            tokens = s.sample(x2, rows, plan).token_ids
            assert tokens.dtype == torch.int32
            assert tokens[:5].tolist() == exp_dt, (dtype, mixed)


MIXED = [
    SamplingParams(temperature=0.9),
    SamplingParams(temperature=1.1, top_k=30, top_p=0.95),
    SamplingParams(min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.3),
    SamplingParams(temperature=0.0, presence_penalty=0.5),
    SamplingParams(temperature=1.3, top_p=0.7, min_p=0.01, presence_penalty=-0.5),
]


def run_steps(sampler, placement, logits_steps, seeds, others=(), outputs=None, start=0):
    """Assign the MIXED requests at rows `placement` (plus `others`: (row, params)), then sample
    the steps with the batch in a shuffled row order; returns tokens per request."""
    outputs = outputs or [[] for _ in MIXED]
    for q, row in enumerate(placement):
        sampler.assign(row, MIXED[q], seed=seeds[q], prompt_token_ids=PROMPT, output_token_ids=outputs[q])
    for row, params in others:
        sampler.assign(row, params, seed=1000 + row)
    got = [list() for _ in MIXED]
    batch_rows = list(placement) + [r for r, _ in others]
    order = np.random.default_rng(len(batch_rows)).permutation(len(batch_rows))
    rows = torch.tensor([batch_rows[j] for j in order], dtype=torch.int32)
    for t in range(start, len(logits_steps)):
        step_logits = logits_steps[t]
        x = torch.stack([torch.from_numpy(step_logits[j % len(MIXED)]) for j in order])
        tokens = sampler.sample(x, rows, sampler.plan(rows.tolist())).token_ids.tolist()
        for pos, j in enumerate(order):
            if j < len(MIXED):
                got[j].append(tokens[pos])
    return got


def test_same_seed_same_tokens_whatever_the_batch():
    steps = [random_logits(100 + t, rows=len(MIXED), scale=1.0) for t in range(12)]
    seeds = [11, 12, 13, 14, 15]
    alone = run_steps(DeviceSampler(5, V), [0, 1, 2, 3, 4], steps, seeds)
    others = [(1, SamplingParams(top_k=3)), (6, SamplingParams(temperature=0.0)),
              (8, SamplingParams(repetition_penalty=1.5, logprobs=2))]
    crowded = run_steps(DeviceSampler(9, V), [7, 2, 5, 0, 3], steps, seeds, others=others)
    assert alone == crowded
    # one request alone (tight plan: no sort, no penalties) gives its stream too
    s = DeviceSampler(3, V)
    s.assign(2, MIXED[0], seed=seeds[0], prompt_token_ids=PROMPT)
    solo = [s.sample(torch.from_numpy(steps[t][:1]), torch.tensor([2]), s.plan([2])).token_ids.item()
            for t in range(12)]
    assert s.plan([2]) == SamplePlan(greedy_only=False, penalties=False, sort=False, logprobs=-1)
    assert solo == alone[0]
    # different seeds: different streams
    other = run_steps(DeviceSampler(5, V), [0, 1, 2, 3, 4], steps, [21, 22, 23, 24, 25])
    for q in (0, 1, 2, 4):
        assert other[q] != alone[q]
    assert other[3] == alone[3]  # greedy ignores the seed


def test_resume_after_recompute_continues_the_stream():
    steps = [random_logits(200 + t, rows=len(MIXED), scale=1.0) for t in range(10)]
    seeds = [5, 6, 7, 8, 9]
    full = run_steps(DeviceSampler(5, V), [0, 1, 2, 3, 4], steps, seeds)
    # a fresh sampler given the first 6 outputs (counts + step) continues identically
    resumed = run_steps(DeviceSampler(7, V), [6, 0, 3, 1, 5], steps, seeds,
                        outputs=[toks[:6] for toks in full], start=6)
    assert resumed == [toks[6:] for toks in full]


def test_uniform_is_a_decent_counter_rng():
    key = rng_key(123)
    n = 200_000
    u = uniform(torch.full((n,), key & 0xFFFFFFFF), torch.full((n,), key >> 32), torch.arange(n)).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    c = np.histogram(u, 50, (0, 1))[0]
    assert ((c - n / 50) ** 2 / (n / 50)).sum() < chi2_critical(49)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    assert rng_key(1, 0) != rng_key(1, 1) != rng_key(2, 0)


def test_logprobs_match_host():
    logits = random_logits(3, rows=5)
    params = [SamplingParams(logprobs=0), SamplingParams(logprobs=3, top_k=5),
              SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
              SamplingParams(), SamplingParams(logprobs=1, min_p=0.2)]
    host = Sampler(V)
    for dtype in (torch.float32, torch.bfloat16):
        s = DeviceSampler(5, V)
        for i, p in enumerate(params):
            s.assign(i, p, seed=i, prompt_token_ids=PROMPT)
        x = torch.from_numpy(logits).to(dtype)
        plan = s.plan(range(5))
        assert plan.logprobs == 5
        out = s.sample(x, None, plan)
        assert out.top_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
        raw = x.float().numpy()
        for i, p in enumerate(params):
            if p.logprobs is None:
                continue
            tok = int(out.token_ids[i])
            lp, entry = host.logprob_entry(raw[i], tok, p.logprobs)
            assert abs(float(out.logprobs[i]) - lp) < 1e-4
            top = list(entry["top"].items())
            assert out.top_ids[i, :p.logprobs].tolist() == [t for t, _ in top]
            np.testing.assert_allclose(out.top_logprobs[i, :p.logprobs].numpy(), [v for _, v in top], atol=1e-4)
    assert s.sample(x, None, SamplePlan(logprobs=-1)).logprobs is None


def test_sample_has_no_host_sync():
    """sample() and its helpers must be capturable in a CUDA graph: no host reads of device data."""
    src = "".join(inspect.getsource(getattr(DeviceSampler, m))
                  for m in ("sample", "_penalise", "_draw", "_top_k_top_p"))
    for bad in (".item(", ".tolist(", ".cpu(", ".numpy(", "nonzero", "masked_select", "torch.unique"):
        assert bad not in src, bad
    assert not re.search(r"(?<![.\w])(bool|int|float)\(", src)  # Python casts of tensors sync too
    # and dynamo traces it as one graph (backend="eager": no compiler needed)
    s = DeviceSampler(4, V)
    for i, p in enumerate(MIXED[:4]):
        s.assign(i, p, seed=i, prompt_token_ids=PROMPT)
    plan = SamplePlan(logprobs=2)
    x = torch.from_numpy(random_logits(4, rows=3))
    rows = torch.tensor([2, 0, 3])
    ref_state = (s.step.clone(), s.counts.clone())
    eager = s.sample(x, rows, plan)
    s.step.copy_(ref_state[0])
    s.counts.copy_(ref_state[1])
    torch._dynamo.reset()
    compiled = torch.compile(s.sample, fullgraph=True, backend="eager")(x, rows, plan)
    assert torch.equal(eager.token_ids, compiled.token_ids)
    assert torch.equal(eager.top_ids, compiled.top_ids)


def test_top_k_top_p_ties_go_to_the_lower_id():
    logits = np.full(V, -5.0, dtype=np.float32)
    logits[[700, 9, 5]] = 3.0  # three equal top tokens, ~1/3 of the mass each
    s = DeviceSampler(2000, V)
    x = torch.from_numpy(logits)[None].expand(2000, V)
    for params in (SamplingParams(top_p=0.5), SamplingParams(top_k=2)):
        ids, _ = filtered_candidates(logits.astype(np.float64), params)
        for row in range(2000):
            s.assign(row, params, seed=row)
        drawn = set(s.sample(x, plan=s.plan()).token_ids.tolist())
        assert drawn == {5, 9}
        if params.top_p < 1.0:
            assert ids.tolist() == [5, 9]
