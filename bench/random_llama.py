"""Random-weight Llama checkpoints in the Hugging Face layout, for benchmarks that need real shapes
but no downloads.

    from random_llama import write_random_llama
    write_random_llama("/tmp/llama-1b", shape="llama-3.2-1b", device="cuda")     # ~2.5 GB, seconds
    python bench/random_llama.py /tmp/llama-8b --shape llama-3-8b --device cuda   # ~16 GB

The directory holds config.json (LlamaForCausalLM), model.safetensors (one file), a byte-level BPE
tokenizer.json covering the whole vocabulary, tokenizer_config.json and generation_config.json;
mojollm (`LLM(model=dir)`), transformers (`from_pretrained`) and bench/torch_peer.py all load it.

Weights: N(0, std) with std 0.02 by default (the usual init: activations stay finite through 32
layers), norms 1, drawn with a seeded generator on `device` one tensor at a time and streamed to the
file, so a 16 GB checkpoint needs ~1 GB of host memory. The same seed gives the same weights on the
same kind of device only (CPU and CUDA generators differ).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SHAPES = {
    # meta-llama/Llama-3.2-1B's config.json
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Meta-Llama-3-8B's config.json
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0, rope_scaling=None),
    # For the GPU tests of Modular's kernels: GQA 3:1 with head_dim 64 (flash attention's), weight
    # shapes that are multiples of 8 but no powers of two (bench/build_gpu.py prebuilds them).
    "small-gqa": dict(hidden_size=264, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      head_dim=64, intermediate_size=520, vocab_size=1000, tie_word_embeddings=True,
                      max_position_embeddings=1024, rope_theta=10000.0, rope_scaling=None),
    # For tests: sizes that are no power of two, GQA (3 q heads per kv head), llama3 rope scaling
    # with a short original context so the scaled bands show up within a few hundred positions.
    "tiny": dict(hidden_size=120, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=20, intermediate_size=344, vocab_size=515, tie_word_embeddings=True,
                 max_position_embeddings=512, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}

_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

# Llama 3's special tokens, in its order; they take the last ids of the vocabulary as in Llama 3.
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# What the tokenizer's merges are learnt from: any varied text works, it only needs to be fixed.
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "Paged attention stores keys and values in fixed-size blocks, so sequences of any length share one pool.",
    "def forward(self, x):\n    return self.linear(x) + self.bias\n",
    "Numbers like 12345 and 3.14159 appear in text, as do emoji \U0001f642 and accents: caf\u00e9, na\u00efve.",
    "A user asks a question and the assistant answers it politely, in one or two short sentences.",
    "Large language models predict the next token from the previous ones, one step at a time.",
]


def num_special_tokens(vocab_size: int) -> int:
    num = 256 if vocab_size >= 4096 else 16  # Llama 3 reserves 256
    if vocab_size - num < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens")
    return num


def special_token_ids(vocab_size: int) -> dict:
    """<|begin_of_text|> and <|end_of_text|> open the specials block (128000, 128001 at Llama 3's size)."""
    bos = vocab_size - num_special_tokens(vocab_size)
    return {"bos_token_id": bos, "eos_token_id": bos + 1}


def special_tokens(num: int) -> list[str]:
    """Llama 3's names first, then reserved ones, `num` in all."""
    names = _LLAMA3_SPECIALS[:num]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + num - len(names))]
    return names


def write_tokenizer(out_dir: Path, vocab_size: int) -> dict:
    """tokenizer.json + tokenizer_config.json with exactly `vocab_size` ids; returns the special ids.

    Every id the model can emit must decode (mojollm's detokenizer refuses ids outside the
    tokenizer), so the vocabulary is: the 256 byte symbols, merges learnt from a fixed text, then
    filler tokens that no text encodes to but that decode (as "<filler_N>"), then the specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    num_plain = vocab_size - num_special_tokens(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=num_plain, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAIN_TEXT * 10, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), num_plain):
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    specials = special_tokens(vocab_size - num_plain)
    tok.add_special_tokens(specials)
    ids = special_token_ids(vocab_size)
    bos = ids["bos_token_id"]
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(specials[0]) == bos, (tok.get_vocab_size(), bos)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
        "model_max_length": 131072, "chat_template": _CHAT_TEMPLATE}, indent=2))
    return ids


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM parameter names -> shapes, in the order they are written."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_size = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_size = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_size, hidden),
            p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, seed: int,
                             device: str, std: float, zero: tuple[str, ...] = ()) -> int:
    """Stream seeded random tensors into one safetensors file; returns its size in bytes.
    Tensors whose names end with one of `zero` are written as zeros.

    The header is written first (every shape is known), then each tensor is drawn on `device`,
    copied to the host and appended, so memory holds one tensor at a time.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    gen = torch.Generator(device=device).manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch_dtype)
            elif zero and name.endswith(zero):
                t = torch.zeros(shape, dtype=torch_dtype)
            else:
                # Drawn in float32 then rounded: randn has no bfloat16 kernel on every device.
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(torch_dtype)
            f.write(t.cpu().contiguous().view(-1).view(torch.uint8).numpy())  # raw little-endian bytes
    return 8 + len(header_bytes) + offset


def llama_config(shape: str, dtype: str = "bfloat16", **overrides) -> dict:
    """The config.json contents for `shape`, as the hub's Llama files spell it."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    arch = {**SHAPES[shape], **overrides}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "pretraining_tp": 1, "use_cache": True, "torch_dtype": dtype,
            **special_token_ids(arch["vocab_size"]), **arch}


def preset_checkpoint(shape: str, dtype: str = "bfloat16"):
    """(ModelConfig, weights) of a preset as mojollm's loader would see the written checkpoint,
    with no data (views of one zero): for shape-driven tools (the kernel specialisation builds)."""
    import numpy as np

    from mojollm.models.config import ModelConfig
    from mojollm.models.hf_loader import our_name
    from mojollm.weights import WeightTensor

    cfg = llama_config(shape, dtype)
    qtype = _SAFETENSORS_DTYPES[dtype]
    zero = np.zeros(1, dtype={"F32": np.float32, "BF16": np.uint16, "F16": np.float16}[qtype])
    weights = {our_name(n): WeightTensor(our_name(n), s, qtype, np.broadcast_to(zero, s))
               for n, s in tensor_shapes(cfg).items()}
    return ModelConfig.from_hf(cfg), weights


def write_random_llama(out_dir, shape: str = "llama-3.2-1b", dtype: str = "bfloat16", seed: int = 0,
                       device: str = "cpu", std: float = 0.02, zero: tuple[str, ...] = (),
                       **config_overrides) -> Path:
    """Write a random-weight HF Llama directory for `shape` (a key of SHAPES); returns its path.

    `config_overrides` replace config.json fields (e.g. tie_word_embeddings=False, num_hidden_layers=2).
    `zero`: name suffixes of tensors written as zeros (e.g. "o_proj.weight": no attention output,
    so each next token depends on the last token alone).
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_SAFETENSORS_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape, dtype, **config_overrides)
    ids = write_tokenizer(out_dir, cfg["vocab_size"])
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}, indent=2))
    write_random_safetensors(out_dir / "model.safetensors", tensor_shapes(cfg), dtype, seed, device, std, tuple(zero))
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=list(_SAFETENSORS_DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--std", type=float, default=0.02)
    args = ap.parse_args()
    import time

    t = time.perf_counter()
    path = write_random_llama(args.out_dir, args.shape, args.dtype, args.seed, args.device, args.std)
    size = (path / "model.safetensors").stat().st_size
    print(f"{path}: {args.shape} {args.dtype}, {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
