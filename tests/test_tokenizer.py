"""Tokenizer and chat templates against transformers' own tokenizers for the same files."""

from __future__ import annotations

import pytest

from mojollm.models.gguf_loader import open_reader, read_metadata
from mojollm.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The capital of France is Paris.",
    "  leading spaces,\n\n\ttabs\t\tand   runs of    whitespace   ",
    "Ünïcödé — “curly quotes” · 日本語のテキスト · Ελληνικά · русский текст",
    "emoji: 🤖🎉👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "digits 0 1 12 123 1234 12345678901234567890, 3.14159e-10, 2026-11-22 10:42",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(7))\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <file_sep> tags<filename>",
    "I'm sure you're right; they'll say DON'T and we'd've",
    "a" * 300,
    "",
    " ",
    "\n",
    "\r\n windows line\r\nendings",
    "mixed 中文 and English, with punctuation!?!... (brackets) [1] {x: y}",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, with émoji 🎨?"}],
]


@pytest.fixture(scope="module")
def gguf_tokenizers(default_gguf):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf_metadata(read_metadata(open_reader(default_gguf)))
    ref = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return ours, ref


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(gguf_tokenizers, text):
    ours, ref = gguf_tokenizers
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=True)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    # Byte-level BPE is lossless; skipping special tokens matches transformers too.
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens(gguf_tokenizers):
    ours, ref = gguf_tokenizers
    assert ours.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(ref)
    ids = ours.encode("<|im_start|>x<|im_end|>")
    assert ids[0] == ref.convert_tokens_to_ids("<|im_start|>") and ids[-1] == ref.convert_tokens_to_ids("<|im_end|>")
    assert ours.decode(ids) == "x"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_gguf_chat_template_matches_transformers(gguf_tokenizers, chat, add_generation_prompt):
    ours, ref = gguf_tokenizers
    messages = CHATS[chat]
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_decode_rejects_out_of_range_ids(gguf_tokenizers):
    ours, _ = gguf_tokenizers
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-1])


def test_hf_dir_tokenizer_matches_transformers(make_hf_model):
    from transformers import AutoTokenizer

    from conftest import TINY_SPECIALS

    path, _ = make_hf_model("llama")
    ours = Tokenizer.from_hf_dir(path)
    ref = AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert ours.encode("hi")[0] == ours.bos_token_id == ours.token_to_id(TINY_SPECIALS[0])
    assert ours.eos_token_ids == {ours.token_to_id("<|eos|>")}
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)


def test_chat_template_raise_exception_and_sandbox(make_hf_model):
    path, _ = make_hf_model("llama")
    ours = Tokenizer.from_hf_dir(path)
    with pytest.raises(ValueError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="list of"):
        ours.apply_chat_template("hello")
    # The sandbox refuses attribute access to Python internals.
    evil = Tokenizer(ours._tok, bos_token_id=0, eos_token_ids=[1],
                     chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|access"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    no_template = Tokenizer(ours._tok, bos_token_id=0, eos_token_ids=[1], chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


def _write_sentencepiece_gguf(path):
    """A llama.cpp-style sentencepiece vocabulary (byte tokens, scores, no merges) in a small GGUF."""
    import gguf
    import numpy as np
    from tokenizers import SentencePieceBPETokenizer

    from conftest import _TRAIN_TEXT

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(_TRAIN_TEXT, vocab_size=400, show_progress=False)
    pieces = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1]) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.ones((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    _write_sentencepiece_gguf(path)
    ours = Tokenizer.from_gguf_metadata(read_metadata(open_reader(path)))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.encode("x")[0] == 1  # sentencepiece llama vocabularies add BOS
    assert any(ours.id_to_token(i).startswith("<0x") for i in ours.encode("日本"))  # byte fallback used


def test_gguf_vocabulary_with_duplicate_spellings_decodes_every_id():
    """llama.cpp's text->id map keeps the first of two equal spellings; every id still decodes
    (an id-range check on the backend's smaller unique count refused the highest ids)."""
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "a", "zz"]   # "a" twice: ids 3 and 6
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == len(tokens)
    assert tok.decode([7, 6, 5]) == tok.decode([7]) + tok.decode([6]) + tok.decode([5])
    assert tok.decode([7]) == "zz"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tokens)])


def test_gguf_tokenizer_the_library_refuses_is_a_load_error():
    from mojollm.errors import ModelLoadError

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": ["a"]}                     # a merge needs two parts
    with pytest.raises(ModelLoadError, match="model.gguf"):
        Tokenizer.from_gguf_metadata(meta, where="model.gguf")
