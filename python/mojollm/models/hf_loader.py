"""Read a Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer files.

Safetensors files are memory-mapped and each tensor is a zero-copy numpy view of the map. The
format is a u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw
little-endian data; we read that header ourselves because `safetensors.numpy` has no bfloat16 and
would copy every tensor. BF16 stays BF16 (uint16 bits). Pickled checkpoints (*.bin, *.pt) are
refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mojollm.errors import ModelLoadError
from mojollm.models.config import ModelConfig
from mojollm.weights import WeightTensor

_DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "BF16")}
_MAX_HEADER = 100 * 1024 * 1024

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
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def read_safetensors(path: Path) -> dict[str, WeightTensor]:
    """All tensors of one .safetensors file as zero-copy views of a read-only memory map."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {e}") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    if data_start == size:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=0, shape=(size,))
    out = {}
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise ModelLoadError(f"{path.name}: tensor {name} has dtype {dtype}; supported: {', '.join(_DTYPES)}")
        np_dtype, qtype = _DTYPES[dtype]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        want = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        if end - begin != want or data_start + end > size or begin < 0:
            raise ModelLoadError(f"{path.name}: tensor {name} has inconsistent offsets (truncated file?)")
        data = mm[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
        out[name] = WeightTensor(name, shape, qtype, data)
    return out


class HFCheckpoint:
    """config + weights (our names -> WeightTensor) of a HF directory; tokenizer files stay on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path} has no config.json: not a Hugging Face model directory")
        try:
            self.raw_config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        self.config = ModelConfig.from_hf(self.raw_config)
        files = _weight_files(self.path)
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise ModelLoadError(f"{self.path} holds only pickled weights ({pickles[0]}); mojollm never loads "
                                     "pickles: convert them to safetensors (save_pretrained(safe_serialization=True))")
            raise ModelLoadError(f"{self.path} has no *.safetensors weights")
        self.weights: dict[str, WeightTensor] = {}
        for f in files:
            for name, w in read_safetensors(f).items():
                ours = our_name(name)
                if ours is None:
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    raise ModelLoadError(f"{f.name}: unexpected tensor {name} for a {self.config.arch} model")
                self.weights[ours] = w


def _weight_files(path: Path) -> list[Path]:
    """The shards the index names when there is one (Mistral repos also ship a differently named
    consolidated.safetensors beside the shards), else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelLoadError(f"{path} lacks the shard {missing[0]} named in {index.name}")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def load_hf(path: str | Path) -> HFCheckpoint:
    return HFCheckpoint(path)
