"""`mojollm serve` as a real subprocess on 127.0.0.1, talked to with the official `openai` client
(and httpx where the client cannot send what a test needs): completions and chat, streamed and
not, n=2, stop, seed, logprobs; greedy text equal to LLM.generate's; /metrics read with
prometheus_client's parser and checked against the requests sent; client disconnects, queue
overflow, bad input, SIGTERM/SIGINT. The health-while-loading test runs the app in-process on the
fake model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mojollm import LLM, SamplingParams

KEY = "test-key"
CONTEXT = 512
MAX_NUM_SEQS = 8
MAX_QUEUE = 8
BODY_LIMIT = 64 * 1024
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


class Server:
    """A `mojollm serve` subprocess on a free port; stderr is drained on a thread."""

    def __init__(self, *args: str, key: str | None = KEY):
        cmd = [sys.executable, "-m", "mojollm.cli", "serve", "--port", "0", "--max-model-len", str(CONTEXT), *args]
        if key:
            cmd += ["--api-key", key]
        env = dict(os.environ, MOJOLLM_API_KEY="")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._url = threading.Event()
        self.url = None
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.url is None and " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]
                self._url.set()

    def wait_ready(self, timeout: float = 600.0) -> "Server":
        """Until /health answers 200 (the first run may compile the kernels: minutes)."""
        deadline = time.monotonic() + timeout
        assert self._url.wait(60), self.lines
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "\n".join(self.lines)
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(default_gguf):
    s = Server("--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
               "--max-body-size", str(BODY_LIMIT), "-q").wait_ready()
    yield s
    assert s.stop() == 0, "\n".join(s.lines)


@pytest.fixture(scope="module")
def llm(default_gguf):
    """The reference: the same model in this process."""
    return LLM(str(default_gguf), backend="cpu", max_model_len=CONTEXT)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    (m,) = client.models.list().data
    return m.id


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics (name plus sorted labels -> value), via prometheus_client's parser."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


def greedy(max_tokens=16, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


# ---------------------------------------------------------------- the OpenAI API

def test_models_health_and_auth(server, client, model_name):
    assert httpx.get(server.url + "/health").status_code == 200
    assert model_name == "SmolLM2-135M-Instruct.Q4_1"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_completions_greedy_equal_llm_generate(client, model_name, llm):
    refs = llm.generate(PROMPTS, greedy())
    res = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.index for c in res.choices] == [0, 1, 2]
    for choice, ref in zip(res.choices, refs):
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    assert res.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    # streamed: the deltas add up to the same text, then a usage chunk, then the end
    chunks = list(client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3  # token by token, not one blob
    # (alone, as the server runs it: on the cpu backend a batch of one takes the fused decode step,
    # whose rounding differs from the batched path's enough to change a greedy continuation)
    (ref,) = llm.generate(PROMPTS[0], greedy())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_greedy_equal_llm_chat(client, model_name, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ref = llm.chat(messages, greedy(12))
    res = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=12, temperature=0)
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.text
    assert res.choices[0].finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == len(llm.chat_prompt_ids(messages))
    assert res.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_n2_and_seed_reproducible_and_equal_llm(client, model_name, llm):
    kw = dict(model=model_name, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.95, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    ref = llm.generate(PROMPTS[2], SamplingParams(n=2, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234))[0]
    assert texts == [o.text for o in ref.outputs]
    assert a.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    # streamed n=2: each index gets its own deltas
    got = {0: "", 1: ""}
    for c in client.completions.create(**kw, stream=True):
        for ch in c.choices:
            got[ch.index] += ch.text
    assert [got[0], got[1]] == texts
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=8, temperature=1.0, seed=5)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_strings(client, model_name, llm):
    full = llm.generate(PROMPTS[1], greedy(24))[0].text
    stop = full.split()[2]  # a word the greedy text reaches
    want = full[:full.index(stop)]
    res = client.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    assert res.choices[0].text == want and res.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_match_engine(client, model_name, llm):
    ref = llm.generate(PROMPTS[0], greedy(8, logprobs=3))[0].outputs[0]
    res = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    assert "".join(lp.tokens) == res.choices[0].text
    for tok, got, top, entry in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref.logprobs):
        assert got == pytest.approx(entry["logprob"], abs=1e-6) and got <= 0
        assert tok in top and len(top) <= 4
        assert got == pytest.approx(max(top.values()), abs=1e-6)  # greedy took the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    messages = [{"role": "user", "content": "Say hello."}]
    ref = llm.chat(messages, greedy(6, logprobs=2)).outputs[0]
    res = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert "".join(c.token for c in content) == res.choices[0].message.content
    for c, entry in zip(content, ref.logprobs, strict=True):
        assert c.logprob == pytest.approx(entry["logprob"], abs=1e-6)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(list(entry["top"].values()), abs=1e-6)
        assert bytes(c.bytes).decode() == c.token
    # streamed: every token's logprob arrives once. Compared with the same request unstreamed, both
    # served from the prefix cache: on the cpu backend a prompt's last token computed alone (after
    # a cache hit) takes the int8-activation decode path and its logprobs move by up to ~0.2 nats.
    kw = dict(model=model_name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    again = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in again]


def test_tokenize_detokenize(server, llm):
    text = "Hello, wörld! 🙂"
    r = post(server, "/tokenize", {"prompt": text})
    assert r.status_code == 200 and r.json()["tokens"] == llm.tokenizer.encode(text)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == CONTEXT
    back = post(server, "/detokenize", {"tokens": llm.tokenizer.encode(text, add_special_tokens=False)})
    assert back.json()["prompt"] == text
    messages = [{"role": "user", "content": "Hi"}]
    r = post(server, "/tokenize", {"messages": messages})
    assert r.json()["tokens"] == llm.chat_prompt_ids(messages)


def test_metrics_count_the_requests_sent(server, client, model_name):
    before = metrics(server)
    usages = []
    for p in PROMPTS:
        usages.append(client.completions.create(model=model_name, prompt=p, max_tokens=5, temperature=0).usage)
    usages.append(client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0).usage)
    after = metrics(server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("mojollm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("mojollm:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("mojollm:request_success_total{finished_reason=length}") + \
        delta("mojollm:request_success_total{finished_reason=stop}") == len(usages)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"mojollm:{hist}_count") == len(usages)
        assert delta(f"mojollm:{hist}_sum") > 0 or hist == "request_queue_time_seconds"
    assert delta("mojollm:inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert delta("mojollm:prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    assert 0 <= delta("mojollm:prefix_cache_hits_total") <= delta("mojollm:prefix_cache_queries_total")
    assert after["mojollm:num_requests_running"] == after["mojollm:num_requests_waiting"] == 0
    assert after["mojollm:kv_cache_usage_perc"] == 0 and after["mojollm:kv_cache_used_blocks"] == 0


# ---------------------------------------------------------------- speculative decoding

# a prompt the model continues by repeating it: prompt lookup (ngram) drafts get accepted
REPETITIVE = "one two three four one two three four one two three four one two"
SPEC_COUNTERS = ("mojollm:spec_decode_num_drafts_total", "mojollm:spec_decode_num_draft_tokens_total",
                 "mojollm:spec_decode_num_accepted_tokens_total")


@pytest.fixture
def spec_server(default_gguf):
    """A fresh `mojollm serve --speculative ngram` per test: the engine measures its step costs
    before it decides whether drafts pay, so the first request on a fresh server speculates."""
    s = Server("--speculative", "ngram", "--num-speculative-tokens", "4", "-q").wait_ready()
    yield s
    assert s.stop() == 0, "\n".join(s.lines)


@pytest.fixture
def spec_client(spec_server):
    return openai.OpenAI(base_url=spec_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def spec_counts(server) -> tuple[float, ...]:
    m = _wait_idle(server)  # after the last step's metrics update
    return tuple(m[c] for c in SPEC_COUNTERS) + (m["mojollm:request_spec_acceptance_rate_count"],)


def test_speculative_server_same_greedy_text_and_counters(spec_server, spec_client, client, model_name):
    before = spec_counts(spec_server)
    assert before == (0, 0, 0, 0)
    kw = dict(model=model_name, prompt=REPETITIVE, max_tokens=24, temperature=0)
    res = spec_client.completions.create(**kw)
    plain = client.completions.create(**kw)  # the server without speculation
    assert res.choices[0].text == plain.choices[0].text and res.choices[0].text.startswith(" three four one two")
    assert res.usage == plain.usage
    drafts, proposed, accepted, requests = spec_counts(spec_server)
    assert drafts >= 1 and drafts <= proposed <= 4 * drafts  # k = 4 at most per verify step
    assert 1 <= accepted <= proposed and requests == 1
    # usage stays plain OpenAI: nothing speculative in it
    raw = post(spec_server, "/v1/completions", kw).json()
    assert raw["choices"][0]["text"] == plain.choices[0].text
    assert set(raw["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    # streamed and chat: the same text as the plain server; the counters never go back
    streamed = "".join(c.choices[0].text for c in spec_client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == plain.choices[0].text
    messages = [{"role": "user", "content": "Repeat after me: " + REPETITIVE}]
    chat_spec = spec_client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    chat_plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    assert chat_spec.choices[0].message.content == chat_plain.choices[0].message.content
    after = spec_counts(spec_server)
    assert all(a >= b for a, b in zip(after, (drafts, proposed, accepted, requests)))
    assert after[2] <= after[1]


def test_plain_server_speculative_counters_stay_zero(server):
    """The server without --speculative exposes the counters, at 0."""
    m = metrics(server)
    assert all(m[c] == 0 for c in SPEC_COUNTERS)
    assert m["mojollm:request_spec_acceptance_rate_count"] == 0


def test_per_request_num_speculative_tokens(spec_server, spec_client, client, model_name):
    kw = dict(model=model_name, prompt=REPETITIVE, max_tokens=20, temperature=0)
    ref = client.completions.create(**kw).choices[0].text  # the plain server's
    # 1: one draft per verify step at most
    one = spec_client.completions.create(**kw, extra_body={"num_speculative_tokens": 1})
    assert one.choices[0].text == ref
    drafts, proposed, accepted, _ = before = spec_counts(spec_server)
    assert drafts >= 1 and proposed == drafts and accepted <= proposed
    # 0: this request does not speculate at all (it runs alone: the counters stand still)
    off = spec_client.completions.create(**kw, extra_body={"num_speculative_tokens": 0})
    assert off.choices[0].text == ref
    chat = spec_client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"num_speculative_tokens": 0})
    assert chat.usage.completion_tokens == 4
    assert spec_counts(spec_server) == before
    # negative, more than the server's k, or not an integer: 400 with an OpenAI error object
    for value, fragment in ((-1, ">= 0"), (5, "exceeds"), (2.5, "integer")):
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = post(spec_server, path, {**body, "num_speculative_tokens": value})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == "num_speculative_tokens", err
            assert fragment in err["message"], err
    with pytest.raises(openai.BadRequestError) as ei:
        spec_client.completions.create(**kw, extra_body={"num_speculative_tokens": -3})
    assert ei.value.status_code == 400 and ei.value.body["param"] == "num_speculative_tokens"
    assert spec_counts(spec_server) == before and spec_server.proc.poll() is None


# ---------------------------------------------------------------- faults

def _wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["mojollm:kv_cache_used_blocks"] == 0 and m["mojollm:num_requests_running"] == 0 \
                and m["mojollm:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_disconnects_abort_and_free_blocks_others_unaffected(server, model_name, llm):
    before = metrics(server)
    long = {"model": model_name, "prompt": PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    def leave_mid_stream(i):
        with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 2 + i % 3:
                        return got  # closing the connection here

    def give_up_waiting(i):  # not streamed: the client times out
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json=long, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=1.0)

    def well_behaved(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        text = ""
        for chunk in c.completions.create(model=model_name, prompt=PROMPTS[i], max_tokens=24, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}):
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason
            else:
                usage = chunk.usage
        return text, finish, usage

    with ThreadPoolExecutor(16) as pool:
        leavers = [pool.submit(leave_mid_stream, i) for i in range(8)]
        quitters = [pool.submit(give_up_waiting, i) for i in range(2)]
        good = [pool.submit(well_behaved, i) for i in range(3)]
        for f in leavers + quitters:
            f.result()
        for i, f in enumerate(good):  # complete, whatever the others did
            text, finish, usage = f.result()
            assert finish == "length" and usage.completion_tokens == 24
            assert text and usage.prompt_tokens == len(llm.prompt_ids(PROMPTS[i]))
    after = _wait_idle(server)  # 0 blocks held: the 10 abandoned requests were aborted
    finished = sum(after[k] - before.get(k, 0) for k in after if k.startswith("mojollm:request_success_total{"))
    assert finished == 3  # only the well-behaved ones ran to the end
    assert after["mojollm:generation_tokens_total"] - before["mojollm:generation_tokens_total"] < 10 * 400


def test_queue_overflow_429_and_no_accepted_request_lost(server, model_name):
    before = metrics(server)
    total = 3 * (MAX_NUM_SEQS + MAX_QUEUE)
    start = threading.Barrier(total)

    def one(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        start.wait()
        try:
            res = c.completions.create(model=model_name, prompt=PROMPTS[i % 3], max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
            return res.choices[0]
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "queue_full"
            return None

    with ThreadPoolExecutor(total) as pool:
        results = list(pool.map(one, range(total)))
    accepted = [r for r in results if r is not None]
    rejected = total - len(accepted)
    assert rejected >= 1 and len(accepted) >= MAX_NUM_SEQS + MAX_QUEUE
    assert all(r.finish_reason == "length" for r in accepted)
    after = _wait_idle(server)
    assert after["mojollm:request_rejected_total"] - before["mojollm:request_rejected_total"] == rejected
    finished = sum(after[k] - before.get(k, 0) for k in after if k.startswith("mojollm:request_success_total{"))
    assert finished == len(accepted)
    assert after["mojollm:generation_tokens_total"] - before["mojollm:generation_tokens_total"] == 40 * len(accepted)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": MAX_NUM_SEQS + 1}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nowhere", {}, 404, None),
    # mojollm's num_speculative_tokens: >= 0, an integer, and > 0 only on a server that speculates
    ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": -1}, 400, "num_speculative_tokens"),
    ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": "2"}, 400, "num_speculative_tokens"),
    ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": 2}, 400, "num_speculative_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "num_speculative_tokens": -2}, 400,
     "num_speculative_tokens"),
])
def test_bad_input_status(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param, err


def test_auth_body_limit_and_server_survives(server, client, model_name):
    assert post(server, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": "hi"}, key="nope").status_code == 401
    r = post(server, "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 10)})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: caught while reading
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    assert post(server, "/v1/completions", chunked()).status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    # after every bad request above, the server still serves
    assert client.completions.create(model=model_name, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert server.proc.poll() is None


# ---------------------------------------------------------------- lifecycle

def test_sigterm_finishes_in_flight_then_exits_0(default_gguf):
    s = Server("-q", key=None).wait_ready()
    body = {"prompt": PROMPTS[0], "max_tokens": 48, "ignore_eos": True, "temperature": 0, "stream": True}
    texts = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                s.proc.send_signal(signal.SIGTERM)  # mid-stream
                texts.append(json.loads(line[6:])["choices"][0]["text"])
                break
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(s.url + "/health", timeout=2)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0, "\n".join(s.lines)

    s = Server("-q", key=None).wait_ready()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(60) == 0, "\n".join(s.lines)


def test_unusable_model_or_port_is_one_line_exit_2(tmp_path):
    s = Server("--model", str(tmp_path / "missing.gguf"), "-q", key=None)
    assert s.proc.wait(120) == 2
    time.sleep(0.2)
    assert s.lines[-1].startswith("error: ") and "missing.gguf" in s.lines[-1], s.lines
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "mojollm.cli", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: cannot listen on")


def test_health_503_while_the_model_loads():
    """In-process on the fake model: the loader is held until the test lets it go."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from fake_model import FakeModel
    from mojollm.server.app import create_app
    from mojollm.server.engine_loop import EngineLoop
    from mojollm.server.metrics import ServerMetrics

    go = threading.Event()

    def load():
        go.wait(30)
        fake = FakeModel(max_position_embeddings=64)
        fake.backend = SimpleNamespace(name="fake")
        return LLM(model=fake, block_size=4)

    m = ServerMetrics("fake")
    with TestClient(create_app(EngineLoop(load, m), "fake", m)) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert tc.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        go.set()
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        res = tc.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}).json()
    fake = FakeModel(max_position_embeddings=64)
    ref = LLM(model=fake, block_size=4).generate([5, 6, 7], greedy(4))[0]
    assert res["choices"][0]["text"] == ref.text
    assert res["usage"]["prompt_tokens"] == 3 and res["usage"]["completion_tokens"] == len(ref.token_ids)
