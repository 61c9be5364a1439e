"""Read a Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer files.

Safetensors files are memory-mapped and each tensor is a zero-copy numpy view of the map. The
format is a u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw
little-endian data; we read that header ourselves because `safetensors.numpy` has no bfloat16 and
would copy every tensor. BF16 stays BF16 (uint16 bits). Pickled checkpoints (*.bin, *.pt) are
refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mojollm.errors import ModelLoadError
from mojollm.models import compressed_tensors, packed_int
from mojollm.models.config import ModelConfig, check_layer_tensors
from mojollm.weights import WeightTensor

_DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "BF16"),
           "I32": (np.int32, None)}  # I32: GPTQ / AWQ packed codes, returned as plain arrays
# FP8 and int8 codes, plain arrays too: mojollm.models.compressed_tensors makes them blocks
_DTYPES.update({"F8_E4M3": (np.uint8, None), "I8": (np.int8, None)})
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_MAX_JSON_FILE = 64 * 1024 * 1024  # config.json / the shard index: a few KB in practice

_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias",
    "self_attn.o_proj.weight": "o_proj",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
# Present in some checkpoints, unused by the forward pass (rope tables are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def our_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and _is_layer_index(parts[2]) and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def _is_layer_index(text: str) -> bool:
    """Plain decimal without leading zeros: "layers.07" or a Unicode digit would name no layer we build."""
    return text.isascii() and text.isdigit() and text == str(int(text))


def read_json(path: Path, what: str) -> Any:
    """A small JSON file (config.json, the shard index); any defect is one ModelLoadError line."""
    try:
        size = path.stat().st_size
        if size > _MAX_JSON_FILE:
            raise ModelLoadError(f"{path} is {size} bytes, too large to be {what}")
        return json.loads(path.read_bytes())
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a name given twice is a damaged header, not a choice to make silently."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r} appears twice")
    return out


def read_safetensors(path: Path) -> dict[str, WeightTensor | np.ndarray]:
    """All tensors of one .safetensors file as zero-copy views of a read-only memory map
    (WeightTensors; int32 / F8_E4M3 / int8 tensors as numpy arrays, for packed_int / compressed_tensors).
    The header is checked in full (types, shapes, offsets against the file) before any view is made."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelLoadError(f"{path} is not a valid safetensors file: it has only {size} bytes")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise ModelLoadError(f"{path} is not a valid safetensors file: its header length {header_len} "
                                     f"exceeds the file ({size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read: {e.strerror or e}") from e
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelLoadError(f"{path} is not a valid safetensors file: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = [_tensor_entry(path, name, info, size - data_start) for name, info in header.items()]
    entries.sort(key=lambda e: e[3])
    for a, b in zip(entries, entries[1:]):
        if b[3] < a[4]:
            raise ModelLoadError(f"{path}: the data of tensors {a[0]} and {b[0]} overlap")
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=0, shape=(size,))
    out = {}
    for name, dtype, shape, begin, end in entries:
        np_dtype, qtype = _DTYPES[dtype]
        data = mm[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
        out[name] = data if qtype is None else WeightTensor(name, shape, qtype, data)
    return out


def _tensor_entry(path: Path, name: str, info: Any, data_bytes: int) -> tuple:
    """(name, dtype, shape, begin, end) of one header entry, after checking it against the file."""
    if not name or len(name) > 4096 or not name.isprintable():  # messages quote names: no line breaks
        raise ModelLoadError(f"{path}: the header names a tensor {name[:40]!r}, which is not a printable name")
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path}: the header entry of tensor {name} is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ModelLoadError(f"{path}: tensor {name} has dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ModelLoadError(f"{path}: tensor {name} has the shape {shape!r}, not a list of positive integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(x, allow_zero=True) for x in offsets):
        raise ModelLoadError(f"{path}: tensor {name} has the data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    want = math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize
    if end - begin != want or end > data_bytes:
        raise ModelLoadError(f"{path}: tensor {name} has inconsistent offsets (truncated file?): {dtype} "
                             f"{shape} needs {want} bytes, its offsets [{begin}, {end}] span {end - begin} of "
                             f"the {data_bytes} data bytes")
    return name, dtype, tuple(shape), begin, end


def _is_size(x: Any, allow_zero: bool = False) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= (0 if allow_zero else 1)


class HFCheckpoint:
    """config + weights (our names -> WeightTensor) of a HF directory; tokenizer files stay on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path} has no config.json: not a Hugging Face model directory")
        self.raw_config = read_json(cfg_path, "a config.json")
        self.config = ModelConfig.from_hf(self.raw_config, where=str(cfg_path))
        files = _weight_files(self.path)
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise ModelLoadError(f"{self.path} holds only pickled weights ({pickles[0]}); mojollm never loads "
                                     "pickles: convert them to safetensors (save_pretrained(safe_serialization=True))")
            raise ModelLoadError(f"{self.path} has no *.safetensors weights")
        self.weights: dict[str, WeightTensor] = {}
        entries = []  # (file name, tensor name, tensor)
        # GPTQ / AWQ: the packed linears' tensors are held back, then become our blocks (packed_int).
        # FP8 / W8A8 int8: likewise the 8-bit codes and their scales (compressed_tensors).
        try:
            ct_scheme = compressed_tensors.scheme_of(self.raw_config)
        except ValueError as e:
            raise ModelLoadError(f"{cfg_path}: {e}") from None
        packed = None if ct_scheme else packed_int.scheme_of(self.raw_config, str(cfg_path))
        held: dict = {}
        ct_held: dict = {}
        for f in files:
            for name, w in read_safetensors(f).items():
                if compressed_tensors.holds(name, w, ct_scheme):
                    ct_held[name] = w
                elif packed is not None and packed.owns(name):
                    held[name] = (f.name, w)
                else:
                    entries.append((f.name, name, w))
        if packed is not None:
            entries += [(fname, name, w) for name, (fname, w) in packed.linears(held).items()]
        if ct_held:
            entries += [(self.path.name, name, w)
                        for name, w in compressed_tensors.hf_weights(self.raw_config, ct_held, str(self.path)).items()]
        for fname, name, w in entries:
            ours = our_name(name)
            if ours is None:
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                raise ModelLoadError(f"{fname}: unexpected tensor {name} for a {self.config.arch} model")
            if not isinstance(w, WeightTensor):
                raise ModelLoadError(f"{fname}: tensor {name} holds {w.dtype} codes, which only the quantized "
                                     "linears of GPTQ / AWQ / FP8 / W8A8 checkpoints hold")
            if ours in self.weights:
                raise ModelLoadError(f"{self.path}: tensor {name} is stored twice ({fname} repeats it)")
            self.weights[ours] = w
        check_layer_tensors(self.config, self.weights, str(self.path))


def _weight_files(path: Path) -> list[Path]:
    """The shards the index names when there is one (Mistral repos also ship a differently named
    consolidated.safetensors beside the shards), else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "a safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ModelLoadError(f"{index} is not a valid safetensors index: it needs a weight_map object of "
                                 "tensor name -> shard file name")
        names = sorted(set(weight_map.values()))
        # Shards live beside the index: a name with a directory part ("../x") would read another file.
        bad = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise ModelLoadError(f"{index} names the shard {bad[0]!r}, which is not a file name in {path}")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelLoadError(f"{path} lacks the shard {missing[0]} named in {index.name}")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def load_hf(path: str | Path) -> HFCheckpoint:
    return HFCheckpoint(path)
