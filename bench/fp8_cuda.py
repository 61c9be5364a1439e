"""FP8 E4M3 weights on the cuda backend: the GEMV against bf16 and Q8_0, and decode through the product.

    python bench/fp8_cuda.py [--only gemv,prefill,e2e] [--batches 1,16] [--new-tokens 128] [--json FILE]

Sections:
  gemv     Llama-3-8B's decode products ([N, K] of qkv, o, gate_up, down, lm_head) at M = 1, 4, 8
           tokens: `linear` (float32 x, as the model calls it) on F8_E4M3 blocks (gpu_linear's
           tensor-core GEMV), bf16 weights (Modular's GEMM) and Q8_0 blocks (int8 dp4a GEMV). Each
           timed from CUDA graph replays of 20 calls that rotate over copies of the weight (>= 256
           MiB in all, so the 50 MB L2 holds none of it, as in a decode step); GB/s = the weight's
           bytes as stored / time, against 4.2 TB/s (the H200's achievable read rate) and the
           measured copy bandwidth. Values are random (speed does not depend on them); each row
           checks one result against torch on the dequantized weight.
  prefill  the same shapes (lm_head aside) at 16-2048 tokens: FP8 through the GEMV (`linear`'s
           choice up to 64 tokens; forced up to 256 here, passes of 64) and dequantized to bf16 per
           call then Modular's GEMM (`linear`'s choice past 64 tokens), against bf16 weights: what
           the dequantization costs, and where the GEMV stops paying (up to 256 tokens timed as in
           gemv, past that eager calls).
  e2e      decode tok/s of a random-weight Llama-3.2-1B-shape model through `LLM(..., backend="cuda")`
           (engine, runner, CUDA graphs): bf16 as written by bench/random_llama.py, and the same
           weights (every linear and the tied embedding) quantized to F8_E4M3 with a scale per
           32-block. Weight bytes per step and their rate next to tok/s.

Needs the 8B and 1B specialisations of Modular's kernels (bench/build_gpu.py --model-shape llama-3-8b
--model-shape llama-3.2-1b) for the bf16 GEMMs; without them the dynamic-shape GEMM serves.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

H200_READ_GBPS = 4200.0
LLAMA8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
           "lm_head": (128256, 4096)}
ROTATE_BYTES = 256 << 20


def graph_us(torch, be, calls_fn, calls=20, replays=10) -> float:
    """Microseconds per call: `calls_fn(i)` for i < calls captured in one CUDA graph on the backend's
    stream, replayed; median over replays."""
    for i in range(2):  # kernels loaded, scratch shapes seen
        calls_fn(i)
    be.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=be.stream):
        for i in range(calls):
            calls_fn(i)
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return float(np.median(times))


def median_ms(torch, fn, iters=10) -> float:
    fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def random_weight(be, torch, kind: str, n: int, k: int):
    """(device weight as prepare_linear makes it, its float32 dequantization as a function of rows):
    random codes / values made on the device (a 1 GB lm_head would take minutes in numpy)."""
    from mojollm.backends.cuda.backend import DenseWeight, QuantWeight

    dev = be.device
    if kind == "bf16":
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        return DenseWeight(w), lambda r: w[:r].float()
    nb = k // 32
    qs = torch.randint(0, 256, (n, nb, 32), device=dev, dtype=torch.uint8)
    d = ((torch.rand(n, nb, device=dev) + 0.5) * 2.0 ** -10).half()
    if kind == "fp8":
        from mojollm.backends.cuda.backend import f8_tiles

        qs[(qs & 0x7F) == 0x7F] -= 1  # no NaN codes
        return (QuantWeight("F8_E4M3", f8_tiles(torch, qs, d), None, None, n, k),  # as prepare_linear tiles it
                lambda r: (qs[:r].view(torch.float8_e4m3fn).float() * d[:r, :, None].float()).reshape(r, k))
    return (QuantWeight("Q8_0", qs, d, None, n, k),
            lambda r: (qs[:r].view(torch.int8).float() * d[:r, :, None].float()).reshape(r, k))


def copies_of(torch, w, n: int):
    """w and n - 1 device copies of its tensors (same kind)."""
    from mojollm.backends.cuda.backend import DenseWeight, QuantWeight

    out = [w]
    for _ in range(n - 1):
        if isinstance(w, DenseWeight):
            out.append(DenseWeight(w.w.clone()))
        else:
            out.append(QuantWeight(w.qtype, w.qs.clone(), None if w.d is None else w.d.clone(), None, w.n, w.k))
    return out


def gemv(be, torch, res, tokens=(1, 4, 8)):
    copy = res["copy_GBps"]
    rows = []
    for name, (n, k) in LLAMA8B.items():
        for kind in ("fp8", "bf16", "q8_0"):
            w, deq = random_weight(be, torch, kind, n, k)
            ws = copies_of(torch, w, max(1, -(-ROTATE_BYTES // w.nbytes)))
            check_rows = min(n, 4096)
            wref = deq(check_rows)
            for m in tokens:
                x = torch.randn(m, k, device=be.device)
                err = rel(be.linear(x, w)[:, :check_rows], x @ wref.T)
                us = graph_us(torch, be, lambda i: be.linear(x, ws[i % len(ws)]))
                gbs = w.nbytes / us / 1e3
                row = dict(section="gemv", layer=name, n=n, k=k, m=m, weights=kind, us=us, weight_MB=w.nbytes / 1e6,
                           GBps=gbs, frac_4200=gbs / H200_READ_GBPS, frac_copy=gbs / copy, rel_err=err)
                sweep = ""
                if kind == "fp8":  # the GEMV's block size (warps splitting K per 16-row tile) both ways
                    row["warps"] = be._f8_warps(n)
                    for wp in (4, 8):
                        be._f8_warps = lambda n_, wp=wp: wp
                        try:
                            row[f"us_w{wp}"] = graph_us(torch, be, lambda i: be.linear(x, ws[i % len(ws)]))
                        finally:
                            del be._f8_warps
                    sweep = f" [{row['warps']} warps; 4: {row['us_w4']:.1f} us, 8: {row['us_w8']:.1f} us]"
                rows.append(row)
                print(f"[gemv] {name} {n}x{k} M={m} {kind:5s}: {us:7.1f} us, {gbs:5.0f} GB/s = "
                      f"{gbs / H200_READ_GBPS:4.0%} of 4.2 TB/s ({gbs / copy:4.0%} of copy), rel err {err:.1e}{sweep}",
                      flush=True)
            del w, ws, wref
            torch.cuda.empty_cache()
    res["gemv"] = rows
    print("\n| layer [N, K] | M | FP8 us (GB/s, of 4.2 TB/s) | bf16 us (GB/s) | Q8_0 us (GB/s) "
          "| FP8 speed vs bf16 / Q8_0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    by = {(r["layer"], r["m"], r["weights"]): r for r in rows}
    for name, (n, k) in LLAMA8B.items():
        for m in tokens:
            f, b, q = (by[(name, m, kind)] for kind in ("fp8", "bf16", "q8_0"))
            print(f"| {name} [{n}, {k}] | {m} | {f['us']:.1f} ({f['GBps']:.0f}, {f['frac_4200']:.0%}) | "
                  f"{b['us']:.1f} ({b['GBps']:.0f}) | {q['us']:.1f} ({q['GBps']:.0f}) | "
                  f"{b['us'] / f['us']:.2f}x / {q['us'] / f['us']:.2f}x |")


def specialise_like(be, preset: str) -> None:
    from random_llama import preset_checkpoint

    from mojollm.models.llama import kernel_specialisation

    c, weights = preset_checkpoint(preset)
    shapes, heads = kernel_specialisation(c, weights, be.kv_cache_dtype)
    be.specialise(shapes, heads, progress=print)


def dequant_gemm(be, x, w):
    """What `linear` does with FP8 weights past 64 tokens: the weight dequantized to bf16, then
    Modular's GEMM on bf16 x (here forced at any token count)."""
    torch = be.torch
    s = be._s()
    n, k = w.n, w.k
    wt = torch.empty(n, k, device=be.device, dtype=torch.bfloat16)
    qs, d, m, h = w.ptrs()
    be._k.dequant(be._gpu, (s, w.code, 1, qs, d, m, wt.data_ptr(), n, k, h))
    y = torch.empty(x.shape[0], n, device=be.device)
    be.library_gemm(x.to(torch.bfloat16), wt, y)
    return y


def f8_gemv(be, x, w):
    """gpu_linear's FP8 GEMV at any token count (`linear` takes it up to 64): passes of 64 tokens."""
    torch = be.torch
    T, K = x.shape
    y = torch.empty(T, w.n, device=be.device)
    scratch = torch.empty(T * K * 2 + (K // 32) * (-(-T // 8) * 8) * 4, device=be.device, dtype=torch.int8)
    tiles = next((t for t in (1, 2, 4) if 8 * t >= T), 8)
    be._k.gemv_f8(be._gpu, (be._s(), tiles, x.data_ptr(), w.qs.data_ptr(), y.data_ptr(), y.data_ptr(), 0, T, w.n,
                            K, scratch.data_ptr(), be._f8_warps(w.n)))
    return y


def prefill(be, torch, res, tokens=(16, 32, 64, 128, 256, 512, 2048)):
    """FP8 at more tokens: the GEMV (`linear`'s choice up to 64 tokens), dequantization + bf16 GEMM
    (`linear`'s choice past 64) and bf16 weights' GEMM, so the switch point can be checked."""
    rows = []
    for name, (n, k) in LLAMA8B.items():
        if name == "lm_head":
            continue
        fp8, deq = random_weight(be, torch, "fp8", n, k)
        bf = be.prepare_linear_tensor(deq(n).to(torch.bfloat16))
        fs = copies_of(torch, fp8, max(1, -(-ROTATE_BYTES // fp8.nbytes)))
        bs = copies_of(torch, bf, max(1, -(-ROTATE_BYTES // bf.nbytes)))
        for m in tokens:
            x = torch.randn(m, k, device=be.device)
            err = rel(dequant_gemm(be, x, fp8), be.linear(x, bf))
            if m <= 256:  # decode-sized: replayed from graphs over rotating copies, as the runner runs them
                ms_d = graph_us(torch, be, lambda i: dequant_gemm(be, x, fs[i % len(fs)])) / 1e3
                ms_b = graph_us(torch, be, lambda i: be.linear(x, bs[i % len(bs)])) / 1e3
            else:
                ms_d = median_ms(torch, lambda: dequant_gemm(be, x, fp8))
                ms_b = median_ms(torch, lambda: be.linear(x, bf))
            row = dict(section="prefill", layer=name, n=n, k=k, m=m, dequant_gemm_ms=ms_d, bf16_ms=ms_b,
                       dequant_overhead=ms_d / ms_b - 1, rel_err_vs_bf16=err)
            gemv_s = ""
            if m <= 256:
                row["gemv_ms"] = graph_us(torch, be, lambda i: f8_gemv(be, x, fs[i % len(fs)])) / 1e3
                row["gemv_rel_err_vs_bf16"] = rel(f8_gemv(be, x, fp8), be.linear(x, bf))
                gemv_s = f"GEMV {row['gemv_ms']:.3f} ms, "
            rows.append(row)
            print(f"[prefill] {name} {n}x{k} M={m}: FP8 {gemv_s}dequant + GEMM {ms_d:.3f} ms "
                  f"({2 * m * n * k / ms_d / 1e9:.0f} TFLOP/s); bf16 weights {ms_b:.3f} ms: dequantization costs "
                  f"{ms_d / ms_b - 1:+.0%}; rel diff {err:.1e}", flush=True)
        del fp8, bf, fs, bs
        torch.cuda.empty_cache()
    res["prefill"] = rows


def fp8_weights(torch, device, weights: dict) -> dict:
    """Every 2-D weight whose rows are whole 32-blocks as F8_E4M3 blocks (quantized on the device):
    per 32-block d = max|w| / 448 as float16 (nudged up so the block's largest weight stays within
    448 d), q = e4m3(w / d), round to nearest even."""
    from mojollm.weights import WeightTensor

    out = {}
    for name, w in weights.items():
        if len(w.shape) != 2 or w.shape[1] % 32:
            out[name] = w
            continue
        n, k = w.shape
        wf = torch.from_numpy(np.ascontiguousarray(w.to_float32())).to(device).view(n, k // 32, 32)
        d = (wf.abs().amax(-1, keepdim=True) / 448 * (1 + 2.0 ** -10)).clamp(min=2.0 ** -24).half()
        q = (wf / d.float()).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        blocks = torch.cat([d.view(torch.uint8), q], dim=-1).reshape(n, k // 32 * 34)
        out[name] = WeightTensor(name, (n, k), "F8_E4M3", blocks.cpu().numpy())
        del wf, d, q, blocks
    return out


def e2e(be, torch, res, shape, batches, new_tokens, prompt_len=128):
    from gpu_e2e import mojollm_decode
    from random_llama import write_random_llama

    from mojollm import LLM
    from mojollm.models import load_checkpoint
    from mojollm.models.llama import LlamaModel
    from mojollm.tokenizer import Tokenizer

    path = Path(tempfile.gettempdir()) / f"fp8bench-{shape}"
    if not (path / "model.safetensors").exists():
        write_random_llama(path, shape, "bfloat16", seed=0, device="cuda")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = np.random.default_rng(0).integers(1000, vocab // 2, size=(max(batches), prompt_len)).tolist()
    out, tokens = {}, {}
    for kind in ("bf16", "fp8"):
        t = time.perf_counter()
        if kind == "bf16":
            llm = LLM(str(path), backend="cuda", max_num_seqs=max(batches))
        else:
            _, ckpt = load_checkpoint(path)
            weights = fp8_weights(torch, be.device, ckpt.weights)
            model = LlamaModel(ckpt.config, weights, Tokenizer.from_hf_dir(path), be, progress=print)
            llm = LLM(model, backend="cuda", max_num_seqs=max(batches))
            del ckpt, weights
        wbytes = llm.model.weight_bytes
        print(f"[e2e] {shape} {kind}: loaded in {time.perf_counter() - t:.1f} s, {wbytes / 1e9:.2f} GB of weights "
              "a step", flush=True)
        for b in batches:
            mojollm_decode(llm, prompts[:b], 16)  # warm-up
            r = mojollm_decode(llm, prompts[:b], new_tokens)
            tokens[(kind, b)] = r.pop("tokens")
            steps = r["decode_tok_s"] / b
            r.update(weight_GB=wbytes / 1e9, weight_GBps=wbytes * steps / 1e9)
            out[f"{kind}_b{b}"] = r
            print(f"[e2e] {shape} {kind} batch {b}: decode {r['decode_tok_s']:.0f} tok/s ({1e3 / steps:.2f} ms a step, "
                  f"weights read at {r['weight_GBps']:.0f} GB/s), ttft {r['ttft_s'] * 1e3:.1f} ms", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n| {shape} | batch | bf16 tok/s | FP8 tok/s | FP8 / bf16 | weights GB bf16 / FP8 | greedy tokens equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in batches:
        f, bf = out[f"fp8_b{b}"], out[f"bf16_b{b}"]
        same = float(np.mean([x == y for s, t in zip(tokens[("fp8", b)], tokens[("bf16", b)]) for x, y in zip(s, t)]))
        out[f"greedy_equal_b{b}"] = same
        print(f"| decode | {b} | {bf['decode_tok_s']:.0f} | {f['decode_tok_s']:.0f} | "
              f"{f['decode_tok_s'] / bf['decode_tok_s']:.2f}x | {bf['weight_GB']:.2f} / {f['weight_GB']:.2f} | "
              f"{same:.0%} |")
    res["e2e"] = dict(shape=shape, new_tokens=new_tokens, prompt_len=prompt_len, **out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="gemv,prefill,e2e")
    ap.add_argument("--shape", default="llama-3.2-1b", help="the e2e model's bench/random_llama.py preset")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from mojollm.backends import get_backend

    be = get_backend("cuda")
    torch = be.torch
    only = set(args.only.split(","))
    res = {"device": be.device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "copy_GBps": be.memory_bandwidth_gbs()}
    print(f"[ceilings] copy {res['copy_GBps']:.0f} GB/s (read + write); H200 read rate taken as {H200_READ_GBPS:.0f}")
    with torch.no_grad():
        if "gemv" in only:
            gemv(be, torch, res)
        if "prefill" in only:
            specialise_like(be, "llama-3-8b")
            prefill(be, torch, res)
    if "e2e" in only:
        e2e(be, torch, res, args.shape, [int(b) for b in args.batches.split(",")], args.new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
