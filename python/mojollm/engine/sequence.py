"""Sequences and requests: the engine's bookkeeping, device-free.

A Request owns one or more Sequences: one while its prompt is prefilled, then n samples
(n > 1 forks the prompt's sequence, sharing its KV blocks) or beam_width beams.

Between steps a sequence satisfies
    len(block_table) == ceil(num_computed_tokens / block_size)
and its tokens num_computed_tokens..num_tokens-1 are what the next steps must still run through
the model (the whole prompt at first, then the one token sampled last step).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mojollm.engine.metrics import RequestMetrics
from mojollm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One token stream with its KV blocks (vLLM vocabulary: block_table, num_computed_tokens)."""

    def __init__(self, request: "Request", token_ids: list[int], num_prompt_tokens: int,
                 sample_index: int = 0):
        self.seq_id = next(_seq_counter)
        self.request = request
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.sample_index = sample_index
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0        # prompt tokens found in the prefix cache at admission
        self.block_hashes: list[int] = []  # hash chain of the full token blocks (prefix cache keys)
        self.num_registered_blocks = 0     # leading blocks already offered to the prefix cache
        # KV compression (engine/kv_policy.py): tokens dropped from the cache, the h2o state of the
        # rows kept (their positions and accumulated attention mass), and row copies for the step
        self.num_evicted_tokens = 0
        self.kv_positions: np.ndarray | None = None
        self.kv_scores: np.ndarray | None = None
        self.kv_copies: list[tuple[list[int], list[int]]] = []
        # sampling state
        self.rng: np.random.Generator | None = None
        self.device_rng_key: int | None = None   # a runner's RNG key for (seed, sample index), cached
        self.output_counts: Counter = Counter()  # generated token -> count (penalties)
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict] = []
        self.pending_logits: np.ndarray | None = None  # beam search: waits for its sibling beams
        # speculative decoding: slots asked for the next step's drafts, and the drafts' state
        self.num_lookahead = 0
        self.spec = None  # engine.speculative.SpecState while the request may speculate
        # detokenizer state (vLLM's incremental detokenization offsets)
        self.output_text = ""
        self.prefix_offset = max(num_prompt_tokens - 5, 0)
        self.read_offset = num_prompt_tokens
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    # ---- sizes ----
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_kv_tokens(self) -> int:
        """Rows this sequence holds in the KV cache (context_lens): its computed tokens less the
        evicted ones. A new token at position p goes to cache index p - num_evicted_tokens."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def priority_key(self) -> tuple[int, int, int]:
        """Smaller runs first: (priority, arrival order, sequence id)."""
        return (self.request.priority, self.request.arrival_index, self.seq_id)

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_counts[token] += 1

    def fork(self, sample_index: int) -> "Sequence":
        """A copy sharing everything computed so far (the block manager shares the blocks)."""
        child = Sequence(self.request, self.token_ids, self.num_prompt_tokens, sample_index)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        child.num_evicted_tokens = self.num_evicted_tokens
        child.kv_positions = None if self.kv_positions is None else self.kv_positions.copy()
        child.kv_scores = None if self.kv_scores is None else self.kv_scores.copy()
        child.output_counts = Counter(self.output_counts)
        child.cumulative_logprob = self.cumulative_logprob
        child.output_logprobs = list(self.output_logprobs)
        child.output_text = self.output_text
        child.prefix_offset, child.read_offset = self.prefix_offset, self.read_offset
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})")


_arrival_counter = itertools.count()


class Request:
    """A prompt and its decoding parameters; `seqs` are its live and finished sequences."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, priority: int = 0, prompt: str | None = None,
                 score_only: bool = False):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt_token_set = np.unique(np.asarray(prompt_token_ids, dtype=np.int64))  # repetition penalty
        self.params = params
        self.priority = priority
        self.arrival_index = next(_arrival_counter)
        self.score_only = score_only          # teacher-forced scoring: logits of every prompt token
        self.prompt_logprobs: list[float] = []  # score_only: log p(token i+1 | tokens <= i)
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids))
        self.seqs: list[Sequence] = [Sequence(self, prompt_token_ids, len(prompt_token_ids))]
        self.forked = False                    # n > 1: the prompt's sequence has been forked
        self.beam_hypotheses: list[dict] = []  # finished beams: score, token_ids, cumulative_logprob, ...
        self.base_seed = 0                     # sample k draws from default_rng([base_seed, k])
        self.finished = False
        self.error: str | None = None
        self.new_tokens_this_step = 0  # tokens appended to its sequences this step
        self.stop_token_set = set(params.stop_token_ids or ())
        self.stop_strings = list(params.stop or [])
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": {id: logprob}}
    finish_reason: str | None = None    # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    prompt_logprobs: list[float] | None = None
    num_stable_chars: list[int] = field(default_factory=list)  # per output: text safe to stream

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return "error" if self.error else (self.outputs[0].finish_reason if self.outputs else None)
