"""Speculative decoding: propose k tokens cheaply, verify them with one target step, keep the
longest prefix the target agrees with (Leviathan et al. 2023; vLLM's and llama.cpp's scheme).

    config = SpeculativeConfig.of({"method": "ngram", "num_tokens": 4})
    proposer = make_proposer(config, engine)

Proposers (one interface: `lookahead(seq)` before scheduling, `propose(scheduled)` after):
  ngram  prompt lookup: the last n tokens (n from ngram_max down to ngram_min) are searched in the
         sequence's earlier tokens; the k tokens that followed the latest match are proposed.
  self   the target's own first `draft_layers` layers, its final norm and LM head (early exit),
         run k times over the sequence's own KV slots (the verify step then overwrites them).
  draft  a second model with the target's vocabulary, its own paged KV cache and block pool, on
         the same backend.

Verification (engine side): the sequence's last token and its k drafts run as k + 1 rows of one
decode step (row j of sequence s has context p + j + 1: the decode kernels do the causal mask).
Row j's logits are the target's distribution after draft j. Greedy: drafts are accepted while
they equal the target's argmax; the first mismatch is replaced by the argmax; when all k pass,
row k gives one more token. Sampling: draft d is accepted with probability min(1, p(d) / q(d))
(q: the proposer's distribution, a point mass for ngram), a rejection draws from
normalize(max(p - q, 0)); so every emitted token has the target's distribution. Rejected rows'
KV slots lie past the sequence's computed tokens: they are never read, their blocks go back to
the pool, and no block holding them is ever offered to the prefix cache.

Speculation switches itself off where it does not pay (Governor): it measures what a decode
step of T rows costs on this machine and what drafting costs, estimates each request's
acceptance rate a over its last `window` proposed tokens (starting from the engine-wide rate),
and picks the k that maximises the expected tokens per second,
(1 + a + ... + a^k) / (cost(S + k) + k * draft_cost), against one token per cost(S). When no k
gains `min_gain`, the request decodes plainly, then probes with one draft after `retry` steps
(the pause doubling while it keeps failing), which refreshes its rate. Above
`max_batch` running sequences nobody speculates (the step is compute-bound there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mojollm.engine.block_manager import BlockManager
from mojollm.engine.runner import create_runner
from mojollm.engine.sampler import draw, filtered_candidates
from mojollm.engine.sequence import Sequence
from mojollm.engine.step import StepBatch

METHODS = ("ngram", "self", "draft")


@dataclass
class SpeculativeConfig:
    method: str
    num_tokens: int = 4             # k: tokens proposed per step
    ngram_max: int = 4              # ngram: longest suffix searched
    ngram_min: int = 1              # ngram: shortest suffix searched
    draft_layers: int | list[int] | None = None  # self: the first n layers (default: half), or a list
    draft_model: str | None = None  # draft: the second model (path or name)
    max_batch: int = 8              # no speculation while more sequences than this are running
    min_gain: float = 1.05          # speculate only where the expected speedup is at least this
    window: int = 32                # acceptance is estimated over this many last proposed tokens
    retry: int = 16                 # steps before a request that stopped speculating probes again
    extra: dict = field(default_factory=dict)  # the draft model's load options (draft)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_tokens", "ngram_max", "ngram_min", "max_batch", "window", "retry"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"speculative {name} must be an integer >= 1, got {v!r}")
        if self.num_tokens > 16:
            raise ValueError(f"speculative num_tokens must be at most 16, got {self.num_tokens}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"speculative ngram_min ({self.ngram_min}) exceeds ngram_max ({self.ngram_max})")
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) or not self.min_gain > 0:
            raise ValueError(f"speculative min_gain must be a number > 0, got {self.min_gain!r}")
        dl = self.draft_layers
        if isinstance(dl, (list, tuple)):
            if not dl or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in dl):
                raise ValueError(f"speculative draft_layers must list layer indices >= 0, got {dl!r}")
            self.draft_layers = sorted({int(i) for i in dl})
        elif dl is not None and (isinstance(dl, bool) or not isinstance(dl, (int, np.integer)) or dl < 1):
            raise ValueError(f"speculative draft_layers must be an integer >= 1 or a list of layers, got {dl!r}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs a draft_model")

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, a method name, or a dict of the fields ('method' required)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown speculative option(s): {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
            if "method" not in value:
                raise ValueError("speculative needs a 'method' (ngram, self or draft)")
            return cls(**value)
        raise ValueError(f"speculative must be a method name or a dict, got {type(value).__name__}")


@dataclass
class SpecState:
    """Per-sequence speculation state (lives on Sequence.spec)."""
    drafts: list[int] = field(default_factory=list)         # this step's proposed tokens
    draft_probs: list[np.ndarray] | None = None             # q per draft (dense [V]); None: point masses
    recent: list[tuple[int, int]] = field(default_factory=list)  # (proposed, accepted) per step
    off_until_step: int = 0                                  # adaptive switch-off ...
    backoff: int = 0                                         # ... and its next pause (steps)


# ---------------------------------------------------------------- when to speculate

class Governor:
    """Measured costs and each request's acceptance decide k (0: do not speculate)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.step_cost: dict[int, float] = {}  # decode-step rows -> seconds (moving average)
        self.draft_cost = 0.0                  # seconds per drafted token (moving average)
        self.proposed = 0.0                    # engine-wide drafts proposed / accepted (decaying):
        self.accepted = 0.0                    # a new request's prior acceptance rate

    def record_step(self, rows: int, seconds: float) -> None:
        old = self.step_cost.get(rows)
        self.step_cost[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def record_drafts(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * seconds / tokens if self.draft_cost else seconds / tokens

    def cost(self, rows: int) -> float | None:
        """A step of `rows` rows: measured, else interpolated, else extrapolated from the two
        largest measured sizes (None before any measurement: optimistic, so it gets tried)."""
        known = sorted(self.step_cost)
        if not known:
            return None
        if rows in self.step_cost:
            return self.step_cost[rows]
        lo = max((r for r in known if r < rows), default=None)
        hi = min((r for r in known if r > rows), default=None)
        if lo is not None and hi is not None:
            f = (rows - lo) / (hi - lo)
            return self.step_cost[lo] + f * (self.step_cost[hi] - self.step_cost[lo])
        if hi is not None:
            return self.step_cost[hi]
        if len(known) == 1:
            return None  # nothing to extrapolate from: try it
        a, b = known[-2], known[-1]
        slope = max(0.0, (self.step_cost[b] - self.step_cost[a]) / (b - a))
        return self.step_cost[b] + slope * (rows - b)

    def choose(self, spec: "SpecState", decoding: int, kmax: int, step: int) -> int:
        """Draft tokens for one request in a step where `decoding` sequences decode."""
        if spec.off_until_step > step:
            return 0
        if spec.backoff and not spec.recent:  # a pause just ended: probe, with one draft (cheap)
            return 1
        prior = (self.accepted + 1) / (self.proposed + 2)  # the engine's rate (0.5 before any)
        proposed = sum(n for n, _ in spec.recent)
        alpha = (sum(a for _, a in spec.recent) + 4 * prior) / (proposed + 4)
        base = self.cost(decoding)
        best_k, best_gain = 0, self.config.min_gain
        for k in range(1, kmax + 1):
            cost = self.cost(decoding + k)
            if base is None or cost is None:
                return kmax  # not measured yet: measure it
            tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
            gain = tokens * base / (cost + k * self.draft_cost)
            if gain > best_gain:
                best_k, best_gain = k, gain
        if best_k == 0:  # it does not pay for this request now: pause, longer each time
            spec.backoff = min(2 * spec.backoff, 64 * self.config.retry) if spec.backoff else self.config.retry
            spec.off_until_step = step + spec.backoff
            spec.recent.clear()  # after the pause: a fresh estimate
        return best_k

    def after_verify(self, spec: "SpecState", k: int, accepted: int) -> None:
        self.proposed = 0.99 * self.proposed + k
        self.accepted = 0.99 * self.accepted + accepted
        spec.recent.append((k, accepted))
        while sum(n for n, _ in spec.recent) - spec.recent[0][0] >= self.config.window:
            spec.recent.pop(0)
        if accepted:
            spec.backoff = 0


# ---------------------------------------------------------------- proposers

class NgramProposer:
    """Prompt lookup: continue the latest earlier occurrence of the sequence's last n tokens."""

    needs_slots = False

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def lookahead(self, seq: Sequence, k: int) -> int:
        seq.spec.drafts = find_continuation(seq.token_ids, k, self.config.ngram_min, self.config.ngram_max)
        seq.spec.draft_probs = None
        return len(seq.spec.drafts)

    def propose(self, scheduled: list[tuple[Sequence, int]]) -> None:
        for seq, k in scheduled:
            del seq.spec.drafts[k:]

    def release(self, seq: Sequence) -> None:
        pass


def find_continuation(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` of n_max..n_min tokens ([] when none occurs)."""
    L = len(tokens)
    if L < n_min + 1 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = arr[L - n:]
        # windows starting at 0..L-n-1 (the suffix itself excluded), each followed by >= 1 token
        win = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)
        hits = np.flatnonzero((win == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


class _ModelDrafter:
    """Shared part of the model-based proposers: k autoregressive draft steps over a batch of
    sequences, each drawing its token greedily (greedy requests) or from the draft's filtered
    distribution q (whose dense rows are kept for the acceptance test)."""

    needs_slots = True

    def __init__(self, config: SpeculativeConfig, engine):
        self.config = config
        self.engine = engine

    def lookahead(self, seq: Sequence, k: int) -> int:
        seq.spec.drafts = []
        seq.spec.draft_probs = None
        return k

    def _draw(self, seq: Sequence, row: np.ndarray) -> tuple[int, np.ndarray | None]:
        params = seq.request.params
        if params.greedy:
            return int(np.argmax(row)), None
        z = self.engine.sampler.processed_logits(row, seq)
        ids, p = filtered_candidates(z, params)
        q = np.zeros(row.shape[0], dtype=np.float64)
        q[ids] = p
        return draw(ids, p, seq.rng), q

    def _record(self, seq: Sequence, token: int, q: np.ndarray | None) -> None:
        seq.spec.drafts.append(token)
        if q is not None:
            if seq.spec.draft_probs is None:
                seq.spec.draft_probs = []
            seq.spec.draft_probs.append(q)


class SelfProposer(_ModelDrafter):
    """Early exit: the target's first layers (or any subset: layer skipping), final norm and LM
    head draft over the target's own KV cache (slots of positions p..p+k-1 that the verify step
    rewrites; the layers skipped leave theirs untouched)."""

    def __init__(self, config: SpeculativeConfig, engine):
        super().__init__(config, engine)
        if getattr(engine.runner, "layer_subsets", True) is False:
            raise ValueError(f"speculative method 'self' is not supported by the {type(engine.runner).__name__} "
                             "(it compiles the whole model); use ngram or draft")
        n = len(getattr(engine.model, "layers", ()))
        if n < 2:
            raise ValueError("speculative method 'self' needs a model with layers to skip (a Llama-family model)")
        dl = config.draft_layers
        self.layers = list(range(dl or n // 2)) if not isinstance(dl, list) else dl
        if len(self.layers) >= n or self.layers[-1] >= n:
            raise ValueError(f"speculative draft_layers must leave out some of the model's {n} layers, "
                             f"got {config.draft_layers!r}")

    def propose(self, scheduled: list[tuple[Sequence, int]]) -> None:
        bm = self.engine.block_manager
        live = [(seq, k) for seq, k in scheduled if k > 0]
        kmax = max((k for _, k in live), default=0)
        for j in range(kmax):
            rows = [(seq, k) for seq, k in live if k > j]
            ids, pos, slots, tables, lens = [], [], [], [], []
            width = max(len(seq.block_table) for seq, _ in rows)
            for seq, _ in rows:
                p = seq.num_computed_tokens + j  # the last real token at j = 0, then draft j
                ids.append(seq.token_ids[-1] if j == 0 else seq.spec.drafts[j - 1])
                pos.append(p)
                slots.append(bm.slot(seq, p))
                tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
                lens.append(p + 1)
            S = len(rows)
            batch = StepBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(slots, np.int64),
                              np.array(tables, np.int32).reshape(S, width), np.array(lens, np.int32),
                              np.arange(S + 1, dtype=np.int32), np.arange(S, dtype=np.int32), True)
            logits = self.engine.runner.execute(batch, None, layers=self.layers).logits
            for (seq, _), row in zip(rows, logits):
                self._record(seq, *self._draw(seq, row))

    def release(self, seq: Sequence) -> None:
        pass


class DraftModelProposer(_ModelDrafter):
    """A second, smaller model: its own runner, KV pool and block bookkeeping per sequence.
    Each step it first runs the tokens the target accepted since its last step (the whole
    prompt the first time), then drafts k tokens."""

    def __init__(self, config: SpeculativeConfig, engine, draft_model):
        super().__init__(config, engine)
        if draft_model is engine.model:
            raise ValueError("the draft model must be a model object of its own (it gets its own KV cache)")
        if int(draft_model.config.vocab_size) != engine.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs "
                             f"from the target's ({engine.vocab_size})")
        self.model = draft_model
        bs = engine.block_size
        per_block = int(draft_model.kv_cache_bytes_per_block(bs))
        # as many blocks as the target's pool has tokens (the draft never holds more than the target)
        num_blocks = engine.num_blocks
        self.runner = create_runner(draft_model, engine.scheduler.max_num_seqs, engine.max_model_len)
        self.runner.allocate_kv_cache(num_blocks, bs)
        self.blocks = BlockManager(num_blocks, bs, enable_prefix_caching=False)
        self.kv_bytes = num_blocks * per_block
        self._seqs: dict[int, Sequence] = {}  # target seq id -> the draft's own Sequence (tokens, blocks)

    def _draft_seq(self, seq: Sequence) -> Sequence:
        d = self._seqs.get(seq.seq_id)
        if d is None:
            d = Sequence(seq.request, [], 0)
            self._seqs[seq.seq_id] = d
        return d

    def propose(self, scheduled: list[tuple[Sequence, int]]) -> None:
        # The draft's own sequence keeps the tokens it ran, drafts included: at the next step the
        # ones the target rejected no longer match its tokens and are rolled back (BlockManager.trim).
        live = []
        for seq, k in scheduled:
            if k <= 0:
                continue
            d = self._draft_seq(seq)
            # keep the draft's computed tokens only where they equal the target's (rollback)
            same = 0
            for a, b in zip(d.token_ids[:d.num_computed_tokens], seq.token_ids):
                if a != b:
                    break
                same += 1
            same = min(same, seq.num_tokens - 1)  # at least the last token runs (it yields logits)
            d.token_ids = list(seq.token_ids)
            d.num_computed_tokens = min(d.num_computed_tokens, same)  # roll back the rest ...
            self.blocks.trim(d)  # ... and free its blocks
            need = seq.num_tokens - same + k - 1
            if not self.blocks.allocate_slots(d, need):
                self.release(seq)  # no room in the draft's pool: this sequence does not speculate
                continue
            live.append((seq, d, k))
        if not live:
            return
        # step 0: every sequence's uncomputed tokens (logits of its last one), one prefill-style batch
        self._run([(d, d.token_ids[d.num_computed_tokens:]) for _, d, _ in live], live)
        kmax = max(k for _, _, k in live)
        for j in range(1, kmax):
            rows = [(seq, d, k) for seq, d, k in live if k > j]
            self._run([(d, [seq.spec.drafts[j - 1]]) for seq, d, _ in rows], rows)

    def _run(self, chunks: list[tuple[Sequence, list[int]]], rows) -> None:
        ids, pos, slots, cu, lens, last = [], [], [], [0], [], []
        width = max(len(d.block_table) for d, _ in chunks)
        tables = np.zeros((len(chunks), width), np.int32)
        for i, (d, toks) in enumerate(chunks):
            start = d.num_computed_tokens
            if start + len(toks) > len(d.token_ids):
                d.token_ids.extend(toks[len(d.token_ids) - start:])
            for j, t in enumerate(toks):
                ids.append(t)
                pos.append(start + j)
                slots.append(self.blocks.slot(d, start + j))
            tables[i, :len(d.block_table)] = d.block_table
            cu.append(cu[-1] + len(toks))
            lens.append(start + len(toks))
            last.append(cu[-1] - 1)
            d.num_computed_tokens += len(toks)
        decode = all(len(toks) == 1 for _, toks in chunks)
        batch = StepBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(slots, np.int64), tables,
                          np.array(lens, np.int32), np.array(cu, np.int32), np.array(last, np.int32), decode)
        logits = self.runner.execute(batch, None).logits
        for (seq, _, _), row in zip(rows, logits):
            self._record(seq, *self._draw(seq, row))

    def release(self, seq: Sequence) -> None:
        d = self._seqs.pop(seq.seq_id, None)
        if d is not None:
            self.blocks.free(d)


def make_proposer(config: SpeculativeConfig, engine, draft_model=None):
    if config.method == "ngram":
        return NgramProposer(config)
    if config.method == "self":
        return SelfProposer(config, engine)
    if draft_model is None:
        raise ValueError("speculative method 'draft' needs a loaded draft model")
    return DraftModelProposer(config, engine, draft_model)


# ---------------------------------------------------------------- acceptance

def accept_draft(p_ids: np.ndarray, p: np.ndarray, draft: int, q: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[bool, int | None]:
    """One step of the rejection rule on the target's filtered distribution (p_ids, p).

    Returns (accepted, token): (True, draft) or (False, a token drawn from normalize(max(p - q, 0))).
    q: the draft's dense distribution, None for a point mass on `draft`."""
    pd = float(p[p_ids == draft].sum()) if p_ids.size else 0.0
    qd = 1.0 if q is None else float(q[draft])
    u = rng.random()
    if qd > 0.0 and u * qd < pd:  # u < p(d) / q(d), without dividing
        return True, draft
    if q is None:
        resid = np.where(p_ids == draft, 0.0, p)
    else:
        resid = np.maximum(p - q[p_ids], 0.0)
    if resid.sum() <= 0.0:  # p <= q everywhere that p lives (only rounding can get here): p itself
        resid = p
    return False, draw(p_ids, resid, rng)
