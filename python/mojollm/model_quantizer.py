"""Quantize a Llama-family model (`mojollm quantize`): one pipeline, three outputs.

    quantize_model("model.gguf", "out.gguf", method="gptq", bits=4, calib_text=..., progress=print)

In the order the data flows:
1. Read the source once (read_source): a GGUF (read_gguf) or a float Hugging Face directory
   (read_hf), every tensor dequantized to float32 under its GGUF name (blk.3.attn_q.weight): the
   baseline every method starts from. For a directory output from a GGUF, llama.cpp's permuted q / k
   rows go back to HF's order (rows are independent for every method), and config.json and the
   tokenizer are built from the GGUF's metadata.
2. Calibrate (gptq, awq, smoothquant): the float model runs on the cpu backend over `calib_tokens`
   tokens of text in windows of up to 1024 tokens; the input of every projection is recorded (X^T X
   in float64 for GPTQ, with each window's first token weighted by _SINK_WEIGHT; up to 512 rows of
   X, 32 per window, for AWQ; per-channel maxima for SmoothQuant). The same input feeds q, k and v
   (and gate and up), so they share it.
3. Per layer, fold per-input-channel scales s into the float weights, leaving the model's function
   unchanged: the projections' columns take s, and 1/s goes into the op that makes their input
   (the attention / MLP RMSNorm weight for q, k, v / gate, up; up's rows for down; v's rows for o,
   except with grouped heads (GQA), where v's rows would need one scale per kv head).
   - awq: s searched on the recorded rows (quantization.awq_search);
   - smoothquant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), so the activations' outlier
     channels shrink and both sides quantize to int8.
4. Per projection, encode (_encode):
   - rtn, awq: round to nearest on the output's grid (llama.cpp's rule for GGUF blocks);
   - gptq: GPTQ on the input's X^T X (columns in order, lazy batches of 128);
   - smoothquant, w8a8 (W8A8): int8 per output channel, scale max|row| / 127 as a float16
     (per_channel_q8); at run time each token's activations are rounded to int8 on their own scale.
     w8a8 is the same without smoothing (SmoothQuant's naive baseline);
   - fp8: FP8 E4M3 per output channel (amax / 448, mojollm.fp8; no calibration).
5. Write one output, chosen by `dst` and the method:
   - a .gguf (rtn, gptq, awq, smoothquant, w8a8): blocks mojollm's cpu and cuda kernels run: Q8_0
     at 8 bits, Q4_1 at 4 (Q4_0 with `symmetric`); W8A8 projections are Q8_0 blocks repeating the
     row's scale, named under gguf_loader.W8A8_KEY. The token embedding (and an untied LM head)
     become Q8_0 by RTN, norms stay float32, the metadata is copied.
   - a directory, rtn / gptq / awq: GPTQ or AWQ packed integers (mojollm.models.packed_int) on a
     quantization.Grid: 2/3/4/8 bits, groups of 32/64/128 or per channel.
   - a directory, fp8 / smoothquant / w8a8: compressed-tensors (mojollm.models.compressed_tensors),
     FP8 "float-quantized" or int8 "int-quantized" with dynamic per-token activations, which vLLM
     runs as its W8A8 int8 scheme.
   A directory holds config.json (with its quantization_config), model.safetensors (the projections,
   everything else float16, the LM head included) and the tokenizer files.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8", "fp8")
W8A8_METHODS = ("smoothquant", "w8a8")  # 8-bit weights and per-token int8 activations at run time
CALIBRATED = ("gptq", "awq", "smoothquant")
GROUP_SIZES = (32, 64, 128, -1)
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


# ----------------------------------------------------------------------------------------------
# 1. the source


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


_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


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


@dataclass
class Source:
    """The source, read once: float32 tensors by GGUF name and what the writers need."""

    path: Path
    tensors: dict[str, tuple[np.ndarray, object]]  # read_gguf / read_hf: (float32 [rows, cols], source type)
    reader: object | None  # a GGUF source's reader: its metadata, and the float copy calibration runs
    hf_config: dict | None  # config.json of a directory output
    tokenizer: object | None  # a GGUF source's tokenizer, for a directory output's tokenizer.json

    @property
    def n_layers(self) -> int:
        return 1 + max(int(n.split(".")[1]) for n in self.tensors if n.startswith("blk."))

    def weights(self, hf_order: bool) -> dict[str, np.ndarray]:
        """{GGUF name: float32 array}; hf_order: a GGUF's q / k rows put back in HF's order."""
        out = {n: w for n, (w, _) in self.tensors.items()}
        if hf_order and self.reader is not None:
            for n in out:
                if n.endswith(("attn_q.weight", "attn_k.weight")):
                    key = "num_attention_heads" if "attn_q" in n else "num_key_value_heads"
                    out[n] = _unpermute(out[n], self.hf_config[key])
        return out


def read_source(src: Path, hf_out: bool) -> Source:
    """A .gguf file or a float HF directory; hf_out: also what a directory output needs from a GGUF."""
    if src.is_file() and src.suffix == ".gguf":
        reader, tensors = read_gguf(src)
        config, tok = _hf_config_of_gguf(src) if hf_out else (None, None)
        return Source(src, tensors, reader, config, tok)
    ckpt, tensors = read_hf(src)
    return Source(src, tensors, None, dict(ckpt.raw_config), None)


# ----------------------------------------------------------------------------------------------
# 2. calibration


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


# ----------------------------------------------------------------------------------------------
# 3. folding per-layer scales (awq, smoothquant)


_GROUPS = {"attn": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "mlp": ("ffn_gate", "ffn_up"),
           "down": ("ffn_down",)}  # projections by the input they share


def _layer_names(i: int) -> dict[str, list[str]]:
    return {g: [f"blk.{i}.{p}.weight" for p in parts] for g, parts in _GROUPS.items()}


def _fold_layer(weights: dict[str, np.ndarray], inputs: dict, i: int, scales) -> None:
    """Layer i, in place: per input group, s = scales(its projections, its _Inputs) multiplies the
    projections' columns and 1/s goes into the op that makes their input, so the float model's
    function is unchanged (tests/test_model_quantizer.py, tests/test_w8a8.py). down first: its 1/s
    lands in up's rows, which the MLP's scales then see."""
    names = _layer_names(i)
    for g, fold in (("down", f"blk.{i}.ffn_up.weight"), ("mlp", f"blk.{i}.ffn_norm.weight"),
                    ("attn", f"blk.{i}.attn_norm.weight"), ("o", f"blk.{i}.attn_v.weight")):
        key = (i, g)
        if key not in inputs:
            continue
        if g == "o" and weights[fold].shape[0] != weights[names["o"][0]].shape[1]:
            continue  # grouped heads: v's rows cannot carry one scale per attention channel
        s = np.asarray(scales([weights[n] for n in names[g]], inputs[key]), np.float32)
        for n in names[g]:
            weights[n] = weights[n] * s[None, :]
        weights[fold] = weights[fold] / (s[:, None] if weights[fold].ndim == 2 else s)
        inputs[key].h = inputs[key].h / np.outer(s, s)  # the scaled input's X^T X


def fold_awq_scales(weights: dict[str, np.ndarray], inputs: dict, i: int, qtype) -> None:
    """AWQ for layer i, in place: per input group the scales s searched on the recorded inputs for
    the target `qtype` (a GGUF block type or a Grid), folded by _fold_layer."""
    from mojollm import quantization as qz

    _fold_layer(weights, inputs, i, lambda ws, inp: qz.awq_search(ws, inp.x, qtype))


def fold_smoothing(weights: dict[str, np.ndarray], inputs: dict, i: int, alpha: float) -> None:
    """SmoothQuant for layer i, in place: per input channel j, s_j = max|X_j|^alpha /
    max|W_j|^(1 - alpha) over the calibration tokens and the projections sharing that input,
    folded by _fold_layer. The activations' outlier channels shrink and the weights' grow, so both
    quantize to int8 per token / per channel."""

    def scales(ws: list[np.ndarray], inp: _Inputs) -> np.ndarray:
        x_max = np.maximum(inp.amax.astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(w).max(axis=0) for w in ws], axis=0), 1e-5)
        return x_max ** alpha / w_max ** (1 - alpha)

    _fold_layer(weights, inputs, i, scales)


# ----------------------------------------------------------------------------------------------
# 4. encoding one projection


def per_channel_q8(w: np.ndarray):
    """int8 per output channel (one float16 scale per row, d = max|w| / 127) as Q8_0 blocks that all
    repeat their row's scale: what an int8 GEMM with per-token activation scales needs (a GPU's
    int8 tensor cores take one scale per row and per column; SmoothQuant's weight format).
    q = round(w / d) in float32, half to even (d rounds to nearest, so |w / d| may pass 127 a little)."""
    from mojollm import quantization as qz

    w = np.asarray(w, np.float32)
    d = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    q = np.clip(np.rint(np.divide(w, d32, out=np.zeros_like(w), where=d32 != 0)), -127, 127).astype(np.int8)
    return qz.Quantized("Q8_0", np.repeat(d[:, None], w.shape[1] // 32, axis=1), None, q)


def _encode(method: str, w: np.ndarray, h: np.ndarray | None, target, act_order: bool):
    """One projection [out, in] (its scales folded already) as its writer takes it: for rtn / gptq /
    awq a quantization.Quantized (target a GGUF block type) or an IntQuantized (target a Grid); for
    smoothquant / w8a8 per-channel Q8_0 (per_channel_q8); for fp8 (E4M3 codes, float32 row scales).
    h: its input's X^T X, which gptq needs."""
    from mojollm import fp8
    from mojollm import quantization as qz

    if method == "fp8":
        return fp8.quantize_per_channel(w)
    if method in W8A8_METHODS:
        return per_channel_q8(w)
    if method == "gptq" and h is not None:
        return qz.gptq(w, h, target, act_order=act_order)
    return qz.rtn(w, target)


# ----------------------------------------------------------------------------------------------
# 5. the writers: a GGUF file, a HF directory (packed integers or compressed-tensors)


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


def _write_gguf_output(source: Source, dst: Path, weights: dict, encoded: dict, qtype: str, w8a8: bool) -> None:
    """The projections' blocks (W8A8 marked when w8a8); the other matrices Q8_0 by RTN (the token
    embedding, an untied LM head), norms and other vectors float32; the source's order and metadata."""
    import gguf

    from mojollm import quantization as qz

    out = {}
    for n, w in weights.items():
        if n in encoded:
            out[n] = (encoded[n].gguf_blocks(), gguf.GGMLQuantizationType[encoded[n].qtype])
        elif w.ndim == 1 or n.endswith("norm.weight"):
            out[n] = (w, None)
        else:
            out[n] = (qz.rtn(w, "Q8_0").gguf_blocks(), gguf.GGMLQuantizationType.Q8_0)
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(source.reader, dst, out, ftype, w8a8=list(encoded) if w8a8 else None)


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja")


def _write_hf_dir(source: Source, dst: Path, weights: dict, linears: dict[str, dict[str, np.ndarray]],
                  qcfg: dict) -> None:
    """config.json with `qcfg`; model.safetensors with each projection's tensors (`linears`: GGUF name
    -> {suffix: array}, stored as <module>.<suffix>) and every other tensor float16; the tokenizer."""
    import shutil

    from mojollm.models import compressed_tensors as ct

    out: dict[str, np.ndarray] = {}
    for n, w in weights.items():
        if n in linears:
            module = hf_name(n)[:-len(".weight")]
            out.update({f"{module}.{k}": v for k, v in linears[n].items()})
            continue
        if np.abs(w).max(initial=0) > np.finfo(np.float16).max:
            raise ValueError(f"{n}: values beyond float16's range")
        out[hf_name(n)] = w.astype(np.float16)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would point elsewhere
    ct.save_safetensors(dst / "model.safetensors", out, metadata={"format": "pt"})
    config = {**source.hf_config, "quantization_config": qcfg, "torch_dtype": "float16"}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source.tokenizer is not None:
        _write_gguf_tokenizer(source.tokenizer, dst)
    elif source.path.resolve() != dst.resolve():
        for f in _TOKENIZER_FILES:
            if (source.path / f).is_file():
                shutil.copyfile(source.path / f, dst / f)


def _write_packed_dir(source: Source, dst: Path, weights: dict, encoded: dict, method: str, grid,
                      act_order: bool) -> str:
    """GPTQ / AWQ packed integers (mojollm.models.packed_int); returns the checkpoint format."""
    from mojollm.models import packed_int

    fmt = _output_format(method, grid, weights, encoded)
    qcfg = packed_int.quantization_config(fmt, grid, act_order)
    pack = (packed_int.awq_tensors if fmt == "awq"
            else lambda q: packed_int.gptq_tensors(q, qcfg["checkpoint_format"]))
    _write_hf_dir(source, dst, weights, {n: pack(q) for n, q in encoded.items()}, qcfg)
    return qcfg.get("checkpoint_format", fmt)


def _output_format(method: str, grid, weights: dict, projections) -> str:
    """AWQ's GEMM layout where it holds the result (AWQ, 4 bits with zero points, whole groups,
    outputs in eights); GPTQ's otherwise (any bits, per-channel, partial last groups)."""
    if method != "awq" or grid.bits != 4 or grid.symmetric or grid.group_size == -1:
        return "gptq"
    shapes = [weights[n].shape for n in projections]
    return "awq" if all(r % 8 == 0 and c % grid.group_size == 0 for r, c in shapes) else "gptq"


def _write_compressed_tensors_dir(source: Source, dst: Path, weights: dict, encoded: dict, scheme: str) -> None:
    """compressed-tensors (mojollm.models.compressed_tensors): fp8 projections arrive as (E4M3 codes,
    row scales), W8A8 ones as per-channel Q8_0 (every block of a row repeats its scale)."""
    from mojollm.models import compressed_tensors as ct

    codes_scales = (lambda e: e) if scheme == "fp8" else (lambda q: (q.q, q.d[:, 0]))
    linears = {n: ct.linear_tensors(*codes_scales(e)) for n, e in encoded.items()}
    _write_hf_dir(source, dst, weights, linears, ct.quantization_config(scheme))


# ----------------------------------------------------------------------------------------------
# the pipeline


def quantize_model(src, dst, method: str = "rtn", bits: int = 4, symmetric: bool = False,
                   group_size: int = 32, calib_text: str | None = None, calib_tokens: int = 16384,
                   act_order: bool = False, alpha: float = 0.5, progress=None) -> dict:
    """Write `dst`, `src` (a Llama GGUF or a float HF directory) quantized by `method` (module
    docstring); returns a summary (sizes, types, timing). A `dst` ending in .gguf is a GGUF (bits 8
    or 4, group_size 32); any other a HF directory: GPTQ / AWQ packed integers for rtn / gptq / awq
    (bits 8/4/3/2, group_size 32/64/128/-1), compressed-tensors for fp8 / smoothquant / w8a8 (per
    channel: group_size and symmetric do not apply, nor bits to fp8). progress(message, done=...,
    total=...) hears of calibration windows and of each layer."""
    from mojollm import quantization as qz

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    src, dst = Path(src), Path(dst)
    kind = "gguf" if dst.suffix == ".gguf" else "packed" if method in ("rtn", "gptq", "awq") else "compressed-tensors"
    if method in W8A8_METHODS and bits != 8:
        raise ValueError(f"{method} is W8A8: it takes bits=8, got {bits}")
    target = None  # what a projection is quantized onto: a GGUF block type, or a Grid
    if kind == "gguf":
        if method == "fp8":
            raise ValueError(f"{dst}: --method fp8 writes a HF directory (compressed-tensors FP8), not a .gguf")
        if src.is_dir():
            raise ValueError(f"{src}: a HF directory source writes a HF directory (safetensors), not a .gguf")
        if group_size != 32:
            raise ValueError(f"group_size must be 32: GGUF's Q8_0 / Q4_0 / Q4_1 blocks hold 32 weights "
                             f"(other group sizes need formats without kernels here), got {group_size}")
        target = target_type(bits, symmetric)
    elif dst.is_file():
        raise ValueError(f"{dst}: a HF output is a directory")
    elif kind == "packed":
        if bits not in qz.GRID_BITS or group_size not in GROUP_SIZES:
            raise ValueError(f"bits must be one of {qz.GRID_BITS} and group_size one of {GROUP_SIZES}, "
                             f"got {bits}, {group_size}")
        target = qz.Grid(bits, group_size, symmetric)
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (SmoothQuant's migration strength) must lie in [0, 1], got {alpha!r}")
    if not isinstance(calib_tokens, int) or calib_tokens < 16:
        raise ValueError(f"calib_tokens must be an integer >= 16, got {calib_tokens!r}")
    if not (src.is_file() and src.suffix == ".gguf") and not (src / "config.json").is_file():
        raise ValueError(f"{src}: mojollm quantize takes a .gguf file (Llama family) or a Hugging Face model "
                         "directory")
    _check_memory(src, calibrated=method in CALIBRATED)
    t0 = time.perf_counter()

    source = read_source(src, hf_out=kind != "gguf")
    inputs, used = {}, 0
    if method in CALIBRATED:
        with tempfile.TemporaryDirectory() as tmp:  # the model runs from a file: a GGUF's float copy
            fp = (write_float_gguf(src, Path(tmp) / "float.gguf", read=(source.reader, source.tensors))
                  if source.reader is not None else src)
            inputs, used = calibrate(fp, calib_text or default_calibration_text(), calib_tokens, progress)

    weights = source.weights(hf_order=kind != "gguf")
    n_layers = source.n_layers
    label = target if kind == "gguf" else f"{bits}-bit g{group_size}" if kind == "packed" else "per channel"
    encoded = {}
    for i in range(n_layers):
        if method == "awq":
            fold_awq_scales(weights, inputs, i, target)
        elif method == "smoothquant":
            fold_smoothing(weights, inputs, i, float(alpha))
        for g, names in _layer_names(i).items():
            h = inputs[(i, g)].h if (i, g) in inputs else None
            for n in names:
                encoded[n] = _encode(method, weights[n], h, target, act_order)
        if progress:
            progress(f"quantizing ({method}, {label})", done=i + 1, total=n_layers)

    if kind == "gguf":
        _write_gguf_output(source, dst, weights, encoded, target, w8a8=method in W8A8_METHODS)
        summary = {"type": target, "bits": bits}
    elif kind == "packed":
        fmt = _write_packed_dir(source, dst, weights, encoded, method, target, act_order)
        summary = {"format": fmt, "type": f"{'AWQ' if fmt == 'awq' else 'GPTQ'} {bits}-bit g{group_size}"
                                          f"{' sym' if symmetric else ''}", "bits": bits, "group_size": group_size}
    else:
        scheme = "fp8" if method == "fp8" else "w8a8"
        _write_compressed_tensors_dir(source, dst, weights, encoded, scheme)
        summary = {"format": "float-quantized" if scheme == "fp8" else "int-quantized", "bits": 8,
                   "type": "F8_E4M3 per channel" if scheme == "fp8" else "W8A8 int8 per channel"}
    size = (dst if kind == "gguf" else dst / "model.safetensors").stat().st_size
    return {"method": method, **summary, "calibration_tokens": used, "layers": n_layers, "bytes": size,
            "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": round(8 * size / sum(w.size for w, _ in source.tensors.values()), 2)}
