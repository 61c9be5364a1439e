"""Quantize a whole Llama-family GGUF model: calibration, the method, a new GGUF file.

    quantize_model("model.gguf", "out.gguf", method="gptq", bits=4, calib_text=..., progress=print)

1. Every tensor of the source is dequantized to float32: the baseline the methods start from.
2. Calibration: the float model runs on the cpu backend over `calib_tokens` tokens of text in
   windows of up to 1024 tokens; the input of every projection is recorded (X^T X in float64 for
   GPTQ, with each window's first token weighted by _SINK_WEIGHT; up to 512 rows of X, 32 per
   window, for AWQ). The same input feeds q, k and v (and gate and up), so they share it.
3. Each projection is quantized by the method (mojollm.quantization):
   - rtn: round to nearest, llama.cpp's rule;
   - gptq: GPTQ on that input's X^T X (columns in order, lazy batches of 128);
   - awq: per input channel scales s searched on that input; W diag(s) is quantized and 1/s is
     folded into the op that makes the input. That op is the attention / MLP RMSNorm weight for
     q, k, v / gate, up, and the up projection's rows for down. The attention output keeps s = 1
     when heads are grouped (GQA): v's rows would need one scale per kv head.
4. The output is a GGUF in a block format mojollm's kernels run on cpu and cuda. 8 bits gives
   Q8_0; 4 bits gives Q4_1, or Q4_0 with `symmetric`. The token embedding (and an untied LM head)
   become Q8_0 by RTN for every method. Norms stay float32. The metadata is copied. Other
   tensors keep their source type.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

METHODS = ("rtn", "gptq", "awq")
_AWQ_ROWS = 512
# The first token of a window (the attention sink) takes much of every later token's attention,
# so an error in its keys / values reaches them all. GPTQ weights its row by this much in X^T X,
# about the attention mass it receives over a 1024-token window: on the default model, Q4_0 GPTQ
# went from 13.75 (equal weight, worse than RTN's 13.26) to 12.01 perplexity (float: 11.16).
_SINK_WEIGHT = 64
_ROWS_PER_WINDOW = 32  # AWQ's sample of X: evenly spaced rows of every window


def target_type(bits: int, symmetric: bool = False) -> str:
    if bits == 8:
        return "Q8_0"
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    raise ValueError(f"bits must be 8 or 4 (GGUF's 32-weight block formats Q8_0, Q4_0, Q4_1 with kernels here), "
                     f"got {bits}")


def default_calibration_text() -> str:
    """Technical English that ships with every CPython: the standard library's module docs and the
    pydoc topics of the language reference, less its compound-statements chapter (held out:
    bench/quant.py measures perplexity on it). Some 150k tokens; GPTQ needs many more tokens than
    a layer has inputs, or it fits the calibration text (2k tokens made its down projections worse
    than round-to-nearest on other text)."""
    import importlib

    from pydoc_data.topics import topics

    parts = []
    for name in ("argparse", "collections", "json", "logging", "unittest", "subprocess", "threading",
                 "pathlib", "decimal", "email", "http.client", "sqlite3", "datetime", "itertools", "asyncio"):
        try:
            doc = importlib.import_module(name).__doc__
        except Exception:  # a trimmed Python without the module
            doc = None
        if doc:
            parts.append(doc.strip())
    parts += [topics[k] for k in sorted(topics) if k != "compound"]
    return "\n\n".join(parts)


def read_gguf(path: Path):
    """(reader, {name: (float32 array [rows, cols], source type)}) of a Llama-family GGUF."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    if reader.fields["general.architecture"].contents() != "llama":
        raise ValueError(f"{path.name}: mojollm quantize takes Llama-family GGUF files "
                         f"(general.architecture = llama), got {reader.fields['general.architecture'].contents()!r}")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = (dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape),
                           t.tensor_type)
    return reader, tensors


def write_gguf(reader, dst: Path, tensors: dict[str, tuple[np.ndarray, object]], file_type) -> None:
    """A GGUF with `reader`'s metadata (every key with its own type) and `tensors`: name ->
    (a float32 / float16 array with None, or GGUF block bytes [rows, row_bytes] with their type)."""
    import gguf

    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(data))
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_float_gguf(src, dst, read=None) -> Path:
    """The source's tensors dequantized to float32 (the methods' baseline); `read`: read_gguf(src)
    when the caller has it already."""
    import gguf

    reader, tensors = read if read is not None else read_gguf(Path(src))
    write_gguf(reader, Path(dst), {n: (w, None) for n, (w, _) in tensors.items()}, gguf.LlamaFileType.ALL_F32)
    return Path(dst)


class _Inputs:
    """What one projection input looked like over the calibration tokens."""

    def __init__(self, k: int):
        self.h = np.zeros((k, k), dtype=np.float64)
        self.rows: list[np.ndarray] = []
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """One calibration window's inputs [tokens, K] (its first row is the attention sink)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.h.shape[0])
        self.h += (x.T @ x).astype(np.float64)  # float32 per window (<= 1024 rows), summed in float64
        self.h += (_SINK_WEIGHT - 1) * np.outer(x[0], x[0]).astype(np.float64)
        self.n += x.shape[0]
        have = sum(r.shape[0] for r in self.rows)
        if have < _AWQ_ROWS:
            step = max(1, x.shape[0] // _ROWS_PER_WINDOW)
            self.rows.append(x[::step][:min(_ROWS_PER_WINDOW, _AWQ_ROWS - have)].copy())

    @property
    def x(self) -> np.ndarray:
        return np.concatenate(self.rows)


def calibrate(float_gguf: Path, text: str, tokens: int, progress=None) -> tuple[dict, int]:
    """Run the float model over `tokens` tokens of `text` on the cpu backend and record every
    projection's input: {(layer, "attn" | "o" | "mlp" | "down"): _Inputs}, and the tokens used."""
    from mojollm.backends import get_backend
    from mojollm.engine.step import StepBatch
    from mojollm.models import load_model

    backend = get_backend("cpu")
    model = load_model(str(float_gguf), backend)
    ids = model.tokenizer.encode(text)
    if len(ids) < 16:
        raise ValueError(f"the calibration text has {len(ids)} tokens: give at least 16")
    ids = ids[:tokens]
    window = min(len(ids), int(model.config.max_position_embeddings), 1024)
    which = {}  # id(weight) -> its input's key; q / k / v apart share q's input (recorded once)
    for i, layer in enumerate(model.layers):
        which[id(layer.qkv if layer.qkv is not None else layer.q_k_v[0])] = (i, "attn")
        which[id(layer.o_proj)] = (i, "o")
        which[id(layer.gate_up)] = (i, "mlp")
        which[id(layer.down)] = (i, "down")
    seen: dict = {}
    linear = backend.linear

    def record(x, w, bias=None):
        key = which.get(id(w))
        if key is not None:
            if key not in seen:
                seen[key] = _Inputs(np.asarray(x).shape[-1])
            seen[key].add(np.asarray(x))
        return linear(x, w, bias)

    backend.linear = record
    try:
        nb = -(-window // 16)
        model.allocate_kv_cache(nb, 16)
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            model.forward(StepBatch.single_sequence(chunk, 0, list(range(-(-len(chunk) // 16))), 16))
            if progress:
                progress("calibration tokens", done=min(start + window, len(ids)), total=len(ids))
    finally:
        backend.linear = linear
    return seen, len(ids)


_GROUPS = {"attn": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "mlp": ("ffn_gate", "ffn_up"),
           "down": ("ffn_down",)}  # projections by the input they share


def _layer_names(i: int) -> dict[str, list[str]]:
    return {g: [f"blk.{i}.{p}.weight" for p in parts] for g, parts in _GROUPS.items()}


def fold_awq_scales(weights: dict[str, np.ndarray], inputs: dict, i: int, qtype: str) -> None:
    """AWQ for layer i, in place: per input group the searched scales s multiply the
    projections' columns and 1/s goes into the op that makes their input. The model's function
    is unchanged before quantization (tests/test_model_quantizer.py). down first: its 1/s lands
    in up's rows, which the MLP search then sees."""
    from mojollm import quantization as qz

    names = _layer_names(i)
    for g, fold in (("down", f"blk.{i}.ffn_up.weight"), ("mlp", f"blk.{i}.ffn_norm.weight"),
                    ("attn", f"blk.{i}.attn_norm.weight"), ("o", f"blk.{i}.attn_v.weight")):
        key = (i, g)
        if key not in inputs:
            continue
        if g == "o" and weights[fold].shape[0] != weights[names["o"][0]].shape[1]:
            continue  # grouped heads: v's rows cannot carry one scale per attention channel
        s = qz.awq_search([weights[n] for n in names[g]], inputs[key].x, qtype).astype(np.float32)
        for n in names[g]:
            weights[n] = weights[n] * s[None, :]
        weights[fold] = weights[fold] / (s[:, None] if weights[fold].ndim == 2 else s)
        inputs[key].h = inputs[key].h / np.outer(s, s)  # the scaled input's X^T X


def _check_memory(src: Path, calibrated: bool) -> None:
    """Refuse, before any work, a model whose float32 copy would not fit in the host's available
    memory (the methods hold every tensor in float32; calibration loads a float32 model as well),
    rather than being killed half way."""
    from mojollm.backends import base
    from mojollm.models.gguf_loader import load_gguf

    # the loader's checks first: a damaged file gets its one-line reason
    weights = sum(int(np.prod(w.shape)) for w in load_gguf(str(src)).weights.values())
    need = weights * 4 * (2 if calibrated else 1)
    avail = base.host_available_bytes()
    if avail is not None and need > avail:
        raise ValueError(f"quantizing {src.name} holds its {weights / 1e9:.2f}B weights in float32 "
                         f"({'twice, with calibration: ' if calibrated else ''}{need / 2**30:.1f} GiB) but "
                         f"{avail / 2**30:.1f} GiB of memory is available")


def quantize_model(src, dst, method: str = "rtn", bits: int = 4, symmetric: bool = False,
                   group_size: int = 32, calib_text: str | None = None, calib_tokens: int = 16384,
                   act_order: bool = False, progress=None) -> dict:
    """Write `dst`, a GGUF of `src` quantized by `method`; returns a summary (sizes, types, timing).
    progress(message, done=..., total=...) hears of calibration windows and of each layer."""
    import time

    import gguf

    from mojollm import quantization as qz

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if group_size != 32:
        raise ValueError(f"group_size must be 32: GGUF's Q8_0 / Q4_0 / Q4_1 blocks hold 32 weights "
                         f"(other group sizes need formats without kernels here), got {group_size}")
    if not isinstance(calib_tokens, int) or calib_tokens < 16:
        raise ValueError(f"calib_tokens must be an integer >= 16, got {calib_tokens!r}")
    src, dst = Path(src), Path(dst)
    if src.suffix != ".gguf" or not src.is_file():
        raise ValueError(f"{src}: mojollm quantize takes a .gguf file (Llama family)")
    qtype = target_type(bits, symmetric)
    _check_memory(src, calibrated=method != "rtn")
    t0 = time.perf_counter()
    reader, tensors = read_gguf(src)
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    inputs, used = {}, 0
    if method != "rtn":
        with tempfile.TemporaryDirectory() as tmp:
            fp = write_float_gguf(src, Path(tmp) / "float.gguf", read=(reader, tensors))
            inputs, used = calibrate(fp, calib_text or default_calibration_text(), calib_tokens, progress)

    weights = {n: w for n, (w, _) in tensors.items()}
    out: dict[str, tuple[np.ndarray, object]] = {}
    for i in range(n_layers):
        names = _layer_names(i)
        if method == "awq":
            fold_awq_scales(weights, inputs, i, qtype)
        for g, ns in names.items():
            for n in ns:
                w = weights[n]
                if method == "gptq" and (i, g) in inputs:
                    q = qz.gptq(w, inputs[(i, g)].h, qtype, act_order=act_order)
                else:
                    q = qz.rtn(w, qtype)
                out[n] = (q.gguf_blocks(), gguf.GGMLQuantizationType[qtype])
        if progress:
            progress(f"quantizing ({method}, {qtype})", done=i + 1, total=n_layers)
    for n, (w, src_type) in tensors.items():
        if n in out:
            continue
        if n in ("token_embd.weight", "output.weight"):
            out[n] = (qz.rtn(weights[n], "Q8_0").gguf_blocks(), gguf.GGMLQuantizationType.Q8_0)
        elif w.ndim == 1 or n.endswith("norm.weight"):
            out[n] = (weights[n], None)
        else:
            out[n] = (qz.rtn(weights[n], "Q8_0").gguf_blocks(), gguf.GGMLQuantizationType.Q8_0)
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ordered = {t.name: out[t.name] for t in reader.tensors}  # the source's tensor order
    write_gguf(reader, dst, ordered, ftype)
    return {"method": method, "type": qtype, "bits": bits, "calibration_tokens": used, "layers": n_layers,
            "bytes": dst.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": round(8 * dst.stat().st_size / sum(w.size for w, _ in tensors.values()), 2)}

