"""ModelConfig: the hyper-parameters of a Llama-family decoder, read from GGUF metadata or a HF config.json.

Both sources are normalised to one shape so the model code never asks where a checkpoint came from,
except for `rope_neox`: llama.cpp's converter permutes the q/k rows of "llama" GGUFs for the
interleaved (GPT-J) rotary layout, while HF checkpoints (and qwen2 GGUFs) use rotate_half (neox).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from mojollm.errors import ModelLoadError

# HF `architectures[0]` -> our arch name. All three are the same decoder; qwen2 adds q/k/v biases.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` values whose tensors follow the llama layout.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


# Upper bounds far above any real Llama-family checkpoint. They exist so that a damaged or hostile
# header (10^9 layers, a 3.6e9-token context) is refused before anything is sized by its claims.
LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "num_hidden_layers": 1 << 16,
    "num_attention_heads": 1 << 16,
    "num_key_value_heads": 1 << 16,
    "head_dim": 1 << 16,
    "intermediate_size": 1 << 24,
    "max_position_embeddings": 1 << 24,
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF-style dict ({"rope_type": "llama3", "factor": ...}) or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (qwen2)
    rope_neox: bool = True  # rotate_half layout (HF); False for llama.cpp-permuted GGUF llama weights
    extra: dict = field(default_factory=dict, compare=False)  # source notes: {"source": "gguf", "path": ...}

    def __post_init__(self):
        # The readers already checked each value under its own key name; this catches configs built
        # directly and the relations between fields.
        where = self.extra.get("path", "model config")
        for name in LIMITS:
            _integer(getattr(self, name), name, where, name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"{where}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                                 f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelLoadError(f"{where}: head_dim {self.head_dim} is odd, but rotary embeddings need an even "
                                 "head_dim")
        eps = _number(self.rms_norm_eps, "rms_norm_eps", where)
        if not 0 < eps < 1:
            raise ModelLoadError(f"{where}: rms_norm_eps is {eps}, but it must lie strictly between 0 and 1")
        from mojollm.models.rope import rope_inv_freq

        # The model builds its tables with rope.py; validating with the same code here turns a bad
        # theta or scaling dict into a load error instead of a failure on the first forward.
        scaling = None if (self.rope_scaling or {}).get("rope_type") == "freq_factors" else self.rope_scaling
        try:
            rope_inv_freq(self.head_dim, _number(self.rope_theta, "rope_theta", where), scaling)
        except ValueError as e:
            raise ModelLoadError(f"{where}: {e}") from e

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- from a HF config.json ----
    @classmethod
    def from_hf(cls, cfg: Any, where: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, Mapping):
            raise ModelLoadError(f"{where} must hold a JSON object, but it holds {_describe(cfg)}")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ModelLoadError(f"{where}: architectures must be a list of strings, got {_describe(archs)}")
        known = [a for a in archs if a in HF_ARCHITECTURES]
        if not known:
            name = repr(archs[0]) if archs else f"model_type={cfg.get('model_type')!r}"
            raise ModelLoadError(f"{where}: unsupported architecture {name}: mojollm runs "
                                 f"{', '.join(HF_ARCHITECTURES)}")
        arch = HF_ARCHITECTURES[known[0]]

        def integer(key, default=None, limit_name=None):
            value = cfg.get(key)
            if value is None:  # absent or null: transformers falls back to its default too
                if default is None:
                    raise ModelLoadError(f"{where} lacks the key {key!r}")
                return default
            return _integer(value, key, where, limit_name or key)

        def number(key, default):
            value = cfg.get(key)
            return default if value is None else _number(value, key, where)

        def flag(key, default=False):
            value = cfg.get(key)
            return default if value is None else _flag(value, key, where)

        hidden = integer("hidden_size")
        heads = integer("num_attention_heads")
        kv_heads = integer("num_key_value_heads", heads)
        head_dim = (integer("head_dim") if cfg.get("head_dim") is not None
                    else _derived_head_dim(hidden, heads, where))
        # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        rope_params = dict(_mapping_or_none(cfg.get("rope_parameters"), "rope_parameters", where) or {})
        theta = rope_params.pop("rope_theta", None)
        theta = number("rope_theta", 10000.0) if theta is None else _number(theta, "rope_parameters.rope_theta", where)
        scaling = _mapping_or_none(cfg.get("rope_scaling"), "rope_scaling", where) or rope_params or None
        scaling = _normalise_rope_scaling(scaling, where)
        max_pos = integer("max_position_embeddings", 2048)
        if arch in ("mistral", "qwen2"):
            # Sliding-window attention is not implemented: cap the context at the window instead,
            # so every position we do serve is computed exactly.
            window = cfg.get("sliding_window")
            if window is not None and (arch == "mistral" or flag("use_sliding_window")):
                max_pos = min(max_pos, _integer(window, "sliding_window", where, "max_position_embeddings"))
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{where}: unsupported activation {cfg.get('hidden_act')!r}: only silu (SwiGLU) "
                                 "is implemented")
        for key in ("bos_token_id", "eos_token_id"):  # read by the tokenizer: an int or a list of ints
            ids = cfg.get(key)
            if ids is not None and not (_is_int(ids) or isinstance(ids, list) and all(_is_int(i) for i in ids)):
                raise ModelLoadError(f"{where}: {key} must be an integer or a list of integers, got {_describe(ids)}")
        return cls(
            arch=arch,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=integer("intermediate_size"),
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=flag("attention_bias") or arch == "qwen2",
            rope_neox=True,
            extra={"source": "hf", "path": str(where)},
        )

    # ---- from GGUF metadata ----
    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str], where: str = "GGUF file") -> "ModelConfig":
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"{where}: unsupported GGUF architecture {arch!r}: mojollm runs "
                                 f"{', '.join(GGUF_ARCHITECTURES)}")

        def raw(name, default=None):
            k = f"{arch}.{name}"
            if k in meta:
                return meta[k]
            if default is None:
                raise ModelLoadError(f"{where}: GGUF metadata lacks {k}")
            return default

        def integer(name, limit_name, default=None):
            return _integer(raw(name, default), f"{arch}.{name}", where, limit_name)

        def number(name, default=None):
            return _number(raw(name, default), f"{arch}.{name}", where)

        hidden = integer("embedding_length", "hidden_size")
        heads = integer("attention.head_count", "num_attention_heads")
        kv_heads = integer("attention.head_count_kv", "num_key_value_heads", heads)
        head_dim = (integer("attention.key_length", "head_dim") if f"{arch}.attention.key_length" in meta
                    else _derived_head_dim(hidden, heads, where))
        value_dim = integer("attention.value_length", "head_dim", head_dim)
        if value_dim != head_dim:
            raise ModelLoadError(f"{where}: key length {head_dim} != value length {value_dim} is not supported")
        rot_dim = integer("rope.dimension_count", "head_dim", head_dim)
        if rot_dim != head_dim:
            raise ModelLoadError(f"{where}: partial rotary embeddings (rope.dimension_count {rot_dim} < head_dim "
                                 f"{head_dim}) "
                                 "are not supported")
        if f"{arch}.vocab_size" in meta:
            vocab = integer("vocab_size", "vocab_size")
        else:
            tokens = meta.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list):
                raise ModelLoadError(f"{where}: GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
            vocab = _integer(len(tokens), "the token list's length", where, "vocab_size")
        scaling = None
        scaling_type = raw("rope.scaling.type", "none")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor")}
        elif scaling_type != "none":
            raise ModelLoadError(f"{where}: GGUF rope scaling {scaling_type!r} is not supported (only linear)")
        if "rope_freqs.weight" in tensor_names:
            # llama3-style scaling stored as per-frequency divisors; the model reads the tensor.
            scaling = {"rope_type": "freq_factors"}
        if arch == "qwen2" and "blk.0.attn_q.bias" not in tensor_names:
            raise ModelLoadError(f"{where}: a qwen2 GGUF needs attn_q.bias tensors, and this one has none")
        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=integer("block_count", "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=integer("feed_forward_length", "intermediate_size"),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=number("rope.freq_base", 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=integer("context_length", "max_position_embeddings", 2048),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            # llama.cpp runs llama with interleaved rope (its converter permuted q/k), qwen2 with neox.
            rope_neox=arch != "llama" and arch != "mistral",
            extra={"source": "gguf", "path": str(where)},
        )


def check_layer_tensors(config: ModelConfig, weight_names: Iterable[str], where: str) -> None:
    """The checkpoint holds tensors for exactly layers 0..num_hidden_layers-1 (our names, "layers.N.*").
    Runs before the model sizes anything by the claimed layer count."""
    present = {int(n.split(".", 2)[1]) for n in weight_names if n.startswith("layers.")}
    claimed = config.num_hidden_layers
    beyond = sorted(i for i in present if i >= claimed)
    if beyond:
        raise ModelLoadError(f"{where} holds tensors for layer {beyond[0]}, but its config says "
                             f"{claimed} layers")
    if len(present) < claimed:
        missing = min(set(range(claimed)) - present)
        raise ModelLoadError(f"{where} claims {claimed} layers but holds no tensors for layer {missing} "
                             f"(tensors for {len(present)} layers are present)")


def _normalise_rope_scaling(scaling: Mapping[str, Any] | None, where: str = "model config") -> dict | None:
    """HF rope_scaling -> dict with `rope_type`, or None for plain rope. Unsupported kinds raise."""
    if not scaling:
        return None
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    s.pop("type", None)
    s["rope_type"] = kind
    if kind == "default":
        return None
    if not isinstance(kind, str) or kind not in ("llama3", "linear"):
        raise ModelLoadError(f"{where}: rope scaling {kind!r} is not supported (supported: llama3, linear)")
    return s


def _derived_head_dim(hidden: int, heads: int, where: str) -> int:
    if heads > hidden:
        raise ModelLoadError(f"{where}: {heads} attention heads exceed the hidden size {hidden}, so the head "
                             "size cannot be derived")
    return hidden // heads


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _integer(value: Any, key: str, where: str, limit_name: str) -> int:
    """An integer field, within 1..LIMITS[limit_name]. JSON's true/false, 64.0, "64" and null are errors:
    a config that spells a size that way is damaged, and guessing would hide it."""
    if not _is_int(value):
        raise ModelLoadError(f"{where}: {key} must be an integer, got {_describe(value)}")
    top = LIMITS[limit_name]
    if not 1 <= value <= top:
        raise ModelLoadError(f"{where}: {key} is {value}, outside the supported range 1..{top}")
    return int(value)


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ModelLoadError(f"{where}: {key} must be a finite number, got {_describe(value)}")
    return float(value)


def _flag(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool) or (_is_int(value) and value in (0, 1)):
        return bool(value)
    raise ModelLoadError(f"{where}: {key} must be true or false, got {_describe(value)}")


def _mapping_or_none(value: Any, key: str, where: str) -> Mapping | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise ModelLoadError(f"{where}: {key} must be a JSON object or null, got {_describe(value)}")


def _describe(value: Any) -> str:
    """A value as the config's author would recognise it (JSON names, long values cut)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, Mapping):
        return "an object"
    return repr(value)[:60]
