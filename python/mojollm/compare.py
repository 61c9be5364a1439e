"""Backend comparison runs: the same prompts on every backend, driven through the product's public
API (`LLM`), timed the same way, checked against a reference backend.

For each requested backend that probes available (the others are listed with their probe reason):

  1. build an `LLM` on it (timed: load_s, i.e. model load, weight preparation, KV cache and whatever
     the backend's runner prepares). Its KV pool holds the batch, the prefix cache is off (every
     repeat really prefills) and the step token budget holds the whole batch's prompts: one prefill
     step, then one decode step per token, the schedule the roofline assumes (a warning says when
     the engine ran another);
  2. greedy-generate `output_len` tokens for `batch` prompts of `prompt_len` tokens with
     `LLM.generate(prompts, SamplingParams(temperature=0, ignore_eos=True))`. Warm-up runs are
     excluded; TTFT, prefill and decode tokens/s are medians over the repeats, inter-token latencies
     percentiles over every token of every request and repeat, all from the requests' own metrics
     (RequestOutput.metrics: the engine's clock, read once a step's tokens are on the host);
  3. roofline: bytes a memory-bound decode must read per token (weights once per step + the KV of
     every cached position, see measure.decode_bytes_per_token) x decode tokens/s, as a fraction
     of the device bandwidth measured in this process (backend.memory_bandwidth_gbs);
  4. energy per generated token where the hardware reports energy or power (NVML, RAPL);
  5. correctness against the reference backend, on the log-probabilities the API returns:
       - `LLM.score(prompt + the reference's greedy tokens)`: log p of every token, teacher-forced
         on the same ids everywhere;
       - one more greedy run with the top-K log-probs of every next token (`logprobs=K`; the
         timed runs' shapes, so nothing new compiles), compared with the reference's wherever
         both runs followed the same tokens;
       - max |log p - reference log p| over all of these, relative to the reference's largest |log p|
         (its biggest surprise), must stay within the tolerance;
       - the greedy tokens of (2) must equal the reference's, or diverge first where the reference
         nearly tied the two candidates (its margin at most twice the observed log-prob error,
         capped by the tolerance: values each off by at most e can swap only within 2e).
     Anything else sets "ok": false, shown in red in the table. Never hidden.
  6. with speculative decoding (`CompareConfig.speculative`, LLM's `speculative` argument, the same
     for every backend, the reference included): the drafts proposed and accepted over the timed
     runs, the acceptance rate and the mean accepted length (tokens a verify step yields). The
     roofline still charges one weight read per token, so its fraction can pass 100%.

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
from mojollm.engine.metrics import acceptance_rate, mean_accepted_length
from mojollm.sampling_params import SamplingParams

SCHEMA_VERSION = 2  # of this kind (bench/SCHEMA.md): 2 since the cross-check compares log-probs, not logits
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

    # max |log p - ref log p| / max |ref log p| over all checked tokens. 5% was set on logits, where
    # bf16 tensor-core activations measured 3.3% of the logit range (cuda vs cpu, bench/RESULTS.md);
    # a broken kernel is far beyond.
    logprob_rel_tol: float = 5e-2

    def near_tie(self, max_abs_diff: float, scale: float) -> float:
        """A greedy token flip is explained by numerical error when the reference's own margin between the
        two tokens is at most this: log-probs each off by at most e can swap only if they are <= 2e
        apart (a log-prob margin is a logit margin: the normaliser cancels). e is the error
        observed, capped by the tolerance (NaN stays NaN: nothing is explained)."""
        return 2.0 * min(max_abs_diff, self.logprob_rel_tol * scale)


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
    check_top_k: int = 20  # next-token log-probs compared per position
    thresholds: Thresholds = field(default_factory=Thresholds)
    speculative: dict | None = None  # LLM's `speculative` argument for every backend, e.g. {"method": "ngram"}
    kv_cache_dtype: str = "auto"  # LLM's `kv_cache_dtype` for every backend (mojollm.kv_dtypes)

    def validate(self) -> None:
        for name in ("prompt_len", "batch", "repeats", "block_size", "check_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.output_len < 2:
            raise ValueError(f"output-len must be >= 2 to time decode steps (got {self.output_len})")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (got {self.warmup})")
        if not self.backends:
            raise ValueError("no backends requested")
        from mojollm.kv_dtypes import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.speculative is not None:
            from mojollm.engine.speculative import SpeculativeConfig

            if not isinstance(self.speculative, dict):
                raise ValueError("speculative must be a dict of SpeculativeConfig's fields")
            SpeculativeConfig.of(self.speculative)  # a bad method or value fails before any load


# ---------------------------------------------------------------------------------------------
# driving the product


def engine_options(batch: int, prompt_len: int, output_len: int, block_size: int) -> dict:
    """LLM/Engine options for timing one batch: a KV pool that holds it, no prefix cache (every
    repeat must really prefill), and a step token budget that takes the whole batch's prompts at
    once (one prefill step, then one decode step per token, all sequences in lockstep)."""
    return dict(block_size=block_size, num_blocks=batch * -(-(prompt_len + output_len) // block_size),
                max_num_seqs=batch, max_num_batched_tokens=max(512, batch * prompt_len),  # 512: the engine's default
                enable_prefix_caching=False)


def _generate(llm: Any, prompts: np.ndarray, params: SamplingParams) -> list:
    """`llm.generate` on the rows of `prompts` (token ids); a failed request fails the run."""
    outs = llm.generate([p.tolist() for p in prompts], params)
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return outs


def greedy_run(llm: Any, prompts: np.ndarray, output_len: int) -> dict:
    """One batch of greedy generation through `LLM.generate`: its tokens [B, N] and its timings,
    from the requests' metrics and the engine's stats.

    ttft_s: the batch's arrival to the last of its first tokens; decode_s: from there to its last
    token (every sequence decoding); itl_s: every inter-token latency of every request; steps,
    forward_s: the engine's steps and model time in this run; wall_s: the generate call;
    spec_steps, spec_proposed, spec_accepted: speculative verify steps, drafts proposed and accepted."""
    stats = llm.engine.stats
    steps0, forward0 = stats.steps, stats.forward_time
    spec0 = (stats.spec_steps, stats.spec_proposed, stats.spec_accepted)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = _generate(llm, prompts, params)
    wall = time.perf_counter() - t0
    metrics = [o.metrics for o in outs]
    first = max(m.first_token_time for m in metrics)
    return {
        "tokens": np.array([o.token_ids for o in outs], dtype=np.int64),
        "ttft_s": first - min(m.arrival_time for m in metrics),
        "decode_s": max(m.last_token_time for m in metrics) - first,
        "itl_s": [t for m in metrics for t in m.inter_token_latencies],
        "steps": stats.steps - steps0,
        "forward_s": stats.forward_time - forward0,
        "wall_s": wall,
        "spec_steps": stats.spec_steps - spec0[0],
        "spec_proposed": stats.spec_proposed - spec0[1],
        "spec_accepted": stats.spec_accepted - spec0[2],
    }


def speculative_summary(spec: dict, runs: list[dict]) -> dict:
    """Speculative decoding over the timed runs: the method and k, verify steps, drafts proposed
    and accepted, acceptance rate (accepted / proposed) and mean accepted length (tokens a verify
    step yields: accepted drafts + the target's own token, per step); None where nothing was proposed."""
    steps = sum(r["spec_steps"] for r in runs)
    proposed = sum(r["spec_proposed"] for r in runs)
    accepted = sum(r["spec_accepted"] for r in runs)
    return {
        "method": spec["method"],
        "num_tokens": spec.get("num_tokens", 4),
        "steps": steps,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": acceptance_rate(accepted, proposed),
        "mean_accepted_length": mean_accepted_length(accepted, steps),
    }


@dataclass
class CheckData:
    """What the cross-check compares of one backend."""

    greedy: np.ndarray  # [B, N] its greedy tokens (the timed runs)
    scores: np.ndarray  # [B, L+N-1] log p of every token of prompt + the reference's greedy tokens (LLM.score)
    path: np.ndarray  # [B, N] the greedy tokens of a run that also returned log-probs
    top: list[list[dict[int, float]]]  # [B][N] that run's top-K log p after prompt + path[:j], most likely first


def check_data(llm: Any, prompts: np.ndarray, greedy: np.ndarray, ref_greedy: np.ndarray, top_k: int) -> CheckData:
    """Teacher-forced scores of prompts + `ref_greedy`, and one more greedy run with top-K log-probs
    (the timed runs' shapes: nothing new to compile), on `llm`."""
    seqs = np.concatenate([prompts, ref_greedy], axis=1).tolist()
    scores = np.array([llm.score(s).logprobs for s in seqs], dtype=np.float64)
    outs = _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=greedy.shape[1], ignore_eos=True,
                                                  logprobs=top_k))
    return CheckData(greedy, scores, np.array([o.token_ids for o in outs], dtype=np.int64),
                     [[entry["top"] for entry in o.outputs[0].logprobs] for o in outs])


# ---------------------------------------------------------------------------------------------
# the cross-check


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else len(a)


def _shortfall(top: dict[int, float], token: int) -> float:
    """How far `token` lies below the most likely token of `top` (log-probs, most likely first),
    in log-prob units, i.e. logit units; inf when it is not in the top-K at all."""
    return next(iter(top.values())) - top.get(token, -math.inf)


def cross_check(ref: CheckData, got: CheckData, thresholds: Thresholds) -> dict:
    """Compare one backend with the reference.

    Log-prob error: the teacher-forced scores, and the top-K next tokens of both log-prob runs
    wherever they followed the same tokens. Greedy tokens: identical, or diverging first where the
    reference's own log-prob run, after the same tokens, nearly tied the two candidates.
    """
    problems: list[str] = []
    scale = float(np.max(np.abs(ref.scores)))
    diffs = [np.abs(got.scores - ref.scores).ravel()]
    for s, (ref_row, got_row) in enumerate(zip(ref.top, got.top, strict=True)):
        for j in range(min(_common_prefix(ref.path[s], got.path[s]) + 1, len(ref_row))):  # same path[:j]
            r, g = ref_row[j], got_row[j]
            diffs.append(np.array([abs(g[t] - r[t]) for t in r.keys() & g.keys()], dtype=np.float64))
    max_abs = float(np.max(np.concatenate(diffs)))  # NaN propagates
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if not rel <= thresholds.logprob_rel_tol:  # catches NaN too
        problems.append(f"log-probs differ by {max_abs:.3g} ({rel:.2%} of the reference's largest |log p|, "
                        f"tolerance {thresholds.logprob_rel_tol:.2%})")
    tie = thresholds.near_tie(max_abs, scale)

    n = ref.greedy.shape[1]
    match_len = []
    for s in range(ref.greedy.shape[0]):
        j = _common_prefix(ref.greedy[s], got.greedy[s])
        match_len.append(j)
        if j < n:
            # the reference's prediction after these j tokens, if its log-prob run followed them
            same = _common_prefix(ref.path[s], ref.greedy[s]) >= j
            margin = _shortfall(ref.top[s][j], int(got.greedy[s, j])) if same else math.inf
            if not margin <= tie:
                problems.append(f"greedy sequence {s} diverges at token {j} (reference margin {margin:.3g} "
                                f"> near-tie {tie:.3g})")
    return {
        "logprob_max_abs_diff": max_abs,
        "logprob_rel_diff": rel,
        "logprob_scale": scale,
        "near_tie_margin": tie,
        "greedy_match_len": match_len,
        "greedy_compared": n,
        "ok": not problems,
        "problems": problems,
    }


# ---------------------------------------------------------------------------------------------
# the run


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
        "kv_cache_dtype": getattr(model, "kv_dtype", None),
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


def run_backend(name: str, config: CompareConfig, path: str, reference: CheckData | None,
                progress: Callable[[str], None]) -> tuple[dict, dict]:
    """Measure one backend and check it against `reference` (None: this backend is the reference,
    or the reference has no results). Returns (its JSON entry, {"info", "prompts", "check_data"}
    when it ran)."""
    from mojollm.backends.registry import get_backend, probe
    from mojollm.llm import LLM

    p = probe(name)
    entry: dict[str, Any] = {"name": name, "available": p.available, "device": p.device, "reason": p.reason}
    if not p.available:
        return entry, {}
    progress(f"{name}: loading the model")
    b, n, L = config.batch, config.output_len, config.prompt_len
    try:
        backend = get_backend(name)
        with measure.PeakMemory(name) as mem:
            t0 = measure.sync_clock(backend)
            options = engine_options(b, L, n, config.block_size)
            if config.speculative is not None:
                options["speculative"] = dict(config.speculative)
            options["kv_cache_dtype"] = config.kv_cache_dtype
            llm = LLM(path, backend=name, **options)
            entry["load_s"] = measure.sync_clock(backend) - t0
            info = model_info(llm.model, path, config.block_size)
            prompts = make_prompts(llm.model, L, b)
            progress(f"{name}: warm-up ({config.warmup} run(s))")
            for _ in range(config.warmup):
                greedy_run(llm, prompts, n)
            progress(f"{name}: {config.repeats} timed run(s)")
            with measure.EnergyMeter(name) as energy:
                runs = [greedy_run(llm, prompts, n) for _ in range(config.repeats)]
        tokens = runs[-1]["tokens"]
        if any(not np.array_equal(r["tokens"], tokens) for r in runs):
            entry.setdefault("warnings", []).append("greedy tokens differ between repeats (non-deterministic backend)")
        # speculation runs fewer steps than tokens (a verify step yields several): only more is wrong
        if any(r["steps"] > n if config.speculative else r["steps"] != n for r in runs):
            entry.setdefault("warnings", []).append(
                f"the engine ran {runs[-1]['steps']} steps per run, not 1 prefill + {n - 1} decode steps: "
                "TTFT and decode time overlap")
        ttft = float(np.median([r["ttft_s"] for r in runs]))
        itls = [t for r in runs for t in r["itl_s"]]
        entry.update({
            "ttft_s": ttft,
            "prefill_tokens_per_s": b * L / ttft,
            "decode_tokens_per_s": float(np.median([b * (n - 1) / r["decode_s"] for r in runs])),
            "itl_p50_s": measure.percentile(itls, 50),
            "itl_p99_s": measure.percentile(itls, 99),
            "engine": {"steps_per_run": runs[-1]["steps"],
                       "forward_fraction": sum(r["forward_s"] for r in runs) / sum(r["wall_s"] for r in runs)},
            "peak_memory": mem.result(),
        })
        if config.speculative is not None:
            entry["speculative"] = speculative_summary(config.speculative, runs)
        gen_tokens = config.repeats * b * n
        e = energy.result()
        entry["energy"] = {**e, "joules_per_token": e["joules"] / gen_tokens if e["joules"] is not None else None,
                           "tokens": gen_tokens}
        progress(f"{name}: measuring memory bandwidth")
        bw, how = measure.device_bandwidth(backend)
        bpt = measure.decode_bytes_per_token(info["weight_bytes"], info["kv_bytes_per_token"], L, n, b)
        entry["bandwidth"] = {"gbs": bw, "method": how}
        entry["roofline"] = measure.roofline_fraction(entry["decode_tokens_per_s"], bpt, bw)
        entry["greedy_tokens"] = tokens.tolist()
    except Exception as e:  # one backend failing must not hide the others' results
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["ok"] = False
        return entry, {}

    is_reference = name == config.reference
    data = None
    if reference is None and not is_reference:
        entry["check"] = {"reference": config.reference, "is_reference": False, "ok": None,
                          "problems": [f"reference backend {config.reference!r} has no results to compare with"]}
    else:
        progress(f"{name}: teacher-forced log-probs for the cross-check")
        try:
            data = check_data(llm, prompts, tokens, tokens if is_reference else reference.greedy, config.check_top_k)
            entry["check"] = ({"reference": name, "is_reference": True, "ok": True, "problems": []} if is_reference
                              else {"reference": config.reference, "is_reference": False,
                                    **cross_check(reference, data, config.thresholds)})
        except Exception as e:
            entry["check"] = {"reference": config.reference, "is_reference": is_reference, "ok": False,
                              "problems": [f"cross-check failed: {type(e).__name__}: {e}"]}
    entry["ok"] = entry["check"]["ok"] is not False
    return entry, {"info": info, "prompts": prompts, "check_data": data}


def run_compare(config: CompareConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the comparison and return the JSON document (see bench/SCHEMA.md)."""
    from mojollm.model_store import resolve_model_path

    config.validate()
    progress = progress or (lambda msg: None)
    names = _expand_backends(config.backends)
    if config.reference in names:  # the reference runs first: its greedy tokens are the checked path
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
    reference: CheckData | None = None
    for name in names:
        entry, extras = run_backend(name, config, path, reference, progress)
        doc["backends"].append(entry)
        if extras:
            doc["model"] = doc["model"] or extras["info"]
            doc.setdefault("prompt_tokens", extras["prompts"].tolist())
            if name == config.reference:
                reference = extras["check_data"]
        elif name == config.reference:
            entry["check"] = None
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
SPEC_COLUMNS = ["spec accepted", "tok/step"]  # appended when the run used speculative decoding
CHECK_COLUMNS = ["backend", "vs", "max Δlog p", "rel. to max surprise", "near-tie margin", "greedy match", "check"]


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


def _speculative_run(doc: dict) -> bool:
    return bool(doc["config"].get("speculative"))


def perf_columns(doc: dict) -> list[str]:
    """The performance table's columns: PERF_COLUMNS, then SPEC_COLUMNS for a speculative run."""
    return PERF_COLUMNS + (SPEC_COLUMNS if _speculative_run(doc) else [])


def _spec_cells(b: dict) -> list[str]:
    spec = b.get("speculative") or {}
    rate, length = spec.get("acceptance_rate"), spec.get("mean_accepted_length")
    return [f"{_fmt(rate, '.1%')} of {spec.get('proposed', 0)}" if spec else "–", _fmt(length, ".2f")]


def perf_rows(doc: dict) -> list[tuple[list[str], str]]:
    """Cells of the performance table, one row per backend that ran, with its status."""
    rows = []
    width = len(perf_columns(doc))
    for b in doc["backends"]:
        status = status_of(b)
        if status == "unavailable":
            continue
        if status == "error":
            rows.append(([b["name"], b.get("device", ""), f"error: {b['error']}"] + [""] * (width - 3), status))
            continue
        roof = b["roofline"]
        rows.append(([
            b["name"], b["device"], _fmt(b["load_s"], ".2f"), _fmt(b["ttft_s"], ".1f", 1e3),
            _fmt(b["prefill_tokens_per_s"], ".0f"), _fmt(b["decode_tokens_per_s"], ".1f"),
            f"{_fmt(b['itl_p50_s'], '.2f', 1e3)} / {_fmt(b['itl_p99_s'], '.2f', 1e3)}",
            _fmt(b["peak_memory"]["peak_bytes"], ".0f", 1 / 2**20),
            f"{_fmt(roof['achieved_gbs'], '.2f')} of {_fmt(b['bandwidth']['gbs'], '.1f')} ({_fmt(roof['fraction'], '.1%')})",
            _fmt(b["energy"]["joules_per_token"], ".3g"),
        ] + (_spec_cells(b) if _speculative_run(doc) else []), status))
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
            cells = [b["name"], "–", "reference", "", "", "", "reference"]
        elif "logprob_rel_diff" in chk:
            cells = [b["name"], chk["reference"], _fmt(chk["logprob_max_abs_diff"], ".3g"),
                     _fmt(chk["logprob_rel_diff"], ".2e"), _fmt(chk["near_tie_margin"], ".3g"),
                     f"{min(chk['greedy_match_len'])}/{chk['greedy_compared']}", "ok" if chk["ok"] else "FAILED"]
        else:
            cells = [b["name"], chk.get("reference", "–"), "–", "–", "–", "–",
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
            engine = b["engine"]
            out.append((f"{b['name']}: bandwidth: {b['bandwidth']['method']}; peak memory: {b['peak_memory']['kind']}; "
                        f"energy: {b['energy']['source'] or 'not reported by the hardware'}; engine: "
                        f"{engine['steps_per_run']} steps per run, model forward {engine['forward_fraction']:.0%} "
                        "of the generate time", "dim"))
    spec = doc["config"].get("speculative")
    if spec:
        out.append((f"speculative decoding: {spec['method']}, {spec.get('num_tokens', 4)} drafts per step at most; "
                    "spec accepted = accepted / proposed draft tokens over the timed runs, tok/step = tokens a "
                    "verify step yields on average; the roofline still charges one weight read per token",
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
    spec = cfg.get("speculative")
    perf = Table(title=f"{str(cfg['model']).split('/')[-1]}: batch {cfg['batch']}, prompt {cfg['prompt_len']}, "
                       f"output {cfg['output_len']} tokens (median of {cfg['repeats']})"
                       + (f", speculative {spec['method']}" if spec else ""))
    for c in perf_columns(doc):
        perf.add_column(c, justify="left" if c in ("backend", "device") else "right")
    for cells, status in perf_rows(doc):
        perf.add_row(*cells, style=styles.get(status))
    check = Table(title=f"correctness against {cfg['reference']} (teacher-forced log-probs, top-{cfg['check_top_k']} "
                        "next-token log-probs, greedy tokens)")
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
    lines = _md(perf_columns(doc), perf_rows(doc)) + [""] + _md(CHECK_COLUMNS, check_rows(doc)) + [""]
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
