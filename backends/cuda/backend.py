"""The cuda backend: Mojo GPU kernels (backends/cuda/gpu_*.mojo) on torch CUDA tensors.

Tensors are torch tensors on one CUDA device: activations float32, KV caches in any of
mojollm.kv_dtypes' formats (float32, bfloat16, float16; int8 / fp8 as uint8 rows of D codes and a
float32 scale, quantized by store_kv and read by the attention kernels as they are),
weights kept in their stored precision (float32, bfloat16, float16) or GGUF-quantized (Q4_0, Q4_1,
Q8_0, repacked on the device so every block's nibbles are one aligned 16-byte load; Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K in gpu_kquant's layouts, see repack_gguf_kquant; Q2_K / Q3_K are widened at load) or FP8
E4M3 blocks (linears tiled for gpu_linear.gemv_f8_kernel's tensor cores, see f8_tiles; embedding
tables repacked as Q8_0).

How the kernels reach torch's memory and streams (verified on an H100 with torch 2.11):
  * Mojo's DeviceContext binds the device's primary CUDA context, the one torch uses, so a
    tensor's data_ptr() is passed to the kernels as is: no copies, no DLPack.
  * The process keeps ONE DeviceContext (creating one costs milliseconds).
  * Every kernel is launched on torch's *current* stream (its raw handle is passed with each
    call), so Mojo kernels and torch ops are ordered on one stream and `torch.cuda.graph`
    captures Mojo launches like its own ops (a whole decode step replays from one graph).
  * Torch's legacy default stream (handle 0) cannot be wrapped by Mojo, so the backend makes its
    own context's stream torch's current stream (`torch.cuda.set_stream`) on every thread that
    calls it while the current stream is the legacy default one. Work queued on the default stream
    before the backend was created is waited for once, in __init__.
  * A launch from Python costs about 6.5 us; graph replay removes that for decode.

Data-dependent indices (token ids, slots, block ids, positions, sequence lengths) are checked on
the device: kernels skip out-of-range entries and raise flags that `to_numpy` / `synchronize`
turn into a ValueError (a host check would cost a synchronisation per op).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import warnings
from typing import Any

import numpy as np

from mojollm.backends.base import Backend, Probe
from mojollm.weights import BLOCK_BYTES, QK, WeightTensor

_log = logging.getLogger("mojollm.cuda")

_MODULE = "gpu_ops"
_LIBRARY = "gpu_library"  # Modular's linalg / nn kernels, specialised per model (gpu_library.mojo)
_LIBRARY_GEMM_SLOTS = 8  # static weight shapes one gpu_library build holds
_LIBRARY_HEAD_DIMS = (64, 128)  # flash attention head dims built and tested here
# Token counts at which a specialised [N, K] is timed against the dynamic-shape GEMM at load (the
# last stands for every larger M). Below the first, the static-shape GEMM is never used: on the
# H200 at 2-16 tokens it splits K with results that differ call to call, corrupts other memory
# (inf in unrelated tensors, then illegal addresses) and replays wrong from a CUDA graph; from
# 256 tokens it ran 1.0-1.2x torch.matmul where the dynamic path (cuBLAS) ran 0.75-0.9x.
_TUNE_M = (256, 512, 1024)
# The kernel ABI (gpu_common.mojo defines the same codes; tests/test_kernel_abi.py checks them).
_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}  # DT_F32, DT_BF16, DT_F16
# KV caches: store_kv takes the cache's code (the float ones are _DTYPE_CODES'), the attention
# entries a (q, cache) pair code (gpu_ops.mojo)
_KV_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "int8": 3, "fp8": 4}  # .., KV_I8, KV_FP8
_KV_PAIRS = {("float32", "float32"): 0, ("float32", "bfloat16"): 1, ("bfloat16", "bfloat16"): 2,
             ("float32", "float16"): 3, ("float32", "int8"): 4, ("float32", "fp8"): 5}
_QCODES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 3, "Q5_1": 4, "Q4_K": 5, "Q5_K": 6, "Q6_K": 7, "F8_E4M3": 8,
           "W8A8": 9}
_KQUANTS = ("Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # gpu_kquant's kernels (the others: gpu_linear's)
_ERRORS = (  # (gpu_common's flag word, message), in word order
    ("ERR_TOKEN", "token ids outside the embedding table"),
    ("ERR_SLOT", "a slot in slot_mapping lies outside the KV cache"),
    ("ERR_BLOCK", "a block id in block_tables lies outside the KV cache"),
    ("ERR_POSITION", "a position lies outside the RoPE cos/sin table"),
    ("ERR_CONTEXT", "cu_seqlens_q / context_lens are inconsistent (a context shorter than its new tokens, "
                    "longer than its block table, or query rows outside q)"),
)
_ERR_WORDS = 8
_GEMV_MAX_TOKENS = 8  # dense weights: up to this many tokens read W once per 8 tokens (GEMV)
_QGEMV_MAX_TOKENS = 64  # quantized: re-reading small blocks beats dequantizing the matrix
_SIMT_HEAD_DIMS = (32, 64, 80, 96, 128)
_MMA_HEAD_DIMS = (64, 128)


def _torch():
    import torch

    return torch


class DenseWeight:
    """A linear/embedding weight [N, K] as a torch tensor (float32, bfloat16 or float16)."""

    __slots__ = ("w", "n", "k")

    def __init__(self, w):
        self.w = w
        self.n, self.k = int(w.shape[0]), int(w.shape[1])

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


class QuantWeight:
    """A GGUF-quantized weight [N, K] on the device. Q4_0/Q4_1/Q8_0 (and F8_E4M3 embedding tables)
    repacked: qs [N, K/32, 16|32] uint8, d (m) [N, K/32] float16; F8_E4M3 linears tiled (f8_tiles:
    qs [ceil(N/16), K/32, 544] uint8, d None); the other types as repack_gguf_kquant lays them out
    (h: Q5_x's high bits). W8A8: Q8_0's repack; decode runs Q8_0's GEMV on activations quantized
    per token, prefill cuBLASLt's int8 GEMM with row_scale."""

    __slots__ = ("qtype", "code", "qs", "d", "m", "h", "n", "k", "row_scale")

    def __init__(self, qtype, qs, d, m, n, k, h=None, row_scale=None):
        self.qtype, self.code = qtype, _QCODES[qtype]
        self.qs, self.d, self.m, self.h, self.n, self.k = qs, d, m, h, n, k
        self.row_scale = row_scale  # W8A8: float32 [N], for the int8 GEMM of prefill

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m, self.h) if t is not None)

    def ptrs(self) -> tuple[int, int, int, int]:
        """(qs, d, m, h) addresses; an absent array passes another one's (the kernels never read it)."""
        d = self.d if self.d is not None else self.qs
        return (self.qs.data_ptr(), d.data_ptr(), (self.m if self.m is not None else d).data_ptr(),
                (self.h if self.h is not None else d).data_ptr())


def row_scales(w: WeightTensor) -> np.ndarray | None:
    """float32 [N]: the one scale each row of Q8_0-layout blocks repeats (W8A8 as quantize writes
    it), else None (per-block scales: an int8 GEMM with per-row scales cannot apply them)."""
    rows, k = int(w.shape[0]), int(w.shape[1])
    d = np.asarray(w.data, dtype=np.uint8).reshape(rows, k // 32, 34)[:, :, :2].copy().view("<f2").reshape(rows, -1)
    return d[:, 0].astype(np.float32) if (d == d[:, :1]).all() else None


def repack_gguf_blocks(w: WeightTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GGUF rows of blocks -> (qs [N, nb, 16 or 32] uint8, d [N, nb] f16, m [N, nb] f16 or None)."""
    rows = int(np.prod(w.shape[:-1]))
    nb = w.shape[-1] // QK
    blocks = np.asarray(w.data, dtype=np.uint8).reshape(rows, nb, BLOCK_BYTES[w.qtype])

    def f16(lo):
        return np.ascontiguousarray(blocks[:, :, lo:lo + 2]).view(np.float16).reshape(rows, nb)

    if w.qtype == "Q4_0":
        return np.ascontiguousarray(blocks[:, :, 2:18]), f16(0), None
    if w.qtype == "Q4_1":
        return np.ascontiguousarray(blocks[:, :, 4:20]), f16(0), f16(2)
    return np.ascontiguousarray(blocks[:, :, 2:34]), f16(0), None  # Q8_0, F8_E4M3: 32 code bytes


def f8_tiles(torch, qs, d):
    """FP8 E4M3 rows on the device, codes qs [N, K/32, 32] uint8 and scales d [N, K/32] float16 ->
    gpu_linear.gemv_f8_kernel's tiles [ceil(N/16), K/32, 544] uint8: per (16-row tile, 32-block) the
    512 code bytes in mma.sync's A-fragment order (lane g * 4 + c: codes 8c .. 8c + 7 of row g, then
    of row g + 8) and 8 words (d of row g | d of row g + 8 << 16). Rows past N: zero codes and scales."""
    n, nb = int(qs.shape[0]), int(qs.shape[1])
    n16 = -(-n // 16)
    if n16 * 16 != n:
        qs = torch.cat([qs, qs.new_zeros((n16 * 16 - n, nb, 32))])
        d = torch.cat([d, d.new_zeros((n16 * 16 - n, nb))])
    codes = qs.reshape(n16, 2, 8, nb, 4, 8).permute(0, 3, 2, 4, 1, 5).reshape(n16, nb, 512)
    scales = d.reshape(n16, 2, 8, nb).permute(0, 3, 2, 1).contiguous().view(torch.uint8).reshape(n16, nb, 32)
    return torch.cat([codes, scales], dim=2).contiguous()


def repack_gguf_kquant(w: WeightTensor) -> tuple[np.ndarray, ...]:
    """GGUF rows of Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks -> (qs, d, m, h) in gpu_kquant's device
    layout (absent arrays None), every block 16-byte aligned and the same bytes in all:
      Q4_K, Q5_K: qs = the raw rows [N, row bytes] (144 / 176 B blocks);
      Q6_K: qs [N, K/256, 208] (ql | qh | scales), d [N, K/256] float16 (the block's trailing d);
      Q5_0, Q5_1: qs [N, K/32, 16] (nibbles), h [N, K/32] int32 (the high-bit words), d (m) [N, K/32]
      float16."""
    rows = int(np.prod(w.shape[:-1]))
    bb = BLOCK_BYTES[w.qtype]
    raw = np.asarray(w.data, dtype=np.uint8).reshape(rows, -1)
    if w.qtype in ("Q4_K", "Q5_K"):
        return np.ascontiguousarray(raw), None, None, None
    blocks = raw.reshape(rows, -1, bb)
    nb = blocks.shape[1]

    def field(lo, n, dt):
        return np.ascontiguousarray(blocks[:, :, lo:lo + n]).view(dt).reshape(rows, nb)

    if w.qtype == "Q6_K":
        return np.ascontiguousarray(blocks[:, :, :208]), field(208, 2, np.float16), None, None
    if w.qtype == "Q5_0":  # f16 d | u32 qh | 16 B qs
        return np.ascontiguousarray(blocks[:, :, 6:22]), field(0, 2, np.float16), None, field(2, 4, np.int32)
    if w.qtype == "Q5_1":  # f16 d | f16 m | u32 qh | 16 B qs
        return (np.ascontiguousarray(blocks[:, :, 8:24]), field(0, 2, np.float16), field(2, 2, np.float16),
                field(4, 4, np.int32))
    raise ValueError(f"no device layout for {w.qtype}")


def library_defines(gemm_shapes, attention_heads, nvidia: bool = True) -> dict[str, int]:
    """The -D defines of one model's gpu_library build: its distinct weight shapes [N, K] (the
    largest first, at most _LIBRARY_GEMM_SLOTS: the rest take the dynamic-shape GEMM) and its
    (heads, kv heads, head dim) when flash attention supports them. Used at load and by
    `mojollm build --model`, so both build the same module."""
    defines: dict[str, int] = {}
    # TMA wants 16-byte rows: other shapes stay on the dynamic path.
    shapes = sorted({(int(n), int(k)) for n, k in gemm_shapes if int(n) % 8 == 0 and int(k) % 8 == 0},
                    key=lambda nk: -nk[0] * nk[1])
    for i, (n, k) in enumerate(shapes[:_LIBRARY_GEMM_SLOTS]):
        defines[f"MOJOLLM_GEMM{i}_N"], defines[f"MOJOLLM_GEMM{i}_K"] = n, k
    if attention_heads is not None and nvidia:
        h, kvh, d = (int(x) for x in attention_heads)
        if d in _LIBRARY_HEAD_DIMS and kvh > 0 and h % kvh == 0:
            defines.update(MOJOLLM_ATTN_H=h, MOJOLLM_ATTN_KVH=kvh, MOJOLLM_ATTN_D=d)
    return defines


def _cuda_target(torch, index: int):
    from mojollm.kernels.build import Target

    major, minor = torch.cuda.get_device_capability(index)
    return Target("cuda", f"sm_{major}{minor}")


def _kernel_problem(target) -> str:
    """Why the kernel module cannot be had for `target` ('' when it can): prebuilt or buildable."""
    prebuilt = os.environ.get("MOJOLLM_KERNEL_DIR")
    if prebuilt and os.path.isfile(os.path.join(prebuilt, target.dirname, f"{_MODULE}.so")):
        return ""
    try:
        from mojollm.kernels.build import compiler_version, find_mojo

        compiler_version(find_mojo())
    except Exception as e:  # KernelBuildError: no compiler and no prebuilt module
        return f"no prebuilt {target} kernels and {e}"
    return ""


class CudaBackend(Backend):
    name = "cuda"
    # What the probe looks for; the rocm backend, which shares everything else, changes these.
    _device_nodes = "/dev/nvidia*"
    _absent = "no CUDA device"
    _torch_hint = "pip install 'mojollm[cuda]'"
    _needs_hip = False

    @staticmethod
    def _device_target(torch, index: int):
        return _cuda_target(torch, index)

    @classmethod
    def probe(cls) -> Probe:
        # Keep `mojollm backends` fast on machines without a GPU: no torch import unless a device node exists.
        if not glob.glob(cls._device_nodes):
            return Probe(cls.name, False, "", cls._absent)
        try:
            torch = _torch()
        except ImportError:
            return Probe(cls.name, False, "", f"torch not installed ({cls._torch_hint})")
        if bool(getattr(torch.version, "hip", None)) != cls._needs_hip:
            return Probe(cls.name, False, "", "torch is a ROCm build (use the rocm backend)" if not cls._needs_hip
                         else "torch is not a ROCm build (torch.version.hip is None)")
        if not torch.cuda.is_available():
            return Probe(cls.name, False, "", f"{cls._absent} (torch.cuda.is_available() is False)")
        problem = _kernel_problem(cls._device_target(torch, 0))
        if problem:
            return Probe(cls.name, False, "", problem)
        return Probe(cls.name, True, torch.cuda.get_device_name(0), "")

    def __init__(self, device_index: int = 0):
        from mojollm.kernels.build import load_module

        torch = _torch()
        self.torch = torch
        self.index = device_index
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.target = self._device_target(torch, device_index)
        # NVIDIA: tensor-core paths (Modular's GEMM, our mma.sync attention tiles); AMD runs the
        # portable SIMT kernels.
        self.nvidia = self.target.kind == "cuda"
        self._k = load_module(_MODULE, backend="cuda", target=self.target)
        self._gpu = self._k.GpuState()
        # Modular's kernels: the dynamic-shape GEMM now; static shapes and attention per model
        # (specialise). They wrap gpu_ops' DeviceContext, so they launch on its own stream.
        self._ctx_ptr = int(self._gpu.device_context())
        self._lib = self._load_library(None) if self.nvidia else None  # AMD: compile-checked, untested
        self._lib_gemm: dict[tuple[int, int], Any] = {}
        self._lib_attn: dict[tuple[int, int, int], Any] = {}
        torch.cuda.synchronize(self.device)  # work queued on the legacy stream before us is done
        self._own_handle = int(self._gpu.own_stream())
        self._stream = torch.cuda.ExternalStream(self._own_handle, device=self.device)
        self._raw_stream = torch._C._cuda_getCurrentRawStream
        torch.cuda.set_stream(self._stream)
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._err = torch.zeros(_ERR_WORDS, dtype=torch.int32, device=self.device)
        self._err_ptr = self._err.data_ptr()
        self._bandwidth: float | None = None
        self._rows_cache: dict[int, int] = {}
        self._dtypes = {None: torch.float32, "float32": torch.float32, "int32": torch.int32,
                        "int64": torch.int64, "bfloat16": torch.bfloat16, "float16": torch.float16,
                        "uint8": torch.uint8}
        self._codes = {getattr(torch, name): code for name, code in _DTYPE_CODES.items()}

    @property
    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.device)

    # ---- streams and errors ----
    def _s(self) -> int:
        """Handle of torch's current stream, made a real stream first if it is the legacy one."""
        h = self._raw_stream(self.index)
        if h == 0:
            self.torch.cuda.set_stream(self._stream)
            h = self._own_handle
        return h

    @property
    def stream(self):
        """The torch stream the backend runs on by default. Modular's kernels launch on it
        whatever torch's current stream is (joined by events), so capture graphs on it."""
        return self._stream

    def _on_own_stream(self, s: int, launch) -> None:
        """Run `launch` (a gpu_library call, which enqueues on the context's own stream) ordered
        after and before the work of torch's current stream `s` (events; they also join a graph
        being captured on `s`)."""
        if s == self._own_handle:
            launch()
            return
        cur = self.torch.cuda.current_stream(self.device)
        self._stream.wait_stream(cur)
        launch()
        cur.wait_stream(self._stream)

    # ---- Modular's kernel library ----
    def _load_library(self, defines, progress=None):
        from mojollm.kernels.build import load_module

        return load_module(_LIBRARY, backend="cuda", target=self.target, progress=progress, defines=defines)

    def specialise(self, gemm_shapes, attention_heads, progress=None) -> None:
        """Build (or load from the cache / MOJOLLM_KERNEL_DIR) Modular's kernels specialised for
        one model: the bf16 GEMM of each weight shape [N, K] (its fast Hopper path needs N and K
        at compile time) and flash attention for its (heads, kv heads, head dim). Without a
        compiler or a prebuilt module the dynamic-shape GEMM and our own attention serve."""
        from mojollm.errors import KernelBuildError
        from mojollm.kernels.build import specialisation_tag

        if self._lib is None or os.environ.get("MOJOLLM_CUDA_SPECIALISE", "1") == "0":
            return
        defines = library_defines(gemm_shapes, attention_heads, self.nvidia)
        if not defines:
            return
        try:
            mod = self._load_library(defines, progress)
        except KernelBuildError as e:
            warnings.warn(f"no {specialisation_tag(defines)} specialisation of Modular's kernels for this model "
                          f"({e}); using the dynamic-shape GEMM and our own attention. Build it with "
                          f"`mojollm build --model MODEL --target {self.target}`", stacklevel=2)
            return
        gemms, heads = mod.shapes(())
        for n, k in ((int(n), int(k)) for n, k in gemms):
            if (n, k) not in self._lib_gemm:
                self._lib_gemm[(n, k)] = (mod, self._tune_static(mod, n, k))
        if int(heads[0]):
            h, kvh, d = (int(x) for x in heads)
            self._lib_attn[(h, kvh, d)] = mod
            # First call now (PTX JIT, ~0.5 s), not in the first request.
            z = lambda n: self.torch.zeros(16, n, d, device=self.device, dtype=self.torch.bfloat16)  # noqa: E731
            self.attention_prefill_fresh(z(h), z(kvh), z(kvh), (16,), d ** -0.5)
        if progress is not None:
            progress("static-shape GEMMs: " + ", ".join(
                f"[{n}, {k}] for M in {sorted(ms) or 'none'}" for (n, k), (_, ms) in self._lib_gemm.items()))

    def _tune_static(self, mod, n: int, k: int) -> frozenset[int]:
        """The _TUNE_M token counts at which the static-shape build of [N, K] beats the dynamic
        GEMM and gives the same bits twice (its first calls also JIT it here, not in a request)."""
        torch = self.torch
        s = self._s()
        m_max = _TUNE_M[-1]
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(m_max, k, device=self.device, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=self.device, dtype=torch.bfloat16, generator=g)
        c, c2 = self._empty((m_max, n)), self._empty((m_max, n))
        wins = set()
        for m in _TUNE_M:
            def run(static, out, m=m):
                args = (self._ctx_ptr, out.data_ptr(), a.data_ptr(), w.data_ptr(), m, n, k, 1, int(static))
                self._on_own_stream(s, lambda: mod.gemm(args) if static else self._lib.gemm(args))

            times = {}
            for static in (True, False):
                run(static, c)  # first call: JIT / warm-up
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                for i in range(0, 4, 2):
                    ev[i].record()
                    run(static, c)
                    ev[i + 1].record()
                ev[-1].synchronize()
                times[static] = min(ev[i].elapsed_time(ev[i + 1]) for i in range(0, 4, 2))
            run(True, c)
            run(True, c2)
            self.torch.cuda.synchronize(self.device)
            if times[True] < times[False] and bool(torch.equal(c[:m], c2[:m])):
                wins.add(m)
        return frozenset(wins)

    @property
    def error_flags(self):
        """The device words the kernels raise on bad indices (a runner copies them with its outputs)."""
        return self._err

    def _check_errors(self) -> None:
        self.raise_error_flags(self._err.cpu())

    def raise_error_flags(self, flags) -> None:
        """Raise for the flags read back from error_flags (host tensor); clears them on the device."""
        if bool(flags.any()):
            self._err.zero_()
            msgs = [m for i, (_, m) in enumerate(_ERRORS) if int(flags[i])]
            raise ValueError("invalid input to a cuda kernel: " + "; ".join(msgs))

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self._check_errors()

    # ---- memory ----
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        if dtype not in self._dtypes:
            raise ValueError(f"unsupported dtype {dtype!r}: use float32, int32, int64 or bfloat16")
        self._s()
        torch = self.torch
        want = self._dtypes[dtype]
        if want == torch.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device).to(want)
        np_dtype = {torch.float32: np.float32, torch.int32: np.int32, torch.int64: np.int64,
                    torch.float16: np.float16, torch.uint8: np.uint8}[want]
        return torch.from_numpy(np.array(a, dtype=np_dtype, copy=True, order="C")).to(self.device)

    def to_numpy(self, t: Any) -> np.ndarray:
        self._s()
        host = t.detach()
        if host.dtype in (self.torch.bfloat16, self.torch.float16):
            host = host.float()
        out = host.cpu().numpy()  # synchronises the stream
        self._check_errors()
        return out

    def zeros(self, shape, dtype: str = "float32") -> Any:
        if dtype not in self._dtypes or dtype is None:
            raise ValueError(f"unsupported dtype {dtype!r}: use float32, int32, int64 or bfloat16")
        self._s()
        return self.torch.zeros(tuple(shape), dtype=self._dtypes[dtype], device=self.device)

    def default_kv_cache_bytes(self) -> int:
        """Half of the device memory still free once the weights are loaded (vLLM takes 90% of
        the card; half leaves room for graphs, activations and a second model in the process)."""
        return max(1 << 30, self.free_memory_bytes() // 2)

    def default_batched_tokens(self) -> int:
        """8192 (vLLM's offline default): a GPU step of a few thousand tokens costs little more
        than one of 512, and a prompt in one chunk attends with flash attention over its own k, v
        instead of a paged cache (activations: ~1 GB at 8192 tokens of an 8B model)."""
        return 8192

    @staticmethod
    def kv_cache_dtype(weight_qtype: str) -> str:
        """bfloat16 unless the model is float32: decode attention reads half the bytes, and the
        attention kernels accumulate in float32 either way."""
        return "float32" if weight_qtype == "F32" else "bfloat16"

    def kv_cache_dtypes(self) -> tuple[str, ...]:
        """Every KV dtype of mojollm.kv_dtypes: store_kv converts (quantizes) on write, the decode
        and paged prefill kernels read float16 / int8 / fp8 rows as they are."""
        from mojollm.kv_dtypes import KV_CACHE_DTYPES

        return KV_CACHE_DTYPES

    def kv_cache_zeros(self, shape, kv_dtype: str):
        """A zeroed cache [num_blocks, B, KVH, W] of kv_dtype (mojollm.kv_dtypes). int8 and fp8 are
        both uint8 bytes, so the tensor carries its dtype as an attribute (`kv_dtype`) that the
        ops read (cache_kv_dtype); only these tensors, not views of them, carry it."""
        from mojollm.kv_dtypes import check_kv_cache_dtype, storage_dtype

        if check_kv_cache_dtype(kv_dtype) == "auto":
            raise ValueError("kv_cache_zeros needs a KV dtype, not auto")
        t = self.zeros(shape, storage_dtype(kv_dtype))
        t.kv_dtype = kv_dtype
        return t

    def cache_kv_dtype(self, cache) -> str:
        """The KV dtype of a cache tensor: its `kv_dtype` attribute (kv_cache_zeros), else its
        float element type; uint8 bytes without the attribute are refused (int8 or fp8?)."""
        torch = self.torch
        own = getattr(cache, "kv_dtype", None)
        if own is not None:
            return own
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        if isinstance(cache, torch.Tensor) and cache.dtype in names:
            return names[cache.dtype]
        dt = str(getattr(cache, "dtype", type(cache).__name__)).replace("torch.", "")
        raise ValueError(f"a {dt} KV cache must come from kv_cache_zeros (int8 and fp8 bytes carry no dtype)")

    def create_runner(self, model, max_num_seqs: int, max_model_len: int):
        from mojollm.backends.cuda.runner import CudaRunner

        return CudaRunner(model, max_num_seqs, max_model_len,
                          use_graphs=os.environ.get("MOJOLLM_CUDA_GRAPHS", "1") != "0")

    def free_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.mem_get_info(self.device)[0])

    def memory_bandwidth_gbs(self) -> float | None:
        """Device-to-device copy of 512 MiB, bytes read + written per second (median of 5)."""
        if self._bandwidth is None:
            torch = self.torch
            self._s()
            src = torch.empty(1 << 27, dtype=torch.float32, device=self.device).uniform_()
            dst = torch.empty_like(src)
            times = []
            for i in range(8):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src)
                b.record()
                b.synchronize()
                if i >= 3:
                    times.append(a.elapsed_time(b))
            self._bandwidth = 2 * src.nbytes / (sorted(times)[len(times) // 2] * 1e-3) / 1e9
        return self._bandwidth

    # ---- weights ----
    def prepare_linear(self, w: WeightTensor) -> Any:
        return self._prepare(w, row_layout=False)

    def _prepare(self, w: WeightTensor, row_layout: bool) -> Any:
        if len(w.shape) != 2:
            raise ValueError(f"weight {w.name} must be 2-D [out, in], got shape {w.shape}")
        self._s()
        with warnings.catch_warnings():  # memory-mapped checkpoints are read-only; .to(device) copies them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return self._prepare_linear(w, row_layout)

    def _prepare_linear(self, w: WeightTensor, row_layout: bool) -> Any:
        torch = self.torch
        if w.qtype == "W8A8":
            scale = row_scales(w) if w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0 else None
            if scale is not None:
                qs, d, _ = repack_gguf_blocks(w)
                up = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
                return QuantWeight("W8A8", up(qs), up(d), None, w.shape[0], w.shape[1], row_scale=up(scale))
            # per-block scales (or rows cuBLASLt's int8 GEMM cannot take): Q8_0's kernels, whose
            # activations are int8 per 32-block
            _log.warning("%s: W8A8 weight without one scale per row (or N, K not multiples of 8); it runs as "
                         "Q8_0", w.name)
            w = WeightTensor(w.name, w.shape, "Q8_0", w.data)
        if w.is_quantized and w.qtype not in _QCODES:  # no kernel for it (Q2_K, Q3_K): float32 at load
            w = WeightTensor.from_float(w.name, w.to_float32())
        if w.is_quantized:
            up = lambda a: torch.from_numpy(a).to(self.device) if a is not None else None  # noqa: E731
            if w.qtype in _KQUANTS:
                qs, d, m, h = repack_gguf_kquant(w)
                return QuantWeight(w.qtype, up(qs), up(d), up(m), w.shape[0], w.shape[1], h=up(h))
            qs, d, m = repack_gguf_blocks(w)
            if w.qtype == "F8_E4M3" and not row_layout:  # a linear: gemv_f8_kernel's tiles
                return QuantWeight(w.qtype, f8_tiles(torch, up(qs), up(d)), None, None, w.shape[0], w.shape[1])
            return QuantWeight(w.qtype, up(qs), up(d), up(m), w.shape[0], w.shape[1])
        if w.qtype == "BF16":
            bits = np.ascontiguousarray(w.data, dtype=np.uint16).reshape(w.shape).view(np.int16)
            return DenseWeight(torch.from_numpy(bits).to(self.device).view(torch.bfloat16))
        if w.qtype == "F16":
            return DenseWeight(torch.from_numpy(np.ascontiguousarray(w.data, dtype=np.float16).reshape(w.shape))
                               .to(self.device))
        return DenseWeight(torch.from_numpy(np.ascontiguousarray(w.data, dtype=np.float32).reshape(w.shape))
                           .to(self.device))

    def prepare_embedding(self, w: WeightTensor) -> Any:
        # rows as stored (F8_E4M3 included: the embedding kernel reads whole rows, not tiles)
        return self._prepare(w, row_layout=True)

    def prepare_linear_tensor(self, t) -> DenseWeight:
        """A torch [N, K] float32/bfloat16/float16 tensor on this device used as is (no copy)."""
        self._tensor("weight", t, ndim=2, dtypes=tuple(self._codes))
        return DenseWeight(t)

    # ---- validation helpers ----
    def _tensor(self, name, t, ndim=None, dtypes=None, writable=False):
        torch = self.torch
        if not isinstance(t, torch.Tensor) or not t.is_cuda or t.get_device() != self.index:
            raise ValueError(f"{name} must be a torch tensor on {self.device}, got {type(t).__name__}"
                             + (f" on {t.device}" if isinstance(t, torch.Tensor) else ""))
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                             f"got {str(t.dtype).replace('torch.', '')}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return t

    def _f32(self, name, t, ndim=None):
        return self._tensor(name, t, ndim, (self.torch.float32,))

    def _idx(self, name, t, dtype, length=None):
        self._tensor(name, t, 1, (dtype,))
        if length is not None and t.shape[0] != length:
            raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
        return t

    def _empty(self, shape, dtype=None):
        return self.torch.empty(shape, dtype=dtype or self.torch.float32, device=self.device)

    # ---- ops ----
    def embedding(self, table, ids):
        torch = self.torch
        s = self._s()
        self._idx("ids", ids, torch.int32)
        T = ids.shape[0]
        out = self._empty((T, table.k))
        if T == 0:
            return out
        if isinstance(table, QuantWeight):
            if table.qtype == "F8_E4M3" and table.d is None:
                raise ValueError("embedding table must come from prepare_embedding (FP8 linears are tiled)")
            qs, d, m, h = table.ptrs()
            self._k.embedding_quant(self._gpu, (s, table.code, qs, d, m, ids.data_ptr(), out.data_ptr(),
                                                self._err_ptr, T, table.n, table.k, h))
        elif isinstance(table, DenseWeight):
            self._k.embedding_dense(self._gpu, (s, self._codes[table.w.dtype], table.w.data_ptr(), ids.data_ptr(),
                                                out.data_ptr(), self._err_ptr, T, table.n, table.k))
        else:
            raise ValueError("embedding table must come from prepare_embedding")
        return out

    def linear(self, x, w, bias=None):
        """y [T, N] float32 = x [T, K] @ W.T (+ bias). x float32, or bfloat16 (what the library's
        prefill attention returns): tensor-core GEMMs take it as is, other paths widen it."""
        torch = self.torch
        s = self._s()
        self._tensor("x", x, 2, (torch.float32, torch.bfloat16))
        if not isinstance(w, (DenseWeight, QuantWeight)):
            raise ValueError("linear weight must come from prepare_linear")
        T, K = x.shape
        if K != w.k:
            raise ValueError(f"x has {K} features but the weight expects {w.k}")
        N = w.n
        if bias is not None:
            self._f32("bias", bias, 1)
            if bias.shape[0] != N:
                raise ValueError(f"bias has {bias.shape[0]} entries, expected {N}")
        if isinstance(w, QuantWeight) and w.row_scale is not None and T > _QGEMV_MAX_TOKENS:
            return self._gemm_w8a8(x, w, bias)
        if isinstance(w, QuantWeight) and w.qtype == "F8_E4M3" and w.d is not None:
            raise ValueError("FP8 linear weight must come from prepare_linear (tiled), not prepare_embedding")
        y = self._empty((T, N))
        if T == 0:
            return y
        if x.data_ptr() % 16:  # a row slice of a larger tensor: the kernels use 16-byte loads
            x = x.clone()
        has_bias = int(bias is not None)
        bptr = bias.data_ptr() if bias is not None else y.data_ptr()  # never read without has_bias
        # 16-bit weights: Modular's GEMM at every token count (at 1-8 tokens its GEMV kernels read
        # 1.1-1.5x faster than ours on the H200); quantized: our GEMV up to 64 tokens, then
        # dequantized to bf16 for Modular's GEMM.
        library = self._library_gemm_takes(w) and (isinstance(w, DenseWeight) or T > _QGEMV_MAX_TOKENS)
        if x.dtype != torch.float32 and not library:
            x = self._convert(s, x, torch.float32)
        if library:
            if isinstance(w, QuantWeight):  # dequantize to bf16, then the library's GEMM
                wt = self._empty((N, K), torch.bfloat16)
                qs, d, m, h = w.ptrs()
                self._k.dequant(self._gpu, (s, w.code, 1, qs, d, m, wt.data_ptr(), N, K, h))
            else:
                wt = w.w
            self.library_gemm(x if x.dtype == wt.dtype else self._convert(s, x, wt.dtype), wt, y)
            if bias is not None:
                self._k.add(self._gpu, (s, y.data_ptr(), bias.data_ptr(), y.data_ptr(), T * N, N))
            return y
        if isinstance(w, QuantWeight):
            qs, d, m, h = w.ptrs()
            if w.qtype == "F8_E4M3" and T <= _QGEMV_MAX_TOKENS and self.nvidia:
                # tensor cores: x as float16 32-blocks (T K halves) with a power-of-two scale each
                # (K/32 x T rounded up to 8 floats); one pass of 8, 16, 32 or 64 tokens (n8 tiles), so
                # each weight is read once
                tiles = next(t for t in (1, 2, 4, 8) if 8 * t >= T)
                scratch = self._empty((T * K * 2 + (K // 32) * (-(-T // 8) * 8) * 4,), torch.int8)
                self._k.gemv_f8(self._gpu, (s, tiles, x.data_ptr(), qs, bptr, y.data_ptr(), has_bias, T, N, K,
                                            scratch.data_ptr(), self._f8_warps(N)))
            elif T <= _QGEMV_MAX_TOKENS and w.qtype != "F8_E4M3":
                # x quantized per 32-block to int8 codes (T K bytes) + (dx, code sum) float32 pairs
                scratch = self._empty((T * K + T * (K // 32) * 8,), torch.int8)
                rows = self._kq_rows(N) if w.qtype in _KQUANTS else self._qgemv_rows(N)
                self._k.gemv_quant(self._gpu, (s, w.code, 1 if T == 1 else 8, x.data_ptr(), qs, d, m, bptr,
                                               y.data_ptr(), has_bias, T, N, K, rows, scratch.data_ptr(), h))
            else:
                dense = self._empty((N, K))
                self._k.dequant(self._gpu, (s, w.code, 0, qs, d, m, dense.data_ptr(), N, K, h))
                self._k.gemm_simt(self._gpu, (s, 0, x.data_ptr(), dense.data_ptr(), bptr, y.data_ptr(),
                                              has_bias, T, N, K))
            return y
        wt = w.w
        code = self._codes[wt.dtype]
        if T <= _GEMV_MAX_TOKENS:
            vw = 16 // wt.element_size()
            if K % vw == 0 and wt.data_ptr() % 16 == 0:
                rows = self._gemv_rows(N)
                grid = -(-(-(-N // rows)) // 8)
            else:
                rows, grid = 0, -(-N // 8)  # element loads, one warp per row
            self._k.gemv_dense(self._gpu, (s, code, 1 if T == 1 else 8, rows, x.data_ptr(), wt.data_ptr(), bptr,
                                           y.data_ptr(), has_bias, T, N, K, grid))
        else:
            self._k.gemm_simt(self._gpu, (s, code, x.data_ptr(), wt.data_ptr(), bptr, y.data_ptr(), has_bias, T, N, K))
        return y

    def _gemm_w8a8(self, x, w: QuantWeight, bias):
        """W8A8 prefill: per token dx = max|x| / 127, q = round-half-even(x * (1/dx)) (the rule of
        the cpu kernel and of quantize_q8_token_kernel); y = (q @ W_q^T in int32, cuBLASLt's int8
        tensor cores) * dx * row scale."""
        torch = self.torch
        xf = x.float()
        dx = xf.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(dx < 1e-30 / 127, torch.zeros_like(dx), 1 / dx)
        q = torch.round(xf * inv).to(torch.int8)
        y = torch._int_mm(q, w.qs.view(torch.int8).view(w.n, w.k).t()).float() * (dx * w.row_scale)
        return y + bias if bias is not None else y

    def _library_gemm_takes(self, w) -> bool:
        """Whether Modular's GEMM serves weight `w` (16-bit, or quantized and dequantized to bf16)."""
        if self._lib is None or w.k % 8:  # TMA / cuBLAS fast paths want 16-byte rows
            return False
        return isinstance(w, QuantWeight) or (w.w.dtype in (self.torch.bfloat16, self.torch.float16)
                                              and w.w.data_ptr() % 16 == 0)

    def _convert(self, s: int, x, dtype):
        out = self._empty(tuple(x.shape), dtype)
        if x.numel():
            self._k.convert(self._gpu, (s, self._codes[x.dtype], self._codes[dtype], x.data_ptr(), out.data_ptr(),
                                        x.numel()))
        return out

    def library_gemm(self, a, w, c, path: str | None = None) -> None:
        """c [M, N] float32 = a [M, K] @ w [N, K].T on Modular's GEMM (a, w both bfloat16 or both
        float16). path None: the static-shape build of [N, K] where this model has one and it won
        at this M when tuned at load, else the dynamic-shape one; "static" / "dynamic" force one
        (benchmarks)."""
        M, K = a.shape
        N = w.shape[0]
        code = self._codes[w.dtype]
        spec = self._lib_gemm.get((N, K)) if code == 1 else None
        if path is None:
            # Never inside a CUDA graph: the static-shape build's split-K workspace is allocated
            # per call, so a replay would write to memory freed after the capture (seen on the H200
            # as corrupted results and illegal addresses); cuBLAS behind the dynamic path is capture-safe.
            # And only at the token counts where it was verified at load (_tune_static: correct,
            # the same bits twice, faster): at others it can fault (an illegal address at
            # M = 385 for [2048, 8192] on the H200). Rows are covered by the largest verified
            # counts first; the remainder takes the dynamic GEMM.
            sizes = sorted(spec[1], reverse=True) if spec is not None else ()
            if not sizes or M < sizes[-1] or self.torch.cuda.is_current_stream_capturing():
                static_rows = []
            else:
                static_rows, done = [], 0
                for m in sizes:
                    while M - done >= m:
                        static_rows.append((done, m))
                        done += m
            if static_rows:
                a_row, c_row = K * a.element_size(), N * c.element_size()
                calls = [(spec[0], (self._ctx_ptr, c.data_ptr() + r0 * c_row, a.data_ptr() + r0 * a_row, w.data_ptr(),
                                    m, N, K, code, 1)) for r0, m in static_rows]
                r0 = sum(m for _, m in static_rows)
                if r0 < M:
                    calls.append((self._lib, (self._ctx_ptr, c.data_ptr() + r0 * c_row, a.data_ptr() + r0 * a_row,
                                              w.data_ptr(), M - r0, N, K, code, 0)))

                def launch():
                    for mod, args in calls:
                        mod.gemm(args)

                self._on_own_stream(self._s(), launch)
                return
            static = False
        elif path == "static":
            if spec is None:
                raise ValueError(f"no static-shape build of [{N}, {K}] (specialise first)")
            static = True
        else:
            static = False
        mod = spec[0] if static else self._lib
        args = (self._ctx_ptr, c.data_ptr(), a.data_ptr(), w.data_ptr(), M, N, K, code, int(static))
        self._on_own_stream(self._s(), lambda: mod.gemm(args))

    def _gemv_rows(self, n: int) -> int:
        """Rows per warp of the dense GEMV: each warp runs once over its rows (no grid-stride), so
        pick R for enough warps in flight (>= 20 per SM) and a full last wave (~40 warps fit per SM):
        the bandwidth of a memory-bound kernel follows the warps it keeps busy."""
        if n in self._rows_cache:
            return self._rows_cache[n]
        enough, resident = 20 * self.num_sms, 40 * self.num_sms
        best = (1, -1.0)
        for r in (4, 2, 1):
            warps = -(-n // r)
            if warps < enough and r > 1:
                continue
            waves = warps / resident
            eff = 1.0 if waves <= 1 else waves / math.ceil(waves)
            if eff > best[1] + 0.02:
                best = (r, eff)
        self._rows_cache[n] = best[0]
        return best[0]

    def _qgemv_rows(self, n: int) -> int:
        """Rows per block (of 128 threads splitting K) of the quantized GEMV: 4, so x is read once
        per 4 rows, unless that leaves fewer than 4 blocks per SM; then 1."""
        return 4 if -(-n // 4) >= 4 * self.num_sms else 1

    def _f8_warps(self, n: int) -> int:
        """Warps per block of the FP8 GEMV (a block per 16-row tile, its warps splitting K): 8 while
        the grid stays within one wave of 24 warps per SM (up to 16 tokens a warp keeps 8.7 KB of
        cp.async stages: 3 blocks of 8 or 6 of 4 warps fit an SM's shared memory), so a small
        layer still has every SM's loads in flight; else 4, whose smaller blocks leave a fuller
        last wave."""
        return 8 if -(-n // 16) * 8 <= 24 * self.num_sms else 4

    def _kq_rows(self, n: int) -> int:
        """Rows per warp of gpu_kquant's GEMV (4 warps a block, lanes splitting K): as many as keep
        >= 16 warps per SM (4 rows share each activation load), so large layers read x less often."""
        for r in (4, 2):
            if -(-n // r) >= 16 * self.num_sms:
                return r
        return 1

    def rms_norm(self, x, weight, eps):
        s = self._s()
        self._f32("x", x, 2)
        self._f32("weight", weight, 1)
        T, K = x.shape
        if weight.shape[0] != K:
            raise ValueError(f"weight has {weight.shape[0]} entries but x has {K} features")
        out = self._empty((T, K))
        if T:
            self._k.rms_norm(self._gpu, (s, x.data_ptr(), weight.data_ptr(), out.data_ptr(), T, K, float(eps)))
        return out

    def add_rms_norm(self, x, residual, weight, eps):
        s = self._s()
        self._f32("x", x, 2)
        self._f32("residual", residual, 2)
        self._f32("weight", weight, 1)
        if x.shape != residual.shape:
            raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
        T, K = x.shape
        if weight.shape[0] != K:
            raise ValueError(f"weight has {weight.shape[0]} entries but x has {K} features")
        out = self._empty((T, K))
        if T:
            self._k.add_rms_norm(self._gpu, (s, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                             T, K, float(eps)))
        return out, residual

    def add(self, a, b):
        s = self._s()
        self._f32("a", a)
        self._f32("b", b)
        if b.shape != a.shape and not (b.dim() == 1 and a.dim() >= 1 and b.shape[0] == a.shape[-1]):
            raise ValueError(f"b {tuple(b.shape)} must match a {tuple(a.shape)} or be one row of a's last dimension")
        out = self._empty(tuple(a.shape))
        n = a.numel()
        if n:
            self._k.add(self._gpu, (s, a.data_ptr(), b.data_ptr(), out.data_ptr(), n, b.numel()))
        return out

    def rope(self, x, positions, cos_sin, neox):
        torch = self.torch
        s = self._s()
        self._f32("x", x, 3)
        self._f32("cos_sin", cos_sin, 2)
        T, H, D = x.shape
        self._idx("positions", positions, torch.int32, T)
        P, R = cos_sin.shape
        if R < 2 or R % 2 or R > D:
            raise ValueError(f"cos_sin's rotary width {R} must be even, >= 2 and <= head_dim {D}")
        if T and H:
            self._k.rope(self._gpu, (s, int(bool(neox)), x.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(),
                                     self._err_ptr, T, H, D, R, P))
        return x

    def silu_mul(self, gate_up):
        s = self._s()
        self._f32("gate_up", gate_up, 2)
        T, F2 = gate_up.shape
        if F2 % 2:
            raise ValueError(f"gate_up's last dimension {F2} must be even (gate and up halves)")
        out = self._empty((T, F2 // 2))
        if T and F2:
            self._k.silu_mul(self._gpu, (s, gate_up.data_ptr(), out.data_ptr(), T, F2 // 2))
        return out

    def _cache_pair(self, k_cache, v_cache):
        """(num_blocks, B, KVH, D, kv dtype) of a pair of caches [num_blocks, B, KVH, W]."""
        from mojollm.kv_dtypes import QUANTIZED, row_width, storage_dtype

        self._tensor("k_cache", k_cache, 4)
        kv = self.cache_kv_dtype(k_cache)
        want = self._dtypes[storage_dtype(kv)]
        self._tensor("k_cache", k_cache, 4, (want,))
        self._tensor("v_cache", v_cache, 4, (want,))
        if self.cache_kv_dtype(v_cache) != kv:
            raise ValueError(f"k_cache ({kv}) and v_cache ({self.cache_kv_dtype(v_cache)}) differ in KV dtype")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        NB, B, KVH, W = (int(d) for d in k_cache.shape)
        D = W - row_width(kv, 0)
        if kv in QUANTIZED and (D <= 0 or D % 16 or D > 128):
            raise ValueError(f"an {kv} KV cache needs a head dim that is a multiple of 16 and at most 128 "
                             f"(rows of D + 4 bytes), got rows of {W} bytes")
        return NB, B, KVH, D, kv

    def store_kv(self, k_cache, v_cache, k, v, slot_mapping):
        """Writes k, v into the caches in their dtype: a cast (16-bit: round to nearest even), or
        int8 / fp8 rows quantized per (token, head) by gpu_elementwise.store_kv_quant_kernel."""
        torch = self.torch
        s = self._s()
        NB, B, KVH, D, kv = self._cache_pair(k_cache, v_cache)
        kdtypes = (torch.float32, torch.bfloat16) if kv == "bfloat16" else (torch.float32,)
        self._tensor("k", k, 3, kdtypes)
        self._tensor("v", v, 3, (k.dtype,))
        if k.shape != v.shape or tuple(k.shape[1:]) != (KVH, D):
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, {KVH}, {D}]")
        T = k.shape[0]
        self._idx("slot_mapping", slot_mapping, torch.int64, T)
        if T:
            kcode = self._codes[k.dtype]
            self._k.store_kv(self._gpu, (s, kcode, _KV_CODES[kv], k_cache.data_ptr(), v_cache.data_ptr(),
                                         k.data_ptr(), v.data_ptr(), slot_mapping.data_ptr(), self._err_ptr, T,
                                         KVH * D, NB * B, KVH))

    def copy_kv_rows(self, k_cache, v_cache, src_slots, dst_slots):
        """Base.copy_kv_rows with torch index ops on the current stream: index_select gathers
        every source row into a temporary before index_copy_ writes (a KV policy's compaction).
        A row is the slot's whole [KVH, W] (int8 / fp8: codes and scales move together)."""
        torch = self.torch
        self._s()
        NB, B, KVH, _, _ = self._cache_pair(k_cache, v_cache)
        self._idx("src_slots", src_slots, torch.int64)
        self._idx("dst_slots", dst_slots, torch.int64, src_slots.shape[0])
        if src_slots.shape[0] == 0:
            return
        for c in (k_cache, v_cache):
            rows = c.view(NB * B, KVH, c.shape[3])
            rows.index_copy_(0, dst_slots, rows.index_select(0, src_slots))

    def _attn_common(self, q, k_cache, v_cache, block_tables, nseq_name, nseq):
        torch = self.torch
        NB, B, KVH, D, kv = self._cache_pair(k_cache, v_cache)
        qdtypes = (torch.float32, torch.bfloat16) if kv == "bfloat16" else (torch.float32,)
        self._tensor("q", q, 3, qdtypes)
        if q.shape[2] != D:
            raise ValueError(f"q's head dim {q.shape[2]} differs from the cache's {D}")
        H = q.shape[1]
        if H % KVH:
            raise ValueError(f"query heads {H} must be a multiple of kv heads {KVH}")
        self._tensor("block_tables", block_tables, 2, (torch.int32,))
        if block_tables.shape[0] != nseq:
            raise ValueError(f"block_tables has {block_tables.shape[0]} rows but {nseq_name} describes {nseq} sequences")
        pair = _KV_PAIRS[("float32" if q.dtype == torch.float32 else "bfloat16", kv)]
        if q.data_ptr() % 16 or k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16:
            raise ValueError("q and the caches must be 16-byte aligned")
        return NB, B, KVH, D, H, pair

    def attention_prefill(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        torch = self.torch
        s = self._s()
        self._tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,))
        S = cu_seqlens_q.shape[0] - 1
        if S < 0:
            raise ValueError("cu_seqlens_q needs at least one entry")
        self._idx("context_lens", context_lens, torch.int32, S)
        NB, B, KVH, D, H, pair = self._attn_common(q, k_cache, v_cache, block_tables, "cu_seqlens_q", S)
        T = q.shape[0]
        G = H // KVH
        out = self._empty(tuple(q.shape), q.dtype)
        if T == 0 or S == 0:
            return out
        use_mma = self.nvidia and pair != 0 and D in _MMA_HEAD_DIMS and G <= 64
        if not use_mma:
            if D not in _SIMT_HEAD_DIMS:
                raise ValueError(f"head_dim {D} is not supported by the cuda attention kernels "
                                 f"(supported: {', '.join(map(str, _SIMT_HEAD_DIMS))})")
            if G > 32:
                raise ValueError(f"{G} query heads per kv head exceed the supported 32")
        rows = 64 if use_mma else 32
        per_tile = rows // G
        grid_x = -(-T // per_tile) + S  # >= sum over sequences of their query tiles
        self._k.attention_prefill(self._gpu, (
            s, int(use_mma), pair, D, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), cu_seqlens_q.data_ptr(), context_lens.data_ptr(), self._err_ptr,
            S, T, H, KVH, block_tables.shape[1], B, NB, float(scale), grid_x))
        return out

    def attention_prefill_fresh(self, q, k, v, seq_lens, scale):
        """Modular's flash attention, one causal call per sequence, when this model's heads have a
        specialised build (else None: attention_prefill serves). Returns bfloat16 [T, H, D]."""
        torch = self.torch
        T, H, D = q.shape
        KVH = k.shape[1]
        mod = self._lib_attn.get((H, KVH, D))
        if mod is None:
            return None
        s = self._s()
        bf = torch.bfloat16
        for name, t, heads in (("q", q, H), ("k", k, KVH), ("v", v, KVH)):
            self._tensor(name, t, 3, (torch.float32, bf))
            if tuple(t.shape) != (T, heads, D):
                raise ValueError(f"{name} must be [{T}, {heads}, {D}], got {tuple(t.shape)}")
        lens = [int(n) for n in seq_lens]
        if any(n < 1 for n in lens) or sum(lens) != T:
            raise ValueError(f"seq_lens {lens} must be positive and sum to the {T} rows of q")
        q, k, v = (t if t.dtype == bf else self._convert(s, t, bf) for t in (q, k, v))
        out = self._empty((T, H, D), bf)
        qrow, kvrow = H * D * 2, KVH * D * 2  # bytes per token
        calls, start = [], 0
        for n in lens:
            calls.append((self._ctx_ptr, out.data_ptr() + start * qrow, q.data_ptr() + start * qrow,
                          k.data_ptr() + start * kvrow, v.data_ptr() + start * kvrow, n, float(scale)))
            start += n

        def launch():
            for args in calls:
                mod.flash_attention(args)

        self._on_own_stream(s, launch)
        return out

    def decode_splits(self, num_seqs: int, kv_heads: int, max_context: int) -> tuple[int, int]:
        """(splits, keys per split) of the split-K decode: about 8 blocks (sequence, kv head, split)
        per SM, 2-3 of which are resident at once (shared memory), so a few waves with a short last
        one; at least 256 keys per split; splits on 64 keys (a block deals 16-key tiles round-robin
        to its 2-4 warps). The context bound is the block table's capacity, not the device-side
        lengths, so the launch does not depend on them (CUDA graphs)."""
        base = max(1, num_seqs * kv_heads)
        want = 1 if base >= 8 * self.num_sms else math.ceil(8 * self.num_sms / base)
        splits = max(1, min(want, math.ceil(max_context / 256)))
        chunk = max(64, math.ceil(math.ceil(max_context / splits) / 64) * 64)
        return max(1, math.ceil(max_context / chunk)), chunk

    def attention_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        torch = self.torch
        s = self._s()
        self._idx("context_lens", context_lens, torch.int32)
        S = context_lens.shape[0]
        NB, B, KVH, D, H, pair = self._attn_common(q, k_cache, v_cache, block_tables, "context_lens", S)
        if q.shape[0] != S:
            raise ValueError(f"q has {q.shape[0]} rows but context_lens describes {S} sequences")
        if D not in _SIMT_HEAD_DIMS:
            raise ValueError(f"head_dim {D} is not supported by the cuda attention kernels "
                             f"(supported: {', '.join(map(str, _SIMT_HEAD_DIMS))})")
        G = H // KVH
        if G > 16:
            raise ValueError(f"{G} query heads per kv head exceed the supported 16")
        if NB * B >= 2 ** 31:
            raise ValueError(f"a KV cache of {NB} x {B} token slots exceeds the decode kernel's 2^31")
        out = self._empty(tuple(q.shape), q.dtype)
        if S == 0:
            return out
        M = block_tables.shape[1]
        splits, chunk = self.decode_splits(S, KVH, M * B)
        if splits > 1:
            part_o = self._empty((S * H * splits * D,))
            part_lse = self._empty((S * H * splits,))
            po, pl = part_o.data_ptr(), part_lse.data_ptr()
        else:
            po = pl = out.data_ptr()  # unused with one split
        self._k.attention_decode(self._gpu, (
            s, pair, D, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), po, pl,
            block_tables.data_ptr(), context_lens.data_ptr(), self._err_ptr, S, H, KVH, M, B, NB, splits, chunk,
            float(scale)))
        if splits > 1:
            self._k.attention_combine(self._gpu, (s, 0 if q.dtype == torch.float32 else 1, po, pl, out.data_ptr(),
                                                  S * H, splits, D))
        return out
