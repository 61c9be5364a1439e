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
   - smoothquant (W8A8): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from the calibration
     maxima, folded as AWQ's; then int8 per output channel (Q8_0 blocks repeating the row's
     scale), and the file marks the projections W8A8: their activations are quantized to int8
     per token at run time (gguf_loader.W8A8_KEY).
   - w8a8: the same without smoothing (SmoothQuant's naive baseline).
   - fp8: FP8 E4M3 per output channel (amax / 448, no calibration), written as a HF directory
     (quantize_to_fp8; mojollm.fp8 has the format).
4. The output is a GGUF in a block format mojollm's kernels run on cpu and cuda. 8 bits gives
   Q8_0; 4 bits gives Q4_1, or Q4_0 with `symmetric`. The token embedding (and an untied LM head)
   become Q8_0 by RTN for every method. Norms stay float32. The metadata is copied. Other
   tensors keep their source type.
5. Or, when `dst` is not a .gguf path (quantize_to_hf): a Hugging Face directory whose projections
   are GPTQ / AWQ packed integers on a quantization.Grid (2/3/4/8 bits; groups of 32/64/128 or per
   channel), the rest float16. The source may also be a float HF directory (read_hf); a GGUF's
   llama.cpp-permuted q / k rows are put back in HF's order, and its tokenizer is written out.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
W8A8_METHODS = ("smoothquant", "w8a8")  # 8-bit weights and per-token int8 activations at run time
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


def write_gguf(reader, dst: Path, tensors: dict[str, tuple[np.ndarray, object]], file_type,
               w8a8: list[str] | None = None) -> None:
    """A GGUF with `reader`'s metadata (every key with its own type) and `tensors`: name ->
    (a float32 / float16 array with None, or GGUF block bytes [rows, row_bytes] with their type).
    w8a8: the Q8_0 tensors to run with per-token int8 activations (gguf_loader.W8A8_KEY)."""
    import gguf

    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    if w8a8:
        from mojollm.models.gguf_loader import W8A8_KEY

        writer.add_array(W8A8_KEY, w8a8)
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
        self.amax = np.zeros(k, dtype=np.float32)  # per channel, over every token (SmoothQuant)
        self.rows: list[np.ndarray] = []
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """One calibration window's inputs [tokens, K] (its first row is the attention sink)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.h.shape[0])
        self.h += (x.T @ x).astype(np.float64)  # float32 per window (<= 1024 rows), summed in float64
        self.h += (_SINK_WEIGHT - 1) * np.outer(x[0], x[0]).astype(np.float64)
        self.amax = np.maximum(self.amax, np.abs(x).max(axis=0))
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


def fold_smoothing(weights: dict[str, np.ndarray], inputs: dict, i: int, alpha: float) -> None:
    """SmoothQuant for layer i, in place: per input channel j, s_j = max|X_j|^alpha /
    max|W_j|^(1 - alpha) over the calibration tokens and the projections sharing that input; the
    projections' columns take s, the op that makes their input takes 1/s (the same folds as AWQ:
    the RMSNorm weights, up's rows for down, v's rows for o when heads are not grouped). The
    activations' outlier channels shrink and the weights' grow, so both quantize to int8 per
    token / per block. The float model's function is unchanged (tests/test_model_quantizer.py)."""
    names = _layer_names(i)
    for g, fold in (("down", f"blk.{i}.ffn_up.weight"), ("mlp", f"blk.{i}.ffn_norm.weight"),
                    ("attn", f"blk.{i}.attn_norm.weight"), ("o", f"blk.{i}.attn_v.weight")):
        key = (i, g)
        if key not in inputs:
            continue
        if g == "o" and weights[fold].shape[0] != weights[names["o"][0]].shape[1]:
            continue  # grouped heads: v's rows cannot carry one scale per attention channel
        x_max = np.maximum(inputs[key].amax.astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(weights[n]).max(axis=0) for n in names[g]], axis=0), 1e-5)
        s = (x_max ** alpha / w_max ** (1 - alpha)).astype(np.float32)
        for n in names[g]:
            weights[n] = weights[n] * s[None, :]
        weights[fold] = weights[fold] / (s[:, None] if weights[fold].ndim == 2 else s)


def per_channel_q8(w: np.ndarray):
    """int8 per output channel (one float16 scale per row, max|w| / 127) as Q8_0 blocks that all
    repeat their row's scale: what an int8 GEMM with per-token activation scales needs (a GPU's
    int8 tensor cores take one scale per row and per column; SmoothQuant's weight format)."""
    from mojollm import quantization as qz

    d = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float16)
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return qz.Quantized("Q8_0", np.repeat(d[:, None], w.shape[1] // 32, axis=1), None, q)


def _check_memory(src: Path, calibrated: bool) -> None:
    """Refuse, before any work, a model whose float32 copy would not fit in the host's available
    memory (the methods hold every tensor in float32; calibration loads a float32 model as well),
    rather than being killed half way."""
    from mojollm.backends import base
    from mojollm.models.gguf_loader import load_gguf
    from mojollm.models.hf_loader import load_hf

    # the loader's checks first: a damaged file gets its one-line reason
    ckpt = load_hf(src) if src.is_dir() else load_gguf(str(src))
    weights = sum(int(np.prod(w.shape)) for w in ckpt.weights.values())
    need = weights * 4 * (2 if calibrated else 1)
    avail = base.host_available_bytes()
    if avail is not None and need > avail:
        raise ValueError(f"quantizing {src.name} holds its {weights / 1e9:.2f}B weights in float32 "
                         f"({'twice, with calibration: ' if calibrated else ''}{need / 2**30:.1f} GiB) but "
                         f"{avail / 2**30:.1f} GiB of memory is available")


def quantize_model(src, dst, method: str = "rtn", bits: int = 4, symmetric: bool = False,
                   group_size: int = 32, calib_text: str | None = None, calib_tokens: int = 16384,
                   act_order: bool = False, alpha: float = 0.5, progress=None) -> dict:
    """Write `dst`, a GGUF of `src` quantized by `method`; returns a summary (sizes, types, timing).
    progress(message, done=..., total=...) hears of calibration windows and of each layer.
    A `dst` that is not a .gguf path (or a HF directory `src`): quantize_to_hf, GPTQ / AWQ safetensors."""
    import time

    import gguf

    from mojollm import quantization as qz

    if method == "fp8":  # a HF directory of per-channel FP8 E4M3 projections (no bits / groups / calibration)
        return quantize_to_fp8(src, dst, progress=progress)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not str(dst).endswith(".gguf") or Path(src).is_dir():
        if Path(src).is_dir() and str(dst).endswith(".gguf"):
            raise ValueError(f"{src}: a HF directory source writes a HF directory (GPTQ / AWQ safetensors), "
                             "not a .gguf")
        return quantize_to_hf(src, dst, method, bits, symmetric, group_size, calib_text, calib_tokens, act_order,
                              progress)
    if group_size != 32:
        raise ValueError(f"group_size must be 32: GGUF's Q8_0 / Q4_0 / Q4_1 blocks hold 32 weights "
                         f"(other group sizes need formats without kernels here), got {group_size}")
    if method in W8A8_METHODS and bits != 8:
        raise ValueError(f"{method} is W8A8: it takes bits=8, got {bits}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (SmoothQuant's migration strength) must lie in [0, 1], got {alpha!r}")
    if not isinstance(calib_tokens, int) or calib_tokens < 16:
        raise ValueError(f"calib_tokens must be an integer >= 16, got {calib_tokens!r}")
    src, dst = Path(src), Path(dst)
    if src.suffix != ".gguf" or not src.is_file():
        raise ValueError(f"{src}: mojollm quantize takes a .gguf file (Llama family)")
    qtype = target_type(bits, symmetric)
    _check_memory(src, calibrated=method not in ("rtn", "w8a8"))
    t0 = time.perf_counter()
    reader, tensors = read_gguf(src)
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    inputs, used = {}, 0
    if method not in ("rtn", "w8a8"):
        with tempfile.TemporaryDirectory() as tmp:
            fp = write_float_gguf(src, Path(tmp) / "float.gguf", read=(reader, tensors))
            inputs, used = calibrate(fp, calib_text or default_calibration_text(), calib_tokens, progress)

    weights = {n: w for n, (w, _) in tensors.items()}
    out: dict[str, tuple[np.ndarray, object]] = {}
    for i in range(n_layers):
        names = _layer_names(i)
        if method == "awq":
            fold_awq_scales(weights, inputs, i, qtype)
        elif method == "smoothquant":
            fold_smoothing(weights, inputs, i, float(alpha))
        for g, ns in names.items():
            for n in ns:
                w = weights[n]
                if method == "gptq" and (i, g) in inputs:
                    q = qz.gptq(w, inputs[(i, g)].h, qtype, act_order=act_order)
                elif method in W8A8_METHODS:
                    q = per_channel_q8(w)
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
    w8a8 = [n for i in range(n_layers) for ns in _layer_names(i).values() for n in ns] if method in W8A8_METHODS else None
    write_gguf(reader, dst, ordered, ftype, w8a8=w8a8)
    return {"method": method, "type": qtype, "bits": bits, "calibration_tokens": used, "layers": n_layers,
            "bytes": dst.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": round(8 * dst.stat().st_size / sum(w.size for w, _ in tensors.values()), 2)}



# ----------------------------------------------------------------------------------------------
# Hugging Face directories: a float safetensors source, GPTQ / AWQ packed-integer output
# (mojollm.models.packed_int). Tensors keep GGUF names inside, as above.

_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja")
GRID_BITS = (8, 4, 3, 2)
GROUP_SIZES = (32, 64, 128, -1)


def hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (and the global tensors)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    _, i, part, kind = name.split(".")
    return f"model.layers.{i}.{_HF_LAYER[part]}.{kind}"


def read_hf(path: Path):
    """(checkpoint, {GGUF name: (float32 array [rows, cols], source type)}) of a float HF directory."""
    from mojollm.models import gguf_loader
    from mojollm.models.hf_loader import load_hf

    ckpt = load_hf(path)
    if "quantization_config" in ckpt.raw_config:
        raise ValueError(f"{path}: the model is quantized already (quantization_config): quantize a float checkpoint")
    # our names (layers.3.q_proj) back to GGUF's: the inverse of the GGUF loader's maps
    glob = {ours: gg for gg, ours in gguf_loader._GLOBAL_NAMES.items()}
    layer = {ours: gg for gg, ours in gguf_loader._LAYER_NAMES.items()}
    tensors = {}
    for ours, w in ckpt.weights.items():
        if ours.startswith("layers."):
            _, i, rest = ours.split(".", 2)
            name = f"blk.{i}.{layer[rest]}"
        else:
            name = glob[ours]
        tensors[name] = (w.to_float32(), w.qtype)
    return ckpt, tensors


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter's permute(): interleaved rope rows back
    to rotate_half's halves)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config_of_gguf(src: Path) -> tuple[dict, object]:
    """(config.json dict, tokenizer) of a Llama GGUF, for a HF directory beside its weights."""
    from mojollm.models.gguf_loader import load_gguf
    from mojollm.tokenizer import Tokenizer

    ckpt = load_gguf(str(src))
    c = ckpt.config
    if "rope_freqs" in ckpt.weights:
        raise ValueError(f"{src.name}: llama3 rope frequency factors (rope_freqs) have no config.json form here: "
                         "write a .gguf instead")
    tok = Tokenizer.from_gguf_metadata(ckpt.metadata, where=str(src))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "hidden_act": "silu",
           "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
           "bos_token_id": tok.bos_token_id, "eos_token_id": sorted(tok.eos_token_ids) or None}
    return cfg, tok


def _write_gguf_tokenizer(tok, dst: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json) of a tokenizer built from GGUF metadata. A HF
    tokenizer.json adds BOS / EOS itself (its post-processor), so the GGUF's add_bos / add_eos go there."""
    from tokenizers import processors

    backend = tok._tok
    s = tok.special_token_strings
    if tok.add_bos or tok.add_eos:
        bos = [(s["bos_token"], tok.bos_token_id)] if tok.add_bos and s.get("bos_token") else []
        eos = [(s["eos_token"], min(tok.eos_token_ids))] if tok.add_eos and s.get("eos_token") else []
        single = " ".join([t for t, _ in bos] + ["$A"] + [t for t, _ in eos])
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=bos + eos)
    backend.save(str(dst / "tokenizer.json"))
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in s.items() if v is not None}}
    if tok.chat_template:
        tcfg["chat_template"] = tok.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


def _output_format(method: str, grid, weights: dict, n_layers: int) -> str:
    """AWQ's GEMM layout where it holds the result (AWQ, 4 bits with zero points, whole groups,
    outputs in eights); GPTQ's otherwise (any bits, per-channel, partial last groups)."""
    if method != "awq" or grid.bits != 4 or grid.symmetric or grid.group_size == -1:
        return "gptq"
    shapes = [weights[n].shape for i in range(n_layers) for ns in _layer_names(i).values() for n in ns]
    return "awq" if all(r % 8 == 0 and c % grid.group_size == 0 for r, c in shapes) else "gptq"


def quantize_to_hf(src, dst, method: str = "rtn", bits: int = 4, symmetric: bool = False, group_size: int = 128,
                   calib_text: str | None = None, calib_tokens: int = 16384, act_order: bool = False,
                   progress=None) -> dict:
    """Write `dst`, a HF directory (config.json with quantization_config, model.safetensors,
    tokenizer files) of `src` (a Llama GGUF or a float HF directory) quantized by `method` on the grid
    (bits, group_size, symmetric): the projections packed as GPTQ (or AWQ: _output_format), the
    embeddings, norms and LM head float16. Returns a summary."""
    import shutil
    import time

    from safetensors.numpy import save_file

    from mojollm import quantization as qz
    from mojollm.models import packed_int

    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"a HF directory output takes method rtn, gptq or awq, got {method!r}")
    if bits not in GRID_BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"bits must be one of {GRID_BITS} and group_size one of {GROUP_SIZES}, "
                         f"got {bits}, {group_size}")
    if not isinstance(calib_tokens, int) or calib_tokens < 16:
        raise ValueError(f"calib_tokens must be an integer >= 16, got {calib_tokens!r}")
    src, dst = Path(src), Path(dst)
    if dst.suffix == ".gguf" or dst.is_file():
        raise ValueError(f"{dst}: a HF output is a directory")
    grid = qz.Grid(bits, group_size, symmetric)
    from_gguf = src.is_file() and src.suffix == ".gguf"
    if not from_gguf and not (src / "config.json").is_file():
        raise ValueError(f"{src}: mojollm quantize takes a .gguf file or a Hugging Face model directory")
    _check_memory(src, calibrated=method != "rtn")
    t0 = time.perf_counter()
    if from_gguf:
        reader, tensors = read_gguf(src)
        config, tok = _hf_config_of_gguf(src)
    else:
        ckpt, tensors = read_hf(src)
        config, tok = dict(ckpt.raw_config), None
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    inputs, used = {}, 0
    if method != "rtn":
        with tempfile.TemporaryDirectory() as tmp:
            fp = write_float_gguf(src, Path(tmp) / "float.gguf", read=(reader, tensors)) if from_gguf else src
            inputs, used = calibrate(fp, calib_text or default_calibration_text(), calib_tokens, progress)

    weights = {n: w for n, (w, _) in tensors.items()}
    if from_gguf:  # llama.cpp's q/k rows back in HF's order (rows are independent for every method)
        for i in range(n_layers):
            for part, heads in (("attn_q", config["num_attention_heads"]), ("attn_k", config["num_key_value_heads"])):
                weights[f"blk.{i}.{part}.weight"] = _unpermute(weights[f"blk.{i}.{part}.weight"], heads)
    fmt = _output_format(method, grid, weights, n_layers)
    qcfg = packed_int.quantization_config(fmt, grid, act_order)
    out: dict[str, np.ndarray] = {}
    for i in range(n_layers):
        if method == "awq":
            fold_awq_scales(weights, inputs, i, grid)
        for g, ns in _layer_names(i).items():
            for n in ns:
                if method == "gptq" and (i, g) in inputs:
                    q = qz.gptq(weights[n], inputs[(i, g)].h, grid, act_order=act_order)
                else:
                    q = qz.rtn(weights[n], grid)
                parts = (packed_int.awq_tensors(q) if fmt == "awq"
                         else packed_int.gptq_tensors(q, qcfg["checkpoint_format"]))
                prefix = hf_name(n)[:-len(".weight")]
                out.update({f"{prefix}.{k}": v for k, v in parts.items()})
        if progress:
            progress(f"quantizing ({method}, {fmt} {bits}-bit g{group_size})", done=i + 1, total=n_layers)
    for n, w in weights.items():
        if hf_name(n).endswith(".weight") and f"{hf_name(n)[:-len('.weight')]}.qweight" in out:
            continue
        out[hf_name(n)] = np.ascontiguousarray(w.astype(np.float16))

    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors.index.json",):  # a stale index would point the loader elsewhere
        (dst / f).unlink(missing_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.update({"quantization_config": qcfg, "torch_dtype": "float16"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok is not None:
        _write_gguf_tokenizer(tok, dst)
    else:
        for f in _TOKENIZER_FILES:
            if (src / f).is_file() and src.resolve() != dst.resolve():
                shutil.copyfile(src / f, dst / f)
    size = (dst / "model.safetensors").stat().st_size
    return {"method": method, "format": qcfg.get("checkpoint_format", fmt),
            "type": f"{fmt.upper()} {bits}-bit g{group_size}{' sym' if symmetric else ''}", "bits": bits,
            "group_size": group_size, "calibration_tokens": used, "layers": n_layers, "bytes": size,
            "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": round(8 * size / sum(w.size for w, _ in tensors.values()), 2)}


# ----------------------------------------------------------------------------------------------
# FP8: per-channel FP8 E4M3 projections in a HF directory (mojollm.fp8), the checkpoint form
# vLLM's and transformers' compressed-tensors loaders take (weights only: float activations)


def quantize_to_fp8(src, dst, progress=None) -> dict:
    """Write `dst`, a HF directory of `src` (a Llama GGUF or a float HF directory) whose projections
    are FP8 E4M3 with one scale per output channel (amax / 448, round to nearest even: no
    calibration). The embeddings, the LM head (in the quantization_config's ignore list, as FP8
    checkpoints keep it) and the norms are float16, as quantize_to_hf writes them. Returns a summary."""
    import shutil
    import time

    from mojollm import fp8

    src, dst = Path(src), Path(dst)
    if dst.suffix == ".gguf" or dst.is_file():
        raise ValueError(f"{dst}: --method fp8 writes a HF directory (FP8 safetensors), not a file")
    from_gguf = src.is_file() and src.suffix == ".gguf"
    if not from_gguf and not (src / "config.json").is_file():
        raise ValueError(f"{src}: mojollm quantize takes a .gguf file or a Hugging Face model directory")
    _check_memory(src, calibrated=False)
    t0 = time.perf_counter()
    if from_gguf:
        _, tensors = read_gguf(src)
        config, tok = _hf_config_of_gguf(src)
    else:
        ckpt, tensors = read_hf(src)
        config, tok = dict(ckpt.raw_config), None
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    projections = {n for i in range(n_layers) for ns in _layer_names(i).values() for n in ns}
    out: dict[str, np.ndarray] = {}
    for name, (w, _) in tensors.items():
        if from_gguf and name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's rows back in HF's order
            heads = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        if name in projections:
            codes, scales = fp8.quantize_per_channel(w)
            out[hf_name(name)] = codes
            out[hf_name(name) + "_scale"] = scales.reshape(-1, 1)
        else:
            if np.abs(w).max(initial=0) > np.finfo(np.float16).max:
                raise ValueError(f"{name}: values beyond float16's range")
            out[hf_name(name)] = w.astype(np.float16)
        if progress and name.startswith("blk.") and name.endswith("ffn_down.weight"):
            progress("quantizing (fp8 e4m3, per channel)", done=int(name.split(".")[1]) + 1, total=n_layers)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would point elsewhere
    fp8.save_safetensors(dst / "model.safetensors", out, metadata={"format": "pt"})
    config.update({"quantization_config": fp8.hf_quantization_config(), "torch_dtype": "float16"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok is not None:
        _write_gguf_tokenizer(tok, dst)
    else:
        for f in _TOKENIZER_FILES:
            if (src / f).is_file() and src.resolve() != dst.resolve():
                shutil.copyfile(src / f, dst / f)
    size = (dst / "model.safetensors").stat().st_size
    return {"method": "fp8", "type": "F8_E4M3 per channel", "bits": 8, "calibration_tokens": 0, "layers": n_layers,
            "bytes": size, "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": round(8 * size / sum(w.size for w, _ in tensors.values()), 2)}
