"""The benchmark's peer (bench/torch_peer.py) and model builder (bench/random_llama.py) against transformers.

On bench/random_llama.py's "tiny" shape (odd sizes, 3 q heads per kv head, llama3 rope scaling
with an original context of 32, so positions past it use the scaled bands), float32 on the CPU:
  * the peer's prefill logits, and its decode logits through the static cache and mask, match
    transformers' LlamaForCausalLM on the same directory within 1e-4 of the logit range
    (measured ~1e-6: the same float32 ops in another order);
  * greedy tokens of the peer, of transformers' generate and of mojollm's cpu backend agree.
Weights use std 0.1 (not 0.02) so the logits are peaked and greedy picks are no near-ties.
The peer runs eager here: compiling it on the CPU takes ~40 s and says nothing about CUDA graphs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
REL_TOL = 1e-4
NEW_TOKENS = 8
PROMPT_LEN = 40  # past the scaled rope's original context (32)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


random_llama = _load("random_llama")
torch_peer = _load("torch_peer")


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_dir(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return random_llama.write_random_llama(out, shape="tiny", dtype="float32", std=0.1,
                                           tie_word_embeddings=request.param == "tied")


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_dir) -> torch.Tensor:
    vocab = random_llama.SHAPES["tiny"]["vocab_size"]
    bos = random_llama.special_token_ids(vocab)["bos_token_id"]
    ids = torch.randint(0, bos, (1, PROMPT_LEN - 1), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([[bos]]), ids], dim=1)  # [1, S]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def test_random_llama_shapes_and_tokenizer(tmp_path):
    """The real shapes' parameter counts, and a full-size tokenizer that mojollm loads."""
    from mojollm.tokenizer import Tokenizer

    def params(shape):
        return sum(math.prod(s) for s in random_llama.tensor_shapes(random_llama.llama_config(shape)).values())

    assert round(params("llama-3.2-1b") / 1e9, 2) == 1.24  # tied: no lm_head
    assert round(params("llama-3-8b") / 1e9, 2) == 8.03
    ids = random_llama.write_tokenizer(tmp_path, 128256)
    assert ids == {"bos_token_id": 128000, "eos_token_id": 128001}
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.vocab_size == 128256 and tok.bos_token_id == 128000
    assert tok.encode("Hello world")[0] == 128000
    # every id a model can emit decodes (random weights emit any of them)
    assert tok.decode([0, 1000, 127999, 128255], skip_special_tokens=False)


def test_peer_logits_match_transformers(tiny_dir, hf_model, prompt):
    model = torch_peer.load_model(tiny_dir, "cpu", torch.float32, max_batch=1, max_seq_len=64)
    with torch.no_grad():
        ref = hf_model(prompt).logits  # [1, S, V]
        got = model.logits(model(prompt, torch.arange(PROMPT_LEN), is_prefill=True))
        assert _rel(got, ref) < REL_TOL
        # The decode path: the last 4 positions one at a time through the cache and the causal mask.
        split = PROMPT_LEN - 4
        model(prompt[:, :split], torch.arange(split), is_prefill=True)
        for pos in range(split, PROMPT_LEN):
            step = model.logits(model(prompt[:, pos:pos + 1], torch.tensor([pos])))
            assert _rel(step[:, 0], ref[:, pos]) < REL_TOL, pos


def test_peer_greedy_matches_transformers(tiny_dir, hf_model, prompt):
    model = torch_peer.load_model(tiny_dir, "cpu", torch.float32, max_batch=1, max_seq_len=64)
    tokens, ttft_s, decode_tok_per_s = torch_peer.generate(model, prompt, NEW_TOKENS)
    ref = hf_model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert tokens.tolist() == ref[:, PROMPT_LEN:].tolist()
    assert len(set(tokens[0].tolist())) > 1  # not a degenerate repeat that any bug could also produce
    assert ttft_s > 0 and decode_tok_per_s > 0
    # a batch of two (the prompt and a shifted copy) decodes each row as on its own
    batch = torch.cat([prompt, prompt.roll(1, dims=1)])
    batch_tokens, _, _ = torch_peer.generate(model, batch, NEW_TOKENS)
    assert batch_tokens[0].tolist() == tokens[0].tolist()


def test_mojollm_cpu_greedy_matches_transformers(tiny_dir, hf_model, prompt):
    from mojollm import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), backend="cpu")
    out = llm.generate([prompt[0].tolist()], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    ref = hf_model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0].outputs[0].token_ids == ref[0, PROMPT_LEN:].tolist()
