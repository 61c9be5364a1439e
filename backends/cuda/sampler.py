"""Batched on-device sampling in pure torch: logits [S, V] in, int32 token ids [S] out.

Same maths and order as the host sampler (mojollm.engine.sampler, whose docstring is the spec):

    penalties   z_t /= r if z_t > 0 else z_t *= r       (t in the prompt or the output, r = repetition)
                z_t -= presence * [count_t > 0] + frequency * count_t   (output counts)
    greedy      temperature == 0: argmax of the penalised logits, lowest id on ties
    temperature x = z / T
    top-k       keep the k largest x (one stable descending sort serves top-k and top-p;
    top-p         ties go to the lower id): top-p keeps a token iff the mass of the tokens
                  before it in that order, among the top-k, is < top_p of the top-k mass
    min-p       keep exp(x_t - max x) >= min_p (the ratio p_t / p_max does not depend on the
                  renormalisation, so it needs no sort)
    draw        inverse CDF, in token-id order, of the kept probabilities at one u ~ U[0, 1)
    logprobs    log_softmax of the RAW logits: the chosen token's, and the top-k (torch.topk;
                  on exact ties its order among equal values is not guaranteed lowest-id-first)

Everything is float32 on the logits' device. The host sampler computes in float64; the two agree
up to float32 rounding (which can move a top-p / min-p boundary or a CDF boundary only when a value
lies within rounding error of it).

State lives in persistent per-row tensors ("rows" = slots of the running batch, 0..max_num_seqs-1):
float params [R, 6], int params [R, 3] (top-k, two 32-bit RNG key lanes), a step counter [R], and,
allocated on the first request that uses a penalty, a prompt-token mask [R, V] (bool) and output
token counts [R, V] (int32). `assign` (host side, not graph-safe: it copies host data) points a
row at a request; `sample` reads the rows, draws, and advances the rows' step counters and
output counts on the device.

Randomness: a row's draw at step n is u = hash(key, n), a counter-based hash in 32-bit lanes held in
int64 tensors (a Weyl step and two murmur3 finalizer rounds keyed by the two lanes of a 64-bit key
that the host derives from (seed, stream) with splitmix64). The step starts at the number of output
tokens the request already has (so a recomputed request continues its stream) and advances by one
per sample. Nothing in a row's draw depends on the other rows of the batch, nor on the plan flags
below (the filters that a flag skips are exactly the identity for the rows it skips them for), up
to the rounding of per-row reductions, which a torch kernel may in principle do differently for
another batch shape.

CUDA-graph safety: `sample` has no host synchronisation: no .item()/.tolist()/.cpu(), no nonzero()
or boolean-mask indexing, no Python branching on tensor values; every shape is fixed by
(S, V, plan). Its only Python branches are on the host-known `SamplePlan` (all-greedy fast path,
penalties on/off, sort for top-k/top-p on/off, number of top logprobs), so a graph runner keys its
captured graphs by (batch size bucket, plan). `plan(rows)` computes the tightest plan for a list of
rows from the host copies of their params; with no plan given, `sample` uses a conservative plan
over every assigned row (always correct, possibly slower; plan.logprobs must cover the largest
number asked in the batch). In-place state updates are index_add_ into persistent tensors. Checked
on an H200 (bench/device_sampler.py): replays of a captured sample() equal eager calls bit for bit.
Rows in one call must be distinct; padding rows of a graph bucket must point at free rows (their
state is reset by the next assign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch

from mojollm.sampling_params import SamplingParams

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
# columns of the per-row parameter tensors
_TEMP, _TOP_P, _MIN_P, _REP, _PRES, _FREQ = range(6)
_TOP_K, _KEY_LO, _KEY_HI = range(3)


@dataclass(frozen=True)
class SamplePlan:
    """Host-known shape of one sample() call; hashable, so it can key captured graphs."""
    greedy_only: bool = False   # every row greedy: argmax only, no RNG, no filters
    penalties: bool = True      # apply penalties and record the drawn tokens in the output counts
    sort: bool = True           # some sampled row uses top-k or top-p (one [S, V] sort)
    logprobs: int = -1          # -1: none; 0: the chosen token's; k > 0: also the top-k


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor                  # int32 [S]
    logprobs: torch.Tensor | None = None     # float32 [S]: chosen token, raw log_softmax
    top_ids: torch.Tensor | None = None      # int32 [S, k], most likely first
    top_logprobs: torch.Tensor | None = None  # float32 [S, k]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def rng_key(seed: int, stream: int = 0) -> int:
    """64-bit RNG key of (seed, stream) on the host (stream: the sample index of an n > 1 request)."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (stream & _M64))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without leaving 63 bits."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer (a bijection with full avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """u in [0, 1) (24 bits, float32) per element of the int64 tensors; a bijection of step mod 2**32."""
    x = (key_lo + _mul32(step & _M32, 0x9E3779B9)) & _M32
    h = _fmix32(_fmix32(x) ^ key_hi)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


class DeviceSampler:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        dev = self.device
        self.fparams = torch.zeros(max_num_seqs, 6, dtype=torch.float32, device=dev)
        self.iparams = torch.zeros(max_num_seqs, 3, dtype=torch.int64, device=dev)
        self.step = torch.zeros(max_num_seqs, dtype=torch.int64, device=dev)
        self.prompt_mask: torch.Tensor | None = None  # bool [R, V], allocated with the first penalty
        self.counts: torch.Tensor | None = None       # int32 [R, V]
        self._row_ids = torch.arange(max_num_seqs, device=dev)
        self._vocab_ids = torch.arange(vocab_size, device=dev)
        self._params: list[SamplingParams | None] = [None] * max_num_seqs
        for row in range(max_num_seqs):
            self._write_defaults(row)

    # ---- host side (not graph-safe: host-to-device copies) ----
    def assign(self, row: int, params: SamplingParams, seed: int, stream: int = 0,
               prompt_token_ids: Sequence[int] = (), output_token_ids: Sequence[int] = ()) -> None:
        """Point `row` at a request: its params, RNG key (seed, stream), prompt tokens (repetition
        penalty) and the output tokens it already has (preemption/recompute: penalties count
        them and the RNG stream continues at step len(output_token_ids))."""
        if not 0 <= row < self.max_num_seqs:
            raise ValueError(f"row {row} out of range [0, {self.max_num_seqs})")
        if params.use_beam_search:
            raise ValueError("beam search is not sampled on the device")
        self._params[row] = params
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        key = rng_key(seed, stream)
        self.fparams[row].copy_(torch.tensor(
            [params.temperature, params.top_p, params.min_p, params.repetition_penalty,
             params.presence_penalty, params.frequency_penalty], dtype=torch.float32))
        self.iparams[row].copy_(torch.tensor([top_k, key & _M32, key >> 32], dtype=torch.int64))
        self.step[row] = len(output_token_ids)
        if params.has_penalties and self.counts is None:
            shape = (self.max_num_seqs, self.vocab_size)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        if self.counts is not None:
            self.prompt_mask[row].zero_()
            self.counts[row].zero_()
            if params.has_penalties:
                if len(prompt_token_ids):
                    ids = torch.as_tensor(prompt_token_ids, dtype=torch.int64).to(self.device)
                    self.prompt_mask[row].index_fill_(0, ids, True)
                if len(output_token_ids):
                    ids = torch.as_tensor(output_token_ids, dtype=torch.int64).to(self.device)
                    self.counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def release(self, row: int) -> None:
        """Free `row` (neutral greedy params; it no longer counts in the default plan)."""
        self._params[row] = None
        self._write_defaults(row)

    def _write_defaults(self, row: int) -> None:
        self.fparams[row].copy_(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
        self.iparams[row].copy_(torch.tensor([self.vocab_size, 0, 0]))

    def plan(self, rows: Iterable[int] | None = None) -> SamplePlan:
        """Tightest plan for these rows (default: every assigned row), from the host copies."""
        rows = range(self.max_num_seqs) if rows is None else rows
        ps = [p for p in (self._params[r] for r in rows) if p is not None]
        sampled = [p for p in ps if not p.greedy]
        return SamplePlan(
            greedy_only=not sampled,
            penalties=any(p.has_penalties for p in ps),
            sort=any(0 < p.top_k < self.vocab_size or p.top_p < 1.0 for p in sampled),
            logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1),
        )

    # ---- device side (graph-safe) ----
    def sample(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
               plan: SamplePlan | None = None) -> SamplerOutput:
        """Next tokens of rows `rows` (int tensor [S] on the device, distinct; None: rows 0..S-1)
        from `logits` [S, V] (float32 or bf16). Advances those rows' steps and output counts."""
        S = logits.shape[0]
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, the sampler {self.vocab_size}")
        if plan is None:
            plan = self.plan(range(S) if rows is None else None)
        idx = self._row_ids[:S] if rows is None else rows.long()
        f = self.fparams[idx]
        raw = logits.float()
        x = self._penalise(raw, idx, f) if plan.penalties and self.counts is not None else raw
        tokens = x.argmax(dim=-1)  # first maximum: lowest id on ties
        if not plan.greedy_only:
            drawn = self._draw(x, f, self.iparams[idx], self.step[idx], plan.sort)
            tokens = torch.where(f[:, _TEMP] == 0, tokens, drawn)
        self.step.index_add_(0, idx, torch.ones_like(idx))
        if plan.penalties and self.counts is not None:
            flat = idx * self.vocab_size + tokens
            self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        out = SamplerOutput(tokens.to(torch.int32))
        if plan.logprobs >= 0:
            lp = torch.log_softmax(raw, dim=-1)
            out = out._replace(logprobs=lp.gather(1, tokens[:, None]).squeeze(1))
            if plan.logprobs > 0:
                top_lp, top_ids = lp.topk(min(plan.logprobs, self.vocab_size), dim=-1)
                out = out._replace(top_ids=top_ids.to(torch.int32), top_logprobs=top_lp)
        return out

    def _penalise(self, x: torch.Tensor, idx: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        counts = self.counts[idx]
        present = counts > 0
        seen = self.prompt_mask[idx] | present
        r = f[:, _REP, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        return x - f[:, _PRES, None] * present - f[:, _FREQ, None] * counts.float()

    def _draw(self, x: torch.Tensor, f: torch.Tensor, i: torch.Tensor, step: torch.Tensor,
              sort: bool) -> torch.Tensor:
        t = f[:, _TEMP, None]
        x = x / torch.where(t > 0, t, torch.ones_like(t))
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        keep = e >= f[:, _MIN_P, None]
        if sort:
            keep = keep & self._top_k_top_p(x, i[:, _TOP_K], f[:, _TOP_P])
        cum = _cumsum_rows(torch.where(keep, e, torch.zeros_like(e)))  # [S, >= V], flat past V
        total = cum[:, -1:].contiguous()
        u = uniform(i[:, _KEY_LO], i[:, _KEY_HI], step)[:, None] * total
        pos = torch.searchsorted(cum, u, right=True)         # first cum > u: a token with e > 0
        last = torch.searchsorted(cum, total, right=False)   # the last token with e > 0
        return torch.minimum(pos, last).squeeze(1)            # (u * total may round up to total)

    def _top_k_top_p(self, x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Keep-mask [S, V] in id order; top_k = V and top_p = 1 are exactly 'off'.

        Both keep a prefix of the stable descending order, so the mask is 'before the last kept
        entry of that order': value above its value, or equal to it with an id not above its id."""
        V = x.shape[1]
        vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
        in_k = self._vocab_ids[None, :] < top_k[:, None]
        es = torch.where(in_k, torch.exp(vals - vals[:, :1]), torch.zeros_like(vals))
        cum = _cumsum_rows(es)
        before = torch.nn.functional.pad(cum[:, :V - 1], (1, 0))  # exclusive prefix, monotone
        p = top_p[:, None]
        in_p = (before < p * cum[:, -1:]) | (p >= 1.0)
        last = (in_k & in_p).sum(dim=-1, keepdim=True) - 1     # >= 0: the top entry is always kept
        thr, thr_id = vals.gather(1, last), order.gather(1, last)
        return (x > thr) | ((x == thr) & (self._vocab_ids[None, :] <= thr_id))


def _cumsum_rows(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive cumsum along dim 1 of [S, V], in blocks (a scan over one long row is slow on a GPU).

    Returns [S, V'] with V' >= V (V rounded up to a multiple of `block`); the entries past V repeat
    the total, so a search in it never lands past V - 1 except at the total itself."""
    S, V = x.shape
    if V <= block:
        return x.cumsum(dim=1)
    nb = -(-V // block)
    inner = torch.nn.functional.pad(x, (0, nb * block - V)).view(S, nb, block).cumsum(dim=2)
    sums = inner[:, :, -1]
    return (inner + (sums.cumsum(dim=1) - sums)[:, :, None]).view(S, nb * block)
