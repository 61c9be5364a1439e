import sys
sys.path.insert(0, "bench")
from pathlib import Path
import torch
from random_llama import write_random_llama
from mojollm import LLM
p = Path("/tmp/llama-3.2-1b")
if not (p / "model.safetensors").exists():
    write_random_llama(p, "llama-3.2-1b", "bfloat16", seed=1, device="cuda")
mode = sys.argv[1]
llm = LLM(str(p), backend="cuda", kv_cache_memory="2GiB", enable_prefix_caching=False)
b = llm.backend
print("static shapes", {k: sorted(v[1]) for k, v in b._lib_gemm.items()}, "attn", list(b._lib_attn), flush=True)
if mode == "attn":
    for T in (256, 257, 385):
        z = lambda h: torch.randn(T, h, 64, device="cuda", dtype=torch.bfloat16)
        b.attention_prefill_fresh(z(32), z(8), z(8), (T,), 0.125)
        torch.cuda.synchronize(); print("attn", T, "ok", flush=True)
else:
    for (n, k) in b._lib_gemm:
        for M in (256, 257, 385):
            a = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            c = torch.empty(M, n, device="cuda", dtype=torch.float32)
            print("gemm static", n, k, M, flush=True)
            b.library_gemm(a, w, c, path="static")
            torch.cuda.synchronize()
            ref = (a.float() @ w.float().T)
            print("   ok err", float((c - ref).abs().max() / ref.abs().max()), flush=True)
