"""Benchmarks of the cuda backend against peers measured in the same run and the physical limits.

    python bench/cuda.py [--quick] [--json FILE]

Sections (each prints its numbers; a summary table comes last):
  ceilings   device-to-device copy bandwidth (bytes read + written), torch bf16 matmul TFLOP/s
  gemm       bf16 C = A @ W.T at 4096^3 and 8192^3: our tensor-core GEMM vs torch.matmul
  gemv       decode-shaped GEMV (1 token, bf16 and Q4_0 weights): achieved GB/s vs the copy bandwidth
  prefill    causal attention, bf16, 32 q / 8 kv heads, d=128, 4096 tokens: ours (paged) vs torch SDPA
  decode     paged decode attention, batch 64, context 4096, bf16 cache: achieved GB/s vs copy
  e2e        batch-1 greedy decode of a Llama-3-8B-shaped model with random bf16 weights, generated
             on the GPU: eager launches vs one CUDA graph per step, vs the bandwidth roofline and vs
             transformers' generate on the same weights

Timing: CUDA events around the region, warm-up first, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np


def median_ms(torch, fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


# ---- sections ------------------------------------------------------------------------------------------
def ceilings(be, torch, res):
    src = torch.randn(1 << 29, device=be.device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(torch, lambda: dst.copy_(src), iters=10)
    res["copy_GBps"] = 2 * src.nbytes / ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=be.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=be.device, dtype=torch.bfloat16)
    ms = median_ms(torch, lambda: a @ b.T, iters=10)
    res["torch_bf16_TFLOPs_8192"] = 2 * n ** 3 / ms / 1e9
    print(f"[ceilings] copy {res['copy_GBps']:.0f} GB/s (read+write); torch bf16 matmul 8192^3 "
          f"{res['torch_bf16_TFLOPs_8192']:.0f} TFLOP/s")


def gemm(be, torch, res, sizes):
    variants = [("mma", None, None)]
    if be.hopper:
        variants += [("wgmma", 128, 0), ("wgmma", 256, 0), ("wgmma", 128, 1), ("wgmma", 256, 1)]
    for n in sizes:
        a = torch.randn(n, n, device=be.device, dtype=torch.bfloat16)
        w = torch.randn(n, n, device=be.device, dtype=torch.bfloat16)
        lin = be.prepare_linear_tensor(w)
        ref = a @ w.T
        ms_ref = median_ms(torch, lambda: a @ w.T, iters=10)
        tf_ref = 2 * n ** 3 / ms_ref / 1e9
        best = None
        for impl, bn, swap in variants:
            run = lambda: be.matmul_16bit(a, lin, torch.bfloat16, impl=impl, bn=bn, swap=swap)  # noqa: E731
            err = rel(run().float(), ref.float())
            ms = median_ms(torch, run, iters=10)
            tf = 2 * n ** 3 / ms / 1e9
            name = impl if impl == "mma" else f"wgmma_bn{bn}_swap{swap}"
            ok = err < 1e-2
            print(f"[gemm] {n}^3 bf16 {name}: {tf:.0f} TFLOP/s ({ms:.3f} ms), torch {tf_ref:.0f} ({ms_ref:.3f} ms), "
                  f"ratio {tf / tf_ref:.2f}, rel err vs torch {err:.1e}{'' if ok else ' WRONG'}")
            res[f"gemm_{n}_{name}"] = dict(TFLOPs=tf, rel_err=err, ok=ok)
            if ok and (best is None or tf > best[1]):
                best = (name, tf, err)
        res[f"gemm_{n}"] = dict(kernel=best[0], ours_TFLOPs=best[1], torch_TFLOPs=tf_ref, ratio=best[1] / tf_ref,
                                rel_err=best[2])


def gemv(be, torch, res):
    from mojollm.weights import WeightTensor

    out = {}
    for (n, k) in ((14336, 4096), (4096, 14336), (128256, 4096)):
        w = torch.randn(n, k, device=be.device, dtype=torch.bfloat16)
        lin = be.prepare_linear_tensor(w)
        x = torch.randn(1, k, device=be.device)
        y = be.linear(x, lin)
        err = rel(y, x @ w.float().T)
        ms = median_ms(torch, lambda: be.linear(x, lin), iters=20)
        gbs = w.nbytes / ms / 1e6
        out[f"bf16_{n}x{k}"] = dict(GBps=gbs, frac_copy=gbs / res["copy_GBps"], rel_err=err, us=ms * 1e3)
        print(f"[gemv] bf16 {n}x{k}, 1 token: {ms * 1e3:.1f} us, {gbs:.0f} GB/s = "
              f"{gbs / res['copy_GBps']:.0%} of copy, rel err {err:.1e}")
        del w, lin
    rng = np.random.default_rng(0)
    n, k = 14336, 4096
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType.Q4_0)
    lin = be.prepare_linear(WeightTensor("w", (n, k), "Q4_0", data))
    x = torch.randn(1, k, device=be.device)
    ms = median_ms(torch, lambda: be.linear(x, lin), iters=20)
    gbs = lin.nbytes / ms / 1e6
    out["q4_0_14336x4096"] = dict(GBps=gbs, frac_copy=gbs / res["copy_GBps"], us=ms * 1e3)
    print(f"[gemv] Q4_0 {n}x{k}, 1 token: {ms * 1e3:.1f} us, {gbs:.0f} GB/s = {gbs / res['copy_GBps']:.0%} of copy")
    res["gemv"] = out


def prefill_attention(be, torch, res, seq):
    import torch.nn.functional as F

    H, KVH, D, B = 32, 8, 128, 64
    nb = seq // B
    q = torch.randn(seq, H, D, device=be.device, dtype=torch.bfloat16)
    k = torch.randn(seq, KVH, D, device=be.device, dtype=torch.bfloat16)
    v = torch.randn(seq, KVH, D, device=be.device, dtype=torch.bfloat16)
    perm = torch.randperm(nb, device=be.device)
    kc = torch.empty(nb, B, KVH, D, device=be.device, dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kc[perm] = k.view(nb, B, KVH, D)  # logical block i lives in physical block perm[i]
    vc[perm] = v.view(nb, B, KVH, D)
    table = perm.to(torch.int32).view(1, nb)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=be.device)
    lens = torch.tensor([seq], dtype=torch.int32, device=be.device)
    scale = D ** -0.5
    run = lambda: be.attention_prefill(q, kc, vc, table, cu, lens, scale)  # noqa: E731
    qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
    err = rel(run().float(), sdpa()[0].transpose(0, 1).float())
    ms_ours, ms_ref = median_ms(torch, run, iters=10), median_ms(torch, sdpa, iters=10)
    flops = 4 * seq * seq * D * H / 2
    res["prefill_attention"] = dict(seq=seq, ours_ms=ms_ours, sdpa_ms=ms_ref, ratio=ms_ref / ms_ours,
                                    ours_TFLOPs=flops / ms_ours / 1e9, sdpa_TFLOPs=flops / ms_ref / 1e9, rel_err=err)
    print(f"[prefill] causal bf16 {H}q/{KVH}kv d{D} seq {seq}: ours {ms_ours:.3f} ms "
          f"({flops / ms_ours / 1e9:.0f} TFLOP/s), SDPA {ms_ref:.3f} ms ({flops / ms_ref / 1e9:.0f}), "
          f"speed ratio {ms_ref / ms_ours:.2f}, rel err vs SDPA {err:.1e}")


def decode_attention(be, torch, res, batch, ctx):
    H, KVH, D, B = 32, 8, 128, 16
    for cache_dtype in (torch.bfloat16, torch.float32):
        nbps = ctx // B
        kc = torch.randn(batch * nbps, B, KVH, D, device=be.device, dtype=cache_dtype)
        vc = torch.randn_like(kc)
        table = torch.randperm(batch * nbps, device=be.device).to(torch.int32).view(batch, nbps)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=be.device)
        q = torch.randn(batch, H, D, device=be.device, dtype=cache_dtype)
        run = lambda: be.attention_decode(q, kc, vc, table, lens, D ** -0.5)  # noqa: E731
        # Reference on 2 sequences (gathering everything would double the memory).
        got = run()
        ref_rows = []
        for s in (0, batch - 1):
            kk = kc[table[s].long()].reshape(ctx, KVH, D).float().repeat_interleave(H // KVH, 1)
            vv = vc[table[s].long()].reshape(ctx, KVH, D).float().repeat_interleave(H // KVH, 1)
            att = torch.softmax(torch.einsum("hd,thd->ht", q[s].float(), kk) * D ** -0.5, dim=-1)
            ref_rows.append(torch.einsum("ht,thd->hd", att, vv))
        err = rel(torch.stack([got[0], got[-1]]).float(), torch.stack(ref_rows))
        ms = median_ms(torch, run, iters=20)
        nbytes = kc.nbytes + vc.nbytes
        gbs = nbytes / ms / 1e6
        name = str(cache_dtype).replace("torch.", "")
        splits = be.decode_splits(batch, KVH, ctx)[0]
        res[f"decode_attention_{name}"] = dict(batch=batch, ctx=ctx, ms=ms, GBps=gbs, frac_copy=gbs / res["copy_GBps"],
                                               splits=splits, rel_err=err)
        print(f"[decode] paged {name} cache, batch {batch}, ctx {ctx}, {H}q/{KVH}kv d{D}: {ms:.3f} ms, "
              f"{gbs:.0f} GB/s = {gbs / res['copy_GBps']:.0%} of copy ({splits} splits), rel err {err:.1e}")
        del kc, vc


# ---- end to end: Llama-3-8B-shaped decode ----------------------------------------------------------------
class Llama:
    """The op sequence of mojollm.models.llama.LlamaModel.forward on weights shared with an HF model."""

    def __init__(self, be, hf, max_pos):
        torch = be.torch
        from mojollm.models.rope import rope_cos_sin

        c = hf.config
        self.be, self.c = be, c
        self.H, self.KVH, self.D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        m = hf.model
        self.embed = be.prepare_linear_tensor(m.embed_tokens.weight)
        self.layers = []
        for lyr in m.layers:
            a, f = lyr.self_attn, lyr.mlp
            self.layers.append(dict(
                attn_norm=lyr.input_layernorm.weight.float().contiguous(),
                qkv=be.prepare_linear_tensor(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                o=be.prepare_linear_tensor(a.o_proj.weight),
                mlp_norm=lyr.post_attention_layernorm.weight.float().contiguous(),
                gate_up=be.prepare_linear_tensor(torch.cat([f.gate_proj.weight, f.up_proj.weight])),
                down=be.prepare_linear_tensor(f.down_proj.weight),
            ))
        self.final_norm = m.norm.weight.float().contiguous()
        self.lm_head = be.prepare_linear_tensor(hf.lm_head.weight)
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 500000.0)
        self.cos_sin = torch.from_numpy(rope_cos_sin(self.D, theta, max_pos)).to(be.device)
        self.bytes_per_token = sum(t.nbytes for L in self.layers for t in (L["qkv"], L["o"], L["gate_up"], L["down"]))
        self.bytes_per_token += self.lm_head.nbytes + sum(L["attn_norm"].nbytes * 2 for L in self.layers)

    def forward(self, ids, positions, slots, tables, lens, cu, caches, decode):
        be, c = self.be, self.c
        T, H, KVH, D = ids.shape[0], self.H, self.KVH, self.D
        eps = c.rms_norm_eps
        residual = be.embedding(self.embed, ids)
        x = be.rms_norm(residual, self.layers[0]["attn_norm"], eps)
        for i, L in enumerate(self.layers):
            kc, vc = caches[i]
            qkv = be.linear(x, L["qkv"])
            q = qkv[:, :H * D].reshape(T, H, D).contiguous()
            k = qkv[:, H * D:(H + KVH) * D].reshape(T, KVH, D).contiguous()
            v = qkv[:, (H + KVH) * D:].reshape(T, KVH, D).contiguous()
            q = be.rope(q, positions, self.cos_sin, True)
            k = be.rope(k, positions, self.cos_sin, True)
            be.store_kv(kc, vc, k, v, slots)
            if decode:
                attn = be.attention_decode(q, kc, vc, tables, lens, D ** -0.5)
            else:
                attn = be.attention_prefill(q, kc, vc, tables, cu, lens, D ** -0.5)
            x, residual = be.add_rms_norm(be.linear(attn.reshape(T, H * D), L["o"]), residual, L["mlp_norm"], eps)
            mlp = be.linear(be.silu_mul(be.linear(x, L["gate_up"])), L["down"])
            nxt = self.layers[i + 1]["attn_norm"] if i + 1 < len(self.layers) else self.final_norm
            x, residual = be.add_rms_norm(mlp, residual, nxt, eps)
        return be.linear(x[-1:].contiguous(), self.lm_head)


def e2e(be, torch, res, n_new, prompt_len, layers):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(be.device):
        hf = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    torch.cuda.synchronize()
    print(f"[e2e] random bf16 Llama-3-8B-shaped model ({layers} layers) built in {time.perf_counter() - t0:.1f} s")
    model = Llama(be, hf, max_pos=prompt_len + n_new + 8)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), device=be.device)

    # -- transformers generate (same weights, bf16, greedy): decode-only rate from two lengths
    def hf_generate(n):
        with torch.no_grad():
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t, out[0, prompt_len:]
    hf_generate(4)
    t1, _ = hf_generate(1)
    tn, hf_tokens = hf_generate(n_new + 1)
    hf_tps = n_new / (tn - t1)

    # -- ours: paged f32 KV cache (as LlamaModel allocates it), block size 16
    B = 16
    total = prompt_len + n_new + 1
    nblk = -(-total // B)
    caches = [(be.zeros((nblk, B, model.KVH, model.D)), be.zeros((nblk, B, model.KVH, model.D)))
              for _ in range(layers)]
    tables = torch.arange(nblk, dtype=torch.int32, device=be.device)[None]

    def prefill():
        ids = prompt.to(torch.int32)
        pos = torch.arange(prompt_len, dtype=torch.int32, device=be.device)
        return model.forward(ids, pos, pos.to(torch.int64), tables,
                             torch.tensor([prompt_len], dtype=torch.int32, device=be.device),
                             torch.tensor([0, prompt_len], dtype=torch.int32, device=be.device), caches, decode=False)

    logits0 = prefill()
    with torch.no_grad():
        ref0 = hf(prompt[None]).logits[0, -1].float()
    prefill_err = rel(logits0[0], ref0)
    ttft_ms = median_ms(torch, prefill, iters=5, warmup=1)

    # static decode state: the graph reads and advances these in place
    ids = torch.argmax(logits0[0]).to(torch.int32).view(1)
    pos = torch.tensor([prompt_len], dtype=torch.int32, device=be.device)
    slot = pos.to(torch.int64)
    lens = pos + 1

    def step():
        logits = model.forward(ids, pos, slot, tables, lens, None, caches, decode=True)
        ids.copy_(torch.argmax(logits[0]).view(1))
        pos.add_(1)
        slot.add_(1)
        lens.add_(1)

    def reset():
        ids.copy_(torch.argmax(logits0[0]).to(torch.int32).view(1))
        pos.fill_(prompt_len)
        slot.fill_(prompt_len)
        lens.fill_(prompt_len + 1)

    # eager: every op launched from Python
    step()
    reset()
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = []
    for _ in range(n_new):
        tokens.append(ids.clone())
        step()
    torch.cuda.synchronize()
    eager_tps = n_new / (time.perf_counter() - t)
    ours_tokens = torch.cat(tokens)

    # one CUDA graph per step (Mojo launches land on torch's capture stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    reset()
    torch.cuda.synchronize()
    t = time.perf_counter()
    gtokens = []
    for _ in range(n_new):
        gtokens.append(ids.clone())
        graph.replay()
    torch.cuda.synchronize()
    graph_tps = n_new / (time.perf_counter() - t)
    graph_tokens = torch.cat(gtokens)
    step_ms = median_ms(torch, graph.replay, iters=20, warmup=2)

    # Accuracy on the real shapes: the prefill's last-token logits against transformers run in
    # float32 on the same (bf16-valued) weights. Our prefill GEMMs take bf16-rounded activations.
    hf.float()
    with torch.no_grad():
        ref32 = hf(prompt[None]).logits[0, -1].float()
    prefill_err32 = rel(logits0[0], ref32)
    hf_bf16_err32 = rel(ref0, ref32)

    roof_tps = res["copy_GBps"] * 1e9 / model.bytes_per_token
    agree = int((ours_tokens == hf_tokens[:n_new].to(torch.int32)).int().cumprod(0).sum())
    res["e2e"] = dict(
        layers=layers, weight_GB=model.bytes_per_token / 1e9, prompt=prompt_len, new_tokens=n_new,
        eager_tok_s=eager_tps, graph_tok_s=graph_tps, graph_step_ms=step_ms,
        roofline_tok_s=roof_tps, frac_roofline=graph_tps / roof_tps, hf_tok_s=hf_tps, vs_hf=graph_tps / hf_tps,
        launch_overhead_ms=1e3 / eager_tps - step_ms, ttft_ms=ttft_ms, prefill_logit_rel_err_vs_hf_bf16=prefill_err,
        prefill_logit_rel_err_vs_hf_f32=prefill_err32, hf_bf16_logit_rel_err_vs_hf_f32=hf_bf16_err32,
        graph_equals_eager=bool(torch.equal(graph_tokens, ours_tokens)), greedy_prefix_agreeing_with_hf=agree,
    )
    print(f"[e2e] {layers} layers, {model.bytes_per_token / 1e9:.2f} GB read per token: eager {eager_tps:.1f} tok/s, "
          f"CUDA graph {graph_tps:.1f} tok/s ({step_ms:.2f} ms/step) = {graph_tps / roof_tps:.0%} of the "
          f"{roof_tps:.0f} tok/s roofline; transformers generate {hf_tps:.1f} tok/s -> {graph_tps / hf_tps:.1f}x")
    print(f"[e2e] launch overhead per step {1e3 / eager_tps - step_ms:.2f} ms eager vs graph; prefill "
          f"({prompt_len} tokens) {ttft_ms:.1f} ms; last-token logits rel err vs transformers float32 {prefill_err32:.1e} "
          f"(transformers bf16 vs float32: {hf_bf16_err32:.1e}; ours vs transformers bf16 {prefill_err:.1e}); "
          f"graph tokens == eager tokens: {res['e2e']['graph_equals_eager']}; greedy tokens agreeing with "
          f"transformers before the first difference: {agree}/{n_new}")
    del hf, model, caches
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", default="ceilings,gemm,gemv,prefill,decode,e2e")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from mojollm.backends import get_backend

    be = get_backend("cuda")
    torch = be.torch
    res = {"device": be.device_name, "torch": torch.__version__, "date": "2026-11-22", "command": " ".join(sys.argv)}
    only = set(args.only.split(","))
    ceilings(be, torch, res)
    with torch.no_grad():
        if "gemm" in only:
            gemm(be, torch, res, (1024,) if args.quick else (4096, 8192))
        if "gemv" in only:
            gemv(be, torch, res)
        if "prefill" in only:
            prefill_attention(be, torch, res, 1024 if args.quick else 4096)
        if "decode" in only:
            decode_attention(be, torch, res, 8 if args.quick else 64, 1024 if args.quick else 4096)
        if "e2e" in only:
            e2e(be, torch, res, n_new=16 if args.quick else 64, prompt_len=32, layers=2 if args.quick else 32)
    print("\n| benchmark | ours | peer / limit | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    for n in (4096, 8192):
        if f"gemm_{n}" in res:
            g = res[f"gemm_{n}"]
            print(f"| bf16 GEMM {n}^3 ({g['kernel']}) | {g['ours_TFLOPs']:.0f} TFLOP/s | torch.matmul {g['torch_TFLOPs']:.0f} | "
                  f"{g['ratio']:.2f}x | >= 0.9x |")
    if "prefill_attention" in res:
        p = res["prefill_attention"]
        print(f"| prefill attention bf16 causal {p['seq']} | {p['ours_ms']:.3f} ms | SDPA {p['sdpa_ms']:.3f} ms | "
              f"{p['ratio']:.2f}x | >= 1.0x |")
    for name in ("bfloat16", "float32"):
        if f"decode_attention_{name}" in res:
            d = res[f"decode_attention_{name}"]
            print(f"| paged decode attention {name} b{d['batch']} ctx{d['ctx']} | {d['GBps']:.0f} GB/s | "
                  f"copy {res['copy_GBps']:.0f} GB/s | {d['frac_copy']:.0%} | >= 80% |")
    if "e2e" in res:
        e = res["e2e"]
        print(f"| e2e decode 8B-shape batch 1 (graph) | {e['graph_tok_s']:.1f} tok/s | roofline "
              f"{e['roofline_tok_s']:.0f} tok/s | {e['frac_roofline']:.0%} | >= 85% |")
        print(f"| e2e decode vs transformers generate | {e['graph_tok_s']:.1f} tok/s | {e['hf_tok_s']:.1f} tok/s | "
              f"{e['vs_hf']:.1f}x | >= 3x |")
        print(f"| e2e decode, eager launches | {e['eager_tok_s']:.1f} tok/s | graph {e['graph_tok_s']:.1f} | "
              f"{e['eager_tok_s'] / e['graph_tok_s']:.2f}x | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
