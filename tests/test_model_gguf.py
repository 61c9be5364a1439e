"""GGUF models vs transformers reading the same file (`gguf_file=`, dequantized to float32).

* The default model (SmolLM2-135M-Instruct, Q4_1 + Q8_0 embeddings): teacher-forced over a few
  hundred tokens of varied English, mojollm's next-token argmax must agree with transformers' on
  >= 95% of positions and its perplexity lie within 3% (both read the same quantized weights, so
  any gap is kernel arithmetic: activations are not re-quantized). Greedy decoding of "The capital
  of France is" must say Paris.
* A tiny llama GGUF written here with every supported storage type (F32, F16, BF16, Q4_0, Q4_1,
  Q8_0), mixed within a layer so both the fused and the unfused q/k/v and gate/up paths run, and
  with q/k permuted the way llama.cpp's converter does: logits within float32 error of transformers.
* Damaged or unsupported files raise ModelLoadError naming the problem.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mojollm.engine.step import StepBatch
from mojollm.errors import ModelLoadError
from mojollm.models import load_model
from mojollm.models.gguf_loader import load_gguf
from mojollm.models.llama import LlamaModel

TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined \
movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Books \
became cheaper, literacy spread, and ideas travelled faster than ever before.

In the kitchen, a good loaf of bread needs only flour, water, salt and yeast. Mix them, let the dough \
rest for an hour, fold it gently, and bake it in a hot oven until the crust is deep brown and sounds \
hollow when you tap it.

Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water \
into sugar and oxygen. It takes place mostly in the leaves, inside small structures called chloroplasts.

"Where are you going?" asked the old man. The girl smiled and pointed at the mountains. "Up there, \
before the snow comes," she said, tightening the straps of her backpack.

To install the package, open a terminal and run the install command, then restart your editor. If \
the error persists, check that your Python version is at least 3.10 and that the virtual environment \
is active.

The committee met on Tuesday to review the budget for next year. After a long discussion about roads, schools and the new library, the members agreed to raise spending on public transport by twelve percent and to publish the full report online in March.

Whales are mammals, not fish: they breathe air, give birth to live young and feed them milk. The blue whale, the largest animal that has ever lived, can grow to about thirty metres in length.
"""
CHUNK = 128  # prefill in chunks, as the engine does for long prompts
BLOCK = 16


@pytest.fixture(scope="module")
def smollm(default_gguf, cpu_backend):
    from transformers import AutoModelForCausalLM

    ours = load_model(default_gguf, cpu_backend)
    ref = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                               dtype=torch.float32).eval()
    return ours, ref


def _rope_theta(cfg) -> float:
    """transformers >= 5 keeps theta in rope_parameters, older versions as rope_theta."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
def test_default_model_config(smollm):
    ours, ref = smollm
    c = ours.config
    assert c.arch == "llama" and not c.rope_neox  # llama.cpp permuted q/k for interleaved rope
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (ref.config.num_hidden_layers, ref.config.hidden_size, ref.config.num_attention_heads,
         ref.config.num_key_value_heads, ref.config.hidden_size // ref.config.num_attention_heads)
    assert c.tie_word_embeddings and c.vocab_size == ref.config.vocab_size
    assert c.rope_theta == pytest.approx(_rope_theta(ref.config))
    # Bytes per decode step: the quantized file's tensors (tied embedding read once as lm_head).
    assert 0.9 * ours.path.stat().st_size < ours.weight_bytes < ours.path.stat().st_size


@pytest.mark.slow
def test_default_model_teacher_forced_agreement_and_perplexity(smollm):
    ours, ref = smollm
    ids = ours.tokenizer.encode(TEXT)
    assert 250 <= len(ids) <= 400
    n_blocks = -(-len(ids) // BLOCK)
    ours.allocate_kv_cache(n_blocks, BLOCK)
    table = list(range(n_blocks))
    got = np.concatenate([
        ours.forward(StepBatch.single_sequence(ids[s:s + CHUNK], s, table, BLOCK, all_logits=True))
        for s in range(0, len(ids), CHUNK)
    ])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    targets = np.array(ids[1:])
    agree = float((got[:-1].argmax(-1) == want[:-1].argmax(-1)).mean())
    nll_ours = -_log_softmax(got[:-1])[np.arange(len(targets)), targets].mean()
    nll_ref = -_log_softmax(want[:-1])[np.arange(len(targets)), targets].mean()
    ppl_ours, ppl_ref = float(np.exp(nll_ours)), float(np.exp(nll_ref))
    print(f"\n{len(ids)} tokens: top-1 agreement {agree:.4f}, ppl {ppl_ours:.4f} vs transformers {ppl_ref:.4f}, "
          f"max |logit error| {np.abs(got - want).max():.3g} (logit scale {np.abs(want).max():.3g})")
    assert agree >= 0.95
    assert abs(ppl_ours / ppl_ref - 1) <= 0.03


@pytest.mark.slow
def test_default_model_greedy_says_paris(smollm):
    ours, _ = smollm
    ids = ours.tokenizer.encode("The capital of France is")
    ours.allocate_kv_cache(2, BLOCK)
    table = [1, 0]
    logits = ours.forward(StepBatch.single_sequence(ids, 0, table, BLOCK))
    out = []
    for _ in range(8):
        out.append(int(logits[0].argmax()))
        logits = ours.forward(StepBatch.single_sequence(out[-1:], len(ids) + len(out) - 1, table, BLOCK))
    text = ours.tokenizer.decode(out)
    assert "Paris" in text, text


# ---- a tiny GGUF with every supported storage type ----

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows: rotate_half pairs -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, hf_dir, torch_model, types: dict[str, str], arch: str = "llama", rope_freqs=None):
    import gguf
    from gguf import GGMLQuantizationType as Q

    cfg = torch_model.config
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    tokens = [t for t, _ in vocab]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)

    sd = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
        if arch == "qwen2":
            for p in "qkv":
                names[f"model.layers.{i}.self_attn.{p}_proj.bias"] = f"blk.{i}.attn_{p}.bias"
    for hf_name, gg_name in names.items():
        a = sd[hf_name]
        if arch == "llama" and gg_name.endswith("attn_q.weight"):  # qwen2 files keep the HF layout
            a = _llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and gg_name.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        kind = "F32" if a.ndim == 1 else types[gg_name.split(".")[-2]]
        qt = Q[kind]
        data = a.astype(np.float32) if kind == "F32" else (
            a.astype(np.float16) if kind == "F16" else gguf.quants.quantize(a, qt))
        w.add_tensor(gg_name, data, raw_dtype=None if kind in ("F32", "F16") else qt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Mixed on purpose: q/k share a type but v does not (separate q/k/v linears); gate/up differ
# (widened to float32 to fuse); every storage type appears.
TINY_TYPES = {"token_embd": "Q8_0", "output": "Q4_1", "attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q8_0",
              "attn_output": "BF16", "ffn_gate": "Q4_1", "ffn_up": "F16", "ffn_down": "Q8_0"}
UNIFORM_TYPES = {k: "Q4_1" for k in TINY_TYPES}


@pytest.fixture
def float_activations():
    """Quantized layers on the float path (the float32 bounds below; by default decode-sized
    calls quantize activations to int8, tested in test_quant_int8)."""
    from mojollm.kernels import quant

    previous = quant.set_default_dot("float")
    yield
    quant.set_default_dot(previous)


@pytest.mark.parametrize("arch,types", [("llama", TINY_TYPES), ("llama", UNIFORM_TYPES), ("qwen2", UNIFORM_TYPES)],
                         ids=["llama_mixed_types", "llama_uniform_q4_1", "qwen2_bias_q4_1"])
def test_tiny_gguf_matches_transformers(make_hf_model, cpu_backend, tmp_path, arch, types, float_activations):
    from transformers import AutoModelForCausalLM

    hf_dir, torch_model = make_hf_model(arch, num_key_value_heads=2, intermediate_size=96)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, hf_dir, torch_model, types, arch)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    model = load_model(path, cpu_backend)
    assert model.config.arch == arch
    assert model.config.rope_neox == (arch == "qwen2") and model.config.attention_bias == (arch == "qwen2")
    fused = model.layers[0].qkv is not None
    assert fused == (types is UNIFORM_TYPES)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. 12345") + [5, 77, 200]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    n_blocks = -(-len(ids) // 4)
    model.allocate_kv_cache(n_blocks + 3, 4)
    table = np.random.default_rng(0).permutation(n_blocks + 3)[:n_blocks].tolist()
    n = len(ids) - 3
    got = [model.forward(StepBatch.single_sequence(ids[:n], 0, table, 4, all_logits=True))]
    for p in range(n, len(ids)):
        got.append(model.forward(StepBatch.single_sequence(ids[p:p + 1], p, table, 4)))
    got = np.concatenate(got)
    # float32 bound as in test_model_hf (same arithmetic, the dequantized weights are exact in float32).
    bound = 2e-5 + 2e-5 * float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    print(f"\n{arch} {'mixed' if types is TINY_TYPES else 'uniform'}: max |logit error| {err:.2e} "
          f"at logit scale {np.abs(want).max():.2f} (bound {bound:.2e})")
    assert err <= bound


def _llama_cpp_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs.weight for llama3 scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_gguf_rope_freqs_match_hf_llama3_scaling(make_hf_model, cpu_backend, tmp_path):
    """Llama 3.1-style GGUFs carry rope scaling as rope_freqs.weight; the reference here is the HF
    model with rope_scaling=llama3 itself (F32 weights, so only the rope path differs)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf_dir, torch_model = make_hf_model("llama", rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=256)
    path = tmp_path / "llama3.gguf"
    head_dim = torch_model.config.hidden_size // torch_model.config.num_attention_heads
    _write_tiny_gguf(path, hf_dir, torch_model, {k: "F32" for k in TINY_TYPES}, "llama",
                     rope_freqs=_llama_cpp_rope_factors(head_dim, 500000.0, scaling))
    model = load_model(path, cpu_backend)
    assert model.config.rope_scaling == {"rope_type": "freq_factors"}
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, 60).tolist()
    with torch.no_grad():
        want = torch_model(torch.tensor([ids])).logits[0].numpy()
    model.allocate_kv_cache(4, 16)
    got = model.forward(StepBatch.single_sequence(ids, 0, [0, 1, 2, 3], 16, all_logits=True))
    assert np.abs(got - want).max() <= 2e-5 + 2e-5 * float(np.abs(want).max())


# ---- errors ----

def _minimal_gguf(path, arch="llama", tensors=()):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, val in {"block_count": 1, "context_length": 64, "embedding_length": 64, "feed_forward_length": 64,
                     "attention.head_count": 2, "vocab_size": 8}.items():
        w.add_uint32(f"{arch}.{key}", val)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tensor_type_is_named(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    path = _minimal_gguf(tmp_path / "tq2.gguf", tensors=[("token_embd.weight", a, None),
                                                         ("blk.0.attn_q.weight", gguf.quants.quantize(a, Q.TQ2_0), Q.TQ2_0)])
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight has type TQ2_0"):
        load_gguf(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = _minimal_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        load_gguf(path)


def test_truncated_file_raises_model_load_error(default_gguf, tmp_path):
    # empty, inside the header, inside the token list, inside the tensor data
    for n in (0, 10, 2_000_000, default_gguf.stat().st_size - 1000):
        cut = tmp_path / f"cut{n}.gguf"
        with open(default_gguf, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(n))
        with pytest.raises(ModelLoadError):
            load_gguf(cut)


def test_missing_tensor_is_named(make_hf_model, tmp_path, cpu_backend):
    hf_dir, torch_model = make_hf_model("llama")
    path = tmp_path / "full.gguf"
    _write_tiny_gguf(path, hf_dir, torch_model, UNIFORM_TYPES)
    ckpt = load_gguf(path)
    del ckpt.weights["layers.1.down_proj"]
    with pytest.raises(ModelLoadError, match=r"layers\.1\.down_proj"):
        LlamaModel(ckpt.config, ckpt.weights, None, cpu_backend)

