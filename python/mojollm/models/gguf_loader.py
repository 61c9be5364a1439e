"""Read a GGUF file (memory-mapped, through the `gguf` package) into a config, weights and tokenizer metadata.

Quantized tensors stay quantized: a WeightTensor's data is a view of the file's blocks, one row per
output feature. GGUF lists dimensions innermost first (ne0 = row length), so a linear weight stored
as [K, N] is the logical [N, K] matrix of torch's convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mojollm.errors import ModelLoadError
from mojollm.models.config import ModelConfig
from mojollm.weights import SUPPORTED_TYPES, WeightTensor

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


def our_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> layers.3.q_proj; None for tensors we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def open_reader(path: str | Path):
    """A GGUFReader, with every failure of a damaged file turned into one ModelLoadError line."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except FileNotFoundError as e:
        raise ModelLoadError(f"model file {path} does not exist") from e
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on truncated files
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of the header as plain Python values (lists of str/int for arrays)."""
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = fld.contents()
        except Exception as e:
            raise ModelLoadError(f"GGUF metadata key {name} is unreadable (corrupt file?): {e}") from e
    return meta


def _weight_tensor(t) -> WeightTensor:
    qtype = t.tensor_type.name
    name = t.name
    if qtype not in SUPPORTED_TYPES:
        raise ModelLoadError(f"tensor {name} has type {qtype}, which mojollm does not support "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(list(t.shape)))  # logical row-major shape
    data = t.data
    if qtype == "BF16":  # the reader exposes BF16 as raw bytes: view them as uint16 bits, no copy
        data = data.view(np.uint16).reshape(shape)
    elif qtype in ("F32", "F16"):
        data = data.reshape(shape)
    else:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = data.reshape(rows, -1)
    return WeightTensor(name, shape, qtype, data)


class GGUFCheckpoint:
    """config + weights (our names -> WeightTensor) + raw metadata (for the tokenizer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = open_reader(self.path)
        self.metadata = read_metadata(reader)
        try:
            tensors = list(reader.tensors)
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor table unreadable: {e}") from e
        names = {t.name for t in tensors}
        self.config = ModelConfig.from_gguf(self.metadata, names)
        self.weights: dict[str, WeightTensor] = {}
        for t in tensors:
            ours = our_name(t.name)
            if ours is None:
                if t.name.endswith(_IGNORED_SUFFIXES):
                    continue
                raise ModelLoadError(f"{path}: unexpected tensor {t.name} for a {self.config.arch} model")
            self.weights[ours] = _weight_tensor(t)
        self._reader = reader  # keeps the memory map alive while the weights are views of it


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)
