"""The plain-PyTorch peer: a gpt-fast-style Llama with a static KV cache and a decode step under
torch.compile(mode="reduce-overhead") (Inductor kernels replayed as one CUDA graph per token).

    from torch_peer import load_model, compile_decode, generate
    model = load_model("/tmp/llama-1b", device="cuda", max_batch=1, max_seq_len=2048)
    decode = compile_decode()                      # compiles on its first call (~1 min on a GPU)
    generate(model, prompt, 8, decode)             # warm-up: compile + CUDA graph capture
    tokens, ttft_s, decode_tok_per_s = generate(model, prompt, 256, decode)

It reads the HF directory (config.json + *.safetensors) itself, without transformers, and keeps the
HF weight layout (rotate_half rope on the q/k rows as stored). Greedy only: argmax on the device.
The prefill runs eager (it is GEMM-bound; compiling it with dynamic shapes buys little and costs
a compile per prompt length), unless compile_prefill() is used.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        # transformers >= 5 writes rope_parameters (theta inside); hub files rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        heads = cfg["num_attention_heads"]
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                   tie_word_embeddings=cfg.get("tie_word_embeddings", False))


# ---- rope ------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """[head_dim/2] float64 inverse frequencies, with Llama 3.1's band-wise scaling when configured."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.get("rope_type", s.get("type")) != "llama3":
        raise ValueError(f"unsupported rope scaling {s}")
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are stretched by `factor`, short ones kept,
    # and the band between blends the two linearly in old_len / wavelen.
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / low, inv_freq / factor,
                       torch.where(wavelen < old_len / high, inv_freq, blended))


def rope_cos_sin(cfg: LlamaConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] float32, each half repeated (HF's rotate_half layout)."""
    # Angles in float64: p * theta in float32 is off by ~1e-3 rad at position 100k.
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, D]; cos, sin: [S, D] in x's dtype (as HF rounds them)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---- modules ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares in float32 (bf16 would lose it); the weight multiplies the rounded result, as in HF.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Static [B, KVH, max_len, D] buffers: fixed addresses and shapes are what lets a CUDA graph replay."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: [S]; k, v: [B, KVH, S, D] -> the whole caches [B, KVH, max_len, D]
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask):
        # x: [B, S, hidden]; cos, sin: [S, D]; input_pos: [S]; mask: [1, 1, S, max_len] bool, or None in a prefill
        B, S, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, S, c.num_heads, c.head_dim).transpose(1, 2)     # [B, H, S, D]
        k = self.k_proj(x).view(B, S, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = self.v_proj(x).view(B, S, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = self.kv_cache.update(input_pos, k, v)
        if mask is None:
            # A prefill from position 0: its own keys are all there is, so plain causal attention
            # (flash-eligible) over S keys instead of a masked pass over max_len.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # x: [B, S, hidden] -> SwiGLU over [B, S, intermediate] -> [B, S, hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Module names follow HF's (model.layers.N.self_attn.q_proj, ...) so the state dict loads as is."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.batch = self.max_len = 0

    def setup_caches(self, batch: int, max_len: int) -> None:
        """(Re)allocate the KV caches, rope tables and causal mask for `batch` sequences of up to `max_len` tokens."""
        if (batch, max_len) == (self.batch, self.max_len):
            return
        w = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, w.dtype, w.device)
        cos, sin = rope_cos_sin(self.cfg, max_len)
        self.register_buffer("rope_cos", cos.to(w.device, w.dtype), persistent=False)  # [max_len, D]
        self.register_buffer("rope_sin", sin.to(w.device, w.dtype), persistent=False)
        self.register_buffer("causal_mask", torch.ones(max_len, max_len, dtype=torch.bool, device=w.device).tril(),
                             persistent=False)  # [max_len, max_len]: row p allows keys 0..p
        self.batch, self.max_len = batch, max_len

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, is_prefill: bool = False) -> torch.Tensor:
        # ids: [B, S] at positions input_pos [S] -> hidden states after the final norm [B, S, hidden]
        mask = None if is_prefill else self.causal_mask[None, None, input_pos]  # [1, 1, S, max_len]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]       # [S, D]
        x = self.model.embed_tokens(ids)                                     # [B, S, hidden]
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [B, S, hidden] -> [B, S, vocab] float32
        return self.lm_head(h).float()


# ---- loading ---------------------------------------------------------------------------------------------
def load_model(path, device="cpu", dtype=torch.bfloat16, max_batch: int = 1, max_seq_len: int = 2048) -> Llama:
    """The HF directory's weights (every *.safetensors) in a Llama on `device`, caches set up."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):  # no host-side init of weights that are overwritten anyway
        model = Llama(cfg)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f, device=str(device)))
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True loaded two references; make them one parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.eval().requires_grad_(False)
    model.setup_caches(max_batch, max_seq_len)
    return model


# ---- steps -----------------------------------------------------------------------------------------------
def prefill(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    # ids: [B, S], a new sequence from position 0 -> greedy next token [B, 1]
    input_pos = torch.arange(ids.shape[1], device=ids.device)
    h = model(ids, input_pos, is_prefill=True)
    return model.logits(h[:, -1:]).argmax(-1)  # only the last position's logits: the vocab GEMM is S times smaller


def decode_one_token(model: Llama, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    # ids: [B, 1] at position input_pos [1] -> greedy next token [B, 1]
    return model.logits(model(ids, input_pos)).argmax(-1)


def compile_decode():
    """decode_one_token under Inductor + CUDA graphs; fullgraph so a graph break fails loudly."""
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True  # gpt-fast's setting: faster decode GEMVs
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True  # a second process reuses the compiled kernels
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)


def compile_prefill(cuda_graph: bool = True):
    """prefill under Inductor. cuda_graph: static shapes, one compile and CUDA graph per (batch, prompt
    length), so a short prompt's TTFT is not its ~250 eager launches; else one dynamic-shape compile."""
    if cuda_graph:
        return torch.compile(prefill, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(prefill, fullgraph=True, dynamic=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Llama, prompt_ids: torch.Tensor, max_new_tokens: int, decode_fn=decode_one_token,
             prefill_fn=prefill):
    """Greedy decoding of `prompt_ids` [B, S] -> (tokens [B, max_new_tokens], ttft_s, decode_tok_per_s).

    ttft_s: the prefill and its argmax, synchronised. decode_tok_per_s: the max_new_tokens - 1
    tokens after the first, summed over the batch (B * (N - 1) / decode seconds; per sequence,
    divide by B). The caches keep their size when the prompt fits, so CUDA graphs are reused.
    """
    B, S = prompt_ids.shape
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if B != model.batch or S + max_new_tokens > model.max_len:
        model.setup_caches(B, max(S + max_new_tokens, model.max_len))
    device = prompt_ids.device
    _sync(device)
    start = time.perf_counter()
    token = prefill_fn(model, prompt_ids).clone()  # [B, 1]; clone: see below
    _sync(device)
    ttft_s = time.perf_counter() - start
    tokens = [token]
    input_pos = torch.tensor([S], device=device, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        # clone: a CUDA graph's output lives in a buffer its next replay overwrites
        token = decode_fn(model, token, input_pos).clone()
        tokens.append(token)
        input_pos += 1
    _sync(device)
    decode_s = time.perf_counter() - start
    decode_tok_per_s = B * (max_new_tokens - 1) / decode_s if max_new_tokens > 1 else float("nan")
    return torch.cat(tokens, dim=1), ttft_s, decode_tok_per_s


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="gpt-fast-style peer: greedy decode timing on an HF Llama directory")
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    model = load_model(args.model, args.device, max_batch=args.batch, max_seq_len=args.prompt_len + args.new_tokens)
    decode = decode_one_token if args.no_compile else compile_decode()
    prompt = torch.randint(1000, model.cfg.vocab_size // 2, (args.batch, args.prompt_len), device=args.device,
                           generator=torch.Generator(args.device).manual_seed(0))
    t = time.perf_counter()
    generate(model, prompt, 8, decode)  # warm-up: compile and CUDA graph capture
    print(f"warm-up (compile) {time.perf_counter() - t:.1f} s")
    tokens, ttft, tps = generate(model, prompt, args.new_tokens, decode)
    print(f"ttft {ttft * 1e3:.2f} ms, decode {tps:.1f} tok/s; first tokens {tokens[0, :8].tolist()}")


if __name__ == "__main__":
    main()
