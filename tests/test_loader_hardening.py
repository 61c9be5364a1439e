"""Damaged and hostile checkpoints fail fast with one ModelLoadError line (issue 11, item 5).

Each class of failure found by the adversarial pass has a regression test here: layer counts and
array counts that claim far more than the file holds, zero heads or layers, malformed safetensors
headers, absurd context lengths and wrongly typed config values. The tiny checkpoints are written
here with numpy, gguf.GGUFWriter and safetensors; `write_tiny_gguf` / `write_tiny_hf` are also the
seeds of tests/test_fuzz_loaders.py.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from mojollm.errors import ModelLoadError
from mojollm.models import load_model
from mojollm.models.config import ModelConfig
from mojollm.models.gguf_loader import load_gguf
from mojollm.models.hf_loader import load_hf, read_safetensors

FAST = 3.0  # seconds: every refusal below must come before any work sized by the file's claims

# A tiny llama: 2 layers, hidden 32, 2 heads of 16 (1 kv head), ffn 64, a byte-level vocabulary.
TINY = dict(hidden=32, heads=2, kv_heads=1, ffn=64, layers=2, context=64)
# GGUF storage type per weight: every type mojollm reads appears (rows of 32 or 64 elements).
TINY_GGUF_TYPES = {"token_embd": "Q8_0", "output": "F16", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "BF16",
                   "attn_output": "F32", "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1"}


def tiny_vocab() -> tuple[list[str], list[str]]:
    """Byte-level BPE tokens (two specials, the 256 byte symbols, two merges) and their merges."""
    from tokenizers import pre_tokenizers

    tokens = ["<|bos|>", "<|eos|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he"]
    return tokens, ["Ġ t", "h e"]


def tiny_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights under GGUF names, [out, in] like torch."""
    rng = np.random.default_rng(seed)
    h, f, d = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    w = {"token_embd.weight": rng.standard_normal((vocab, h)), "output_norm.weight": 1 + 0.1 * rng.standard_normal(h),
         "output.weight": 0.2 * rng.standard_normal((vocab, h))}
    for i in range(TINY["layers"]):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": 1 + 0.1 * rng.standard_normal(h),
                  p + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(h),
                  p + "attn_q.weight": 0.2 * rng.standard_normal((TINY["heads"] * d, h)),
                  p + "attn_k.weight": 0.2 * rng.standard_normal((TINY["kv_heads"] * d, h)),
                  p + "attn_v.weight": 0.2 * rng.standard_normal((TINY["kv_heads"] * d, h)),
                  p + "attn_output.weight": 0.2 * rng.standard_normal((h, TINY["heads"] * d)),
                  p + "ffn_gate.weight": 0.2 * rng.standard_normal((f, h)),
                  p + "ffn_up.weight": 0.2 * rng.standard_normal((f, h)),
                  p + "ffn_down.weight": 0.2 * rng.standard_normal((h, f))})
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path: Path, values: dict | None = None, drop: tuple = (), skip_tensors: tuple = ()) -> Path:
    """A tiny valid llama GGUF. `values` overrides metadata ({"llama.block_count": 10**9}; a value may be
    (value, GGUFValueType) to pick its encoding), `drop` removes keys, `skip_tensors` tensors."""
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V

    tokens, merges = tiny_vocab()
    meta = {
        "llama.block_count": TINY["layers"], "llama.context_length": TINY["context"],
        "llama.embedding_length": TINY["hidden"], "llama.feed_forward_length": TINY["ffn"],
        "llama.attention.head_count": TINY["heads"], "llama.attention.head_count_kv": TINY["kv_heads"],
        "llama.rope.freq_base": (10000.0, V.FLOAT32), "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(values or {})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if key in drop:
            continue
        if isinstance(value, tuple):
            w.add_key_value(key, value[0], value[1])
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_key_value(key, value, V.INT64)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, a in tiny_weights(len(tokens)).items():
        if name in skip_tensors:
            continue
        kind = "F32" if a.ndim == 1 else TINY_GGUF_TYPES[name.split(".")[-2]]
        if kind in ("F32", "F16"):
            w.add_tensor(name, a.astype(np.float32 if kind == "F32" else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, Q[kind]), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_config(vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": TINY["hidden"], "intermediate_size": TINY["ffn"], "num_hidden_layers": TINY["layers"],
            "num_attention_heads": TINY["heads"], "num_key_value_heads": TINY["kv_heads"],
            "max_position_embeddings": TINY["context"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
            "torch_dtype": "float32"}


_HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tiny_hf_tensors(vocab: int) -> dict[str, np.ndarray]:
    """The tiny weights under HF names; the attention weights float16, the rest float32."""
    out = {}
    for name, a in tiny_weights(vocab).items():
        if name in _HF_NAMES:
            out[_HF_NAMES[name]] = a
        else:
            _, i, part, _ = name.split(".")
            out[f"model.layers.{i}.{_HF_LAYER[part]}.weight"] = a.astype(np.float16) if part.startswith("attn_") \
                and part != "attn_norm" else a
    return out


def write_tiny_hf(path: Path, config: dict | None = None) -> Path:
    """A tiny valid HF llama directory: config.json, model.safetensors, tokenizer.json."""
    from safetensors.numpy import save_file

    from conftest import write_tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(path)
    (path / "config.json").write_text(json.dumps(config or tiny_hf_config(vocab)))
    save_file(tiny_hf_tensors(vocab), str(path / "model.safetensors"))
    return path


def safetensors_bytes(header: dict | list | str, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def assert_fast_error(fn, *args, match: str | None = None) -> ModelLoadError:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=match) as info:
        fn(*args)
    took = time.perf_counter() - start
    assert took < FAST, f"{fn.__name__} took {took:.1f}s to refuse the file"
    message = str(info.value)
    assert "\n" not in message and message[-1] not in " :", message
    return info.value


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


def _variant(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


_DROP = object()


# ---- the tiny checkpoints themselves load and run ----

def test_tiny_checkpoints_load_and_run(tiny_gguf, tiny_hf, cpu_backend):
    from mojollm.engine.step import StepBatch

    for path in (tiny_gguf, tiny_hf):
        model = load_model(path, cpu_backend)
        model.allocate_kv_cache(2, 16)
        logits = model.forward(StepBatch.single_sequence([0, 5, 7, 9], 0, [1, 0], 16))
        assert logits.shape == (1, model.config.vocab_size) and np.isfinite(logits).all()
        assert model.tokenizer.decode(model.tokenizer.encode("the", add_special_tokens=False)) == "the"


# ---- layer counts far beyond the tensors present ----

@pytest.mark.parametrize("layers", [10**9, 2**32 - 1, 60_000, 3])
def test_gguf_layer_count_beyond_tensors_fails_fast(tmp_path, layers, cpu_backend):
    path = write_tiny_gguf(tmp_path / "layers.gguf", {"llama.block_count": layers})
    assert_fast_error(load_model, path, cpu_backend, match=r"layers|block_count")


@pytest.mark.parametrize("layers", [10**9, 60_000, 3, 1])
def test_config_json_layer_count_beyond_tensors_fails_fast(tiny_hf, tmp_path, layers, cpu_backend):
    d = _set_config(_variant(tiny_hf, tmp_path / "m"), num_hidden_layers=layers)
    # 1 layer while the file holds 2: the extra layer's tensors are not silently ignored either.
    assert_fast_error(load_model, d, cpu_backend, match="layer")


def test_missing_middle_layer_is_named(tmp_path):
    names = tuple(n for n in tiny_weights(260) if n.startswith("blk.0."))
    path = write_tiny_gguf(tmp_path / "gap.gguf", skip_tensors=names)
    assert_fast_error(load_gguf, path, match="no tensors for layer 0")


# ---- counts in the GGUF header larger than the file ----

def _patch_array_count(src: Path, dst: Path, key: bytes, count: int) -> Path:
    data = bytearray(src.read_bytes())
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 9  # an ARRAY: item type, then the count
    struct.pack_into("<Q", data, at + 8, count)
    dst.write_bytes(bytes(data))
    return dst


# token_type is the slow one for gguf's GGUFReader: it read numbers past the end of the file as empty
# arrays and looped once per claimed item (2^62 times), holding on to each.
@pytest.mark.parametrize("key", [b"tokenizer.ggml.token_type", b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"])
@pytest.mark.parametrize("count", [2**62, 2**64 - 1, 10**7])
def test_patched_array_count_fails_fast(tiny_gguf, tmp_path, key, count, cpu_backend):
    path = _patch_array_count(tiny_gguf, tmp_path / "count.gguf", key, count)
    assert_fast_error(load_model, path, cpu_backend, match=key.decode())


@pytest.mark.parametrize("key", [b"tokenizer.ggml.token_type", b"tokenizer.ggml.tokens"])
def test_patched_array_count_in_the_default_model_fails_fast(default_gguf, tmp_path, key, cpu_backend):
    """The adversarial pass's case on the 98 MB default model (over two minutes before)."""
    path = _patch_array_count(default_gguf, tmp_path / "big.gguf", key, 2**62)
    assert_fast_error(load_model, path, cpu_backend, match=f"{key.decode()} claims 4611686018427387904")


@pytest.mark.parametrize("field,offset", [("tensor count", 8), ("metadata count", 16)])
def test_patched_header_counts_fail_fast(tiny_gguf, tmp_path, field, offset):
    data = bytearray(tiny_gguf.read_bytes())
    struct.pack_into("<Q", data, offset, 2**62)
    path = tmp_path / "counts.gguf"
    path.write_bytes(bytes(data))
    assert_fast_error(load_gguf, path, match="claims")


def test_patched_string_length_and_tensor_dims_fail_fast(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    key = b"tokenizer.ggml.model"
    at = data.index(key) + len(key) + 4  # the value's length, after the type
    bad = bytearray(data)
    struct.pack_into("<Q", bad, at, 2**63)
    (tmp_path / "s.gguf").write_bytes(bytes(bad))
    assert_fast_error(load_gguf, tmp_path / "s.gguf", match="tokenizer.ggml.model")

    name = b"token_embd.weight"
    at = data.index(name) + len(name) + 4  # the first dimension, after the dimension count
    for dim in (0, 2**40, 2**64 - 32):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, at, dim)
        (tmp_path / "d.gguf").write_bytes(bytes(bad))
        assert_fast_error(load_gguf, tmp_path / "d.gguf", match="token_embd.weight")


def test_tensor_offsets_outside_the_file_or_overlapping_fail(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    name = b"output_norm.weight"
    at = data.index(name) + len(name) + 4 + 8 + 4  # n_dims, one dimension, the type -> the offset
    for offset, problem in ((2**62, "outside"), (0, "overlap"), (8, "aligned")):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, at, offset)
        (tmp_path / "o.gguf").write_bytes(bytes(bad))
        assert_fast_error(load_gguf, tmp_path / "o.gguf", match=problem)


def test_not_a_gguf_or_unsupported_encodings(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cases = {"empty": b"", "magic": b"GGML" + data[4:], "v1": data[:4] + struct.pack("<I", 1) + data[8:],
             "big-endian": data[:4] + struct.pack(">I", 3) + data[8:]}
    for name, content in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(content)
        err = assert_fast_error(load_gguf, tmp_path / f"{name}.gguf")
        assert str(tmp_path / f"{name}.gguf") in str(err)
    assert_fast_error(load_gguf, tmp_path / "absent.gguf", match="does not exist")


# ---- zero heads / layers and other impossible sizes ----

@pytest.mark.parametrize("key,value", [
    ("llama.attention.head_count", 0), ("llama.attention.head_count_kv", 0), ("llama.block_count", 0),
    ("llama.embedding_length", 0), ("llama.feed_forward_length", 0), ("llama.vocab_size", 0),
    ("llama.attention.head_count", 64),  # more heads than hidden units: no head size can be derived
    ("llama.attention.head_count_kv", 3),  # 2 heads are not a multiple of 3 kv heads
    ("llama.attention.key_length", 15),  # odd head size
])
def test_gguf_impossible_sizes(tmp_path, key, value):
    path = write_tiny_gguf(tmp_path / "sizes.gguf", {key: value})
    assert_fast_error(load_gguf, path)


@pytest.mark.parametrize("key,value", [
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("num_hidden_layers", 0), ("hidden_size", 0),
    ("head_dim", 0), ("vocab_size", 0), ("intermediate_size", 0), ("num_attention_heads", -2),
    ("num_key_value_heads", 3), ("head_dim", 15),
])
def test_config_json_impossible_sizes(tiny_hf, tmp_path, key, value):
    d = _set_config(_variant(tiny_hf, tmp_path / "m"), **{key: value})
    assert_fast_error(load_hf, d, match=key)


def test_model_config_built_directly_is_validated():
    good = dict(arch="llama", vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, intermediate_size=64, rms_norm_eps=1e-5, rope_theta=1e4,
                rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=False)
    ModelConfig(**good)
    for change in ({"num_attention_heads": 0}, {"num_hidden_layers": 0}, {"head_dim": 0}, {"rms_norm_eps": 0.0},
                   {"rope_theta": float("nan")}, {"max_position_embeddings": 3_600_000_000}):
        with pytest.raises(ModelLoadError):
            ModelConfig(**{**good, **change})


# ---- safetensors headers ----

def _f32_entry(begin=0, shape=(2, 2)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + 4 * math.prod(shape)]}


BAD_HEADERS = {
    "list_not_object": [1, 2],
    "entry_is_string": {"w": "F32"},
    "missing_dtype": {"w": {"shape": [2, 2], "data_offsets": [0, 16]}},
    "missing_shape": {"w": {"dtype": "F32", "data_offsets": [0, 16]}},
    "missing_offsets": {"w": {"dtype": "F32", "shape": [2, 2]}},
    "dtype_not_string": {"w": {**_f32_entry(), "dtype": 7}},
    "dtype_unknown": {"w": {**_f32_entry(), "dtype": "F8_E4M3"}},
    "shape_not_list": {"w": {**_f32_entry(), "shape": "2x2"}},
    "shape_negative": {"w": {**_f32_entry(), "shape": [-2, -2]}},
    "shape_bool": {"w": {**_f32_entry(), "shape": [True, 4]}},
    "shape_float": {"w": {**_f32_entry(), "shape": [2.0, 2]}},
    "shape_huge": {"w": {**_f32_entry(), "shape": [2**40, 2**40]}},
    "offsets_three": {"w": {**_f32_entry(), "data_offsets": [0, 8, 16]}},
    "offsets_negative": {"w": {**_f32_entry(), "data_offsets": [-16, 0]}},
    "offsets_reversed": {"w": {**_f32_entry(), "data_offsets": [16, 0]}},
    "offsets_strings": {"w": {**_f32_entry(), "data_offsets": ["0", "16"]}},
    "offsets_past_end": {"w": _f32_entry(begin=24)},
    "offsets_huge": {"w": {**_f32_entry(), "data_offsets": [2**62, 2**62 + 16]}},
    "overlapping": {"a": _f32_entry(), "b": _f32_entry(begin=8)},
    "shape_bytes_mismatch": {"w": {**_f32_entry(), "shape": [2, 3]}},
    "dtype_bytes_mismatch": {"w": {**_f32_entry(), "dtype": "F16"}},
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_safetensors_headers(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(BAD_HEADERS[name], bytes(32)))
    err = assert_fast_error(read_safetensors, path)
    assert path.name in str(err)


@pytest.mark.parametrize("name,content", [
    ("header_longer_than_file", struct.pack("<Q", 1000) + b"{}"),
    ("header_length_2_63", struct.pack("<Q", 2**63) + b"{}"),
    ("too_short", b"\x02\x00"),
    ("not_utf8", safetensors_bytes(b'{"\xff": 1}')),
    ("not_json", safetensors_bytes(b"{{{{")),
    ("deeply_nested", safetensors_bytes(b"[" * 100_000 + b"]" * 100_000)),
    ("duplicate_name", safetensors_bytes(b'{"w": ' + json.dumps(_f32_entry()).encode() + b', "w": '
                                         + json.dumps(_f32_entry()).encode() + b"}", bytes(16))),
])
def test_unreadable_safetensors_files(tmp_path, name, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert_fast_error(read_safetensors, path, match="model.safetensors")


def test_bad_header_in_a_checkpoint_directory(tiny_hf, tmp_path, cpu_backend):
    d = _variant(tiny_hf, tmp_path / "m")
    (d / "model.safetensors").write_bytes(safetensors_bytes({"model.norm.weight": "F32"}))
    assert_fast_error(load_model, d, cpu_backend, match="model.norm.weight")


def test_shard_index_cannot_name_files_outside_the_directory(tiny_hf, tmp_path):
    d = _variant(tiny_hf, tmp_path / "m")
    (tmp_path / "elsewhere.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    index = {"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fast_error(load_hf, d, match="not a file name")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert_fast_error(load_hf, d, match="weight_map")


def test_pickles_are_still_refused(tiny_hf, tmp_path):
    d = _variant(tiny_hf, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    assert_fast_error(load_hf, d, match="never loads pickles")


# ---- absurd context lengths ----

def test_gguf_absurd_context_length_fails_fast(tmp_path):
    path = write_tiny_gguf(tmp_path / "ctx.gguf", {"llama.context_length": 3_600_000_000})
    assert_fast_error(load_gguf, path, match="context_length is 3600000000")


def test_config_json_absurd_context_length_fails_fast(tiny_hf, tmp_path):
    d = _set_config(_variant(tiny_hf, tmp_path / "m"), max_position_embeddings=3_600_000_000)
    assert_fast_error(load_hf, d, match="max_position_embeddings")


def test_long_claimed_context_costs_only_the_cache(tmp_path, cpu_backend):
    """A legal but huge context (2^24 positions would be a 4 GiB table at head_dim 64): the rope table
    covers only the positions the KV cache can hold."""
    from mojollm.engine.step import StepBatch

    path = write_tiny_gguf(tmp_path / "long.gguf", {"llama.context_length": 1 << 24})
    start = time.perf_counter()
    model = load_model(path, cpu_backend)
    model.allocate_kv_cache(4, 16)
    assert time.perf_counter() - start < FAST
    assert model.config.max_position_embeddings == 1 << 24 and model.max_positions == 64
    model.forward(StepBatch.single_sequence(list(range(10)), 0, [3, 1, 0, 2], 16))
    with pytest.raises(ValueError, match="positions"):
        model.forward(StepBatch.single_sequence([1], 64, [3, 1, 0, 2, 0], 16))


@pytest.mark.parametrize("values,match", [
    ({"llama.rope.freq_base": (0.5, "FLOAT32")}, "rope"),
    ({"llama.rope.freq_base": (float("inf"), "FLOAT32")}, "freq_base"),
    ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), "FLOAT32")}, "layer_norm_rms_epsilon"),
    ({"llama.attention.layer_norm_rms_epsilon": (-1.0, "FLOAT32")}, "rms_norm_eps"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": (-2.0, "FLOAT32")}, "factor"),
])
def test_gguf_bad_rope_and_norm_values(tmp_path, values, match):
    from gguf import GGUFValueType as V

    values = {k: (v[0], V[v[1]]) if isinstance(v, tuple) else v for k, v in values.items()}
    assert_fast_error(load_gguf, write_tiny_gguf(tmp_path / "r.gguf", values), match=match)


# ---- wrongly typed values ----

@pytest.mark.parametrize("key,value", [
    ("hidden_size", "32"), ("hidden_size", None), ("hidden_size", 32.0), ("hidden_size", True), ("hidden_size", [32]),
    ("num_hidden_layers", 2.5), ("num_attention_heads", "2"), ("num_key_value_heads", False),
    ("intermediate_size", {"value": 64}), ("vocab_size", -320), ("head_dim", "16"),
    ("max_position_embeddings", 64.0), ("max_position_embeddings", "2048"),
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", -1e-5), ("rms_norm_eps", True),
    ("rope_theta", "10000"), ("rope_theta", 0.5), ("rope_theta", [10000]),
    ("tie_word_embeddings", "false"), ("tie_word_embeddings", 2), ("attention_bias", "no"),
    ("rope_scaling", "llama3"), ("rope_scaling", {"rope_type": "linear", "factor": "8"}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), ("rope_scaling", {"rope_type": ["linear"]}),
    ("rope_parameters", [1, 2]), ("architectures", "LlamaForCausalLM"), ("architectures", [7]),
    ("eos_token_id", "</s>"), ("eos_token_id", [1, "2"]), ("bos_token_id", 0.0),
])
def test_config_json_wrong_types_are_clear_errors(tiny_hf, tmp_path, key, value, cpu_backend):
    d = _set_config(_variant(tiny_hf, tmp_path / "m"), **{key: value})
    err = assert_fast_error(load_model, d, cpu_backend)
    assert "config.json" in str(err) or "architecture" in str(err)


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b'"a string"', b"null", b"{", b"{}", b"\xff\xfe{\x00",
                                     b'{"architectures": ["LlamaForCausalLM"], "hidden_size": NaN}'])
def test_config_json_that_is_not_a_valid_config(tiny_hf, tmp_path, content):
    d = _variant(tiny_hf, tmp_path / "m")
    (d / "config.json").write_bytes(content)
    assert_fast_error(load_hf, d, match="config.json")


def test_missing_required_config_key_is_named(tiny_hf, tmp_path):
    d = _set_config(_variant(tiny_hf, tmp_path / "m"), vocab_size=_DROP)
    assert_fast_error(load_hf, d, match="vocab_size")


@pytest.mark.parametrize("key,value", [
    ("llama.attention.head_count", ("2", "STRING")), ("llama.block_count", (2.0, "FLOAT32")),
    ("llama.embedding_length", ([32], None)), ("llama.context_length", (True, "BOOL")),
    ("general.architecture", ([1], None)), ("tokenizer.ggml.tokens", ([1, 2, 3], None)),
    ("tokenizer.ggml.merges", ("h e", "STRING")), ("tokenizer.ggml.bos_token_id", ("0", "STRING")),
    ("tokenizer.ggml.add_bos_token", (1, "UINT8")), ("general.alignment", (3, "UINT32")),
])
def test_gguf_wrong_types_are_clear_errors(tmp_path, key, value, cpu_backend):
    from gguf import GGUFValueType as V

    raw, kind = value
    path = write_tiny_gguf(tmp_path / "t.gguf", {key: raw if kind is None else (raw, V[kind])})
    assert_fast_error(load_model, path, cpu_backend)


def test_gguf_vocabulary_consistency(tmp_path):
    tokens, merges = tiny_vocab()
    path = write_tiny_gguf(tmp_path / "merge.gguf", {"tokenizer.ggml.merges": merges + ["Ġ zz"]})
    assert_fast_error(load_gguf, path, match="merge #2")
    path = write_tiny_gguf(tmp_path / "unk.gguf", {"tokenizer.ggml.unknown_token_id": len(tokens)})
    assert_fast_error(load_gguf, path, match="unknown_token_id")
    path = write_tiny_gguf(tmp_path / "long.gguf", {"tokenizer.ggml.tokens": tokens + ["extra"],
                                                    "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 1)})
    assert_fast_error(load_gguf, path, match="lists 261 tokens")


def test_gguf_tokenizer_key_types_checked_on_the_metadata_path(tmp_path):
    from mojollm.models.gguf_loader import open_reader, read_metadata

    path = write_tiny_gguf(tmp_path / "t.gguf", {"tokenizer.ggml.token_type": ["normal"]})
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.token_type"):
        read_metadata(open_reader(path))


def test_cli_reports_a_damaged_model_in_one_line(tmp_path):
    """The CLI maps ModelLoadError to one `error:` line and exit code 2."""
    import subprocess
    import sys

    path = _patch_array_count(write_tiny_gguf(tmp_path / "ok.gguf"), tmp_path / "bad.gguf",
                              b"tokenizer.ggml.tokens", 2**62)
    out = subprocess.run([sys.executable, "-m", "mojollm.cli", "generate", "hi", "--model", str(path),
                          "--backend", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.gguf" in errors[0] and "Traceback" not in out.stderr, out.stderr
