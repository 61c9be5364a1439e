"""The tpu backend: mojollm's ops on JAX/XLA, with Pallas kernels on TPUs.

It runs on whatever device JAX has: TPU chips (Pallas kernels for decode attention and quantized
matmuls), else XLA:GPU or XLA:CPU with the jnp versions of the same maths (xla_ops.py). Every
device string says which ("tpu backend on XLA:CPU"). Nothing here is imported by `import mojollm`;
jax is imported only when this module is (probe() or the registry creating the backend).

Tensors. Float activations and weights are jax device arrays. Integer step metadata (token ids,
positions, slot mapping, block tables, sequence lengths) stays a read-only host numpy array from
`asarray`: the backend validates it on the host (no device sync), pads it to its shape bucket and
uploads it once per step (the upload is cached by array identity, so 30 layers share one copy).

KV caches. `zeros()` returns a `DeviceBuffer`, a mutable holder of one jax array, so `store_kv` can
keep the interface's in-place contract: it runs a jitted scatter with the old caches donated
(XLA reuses their memory, no copy per step) and swaps the new arrays into the holders. Every op
accepts holders and plain jax arrays alike.

Shape buckets (XLA compiles once per distinct static shape):
    context blocks M   attention takes block-table columns up to next_pow2(ceil(max context / B)),
                       so decode recompiles log2(context / B) times per batch shape, never per token
    prefill q window   next_pow2(longest new-token run of a sequence), processed in chunks of <= 256
    T, S               exact: they are the shapes of the model's activations, which the backend
                       does not own. Decode has T = S = sequences in the batch (one compile per
                       batch size); prefill compiles once per distinct chunk length. XLA's persistent
                       compilation cache (<mojollm cache>/xla) keeps these across processes.

Dtypes. Float weights are stored as bfloat16 on TPU and float32 elsewhere (MOJOLLM_TPU_DTYPE=
float32|bfloat16 overrides); activations, norms, attention and the KV cache stay float32, matmuls
accumulate in float32. GGUF Q4_0/Q4_1/Q8_0 weights become int8 + per-group float32 scales (+ mins)
on TPU (Pallas quantized matmul, 1 byte per weight in HBM); on CPU/GPU they are widened to the
float dtype at prepare time, because XLA:CPU runs the dequantize-in-the-loop graph 3-20x slower
than a dense matmul (MOJOLLM_TPU_QUANT=int|dense overrides).

Pallas. MOJOLLM_TPU_PALLAS=auto (default: Pallas kernels on TPU only) | interpret (Pallas kernels
in interpret mode on any device, for tests) | off (jnp everywhere).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mojollm.backends.base import Backend, Probe
from mojollm.weights import QK, WeightTensor

_INT_DTYPES = {"int32": np.int32, "int64": np.int64}
_PREFILL_Q_CHUNK = 256


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _platform_label(devices) -> str:
    """'TPU v5 lite x4' / 'XLA:CPU (no TPU: tpu backend on XLA:CPU)'."""
    d0 = devices[0]
    if d0.platform == "tpu":
        return f"{d0.device_kind} x{len(devices)}"
    xla = f"XLA:{d0.platform.upper()}"
    kind = f" {d0.device_kind}" if d0.platform != "cpu" else ""
    count = f" x{len(devices)}" if len(devices) > 1 else ""
    return f"{xla}{kind}{count} (no TPU: tpu backend on {xla})"


class DeviceBuffer:
    """A mutable holder of one jax array (what `zeros` returns): lets `store_kv` update a KV cache
    'in place' by swapping in the new array that a donated, jitted scatter produced."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    shape = property(lambda self: tuple(self.array.shape))
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.array)
        return a if dtype is None else a.astype(dtype)

    def __jax_array__(self):
        return self.array

    def __getitem__(self, index):
        return self.array[index]

    def reshape(self, *shape):
        return self.array.reshape(*shape)

    def __repr__(self):
        return f"DeviceBuffer({self.array.shape}, {self.array.dtype})"


@dataclass(frozen=True)
class DenseWeight:
    w: Any  # [N, K] float32 / bfloat16

    @property
    def shape(self):
        return tuple(self.w.shape)


@dataclass(frozen=True)
class QuantWeight:
    """Linear: q [K, N] int8 (K-major, so tiles split K into groups along sublanes), scales/mins
    [K // 32, N]. Embedding: q [V, H], scales/mins [V, H // 32] (rows gathered, then dequantized)."""

    q: Any
    scales: Any
    mins: Any | None
    qtype: str
    shape: tuple[int, int]  # logical [N, K] (linear) / [V, H] (embedding)


class TpuBackend(Backend):
    name = "tpu"

    @classmethod
    def probe(cls) -> Probe:
        try:
            import jax
        except ImportError:
            return Probe(cls.name, False, "", "jax not installed (pip install 'mojollm[tpu]')")
        try:
            devices = jax.devices()
        except Exception as e:  # a broken plugin or an unreachable TPU runtime
            return Probe(cls.name, False, "", f"jax cannot list devices: {type(e).__name__}: {e}")
        return Probe(cls.name, True, _platform_label(devices), "")

    def __init__(self):
        import jax
        import jax.numpy as jnp

        from mojollm.backends.tpu import xla_ops

        self._jax, self._jnp, self._ops = jax, jnp, xla_ops
        self.platform = jax.devices()[0].platform          # "tpu" | "gpu" | "cpu"
        self._device_label = _platform_label(jax.devices())
        on_tpu = self.platform == "tpu"

        pallas = os.environ.get("MOJOLLM_TPU_PALLAS", "auto").lower()
        if pallas not in ("auto", "interpret", "off"):
            raise ValueError(f"MOJOLLM_TPU_PALLAS={pallas!r}: expected auto, interpret or off")
        self.use_pallas = pallas == "interpret" or (pallas == "auto" and on_tpu)
        self.pallas_interpret = pallas == "interpret"

        dtype = os.environ.get("MOJOLLM_TPU_DTYPE", "bfloat16" if on_tpu else "float32").lower()
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"MOJOLLM_TPU_DTYPE={dtype!r}: expected float32 or bfloat16")
        self.weight_dtype = jnp.dtype(dtype)

        quant = os.environ.get("MOJOLLM_TPU_QUANT", "auto").lower()
        if quant not in ("auto", "int", "dense"):
            raise ValueError(f"MOJOLLM_TPU_QUANT={quant!r}: expected auto, int or dense")
        self.keep_quantized = quant == "int" or (quant == "auto" and (on_tpu or self.pallas_interpret))

        self._enable_compile_cache()
        self._uploads: OrderedDict = OrderedDict()
        self._last = None

        ops, jit = xla_ops, jax.jit
        self._embedding_dense = jit(ops.embedding_dense)
        self._embedding_quant = jit(ops.embedding_quant)
        self._linear_dense = jit(ops.linear_dense)
        self._linear_quant = jit(partial(ops.linear_quant, compute_dtype=self.weight_dtype))
        self._rms_norm = jit(ops.rms_norm, static_argnames=("eps",))
        self._add_rms_norm = jit(ops.add_rms_norm, static_argnames=("eps",))
        self._add = jit(lambda a, b: a + b)
        self._rope = jit(ops.rope, static_argnames=("neox",))
        self._silu_mul = jit(ops.silu_mul)
        self._store_kv = jit(ops.store_kv, donate_argnums=(0, 1))
        self._attn_decode = jit(ops.attention_decode, static_argnames=("scale",))
        self._attn_prefill = jit(ops.attention_prefill, static_argnames=("scale", "q_window", "q_chunk"))
        if self.use_pallas:
            from mojollm.backends.tpu import pallas_kernels

            self._pallas = pallas_kernels

    def _enable_compile_cache(self):
        """XLA's persistent compilation cache under the mojollm cache dir, unless the user set one."""
        if os.environ.get("MOJOLLM_TPU_COMPILE_CACHE", "1") == "0":
            return
        jax = self._jax
        try:
            if jax.config.jax_compilation_cache_dir is None:
                from mojollm.paths import cache_dir

                jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        except Exception:  # an old jax without the option: compile every process
            pass

    @property
    def device_name(self) -> str:
        return self._device_label

    def describe(self) -> str:
        """One line for reports: platform, dtypes and which kernels run."""
        kern = ("Pallas (interpret)" if self.pallas_interpret else "Pallas") if self.use_pallas else "jnp/XLA"
        quant = "int8+scales" if self.keep_quantized else f"widened to {self.weight_dtype.name}"
        return f"tpu backend on {self._device_label}: weights {self.weight_dtype.name}, GGUF quant {quant}, kernels {kern}"

    # ---- memory ----
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        if dtype in _INT_DTYPES:
            host = np.array(a, dtype=_INT_DTYPES[dtype], copy=True, order="C")
            host.setflags(write=False)   # read-only: uploads may be cached by identity
            return host
        if dtype not in (None, "float32"):
            raise ValueError(f"asarray: dtype {dtype!r} is not one of None, 'float32', 'int32', 'int64'")
        return self._jnp.asarray(np.asarray(a, dtype=np.float32))

    def to_numpy(self, t: Any) -> np.ndarray:
        t = _unwrap(t)
        if isinstance(t, np.ndarray):
            return np.array(t, copy=True)
        a = np.asarray(t)
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        return np.array(a, copy=True)

    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> Any:
        jnp = self._jnp
        if dtype in _INT_DTYPES:
            host = np.zeros(shape, dtype=_INT_DTYPES[dtype])
            host.setflags(write=False)
            return host
        if dtype != "float32":
            raise ValueError(f"zeros: dtype {dtype!r} is not one of 'float32', 'int32', 'int64'")
        return DeviceBuffer(jnp.zeros(shape, jnp.float32))

    def synchronize(self) -> None:
        if self._last is not None:
            self._jax.block_until_ready(self._last)

    def _out(self, x):
        self._last = x
        return x

    # ---- host metadata -> device (validated, bucketed, uploaded once) ----
    def _host_ints(self, a, what: str) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        a = _unwrap(a)
        try:
            return np.asarray(a)
        except Exception as e:
            raise ValueError(f"{what}: expected an integer array, got {type(a).__name__}") from e

    def _upload(self, a: np.ndarray, key: str, make):
        """Device copy of `make(a)`, cached while `a` (read-only) is the same object."""
        if a.flags.writeable:
            return self._jnp.asarray(make(a))
        k = (id(a), key)
        hit = self._uploads.get(k)
        if hit is not None and hit[0] is a:
            self._uploads.move_to_end(k)
            return hit[1]
        dev = self._jnp.asarray(make(a))
        self._uploads[k] = (a, dev)       # holding `a` keeps its id from being reused
        while len(self._uploads) > 64:
            self._uploads.popitem(last=False)
        return dev

    # ---- weights ----
    def prepare_linear(self, w: WeightTensor) -> Any:
        if len(w.shape) != 2:
            raise ValueError(f"prepare_linear: {w.name} has shape {w.shape}, expected [out, in]")
        jnp = self._jnp
        if w.is_quantized and self.keep_quantized:
            q, s, m = self._ops.unpack_gguf(w)
            return QuantWeight(jnp.asarray(np.ascontiguousarray(q.T)), jnp.asarray(np.ascontiguousarray(s.T)),
                               None if m is None else jnp.asarray(np.ascontiguousarray(m.T)), w.qtype, tuple(w.shape))
        return DenseWeight(jnp.asarray(w.to_float32(), dtype=self.weight_dtype))

    def prepare_embedding(self, w: WeightTensor) -> Any:
        if len(w.shape) != 2:
            raise ValueError(f"prepare_embedding: {w.name} has shape {w.shape}, expected [vocab, hidden]")
        jnp = self._jnp
        if w.is_quantized and self.keep_quantized:
            q, s, m = self._ops.unpack_gguf(w)
            return QuantWeight(jnp.asarray(q), jnp.asarray(s), None if m is None else jnp.asarray(m),
                               w.qtype, tuple(w.shape))
        return DenseWeight(jnp.asarray(w.to_float32(), dtype=self.weight_dtype))

    # ---- ops ----
    def embedding(self, table, ids):
        ids = self._host_ints(ids, "embedding ids")
        vocab = table.shape[0]
        if ids.ndim != 1:
            raise ValueError(f"embedding: ids must be 1-D, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"embedding: token id out of range [0, {vocab}): min {ids.min()}, max {ids.max()}")
        dev_ids = self._upload(ids, "i32", lambda a: a.astype(np.int32))
        if isinstance(table, QuantWeight):
            return self._out(self._embedding_quant(table.q, table.scales, table.mins, dev_ids))
        return self._out(self._embedding_dense(table.w, dev_ids))

    def linear(self, x, w, bias=None):
        x, bias = _unwrap(x), _unwrap(bias)
        n, k = w.shape
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"linear: x has shape {tuple(x.shape)}, weight is [{n}, {k}]")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
        if isinstance(w, QuantWeight):
            if self.use_pallas:
                y = self._pallas.quantized_matmul(x.astype(self.weight_dtype), w.q, w.scales, w.mins,
                                                  group=QK, interpret=self.pallas_interpret)
                return self._out(y if bias is None else self._add(y, bias))
            return self._out(self._linear_quant(x, w.q, w.scales, w.mins, bias))
        return self._out(self._linear_dense(x, w.w, bias))

    def rms_norm(self, x, weight, eps):
        return self._out(self._rms_norm(_unwrap(x), _unwrap(weight), eps=float(eps)))

    def add_rms_norm(self, x, residual, weight, eps):
        return self._out(self._add_rms_norm(_unwrap(x), _unwrap(residual), _unwrap(weight), eps=float(eps)))

    def add(self, a, b):
        return self._out(self._add(_unwrap(a), _unwrap(b)))

    def rope(self, x, positions, cos_sin, neox):
        x, cos_sin = _unwrap(x), _unwrap(cos_sin)
        positions = self._host_ints(positions, "rope positions")
        if x.ndim != 3 or positions.shape != (x.shape[0],):
            raise ValueError(f"rope: x {tuple(x.shape)} and positions {positions.shape} do not match ([T, H, D], [T])")
        if cos_sin.shape[1] > x.shape[2] or cos_sin.shape[1] % 2:
            raise ValueError(f"rope: cos_sin has {cos_sin.shape[1]} columns for head dim {x.shape[2]}")
        if positions.size and (positions.min() < 0 or positions.max() >= cos_sin.shape[0]):
            raise ValueError(f"rope: position out of range [0, {cos_sin.shape[0]}): max {positions.max()}")
        dev_pos = self._upload(positions, "i32", lambda a: a.astype(np.int32))
        return self._out(self._rope(x, dev_pos, cos_sin, neox=bool(neox)))

    def silu_mul(self, gate_up):
        gate_up = _unwrap(gate_up)
        if gate_up.shape[-1] % 2:
            raise ValueError(f"silu_mul: last dim {gate_up.shape[-1]} is odd")
        return self._out(self._silu_mul(gate_up))

    def store_kv(self, k_cache, v_cache, k, v, slot_mapping):
        if not (isinstance(k_cache, DeviceBuffer) and isinstance(v_cache, DeviceBuffer)):
            raise ValueError("store_kv: the caches must come from this backend's zeros() (DeviceBuffer), "
                             "because jax arrays cannot be updated in place")
        k, v = _unwrap(k), _unwrap(v)
        nb, bs, kvh, d = k_cache.shape
        slots = self._host_ints(slot_mapping, "slot_mapping")
        if k.shape != v.shape or k.ndim != 3 or tuple(k.shape[1:]) != (kvh, d) or slots.shape != (k.shape[0],):
            raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {slots.shape} "
                             f"do not fit caches [{nb}, {bs}, {kvh}, {d}]")
        if slots.size and slots.max() >= nb * bs:
            raise ValueError(f"store_kv: slot {slots.max()} out of range (cache has {nb * bs} slots)")
        dev_slots = self._upload(slots, "i32", lambda a: a.astype(np.int32))
        k_cache.array, v_cache.array = self._store_kv(k_cache.array, v_cache.array, k, v, dev_slots)
        self._last = v_cache.array

    def _check_tables(self, block_tables, context_lens, num_seqs, num_blocks, block_size):
        tables = self._host_ints(block_tables, "block_tables")
        lens = self._host_ints(context_lens, "context_lens")
        if tables.ndim != 2 or tables.shape[0] != num_seqs or lens.shape != (num_seqs,):
            raise ValueError(f"attention: block_tables {tables.shape} / context_lens {lens.shape} "
                             f"do not match {num_seqs} sequences")
        if num_seqs and lens.min() < 0:
            raise ValueError("attention: negative context length")
        needed = (lens + block_size - 1) // block_size
        if num_seqs and needed.max() > tables.shape[1]:
            raise ValueError(f"attention: context of {lens.max()} tokens needs {needed.max()} blocks, "
                             f"block_tables has {tables.shape[1]} columns")
        used = np.arange(tables.shape[1])[None, :] < needed[:, None]
        if used.any() and (tables[used].min() < 0 or tables[used].max() >= num_blocks):
            raise ValueError(f"attention: block id out of range [0, {num_blocks})")
        width = _next_pow2(max(int(needed.max()) if num_seqs else 1, 1))
        return tables, lens, width

    @staticmethod
    def _pad_table(tables: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros((tables.shape[0], width), np.int32)   # block 0: a valid id, masked out by length
        w = min(width, tables.shape[1])
        out[:, :w] = tables[:, :w]
        return out

    def attention_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        q, kc, vc = _unwrap(q), _unwrap(k_cache), _unwrap(v_cache)
        nb, bs, kvh, d = kc.shape
        if q.ndim != 3 or q.shape[2] != d or q.shape[1] % kvh:
            raise ValueError(f"attention_decode: q {tuple(q.shape)} does not fit caches [{nb}, {bs}, {kvh}, {d}]")
        tables, lens, width = self._check_tables(block_tables, context_lens, q.shape[0], nb, bs)
        dev_tables = self._upload(tables, f"table{width}", lambda a: self._pad_table(a, width))
        dev_lens = self._upload(lens, "i32", lambda a: a.astype(np.int32))
        if self.use_pallas:
            return self._out(self._pallas.paged_decode_attention(q, kc, vc, dev_tables, dev_lens, scale=float(scale),
                                                                 interpret=self.pallas_interpret))
        return self._out(self._attn_decode(q, kc, vc, dev_tables, dev_lens, scale=float(scale)))

    def attention_prefill(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        q, kc, vc = _unwrap(q), _unwrap(k_cache), _unwrap(v_cache)
        nb, bs, kvh, d = kc.shape
        num_tokens = q.shape[0]
        if q.ndim != 3 or q.shape[2] != d or q.shape[1] % kvh:
            raise ValueError(f"attention_prefill: q {tuple(q.shape)} does not fit caches [{nb}, {bs}, {kvh}, {d}]")
        cu = self._host_ints(cu_seqlens_q, "cu_seqlens_q")
        num_seqs = cu.shape[0] - 1
        tables, lens, width = self._check_tables(block_tables, context_lens, num_seqs, nb, bs)
        q_lens = np.diff(cu)
        if cu.ndim != 1 or num_seqs < 0 or cu[0] != 0 or cu[-1] != num_tokens or (q_lens < 0).any():
            raise ValueError(f"attention_prefill: cu_seqlens_q must rise from 0 to {num_tokens}, got {cu.tolist()}")
        if (q_lens > lens).any():
            raise ValueError("attention_prefill: a sequence has more new tokens than context length")
        window = min(_next_pow2(max(int(q_lens.max()) if num_seqs else 1, 1)), _next_pow2(max(num_tokens, 1)))
        chunk = min(window, _PREFILL_Q_CHUNK)
        dev_tables = self._upload(tables, f"table{width}", lambda a: self._pad_table(a, width))
        dev_cu = self._upload(cu, "i32", lambda a: a.astype(np.int32))
        dev_lens = self._upload(lens, "i32", lambda a: a.astype(np.int32))
        return self._out(self._attn_prefill(q, kc, vc, dev_tables, dev_cu, dev_lens, scale=float(scale),
                                            q_window=window, q_chunk=chunk))

    # ---- info for measurements ----
    def memory_bandwidth_gbs(self) -> float | None:
        if self.platform != "tpu":
            return None
        try:
            from jax.experimental.pallas import tpu as pltpu

            return pltpu.get_tpu_info().mem_bw_bytes_per_second / 1e9
        except Exception:
            return None


def _unwrap(t):
    return t.array if isinstance(t, DeviceBuffer) else t
