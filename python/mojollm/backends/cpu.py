"""The cpu backend: Mojo SIMD kernels on numpy float32 arrays (the embedded default).

Each op validates its inputs in the kernel wrappers (mojollm.kernels.*) before any address
crosses into Mojo; this class only routes ops to them.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from mojollm.backends.base import Backend, Probe, check_kv_copies
from mojollm.engine.runner import ModelRunner, StepOutput
from mojollm.weights import WeightTensor

_DTYPES = {None: np.float32, "float32": np.float32, "int32": np.int32, "int64": np.int64}



class CpuBackend(Backend):
    name = "cpu"

    @classmethod
    def probe(cls) -> Probe:
        try:
            from mojollm.kernels.build import compiler_version, find_mojo

            if not os.environ.get("MOJOLLM_KERNEL_DIR"):
                compiler_version(find_mojo())
        except Exception as e:
            return Probe(cls.name, False, "", str(e))
        return Probe(cls.name, True, f"{platform.machine()} ({os.cpu_count()} threads)", "")

    def __init__(self):
        from mojollm.kernels import attention, linalg, nn, quant

        self._attention, self._linalg, self._nn, self._quant = attention, linalg, nn, quant

    def load_kernels(self, progress=None) -> None:
        from mojollm.kernels.build import load_module

        for name in ("attention", "linalg", "nn", "quant", "kquant", "decode"):
            load_module(name, progress=progress)

    # ---- memory ----
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return np.array(a, dtype=_DTYPES[dtype], copy=True, order="C")

    def to_numpy(self, t: np.ndarray) -> np.ndarray:
        return np.array(t, copy=True)

    def zeros(self, shape, dtype: str = "float32") -> np.ndarray:
        return np.zeros(shape, dtype=_DTYPES[dtype])

    def create_runner(self, model, max_num_seqs: int, max_model_len: int):
        return CpuRunner(model, max_num_seqs, max_model_len)

    def kv_cache_dtypes(self) -> tuple[str, ...]:
        from mojollm.kv_dtypes import KV_CACHE_DTYPES

        return KV_CACHE_DTYPES  # attention.mojo converts on write and dequantizes in its loads

    def kv_cache_zeros(self, shape, kv_dtype: str):
        return self._attention.kv_cache_zeros(shape, kv_dtype)

    # ---- weights ----
    def prepare_linear(self, w: WeightTensor) -> Any:
        if w.is_quantized:
            return self._quant.QuantLinear(w)
        return self._linalg.DenseLinear(w)

    def prepare_embedding(self, w: WeightTensor) -> Any:
        return self._quant.EmbeddingTable(w)

    # ---- ops ----
    def embedding(self, table, ids):
        return table.lookup(ids)

    def linear(self, x, w, bias=None):
        y = w.forward(x)
        if bias is not None:
            y = self._nn.add(y, bias)
        return y

    def rms_norm(self, x, weight, eps):
        return self._nn.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._nn.add_rms_norm(x, residual, weight, eps)

    def add(self, a, b):
        return self._nn.add(a, b)

    def rope(self, x, positions, cos_sin, neox):
        return self._nn.rope(x, positions, cos_sin, neox)

    def silu_mul(self, gate_up):
        return self._nn.silu_mul(gate_up)

    def store_kv(self, k_cache, v_cache, k, v, slot_mapping):
        self._attention.store_kv(k_cache, v_cache, k, v, slot_mapping)

    def attention_prefill(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        return self._attention.attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)

    def attention_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        return self._attention.attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)

    # ---- KV compression ----
    def copy_kv_rows(self, k_cache, v_cache, src_slots, dst_slots):
        check_kv_copies(k_cache.shape[0] * k_cache.shape[1], src_slots, dst_slots)
        for c in (k_cache, v_cache):
            rows = c.reshape(-1, *c.shape[2:])  # a view: [slots, KVH, D]
            rows[dst_slots] = rows[src_slots]   # the gather is a temporary: sources read first

    supports_key_mass = True

    def attention_key_mass(self, q, k_cache, block_tables, cu_seqlens_q, context_lens, seqs, scale):
        """numpy: per sequence one [rows, KVH, D] gather of its keys, Q K^T per kv head (float32),
        the softmax in float64. Costs one extra Q K^T pass over the sequence's cache per layer:
        2 * q_len * H * D * context_len flops plus a read of its K rows."""
        _, B, KVH, D = k_cache.shape
        H = q.shape[1]
        G = H // KVH
        out = []
        for s in np.asarray(seqs).tolist():
            t0, t1 = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
            ctx = int(context_lens[s])
            nb = -(-ctx // B)
            keys = k_cache[block_tables[s, :nb]].reshape(nb * B, KVH, D)[:ctx]   # [ctx, KVH, D]
            qs = q[t0:t1].reshape(t1 - t0, KVH, G, D)
            z = np.einsum("tkgd,jkd->tkgj", qs, keys, optimize=True).astype(np.float64) * scale
            q_len = t1 - t0
            if q_len > 1:  # causal: query i sees rows up to ctx - q_len + i
                allowed = np.arange(ctx)[None, :] <= (ctx - q_len + np.arange(q_len))[:, None]
                z = np.where(allowed[:, None, None, :], z, -np.inf)
            z -= z.max(axis=-1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=-1, keepdims=True)
            out.append(p.sum(axis=(0, 1, 2)))
        return out

    # ---- info for measurements ----
    def memory_bandwidth_gbs(self) -> float | None:
        """Host memory read bandwidth: the best streaming read of 256 MiB by numpy and by the Mojo thread pool.

        numpy reads with one thread, then with a thread pool; the Mojo kernels' own pool reads with
        the threads a decode step uses. Each is a lower bound of what the cores can pull (numpy
        reductions mostly hold the GIL); the best is what a decode step that streams its weights
        can hope for. Measured once per backend instance."""
        if getattr(self, "_bandwidth_gbs", None) is None:
            import time
            from concurrent.futures import ThreadPoolExecutor

            words = np.ones(256 * 2**20 // 8, dtype=np.uint64)
            chunks = np.array_split(words, 4 * (os.cpu_count() or 1))
            best_s = float("inf")
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                for read in (lambda: np.bitwise_or.reduce(words), lambda: list(pool.map(np.bitwise_or.reduce, chunks))):
                    read()  # warm-up: page in, spin threads up
                    for _ in range(5):
                        t0 = time.perf_counter()
                        read()
                        best_s = min(best_s, time.perf_counter() - t0)
            gbs = words.nbytes / best_s / 1e9
            del words, chunks
            try:
                gbs = max(gbs, self._attention.stream_read_gbs(size_mib=256))
            except Exception:  # kernels not built or not loadable: the numpy figure stands
                pass
            self._bandwidth_gbs = gbs
        return self._bandwidth_gbs


class CpuRunner(ModelRunner):
    """Decode steps run every layer in one Mojo call (mojollm.kernels.decode) when the model's
    layers allow it; prefill, mixed steps and other models run the per-op forward. Sampling
    stays on the host (numpy), so every logits row comes back."""

    # Up to 8 rows a decode step's GEMVs stream the weights once for all rows and give each row
    # the bits it gets alone (int8 activations); more rows take the float GEMM. Speculative
    # verification stays within this, so it keeps the tokens plain decoding would give.
    max_verify_rows = 8

    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        super().__init__(model, max_num_seqs, max_model_len)
        self.programs = {}  # layers run (None: all) -> DecodeProgram, when the model has a fused step

    def allocate_kv_cache(self, num_blocks: int, block_size: int, progress=None) -> None:
        from mojollm.kernels.decode import DecodeProgram

        super().allocate_kv_cache(num_blocks, block_size, progress)
        if os.environ.get("MOJOLLM_CPU_FUSED_DECODE", "1") != "0" and hasattr(self.model, "layers"):
            program = DecodeProgram.for_model(self.model, self.max_num_seqs)
            if program is not None:
                self.programs[None] = program

    @property
    def program(self):
        return self.programs.get(None)

    def execute(self, batch, device_rows=None, layers=None) -> StepOutput:
        S = batch.num_seqs
        if (self.program is None or not batch.is_decode or batch.kv_mass_seqs is not None
                or not np.array_equal(batch.logits_indices, np.arange(S))):  # h2o's mass: per-op path
            return super().execute(batch, device_rows, layers)
        key = None if layers is None else tuple(layers)
        if key not in self.programs:  # a self-speculative draft's layers: built on first use
            from mojollm.kernels.decode import DecodeProgram

            self.programs[key] = DecodeProgram(self.model, self.max_num_seqs, layers=layers)
        m = self.model
        x, logits = self.programs[key].run(batch)
        return StepOutput(tokens=None, logits=logits if logits is not None else m.backend.linear(x, m.lm_head))
