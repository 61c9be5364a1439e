"""The backend interface: a small fixed set of ops that a model forward is written against.

Every backend (cpu, cuda, rocm, tpu) implements exactly these ops on its own tensor type
(numpy arrays on cpu, torch CUDA tensors on cuda/rocm, jax arrays on tpu). The model and the
engine never touch a device library; they call these ops and move data with `asarray`/`to_numpy`.

Shapes (T = tokens in the step, S = sequences in the step, H = query heads, KVH = kv heads,
D = head dim, B = KV block size):

    embedding(table, ids[T] int32)                       -> [T, hidden]
    linear(x[T, K], w, bias=None)                        -> [T, N]          y = x @ W.T (+ bias)
    rms_norm(x[T, K], weight[K], eps)                    -> [T, K]
    add_rms_norm(x[T,K], residual[T,K], weight, eps)     -> (normed, new_residual); residual += x
    rope(x[T, H, D], positions[T] int32, cos_sin, neox)  in place; cos_sin[max_pos, rot_dim]
    silu_mul(gate_up[T, 2F])                             -> [T, F]          silu(g) * u
    store_kv(k_cache, v_cache, k[T,KVH,D], v, slot_mapping[T] int64)   in place (converted to the cache's dtype)
    attention_prefill(q[T,H,D], k_cache, v_cache, block_tables[S,M] int32,
                      cu_seqlens_q[S+1] int32, context_lens[S] int32, scale) -> [T, H, D]
    attention_decode(q[S,H,D], k_cache, v_cache, block_tables, context_lens, scale) -> [S, H, D]
    copy_kv_rows(k_cache, v_cache, src_slots[N] int64, dst_slots[N] int64)   in place

KV cache of one layer: k_cache, v_cache [num_blocks, B, KVH, W] (W = D, or D + 4 bytes for int8 / fp8:
mojollm.kv_dtypes, allocated by kv_cache_zeros; q, k, v and outputs stay float). A sequence's token at position
p lives in block block_tables[s, p // B], row p % B; slot = block * B + row. In attention_prefill,
sequence s has q tokens cu_seqlens_q[s]:cu_seqlens_q[s+1] which are its *last* positions, i.e.
query i of s sits at position context_lens[s] - q_len + i and attends causally to positions
0..that position (the cache already holds the earlier ones: prefix-cache hits, chunked prefill).
"Position" here is the row in the sequence's cache: under a KV policy that evicted tokens
(engine/kv_policy.py) the rows are fewer than the RoPE positions, and the kernels need only the
row count and the rows' order (K is stored after RoPE).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mojollm.weights import WeightTensor


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run here, and why not when it cannot."""

    name: str
    available: bool
    device: str  # e.g. "x86_64 (2 threads)", "NVIDIA H100 80GB HBM3", "" when unavailable
    reason: str  # "" when available

    def as_dict(self) -> dict:
        return {"name": self.name, "available": self.available, "device": self.device, "reason": self.reason}


def host_available_bytes() -> int | None:
    """The host's available memory (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_kv_copies(num_slots: int, src_slots, dst_slots) -> None:
    """src/dst: equal-length int64 vectors of slots in the cache, destinations distinct."""
    src, dst = np.asarray(src_slots), np.asarray(dst_slots)
    if src.ndim != 1 or src.shape != dst.shape or src.dtype != np.int64 or dst.dtype != np.int64:
        raise ValueError(f"copy_kv_rows takes two equal-length int64 slot vectors, got {src.shape} {src.dtype} "
                         f"and {dst.shape} {dst.dtype}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_slots):
        raise ValueError(f"copy_kv_rows: slots must lie in [0, {num_slots})")
    if np.unique(dst).size != dst.size:
        raise ValueError("copy_kv_rows: a destination slot appears twice")


class Backend(abc.ABC):
    """One device's implementation of the model ops. Instances are created by the registry."""

    name: ClassVar[str]

    # ---- discovery ----
    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Probe:
        """Cheap check (no kernel build, no heavy import unless needed) whether this backend can run."""

    @property
    def device_name(self) -> str:
        return self.probe().device

    # ---- memory ----
    @abc.abstractmethod
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """Host array -> backend tensor (copy). dtype in {None, 'float32', 'int32', 'int64'}."""

    @abc.abstractmethod
    def to_numpy(self, t: Any) -> np.ndarray:
        """Backend tensor -> host float32/int array (copy, synchronises)."""

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> Any:
        ...

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on synchronous backends)."""

    def free_memory_bytes(self) -> int | None:
        """Bytes the KV cache can still take on this backend's device (None if unknown).
        Default: the host's available memory, where the cpu backend keeps everything."""
        return host_available_bytes()

    def load_kernels(self, progress=None) -> None:
        """Build (first time) and load the backend's kernel modules now, so that no compile lands
        inside a timed step. `progress(msg)` reports each build."""

    def default_kv_cache_bytes(self) -> int:
        """The KV budget when the user gives none (the engine caps it at what max_num_seqs full
        contexts need): 1 GiB, a share of host memory that leaves room for everything else."""
        return 1 << 30

    def default_batched_tokens(self) -> int:
        """Tokens one step runs at most when the user gives no max_num_batched_tokens: the
        prefill chunk. 512 keeps a CPU step's latency (and other requests' waits) short."""
        return 512

    def kv_cache_dtype(self, weight_qtype: str) -> str:
        """The KV cache's element type for a model whose weights are `weight_qtype` (F32, BF16,
        Q4_0, ...): float32 by default. kv_cache_dtype="auto" means this choice."""
        return "float32"

    def kv_cache_dtypes(self) -> tuple[str, ...]:
        """Every KV dtype (mojollm.kv_dtypes) this backend's store_kv and attention ops run, besides
        kv_cache_dtype()'s choice: none other by default."""
        return ()

    def kv_cache_zeros(self, shape: tuple[int, ...], kv_dtype: str) -> Any:
        """One layer's zeroed K or V cache [num_blocks, B, KVH, W] in kv_dtype's storage format
        (mojollm.kv_dtypes). The ops must know the cache's dtype from what this returns (int8 and
        fp8 caches are both bytes): the default allocates zeros() of the storage type."""
        from mojollm.kv_dtypes import storage_dtype

        return self.zeros(shape, storage_dtype(kv_dtype))

    def create_runner(self, model, max_num_seqs: int, max_model_len: int):
        """The runner that executes the engine's steps on this backend (engine/runner.py)."""
        from mojollm.engine.runner import ModelRunner

        return ModelRunner(model, max_num_seqs, max_model_len)

    # ---- weights ----
    @abc.abstractmethod
    def prepare_linear(self, w: WeightTensor) -> Any:
        """Turn a loaded weight [N, K] (float or GGUF-quantized) into what `linear` consumes.
        Quantized weights stay quantized when the backend has a kernel for their type."""

    @abc.abstractmethod
    def prepare_embedding(self, w: WeightTensor) -> Any:
        """Turn a loaded embedding table [vocab, hidden] into what `embedding` consumes."""

    def prepare_vector(self, w: WeightTensor) -> Any:
        """Norm weights and biases: always float."""
        return self.asarray(w.to_float32())

    # ---- ops ----
    @abc.abstractmethod
    def embedding(self, table: Any, ids: Any) -> Any: ...

    @abc.abstractmethod
    def linear(self, x: Any, w: Any, bias: Any = None) -> Any: ...

    @abc.abstractmethod
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...

    def add_rms_norm(self, x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """residual <- residual + x; returns (rms_norm(residual), residual). Fused where it pays."""
        residual = self.add(residual, x)
        return self.rms_norm(residual, weight, eps), residual

    @abc.abstractmethod
    def add(self, a: Any, b: Any) -> Any: ...

    @abc.abstractmethod
    def rope(self, x: Any, positions: Any, cos_sin: Any, neox: bool) -> Any: ...

    @abc.abstractmethod
    def silu_mul(self, gate_up: Any) -> Any: ...

    @abc.abstractmethod
    def store_kv(self, k_cache: Any, v_cache: Any, k: Any, v: Any, slot_mapping: Any) -> None: ...

    @abc.abstractmethod
    def attention_prefill(self, q: Any, k_cache: Any, v_cache: Any, block_tables: Any,
                          cu_seqlens_q: Any, context_lens: Any, scale: float) -> Any: ...

    def attention_prefill_fresh(self, q: Any, k: Any, v: Any, seq_lens: tuple[int, ...], scale: float) -> Any:
        """Causal attention of sequences that have no cached prefix, over their own k, v
        [T, KVH, D] (seq_lens: host lengths, summing to T), or None when this backend has no
        faster path than attention_prefill over the paged cache (the default)."""
        return None

    def specialise(self, gemm_shapes, attention_heads, progress=None) -> None:
        """Prepare kernels specialised for one model: its weight shapes [N, K] and its
        (heads, kv heads, head dim). A backend without such kernels does nothing (the default)."""

    @abc.abstractmethod
    def attention_decode(self, q: Any, k_cache: Any, v_cache: Any, block_tables: Any,
                         context_lens: Any, scale: float) -> Any: ...

    # ---- KV compression (engine/kv_policy.py) ----
    def copy_kv_rows(self, k_cache: Any, v_cache: Any, src_slots: Any, dst_slots: Any) -> None:
        """cache.reshape(-1, KVH, D)[dst_slots] = cache.reshape(-1, KVH, D)[src_slots] for both
        caches, in place: every source row is read before any destination is written (a
        compaction may move rows within one block); destinations are distinct."""
        raise NotImplementedError(f"the {self.name} backend cannot move KV rows (copy_kv_rows)")

    supports_key_mass: ClassVar[bool] = False

    def attention_key_mass(self, q: Any, k_cache: Any, block_tables: np.ndarray, cu_seqlens_q: np.ndarray,
                           context_lens: np.ndarray, seqs: np.ndarray, scale: float) -> list[np.ndarray]:
        """For each sequence s in `seqs` (host arrays: the step's tables and lengths), the
        attention mass each of its cache rows receives from its query rows of this step:
        sum over query rows i and heads h of softmax_j(scale * q[i, h] . k[j]) (causal: query i of a
        q_len-token chunk sees rows 0..context_len - q_len + i), as float64 [context_lens[s]].
        The H2O policy sums it over layers and steps. Backends with supports_key_mass only."""
        raise NotImplementedError(f"the {self.name} backend does not compute attention mass per key")

    # ---- info for measurements ----
    def memory_bandwidth_gbs(self) -> float | None:
        """Memory bandwidth of this backend's device, GB/s (None: not measured).

        The one bandwidth probe (GB/s, 1e9 B/s) of the device this backend computes on, measured in
        this process, that every roofline divides by (mojollm.measure.device_bandwidth reads it).
        An implementation measures its own device, caches the figure, and says in its docstring's
        first line how it measures (reports quote that line). None: unknown."""
        return None
