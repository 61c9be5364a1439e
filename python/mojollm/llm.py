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
from dataclasses import dataclass
from typing import Iterator, Sequence

from mojollm.sampling_params import SamplingParams


@dataclass
class ScoreOutput:
    """Teacher-forced scores: logprobs[i] = log p(token_ids[i + 1] | token_ids[: i + 1])."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def num_scored(self) -> int:
        return len(self.logprobs)


class TextStream:
    """Iterator of text deltas of one request; `.output` is its final RequestOutput once exhausted.

    Text that could still turn out to be the start of a stop string is held back until it cannot.
    """

    def __init__(self, llm: "LLM", request_id: str):
        self._llm = llm
        self.request_id = request_id
        self.output = None
        self._emitted = 0

    def __iter__(self) -> Iterator[str]:
        llm = self._llm
        try:
            while self.output is None or not self.output.finished:
                out = llm._latest.pop(self.request_id, None)
                if out is None:
                    if not llm.engine.has_unfinished():
                        break
                    llm._step()
                    continue
                self.output = out
                if out.outputs:
                    stable = out.num_stable_chars[0] if out.num_stable_chars else len(out.text)
                    if stable > self._emitted:
                        delta = out.text[self._emitted:stable]
                        self._emitted = stable
                        yield delta
        finally:
            if self.output is None or not self.output.finished:
                llm.engine.abort(self.request_id)  # the consumer stopped early: free the blocks
                llm._latest.pop(self.request_id, None)


class LLM:
    def __init__(self, model=None, backend: str = "auto", progress=None, **engine_kwargs):
        """`model`: None (the default model), a .gguf path, a Hugging Face directory, or an already
        loaded model object (anything with forward/config/tokenizer). Extra keyword arguments go
        to Engine (block_size, num_blocks, kv_cache_memory, max_num_batched_tokens, ...)."""
        from mojollm.engine.engine import Engine

        if model is not None and hasattr(model, "forward") and hasattr(model, "tokenizer"):
            self.model = model
            self.backend = getattr(model, "backend", None)
        else:
            from mojollm.backends import get_backend
            from mojollm.models import load_model

            self.backend = get_backend(backend)
            self.model = load_model(model, self.backend, progress=progress)
        self.tokenizer = self.model.tokenizer
        self.engine = Engine(self.model, **engine_kwargs)
        # newest output of every request, whoever stepped the engine (streams and generate calls
        # may interleave on one LLM; each takes only its own requests' outputs)
        self._latest: dict[str, object] = {}

    def _step(self) -> None:
        for out in self.engine.step():
            self._latest[out.request_id] = out

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
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt
        if isinstance(prompt, Sequence) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            if len(prompt) == 0:
                raise ValueError("the prompt is empty")
            return [int(t) for t in prompt], None
        raise ValueError("a prompt is a string or a list of token ids")

    def _check_fits(self, ids: list[int], reserve: int = 1) -> None:
        limit = self.engine.max_model_len - reserve
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.engine.max_model_len} "
                             f"(prompt plus at least {reserve} new token{'s' if reserve != 1 else ''})")

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
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
        encoded = []
        for p in items:
            ids, text = self._prompt_ids(p)
            self._check_fits(ids)
            encoded.append((ids, text))
        ids_order = []
        for (ids, text), sp, prio in zip(encoded, params_list, prios):
            ids_order.append(self.engine.add_request(ids, sp if sp is not None else SamplingParams(),
                                                     priority=prio, prompt=text))
        return self._wait(ids_order)

    def _wait(self, request_ids: list[str]) -> list:
        """Step the engine until every one of `request_ids` has finished; their final outputs."""
        pending = set(request_ids)
        done = {}
        try:
            while pending:
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
                self.engine.abort(rid)
                self._latest.pop(rid, None)
        return [done[r] for r in request_ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> TextStream:
        """Text deltas of one prompt as they are decoded (the first sample when n > 1)."""
        ids, text = self._prompt_ids(prompt)
        self._check_fits(ids)
        params = params if params is not None else SamplingParams()
        if params.use_beam_search:
            raise ValueError("beam search cannot stream: its beams change until the end")
        rid = self.engine.add_request(ids, params, prompt=text)
        return TextStream(self, rid)

    def chat_prompt_ids(self, messages) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template has its own specials
        if not ids:
            raise ValueError("the chat prompt is empty")
        self._check_fits(ids)
        return ids

    def chat(self, messages, params: SamplingParams | None = None):
        """One assistant turn for `messages` ([{"role", "content"}...] or a user message string)."""
        return self.generate([self.chat_prompt_ids(messages)], params)[0]

    def chat_stream(self, messages, params: SamplingParams | None = None) -> TextStream:
        ids = self.chat_prompt_ids(messages)
        rid = self.engine.add_request(ids, params if params is not None else SamplingParams())
        return TextStream(self, rid)

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
        rid = self.engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), _score_only=True)
        (out,) = self._wait([rid])
        if out.error:
            raise RuntimeError(f"scoring failed: {out.error}")
        return out.prompt_logprobs

    def perplexity(self, text, max_tokens: int | None = None) -> dict:
        """exp(-mean log p) over the text's tokens (at most `max_tokens` of them).

        Text longer than the context is cut into consecutive windows of the context length, each
        scored on its own (the first token of a window has no score). Returns
        {"ppl", "tokens" (scored), "nll" (mean negative log-likelihood, nats)}.
        """
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
        ids, _ = self._prompt_ids(text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError("the text needs at least 2 tokens to measure perplexity")
        window = self.engine.max_model_len
        logprobs: list[float] = []
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if len(chunk) >= 2:
                logprobs.extend(self._score_ids(chunk))
        nll = -sum(logprobs) / len(logprobs)
        return {"ppl": math.exp(nll), "tokens": len(logprobs), "nll": nll}
