"""The public Python API.

    from mojollm import LLM, SamplingParams
    llm = LLM()                                   # the default model on the best backend here
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    print(out[0].text, out[0].metrics.ttft)
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(delta, end="", flush=True)
    llm.chat([{"role": "user", "content": "Hi!"}])
    llm.perplexity(open("wiki.txt").read())

Prompts go through the continuous-batching engine (mojollm.engine.engine.Engine); a list of
prompts runs as one batch.
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

from mojollm.errors import RequestFailed
from mojollm.sampling_params import SamplingParams


@dataclass
class ScoreOutput:
    """Teacher-forced scores: logprobs[i] = log p(token_ids[i + 1] | token_ids[: i + 1])."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def num_scored(self) -> int:
        return len(self.logprobs)


def check_text(text: str, what: str) -> str:
    """`text` unchanged if it is valid Unicode that UTF-8 can encode (no lone surrogates, which is
    what undecodable bytes on a command line become)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: character {e.start} is a lone surrogate "
                         f"(undecodable bytes?)") from None
    return text


def _token_ids(prompt) -> list[int] | None:
    """A prompt given as token ids (a list/tuple/1-D integer array), as a list; None otherwise.
    Bytes are not token ids: b"Hi" is text in an encoding we cannot guess."""
    if isinstance(prompt, (str, bytes, bytearray, memoryview)):
        return None
    if hasattr(prompt, "ndim") and hasattr(prompt, "dtype"):  # numpy (or any array) of integers
        import numpy as np

        if prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
            return [int(t) for t in prompt]
        return None
    if isinstance(prompt, Sequence) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    return None


class TextStream:
    """Iterator of text deltas of one request; `.output` is its final RequestOutput once exhausted.

    Text that could still turn out to be the start of a stop string is held back until it cannot.
    A request that fails raises RequestFailed from the iterator (after the text it produced). A
    stream dropped before it finished (never iterated, or left early) is aborted: its blocks come
    back at the next step.
    """

    def __init__(self, llm: "LLM", request_id: str):
        self._llm = llm
        self.request_id = request_id
        self.output = None
        self._emitted = 0
        # Runs when the stream is garbage-collected unfinished; only queues the abort, because a
        # collection can happen on any thread, even in the middle of a step.
        self._finalizer = weakref.finalize(self, llm._orphans.append, request_id)

    def __iter__(self) -> Iterator[str]:
        llm = self._llm
        try:
            while self.output is None or not self.output.finished:
                out = llm._next_output(self.request_id)
                if out is None:
                    break
                self.output = out
                if out.outputs:
                    stable = out.num_stable_chars[0] if out.num_stable_chars else len(out.text)
                    if stable > self._emitted:
                        delta = out.text[self._emitted:stable]
                        self._emitted = stable
                        yield delta
            if self.output is not None and self.output.error:
                raise RequestFailed(self.output.error)
        finally:
            self._finalizer.detach()
            if self.output is None or not self.output.finished:
                llm._abort(self.request_id)  # the consumer stopped early: free the blocks


class LLM:
    """One model and its engine. Safe to share between threads: every engine step runs under one
    lock, and a step serves the requests of all threads at once (continuous batching)."""

    def __init__(self, model=None, backend: str | None = None, progress=None, **engine_kwargs):
        """`model`: None (the default model), a .gguf path, a Hugging Face directory, or an already
        loaded model object (anything with forward/config/tokenizer). `backend`: cpu, cuda, rocm,
        tpu or auto; None means $MOJOLLM_BACKEND, else auto (the CLI's rule). Extra keyword
        arguments go to Engine (block_size, num_blocks, kv_cache_memory, kv_cache_dtype (auto | float32 |
        bfloat16 | float16 | int8 | fp8: mojollm.kv_dtypes), max_num_batched_tokens, ...);
        `speculative` turns on speculative decoding: a method name ("ngram", "self", "draft") or a
        dict of mojollm.engine.speculative.SpeculativeConfig's fields, e.g.
        {"method": "draft", "draft_model": "path/to/small.gguf", "num_tokens": 4}."""
        from mojollm.engine.engine import Engine
        from mojollm.engine.speculative import SpeculativeConfig

        if model is not None and hasattr(model, "forward") and hasattr(model, "tokenizer"):
            self.model = model
            self.backend = getattr(model, "backend", None)
        else:
            from mojollm.backends import get_backend
            from mojollm.models import load_model

            self.backend = get_backend(backend)
            self.model = load_model(model, self.backend, progress=progress)
        self.tokenizer = self.model.tokenizer
        speculative = SpeculativeConfig.of(engine_kwargs.pop("speculative", None))
        draft = None
        if speculative is not None and speculative.method == "draft":
            draft = speculative.draft_model
            if not (hasattr(draft, "forward") and hasattr(draft, "config")):
                from mojollm.models import load_model

                draft = load_model(draft, self.backend, progress=progress)
        self.engine = Engine(self.model, progress=progress, speculative=speculative, draft_model=draft,
                             **engine_kwargs)
        # newest output of every request, whoever stepped the engine (streams and generate calls
        # may interleave on one LLM; each takes only its own requests' outputs)
        self._latest: dict[str, object] = {}
        self._lock = threading.RLock()
        self._orphans: list[str] = []  # request ids of streams collected unfinished

    # ---------------------------------------------------------------- engine access (locked)
    def _step(self) -> None:
        """One engine step; the caller holds the lock."""
        while self._orphans:
            self._abort(self._orphans.pop())
        for out in self.engine.step():
            self._latest[out.request_id] = out

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._latest.pop(request_id, None)

    def _add_requests(self, prompts: list[list[int]], params: list[SamplingParams], priorities: list[int],
                      texts: list[str | None]) -> list[str]:
        """Queue a whole batch or nothing: params are checked (and copied) for every prompt first."""
        checked = [self.engine.check_params(sp) for sp in params]
        added: list[str] = []
        with self._lock:
            try:
                for ids, sp, prio, text in zip(prompts, checked, priorities, texts, strict=True):
                    added.append(self.engine.add_request(ids, sp, priority=prio, prompt=text))
            except BaseException:
                for rid in added:
                    self._abort(rid)
                raise
        return added

    def _next_output(self, request_id: str):
        """The newest output of `request_id`, stepping the engine until there is one; None once
        the request is gone (aborted)."""
        while True:
            with self._lock:
                out = self._latest.pop(request_id, None)
                if out is not None:
                    return out
                if not self.engine.knows(request_id):
                    return None
                self._step()

    @property
    def backend_name(self) -> str | None:
        return getattr(self.backend, "name", None)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---------------------------------------------------------------- prompts
    def _prompt_ids(self, prompt, add_special_tokens: bool = True) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("the prompt is empty")
            return self.tokenizer.encode(check_text(prompt, "the prompt"), add_special_tokens=add_special_tokens), prompt
        ids = _token_ids(prompt)
        if ids is None:
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids, None

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of one prompt (text or token ids) as generate() queues it: ValueError if it is
        empty, has ids outside the vocabulary, or leaves the context no room for a new token."""
        ids = self.engine.check_token_ids(self._prompt_ids(prompt)[0])
        self._check_fits(ids)
        return ids

    def _check_fits(self, ids: list[int], reserve: int = 1) -> None:
        limit = self.engine.max_seq_len - reserve  # past max_model_len under a streaming KV policy
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.engine.max_seq_len} "
                             f"(prompt plus at least {reserve} new token{'s' if reserve != 1 else ''})")

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (bytes, bytearray, memoryview)):
            raise ValueError("prompts must be text (str), not bytes: decode them first")
        ids = _token_ids(prompts)
        if ids:
            return [ids]  # one prompt of token ids
        if isinstance(prompts, Sequence):
            if len(prompts) == 0:
                raise ValueError("no prompts given")
            return list(prompts)
        raise ValueError("prompts must be a string, a list of strings, or token ids")

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 priority: int | list[int] = 0) -> list:
        """Generate for one prompt or a batch; returns RequestOutputs in prompt order.

        Bad prompts (empty, longer than the context) raise ValueError before anything runs; a
        failure while running (e.g. NaN logits) shows as `output.error` on that request only.
        """
        items = self._normalize_prompts(prompts)
        params_list = params if isinstance(params, list) else [params] * len(items)
        if len(params_list) != len(items):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(items)} prompts")
        prios = priority if isinstance(priority, list) else [priority] * len(items)
        if len(prios) != len(items):
            raise ValueError(f"{len(prios)} priorities for {len(items)} prompts")
        encoded = []
        for p in items:
            ids, text = self._prompt_ids(p)
            self._check_fits(ids)
            encoded.append((ids, text))
        request_ids = self._add_requests([e[0] for e in encoded], [sp or SamplingParams() for sp in params_list],
                                         prios, [e[1] for e in encoded])
        return self._wait(request_ids)

    def _wait(self, request_ids: list[str]) -> list:
        """Step the engine until every one of `request_ids` has finished; their final outputs."""
        pending = set(request_ids)
        done = {}
        try:
            while pending:
                with self._lock:
                    for rid in list(pending):
                        out = self._latest.get(rid)
                        if out is not None and out.finished:
                            done[rid] = self._latest.pop(rid)
                            pending.discard(rid)
                    if pending:
                        if not self.engine.has_unfinished():
                            raise RuntimeError("the engine stopped with requests unfinished")
                        self._step()
        finally:
            for rid in pending:
                self._abort(rid)
        return [done[r] for r in request_ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> TextStream:
        """Text deltas of one prompt as they are decoded (the first sample when n > 1)."""
        ids, text = self._prompt_ids(prompt)
        self._check_fits(ids)
        return self._stream(ids, params, text)

    def _stream(self, ids: list[int], params: SamplingParams | None, text: str | None) -> TextStream:
        params = self.engine.check_params(params)
        if params.use_beam_search:
            raise ValueError("beam search cannot stream: its beams change until the end")
        (rid,) = self._add_requests([ids], [params], [0], [text])
        return TextStream(self, rid)

    def chat_prompt_ids(self, messages) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for a new assistant turn;
        ValueError if they leave the context no room for a new token."""
        ids = self.chat_template_ids(messages)
        self._check_fits(ids)
        return ids

    def chat_template_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template applied to `messages` (no check against the context)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content'")
            check_text(m["content"], f"message {i}")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template has its own specials
        if not ids:
            raise ValueError("the chat prompt is empty")
        return ids

    def chat(self, messages, params: SamplingParams | None = None):
        """One assistant turn for `messages` ([{"role", "content"}...] or a user message string)."""
        return self.generate([self.chat_prompt_ids(messages)], params)[0]

    def chat_stream(self, messages, params: SamplingParams | None = None) -> TextStream:
        return self._stream(self.chat_prompt_ids(messages), params, None)

    # ---------------------------------------------------------------- scoring
    def score(self, text, add_special_tokens: bool = True) -> ScoreOutput:
        """Per-token log-probabilities of `text` (str or token ids) under the model, teacher-forced.

        The text must fit the context; the prefill runs in chunks of max_num_batched_tokens and
        returns every position's logits.
        """
        ids, _ = self._prompt_ids(text, add_special_tokens)
        self._check_fits(ids, reserve=0)
        return ScoreOutput(ids, self._score_ids(ids))

    def _score_ids(self, ids: list[int]) -> list[float]:
        with self._lock:
            rid = self.engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), _score_only=True)
        (out,) = self._wait([rid])
        if out.error:
            raise RuntimeError(f"scoring failed: {out.error}")
        return out.prompt_logprobs

    def perplexity(self, text, max_tokens: int | None = None) -> dict:
        """exp(-mean log p) over the text's tokens (at most `max_tokens` of them).

        Text longer than the context is cut into consecutive windows of the context length, each
        scored on its own (the first token of a window has no score). Under a streaming KV policy
        (sink-window) a window is the longest sequence the engine runs (max_position_embeddings). Returns
        {"ppl", "tokens" (scored), "nll" (mean negative log-likelihood, nats)}.
        """
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
        ids, _ = self._prompt_ids(text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError("the text needs at least 2 tokens to measure perplexity")
        window = self.engine.max_seq_len
        logprobs: list[float] = []
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if len(chunk) >= 2:
                logprobs.extend(self._score_ids(chunk))
        nll = -sum(logprobs) / len(logprobs)
        return {"ppl": math.exp(nll), "tokens": len(logprobs), "nll": nll}
