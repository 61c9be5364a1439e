"""Kernel benchmarks of the cuda backend against peers measured in the same run and the physical limits.

    python bench/cuda.py [--quick] [--only gemm,decode] [--json FILE]

Sections (each prints its numbers; a summary table comes last):
  ceilings   the device's copy bandwidth (backend.memory_bandwidth_gbs: bytes read + written; always
             measured, the other sections compare against it), torch bf16 matmul TFLOP/s
  gemm       bf16 C = A @ W.T at 4096^3, 8192^3 and the 8B model's shapes at 16-2048 tokens: `linear`
             (the model's call), Modular's GEMM (static / dynamic shapes), torch.matmul
  graphs     Modular's GEMM replayed from a CUDA graph vs eager (decode-sized M)
  gemv       decode-shaped GEMV (1 token, bf16 and Q4_0 weights): achieved GB/s vs the copy bandwidth
  prefill    causal attention, bf16, 32 q / 8 kv heads, d=128, 4096 tokens: Modular's flash attention
             and ours (paged) vs torch SDPA
  decode     paged decode attention, batch 64, context 4096, bf16 cache: achieved GB/s vs copy

End-to-end decode speed is not here: it is measured through the product (`LLM.generate`, the
engine, the cuda runner) in bench/gpu_e2e.py.

Timing: CUDA events around the region, warm-up first, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def graph_ms(torch, be, fn, calls=20, replays=10):
    """Milliseconds per call of `fn` replayed from a CUDA graph of `calls` calls (as the decode
    runner replays its steps): no Python or launch overhead, which a single eager call of a
    ~10 us kernel would mostly measure."""
    fn()
    be.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=be.stream):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
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


# The 8B model's GEMM shapes (N, K) and heads: the bench runs on the specialised build the model
# itself loads (specialise_like_8b), so the e2e run and this one share it.
LLAMA8B_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA8B_HEADS = (32, 8, 128)


def specialise_like_8b(be) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_llama import preset_checkpoint

    from mojollm.models.llama import kernel_specialisation

    c, weights = preset_checkpoint("llama-3-8b")
    shapes, heads = kernel_specialisation(c, weights, be.kv_cache_dtype)
    assert set(LLAMA8B_SHAPES.values()) <= set(shapes) and heads == LLAMA8B_HEADS
    be.specialise(shapes, heads, progress=print)


def gemm(be, torch, res, cube_sizes, model_ms):
    """bf16 GEMM at n^3 and the 8B shapes at M tokens: `linear` as the model calls it (float32 in
    and out: the load-time policy's pick plus converting x to bf16), Modular's GEMM forced
    static-shape and dynamic-shape, each vs torch.matmul (bf16 out) in the same run. (Our own
    mma.sync / wgmma GEMMs measured 0.12-0.75x torch here on 2026-11-29 and were deleted.)"""
    shapes = [(n, n, n) for n in cube_sizes] + [(m, n, k) for m in model_ms for (n, k) in LLAMA8B_SHAPES.values()]
    be.specialise([(n, n) for n in cube_sizes if (n, n) not in LLAMA8B_SHAPES.values()], None, progress=print)
    for (m, n, k) in shapes:
        a = torch.randn(m, k, device=be.device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=be.device, dtype=torch.bfloat16) * 0.05
        x = a.float()
        lin = be.prepare_linear_tensor(w)
        ref = a.double() @ w.double().T
        ms_ref = median_ms(torch, lambda: a @ w.T, iters=10)
        err_ref = rel((a @ w.T).double(), ref)
        tf_ref = 2 * m * n * k / ms_ref / 1e9
        c = torch.empty(m, n, device=be.device)
        variants = [("linear", lambda: be.linear(x, lin)),
                    ("modular_static", lambda: be.library_gemm(a, w, c, "static")),
                    ("modular_dynamic", lambda: be.library_gemm(a, w, c, "dynamic"))]
        tag = f"{m}x{n}x{k}"
        row = {"torch_TFLOPs": tf_ref, "torch_rel_err": err_ref}
        for name, run in variants:
            try:
                out = run()
                got = c if out is None else out
                err = rel(got.double(), ref)
                ms = median_ms(torch, run, iters=10)
            except Exception as e:  # report and go on: one missing kernel must not hide the rest
                print(f"[gemm] {tag} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            tf = 2 * m * n * k / ms / 1e9
            ok = err < 4 * err_ref + 1e-3
            row[name] = dict(TFLOPs=tf, ratio=tf / tf_ref, rel_err=err, ok=ok)
            print(f"[gemm] {tag} {name}: {tf:.0f} TFLOP/s ({ms:.3f} ms), torch {tf_ref:.0f} ({ms_ref:.3f} ms), "
                  f"ratio {tf / tf_ref:.2f}, rel err {err:.1e} (torch {err_ref:.1e}){'' if ok else ' WRONG'}")
        res[f"gemm_{tag}"] = row
        del a, w, x, lin, c, ref


def graphs(be, torch, res):
    """Modular's GEMM as the decode runner uses it: output prefilled with NaN (a kernel that
    accumulates into C instead of writing it would show), two eager calls compared bit for bit,
    and (dynamic path and the policy) a CUDA graph captured on the backend's stream replayed
    against eager; decode-sized M, the 8B shapes."""
    out = {}
    for (n, k) in LLAMA8B_SHAPES.values():
        w = torch.randn(n, k, device=be.device, dtype=torch.bfloat16) * 0.05
        for m in (1, 2, 8, 16, 32, 64, 256):
            a = torch.randn(m, k, device=be.device, dtype=torch.bfloat16)
            ref = a.float() @ w.float().T
            # Forced below 256 tokens the static build corrupts other memory (see backend._TUNE_M): not run.
            for path in (("static",) if m >= 256 else ()) + ("dynamic", None):
                c = torch.full((m, n), float("nan"), device=be.device)
                be.library_gemm(a, w, c, path)
                be.synchronize()
                finite = bool(torch.isfinite(c).all())
                err = rel(c, ref) if finite else float("nan")
                eager = c.clone()
                c.fill_(float("nan"))
                be.library_gemm(a, w, c, path)
                be.synchronize()
                deterministic = bool(torch.equal(c, eager))
                diff = float("nan")
                if path != "static":  # not graph-safe (library_gemm never captures it); replaying it corrupts memory
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=be.stream):
                        be.library_gemm(a, w, c, path)
                    c.fill_(float("nan"))
                    g.replay()
                    be.synchronize()
                    diff = float((c - eager).abs().max()) if finite else float("nan")
                name = f"{m}x{n}x{k}_{path or 'policy'}"
                ok = finite and deterministic and (diff == 0 or path == "static") and err < 1e-3
                out[name] = dict(finite=finite, rel_err=err, deterministic=deterministic, replay_max_abs_diff=diff,
                                 ok=ok)
                if not ok or m in (1, 64):
                    print(f"[graphs] gemm {name}: every output written {finite}, rel err {err:.1e}, eager calls "
                          f"identical {deterministic}, replay vs eager max abs diff {diff:.3g}{'' if ok else '  BAD'}")
    bad = [k for k, v in out.items() if not v["ok"]]
    print(f"[graphs] {len(out) - len(bad)} of {len(out)} (shape, M, path) cases correct, deterministic and "
          f"replay-exact; bad: {', '.join(bad) or 'none'}")
    res["graphs"] = out


def gemv(be, torch, res):
    """Decode-sized products (1 and 8 tokens) timed from CUDA graph replays (graph_ms): `linear` as
    the model calls it (float32 x), Modular's dynamic-shape GEMM on bf16 x, and the quantized GEMV,
    vs the bytes the weights hold over the copy bandwidth."""
    from mojollm.weights import WeightTensor

    out = {}
    copy = res["copy_GBps"]
    for (n, k) in ((14336, 4096), (4096, 14336), (128256, 4096)):
        w = torch.randn(n, k, device=be.device, dtype=torch.bfloat16)
        lin = be.prepare_linear_tensor(w)
        for t in (1, 8):
            x = torch.randn(t, k, device=be.device)
            xb = x.to(torch.bfloat16)
            c = torch.empty(t, n, device=be.device)
            err = rel(be.linear(x, lin), x @ w.float().T)
            ms = graph_ms(torch, be, lambda: be.linear(x, lin))
            ms_lib = graph_ms(torch, be, lambda: be.library_gemm(xb, w, c, "dynamic"))
            out[f"bf16_{n}x{k}_t{t}"] = dict(linear_us=ms * 1e3, modular_us=ms_lib * 1e3, rel_err=err,
                                             frac_copy=w.nbytes / ms / 1e6 / copy)
            print(f"[gemv] bf16 {n}x{k}, {t} token(s): linear {ms * 1e3:.1f} us = {w.nbytes / ms / 1e6 / copy:.0%} "
                  f"of copy (Modular's GEMM alone {ms_lib * 1e3:.1f} us = {w.nbytes / ms_lib / 1e6 / copy:.0%}), "
                  f"rel err {err:.1e}")
        del w, lin
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from mojollm.weights import BLOCK_BYTES, BLOCK_SIZE

    rng = np.random.default_rng(0)
    for qtype in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"):
        for (n, k) in ((14336, 4096), (4096, 14336)):
            if qtype in ("Q4_0", "Q4_1", "Q8_0"):
                data = quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[qtype])
            else:  # random blocks with small float16 scales: the speed does not depend on the values
                blocks = rng.integers(0, 256, (n, k // BLOCK_SIZE[qtype], BLOCK_BYTES[qtype]), dtype=np.uint8)
                data = blocks.reshape(n, -1)
                scale_at = {"Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [BLOCK_BYTES[qtype] - 2]}[qtype]
                for o in scale_at:
                    blocks[:, :, o:o + 2] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
            lin = be.prepare_linear(WeightTensor("w", (n, k), qtype, data))
            for t in (1, 8):
                x = torch.randn(t, k, device=be.device)
                ms = graph_ms(torch, be, lambda: be.linear(x, lin))
                ms_eager = median_ms(torch, lambda: be.linear(x, lin), iters=20)
                frac = lin.nbytes / ms / 1e6 / copy
                out[f"{qtype.lower()}_{n}x{k}_t{t}"] = dict(us=ms * 1e3, eager_us=ms_eager * 1e3, frac_copy=frac)
                print(f"[gemv] {qtype} {n}x{k}, {t} token(s): {ms * 1e3:.1f} us = {lin.nbytes / ms / 1e6:.0f} GB/s "
                      f"= {frac:.0%} of copy (one eager call {ms_eager * 1e3:.1f} us)")
            del lin
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
    qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
    ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True,
                                         enable_gqa=True)[0].transpose(0, 1).double()
    ms_ref = median_ms(torch, sdpa, iters=10)
    err_ref = rel(sdpa()[0].transpose(0, 1).double(), ref)
    flops = 4 * seq * seq * D * H / 2
    out = {"seq": seq, "sdpa_ms": ms_ref, "sdpa_TFLOPs": flops / ms_ref / 1e9, "sdpa_rel_err": err_ref}
    variants = [("modular_flash", lambda: be.attention_prefill_fresh(q, k, v, (seq,), scale)),
                ("ours_paged", lambda: be.attention_prefill(q, kc, vc, table, cu, lens, scale))]
    for name, run in variants:
        try:
            got = run()
            if got is None:
                raise RuntimeError("no specialised build for these heads")
            err = rel(got.double(), ref)
            ms = median_ms(torch, run, iters=10)
        except Exception as e:
            print(f"[prefill] {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        out[name] = dict(ms=ms, TFLOPs=flops / ms / 1e9, ratio=ms_ref / ms, rel_err=err)
        print(f"[prefill] causal bf16 {H}q/{KVH}kv d{D} seq {seq} {name}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), "
              f"SDPA {ms_ref:.3f} ms ({flops / ms_ref / 1e9:.0f}), speed ratio {ms_ref / ms:.2f}, "
              f"rel err {err:.1e} (SDPA {err_ref:.1e})")
    res["prefill_attention"] = out


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
    ap.add_argument("--only", default="gemm,graphs,gemv,prefill,decode",
                    help="comma-separated sections after the ceilings (gemm, graphs, gemv, prefill, decode)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from mojollm.backends import get_backend

    be = get_backend("cuda")
    torch = be.torch
    res = {"device": be.device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    only = set(args.only.split(","))
    ceilings(be, torch, res)
    specialise_like_8b(be)
    with torch.no_grad():
        if "gemm" in only:
            gemm(be, torch, res, (1024,) if args.quick else (4096, 8192), (64,) if args.quick else (2048, 64, 16, 256))
        if "graphs" in only:
            graphs(be, torch, res)
        if "gemv" in only:
            gemv(be, torch, res)
        if "prefill" in only:
            prefill_attention(be, torch, res, 1024 if args.quick else 4096)
        if "decode" in only:
            decode_attention(be, torch, res, 8 if args.quick else 64, 1024 if args.quick else 4096)
    print("\n| benchmark | ours | peer / limit | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    for key, row in res.items():
        if key.startswith("gemm_"):
            impls = {k: v for k, v in row.items() if isinstance(v, dict) and v["ok"]}
            if impls:
                best = max(impls, key=lambda k: impls[k]["TFLOPs"])
                others = ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in impls.items() if k != best)
                print(f"| bf16 GEMM {key[5:]} | {best} {impls[best]['TFLOPs']:.0f} TFLOP/s | torch.matmul "
                      f"{row['torch_TFLOPs']:.0f} | {impls[best]['ratio']:.2f}x ({others}) | >= 0.9x |")
    p = res.get("prefill_attention", {})
    for name in ("modular_flash", "ours_paged"):
        if name in p:
            print(f"| prefill attention bf16 causal {p['seq']} ({name}) | {p[name]['ms']:.3f} ms | SDPA "
                  f"{p['sdpa_ms']:.3f} ms | {p[name]['ratio']:.2f}x | >= 1.0x |")
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
