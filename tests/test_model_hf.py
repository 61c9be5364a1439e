"""The Llama-family model on the backend ops vs transformers, on small random-weight HF checkpoints.

Each checkpoint is written with save_pretrained(safe_serialization=True) and loaded by mojollm
(load_model: safetensors + tokenizer.json). Prefill, decode, chunked prefill and multi-sequence
steps through the paged KV cache must reproduce transformers' float32 logits.

Bound: max |logit error| <= LOGIT_ATOL + LOGIT_RTOL * max|logit| (~1.3e-4 here). The kernels compute
in float32 like torch, in a different summation order; measured worst errors are 5e-6..1e-5 at a
logit scale of ~5 (2026-11-22, x86_64 cpu backend), so the bound keeps a >10x margin while any real
bug (a wrong rope layout, head mapping or cache slot) moves logits by O(0.1..1).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mojollm.engine.step import StepBatch
from mojollm.errors import ModelLoadError
from mojollm.models import load_model

LOGIT_ATOL = 2e-5
LOGIT_RTOL = 2e-5  # bf16 weights are widened to float32 exactly, so one bound serves all cases
BLOCK = 4  # a small KV block size so every sequence spans several, scrambled, blocks

PROMPT = "The quick brown fox jumps over the lazy dog. def forward(x): return 12345"

CASES = {
    "gqa_untied": dict(arch="llama"),
    "mha_tied": dict(arch="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(arch="llama", num_key_value_heads=1),
    "llama3_rope_scaling": dict(arch="llama", rope_theta=500000.0, max_position_embeddings=256,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2_attention_bias": dict(arch="qwen2", num_key_value_heads=2, use_sliding_window=False),
    "mistral_odd_sizes": dict(arch="mistral", hidden_size=66, num_attention_heads=3, num_key_value_heads=1,
                              head_dim=22, intermediate_size=97, num_hidden_layers=3, sliding_window=None),
    "bf16_weights": dict(arch="llama", dtype=torch.bfloat16),
}


def _bound(ref: np.ndarray) -> float:
    return LOGIT_ATOL + LOGIT_RTOL * float(np.abs(ref).max())


def _reference_logits(torch_model, ids) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor([list(ids)])).logits[0].float().numpy()


def _token_ids(model, n_extra: int, seed: int) -> list[int]:
    """The prompt's ids followed by seeded random ids (teacher forcing needs no sampling)."""
    ids = model.tokenizer.encode(PROMPT)
    rng = np.random.default_rng(seed)
    return ids + rng.integers(0, model.config.vocab_size, n_extra).tolist()


def _table(rng, n_blocks: int, total: int) -> list[int]:
    return rng.permutation(total)[:n_blocks].tolist()


def multi_sequence_batch(seqs, block_size: int, is_decode: bool) -> StepBatch:
    """A StepBatch of several sequences: each (new_ids, start_pos, block_table); logits of each last token."""
    ids, pos, slots, lens, cu, last = [], [], [], [], [0], []
    width = max(len(t) for _, _, t in seqs)
    tables = np.zeros((len(seqs), width), np.int32)
    for s, (new, start, table) in enumerate(seqs):
        p = np.arange(start, start + len(new))
        ids += list(new)
        pos += p.tolist()
        slots += (np.asarray(table)[p // block_size] * block_size + p % block_size).tolist()
        tables[s, :len(table)] = table
        lens.append(start + len(new))
        cu.append(cu[-1] + len(new))
        last.append(cu[-1] - 1)
    return StepBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(slots, np.int64), tables,
                     np.array(lens, np.int32), np.array(cu, np.int32), np.array(last, np.int32), is_decode)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_hf_model, cpu_backend):
    spec = dict(CASES[request.param])
    path, torch_model = make_hf_model(**spec)
    model = load_model(path, cpu_backend)
    return request.param, model, torch_model


def test_config_read_from_checkpoint(case):
    name, model, torch_model = case
    c, t = model.config, torch_model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == \
        (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers)
    assert c.head_dim == getattr(t, "head_dim", None) or c.head_dim == t.hidden_size // t.num_attention_heads
    assert c.tie_word_embeddings == bool(t.tie_word_embeddings)
    assert c.attention_bias == (name == "qwen2_attention_bias")
    assert c.rope_neox  # HF checkpoints use rotate_half
    assert (c.rope_scaling or {}).get("rope_type") == ("llama3" if name == "llama3_rope_scaling" else None)


def test_prefill_then_decode_matches_transformers(case):
    name, model, torch_model = case
    ids = _token_ids(model, n_extra=6, seed=1)
    n_prompt = len(ids) - 6
    ref = _reference_logits(torch_model, ids)
    rng = np.random.default_rng(2)
    n_blocks = -(-len(ids) // BLOCK)
    model.allocate_kv_cache(n_blocks + 5, BLOCK)
    table = _table(rng, n_blocks, n_blocks + 5)

    got = model.forward(StepBatch.single_sequence(ids[:n_prompt], 0, table, BLOCK, all_logits=True))
    assert got.shape == (n_prompt, model.config.vocab_size) and got.dtype == np.float32
    err = np.abs(got - ref[:n_prompt]).max()
    assert err <= _bound(ref), f"{name}: prefill max |error| {err:.3g} > {_bound(ref):.3g}"

    worst = err
    for p in range(n_prompt, len(ids)):
        step = StepBatch.single_sequence(ids[p:p + 1], p, table, BLOCK)
        assert step.is_decode
        got = model.forward(step)
        err = np.abs(got[0] - ref[p]).max()
        assert err <= _bound(ref), f"{name}: decode at position {p}: max |error| {err:.3g}"
        worst = max(worst, err)
    print(f"\n{name}: max |logit error| {worst:.2e} at logit scale {np.abs(ref).max():.2f} "
          f"(bound {_bound(ref):.2e})")


def test_chunked_prefill_matches_transformers(case):
    name, model, torch_model = case
    ids = _token_ids(model, n_extra=5, seed=3)
    ref = _reference_logits(torch_model, ids)
    n_blocks = -(-len(ids) // BLOCK)
    model.allocate_kv_cache(n_blocks, BLOCK)
    table = np.random.default_rng(4).permutation(n_blocks).tolist()
    cut = 7  # not a multiple of the block size: the second chunk starts mid-block
    first = model.forward(StepBatch.single_sequence(ids[:cut], 0, table, BLOCK, all_logits=True))
    second = model.forward(StepBatch.single_sequence(ids[cut:], cut, table, BLOCK, all_logits=True))
    got = np.concatenate([first, second])
    err = np.abs(got - ref).max()
    assert err <= _bound(ref), f"{name}: chunked prefill max |error| {err:.3g}"


def test_multi_sequence_steps_match_transformers(case):
    """Two sequences share each step: a joint prefill, a joint decode, then a mixed step (one
    decoding, one prefilling a chunk) -- the engine's continuous-batching shapes."""
    name, model, torch_model = case
    a = _token_ids(model, n_extra=3, seed=5)
    b = np.random.default_rng(6).integers(0, model.config.vocab_size, 9).tolist()
    ref_a, ref_b = _reference_logits(torch_model, a), _reference_logits(torch_model, b)
    model.allocate_kv_cache(16, BLOCK)
    perm = np.random.default_rng(7).permutation(16).tolist()
    ta, tb = perm[:-(-len(a) // BLOCK)], perm[-(-len(b) // BLOCK):][::-1]
    na, nb = len(a) - 2, 4

    got = model.forward(multi_sequence_batch([(a[:na], 0, ta), (b[:nb], 0, tb)], BLOCK, is_decode=False))
    want = np.stack([ref_a[na - 1], ref_b[nb - 1]])
    assert np.abs(got - want).max() <= _bound(want), f"{name}: joint prefill"

    got = model.forward(multi_sequence_batch([(a[na:na + 1], na, ta), (b[nb:nb + 1], nb, tb)], BLOCK, is_decode=True))
    want = np.stack([ref_a[na], ref_b[nb]])
    assert np.abs(got - want).max() <= _bound(want), f"{name}: joint decode"

    got = model.forward(multi_sequence_batch([(a[na + 1:na + 2], na + 1, ta), (b[nb + 1:], nb + 1, tb)], BLOCK,
                                             is_decode=False))
    want = np.stack([ref_a[na + 1], ref_b[-1]])
    assert np.abs(got - want).max() <= _bound(want), f"{name}: mixed decode + prefill"


def test_model_reports_sizes(case):
    name, model, torch_model = case
    c = model.config
    assert model.kv_cache_bytes_per_block(16) == 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * c.head_dim * 4
    bytes_per = 2 if name == "bf16_weights" else 4
    params = sum(p.numel() for n, p in torch_model.named_parameters()
                 if c.tie_word_embeddings or "embed_tokens" not in n)
    assert model.weight_bytes == params * bytes_per
    caches = model.allocate_kv_cache(3, 8)
    assert len(caches) == c.num_hidden_layers
    k, v = caches[0]
    assert tuple(k.shape) == (3, 8, c.num_key_value_heads, c.head_dim) and k.dtype == np.float32


def test_bad_steps_raise_clear_errors(make_hf_model, cpu_backend):
    path, _ = make_hf_model("llama")
    model = load_model(path, cpu_backend)
    step = StepBatch.single_sequence([1, 2, 3], 0, [0], BLOCK)
    with pytest.raises(ValueError, match="allocate_kv_cache"):
        model.forward(step)
    model.allocate_kv_cache(2, BLOCK)
    with pytest.raises(ValueError, match="positions"):
        model.forward(StepBatch.single_sequence([1], model.config.max_position_embeddings, [0] * 64, BLOCK))
    bad = StepBatch.single_sequence([1, 2, 3], 0, [0], BLOCK)
    bad.logits_indices = np.array([3], np.int32)
    with pytest.raises(ValueError, match="logits_indices"):
        model.forward(bad)
    with pytest.raises(ValueError, match="token ids"):
        model.forward(StepBatch.single_sequence([model.config.vocab_size], 0, [0], BLOCK))


def test_bad_checkpoints_raise_model_load_error(make_hf_model, tmp_path, cpu_backend):
    hf_dir, _ = make_hf_model("llama")

    def variant(name):
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        return d

    pickled = variant("pickled")  # weights only as a pickle: refused, never unpickled
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(pickled, cpu_backend)

    other = variant("gpt2")
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(other, cpu_backend)

    cut = variant("truncated")
    weights = next(cut.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(cut, cpu_backend)

    garbage = variant("garbage")
    next(garbage.glob("*.safetensors")).write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(garbage, cpu_backend)


def test_sharded_checkpoint_follows_its_index(make_hf_model, tmp_path, cpu_backend):
    hf_dir, torch_model = make_hf_model("llama", seed=9)
    d = tmp_path / "sharded"
    shutil.copytree(hf_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch_model.save_pretrained(d, safe_serialization=True, max_shard_size="100KB")
    assert len(list(d.glob("model-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    (d / "consolidated.safetensors").write_bytes(b"\xff" * 64)  # not in the index: must be ignored
    model = load_model(d, cpu_backend)
    ids = model.tokenizer.encode(PROMPT)
    model.allocate_kv_cache(8, 8)
    got = model.forward(StepBatch.single_sequence(ids, 0, list(range(8)), 8, all_logits=True))
    want = _reference_logits(torch_model, ids)
    assert np.abs(got - want).max() <= _bound(want)
