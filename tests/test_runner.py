"""The runner layer on the CPU: the engine's split of logits rows between device sampling and the
host, the decode padding that CUDA graphs replay (checked with the real cpu kernels), and the
bucket arithmetic. The CUDA runner itself runs in tests/test_gpu.py on the device.

References: the fake model's pure logits function (reference_greedy); the engine with the base
runner (every row sampled on the host) for the rows that must stay on the host; unpadded steps.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the device sampler is written in torch (a test extra)")

from fake_model import FakeModel, reference_greedy  # noqa: E402
from mojollm.backends.cuda.runner import pack_sampling_rows  # noqa: E402
from mojollm.engine.runner import batch_buckets, bucket_for, width_buckets  # noqa: E402
from mojollm.backends.cuda.sampler import DeviceSampler  # noqa: E402
from mojollm.engine.engine import Engine  # noqa: E402
from mojollm.engine.runner import TOKEN_HOST, TOKEN_NOT_FINITE, ModelRunner, StepOutput  # noqa: E402
from mojollm.engine.step import StepBatch  # noqa: E402
from mojollm.sampling_params import SamplingParams  # noqa: E402


class TorchSamplingRunner(ModelRunner):
    """The CUDA runner's contract on the CPU: the device sampler (CPU torch) draws the rows the
    engine marks, with the params packed exactly as the CUDA runner packs them."""

    samples_on_device = True

    def __init__(self, model, max_num_seqs, max_model_len):
        super().__init__(model, max_num_seqs, max_model_len)
        self.sampler = DeviceSampler(max_num_seqs, model.config.vocab_size, "cpu")
        self.device_rows_seen = 0
        self.host_rows_seen = 0

    def execute(self, batch, device_rows=None):
        logits = np.asarray(self.model.forward(batch))
        n = len(device_rows)
        f, i, st = np.zeros((n, 6), np.float32), np.zeros((n, 3), np.int64), np.zeros(n, np.int64)
        plan = pack_sampling_rows(device_rows, logits.shape[1], f, i, st)
        sp = self.sampler
        sp.fparams[:n], sp.iparams[:n], sp.step[:n] = torch.from_numpy(f), torch.from_numpy(i), torch.from_numpy(st)
        t = torch.from_numpy(logits)
        tokens = sp.sample(t, plan=plan).token_ids.numpy().copy()
        tokens[~(logits.max(axis=1) < np.inf)] = TOKEN_NOT_FINITE
        host = [r for r, s in enumerate(device_rows) if s is None]
        tokens[host] = TOKEN_HOST
        self.device_rows_seen += n - len(host)
        self.host_rows_seen += len(host)
        return StepOutput(tokens=tokens, logits=logits[host])


def engines(model, **kw):
    """An engine sampling on the "device" and a host-sampling one, each over its own copy of the
    model (a model object's KV cache serves one engine)."""
    kw = dict(block_size=4, num_blocks=256, **kw)
    dev = Engine(model, **kw)
    dev.runner = TorchSamplingRunner(model, dev.scheduler.max_num_seqs, dev.max_model_len)
    return dev, Engine(copy.copy(model), **kw)


def run(engine, items):
    ids = [engine.add_request(p, sp) for p, sp in items]
    done = {o.request_id: o for o in engine.run_until_done()}
    return [done[i] for i in ids]


def prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def test_device_greedy_equals_the_reference_alone_and_batched():
    model = FakeModel()
    dev, _ = engines(model)
    ps = prompts(7, seed=2)
    sp = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    batched = run(dev, [(p, sp) for p in ps])
    for p, out in zip(ps, batched):
        assert out.outputs[0].token_ids == reference_greedy(model, p, 9)
        assert run(dev, [(p, sp)])[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert dev.runner.host_rows_seen == 0 and dev.runner.device_rows_seen > 0
    assert dev.block_manager.num_free_blocks == dev.num_blocks


def test_device_seeded_sampling_is_independent_of_the_batch():
    model = FakeModel()
    dev, _ = engines(model)
    ps = prompts(5, seed=4)
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=50, min_p=0.01, max_tokens=8, seed=100 + k,
                             ignore_eos=True) for k in range(5)]
    together = run(dev, list(zip(ps, params)))
    for p, sp, out in zip(ps, params, together):
        assert run(dev, [(p, sp)])[0].outputs[0].token_ids == out.outputs[0].token_ids
    again = run(dev, [(ps[0], params[0])])[0].outputs[0].token_ids
    other_seed = run(dev, [(ps[0], SamplingParams(temperature=0.9, top_p=0.8, top_k=50, min_p=0.01, max_tokens=8,
                                                  seed=7, ignore_eos=True))])[0].outputs[0].token_ids
    assert again == together[0].outputs[0].token_ids and other_seed != again


def test_rows_the_device_cannot_sample_come_back_to_the_host():
    """Penalties, logprobs, beam search and n > 1 mixed with device rows in one batch: each host
    row gives exactly what the host-only engine gives (same seeds, same numpy draws)."""
    model = FakeModel()
    dev, host = engines(model)
    ps = prompts(6, seed=5)
    items = [
        (ps[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),                       # device
        (ps[1], SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=6,
                               seed=3, ignore_eos=True)),                                                # host
        (ps[2], SamplingParams(temperature=0.0, logprobs=3, max_tokens=6, ignore_eos=True)),           # host
        (ps[3], SamplingParams(beam_width=3, max_tokens=5, ignore_eos=True)),                           # host
        (ps[4], SamplingParams(temperature=0.8, n=3, max_tokens=6, seed=9, ignore_eos=True)),          # first draw host
        (ps[5], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),                       # device
    ]
    got, want = run(dev, items), run(host, items)
    for k in (0, 1, 2, 3, 5):
        assert [o.token_ids for o in got[k].outputs] == [o.token_ids for o in want[k].outputs], k
    assert got[2].outputs[0].logprobs == want[2].outputs[0].logprobs
    # n = 3: the forks draw on the device after the first token, so only their shape is compared
    assert len(got[4].outputs) == 3 and all(len(o.token_ids) == 6 for o in got[4].outputs)
    assert [o.token_ids[0] for o in got[4].outputs] == [o.token_ids[0] for o in want[4].outputs]
    assert dev.runner.host_rows_seen > 0 and dev.runner.device_rows_seen > 0
    assert dev.block_manager.num_free_blocks == dev.num_blocks


def test_non_finite_device_row_fails_only_its_request():
    model = FakeModel()
    model.nan_token = 42
    dev, _ = engines(model)
    outs = run(dev, [([3, 42], SamplingParams(temperature=0.0, max_tokens=4)),
                     ([5, 6], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))])
    assert outs[0].error and "NaN" in outs[0].error
    assert outs[1].error is None and outs[1].outputs[0].token_ids == reference_greedy(model, [5, 6], 4)
    assert dev.block_manager.num_free_blocks == dev.num_blocks


# ---------------------------------------------------------------- decode padding (real cpu kernels)

def test_padded_decode_gives_the_same_logits(make_hf_model, cpu_backend):
    """A decode step padded to a larger batch and table width (padding rows in a scratch block)
    gives the real rows' logits bit for bit and leaves every real KV slot as it was."""
    from mojollm.models import load_model

    path, _ = make_hf_model("llama", seed=5)
    model = load_model(str(path), cpu_backend)
    B, num_blocks = 4, 40
    model.allocate_kv_cache(num_blocks + 1, B)          # + the scratch block
    scratch = num_blocks
    rng = np.random.default_rng(0)
    lens = [5, 13, 1]
    tables, start = [], 0
    for n in lens:                                      # prefill each sequence into its own blocks
        nb = -(-(n + 1) // B)
        tables.append(list(range(start, start + nb)))
        start += nb
        step = StepBatch.single_sequence(rng.integers(3, 300, size=n), 0, tables[-1], B)
        model.forward(step)
    width = max(len(t) for t in tables)
    bt = np.zeros((3, width), np.int32)
    for s, t in enumerate(tables):
        bt[s, :len(t)] = t
    pos = np.array(lens, np.int32)
    slots = np.array([tables[s][p // B] * B + p % B for s, p in enumerate(pos)], np.int64)
    step = StepBatch(token_ids=rng.integers(3, 300, size=3).astype(np.int32), positions=pos, slot_mapping=slots,
                     block_tables=bt, context_lens=pos + 1, cu_seqlens_q=np.arange(4, dtype=np.int32),
                     logits_indices=np.arange(3, dtype=np.int32), is_decode=True)
    kv_before = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    want = model.forward(step)
    kv_want = [(k.copy(), v.copy()) for k, v in model.kv_caches]
    model.kv_caches = [(k.copy(), v.copy()) for k, v in kv_before]  # rewind, then run the padded step
    padded = step.padded_decode(8, 16, scratch, B)
    got = model.forward(padded)
    np.testing.assert_array_equal(got[:3], want)
    assert np.isfinite(got).all()
    for (k, v), (kw, vw) in zip(model.kv_caches, kv_want):
        np.testing.assert_array_equal(k[:num_blocks], kw[:num_blocks])
        np.testing.assert_array_equal(v[:num_blocks], vw[:num_blocks])
    with pytest.raises(ValueError):
        step.padded_decode(2, 16, scratch, B)           # fewer rows than the step has


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert width_buckets(512, 16) == [16, 32, 64, 128, 256, 512]
    assert width_buckets(300, 16) == [16, 32, 64, 128, 256, 300]
    assert width_buckets(5, 16) == [5]
    assert width_buckets(100, 256) == [100]        # the smallest width exceeds the context
    assert width_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_for(3, [1, 2, 4]) == 4 and bucket_for(5, [1, 2, 4]) is None and bucket_for(1, [1]) == 1
