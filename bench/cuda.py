"""Kernel benchmarks of the cuda backend against peers measured in the same run and the physical limits.

    python bench/cuda.py [--quick] [--only gemm,decode] [--json FILE]

Sections (each prints its numbers; a summary table comes last):
  ceilings   the device's copy bandwidth (backend.memory_bandwidth_gbs: bytes read + written; always
             measured, the other sections compare against it), torch bf16 matmul TFLOP/s
  gemm       bf16 C = A @ W.T at 4096^3 and 8192^3: our tensor-core GEMM vs torch.matmul
  gemv       decode-shaped GEMV (1 token, bf16 and Q4_0 weights): achieved GB/s vs the copy bandwidth
  prefill    causal attention, bf16, 32 q / 8 kv heads, d=128, 4096 tokens: ours (paged) vs torch SDPA
  decode     paged decode attention, batch 64, context 4096, bf16 cache: achieved GB/s vs copy

End-to-end decode speed is not here: it is measured through the product (`LLM.generate`, the
engine, the cuda runner) in bench/gpu_e2e.py.

Timing: CUDA events around the region, warm-up first, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    res["copy_GBps"] = be.memory_bandwidth_gbs()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", default="gemm,gemv,prefill,decode",
                    help="comma-separated sections after the ceilings (gemm, gemv, prefill, decode)")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
