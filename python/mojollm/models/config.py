"""ModelConfig: the hyper-parameters of a Llama-family decoder, read from GGUF metadata or a HF config.json.

Both sources are normalised to one shape so the model code never asks where a checkpoint came from,
except for `rope_neox`: llama.cpp's converter permutes the q/k rows of "llama" GGUFs for the
interleaved (GPT-J) rotary layout, while HF checkpoints (and qwen2 GGUFs) use rotate_half (neox).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mojollm.errors import ModelLoadError

# HF `architectures[0]` -> our arch name. All three are the same decoder; qwen2 adds q/k/v biases.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` values whose tensors follow the llama layout.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


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
    extra: dict = field(default_factory=dict, compare=False)  # source-specific notes, e.g. {"source": "gguf"}

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"{self.num_attention_heads} attention heads are not a multiple of "
                                 f"{self.num_key_value_heads} kv heads")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} is odd: rotary embeddings need an even head_dim")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # ---- from a HF config.json ----
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in HF_ARCHITECTURES]
        if not known:
            name = archs[0] if archs else f"model_type={cfg.get('model_type')!r}"
            raise ModelLoadError(f"unsupported architecture {name}: mojollm runs "
                                 f"{', '.join(HF_ARCHITECTURES)}")
        arch = HF_ARCHITECTURES[known[0]]
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
            rope_params = dict(cfg.get("rope_parameters") or {})
            theta = float(rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling") or rope_params or None
            scaling = _normalise_rope_scaling(scaling)
            max_pos = int(cfg.get("max_position_embeddings", 2048))
            if arch in ("mistral", "qwen2"):
                # Sliding-window attention is not implemented: cap the context at the window instead,
                # so every position we do serve is computed exactly.
                window = cfg.get("sliding_window")
                if window and (arch == "mistral" or cfg.get("use_sliding_window")):
                    max_pos = min(max_pos, int(window))
            if cfg.get("hidden_act", "silu") != "silu":
                raise ModelLoadError(f"unsupported activation {cfg.get('hidden_act')!r}: only silu (SwiGLU) is implemented")
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)) or arch == "qwen2",
                rope_neox=True,
                extra={"source": "hf"},
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the key {e.args[0]!r}") from e

    # ---- from GGUF metadata ----
    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"unsupported GGUF architecture {arch!r}: mojollm runs {', '.join(GGUF_ARCHITECTURES)}")

        def key(name, default=None, required=True):
            k = f"{arch}.{name}"
            if k in meta:
                return meta[k]
            if required and default is None:
                raise ModelLoadError(f"GGUF metadata lacks {k}")
            return default

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = int(key("attention.head_count_kv", heads))
        head_dim = int(key("attention.key_length", hidden // heads))
        value_dim = int(key("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise ModelLoadError(f"key length {head_dim} != value length {value_dim} is not supported")
        rot_dim = int(key("rope.dimension_count", head_dim))
        if rot_dim != head_dim:
            raise ModelLoadError(f"partial rotary embeddings (rope.dimension_count {rot_dim} < head_dim {head_dim}) "
                                 "are not supported")
        vocab = key("vocab_size", required=False)
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
            vocab = len(tokens)
        scaling = None
        scaling_type = key("rope.scaling.type", "none", required=False)
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling_type not in ("none", None):
            raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported (only linear)")
        if "rope_freqs.weight" in tensor_names:
            # llama3-style scaling stored as per-frequency divisors; the model reads the tensor.
            scaling = {"rope_type": "freq_factors"}
        if arch == "qwen2" and "blk.0.attn_q.bias" not in tensor_names:
            raise ModelLoadError("qwen2 GGUF without attn_q.bias tensors")
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            # llama.cpp runs llama with interleaved rope (its converter permuted q/k), qwen2 with neox.
            rope_neox=arch != "llama" and arch != "mistral",
            extra={"source": "gguf"},
        )


def _normalise_rope_scaling(scaling: Mapping[str, Any] | None) -> dict | None:
    """HF rope_scaling -> dict with `rope_type`, or None for plain rope. Unsupported kinds raise."""
    if not scaling:
        return None
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    s.pop("type", None)
    s["rope_type"] = kind
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: llama3, linear)")
    return s
