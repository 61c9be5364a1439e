"""Turning one logits row into the next token, per sequence (pure numpy, float64 maths).

Each sequence draws from its own numpy Generator (seeded by (seed, sample index)) exactly one
uniform number per sampled token, so its output does not depend on which other requests share
the batch. Maths, for logits z over the vocabulary:

    penalties   z_t /= r if z_t > 0 else z_t *= r       (t seen in prompt or output, r = repetition)
                z_t -= presence * [count_t > 0] + frequency * count_t   (output counts only)
    temperature z / T; greedy (T = 0) takes argmax z, lowest id on ties
    top-k       keep the k largest
    top-p       keep the smallest most-probable set whose mass >= p (ties by lower id)
    min-p       keep p_t >= min_p * max p
    draw        inverse CDF of the renormalised kept probabilities at u ~ U[0, 1)
"""

from __future__ import annotations

import numpy as np

from mojollm.engine.sequence import Sequence
from mojollm.sampling_params import SamplingParams

_TOP_P_SHORTLIST = 512  # top-p first tries the most likely tokens only, to avoid sorting the vocab


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted)))


def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt_tokens: np.ndarray,
                    output_counts: dict[int, int]) -> np.ndarray:
    """Penalised float64 copy of `logits` (vLLM semantics)."""
    z = np.array(logits, dtype=np.float64)
    if params.repetition_penalty != 1.0:
        seen = prompt_tokens
        if output_counts:
            seen = np.union1d(prompt_tokens, np.fromiter(output_counts.keys(), dtype=np.int64))
        if seen.size:
            r = params.repetition_penalty
            v = z[seen]
            z[seen] = np.where(v > 0, v / r, v * r)
    if output_counts and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        ids = np.fromiter(output_counts.keys(), dtype=np.int64, count=len(output_counts))
        counts = np.fromiter(output_counts.values(), dtype=np.float64, count=len(output_counts))
        z[ids] -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
    return z


def filtered_candidates(z: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) left after temperature, top-k, top-p and min-p; probs sum to 1.

    `z`: penalised float64 logits [V]; params.temperature > 0.
    """
    x = z / params.temperature
    vocab = x.shape[0]
    ids = None  # None: the whole vocabulary, in id order
    if 0 < params.top_k < vocab:
        ids = np.sort(np.argpartition(-x, params.top_k - 1)[:params.top_k])
    if params.top_p < 1.0:
        ids = _top_p(x, ids, params.top_p)
    xs = x if ids is None else x[ids]
    p = np.exp(xs - np.max(xs))
    p /= p.sum()
    if params.min_p > 0.0:
        keep = p >= params.min_p * p.max()
        if not keep.all():
            ids = (np.arange(vocab) if ids is None else ids)[keep]
            p = p[keep] / p[keep].sum()
    if ids is None:
        ids = np.arange(vocab)
    return ids, p


def _top_p(x: np.ndarray, ids: np.ndarray | None, top_p: float) -> np.ndarray:
    """Smallest set of most probable tokens (among `ids`) whose probability mass reaches top_p."""
    cand = np.arange(x.shape[0]) if ids is None else ids
    xc = x[cand]
    m = np.max(xc)
    e = np.exp(xc - m)
    total = e.sum()
    if cand.shape[0] > 2 * _TOP_P_SHORTLIST:
        short = np.argpartition(-xc, _TOP_P_SHORTLIST - 1)[:_TOP_P_SHORTLIST]
        if e[short].sum() >= top_p * total:  # the nucleus lies inside the shortlist
            order = short[np.lexsort((cand[short], -e[short]))]
            return _nucleus(cand, e, order, top_p * total)
    order = np.lexsort((cand, -e))  # by probability, descending; ties by lower token id
    return _nucleus(cand, e, order, top_p * total)


def _nucleus(cand: np.ndarray, e: np.ndarray, order: np.ndarray, mass: float) -> np.ndarray:
    cum = np.cumsum(e[order])
    k = int(np.searchsorted(cum, mass, side="left")) + 1
    return np.sort(cand[order[:min(k, order.shape[0])]])


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with one uniform number."""
    cum = np.cumsum(probs)
    u = rng.random() * cum[-1]
    i = int(np.searchsorted(cum, u, side="right"))
    return int(ids[min(i, ids.shape[0] - 1)])


def top_logprobs(logprobs: np.ndarray, k: int) -> dict[int, float]:
    """The k most likely tokens and their log-probabilities, most likely first (ties: lower id)."""
    if k <= 0:
        return {}
    k = min(k, logprobs.shape[0])
    part = np.argpartition(-logprobs, k - 1)[:k]
    order = part[np.lexsort((part, -logprobs[part]))]
    return {int(t): float(logprobs[t]) for t in order}


class Sampler:
    """Samples the next token of sequences; holds no state of its own (it lives on the sequences)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def processed_logits(self, logits: np.ndarray, seq: Sequence) -> np.ndarray:
        params = seq.request.params
        if params.has_penalties:
            return apply_penalties(logits, params, seq.request.prompt_token_set, seq.output_counts)
        return np.asarray(logits, dtype=np.float64)

    def sample(self, logits: np.ndarray, seq: Sequence) -> int:
        """Next token of `seq` from its logits row [V] (float32)."""
        params = seq.request.params
        if params.greedy and not params.has_penalties:
            return int(np.argmax(logits))
        z = self.processed_logits(logits, seq)
        if params.greedy:
            return int(np.argmax(z))
        ids, p = filtered_candidates(z, params)
        return draw(ids, p, seq.rng)

    def logprob_entry(self, logits: np.ndarray, token: int, k: int) -> tuple[float, dict]:
        """Log-probability of `token` under the model's raw distribution, and the top-k."""
        lp = log_softmax(logits)
        return float(lp[token]), {"token_id": token, "logprob": float(lp[token]), "top": top_logprobs(lp, k)}


def beam_candidates(beams: list[Sequence], logits: list[np.ndarray], sampler: Sampler,
                    width: int) -> list[tuple[float, int, int, float]]:
    """The 2*width best one-token extensions of the live beams, best first.

    Returns (new cumulative logprob, beam index, token, token logprob); the order is by cumulative
    log-probability, then beam index, then token id (deterministic on ties).
    """
    k = 2 * width
    out = []
    for bi, (seq, row) in enumerate(zip(beams, logits)):
        lp = log_softmax(sampler.processed_logits(row, seq))
        kk = min(k, lp.shape[0])
        top = np.argpartition(-lp, kk - 1)[:kk]
        for t in top:
            out.append((seq.cumulative_logprob + float(lp[t]), bi, int(t), float(lp[t])))
    out.sort(key=lambda c: (-c[0], c[1], c[2]))
    return out[:k]


def beam_score(cumulative_logprob: float, num_generated: int, length_penalty: float) -> float:
    return cumulative_logprob / (max(num_generated, 1) ** length_penalty)
