"""The tpu backend: mojollm's ops on JAX/XLA, with Pallas kernels on TPUs.

It runs on whatever device JAX has: TPU chips (Pallas kernels for decode attention and quantized
matmuls), else XLA:GPU or XLA:CPU with the jnp versions of the same maths (xla_ops.py). Every
device string says which ("tpu backend on XLA:CPU"). Nothing here is imported by `import mojollm`;
jax is imported only when the backend is probed or created.

Tensors and programs. Ops do not run when called: they are recorded into a pending graph and
return `TpuTensor`s (an op output, seen through the slices/reshapes the model applied since). The
graph runs as one jitted XLA program when a value is read (to_numpy), and with the default
MOJOLLM_TPU_FUSE=layer also just before each store_kv, so a step is ~one program per layer and
every layer but the first and last replays the *same* compiled program (compile cost of one layer,
~L dispatches per step instead of ~11 L). `step` runs the whole step as one program (fewest
dispatches, longest compile: XLA compiles all L layers); `op` runs each op at once. The model's
glue (splitting q/k/v, merging heads) is applied inside the consuming op's program; run eagerly,
each such glue op would cost 0.1-0.3 ms. Outputs that no live tensor can read are not returned,
so XLA fuses them away.
Integer step metadata (token ids, positions, slot mapping, block tables, lengths) stays a read-only
host numpy array from `asarray`: the backend validates it on the host (no device sync), pads it to
its shape bucket and uploads it once per step (cached by array identity: L layers share one copy).

KV caches. `zeros()` returns a TpuTensor that `store_kv` updates 'in place', as the interface says:
the scatter's result replaces the tensor's array, and the old array is donated to the program
(XLA writes into its memory: no copy of the cache per step).

Shape buckets (XLA compiles once per distinct static shape):
    context blocks M   attention takes block-table columns up to next_pow2(ceil(max context / B)),
                       so decode recompiles log2(context / B) times per batch shape, never per token
    prefill q window   next_pow2(longest new-token run of a sequence), processed in chunks of <= 256
    T, S               exact: they are the shapes of the model's activations, which the model sets.
                       Decode has T = S = sequences in the batch (one compile per batch size);
                       prefill compiles once per distinct chunk length. XLA's persistent compilation
                       cache (<mojollm cache>/xla) keeps the executables across processes.

Dtypes. Float weights are stored as bfloat16 on TPU and float32 elsewhere (MOJOLLM_TPU_DTYPE=
float32|bfloat16 overrides); activations, norms, attention and the KV cache stay float32, matmuls
accumulate in float32, and float32 matmuls run at full float32 precision (not TF32 / one bf16 pass).
GGUF Q4_0/Q4_1/Q8_0 weights become int8 + per-group float32 scales (+ mins) on TPU (Pallas
quantized matmul, 1 byte per weight in HBM); on CPU/GPU they are widened to the float dtype at
prepare time, because XLA:CPU runs the dequantize-in-the-loop graph 3-20x slower than a dense
matmul (MOJOLLM_TPU_QUANT=int|dense overrides).

Pallas. MOJOLLM_TPU_PALLAS=auto (default: Pallas kernels on TPU only) | interpret (Pallas kernels
in interpret mode on any device, for tests) | off (jnp everywhere).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import numpy as np

from mojollm.backends.base import Backend, Probe
from mojollm.weights import QK, WeightTensor

_INT_DTYPES = {"int32": np.int32, "int64": np.int64}
_PREFILL_Q_CHUNK = 256
_MAX_PENDING_OPS = 4096  # a step of a 100-layer model records ~1,100 ops
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


# ---- pending views: ("index", ((kind, ...), ...)) and ("reshape", shape), applied inside jit ----
def _index_spec(index, shape) -> tuple | None:
    """A hashable form of a basic index (ints and slices), or None for anything else."""
    items = index if isinstance(index, tuple) else (index,)
    if len(items) > len(shape):
        raise IndexError(f"too many indices ({len(items)}) for a tensor of shape {shape}")
    spec = []
    for dim, item in zip(shape, items):
        if isinstance(item, slice):
            spec.append(("s", *item.indices(dim)))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if not -dim <= i < dim:
                raise IndexError(f"index {i} is out of bounds for a dimension of size {dim}")
            spec.append(("i", i % dim))
        else:
            return None
    return tuple(spec)


def _indexed_shape(spec, shape) -> tuple[int, ...]:
    out = [len(range(*e[1:])) for e in spec if e[0] == "s"]
    return (*out, *shape[len(spec):])


def _apply_views(a, views: tuple, *extra):
    for kind, arg in views:
        if kind == "index":
            a = a[tuple(slice(*e[1:]) if e[0] == "s" else e[1] for e in arg)]
        elif kind == "reshape":
            a = a.reshape(arg)
        else:  # "take": rows given as the extra argument
            a = a[extra[0]]
    return a


@lru_cache(maxsize=None)
def _materializer(views: tuple):
    import jax

    return jax.jit(lambda a, *extra: _apply_views(a, views, *extra))


class _Node:
    """One recorded op of the pending step graph (its wiring lives in the backend's list at
    `slot`). `values` is filled when the graph runs; `watchers` are weak references to the tensors
    that read each output (an output nobody can read any more is not returned from the program,
    so XLA can fuse it away)."""

    __slots__ = ("owner", "slot", "num_outputs", "values", "watchers")

    def __init__(self, owner, slot, num_outputs):
        self.owner, self.slot, self.num_outputs = owner, slot, num_outputs
        self.values = None
        self.watchers = [[] for _ in range(num_outputs)]

    def is_read(self, i: int) -> bool:
        return any(w() is not None for w in self.watchers[i])


class TpuTensor:
    """The tpu backend's tensor: a jax array, or an output of a recorded op not run yet, seen
    through pending views (basic slices, reshapes) that the consuming op applies inside its own
    compiled program. `array` runs whatever is pending and returns the jax array."""

    __slots__ = ("src", "views", "shape", "dtype", "__weakref__")

    def __init__(self, src, views: tuple = (), shape: tuple[int, ...] | None = None, dtype=None):
        self.src = src                      # a jax array, or (node, output index)
        self.views = views
        self.shape = tuple(src.shape) if shape is None else shape
        self.dtype = src.dtype if dtype is None else dtype
        if isinstance(src, tuple):
            src[0].watchers[src[1]].append(weakref.ref(self))

    def _concrete(self):
        src = self.src
        if isinstance(src, tuple):
            node, i = src
            if node.values is None:
                node.owner._flush()
            self.src = src = node.values[i]
        return src

    @property
    def array(self):
        src = self._concrete()
        return _materializer(self.views)(src) if self.views else src

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))

    def __len__(self):
        return self.shape[0]

    def _view(self, views, shape):
        return TpuTensor(self.src, self.views + views, shape, self.dtype)

    def __getitem__(self, index):
        spec = _index_spec(index, self.shape)
        if spec is None:  # advanced indexing: one 1-D integer array of rows, gathered as an op
            rows = np.asarray(index)
            if rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise IndexError("a tpu tensor takes basic indices (ints, slices) or one 1-D integer array of rows")
            if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
                raise IndexError(f"row index out of range for {self.shape[0]} rows")
            owner = self.src[0].owner if isinstance(self.src, tuple) else None
            dev_rows = np.ascontiguousarray(rows.astype(np.int32) % self.shape[0])
            if owner is not None:
                return owner._run(_take_rows, (), self, owner._jnp.asarray(dev_rows))
            return TpuTensor(_materializer((("take", None),))(self.array, dev_rows))
        return self._view((("index", spec),), _indexed_shape(spec, self.shape))

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        shape = tuple(int(s) for s in shape)
        if shape.count(-1) == 1:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if known and s == -1 else s for s in shape)
        if math.prod(shape) != self.size or any(s < 0 for s in shape):
            raise ValueError(f"cannot reshape a tensor of shape {self.shape} to {shape}")
        return self._view((("reshape", shape),), shape)

    def copy(self):
        return self  # values are immutable: a copy is the same value

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.array)
        return a if dtype is None else a.astype(dtype)

    def __jax_array__(self):
        return self.array

    def __repr__(self):
        state = "pending" if isinstance(self.src, tuple) else "ready"
        return f"TpuTensor(shape={self.shape}, dtype={self.dtype}, {state}{', view' if self.views else ''})"


def _take_rows(a, rows):
    return a[rows]


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

        if self.use_pallas:
            from mojollm.backends.tpu import pallas_kernels

            self._pallas = pallas_kernels
        self.fuse = os.environ.get("MOJOLLM_TPU_FUSE", "layer").lower()
        if self.fuse not in ("layer", "step", "op"):
            raise ValueError(f"MOJOLLM_TPU_FUSE={self.fuse!r}: expected layer, step or op")
        self._enable_compile_cache()
        self._pending: list[_Node] = []
        self._wiring: list = []
        self._leaves: list = []
        self._leaf_at: dict[int, int] = {}
        self._donations: list = []
        self._programs: dict = {}
        self._avals: dict = {}
        self._uploads: OrderedDict = OrderedDict()
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

    # ---- recording ops; running the pending graph as one compiled program ----
    def _run(self, fn, statics: tuple, *args):
        """Record fn(*args, **dict(statics)) (jnp code) and return tensors for its outputs.

        Inputs are TpuTensors (pending or ready, with views), jax arrays (weights, uploaded
        metadata) or None. The wiring is built here, so running the graph costs one pass. Output
        shapes come from jax.eval_shape, cached per signature. MOJOLLM_TPU_FUSE=op runs each op at
        once; layer (default) and step run the graph at each KV write / when a value is read."""
        ins, sig = [], []
        for a in args:
            if a is None:
                ins.append(None)
                sig.append(None)
                continue
            if isinstance(a, TpuTensor):
                src, views = a.src, a.views
                sig.append((a.shape, a.dtype))
                if isinstance(src, tuple):
                    node, i = src
                    if node.values is None:              # pending in this graph
                        ins.append(("n", node.slot, i, views))
                        continue
                    a.src = src = node.values[i]
            else:
                src, views = a, ()
                sig.append((tuple(a.shape), a.dtype))
            k = self._leaf_at.get(id(src))
            if k is None:
                k = self._leaf_at[id(src)] = len(self._leaves)
                self._leaves.append(src)                 # holding it keeps its id unique
            ins.append(("l", k, views))
        akey = (fn, statics, tuple(sig))
        avals = self._avals.get(akey)
        if avals is None:
            jax = self._jax
            structs = [None if g is None else jax.ShapeDtypeStruct(*g) for g in sig]
            out = jax.eval_shape(lambda *xs: fn(*xs, **dict(statics)), *structs)
            multi = isinstance(out, tuple)
            avals = self._avals[akey] = (multi, tuple((tuple(o.shape), o.dtype) for o in (out if multi else (out,))))
        multi, outs = avals
        node = _Node(self, len(self._pending), len(outs))
        self._pending.append(node)
        self._wiring.append((fn, statics, tuple(ins)))
        tensors = tuple(TpuTensor((node, i), (), shape, dtype) for i, (shape, dtype) in enumerate(outs))
        if self.fuse == "op" or len(self._pending) >= _MAX_PENDING_OPS:
            self._flush()
        return tensors if multi else tensors[0]

    def _flush(self):
        """Run every pending op as one jitted program. Its structure (ops, statics, views, wiring,
        which outputs are still readable, which caches are donated) is the cache key; jit then
        compiles once per input shape. Leaves are jax arrays, deduplicated by identity."""
        nodes, wiring, leaves, leaf_at = self._pending, tuple(self._wiring), self._leaves, self._leaf_at
        if not nodes:
            return
        self._pending, self._wiring, self._leaves, self._leaf_at = [], [], [], {}
        outputs = tuple((k, i) for k, n in enumerate(nodes) for i in range(n.num_outputs) if n.is_read(i))
        donate = tuple(sorted({leaf_at[id(a)] for a in self._donations if id(a) in leaf_at}))
        self._donations = []
        key = (wiring, outputs, donate)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._jax.jit(partial(_replay, wiring, outputs), donate_argnums=donate)
        results = program(*leaves)
        for n in nodes:
            n.values = [None] * n.num_outputs
        for (k, i), value in zip(outputs, results):
            nodes[k].values[i] = value
        self._last = results

    # ---- memory ----
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        if dtype in _INT_DTYPES:
            host = np.array(a, dtype=_INT_DTYPES[dtype], copy=True, order="C")
            host.setflags(write=False)   # read-only: uploads may be cached by identity
            return host
        if dtype not in (None, "float32"):
            raise ValueError(f"asarray: dtype {dtype!r} is not one of None, 'float32', 'int32', 'int64'")
        return TpuTensor(self._jnp.asarray(np.asarray(a, dtype=np.float32)))

    def to_numpy(self, t: Any) -> np.ndarray:
        if isinstance(t, np.ndarray):
            return np.array(t, copy=True)
        a = np.asarray(t.array if isinstance(t, TpuTensor) else t)  # runs pending ops
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
        return TpuTensor(self._jnp.zeros(shape, self._jnp.float32))

    def synchronize(self) -> None:
        self._flush()
        if self._last is not None:
            self._jax.block_until_ready(self._last)

    # ---- host metadata -> device (validated, bucketed, uploaded once) ----
    @staticmethod
    def _host_ints(a, what: str) -> np.ndarray:
        if isinstance(a, np.ndarray):
            if a.dtype.kind not in "iu":
                raise ValueError(f"{what}: expected an integer array, got {a.dtype}")
            return a
        try:
            a = np.asarray(a.array if isinstance(a, TpuTensor) else a)
        except Exception as e:
            raise ValueError(f"{what}: expected an integer array, got {type(a).__name__}") from e
        if a.dtype.kind not in "iu":
            raise ValueError(f"{what}: expected an integer array, got {a.dtype}")
        return a

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

    def _ints32(self, a: np.ndarray):
        def narrow(x):
            if x.size and (x.max() > _INT32_MAX or x.min() < _INT32_MIN):
                raise ValueError("integer metadata exceeds int32")
            return x.astype(np.int32)

        return self._upload(a, "i32", narrow)

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
        ids = self._host_ints(ids, "embedding ids")
        vocab = table.shape[0]
        if ids.ndim != 1:
            raise ValueError(f"embedding: ids must be 1-D, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"embedding: token id out of range [0, {vocab}): min {ids.min()}, max {ids.max()}")
        dev_ids = self._ints32(ids)
        if isinstance(table, QuantWeight):
            return self._run(self._ops.embedding_quant, (), table.q, table.scales, table.mins, dev_ids)
        return self._run(self._ops.embedding_dense, (), table.w, dev_ids)

    def linear(self, x, w, bias=None):
        n, k = w.shape
        if len(x.shape) != 2 or x.shape[1] != k:
            raise ValueError(f"linear: x has shape {tuple(x.shape)}, weight is [{n}, {k}]")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
        if isinstance(w, QuantWeight):
            if self.use_pallas:
                return self._run(_pallas_linear, (("interpret", self.pallas_interpret), ("dtype", self.weight_dtype.name)),
                                 x, w.q, w.scales, w.mins, bias)
            return self._run(self._ops.linear_quant, (("compute_dtype", self.weight_dtype.name),),
                             x, w.q, w.scales, w.mins, bias)
        return self._run(self._ops.linear_dense, (), x, w.w, bias)

    def rms_norm(self, x, weight, eps):
        return self._run(self._ops.rms_norm, (("eps", float(eps)),), x, weight)

    def add_rms_norm(self, x, residual, weight, eps):
        if tuple(x.shape) != tuple(residual.shape):
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
        return self._run(self._ops.add_rms_norm, (("eps", float(eps)),), x, residual, weight)

    def add(self, a, b):
        return self._run(_add, (), a, b)

    def rope(self, x, positions, cos_sin, neox):
        positions = self._host_ints(positions, "rope positions")
        if len(x.shape) != 3 or positions.shape != (x.shape[0],):
            raise ValueError(f"rope: x {tuple(x.shape)} and positions {positions.shape} do not match ([T, H, D], [T])")
        if cos_sin.shape[1] > x.shape[2] or cos_sin.shape[1] % 2:
            raise ValueError(f"rope: cos_sin has {cos_sin.shape[1]} columns for head dim {x.shape[2]}")
        if positions.size and (positions.min() < 0 or positions.max() >= cos_sin.shape[0]):
            raise ValueError(f"rope: position out of range [0, {cos_sin.shape[0]}): max {positions.max()}")
        return self._run(self._ops.rope, (("neox", bool(neox)),), x, self._ints32(positions), cos_sin)

    def silu_mul(self, gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"silu_mul: last dim {gate_up.shape[-1]} is odd")
        return self._run(self._ops.silu_mul, (), gate_up)

    def store_kv(self, k_cache, v_cache, k, v, slot_mapping):
        if not all(isinstance(c, TpuTensor) and not c.views for c in (k_cache, v_cache)):
            raise ValueError("store_kv: the caches must be tensors from this backend's zeros(), "
                             "because jax arrays cannot be updated in place")
        nb, bs, kvh, d = k_cache.shape
        slots = self._host_ints(slot_mapping, "slot_mapping")
        if tuple(k.shape) != tuple(v.shape) or len(k.shape) != 3 or tuple(k.shape[1:]) != (kvh, d) \
                or slots.shape != (k.shape[0],):
            raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {slots.shape} "
                             f"do not fit caches [{nb}, {bs}, {kvh}, {d}]")
        if slots.size and (slots.min() < 0 or slots.max() >= nb * bs):
            raise ValueError(f"store_kv: slot out of range [0, {nb * bs}): min {slots.min()}, max {slots.max()}")
        if self.fuse == "layer":
            self._flush()   # a KV write opens a segment: every layer runs the same compiled program
        for c in (k_cache, v_cache):
            if not isinstance(c.src, tuple) or c.src[0].values is not None:
                self._donations.append(c._concrete())   # XLA writes the new cache into the old one's memory
        new_k, new_v = self._run(self._ops.store_kv, (), k_cache, v_cache, k, v, self._ints32(slots))
        for c, new in ((k_cache, new_k), (v_cache, new_v)):
            c.src = new.src
            new.src[0].watchers[new.src[1]].append(weakref.ref(c))

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
        dev_tables = self._upload(tables, f"table{width}", lambda a: _pad_table(a, width))
        return lens, dev_tables

    def _check_attention(self, what, q, k_cache, v_cache):
        if not (isinstance(k_cache, TpuTensor) and isinstance(v_cache, TpuTensor)) or k_cache.shape != v_cache.shape \
                or len(k_cache.shape) != 4:
            raise ValueError(f"{what}: k/v caches must be equal-shaped [num_blocks, B, KVH, D] tensors from zeros()")
        nb, bs, kvh, d = k_cache.shape
        if len(q.shape) != 3 or q.shape[2] != d or q.shape[1] % kvh:
            raise ValueError(f"{what}: q {tuple(q.shape)} does not fit caches [{nb}, {bs}, {kvh}, {d}]")
        return nb, bs

    def attention_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        nb, bs = self._check_attention("attention_decode", q, k_cache, v_cache)
        lens, dev_tables = self._check_tables(block_tables, context_lens, q.shape[0], nb, bs)
        fn = _pallas_decode if self.use_pallas else self._ops.attention_decode
        statics = (("scale", float(scale)),) + ((("interpret", self.pallas_interpret),) if self.use_pallas else ())
        return self._run(fn, statics, q, k_cache, v_cache, dev_tables, self._ints32(lens))

    def attention_prefill(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
        nb, bs = self._check_attention("attention_prefill", q, k_cache, v_cache)
        num_tokens = q.shape[0]
        cu = self._host_ints(cu_seqlens_q, "cu_seqlens_q")
        if cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError(f"attention_prefill: cu_seqlens_q must have S + 1 >= 2 entries, got shape {cu.shape}")
        num_seqs = cu.shape[0] - 1
        lens, dev_tables = self._check_tables(block_tables, context_lens, num_seqs, nb, bs)
        q_lens = np.diff(cu)
        if cu[0] != 0 or cu[-1] != num_tokens or (q_lens < 0).any():
            raise ValueError(f"attention_prefill: cu_seqlens_q must rise from 0 to {num_tokens}, got {cu.tolist()}")
        if (q_lens > lens).any():
            raise ValueError("attention_prefill: a sequence has more new tokens than context length")
        window = min(_next_pow2(max(int(q_lens.max()), 1)), _next_pow2(max(num_tokens, 1)))
        statics = (("scale", float(scale)), ("q_window", window), ("q_chunk", min(window, _PREFILL_Q_CHUNK)))
        return self._run(self._ops.attention_prefill, statics, q, k_cache, v_cache, dev_tables,
                         self._ints32(cu), self._ints32(lens))

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


def _replay(wiring, outputs, *leaves):
    """The body of a step program: the recorded ops in order (traced once per structure and shapes)."""
    values = []
    for fn, statics, ins in wiring:
        args = []
        for r in ins:
            if r is None:
                args.append(None)
            elif r[0] == "l":
                args.append(_apply_views(leaves[r[1]], r[2]) if r[2] else leaves[r[1]])
            else:
                a = values[r[1]][r[2]]
                args.append(_apply_views(a, r[3]) if r[3] else a)
        out = fn(*args, **dict(statics))
        values.append(out if isinstance(out, tuple) else (out,))
    return tuple(values[k][i] for k, i in outputs)


def _pad_table(tables: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((tables.shape[0], width), np.int32)   # block 0: a valid id, masked out by length
    w = min(width, tables.shape[1])
    out[:, :w] = tables[:, :w]
    return out


def _add(a, b):
    return a + b


def _pallas_linear(x, q, scales, mins, bias, *, interpret, dtype):
    from mojollm.backends.tpu import pallas_kernels

    y = pallas_kernels.quantized_matmul(x.astype(dtype), q, scales, mins, group=QK, interpret=interpret)
    return y if bias is None else y + bias


def _pallas_decode(q, k_cache, v_cache, tables, lens, *, scale, interpret):
    from mojollm.backends.tpu import pallas_kernels

    return pallas_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale, interpret=interpret)
