"""Read a GGUF file (memory-mapped) into a config, weights and tokenizer metadata.

We parse the header ourselves instead of with the `gguf` package's GGUFReader: that reader trusts
every count and length in the file, so a forged array count (2^62) kept it looping for minutes and a
truncated file gave silently short tensors. Here each count and length is checked against the bytes
that remain before it is used, so a damaged file fails at once with one ModelLoadError line.

Quantized tensors stay quantized: a WeightTensor's data is a view of the file's blocks, one row per
output feature. GGUF lists dimensions innermost first (ne0 = row length), so a linear weight stored
as [K, N] is the logical [N, K] matrix of torch's convention.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from mojollm.errors import ModelLoadError
from mojollm.models.config import ModelConfig, check_layer_tensors
from mojollm.weights import SUPPORTED_TYPES, WeightTensor

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (gguf.GGUFValueType) whose values are one fixed-size number.
_SCALAR_DTYPES = {0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
                  4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),
                  10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8")}
_BOOL, _STRING, _ARRAY = 7, 8, 9
# Smallest encodings: a key/value is a key length (8), a type (4) and >= 1 byte of value; a tensor
# entry a name length (8), a dimension count (4), a type (4) and an offset (8).
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 13, 24
_MAX_NAME = 4096  # characters in a key or tensor name; real ones are short identifiers

# Keys the tokenizer reads, with the kind of value llama.cpp writes for each. Anything else there
# is a damaged file, refused here rather than failing as a TypeError inside the tokenizer.
_TOKENIZER_KEY_KINDS = {
    "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
    "tokenizer.ggml.tokens": [str], "tokenizer.ggml.merges": [str], "tokenizer.ggml.token_type": [int],
    "tokenizer.ggml.scores": [float],
    "tokenizer.ggml.bos_token_id": int, "tokenizer.ggml.eos_token_id": int, "tokenizer.ggml.eot_token_id": int,
    "tokenizer.ggml.eom_token_id": int, "tokenizer.ggml.unknown_token_id": int,
    "tokenizer.ggml.padding_token_id": int,
    "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.add_eos_token": bool,
    "tokenizer.ggml.add_space_prefix": bool,
}


class GGUFTensorInfo(NamedTuple):
    name: str
    qtype: str              # GGMLQuantizationType name, e.g. "Q4_1"
    dims: tuple[int, ...]   # ggml order: innermost (the row length) first
    data: np.ndarray        # uint8 view of the tensor's bytes in the memory map


class GGUFFile:
    """The metadata (plain Python values) and tensor table of a GGUF file, with the tensors' bytes
    as views of a read-only memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:  # magic, version and the two counts
                    raise ModelLoadError(f"{self.path} is not a GGUF file: it has only {self.size} bytes")
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as e:
            raise ModelLoadError(f"model file {self.path} does not exist") from e
        except OSError as e:
            raise ModelLoadError(f"{self.path} cannot be read: {e.strerror or e}") from e
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GGUFTensorInfo] = []
        self._parse()

    # ---- bounded reads ----
    def _damaged(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is not a valid GGUF file (truncated or corrupt?): {problem}")

    def _take(self, n: int, what: str) -> int:
        """Claim the next n bytes for `what`; returns their offset."""
        if n > self.size - self._pos:
            raise self._damaged(f"{what} at byte {self._pos} needs {n} bytes but only "
                                f"{self.size - self._pos} remain")
        start = self._pos
        self._pos += n
        return start

    def _u32(self, what: str) -> int:
        return struct.unpack_from("<I", self._buf, self._take(4, what))[0]

    def _u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self._buf, self._take(8, what))[0]

    def _string(self, what: str) -> str:
        n = self._u64(f"the length of {what}")
        start = self._take(n, what)
        try:
            return self._buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._damaged(f"{what} at byte {start} is not valid UTF-8") from e

    def _name(self, what: str) -> str:
        """A key or tensor name. Error messages quote names, so one with a line break or other
        control character (never written by a converter) is refused here."""
        name = self._string(what)
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            raise self._damaged(f"{what} is {name[:40]!r}, not a printable name of 1 to {_MAX_NAME} characters")
        return name

    def _numbers(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._buf, dtype, count, self._take(count * dtype.itemsize, what))

    # ---- structure ----
    def _parse(self) -> None:
        if self._buf[:4] != _MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        self._pos = 4
        version = self._u32("the version")
        if version not in _VERSIONS:
            if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in _VERSIONS:
                raise ModelLoadError(f"{self.path} is a big-endian GGUF file, which mojollm does not support")
            raise ModelLoadError(f"{self.path} is GGUF version {version}; mojollm reads versions 2 and 3")
        n_tensors = self._u64("the tensor count")
        n_kv = self._u64("the metadata count")
        remaining = self.size - self._pos
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > remaining:
            raise self._damaged(f"it claims {n_kv} metadata entries and {n_tensors} tensors, more than its "
                                f"{remaining} header bytes can hold")
        for i in range(n_kv):
            key = self._name(f"metadata key #{i}")
            vtype = self._u32(f"the type of metadata key {key}")
            if key in self.metadata:
                raise self._damaged(f"metadata key {key} appears twice")
            self.metadata[key] = self._value(vtype, key)

        entries = []
        for i in range(n_tensors):
            name = self._name(f"the name of tensor #{i}")
            n_dims = self._u32(f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self._damaged(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} are valid)")
            dims = tuple(self._numbers(np.dtype("<u8"), n_dims, f"the dimensions of tensor {name}").tolist())
            type_id = self._u32(f"the type of tensor {name}")
            offset = self._u64(f"the data offset of tensor {name}")
            entries.append((name, dims, type_id, offset))

        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 \
                or alignment & (alignment - 1) or alignment > 1 << 30:
            raise self._damaged(f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self._tensor_table(entries, data_start, alignment)

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR_DTYPES:
            value = self._numbers(_SCALAR_DTYPES[vtype], 1, f"the value of {key}")[0].item()
            return bool(value) if vtype == _BOOL else value
        if vtype == _STRING:
            return self._string(f"the value of {key}")
        if vtype != _ARRAY:
            raise self._damaged(f"metadata key {key} has the unknown value type {vtype}")
        item_type = self._u32(f"the item type of array {key}")
        count = self._u64(f"the length of array {key}")
        if item_type in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[item_type]
            if count * dtype.itemsize > self.size - self._pos:
                raise self._damaged(f"array {key} claims {count} items of {dtype.itemsize} bytes but only "
                                    f"{self.size - self._pos} bytes remain")
            values = self._numbers(dtype, count, f"the items of array {key}").tolist()
            return [bool(v) for v in values] if item_type == _BOOL else values
        if item_type != _STRING:  # nested arrays: llama.cpp does not read them either
            raise self._damaged(f"array {key} has items of type {item_type}, which mojollm cannot read")
        if count * 8 > self.size - self._pos:  # every string starts with an 8-byte length
            raise self._damaged(f"array {key} claims {count} strings but only {self.size - self._pos} bytes "
                                "remain")
        return [self._string(f"item {i} of array {key}") for i in range(count)]

    def _tensor_table(self, entries: list, data_start: int, alignment: int) -> None:
        spans = []
        seen = set()
        for name, dims, type_id, offset in entries:
            if name in seen:
                raise self._damaged(f"tensor {name} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise self._damaged(f"tensor {name} has the unknown type id {type_id}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if min(dims) < 1 or dims[0] % block:
                raise self._damaged(f"tensor {name} has dimensions {list(dims)}, which do not fit its type "
                                    f"{qtype.name} (rows of whole {block}-element blocks)")
            nbytes = math.prod(dims) // block * block_bytes
            begin = data_start + offset
            if offset % alignment or begin + nbytes > self.size:
                raise self._damaged(f"tensor {name} claims bytes {begin}..{begin + nbytes}, outside the "
                                    f"{self.size}-byte file or not aligned to {alignment}")
            spans.append((begin, begin + nbytes, name))
            self.tensors.append(GGUFTensorInfo(name, qtype.name, dims,
                                               np.frombuffer(self._buf, np.uint8, nbytes, begin)))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self._damaged(f"the data of tensors {first} and {second} overlap")


# GGUF tensor name (inside blk.N.) -> our per-layer name (HF's, shortened).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_q.bias": "q_proj.bias",
    "attn_k.bias": "k_proj.bias",
    "attn_v.bias": "v_proj.bias",
    "attn_output.weight": "o_proj",
    "ffn_norm.weight": "post_attention_layernorm",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens",
    "output_norm.weight": "norm",
    "output.weight": "lm_head",
    "rope_freqs.weight": "rope_freqs",
}
# Tensors llama.cpp writes that the forward pass does not use.
_IGNORED_SUFFIXES = ("attn_rot_embd",)


def _is_layer_index(text: str) -> bool:
    """Plain decimal without leading zeros: "blk.07" or a Unicode digit would name no layer we build."""
    return text.isascii() and text.isdigit() and text == str(int(text))


def our_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> layers.3.q_proj; None for tensors we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and _is_layer_index(parts[1]) and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def open_reader(path: str | Path) -> GGUFFile:
    """The parsed header of a GGUF file; every defect of a damaged file is one ModelLoadError line."""
    return GGUFFile(path)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key/value of the header as plain Python values (lists of str/int/float for arrays),
    with the tokenizer's keys checked to hold the kind of value it reads."""
    meta = dict(reader.metadata)
    for key, kind in _TOKENIZER_KEY_KINDS.items():
        if key not in meta:
            continue
        value = meta[key]
        # Arrays are homogeneous by construction, so the first item tells the item type.
        if isinstance(kind, list):
            ok = isinstance(value, list) and (not value or _is_kind(value[0], kind[0]))
        else:
            ok = _is_kind(value, kind)
        if not ok:
            what = f"a list of {kind[0].__name__}" if isinstance(kind, list) else kind.__name__
            raise ModelLoadError(f"{reader.path}: metadata key {key} must hold {what}, but holds "
                                 f"{type(value).__name__}")
    _check_vocabulary(meta, reader.path)
    return meta


def _check_vocabulary(meta: dict[str, Any], path: Path) -> None:
    """The tokenizer's merges and unknown-token id refer to tokens the file lists: the `tokenizers`
    library would otherwise fail building the tokenizer with a bare Exception."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is not None and not 0 <= unk < len(tokens):
        raise ModelLoadError(f"{path}: tokenizer.ggml.unknown_token_id {unk} is not one of the "
                             f"{len(tokens)} tokens")
    vocab = set(tokens)
    for i, merge in enumerate(meta.get("tokenizer.ggml.merges") or ()):
        left, space, right = merge.partition(" ")
        if not space or left not in vocab or right not in vocab or left + right not in vocab:
            raise ModelLoadError(f"{path}: tokenizer merge #{i} {merge[:40]!r} is not two tokens of the "
                                 "vocabulary whose concatenation is a token too")


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:  # scores: any number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _weight_tensor(t: GGUFTensorInfo, path: Path) -> WeightTensor:
    if t.qtype not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: tensor {t.name} has type {t.qtype}, which mojollm does not support "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(reversed(t.dims))  # logical row-major shape
    if t.qtype == "BF16":  # raw bits as uint16, no copy
        data = t.data.view(np.uint16).reshape(shape)
    elif t.qtype in ("F32", "F16"):
        data = t.data.view(np.float32 if t.qtype == "F32" else np.float16).reshape(shape)
    else:
        data = t.data.reshape(math.prod(shape[:-1]), -1)
    return WeightTensor(t.name, shape, t.qtype, data)


class GGUFCheckpoint:
    """config + weights (our names -> WeightTensor) + raw metadata (for the tokenizer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = open_reader(self.path)
        self.metadata = read_metadata(reader)
        self.config = ModelConfig.from_gguf(self.metadata, {t.name for t in reader.tensors}, where=str(self.path))
        self.weights: dict[str, WeightTensor] = {}
        for t in reader.tensors:
            ours = our_name(t.name)
            if ours is None:
                if t.name.endswith(_IGNORED_SUFFIXES):
                    continue
                raise ModelLoadError(f"{path}: unexpected tensor {t.name} for a {self.config.arch} model")
            self.weights[ours] = _weight_tensor(t, self.path)
        _mark_w8a8(self.metadata, reader.tensors, self.weights, self.path)
        check_layer_tensors(self.config, self.weights, str(self.path))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens) > self.config.vocab_size:  # encode would emit ids past the embedding
            raise ModelLoadError(f"{path}: the tokenizer lists {len(tokens)} tokens but the model's vocabulary has "
                                 f"only {self.config.vocab_size}")
        if "rope_freqs" in self.weights:
            _check_rope_freqs(self.weights["rope_freqs"], self.config, self.path)
        self._reader = reader  # keeps the memory map alive while the weights are views of it


W8A8_KEY = "mojollm.w8a8_tensors"  # the Q8_0 tensors that run with per-token int8 activations (SmoothQuant)


def _mark_w8a8(meta: dict[str, Any], tensors: list, weights: dict[str, WeightTensor], path: Path) -> None:
    """The tensors named under W8A8_KEY become W8A8: the same blocks, activations quantized per
    token at run time (what their smoothing was searched for). Other readers see plain Q8_0."""
    names = meta.get(W8A8_KEY)
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{path}: {W8A8_KEY} must be a list of tensor names")
    ours = {t.name: our_name(t.name) for t in tensors}
    for name in names:
        w = weights.get(ours.get(name) or "")
        if w is None or w.qtype != "Q8_0":
            raise ModelLoadError(f"{path}: {W8A8_KEY} names {name[:80]!r}, which is not a Q8_0 tensor of the file")
        weights[ours[name]] = WeightTensor(w.name, w.shape, "W8A8", w.data)


def _check_rope_freqs(w: WeightTensor, config: ModelConfig, path: Path) -> None:
    """llama3-style frequency divisors: one positive finite number per rotary frequency."""
    if w.shape != (config.head_dim // 2,):
        raise ModelLoadError(f"{path}: rope_freqs.weight has shape {w.shape}, expected ({config.head_dim // 2},)")
    factors = w.to_float32()
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise ModelLoadError(f"{path}: rope_freqs.weight holds values that are not positive finite numbers")


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)
