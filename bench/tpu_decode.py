"""Decode and prefill speed of the tpu backend (JAX/XLA, Pallas on TPU) on whatever JAX device exists,
next to peer backends measured in the same run, and against the device's memory bandwidth.

    python bench/tpu_decode.py                      # default model, tpu backend vs cpu backend
    python bench/tpu_decode.py --synthetic --peers  # SmolLM2-135M shapes and GGUF types, random weights
                                                    # (no model file: for machines that cannot fetch it)

The product drives every run: greedy generation of --output-len tokens for --batch prompts through
`LLM.generate`, set up and timed as `mojollm compare` does it (mojollm.compare.engine_options and
greedy_run: one prefill step for the batch, then one decode step per token; times from the
requests' metrics). The first run (compilation) is reported apart from the median of --repeats
timed runs. What this adds to `mojollm compare`: models without a file (--synthetic), the
backend's own description, and a roofline counted in the bytes a decode step reads *as the backend
stores the weights* (the tpu backend widens GGUF weights to float32 on CPU/GPU, keeps int8 + scales
on TPU) plus the KV cache, over the device bandwidth measured in this process
(backend.memory_bandwidth_gbs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

SMOLLM2_135M = dict(arch="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5,
                    rope_theta=1e5, rope_scaling=None, max_position_embeddings=8192, tie_word_embeddings=True,
                    attention_bias=False, rope_neox=False)


def synthetic_weights(cfg, seed=0):
    """Random weights with the default model's GGUF types: token_embd Q8_0, matrices Q4_1, norms F32."""
    from mojollm.weights import WeightTensor

    rng = np.random.default_rng(seed)

    def quant(name, rows, cols, qtype):
        nb = cols // 32
        if qtype == "Q8_0":
            blocks = rng.integers(0, 256, (rows, nb, 34), dtype=np.uint8)
            blocks[:, :, 0:2] = rng.uniform(0.002, 0.02, (rows, nb, 1)).astype(np.float16).view(np.uint8)
        else:
            blocks = rng.integers(0, 256, (rows, nb, 20), dtype=np.uint8)
            blocks[:, :, 0:2] = rng.uniform(0.002, 0.02, (rows, nb, 1)).astype(np.float16).view(np.uint8)
            blocks[:, :, 2:4] = rng.uniform(-0.16, -0.01, (rows, nb, 1)).astype(np.float16).view(np.uint8)
        return WeightTensor(name, (rows, cols), qtype, blocks.reshape(rows, -1))

    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = {"embed_tokens": quant("embed_tokens", cfg.vocab_size, h, "Q8_0"),
         "norm": WeightTensor.from_float("norm", rng.uniform(0.5, 1.5, h))}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for n, (r, c) in {"q_proj": (cfg.num_attention_heads * d, h), "k_proj": (cfg.num_key_value_heads * d, h),
                          "v_proj": (cfg.num_key_value_heads * d, h), "o_proj": (h, cfg.num_attention_heads * d),
                          "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}.items():
            w[p + n] = quant(p + n, r, c, "Q4_1")
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[p + n] = WeightTensor.from_float(p + n, rng.uniform(0.5, 1.5, h))
    return w


class _NoText:
    """The tokenizer of random weights: no vocabulary, so every token decodes to no text."""

    eos_token_ids: set[int] = set()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def load(backend, args):
    from mojollm.models import load_model

    if not args.synthetic:
        return load_model(args.model, backend=backend)
    from mojollm.models.config import ModelConfig
    from mojollm.models.llama import LlamaModel

    cfg = ModelConfig(**SMOLLM2_135M)
    return LlamaModel(cfg, synthetic_weights(cfg), _NoText(), backend)


def resident_weight_bytes(model) -> int | None:
    """Bytes of the prepared weights a decode step reads, as the tpu backend holds them (jax arrays):
    everything but the embedding table (a step gathers only its tokens' rows). None for other backends."""
    if model.backend.name != "tpu":
        return None
    import jax

    seen: set[int] = set()

    def walk(o) -> int:
        if isinstance(o, jax.Array):
            if id(o) in seen:
                return 0
            seen.add(id(o))
            return o.nbytes
        if isinstance(o, (list, tuple)):
            return sum(walk(x) for x in o)
        if hasattr(o, "__dict__"):
            return sum(walk(x) for x in vars(o).values())
        return 0

    return walk([model.lm_head, model.final_norm, *model.layers])


def measure(name, args):
    from mojollm import measure as m
    from mojollm.backends import get_backend
    from mojollm.compare import engine_options, greedy_run
    from mojollm.llm import LLM

    backend = get_backend(name)
    t0 = time.perf_counter()
    llm = LLM(load(backend, args), **engine_options(args.batch, args.prompt_len, args.output_len, args.block_size))
    load_s = time.perf_counter() - t0
    model, cfg = llm.model, llm.model.config
    prompts = np.random.default_rng(0).integers(100, cfg.vocab_size, (args.batch, args.prompt_len))
    t0 = time.perf_counter()
    greedy_run(llm, prompts, args.output_len)  # compiles (tpu) / warms up
    first_s = time.perf_counter() - t0
    runs = [greedy_run(llm, prompts, args.output_len) for _ in range(args.repeats)]
    prefill_s = statistics.median(r["ttft_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    decode_tps = args.batch * (args.output_len - 1) / decode_s
    bw, how = m.device_bandwidth(backend)
    weight_bytes = resident_weight_bytes(model) or model.weight_bytes
    kv_per_token = model.kv_cache_bytes_per_block(args.block_size) / args.block_size
    bytes_per_token = m.decode_bytes_per_token(weight_bytes, kv_per_token, args.prompt_len, args.output_len, args.batch)
    roof = m.roofline_fraction(decode_tps, bytes_per_token, bw)
    out = {
        "backend": name, "device": backend.device_name,
        "describe": backend.describe() if hasattr(backend, "describe") else "",
        "load_s": load_s, "first_run_s": first_s,
        "prefill_tokens_per_s": args.batch * args.prompt_len / prefill_s,
        "decode_tokens_per_s": decode_tps, "decode_ms_per_step": 1e3 * decode_s / (args.output_len - 1),
        "weight_bytes_read_per_step": weight_bytes, "bandwidth_gbs": bw, "bandwidth_how": how,
        "achieved_gbs": roof["achieved_gbs"], "roofline_fraction": roof["fraction"],
    }
    del llm, model
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / HF dir (default: the default model)")
    ap.add_argument("--synthetic", action="store_true", help="random weights with the default model's shapes/types")
    ap.add_argument("--peers", default="cpu", help="comma-separated peer backends measured in the same run ('' for none)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=33, help="greedy tokens per prompt (>= 2)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    results = []
    for name in ["tpu"] + [p for p in args.peers.split(",") if p and p != "tpu"]:
        try:
            results.append(measure(name, args))
        except Exception as e:  # an unavailable peer is reported, not fatal
            results.append({"backend": name, "error": f"{type(e).__name__}: {e}"})
        r = results[-1]
        if "error" in r:
            print(f"{name:5s} unavailable: {r['error']}")
            continue
        frac = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] else "n/a"
        print(f"{name:5s} {r['device']}\n      {r['describe']}\n"
              f"      decode {r['decode_tokens_per_s']:.1f} tok/s ({r['decode_ms_per_step']:.1f} ms/step), "
              f"prefill {r['prefill_tokens_per_s']:.0f} tok/s, first run {r['first_run_s']:.1f} s, load {r['load_s']:.1f} s\n"
              f"      reads {r['weight_bytes_read_per_step'] / 1e6:.0f} MB weights/step -> {r['achieved_gbs'] or 0:.1f} GB/s "
              f"of {r['bandwidth_gbs'] or 0:.1f} GB/s ({frac}; {r['bandwidth_how']})")
    ok = [r for r in results if "error" not in r]
    if len(ok) > 1:
        for r in ok[1:]:
            print(f"tpu/{r['backend']} decode speed ratio: {ok[0]['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "config": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
