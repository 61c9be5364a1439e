"""The OpenAI-compatible HTTP API: a FastAPI app over an EngineLoop.

    app = create_app(EngineLoop(load_llm, metrics), "SmolLM2-135M-Instruct", metrics, api_key="...")
    uvicorn.run(app)                   # what `mojollm serve` does, with signals and a bound socket

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health (503 until the model has loaded), POST /tokenize, POST /detokenize, GET /metrics.
Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}}: bad input
400, wrong or missing API key 401, unknown model 404, body too large 413, queue full 429, not
ready 503. Prompts are checked (empty, too long for the context, bad sampling values) before the
request is queued, so a bad request never reaches the engine and a streamed response only starts
once its request is accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from mojollm.sampling_params import SamplingParams
from mojollm.server import protocol as p
from mojollm.server.engine_loop import EngineLoop, EngineNotReady, QueueFull

MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_BODY_SIZE = 1 << 20
_OPEN_PATHS = ("/health", "/metrics")  # no API key needed
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "server_error"),
                                             param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


def _bad_value(e: ValueError) -> APIError:
    """A ValueError of SamplingParams/LLM as a 400 (their messages open with the parameter's name)."""
    msg = " ".join(str(e).split())
    first = msg.split(" ", 1)[0]
    return APIError(400, msg, param=first if first in _PARAM_NAMES else None)


class _ApiKeyMiddleware:
    """401 for any path but /health and /metrics without `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            got = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(got, self._expected):
                await error_response(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                     code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(HTTPException):
    def __init__(self):
        super().__init__(413)


class _BodyLimitMiddleware:
    """413 (as an OpenAI error object, through the HTTPException handler) for a request body over
    `limit` bytes: at once when Content-Length says so, else as soon as the bytes read pass it.
    (Starlette's own limiter answers in plain text.)"""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.limit
        seen = 0

        async def limited_receive():
            nonlocal seen
            if too_large:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


class _ClosingEventSource(EventSourceResponse):
    """An SSE response that closes its OutputStream however the response ends (finished, client
    gone, server shutting down), so an abandoned request never keeps its KV blocks."""

    def __init__(self, content, on_close):
        super().__init__(content)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> bytes:
    return format_sse_event(data_str=obj if isinstance(obj, str) else obj.model_dump_json())


async def _wait_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(loop: EngineLoop, model_name: str, metrics, api_key: str | None = None,
               max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="mojollm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimitMiddleware, limit=max_body_size)
    if api_key:  # added last, so it runs first: no key, no body read
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    created = int(time.time())

    # ------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            detail = next((err.get("ctx", {}).get("error") for err in errs if err.get("ctx")), None)
            return error_response(400, f"the body is not valid JSON{f' ({detail})' if detail else ''}")
        parts = []
        for err in errs[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        param = next((err["loc"][1] for err in errs if len(err.get("loc", ())) > 1 and isinstance(err["loc"][1], str)),
                     None)
        return error_response(400, "; ".join(parts) or "invalid request", param)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        messages = {404: f"no route {request.url.path}", 413: f"the request body is larger than {max_body_size} bytes"}
        return error_response(e.status_code, messages.get(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        return error_response(500, f"internal error ({type(e).__name__}): {e}")

    # ------------------------------------------------------------ helpers
    def llm():
        if not loop.ready:
            raise APIError(503, loop.load_error or "the model is still loading")
        return loop.llm

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist here (this server serves {model_name!r})",
                           param="model", code="model_not_found")

    def check_supported(body) -> None:
        bad = body.unsupported_fields()
        if bad:
            raise APIError(400, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported", param=bad[0])

    def sampling_params(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"at most {MAX_TOP_LOGPROBS} top log-probabilities per token, got {logprobs}",
                           param="logprobs")
        k = body.num_speculative_tokens
        if k is not None and k < 0:
            raise APIError(400, f"num_speculative_tokens must be an integer >= 0 (0: no speculative decoding for "
                                f"this request), got {k}", param="num_speculative_tokens")
        try:
            sp = SamplingParams(n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, min_p=body.min_p, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty,
                                repetition_penalty=body.repetition_penalty, stop=body.stop, seed=body.seed,
                                logprobs=logprobs, ignore_eos=body.ignore_eos, num_speculative_tokens=k)
            return loop.llm.engine.check_params(sp)
        except ValueError as e:
            raise _bad_value(e) from None

    def requests_for(prompts: list[list[int]], body, max_tokens: int | None, logprobs: int | None):
        """One (ids, SamplingParams) per prompt; max_tokens None: what the context has left."""
        ctx = loop.llm.max_model_len
        out = []
        for ids in prompts:
            want = ctx - len(ids) if max_tokens is None else max_tokens
            if max_tokens is not None and max_tokens > 0 and len(ids) + max_tokens > ctx:
                raise APIError(400, f"this model's context holds {ctx} tokens: the prompt has {len(ids)} and "
                                    f"max_tokens asks for {max_tokens} more", param="max_tokens")
            out.append((ids, sampling_params(body, want, logprobs)))
        return out

    def open_stream(requests):
        try:
            return loop.open(requests)
        except QueueFull as e:
            if metrics is not None:
                metrics.rejected.inc()
            raise APIError(429, str(e), code="queue_full") from None
        except EngineNotReady as e:
            raise APIError(503, str(e)) from None

    async def final_outputs(stream, request: Request) -> list | None:
        """Wait for every request of `stream` to finish, then close it: their final outputs in
        request order, or None if the client went away first."""
        try:
            final = await _collect(stream, request)
        finally:
            loop.close(stream)
        return None if final is None else [final[r] for r in stream.request_ids]

    async def _collect(stream, request: Request) -> dict | None:
        final = {}

        async def consume():
            async for batch in stream:
                for out in batch:
                    final[out.request_id] = out

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (consumer, watcher):
                t.cancel()
        if not consumer.done() or consumer.cancelled():
            return None
        consumer.result()
        if stream.error:
            raise APIError(503, stream.error)
        for out in final.values():
            if out.error:
                raise APIError(500, f"the request failed: {out.error}")
        return final

    def token_text(tid: int) -> str:
        return loop.llm.tokenizer.decode([tid], skip_special_tokens=False)

    def usage(prompts: list[list[int]], outputs) -> p.Usage:
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def completion_logprobs(entries: list[dict], offset: int) -> p.CompletionLogprobs:
        lp = p.CompletionLogprobs()
        for e in entries:
            tok = token_text(e["token_id"])
            top = {token_text(t): v for t, v in e["top"].items()}
            top.setdefault(tok, e["logprob"])  # the API always includes the chosen token
            lp.tokens.append(tok)
            lp.token_logprobs.append(e["logprob"])
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def chat_logprobs(entries: list[dict]) -> p.ChatLogprobs:
        def top(t, v):
            s = token_text(t)
            return p.TopLogprob(token=s, logprob=v, bytes=list(s.encode("utf-8", "surrogatepass")))

        content = []
        for e in entries:
            chosen = top(e["token_id"], e["logprob"])
            content.append(p.TokenLogprob(**chosen.model_dump(), top_logprobs=[top(t, v) for t, v in e["top"].items()]))
        return p.ChatLogprobs(content=content)

    async def stream_events(stream, n: int, include_usage: bool, prompts, make_chunk, make_usage_chunk):
        """SSE events of a streamed request: one chunk per choice that advanced, then usage if
        asked, then [DONE]. `make_chunk(index, text, entries, first_token, finish, ...)`."""
        index_of = {rid: i for i, rid in enumerate(stream.request_ids)}
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finished: set[int] = set()
        latest = {}
        async for batch in stream:
            for out in batch:
                latest[out.request_id] = out
                if out.error:
                    yield _sse(p.ErrorResponse(error=p.ErrorInfo(message=f"the request failed: {out.error}",
                                                                 type="server_error")))
                    return
                for k, o in enumerate(out.outputs):
                    choice = index_of[out.request_id] * n + o.index
                    if choice in finished:
                        continue
                    stable = out.num_stable_chars[k] if out.num_stable_chars else len(o.text)
                    start_c, start_t = sent_chars.get(choice, 0), sent_tokens.get(choice, 0)
                    text = o.text[start_c:stable] if stable > start_c else ""
                    entries = o.logprobs[start_t:] if o.logprobs is not None else None
                    finish = o.finish_reason if o.finish_reason in ("stop", "length") else None
                    if not text and not entries and finish is None:
                        continue
                    chunk = make_chunk(choice, text, entries, choice not in sent_chars, finish, start_c)
                    sent_chars[choice] = max(stable, start_c)
                    sent_tokens[choice] = len(o.token_ids)
                    if finish is not None:
                        finished.add(choice)
                    yield _sse(chunk)
        if stream.error:
            yield _sse(p.ErrorResponse(error=p.ErrorInfo(message=stream.error, type="service_unavailable")))
            return
        if include_usage:
            yield _sse(make_usage_chunk(usage(prompts, latest.values())))
        yield _sse("[DONE]")

    def streaming_response(stream, events) -> _ClosingEventSource:
        return _ClosingEventSource(events, lambda: loop.close(stream))

    # ------------------------------------------------------------ OpenAI routes
    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        model = llm()
        check_model(body.model)
        check_supported(body)
        raw = body.prompt
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise APIError(400, "the prompt is empty", param="prompt")
        try:
            prompts = [model.prompt_ids(x) for x in items]
        except ValueError as e:
            raise APIError(400, " ".join(str(e).split()), param="prompt") from None
        requests = requests_for(prompts, body, body.max_tokens, body.logprobs)
        n = body.n
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        stream = open_stream(requests)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index, text, entries, first, finish, offset):
                lp = completion_logprobs(entries, offset) if entries is not None else None
                return p.CompletionResponse(id=rid, created=now, model=model_name, choices=[
                    p.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)])

            def usage_chunk(u):
                return p.CompletionResponse(id=rid, created=now, model=model_name, choices=[], usage=u)

            return streaming_response(stream, stream_events(stream, n, include_usage, prompts, chunk, usage_chunk))
        outs = await final_outputs(stream, request)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for i, out in enumerate(outs):
            for o in out.outputs:
                choices.append(p.CompletionChoice(
                    index=i * n + o.index, text=o.text, finish_reason=o.finish_reason,
                    logprobs=completion_logprobs(o.logprobs, 0) if o.logprobs is not None else None))
        return p.CompletionResponse(id=rid, created=now, model=model_name, choices=choices, usage=usage(prompts, outs))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        model = llm()
        check_model(body.model)
        check_supported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = model.chat_prompt_ids(messages)
        except ValueError as e:
            raise APIError(400, " ".join(str(e).split()), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = requests_for([ids], body, max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        stream = open_stream(requests)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index, text, entries, first, finish, offset):
                delta = p.ChatDelta(role="assistant" if first else None, content=text or (None if finish else ""))
                lp = chat_logprobs(entries) if entries is not None else None
                return p.ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[
                    p.ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)])

            def usage_chunk(u):
                return p.ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[], usage=u)

            return streaming_response(stream, stream_events(stream, body.n, include_usage, [ids], chunk, usage_chunk))
        outs = await final_outputs(stream, request)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        (out,) = outs
        choices = [p.ChatChoice(index=o.index, message=p.ChatMessageOut(content=o.text), finish_reason=o.finish_reason,
                                logprobs=chat_logprobs(o.logprobs) if o.logprobs is not None else None)
                   for o in out.outputs]
        return p.ChatCompletionResponse(id=rid, created=now, model=model_name, choices=choices, usage=usage([ids], [out]))

    @app.get("/v1/models")
    async def models():
        ctx = loop.llm.max_model_len if loop.ready else None
        return p.ModelList(data=[p.ModelCard(id=model_name, created=created, max_model_len=ctx)])

    # ------------------------------------------------------------ vLLM's extras
    @app.get("/health")
    async def health():
        if not loop.ready:
            return error_response(503, loop.load_error or "the model is still loading")
        return JSONResponse({"status": "ok"})

    @app.post("/tokenize")
    async def tokenize(body: p.TokenizeRequest):
        model = llm()
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        try:
            if body.prompt is not None:
                ids = model.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            else:
                ids = model.chat_template_ids([{"role": m.role, "content": m.text()} for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise _bad_value(e) from None
        return p.TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(body: p.DetokenizeRequest):
        model = llm()
        check_model(body.model)
        vocab = model.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[0]}", param="tokens")
        return p.DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens))

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
