"""The tpu backend: mojollm's ops on JAX/XLA, with Pallas kernels on TPUs.

It runs on whatever device JAX has: TPU chips (Pallas kernels for decode attention and quantized
matmuls), else XLA:GPU or XLA:CPU with the jnp versions of the same maths (xla_ops.py). Every
device string says which ("tpu backend on XLA:CPU"). Nothing here is imported by `import mojollm`;
jax is imported only when the backend is probed or created.

Programs. The engine's steps run in the tpu runner (runner.py): a whole step (the model's
compute_logits, its KV writes and greedy argmax) is one `jax.jit` program per shape bucket, the KV
caches donated to it so XLA updates them in place. Each op here is a jitted jnp function: inside
the runner's trace it is inlined into the step's program; called on concrete arrays (tests, a direct
model.forward) it runs at once as its own small program.

Tensors are jax arrays, except the KV caches: `zeros()` returns a `CacheTensor`, a jax array that
`store_kv` replaces with the updated cache, as the interface's in-place write says (the old array is
donated to the scatter, so XLA writes into its memory: no copy of the cache per step).

Integer step metadata (token ids, positions, slot mapping, block tables, lengths) stays a read-only
host numpy array from `asarray`: an op validates it on the host (no device sync) and uploads it as
int32. Device arrays are taken as they are: the runner validates a whole step on the host once
(`check_step`) before its program runs. Shape buckets (what XLA compiles once per) are the runner's.

Dtypes. Float weights are stored as bfloat16 on TPU and float32 elsewhere (MOJOLLM_TPU_DTYPE=
float32|bfloat16 overrides); activations, norms and attention stay float32, the KV cache too unless
kv_cache_dtype picks bfloat16 / float16 / int8 / fp8 (mojollm.kv_dtypes: xla_ops encodes rows on
write and decodes them after the gather, inside the step's program; decode attention over such a
cache takes the jnp path, not the Pallas kernel, which reads float32 blocks), matmuls
accumulate in float32, and float32 matmuls run at full float32 precision (not TF32 / one bf16 pass).
GGUF Q4_0/Q4_1/Q8_0 weights become int8 + per-group float32 scales (+ mins) on TPU (Pallas
quantized matmul, 1 byte per weight in HBM); on CPU/GPU they are widened to the float dtype at
prepare time, because XLA:CPU runs the dequantize-in-the-loop graph 3-20x slower than a dense
matmul (MOJOLLM_TPU_QUANT=int|dense overrides).

Pallas. MOJOLLM_TPU_PALLAS=auto (default: Pallas kernels on TPU only) | interpret (Pallas kernels
in interpret mode on any device, for tests) | off (jnp everywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mojollm.backends.base import Backend, Probe
from mojollm.kv_dtypes import row_width
from mojollm.weights import QK, WeightTensor

_INT_DTYPES = {"int32": np.int32, "int64": np.int64}
_PREFILL_Q_CHUNK = 256
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


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


class CacheTensor:
    """A KV cache [num_blocks, B, KVH, W]: a jax array that store_kv replaces with the updated
    cache (jax arrays are immutable; the old one is donated, so XLA writes into its memory), and
    its KV dtype (mojollm.kv_dtypes: int8 and fp8 caches are both uint8 bytes)."""

    __slots__ = ("array", "kv_dtype")

    def __init__(self, array, kv_dtype: str | None = None):
        self.array = array
        self.kv_dtype = kv_dtype or _kv_dtype_of(array)

    shape = property(lambda self: tuple(self.array.shape))
    dtype = property(lambda self: self.array.dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.array)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self):
        return f"CacheTensor(shape={self.shape}, dtype={self.dtype})"


def _kv_dtype_of(array) -> str:
    """The KV dtype of a cache array (a CacheTensor carries its own; uint8 bytes do not say)."""
    if isinstance(array, CacheTensor):
        return array.kv_dtype
    name = np.dtype(array.dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"a {name} KV cache must come from kv_cache_zeros (int8 or fp8 bytes carry no dtype)")
    return name


@dataclass(frozen=True)
class CuSeqlens:
    """cu_seqlens_q already on the device (the runner's), with the prefill query window that the
    host computed from it (`prefill_window`): a static shape of the attention program."""

    array: Any
    q_window: int


def prefill_window(max_q_len: int, num_tokens: int) -> int:
    """Rows of one sequence's query window in attention_prefill: the longest run of new tokens of
    a sequence, rounded up to a power of two (at most the step's tokens, rounded up likewise)."""
    return min(_next_pow2(max(int(max_q_len), 1)), _next_pow2(max(int(num_tokens), 1)))


# ---- host-side validation of integer step metadata (numpy: no device sync) ----
def _ints(a, what: str) -> np.ndarray:
    try:
        a = np.asarray(a)
    except Exception as e:
        raise ValueError(f"{what}: expected an integer array, got {type(a).__name__}") from e
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected an integer array, got {a.dtype}")
    return a


def _int32(a: np.ndarray) -> np.ndarray:
    if a.size and (a.max() > _INT32_MAX or a.min() < _INT32_MIN):
        raise ValueError("integer metadata exceeds int32")
    return a.astype(np.int32)


def check_slots(slots, num_tokens: int, num_blocks: int, block_size: int) -> np.ndarray:
    slots = _ints(slots, "slot_mapping")
    if slots.shape != (num_tokens,):
        raise ValueError(f"slot_mapping has shape {slots.shape}, expected ({num_tokens},)")
    if slots.size and (slots.min() < 0 or slots.max() >= num_blocks * block_size):
        raise ValueError(f"store_kv: slot out of range [0, {num_blocks * block_size}): "
                         f"min {slots.min()}, max {slots.max()}")
    return slots


def check_tables(block_tables, context_lens, num_seqs: int, num_blocks: int, block_size: int):
    """(tables, lens) as host arrays, after checking that every block a context covers is a valid id."""
    tables = _ints(block_tables, "block_tables")
    lens = _ints(context_lens, "context_lens")
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
    return tables, lens


def check_cu_seqlens(cu_seqlens_q, num_tokens: int, lens: np.ndarray) -> np.ndarray:
    cu = _ints(cu_seqlens_q, "cu_seqlens_q")
    if cu.ndim != 1 or cu.shape[0] != lens.shape[0] + 1:
        raise ValueError(f"attention_prefill: cu_seqlens_q must have S + 1 = {lens.shape[0] + 1} entries, "
                         f"got shape {cu.shape}")
    q_lens = np.diff(cu)
    if cu[0] != 0 or cu[-1] != num_tokens or (q_lens < 0).any():
        raise ValueError(f"attention_prefill: cu_seqlens_q must rise from 0 to {num_tokens}, got {cu.tolist()}")
    if (q_lens > lens).any():
        raise ValueError("attention_prefill: a sequence has more new tokens than context length")
    return cu


def check_step(batch, num_blocks: int, block_size: int) -> None:
    """The runner's host check of a StepBatch's KV metadata (what the ops check one by one)."""
    check_slots(batch.slot_mapping, batch.num_tokens, num_blocks, block_size)
    _, lens = check_tables(batch.block_tables, batch.context_lens, batch.num_seqs, num_blocks, block_size)
    check_cu_seqlens(batch.cu_seqlens_q, batch.num_tokens, lens)


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
        self._programs: dict = {}
        self._last = None

    def _enable_compile_cache(self):
        """XLA's persistent compilation cache under the mojollm cache dir, unless the user set one."""
        if os.environ.get("MOJOLLM_TPU_COMPILE_CACHE", "1") == "0":
            return
        jax = self._jax
        try:
            if jax.config.jax_compilation_cache_dir is None:
                from mojollm.paths import cache_dir

                jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        except Exception:  # an old jax without the option: compile in every process
            pass

    @property
    def device_name(self) -> str:
        return self._device_label

    def describe(self) -> str:
        """One line for reports: platform, dtypes and which kernels run."""
        kern = ("Pallas (interpret)" if self.pallas_interpret else "Pallas") if self.use_pallas else "jnp/XLA"
        quant = "int8+scales" if self.keep_quantized else f"widened to {self.weight_dtype.name}"
        return f"{self._device_label}: weights {self.weight_dtype.name}, GGUF quant {quant}, kernels {kern}"

    def create_runner(self, model, max_num_seqs: int, max_model_len: int):
        """One jitted program per step, KV caches donated, steps padded to shape buckets (runner.py)."""
        from mojollm.backends.tpu.runner import TpuRunner

        return TpuRunner(model, max_num_seqs, max_model_len)

    # ---- ops as jitted programs ----
    def _call(self, fn, statics: tuple, *args, donate: tuple = ()):
        """fn(*args, **dict(statics)) as a jitted program (one per fn, statics and donation; jit
        compiles it once per input shape). Inside a trace (the runner's step) it is inlined."""
        key = (fn, statics, donate)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._jax.jit(partial(fn, **dict(statics)), donate_argnums=donate)
        out = program(*args)
        if not isinstance(out[0] if isinstance(out, tuple) else out, self._jax.core.Tracer):
            self._last = out   # what synchronize() waits for
        return out

    def _meta(self, a, what: str, check=None):
        """Integer metadata for an op: a device array as it is (the runner checked its step), a host
        array validated (`check(host)` may return a replacement) and uploaded as int32."""
        if isinstance(a, self._jax.Array):
            return a
        host = _ints(a, what)
        if check is not None:
            host = check(host)
        return self._jnp.asarray(_int32(host))

    # ---- memory ----
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        if dtype in _INT_DTYPES:
            host = np.array(a, dtype=_INT_DTYPES[dtype], copy=True, order="C")
            host.setflags(write=False)   # metadata stays on the host, where the ops validate it
            return host
        if dtype not in (None, "float32"):
            raise ValueError(f"asarray: dtype {dtype!r} is not one of None, 'float32', 'int32', 'int64'")
        return self._jnp.asarray(np.asarray(a, dtype=np.float32))

    def to_numpy(self, t: Any) -> np.ndarray:
        if isinstance(t, np.ndarray):
            return np.array(t, copy=True)
        a = np.asarray(t.array if isinstance(t, CacheTensor) else t)
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        return np.array(a, copy=True)

    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> Any:
        if dtype in _INT_DTYPES:
            host = np.zeros(shape, dtype=_INT_DTYPES[dtype])
            host.setflags(write=False)
            return host
        if dtype != "float32":
            raise ValueError(f"zeros: dtype {dtype!r} is not one of 'float32', 'int32', 'int64'")
        return CacheTensor(self._jnp.zeros(shape, self._jnp.float32))

    def kv_cache_dtypes(self) -> tuple[str, ...]:
        from mojollm.kv_dtypes import KV_CACHE_DTYPES

        return KV_CACHE_DTYPES  # xla_ops encodes on write and decodes after the gather (jnp)

    def kv_cache_zeros(self, shape, kv_dtype: str) -> CacheTensor:
        return CacheTensor(self._jnp.zeros(shape, self._ops.kv_storage(kv_dtype)), kv_dtype)

    def synchronize(self) -> None:
        if self._last is not None:
            self._jax.block_until_ready(self._last)

    # ---- weights ----
    def prepare_linear(self, w: WeightTensor) -> Any:
        if len(w.shape) != 2:
            raise ValueError(f"prepare_linear: {w.name} has shape {w.shape}, expected [out, in]")
        jnp = self._jnp
        if w.qtype in self._ops.UNPACKED_TYPES and self.keep_quantized:
            q, s, m = self._ops.unpack_gguf(w)
            return QuantWeight(jnp.asarray(np.ascontiguousarray(q.T)), jnp.asarray(np.ascontiguousarray(s.T)),
                               None if m is None else jnp.asarray(np.ascontiguousarray(m.T)), w.qtype, tuple(w.shape))
        return DenseWeight(jnp.asarray(w.to_float32(), dtype=self.weight_dtype))

    def prepare_embedding(self, w: WeightTensor) -> Any:
        if len(w.shape) != 2:
            raise ValueError(f"prepare_embedding: {w.name} has shape {w.shape}, expected [vocab, hidden]")
        jnp = self._jnp
        if w.qtype in self._ops.UNPACKED_TYPES and self.keep_quantized:
            q, s, m = self._ops.unpack_gguf(w)
            return QuantWeight(jnp.asarray(q), jnp.asarray(s), None if m is None else jnp.asarray(m),
                               w.qtype, tuple(w.shape))
        return DenseWeight(jnp.asarray(w.to_float32(), dtype=self.weight_dtype))

    # ---- ops ----
    def embedding(self, table, ids):
        vocab = table.shape[0]

        def check(host):
            if host.ndim != 1:
                raise ValueError(f"embedding: ids must be 1-D, got shape {host.shape}")
            if host.size and (host.min() < 0 or host.max() >= vocab):
                raise ValueError(f"embedding: token id out of range [0, {vocab}): min {host.min()}, max {host.max()}")
            return host

        dev_ids = self._meta(ids, "embedding ids", check)
        if isinstance(table, QuantWeight):
            return self._call(self._ops.embedding_quant, (), table.q, table.scales, table.mins, dev_ids)
        return self._call(self._ops.embedding_dense, (), table.w, dev_ids)

    def linear(self, x, w, bias=None):
        n, k = w.shape
        if len(x.shape) != 2 or x.shape[1] != k:
            raise ValueError(f"linear: x has shape {tuple(x.shape)}, weight is [{n}, {k}]")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
        if isinstance(w, QuantWeight):
            if self.use_pallas:
                statics = (("interpret", self.pallas_interpret), ("dtype", self.weight_dtype.name))
                return self._call(_pallas_linear, statics, x, w.q, w.scales, w.mins, bias)
            return self._call(self._ops.linear_quant, (("compute_dtype", self.weight_dtype.name),),
                              x, w.q, w.scales, w.mins, bias)
        return self._call(self._ops.linear_dense, (), x, w.w, bias)

    def rms_norm(self, x, weight, eps):
        return self._call(self._ops.rms_norm, (("eps", float(eps)),), x, weight)

    def add_rms_norm(self, x, residual, weight, eps):
        if tuple(x.shape) != tuple(residual.shape):
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
        return self._call(self._ops.add_rms_norm, (("eps", float(eps)),), x, residual, weight)

    def add(self, a, b):
        return self._call(_add, (), a, b)

    def rope(self, x, positions, cos_sin, neox):
        if len(x.shape) != 3 or tuple(positions.shape) != (x.shape[0],):
            raise ValueError(f"rope: x {tuple(x.shape)} and positions {tuple(positions.shape)} do not match "
                             f"([T, H, D], [T])")
        if cos_sin.shape[1] > x.shape[2] or cos_sin.shape[1] % 2:
            raise ValueError(f"rope: cos_sin has {cos_sin.shape[1]} columns for head dim {x.shape[2]}")

        def check(host):
            if host.size and (host.min() < 0 or host.max() >= cos_sin.shape[0]):
                raise ValueError(f"rope: position out of range [0, {cos_sin.shape[0]}): max {host.max()}")
            return host

        return self._call(self._ops.rope, (("neox", bool(neox)),), x, self._meta(positions, "rope positions", check),
                          cos_sin)

    def silu_mul(self, gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"silu_mul: last dim {gate_up.shape[-1]} is odd")
        return self._call(self._ops.silu_mul, (), gate_up)

    def store_kv(self, k_cache, v_cache, k, v, slot_mapping):
        if not (isinstance(k_cache, CacheTensor) and isinstance(v_cache, CacheTensor)):
            raise ValueError("store_kv: the caches must be tensors from this backend's zeros(), "
                             "because jax arrays cannot be updated in place")
        nb, bs, kvh, w = k_cache.shape
        kv = k_cache.kv_dtype
        d = w - row_width(kv, 0)
        if tuple(k.shape) != tuple(v.shape) or len(k.shape) != 3 or tuple(k.shape[1:]) != (kvh, d) \
                or tuple(slot_mapping.shape) != (k.shape[0],) or v_cache.kv_dtype != kv:
            raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping "
                             f"{tuple(slot_mapping.shape)} do not fit {kv} caches [{nb}, {bs}, {kvh}, {w}]")
        slots = self._meta(slot_mapping, "slot_mapping", lambda s: check_slots(s, k.shape[0], nb, bs))
        # the old caches are donated: XLA writes the new ones into their memory
        k_cache.array, v_cache.array = self._call(self._ops.store_kv, (("kv_dtype", kv),), k_cache.array,
                                                  v_cache.array, k, v, slots, donate=(0, 1))

    def copy_kv_rows(self, k_cache, v_cache, src_slots, dst_slots):
        """Base.copy_kv_rows as one functional gather-then-scatter per cache (a KV policy's
        compaction); the caches' arrays are replaced, like store_kv's."""
        if not (isinstance(k_cache, CacheTensor) and isinstance(v_cache, CacheTensor)):
            raise ValueError("copy_kv_rows: the caches must be tensors from this backend's zeros()")
        nb, bs, kvh, d = k_cache.shape
        src = self._jnp.asarray(_ints(src_slots, "src_slots").astype(np.int32))
        dst = self._jnp.asarray(_ints(dst_slots, "dst_slots").astype(np.int32))
        if src.shape != dst.shape or src.ndim != 1:
            raise ValueError(f"copy_kv_rows: src {tuple(src.shape)} and dst {tuple(dst.shape)} must be equal vectors")
        if src.shape[0] == 0:
            return
        for c in (k_cache, v_cache):
            rows = c.array.reshape(nb * bs, kvh, d)
            c.array = rows.at[dst].set(rows[src], unique_indices=True).reshape(nb, bs, kvh, d)

    def _check_attention(self, what, q, k_cache, v_cache):
        """(k, v arrays, num_blocks, B, kv dtype): attention reads caches from kv_cache_zeros() or
        float jax arrays."""
        k, v = (c.array if isinstance(c, CacheTensor) else c for c in (k_cache, v_cache))
        if not (isinstance(k, self._jax.Array) and isinstance(v, self._jax.Array)) \
                or k.shape != v.shape or len(k.shape) != 4:
            raise ValueError(f"{what}: k/v caches must be equal-shaped [num_blocks, B, KVH, W] jax arrays")
        kv = _kv_dtype_of(k_cache)
        nb, bs, kvh, w = k.shape
        d = w - row_width(kv, 0)
        if len(q.shape) != 3 or q.shape[2] != d or q.shape[1] % kvh:
            raise ValueError(f"{what}: q {tuple(q.shape)} does not fit {kv} caches [{nb}, {bs}, {kvh}, {w}]")
        return k, v, nb, bs, kv

    def _tables(self, block_tables, context_lens, num_seqs, nb, bs):
        """Device (tables, lens): the runner's as they are, host ones checked and uploaded."""
        if isinstance(block_tables, self._jax.Array) and isinstance(context_lens, self._jax.Array):
            return block_tables, context_lens
        tables, lens = check_tables(block_tables, context_lens, num_seqs, nb, bs)
        return self._jnp.asarray(_int32(tables)), self._jnp.asarray(_int32(lens))

    def attention_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        k, v, nb, bs, kv = self._check_attention("attention_decode", q, k_cache, v_cache)
        tables, lens = self._tables(block_tables, context_lens, q.shape[0], nb, bs)
        if self.use_pallas and kv == "float32":  # the Pallas kernel reads float32 blocks; others: jnp
            statics = (("scale", float(scale)), ("interpret", self.pallas_interpret))
            return self._call(_pallas_decode, statics, q, k, v, tables, lens)
        return self._call(self._ops.attention_decode, (("scale", float(scale)), ("kv_dtype", kv)), q, k, v, tables, lens)

    def attention_prefill(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        k, v, nb, bs, kv = self._check_attention("attention_prefill", q, k_cache, v_cache)
        num_tokens = q.shape[0]
        if isinstance(cu_seqlens_q, CuSeqlens):   # the runner's: checked on the host, window known
            cu, window = cu_seqlens_q.array, cu_seqlens_q.q_window
            tables, lens = self._tables(block_tables, context_lens, cu.shape[0] - 1, nb, bs)
        else:
            cu_host = _ints(cu_seqlens_q, "cu_seqlens_q")
            if cu_host.ndim != 1 or cu_host.shape[0] < 2:
                raise ValueError(f"attention_prefill: cu_seqlens_q must have S + 1 >= 2 entries, "
                                 f"got shape {cu_host.shape}")
            tables, lens = check_tables(block_tables, context_lens, cu_host.shape[0] - 1, nb, bs)
            cu_host = check_cu_seqlens(cu_host, num_tokens, lens)
            window = prefill_window(np.diff(cu_host).max(), num_tokens)
            cu, tables, lens = (self._jnp.asarray(_int32(a)) for a in (cu_host, tables, lens))
        statics = (("scale", float(scale)), ("q_window", window), ("q_chunk", min(window, _PREFILL_Q_CHUNK)),
                   ("kv_dtype", kv))
        return self._call(self._ops.attention_prefill, statics, q, k, v, tables, cu, lens)

    # ---- info for measurements ----
    def memory_bandwidth_gbs(self) -> float | None:
        """Jitted sum over 256 MiB on the JAX device: bytes read per second (median of 5).

        Measured, not the chip's datasheet figure, on whatever JAX runs on (TPU, GPU or XLA:CPU),
        once per backend instance. A read, like a decode step's weight stream: an elementwise op
        (read + write) measured 8 GB/s on XLA:CPU, less than the 13 GB/s a decode step streamed
        there; this sum reads 26."""
        if getattr(self, "_bandwidth_gbs", None) is None:
            import time

            jax, jnp = self._jax, self._jnp
            x = jnp.ones((256 * 2**20 // 4,), dtype=jnp.float32)
            total = jax.jit(jnp.sum)
            total(x).block_until_ready()  # compile
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                total(x).block_until_ready()
                times.append(time.perf_counter() - t0)
            self._bandwidth_gbs = x.nbytes / sorted(times)[len(times) // 2] / 1e9
        return self._bandwidth_gbs


def _add(a, b):
    return a + b


def _pallas_linear(x, q, scales, mins, bias, *, interpret, dtype):
    from mojollm.backends.tpu import pallas_kernels

    y = pallas_kernels.quantized_matmul(x.astype(dtype), q, scales, mins, group=QK, interpret=interpret)
    return y if bias is None else y + bias


def _pallas_decode(q, k_cache, v_cache, tables, lens, *, scale, interpret):
    from mojollm.backends.tpu import pallas_kernels

    return pallas_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale, interpret=interpret)
