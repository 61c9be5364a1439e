"""The tpu runner (backends/tpu/runner.py): one jitted program per padded step, KV caches donated.

References: the same backend's ops run one by one without padding (model.forward, and the engine's
base runner calling it: the path the runner replaced), which tests/test_tpu.py checks against
transformers and float64 references; greedy tokens go through the engine with chunked prefill and
preemption. The model is a 2-layer random-weight Llama built here (no checkpoint, no torch). Runs
on XLA:CPU in CI.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is the tpu backend's optional dependency (the test extra "
                                         "installs it); the cpu path needs none of it")

from fake_model import FakeTokenizer  # noqa: E402
from mojollm.backends.tpu.backend import DenseWeight, TpuBackend  # noqa: E402
from mojollm.backends.tpu.runner import TpuRunner, bucket  # noqa: E402
from mojollm.engine.runner import batch_buckets, width_buckets  # noqa: E402
from mojollm.engine.runner import TOKEN_HOST, TOKEN_NOT_FINITE, ModelRunner  # noqa: E402
from mojollm.engine.step import StepBatch  # noqa: E402
from mojollm.llm import LLM  # noqa: E402
from mojollm.models.config import ModelConfig  # noqa: E402
from mojollm.models.llama import LlamaModel  # noqa: E402
from mojollm.sampling_params import SamplingParams  # noqa: E402
from mojollm.weights import WeightTensor  # noqa: E402

VOCAB = 320


def tiny_model(backend=None, seed: int = 0) -> LlamaModel:
    """2 layers, GQA 4/2, head dim 16, weights N(0, 0.15) (sharp logits: no near-ties in greedy)."""
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=96, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                      tie_word_embeddings=False, attention_bias=False)
    rng = np.random.default_rng(seed)
    shapes = {"embed_tokens": (VOCAB, 64), "lm_head": (VOCAB, 64), "norm": (64,)}
    for i in range(2):
        shapes.update({f"layers.{i}.{n}": s for n, s in {
            "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
            "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96),
            "input_layernorm": (64,), "post_attention_layernorm": (64,)}.items()})
    weights = {n: WeightTensor.from_float(n, rng.uniform(0.5, 1.5, s) if len(s) == 1 else rng.normal(0, 0.15, s))
               for n, s in shapes.items()}
    return LlamaModel(cfg, weights, FakeTokenizer(VOCAB), backend or TpuBackend())


def eager_backend() -> TpuBackend:
    """The tpu backend with the engine's base runner: ops one by one, no padding."""
    be = TpuBackend()
    be.create_runner = lambda model, max_num_seqs, max_model_len: ModelRunner(model, max_num_seqs, max_model_len)
    return be


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def greedy_row():
    return SimpleNamespace(request=SimpleNamespace(params=SamplingParams(temperature=0.0)))


def batch_of(seqs, block_size, tables):
    """A StepBatch of sequences (new token ids, start position), each with its block table row."""
    ids, pos, slots, cu, lens, rows = [], [], [], [0], [], []
    for s, (new, start) in enumerate(seqs):
        p = np.arange(start, start + len(new))
        ids += list(new)
        pos += p.tolist()
        slots += (tables[s, p // block_size].astype(np.int64) * block_size + p % block_size).tolist()
        cu.append(cu[-1] + len(new))
        lens.append(start + len(new))
        rows.append(cu[-1] - 1)
    decode = all(len(new) == 1 for new, _ in seqs)
    return StepBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(slots, np.int64), tables,
                     np.array(lens, np.int32), np.array(cu, np.int32), np.array(rows, np.int32), decode)


def test_scores_through_the_runner_equal_the_unpadded_ops():
    """A prefill whose every row's logits come back (scoring: 11 rows -> bucket 16) and 3 decode
    steps through a shuffled cache: the runner's rows vs model.forward's (tests/test_tpu.py checks
    those against transformers)."""
    runner_model, eager = tiny_model(), tiny_model()
    runner = TpuRunner(runner_model, max_num_seqs=2, max_model_len=64)
    runner.allocate_kv_cache(16, 4)
    eager.allocate_kv_cache(17, 4)
    table = np.random.default_rng(0).permutation(16).astype(np.int32)
    ids = np.random.default_rng(1).integers(2, VOCAB, 14)
    steps = [StepBatch.single_sequence(ids[:11], 0, table, 4, all_logits=True)]
    steps += [StepBatch.single_sequence(ids[p:p + 1], p, table, 4) for p in range(11, 14)]
    for step in steps:
        out = runner.execute(step)
        assert (out.tokens == TOKEN_HOST).all() and rel_err(out.logits, eager.forward(step)) < 1e-5


def test_llm_on_the_tpu_backend_runs_the_runner():
    llm = LLM(tiny_model(), block_size=4, num_blocks=32, max_num_seqs=2)
    assert isinstance(llm.engine.runner, TpuRunner) and llm.engine.runner.samples_on_device
    assert llm.engine.runner.scratch_block == 32 and llm.model.kv_caches[0][0].shape[0] == 33


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(8) == [1, 2, 4, 8]
    assert width_buckets(1) == [1] and width_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert bucket(3, [1, 2, 4, 6]) == 4 and bucket(7, [1, 2, 4, 6]) == 8


def test_padding_changes_no_real_row_and_writes_only_the_scratch_block():
    """A prefill step (3 sequences, 13 tokens -> bucket 4 x 16) and a decode step (3 -> 4): the
    real rows' logits are the unpadded ops' (model.forward on an identical cache), and the caches
    change only at the step's slots and in the scratch block."""
    runner_model = tiny_model()
    runner = TpuRunner(runner_model, max_num_seqs=4, max_model_len=64)
    runner.allocate_kv_cache(24, 4)
    eager = tiny_model()
    eager.allocate_kv_cache(25, 4)
    tables = np.random.default_rng(2).permutation(24).astype(np.int32)[:18].reshape(3, 6)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, 300, n).tolist() for n in (5, 1, 7)]
    steps = [batch_of([(p, 0) for p in prompts], 4, tables),
             batch_of([([9], len(p)) for p in prompts], 4, tables)]
    for batch in steps:
        before = [np.asarray(c).reshape(-1, *c.shape[2:]) for kv in runner_model.kv_caches for c in kv]
        out = runner.execute(batch)
        ref = eager.forward(batch)
        assert rel_err(out.logits, ref) < 1e-5
        after = [np.asarray(c).reshape(-1, *c.shape[2:]) for kv in runner_model.kv_caches for c in kv]
        changed = set()
        for b, a in zip(before, after):
            changed |= set(np.nonzero((a != b).any(axis=(1, 2)))[0].tolist())
        scratch = set(range(24 * 4, 25 * 4))
        assert changed - scratch <= set(batch.slot_mapping.tolist())
        assert changed & set(batch.slot_mapping.tolist())   # the step did write its own slots


def test_device_rows_greedy_host_rows_and_non_finite():
    """Greedy device rows come back as tokens (the argmax of the same logits), the others as
    logits in row order; a device row whose logits are not finite is TOKEN_NOT_FINITE."""
    model = tiny_model()
    bad_token = 7   # its embedding is NaN: the row whose token it is has NaN logits
    model.embed = DenseWeight(model.embed.w.at[bad_token].set(np.nan))
    runner = TpuRunner(model, max_num_seqs=4, max_model_len=64)
    runner.allocate_kv_cache(16, 4)
    tables = np.arange(16, dtype=np.int32).reshape(4, 4)
    prompts = [[3, 4, 5], [6, 8], [10, 11, 12, 13]]
    runner.execute(batch_of([(p, 0) for p in prompts], 4, tables[:3]))
    hot = SimpleNamespace(request=SimpleNamespace(params=SamplingParams(temperature=0.7)))
    step = batch_of([([20], 3), ([bad_token], 2), ([21], 4), ([22], 0)], 4, tables)
    out = runner.execute(step, [greedy_row(), greedy_row(), hot, None])
    assert out.tokens[1] == TOKEN_NOT_FINITE and list(out.tokens[2:]) == [TOKEN_HOST, TOKEN_HOST]
    assert out.logits.shape == (2, model.config.vocab_size) and np.isfinite(out.logits).all()
    all_rows = runner.execute(step.padded_decode(4, 4, runner.scratch_block, 4))   # same step, every row back
    assert out.tokens[0] == int(all_rows.logits[0].argmax())
    assert rel_err(out.logits, all_rows.logits[2:]) < 1e-6


def test_decode_compiles_per_bucket_not_per_token():
    """Contexts 17..64 with B=16 need 2..4 blocks -> width buckets 2 and 4; batches 1 and 3 ->
    buckets 1 and 4: four decode programs for 96 steps."""
    runner = TpuRunner(tiny_model(), max_num_seqs=4, max_model_len=128)
    runner.allocate_kv_cache(32, 16)
    tables = np.arange(32, dtype=np.int32).reshape(4, 8)
    for n in (1, 3):
        for ctx in range(17, 65):
            runner.execute(batch_of([([5], ctx - 1)] * n, 16, tables[:n, :(ctx + 15) // 16]), [greedy_row()] * n)
    assert runner.num_compilations() == 4


def test_greedy_tokens_equal_the_unpadded_ops_and_the_cpu_backend(cpu_backend):
    """LLM on the tpu backend with a 16-token step budget (prompts of up to 40 tokens prefill in chunks)
    and a pool too small for the batch (preemption, recomputation), batched and alone: the same
    greedy tokens as the ops run one by one without padding and as the cpu backend, and every KV
    block back at the end."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(2, 300, n).tolist() for n in (40, 3, 23, 9, 17)]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = [o.token_ids for o in LLM(tiny_model(eager_backend()), block_size=4, num_blocks=96).generate(prompts, sp)]
    assert [o.token_ids for o in LLM(tiny_model(cpu_backend), block_size=4, num_blocks=96).generate(prompts, sp)] == ref
    llm = LLM(tiny_model(), block_size=4, num_blocks=20, max_num_batched_tokens=16, max_num_seqs=4)
    assert isinstance(llm.engine.runner, TpuRunner)
    batched = llm.generate(prompts, sp)
    assert not any(o.error for o in batched)
    assert [o.token_ids for o in batched] == ref
    assert llm.engine.stats.preemptions > 0
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts[:2]]
    assert alone == ref[:2]
    eng = llm.engine
    assert eng.block_manager.num_free_blocks == eng.num_blocks and not eng.has_unfinished()


@pytest.mark.slow
def test_default_model_greedy_through_the_runner(default_gguf):
    """The default model (Q4_1 + Q8_0 GGUF) through LLM(backend="tpu"): 12 greedy tokens of two
    prompts in one batch equal the unpadded ops' (model.forward step by step)."""
    prompts = ["The three primary colors are", "Once upon a time"]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = [o.token_ids for o in LLM(model=str(default_gguf), backend="tpu").generate(prompts, sp)]
    from mojollm.models import load_model

    ref_llm = LLM(load_model(default_gguf, backend=eager_backend()), num_blocks=16)
    ref = [o.token_ids for o in ref_llm.generate(prompts, sp)]
    assert got == ref
