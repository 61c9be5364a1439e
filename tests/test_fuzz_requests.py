"""Seeded fuzzing of what users hand the LLM API: SamplingParams fields of every wrong type and
range (set at construction and mutated afterwards), prompts of every shape (text with surrogates,
bytes, token ids out of range, nested lists, arrays), batches mixing good and bad items, streams
dropped half-way, chat messages, priorities. Each operation must finish within a time bound and
either succeed (outputs of the requested shape) or raise one of the documented errors (ValueError,
MojollmError); afterwards nothing is queued and every KV block is back in the pool.

The model is the deterministic fake (tests/fake_model.py) with a small pool, so beam search,
preemption and n > 1 forks all happen; the real kernels are covered by the model tests.
"""

from __future__ import annotations

import gc
import random
import signal

import numpy as np
import pytest

from fake_model import FakeModel
from mojollm.errors import MojollmError
from mojollm.llm import LLM
from mojollm.sampling_params import SamplingParams

DOCUMENTED = (ValueError, MojollmError)
CASES = 1500
TIME_BOUND_S = 5

_ODD_VALUES = [0, 1, -1, 2, 3, 7, 64, 10 ** 6, 2 ** 63, -(2 ** 63), 0.0, 0.5, 1.0, 1.5, -0.5, 2.0, -2.0,
               float("nan"), float("inf"), float("-inf"), True, False, None, "1", "", "x", [], [1], {}, b"1",
               np.int64(3), np.float32(0.7), np.nan]
_FIELDS = {
    "n": [1, 2, 3], "max_tokens": [1, 4, 12], "temperature": [0.0, 0.7, 1.3], "top_k": [0, 5, 40],
    "top_p": [1.0, 0.9, 0.3], "min_p": [0.0, 0.05], "repetition_penalty": [1.0, 1.2],
    "presence_penalty": [0.0, 0.5], "frequency_penalty": [0.0, -0.5], "stop": [None, "w", ["ab", "c"]],
    "stop_token_ids": [None, [5], [299]], "ignore_eos": [False, True], "seed": [None, 0, 12345],
    "logprobs": [None, 0, 3], "beam_width": [1, 2, 3], "length_penalty": [1.0, 0.5],
    "skip_special_tokens": [True, False],
}


def _value(rng: random.Random, field: str):
    return rng.choice(_FIELDS[field]) if rng.random() < 0.8 else rng.choice(_ODD_VALUES)


def _params(rng: random.Random):
    kwargs = {f: _value(rng, f) for f in rng.sample(sorted(_FIELDS), rng.randint(0, 5))}
    try:
        sp = SamplingParams(**kwargs)
    except DOCUMENTED:
        return None
    for f in rng.sample(sorted(_FIELDS), rng.randint(0, 2)):  # mutated after construction
        setattr(sp, f, _value(rng, f))
    return sp


def _prompt(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF), 0xD800, 0xDFFF, 0]))
                       for _ in range(rng.randint(0, 20)))
    if kind == 1:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 8)))
    if kind == 2:
        return [rng.randint(-3, 320) for _ in range(rng.randint(0, 30))]
    if kind == 3:
        return np.array([rng.randint(3, 299) for _ in range(rng.randint(1, 20))], dtype=rng.choice([np.int32, np.int64]))
    if kind == 4:
        return [[3, 4], [5]]
    if kind == 5:
        return rng.choice([None, 3, 2.5, {}, object(), [3.0, 4.0], [True, 4]])
    if kind == 6:
        return "x" * rng.choice([1, 50, 200])   # past the context (64) for the long ones
    return "".join(rng.choice("abc w") for _ in range(rng.randint(1, 12)))


def _check_shape(out, sp):
    sp = sp if sp is not None else SamplingParams()
    if out.error is None:
        want = min(sp.n, sp.beam_width) if sp.beam_width > 1 else sp.n
        assert len(out.outputs) == want
        for o in out.outputs:
            assert 1 <= len(o.token_ids) <= sp.max_tokens


def _operation(llm: LLM, rng: random.Random) -> None:
    op = rng.randrange(6)
    if op == 0:
        sp = _params(rng)
        for out in llm.generate(_prompt(rng), sp):
            _check_shape(out, sp)
    elif op == 1:  # a batch with a bad item somewhere
        n = rng.randint(1, 4)
        prompts = [_prompt(rng) for _ in range(n)]
        params = [_params(rng) for _ in range(n)] if rng.random() < 0.5 else _params(rng)
        prio = [rng.randint(-2, 2) for _ in range(rng.choice([n, n - 1, n + 1]))] if rng.random() < 0.3 else 0
        llm.generate(prompts, params, priority=prio)
    elif op == 2:  # a stream read partly, then dropped
        stream = llm.stream(_prompt(rng), _params(rng))
        for i, _ in enumerate(stream):
            if i >= rng.randint(0, 3):
                break
        del stream
    elif op == 3:
        llm.chat([{"role": rng.choice(["user", "system", "assistant", 3]), "content": _prompt(rng)}], _params(rng))
    elif op == 4:  # a stream created and never read
        llm.stream(_prompt(rng), _params(rng))
    else:
        llm.score(_prompt(rng))


def _alarm(signum, frame):
    raise TimeoutError(f"an operation ran past {TIME_BOUND_S} s")


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_requests_fail_cleanly_and_leak_nothing(seed):
    rng = random.Random(seed)
    model = FakeModel(max_position_embeddings=64)
    llm = LLM(model=model, block_size=4, num_blocks=40, max_num_seqs=8)
    outcomes = {"ok": 0, "refused": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES // 3):
            signal.alarm(TIME_BOUND_S)
            try:
                _operation(llm, rng)
                outcomes["ok"] += 1
            except DOCUMENTED as e:
                assert "\n" not in str(e).strip(), f"case {case}: multi-line error {e!r}"
                outcomes["refused"] += 1
            finally:
                signal.alarm(0)
            gc.collect(0)      # dropped streams are aborted at the next step; run one to flush them
            # (young generation only: a full collection of a whole test session's heap costs ~1 s)
            llm.generate("a", SamplingParams(max_tokens=1))
            eng = llm.engine
            assert not eng.has_unfinished() and not llm._latest, f"case {case}: requests left queued"
            assert eng.block_manager.num_free_blocks == eng.num_blocks, f"case {case}: KV blocks leaked"
    finally:
        signal.signal(signal.SIGALRM, old)
    # the fuzzer must exercise both sides
    assert outcomes["ok"] > CASES // 20 and outcomes["refused"] > CASES // 20, outcomes
