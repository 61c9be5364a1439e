"""The cpu backend's fused decode step (mojo/decode.mojo: every layer in one Mojo call) against
the per-op forward on the same model object, which the model tests check against transformers
and float64 references: logits of decode steps at batch 1..12 (GEMV and GEMM paths), short and
long contexts (one and several flash-decoding splits), Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q5_1 weights, GQA,
the worker team (every op shared out) and every op alone, the LM head inside the step; greedy
output through the engine identical with the fused path on and off.
"""

from __future__ import annotations

import numpy as np
import pytest

from mojollm.engine.step import StepBatch
from mojollm.kernels.decode import DecodeProgram, unsupported_reason
from mojollm.kernels.quant import QuantLinear, quantize
from mojollm.weights import WeightTensor


def _quantize(dense, qt):
    if qt in ("Q4_0", "Q4_1", "Q8_0"):
        return quantize(dense, qt)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    return gguf_quantize(dense.astype(np.float32), GGMLQuantizationType[qt])


def _quantized(model, qtypes, split_qkv=False):
    """Replace every projection by its `qtype` quantization (cycling through `qtypes`); with
    split_qkv, q, k and v become separate weights of different types (as in a Q4_K_M file).
    The LM head takes the first type (then it runs inside the fused step)."""
    dense = model.lm_head.weight.to_float32() if hasattr(model.lm_head, "weight") else np.asarray(model.lm_head.w)
    model.lm_head = QuantLinear(WeightTensor("output", dense.shape, qtypes[0], _quantize(dense, qtypes[0])))
    k = 0
    for layer in model.layers:
        if split_qkv:
            dense = np.asarray(layer.qkv.w) if hasattr(layer.qkv, "w") else layer.qkv.weight.to_float32()
            c = model.config
            parts = np.split(dense, [c.q_size, c.q_size + c.kv_size])
            layer.q_k_v = tuple(QuantLinear(WeightTensor(n, p.shape, qt, _quantize(p, qt)))
                                for n, p, qt in zip("qkv", parts, ("Q5_0", "Q8_0", "Q4_1"))) + (None, None, None)
            layer.qkv = None
        for name in ("qkv", "o_proj", "gate_up", "down"):
            w = getattr(layer, name)
            if w is None:
                continue
            dense = w.weight.to_float32() if hasattr(w, "weight") else np.asarray(w.w)
            qt = qtypes[k % len(qtypes)]
            k += 1
            setattr(layer, name, QuantLinear(WeightTensor(f"{name}", dense.shape, qt, _quantize(dense, qt))))
    return model


def _decode_batch(rng, lens, tables, block_size, vocab):
    S = len(lens)
    width = max(len(t) for t in tables)
    bt = np.zeros((S, width), np.int32)
    for s, t in enumerate(tables):
        bt[s, :len(t)] = t
    pos = np.array(lens, np.int32)
    slots = np.array([tables[s][p // block_size] * block_size + p % block_size for s, p in enumerate(pos)], np.int64)
    return StepBatch(token_ids=rng.integers(3, vocab, size=S).astype(np.int32), positions=pos, slot_mapping=slots,
                     block_tables=bt, context_lens=pos + 1, cu_seqlens_q=np.arange(S + 1, dtype=np.int32),
                     logits_indices=np.arange(S, dtype=np.int32), is_decode=True)


@pytest.fixture(scope="module")
def tiny(make_hf_model, cpu_backend):
    from mojollm.models import load_model

    path, _ = make_hf_model("llama", seed=9, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                            num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=1024)
    return lambda: load_model(str(path), cpu_backend)


@pytest.mark.parametrize("qtypes, split_qkv", [(("Q4_0",), False), (("Q4_1",), False), (("Q8_0",), False),
                                               (("Q4_0", "Q8_0", "Q4_1"), False), (("Q5_0", "Q5_1", "Q8_0"), False),
                                               (("Q4_1",), True)])
@pytest.mark.parametrize("lens", [[0], [5, 17, 0], [700], [3, 400, 9, 1, 64, 2, 31, 8, 100, 5, 6, 250]])
@pytest.mark.parametrize("team", [True, False], ids=["team", "alone"])
def test_fused_decode_step_equals_the_per_op_forward(tiny, qtypes, split_qkv, lens, team):
    model = _quantized(tiny(), qtypes, split_qkv)
    B, nblocks = 16, 200
    model.allocate_kv_cache(nblocks, B)
    assert unsupported_reason(model) is None
    rng = np.random.default_rng(len(lens) * 31 + len(qtypes))
    vocab = model.config.vocab_size
    tables, start = [], 0
    for n in lens:                                  # fill each sequence's context by prefill
        nb = -(-(n + 1) // B)
        tables.append(list(range(start, start + nb)))
        start += nb
        if n:
            model.forward(StepBatch.single_sequence(rng.integers(3, vocab, size=n), 0, tables[-1], B))
    batch = _decode_batch(rng, lens, tables, B, vocab)
    saved = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    want = model.forward(batch)
    kv_want = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    for (k, v), (k0, v0) in zip(model.kv_caches, saved):   # rewind the caches in place
        k[...] = k0
        v[...] = v0
    program = DecodeProgram(model, max_seqs=16, team=team)
    hidden, got = program.run(batch)
    assert program.fused_head and got.shape == want.shape
    np.testing.assert_allclose(model.backend.linear(hidden, model.lm_head), got, atol=1e-5 * np.abs(got).max(), rtol=0)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)
    for (k, v), (kw, vw) in zip(model.kv_caches, kv_want):
        np.testing.assert_allclose(k, kw, atol=1e-6, rtol=0)
        np.testing.assert_allclose(v, vw, atol=1e-6, rtol=0)


def test_a_float_lm_head_runs_after_the_fused_step(tiny):
    model = _quantized(tiny(), ("Q8_0",))
    model.lm_head = tiny().lm_head                  # float32: not a block format the step takes
    model.allocate_kv_cache(8, 16)
    program = DecodeProgram(model, max_seqs=2)
    rng = np.random.default_rng(4)
    batch = _decode_batch(rng, [0, 0], [[0], [1]], 16, model.config.vocab_size)
    hidden, logits = program.run(batch)
    assert not program.fused_head and logits is None and hidden.shape == (2, model.config.hidden_size)


def test_models_the_fused_step_cannot_run_say_why(tiny):
    model = tiny()                                  # float32 projections
    model.allocate_kv_cache(8, 16)
    assert "F32" in unsupported_reason(model) or "DenseLinear" in unsupported_reason(model)
    assert DecodeProgram.for_model(model, 4) is None


def test_default_model_greedy_output_is_the_same_with_and_without_the_fused_step(monkeypatch, default_gguf):
    from mojollm.llm import LLM
    from mojollm.sampling_params import SamplingParams

    prompts = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3, 5, 8,"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("MOJOLLM_CPU_FUSED_DECODE", fused)
        llm = LLM(model=str(default_gguf), backend="cpu", kv_cache_memory="64MiB")
        assert (llm.engine.runner.program is not None) == (fused == "1")
        runs[fused] = llm.generate(prompts, params)
    for a, b in zip(runs["1"], runs["0"]):
        assert a.token_ids == b.token_ids
        lp_a = [e["logprob"] for e in a.outputs[0].logprobs]
        lp_b = [e["logprob"] for e in b.outputs[0].logprobs]
        np.testing.assert_allclose(lp_a, lp_b, atol=1e-4)
