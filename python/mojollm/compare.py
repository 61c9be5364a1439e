"""Backend comparison runs: the same prompts on every backend, timed the same way, checked against
a reference backend.

For each requested backend that probes available (the others are listed with their probe reason):

  1. load the model onto it (timed: load_s);
  2. greedy-generate `output_len` tokens for `batch` prompts of `prompt_len` tokens, driving the
     model directly with StepBatch plans (one prefill step for the whole batch, then one decode
     step per token; argmax on the host, the same for every backend). Warm-up runs are excluded;
     TTFT, prefill and decode tokens/s are medians over the repeats, inter-token latencies are
     percentiles over every decode step of every repeat. Clocks are read after synchronize().
  3. roofline: bytes a memory-bound decode must read per token (weights once per step + the KV of
     every cached position, see measure.decode_bytes_per_token) x decode tokens/s, as a fraction
     of the device bandwidth measured in this process;
  4. energy per generated token where the hardware reports energy or power (NVML, RAPL);
  5. correctness: teacher-forced logits of every sequence (prompt + the reference's greedy tokens)
     against the reference backend's: max |diff| relative to the reference logit range, top-1
     agreement, and the greedy tokens themselves. A top-1 or greedy disagreement is tolerated only
     where the reference itself nearly ties (margin at most twice the observed logit error, capped
     by the tolerance); anything else sets "ok": false, shown in red in the table. Never hidden.

The JSON document is described in bench/SCHEMA.md (SCHEMA_VERSION below).
"""

from __future__ import annotations

import gc
import math
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from mojollm import measure
from mojollm.engine.step import StepBatch

SCHEMA_VERSION = measure.SCHEMA_VERSION  # bench/SCHEMA.md
KIND = "mojollm.compare"

# A fixed English paragraph: prompts are slices of its tokens so every backend sees the same ids
# and a real model has decisive next-token preferences (random ids would make near-ties common).
PROMPT_TEXT = (
    "The history of computing is a story of memory as much as arithmetic. Early machines stored "
    "their programs on paper tape and their numbers in mercury delay lines; later ones used magnetic "
    "cores, then transistors etched in silicon. Each step made memory larger and faster, yet the "
    "processors grew faster still, so that today a chip can multiply numbers far more quickly than it "
    "can fetch them. Engineers call this the memory wall. Large language models live right against it: "
    "to produce each new word, the model must read all of its weights from memory once, and so the "
    "speed of generation is set less by the arithmetic units than by the bandwidth of the memory that "
    "feeds them. This is why a small model on a laptop can answer quickly, and why the largest models "
    "need many accelerators working together, each holding a slice of the weights close to its cores."
)


@dataclass
class Thresholds:
    """When a backend disagrees with the reference."""

    # max |logits - ref| / max |ref| over all checked positions. 5% admits bf16 tensor-core
    # activations (3.5% measured on a 12-layer model, cuda vs cpu); a broken kernel is far beyond.
    logits_rel_tol: float = 5e-2
    min_top1_agreement: float = 0.0  # raw fraction; decisive flips are checked separately (none allowed)

    def near_tie(self, max_abs_diff: float, scale: float) -> float:
        """A top-1 flip is explained by logit error when the reference's own margin between the two
        tokens is at most this: logits each off by at most e can swap only if they are <= 2e apart.
        e is the error observed, capped by the tolerance (NaN stays NaN: nothing is explained)."""
        return 2.0 * min(max_abs_diff, self.logits_rel_tol * scale)


@dataclass
class CompareConfig:
    model: str | None = None  # path to a GGUF file or HF directory; None = the default model
    backends: list[str] = field(default_factory=lambda: ["cpu"])  # or ["all"]
    prompt_len: int = 64
    output_len: int = 32
    batch: int = 1
    reference: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    block_size: int = 16
    thresholds: Thresholds = field(default_factory=Thresholds)

    def validate(self) -> None:
        for name in ("prompt_len", "batch", "repeats", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.output_len < 2:
            raise ValueError(f"output-len must be >= 2 to time decode steps (got {self.output_len})")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (got {self.warmup})")
        if not self.backends:
            raise ValueError("no backends requested")


# ---------------------------------------------------------------------------------------------
# driving a model directly with step plans


class ModelRunner:
    """Greedy generation and teacher-forced scoring of one loaded model, through StepBatch plans.

    Owns one KV cache big enough for `batch` sequences of `max_len` tokens; sequence s uses the
    blocks 1 + s*M .. (s+1)*M (block 0 stays unused, so a padded table entry never aliases data)."""

    def __init__(self, model: Any, backend: Any, batch: int, max_len: int, block_size: int):
        self.model, self.backend, self.block_size = model, backend, block_size
        self.blocks_per_seq = math.ceil(max_len / block_size)
        num_blocks = 1 + batch * self.blocks_per_seq
        model.allocate_kv_cache(num_blocks, block_size)
        self.tables = 1 + np.arange(batch * self.blocks_per_seq, dtype=np.int32).reshape(batch, self.blocks_per_seq)

    def forward(self, step: StepBatch) -> np.ndarray:
        """Host float32 logits [len(step.logits_indices), vocab] (the model synchronizes to copy them)."""
        return np.asarray(self.model.forward(step))

    def _prefill_step(self, prompts: np.ndarray) -> StepBatch:
        b, n = prompts.shape
        pos = np.tile(np.arange(n, dtype=np.int32), b)
        seq = np.repeat(np.arange(b), n)
        slots = self.tables[seq, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        return StepBatch(
            token_ids=prompts.reshape(-1).astype(np.int32), positions=pos, slot_mapping=slots,
            block_tables=self.tables, context_lens=np.full(b, n, dtype=np.int32),
            cu_seqlens_q=(np.arange(b + 1) * n).astype(np.int32),
            logits_indices=(np.arange(b) * n + n - 1).astype(np.int32), is_decode=(n == 1))

    def _decode_step(self, tokens: np.ndarray, pos: int) -> StepBatch:
        b = tokens.shape[0]
        slots = self.tables[:, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        return StepBatch(
            token_ids=tokens.astype(np.int32), positions=np.full(b, pos, dtype=np.int32), slot_mapping=slots,
            block_tables=self.tables, context_lens=np.full(b, pos + 1, dtype=np.int32),
            cu_seqlens_q=np.arange(b + 1, dtype=np.int32), logits_indices=np.arange(b, dtype=np.int32),
            is_decode=True)

    def generate(self, prompts: np.ndarray, output_len: int) -> dict:
        """Greedy tokens [B, N], TTFT (s) and the wall time of each decode step (s)."""
        b, n = prompts.shape
        out = np.empty((b, output_len), dtype=np.int64)
        t0 = measure.sync_clock(self.backend)
        out[:, 0] = self.forward(self._prefill_step(prompts)).argmax(-1)
        t_first = time.perf_counter()
        steps = []
        for j in range(1, output_len):
            ts = time.perf_counter()
            out[:, j] = self.forward(self._decode_step(out[:, j - 1], n + j - 1)).argmax(-1)
            steps.append(time.perf_counter() - ts)
        return {"tokens": out, "ttft_s": t_first - t0, "step_s": steps}

    def score(self, tokens: np.ndarray, seq: int = 0) -> np.ndarray:
        """Teacher-forced logits [T, vocab] of one sequence of tokens (one prefill step)."""
        step = StepBatch.single_sequence(tokens, 0, self.tables[seq], self.block_size, all_logits=True)
        return self.forward(step)


# ---------------------------------------------------------------------------------------------
# the cross-check


def cross_check(ref_logits: list[np.ndarray], logits: list[np.ndarray], ref_tokens: np.ndarray,
                tokens: np.ndarray, prompt_len: int, thresholds: Thresholds) -> dict:
    """Compare one backend with the reference.

    ref_logits / logits: per sequence, teacher-forced logits [L+N, vocab] on the same ids (prompt +
    the reference's greedy tokens). ref_tokens / tokens: greedy tokens [B, N] of each backend.
    Greedy token j of sequence s is the argmax of the reference logits at row prompt_len - 1 + j.
    """
    problems: list[str] = []
    scale = max(float(np.max(np.abs(r))) for r in ref_logits)
    max_abs = max(float(np.max(np.abs(x.astype(np.float64) - r))) for x, r in zip(logits, ref_logits))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if not rel <= thresholds.logits_rel_tol:  # catches NaN too
        problems.append(f"logits differ by {max_abs:.3g} ({rel:.2%} of the logit range, tolerance "
                        f"{thresholds.logits_rel_tol:.2%})")
    tie = thresholds.near_tie(max_abs, scale)

    # top-1 agreement over every teacher-forced position
    agree = total = decisive = 0
    for x, r in zip(logits, ref_logits):
        top_ref, top_x = r.argmax(-1), x.argmax(-1)
        rows = np.arange(r.shape[0])
        margin = r[rows, top_ref] - r[rows, top_x]  # >= 0; 0 where they agree
        agree += int(np.sum(top_ref == top_x))
        total += r.shape[0]
        decisive += int(np.sum((top_ref != top_x) & ~(margin <= tie)))
    top1 = agree / total
    if decisive:
        problems.append(f"top-1 differs at {decisive} position(s) where the reference is not near a tie")
    if top1 < thresholds.min_top1_agreement:
        problems.append(f"top-1 agreement {top1:.2%} is below {thresholds.min_top1_agreement:.2%}")

    # greedy tokens: identical, or diverging first at a reference near-tie
    match_len = []
    for s in range(ref_tokens.shape[0]):
        diff = np.nonzero(ref_tokens[s] != tokens[s])[0]
        j = int(diff[0]) if diff.size else ref_tokens.shape[1]
        match_len.append(j)
        if j < ref_tokens.shape[1] and s < len(ref_logits):
            row = ref_logits[s][prompt_len - 1 + j]
            margin = float(row[ref_tokens[s, j]] - row[tokens[s, j]])
            if not margin <= tie:
                problems.append(f"greedy sequence {s} diverges at token {j} (reference margin {margin:.3g} "
                                f"> near-tie {tie:.3g})")
    return {
        "logits_max_abs_diff": max_abs,
        "logits_rel_diff": rel,
        "logits_scale": scale,
        "top1_agreement": top1,
        "top1_decisive_mismatches": decisive,
        "greedy_match_len": match_len,
        "greedy_compared": int(ref_tokens.shape[1]),
        "near_tie_margin": tie,
        "ok": not problems,
        "problems": problems,
    }


# ---------------------------------------------------------------------------------------------
# the run


def _load_model(path: str, backend: Any) -> Any:
    from mojollm.models import load_model

    return load_model(path, backend)


def make_prompts(model: Any, prompt_len: int, batch: int) -> np.ndarray:
    """[batch, prompt_len] token ids: slices of PROMPT_TEXT's tokens (sequence b starts 7*b tokens
    later), or seeded random ids when the model has no tokenizer."""
    vocab = int(model.config.vocab_size)
    tok = getattr(model, "tokenizer", None)
    ids: list[int] = []
    if tok is not None:
        stream = tok.encode(PROMPT_TEXT, add_special_tokens=False)
        if stream:
            while len(ids) < prompt_len + 7 * batch:
                ids += stream
    ids = [i for i in ids if 0 <= i < vocab]
    if len(ids) < prompt_len + 7 * batch:
        ids = np.random.default_rng(0).integers(0, vocab, prompt_len + 7 * batch).tolist()
    return np.array([ids[7 * b:7 * b + prompt_len] for b in range(batch)], dtype=np.int32)


def model_info(model: Any, path: str, block_size: int) -> dict:
    cfg = model.config
    kv_per_block = int(model.kv_cache_bytes_per_block(block_size))
    return {
        "path": str(path),
        "arch": cfg.arch,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "weight_bytes": int(model.weight_bytes),
        "kv_bytes_per_token": kv_per_block / block_size,
    }


def _expand_backends(names: list[str]) -> list[str]:
    from mojollm.backends.registry import probe_all

    out: list[str] = []
    for n in names:
        n = n.strip().lower()
        if not n:
            continue
        for m in ([p.name for p in probe_all()] if n == "all" else [n]):
            if m not in out:
                out.append(m)
    return out


def run_backend(name: str, config: CompareConfig, path: str, progress: Callable[[str], None]) -> tuple[dict, dict]:
    """Measure one backend. Returns (its JSON entry, private data for the cross-check)."""
    from mojollm.backends.registry import get_backend, probe

    p = probe(name)
    entry: dict[str, Any] = {"name": name, "available": p.available, "device": p.device, "reason": p.reason}
    if not p.available:
        return entry, {}
    progress(f"{name}: loading the model")
    backend = get_backend(name)
    model = runner = None
    try:
        with measure.PeakMemory(name) as mem:
            t0 = measure.sync_clock(backend)
            model = _load_model(path, backend)
            entry["load_s"] = measure.sync_clock(backend) - t0
            info = model_info(model, path, config.block_size)
            prompts = make_prompts(model, config.prompt_len, config.batch)
            runner = ModelRunner(model, backend, config.batch, config.prompt_len + config.output_len,
                                 config.block_size)
            progress(f"{name}: warm-up ({config.warmup} run(s))")
            for _ in range(config.warmup):
                runner.generate(prompts, config.output_len)
            progress(f"{name}: {config.repeats} timed run(s)")
            runs = []
            with measure.EnergyMeter(name) as energy:
                for _ in range(config.repeats):
                    runs.append(runner.generate(prompts, config.output_len))
            tokens = runs[-1]["tokens"]
        if any(not np.array_equal(r["tokens"], tokens) for r in runs):
            entry.setdefault("warnings", []).append("greedy tokens differ between repeats (non-deterministic backend)")
        b, n, L = config.batch, config.output_len, config.prompt_len
        ttft = float(np.median([r["ttft_s"] for r in runs]))
        decode_s = [sum(r["step_s"]) for r in runs]
        steps = [s for r in runs for s in r["step_s"]]
        entry.update({
            "ttft_s": ttft,
            "prefill_tokens_per_s": b * L / ttft,
            "decode_tokens_per_s": float(np.median([b * (n - 1) / d for d in decode_s])),
            "itl_p50_s": measure.percentile(steps, 50),
            "itl_p99_s": measure.percentile(steps, 99),
            "peak_memory": mem.result(),
        })
        gen_tokens = config.repeats * b * n
        e = energy.result()
        entry["energy"] = {**e, "joules_per_token": e["joules"] / gen_tokens if e["joules"] is not None else None,
                           "tokens": gen_tokens}
        progress(f"{name}: measuring memory bandwidth")
        bw, how = measure.device_bandwidth_gbs(backend)
        bpt = measure.decode_bytes_per_token(info["weight_bytes"], info["kv_bytes_per_token"], L, n, b)
        entry["bandwidth"] = {"gbs": bw, "method": how}
        entry["roofline"] = measure.roofline_fraction(entry["decode_tokens_per_s"], bpt, bw)
        entry["greedy_tokens"] = tokens.tolist()
        return entry, {"runner": runner, "model": model, "info": info, "prompts": prompts, "tokens": tokens}
    except Exception as e:  # one backend failing must not hide the others' results
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["ok"] = False
        return entry, {}


def run_compare(config: CompareConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the comparison and return the JSON document (see bench/SCHEMA.md)."""
    from mojollm.model_store import resolve_model_path

    config.validate()
    progress = progress or (lambda msg: None)
    names = _expand_backends(config.backends)
    if config.reference not in names:
        names.insert(0, config.reference)
    else:  # the reference runs first so its greedy tokens define the checked sequence
        names.remove(config.reference)
        names.insert(0, config.reference)
    path = str(resolve_model_path(config.model, progress=progress))
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "command": None,  # the CLI fills in its command line
        "config": {**{k: v for k, v in asdict(config).items() if k != "thresholds"},
                   "model": path, "backends": names, "thresholds": asdict(config.thresholds)},
        "environment": measure.environment_info(),
        "model": None,
        "backends": [],
    }
    ref_logits: list[np.ndarray] | None = None
    ref_tokens = None
    for name in names:
        entry, data = run_backend(name, config, path, progress)
        doc["backends"].append(entry)
        if not data:
            if name == config.reference:
                entry["check"] = None
            continue
        doc["model"] = doc["model"] or data["info"]
        doc.setdefault("prompt_tokens", data["prompts"].tolist())
        progress(f"{name}: teacher-forced logits for the cross-check")
        try:
            seq_tokens = (ref_tokens if ref_tokens is not None else data["tokens"])
            full = np.concatenate([data["prompts"], seq_tokens.astype(np.int32)], axis=1)
            logits = [data["runner"].score(full[s], s) for s in range(full.shape[0])]
            if name == config.reference:
                ref_logits, ref_tokens = logits, data["tokens"]
                entry["check"] = {"reference": name, "is_reference": True, "ok": True, "problems": []}
            elif ref_logits is None:
                entry["check"] = {"reference": config.reference, "is_reference": False, "ok": None,
                                  "problems": [f"reference backend {config.reference!r} did not run"]}
            else:
                chk = cross_check(ref_logits, logits, ref_tokens, data["tokens"], config.prompt_len, config.thresholds)
                entry["check"] = {"reference": config.reference, "is_reference": False, **chk}
        except Exception as e:
            entry["check"] = {"reference": config.reference, "is_reference": name == config.reference,
                              "ok": False, "problems": [f"cross-check failed: {type(e).__name__}: {e}"]}
        entry["ok"] = entry["check"]["ok"] is not False
        del data
        gc.collect()  # free this backend's model before the next one loads (peak memory, RSS)
    ran = [b for b in doc["backends"] if b["available"]]
    doc["ok"] = all(b.get("ok", False) for b in ran) and bool(ran)
    return json_safe(doc)


def json_safe(x):
    """NaN/inf -> None and numpy scalars -> Python, so the document is strict JSON."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# presentation: one row per backend, shared by the rich table, the markdown table and the plot


PERF_COLUMNS = ["backend", "device", "load s", "TTFT ms", "prefill tok/s", "decode tok/s",
                "ITL p50/p99 ms", "peak MiB", "GB/s (roofline)", "J/token"]
CHECK_COLUMNS = ["backend", "vs", "max Δlogit", "rel. to range", "top-1 agree", "decisive flips",
                 "greedy match", "check"]


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def status_of(entry: dict) -> str:
    """ok | failed | reference | unchecked | error | unavailable."""
    if not entry["available"]:
        return "unavailable"
    if "error" in entry:
        return "error"
    chk = entry.get("check") or {}
    if chk.get("is_reference"):
        return "reference"
    if chk.get("ok") is False:
        return "failed"
    return "ok" if chk.get("ok") else "unchecked"


def perf_rows(doc: dict) -> list[tuple[list[str], str]]:
    """Cells of the performance table, one row per backend that ran, with its status."""
    rows = []
    for b in doc["backends"]:
        status = status_of(b)
        if status == "unavailable":
            continue
        if status == "error":
            rows.append(([b["name"], b.get("device", ""), f"error: {b['error']}"] + [""] * (len(PERF_COLUMNS) - 3), status))
            continue
        roof = b["roofline"]
        rows.append(([
            b["name"], b["device"], _fmt(b["load_s"], ".2f"), _fmt(b["ttft_s"], ".1f", 1e3),
            _fmt(b["prefill_tokens_per_s"], ".0f"), _fmt(b["decode_tokens_per_s"], ".1f"),
            f"{_fmt(b['itl_p50_s'], '.2f', 1e3)} / {_fmt(b['itl_p99_s'], '.2f', 1e3)}",
            _fmt(b["peak_memory"]["peak_bytes"], ".0f", 1 / 2**20),
            f"{_fmt(roof['achieved_gbs'], '.2f')} of {_fmt(b['bandwidth']['gbs'], '.1f')} ({_fmt(roof['fraction'], '.1%')})",
            _fmt(b["energy"]["joules_per_token"], ".3g"),
        ], status))
    return rows


def check_rows(doc: dict) -> list[tuple[list[str], str]]:
    """Cells of the correctness table."""
    rows = []
    for b in doc["backends"]:
        status = status_of(b)
        if status in ("unavailable", "error"):
            continue
        chk = b.get("check") or {}
        if status == "reference":
            cells = [b["name"], "–", "reference", "", "", "", "", "reference"]
        elif "logits_rel_diff" in chk:
            cells = [b["name"], chk["reference"], _fmt(chk["logits_max_abs_diff"], ".3g"),
                     _fmt(chk["logits_rel_diff"], ".2e"), _fmt(chk["top1_agreement"], ".1%"), str(chk["top1_decisive_mismatches"]),
                     f"{min(chk['greedy_match_len'])}/{chk['greedy_compared']}", "ok" if chk["ok"] else "FAILED"]
        else:
            cells = [b["name"], chk.get("reference", "–"), "–", "–", "–", "–", "–",
                     "FAILED" if status == "failed" else "unchecked"]
        rows.append((cells, status))
    return rows


def notes(doc: dict) -> list[tuple[str, str]]:
    """(text, kind) lines shown under the tables: unavailable backends, problems, warnings, methods."""
    out = []
    for b in doc["backends"]:
        if not b["available"]:
            out.append((f"{b['name']}: unavailable: {b['reason']}", "dim"))
    for b in doc["backends"]:
        for p in (b.get("check") or {}).get("problems", []):
            out.append((f"{b['name']}: {p}", "problem"))
        for w in b.get("warnings", []):
            out.append((f"{b['name']}: {w}", "warning"))
    for b in doc["backends"]:
        if b.get("bandwidth"):
            out.append((f"{b['name']}: bandwidth by {b['bandwidth']['method']}; peak memory by "
                        f"{b['peak_memory']['kind']}; energy: {b['energy']['source'] or 'not reported by the hardware'}",
                        "dim"))
    return out


def print_table(doc: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a file: do not squeeze the tables into 80 columns
            console = Console(width=160)
    cfg = doc["config"]
    styles = {"failed": "bold red", "error": "bold red", "unchecked": "yellow"}
    perf = Table(title=f"{str(cfg['model']).split('/')[-1]}: batch {cfg['batch']}, prompt {cfg['prompt_len']}, "
                       f"output {cfg['output_len']} tokens (median of {cfg['repeats']})")
    for c in PERF_COLUMNS:
        perf.add_column(c, justify="left" if c in ("backend", "device") else "right")
    for cells, status in perf_rows(doc):
        perf.add_row(*cells, style=styles.get(status))
    check = Table(title=f"correctness against {cfg['reference']} (teacher-forced logits, greedy tokens)")
    for c in CHECK_COLUMNS:
        check.add_column(c, justify="left" if c in ("backend", "vs", "check") else "right")
    for cells, status in check_rows(doc):
        check.add_row(*cells, style=styles.get(status))
    console.print(perf)
    console.print(check)
    colours = {"dim": "dim", "problem": "bold red", "warning": "yellow"}
    for text, kind in notes(doc):
        console.print(text, style=colours[kind], markup=False, highlight=False)


def _md(columns: list[str], rows: list[tuple[list[str], str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells, status in rows:
        if status in ("failed", "error"):
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def markdown_table(doc: dict) -> str:
    """Both tables and the notes, as GitHub markdown (failed rows in bold)."""
    lines = _md(PERF_COLUMNS, perf_rows(doc)) + [""] + _md(CHECK_COLUMNS, check_rows(doc)) + [""]
    for text, kind in notes(doc):
        lines.append(f"- {'**' + text + '**' if kind == 'problem' else text}")
    return "\n".join(lines)


class PlotUnavailable(Exception):
    pass


def write_plot(doc: dict, path: str) -> None:
    """PNG: decode and prefill tokens/s per backend, and the fraction of the bandwidth roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'mojollm[bench]'") from e
    ran = [b for b in doc["backends"] if b["available"] and "error" not in b]
    if not ran:
        raise PlotUnavailable("nothing to plot: no backend ran")
    failed = [(b.get("check") or {}).get("ok") is False for b in ran]
    def label(b: dict, bad: bool) -> str:
        device = textwrap.wrap(b["device"], 20) or [""]
        device = device[:2] if len(device) <= 2 else [device[0], device[1][:19] + "…"]
        status = {"reference": "(reference)", "ok": f"matches {doc['config']['reference']}",
                  "failed": "CHECK FAILED"}.get(status_of(b), "unchecked")
        return "\n".join([b["name"], *device, status])

    labels = [label(b, f) for b, f in zip(ran, failed)]
    colors = ["#d62728" if f else "#1f77b4" for f in failed]
    x = np.arange(len(ran))
    fig, axes = plt.subplots(1, 3, figsize=(max(12.6, 3 * (1.5 * len(ran) + 1.2)), 5.0))

    def roof_label(b):
        f, bw = b["roofline"]["fraction"], b["bandwidth"]["gbs"]
        return "n/a (no bandwidth)" if f is None else f"{100 * f:.1f}%\nof {bw:.1f} GB/s"

    panels = [
        ("decode tokens/s", [b["decode_tokens_per_s"] for b in ran], [f"{b['decode_tokens_per_s']:.1f}" for b in ran]),
        ("prefill tokens/s", [b["prefill_tokens_per_s"] for b in ran], [f"{b['prefill_tokens_per_s']:.0f}" for b in ran]),
        ("decode: % of memory-bandwidth roofline", [100 * (b["roofline"]["fraction"] or 0) for b in ran],
         [roof_label(b) for b in ran]),
    ]
    for ax, (title, values, texts) in zip(axes, panels):
        bars = ax.bar(x, values, color=colors, width=0.6)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        top = max(values) if max(values) > 0 else 1.0
        ax.set_ylim(0, top * 1.25)
        for bar, text in zip(bars, texts):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.02, text,
                    ha="center", va="bottom", fontsize=9)
    cfg, env = doc["config"], doc["environment"]
    model = doc.get("model") or {}
    fig.suptitle(f"mojollm compare — {str(cfg['model']).split('/')[-1]}  ·  batch {cfg['batch']}, prompt "
                 f"{cfg['prompt_len']}, output {cfg['output_len']}  ·  {env.get('cpu', '')}", fontsize=11)
    fig.text(0.5, 0.01, f"weights {model.get('weight_bytes', 0) / 2**20:.1f} MiB; roofline = "
             "(weights/batch + KV read) per token x decode tok/s / measured device bandwidth; red = "
             "disagrees with the reference", ha="center", fontsize=8, color="#444")
    fig.tight_layout(rect=(0, 0.035, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
