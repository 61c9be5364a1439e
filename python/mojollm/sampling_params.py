"""How one request is decoded: SamplingParams (vLLM's names and defaults where they exist).

Order in which the knobs act on a logits row (same as vLLM):
    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p -> draw.
temperature == 0 means greedy (argmax of the penalised logits). beam_width > 1 switches to beam
search, which ranks hypotheses by the model's (penalised) log-probabilities and ignores
temperature/top-k/top-p/min-p. Every check raises ValueError with a one-line message.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass
class SamplingParams:
    n: int = 1                       # independent samples per prompt (they share the prompt's KV blocks)
    max_tokens: int = 64             # new tokens per sample, at most
    temperature: float = 1.0         # 0 -> greedy
    top_k: int = 0                   # 0 or -1 -> off
    top_p: float = 1.0               # nucleus mass in (0, 1]
    min_p: float = 0.0               # drop tokens with p < min_p * p_max, in [0, 1]
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive logits (multiply negative) of seen tokens
    presence_penalty: float = 0.0    # OpenAI: subtract once per generated token id present
    frequency_penalty: float = 0.0   # OpenAI: subtract per occurrence in the generated tokens
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None          # per-request generator: same output whatever the batch
    logprobs: int | None = None      # return the chosen token's and the top-k tokens' log-probs
    beam_width: int = 1
    length_penalty: float = 1.0      # beam score = sum logprob / (generated tokens ** length_penalty)
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None  # speculative decoding: None = the engine's k, 0 = off

    def __post_init__(self) -> None:
        self.stop = _as_list(self.stop, "stop", str, "strings")
        self.stop_token_ids = [int(t) for t in _as_list(self.stop_token_ids, "stop_token_ids", _is_int, "integers")]
        if self.top_k == -1 and _is_int(self.top_k):
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or not self.temperature >= 0.0 or self.temperature == float("inf"):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be 0 (off), -1 (off) or a positive integer, got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop strings must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative token ids")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad(f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        if self.num_speculative_tokens is not None and (not _is_int(self.num_speculative_tokens)
                                                        or self.num_speculative_tokens < 0):
            bad(f"num_speculative_tokens must be None or an integer >= 0, got {self.num_speculative_tokens!r}")
        if not _is_int(self.beam_width) or self.beam_width < 1:
            bad(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not _is_num(self.length_penalty) or abs(self.length_penalty) == float("inf") or self.length_penalty != self.length_penalty:
            bad(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.beam_width > 1:
            if self.n > self.beam_width:
                bad(f"n ({self.n}) must not exceed beam_width ({self.beam_width})")
            if self.stop:
                bad("stop strings are not supported with beam search (use stop_token_ids)")

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _as_list(value, name: str, item_ok, what: str) -> list:
    """None -> [], one item -> [item], a list/tuple of acceptable items -> a copy; else ValueError."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    ok = (lambda v: isinstance(v, item_ok)) if isinstance(item_ok, type) else item_ok
    if not all(ok(v) for v in items):
        raise ValueError(f"{name} must be a list of {what}, got {value!r}")
    return items


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
