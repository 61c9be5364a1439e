"""The `mojollm` command line.

    mojollm generate "The capital of France is" --max-tokens 16
    mojollm chat                      # interactive, /exit to leave
    mojollm perplexity wiki.txt --json
    mojollm serve --port 8000         # OpenAI-compatible HTTP server (mojollm.server)
    mojollm generate "..." --speculative ngram --num-speculative-tokens 4   # also chat, serve, bench
    mojollm pull | backends | build | bench throughput

Every user error (bad option, unusable backend, missing or corrupt model, prompt too long)
prints one line `error: ...` on stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import click

from mojollm.errors import MojollmError
from mojollm.kv_dtypes import KV_CACHE_DTYPES
from mojollm.llm import check_text


def _one_line(msg) -> str:
    return " ".join(str(msg).split()) or "unknown error"


def _error(msg) -> None:
    click.echo(f"error: {_one_line(msg)}", err=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class _Cli(click.Group):
    """A click group whose errors are one line on stderr (exit 2) instead of usage dumps/tracebacks."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if sys.stdout is None:  # started with stdout closed: everything printed would vanish
            _error("standard output is closed")
            sys.exit(2)
        try:
            rv = super().main(args=args, prog_name=prog_name or "mojollm", complete_var=complete_var,
                              standalone_mode=False, **extra)
            sys.stdout.flush()  # a full disk or closed pipe shows here, not as a silent exit 0
        except click.exceptions.Abort:
            _error("interrupted")
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            _silence_stdout()
            sys.exit(141)
        except click.ClickException as e:
            _error(e.format_message())
            sys.exit(e.exit_code if e.exit_code else 2)
        except (MojollmError, ValueError, OSError) as e:
            _error(e)
            sys.exit(2)
        except Exception as e:  # a bug: still one line unless asked for the traceback
            if os.environ.get("MOJOLLM_DEBUG"):
                raise
            _error(f"internal error ({type(e).__name__}): {e} (set MOJOLLM_DEBUG=1 for the traceback)")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mojollm", prog_name="mojollm")
def cli():
    """mojollm: LLM inference with Mojo kernels on cpu, cuda, rocm and tpu backends."""


def main(argv=None):
    """Console-script entry point (`mojollm`)."""
    cli.main(args=argv, prog_name="mojollm")


# ---------------------------------------------------------------- shared pieces

@contextmanager
def _progress(quiet: bool):
    """A callback for load/build progress messages: a rich spinner on stderr (nothing if quiet)."""
    if quiet:
        yield lambda *a, **k: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda msg, *a, **k: console.print(f"[dim]{msg}[/]", highlight=False)
        return
    with console.status("starting") as status:
        yield lambda msg, *a, **k: status.update(str(msg))


@contextmanager
def _progress_bar(quiet: bool):
    """Like _progress, for work with counted steps (progress(msg, done=i, total=n)): a rich bar
    on a terminal, the messages with their counts otherwise."""
    if quiet:
        yield lambda *a, **k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda msg, done=None, total=None: console.print(
            f"[dim]{msg}{f' {done}/{total}' if total else ''}[/]", highlight=False)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        tasks = {}

        def say(msg, done=None, total=None):
            if msg not in tasks:
                tasks[msg] = bar.add_task(msg, total=total)
            bar.update(tasks[msg], completed=done, total=total)

        yield say


def _load_llm(model, backend, quiet: bool, **engine_kwargs):
    """Load the model (progress on stderr); tests replace this to run the CLI on a fake model."""
    from mojollm.llm import LLM

    with _progress(quiet) as say:
        return LLM(model=model, backend=backend, progress=say, **engine_kwargs)


def _engine_kwargs(kv_cache_memory, max_model_len, speculative: dict | None = None,
                   kv_cache_dtype: str | None = None) -> dict:
    kw = {}
    if kv_cache_memory is not None:
        kw["kv_cache_memory"] = kv_cache_memory
    if kv_cache_dtype is not None:
        kw["kv_cache_dtype"] = kv_cache_dtype.lower()
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if speculative is not None:
        kw["speculative"] = speculative
    ctx = click.get_current_context(silent=True)
    kw.update(ctx.meta.get(_KV_POLICY_META, {}) if ctx is not None else {})  # --kv-policy / --kv-budget
    return kw


_KV_POLICY_META = "mojollm.kv_policy"


def _kv_policy_option(ctx, param, value):
    """--kv-policy, --kv-budget and --kv-sinks go to the engine through _engine_kwargs (every
    command with model_options), checked here before the model loads."""
    if value is not None:
        ctx.meta.setdefault(_KV_POLICY_META, {})[param.name] = value.lower() if param.name == "kv_policy" else value
    if param.name == "kv_budget" and value is not None:
        from mojollm.engine.kv_policy import parse_budget

        try:
            ctx.meta[_KV_POLICY_META]["kv_budget"] = parse_budget(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


DEFAULT_NUM_SPECULATIVE_TOKENS = 4
SPECULATIVE_METHODS = ("ngram", "draft", "self")


def speculative_options(f):
    """--speculative, --num-speculative-tokens, --draft-model, --draft-layers (see speculative_dict)."""
    opts = [
        click.option("--speculative", type=click.Choice(SPECULATIVE_METHODS, case_sensitive=False), default=None,
                     help="Speculative decoding: ngram (prompt lookup), draft (a smaller model, --draft-model) "
                          "or self (the model's own first layers). Default: off."),
        click.option("--num-speculative-tokens", type=click.IntRange(1, 16), default=None, metavar="K",
                     help=f"Tokens proposed per step (default {DEFAULT_NUM_SPECULATIVE_TOKENS}; "
                          "needs --speculative)."),
        click.option("--draft-model", type=click.Path(exists=True), default=None, metavar="PATH",
                     help="The draft model of --speculative draft (.gguf or Hugging Face directory, "
                          "same vocabulary)."),
        click.option("--draft-layers", type=click.IntRange(1), default=None, metavar="N",
                     help="--speculative self: draft with the first N layers (default: half of them)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def speculative_dict(method, num_tokens=None, draft_model=None, draft_layers=None) -> dict | None:
    """The `speculative` argument of LLM for the speculative options (None: off); a bad
    combination is a click.UsageError, raised before anything loads."""
    if method is None:
        given = [(flag, need) for flag, v, need in (
            ("--num-speculative-tokens", num_tokens, f"--speculative {' | '.join(SPECULATIVE_METHODS)}"),
            ("--draft-model", draft_model, "--speculative draft"),
            ("--draft-layers", draft_layers, "--speculative self")) if v is not None]
        if given:
            raise click.UsageError(f"{given[0][0]} needs {given[0][1]}")
        return None
    method = method.lower()
    if draft_model is not None and method != "draft":
        raise click.UsageError(f"--draft-model goes with --speculative draft, not {method}")
    if draft_layers is not None and method != "self":
        raise click.UsageError(f"--draft-layers goes with --speculative self, not {method}")
    if method == "draft" and draft_model is None:
        raise click.UsageError("--speculative draft needs --draft-model PATH (a smaller model with the same vocabulary)")
    spec: dict = {"method": method,
                  "num_tokens": DEFAULT_NUM_SPECULATIVE_TOKENS if num_tokens is None else num_tokens}
    if draft_model is not None:
        spec["draft_model"] = str(draft_model)
    if draft_layers is not None:
        spec["draft_layers"] = draft_layers
    from mojollm.engine.speculative import SpeculativeConfig

    try:
        SpeculativeConfig.of(spec)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return spec


def speculative_argv(spec: dict | None) -> list[str]:
    """The command-line flags that give `spec` (for recorded commands)."""
    if spec is None:
        return []
    argv = ["--speculative", spec["method"], "--num-speculative-tokens", str(spec["num_tokens"])]
    if "draft_model" in spec:
        argv += ["--draft-model", str(spec["draft_model"])]
    if "draft_layers" in spec:
        argv += ["--draft-layers", str(spec["draft_layers"])]
    return argv


def model_options(f):
    f = click.option("--kv-sinks", type=click.IntRange(0), default=None, expose_value=False, is_eager=False,
                     callback=_kv_policy_option, metavar="N",
                     help="sink-window: the first N tokens always kept (default 4, rounded up to whole blocks).")(f)
    f = click.option("--kv-budget", default=None, expose_value=False, callback=_kv_policy_option, metavar="N|F",
                     help="KV tokens kept per sequence under --kv-policy: N tokens, or a fraction F in (0, 1) "
                          "of the sequence length (sink-window default: the context).")(f)
    f = click.option("--kv-policy", type=click.Choice(("full", "sink-window", "h2o"), case_sensitive=False),
                     default=None, expose_value=False, callback=_kv_policy_option,
                     help="KV-cache compression: full (default), sink-window (StreamingLLM: sinks + recent "
                          "window; runs past the context with bounded memory) or h2o (heavy hitters + recent).")(f)
    f = click.option("--max-model-len", type=int, default=None, help="Cap the context length (tokens).")(f)
    f = click.option("--kv-cache-dtype", type=click.Choice(("auto",) + KV_CACHE_DTYPES, case_sensitive=False),
                     default=None, help="KV-cache element type (default auto: the backend's choice; int8 / fp8 "
                                        "keep a scale per token and head, ~3.8x the tokens of float32).")(f)
    f = click.option("--kv-cache-memory", default=None, metavar="SIZE",
                     help="KV-cache budget, e.g. 512MiB or 2GiB (default: 1 GiB at most).")(f)
    f = click.option("--backend", "-b", default=None,
                     help="cpu, cuda, rocm, tpu or auto (default: $MOJOLLM_BACKEND, else auto).")(f)
    f = click.option("--model", "-m", default=None, metavar="PATH",
                     help="A .gguf file or a Hugging Face directory (default: the default model).")(f)
    return f


def sampling_options(f):
    opts = [
        click.option("--max-tokens", type=int, default=128, show_default=True, help="New tokens at most."),
        click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass in (0, 1]."),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("--n", "n", type=int, default=1, show_default=True, help="Samples per prompt."),
        click.option("--beam-width", type=int, default=1, show_default=True, help=">1: beam search."),
        click.option("--length-penalty", type=float, default=1.0, show_default=True, help="Beam search only."),
        click.option("--logprobs", type=int, default=None, help="Also report the top-K log-probs per token."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--ignore-eos", is_flag=True, help="Do not stop at end-of-sequence tokens."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _sampling_params(kw: dict):
    from mojollm.sampling_params import SamplingParams

    return SamplingParams(
        n=kw["n"], max_tokens=kw["max_tokens"], temperature=kw["temperature"], top_k=kw["top_k"],
        top_p=kw["top_p"], min_p=kw["min_p"], repetition_penalty=kw["repetition_penalty"],
        presence_penalty=kw["presence_penalty"], frequency_penalty=kw["frequency_penalty"],
        stop=list(kw["stop"]) or None, ignore_eos=kw["ignore_eos"], seed=kw["seed"],
        logprobs=kw["logprobs"], beam_width=kw["beam_width"], length_penalty=kw["length_penalty"])


def _output_json(llm, out) -> dict:
    m = out.metrics
    doc = {
        "text": out.text,
        "token_ids": out.token_ids,
        "prompt_tokens": len(out.prompt_token_ids),
        "generated_tokens": m.num_generated_tokens,
        "finish_reason": out.finish_reason,
        "ttft_ms": None if m.ttft is None else round(m.ttft * 1e3, 3),
        "decode_tokens_per_s": None if m.decode_tokens_per_s is None else round(m.decode_tokens_per_s, 3),
        "backend": llm.backend_name,
    }
    if getattr(llm.engine, "speculative", None) is not None:
        doc["spec_steps"] = m.num_spec_steps
        doc["spec_proposed"] = m.num_spec_proposed
        doc["spec_accepted"] = m.num_spec_accepted
        doc["spec_acceptance_rate"] = m.spec_acceptance_rate
        doc["spec_mean_accepted_length"] = m.spec_mean_accepted_length
    if len(out.outputs) > 1 or any(o.logprobs is not None for o in out.outputs):
        doc["outputs"] = [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                           "cumulative_logprob": o.cumulative_logprob,
                           "logprobs": None if o.logprobs is None else [
                               {"token_id": e["token_id"], "logprob": e["logprob"],
                                "top": {str(k): v for k, v in e["top"].items()}} for e in o.logprobs]}
                          for o in out.outputs]
    if out.error:
        doc["error"] = out.error
    return doc


def _stats_line(llm, out) -> str:
    m = out.metrics
    parts = [f"{m.num_generated_tokens} tokens"]
    if m.ttft is not None:
        parts.append(f"TTFT {m.ttft * 1e3:.0f} ms")
    if m.decode_tokens_per_s is not None:
        parts.append(f"{m.decode_tokens_per_s:.1f} tok/s decode")
    if getattr(llm.engine, "speculative", None) is not None:
        if m.num_spec_proposed:
            parts.append(f"speculative: {m.spec_acceptance_rate:.0%} of {m.num_spec_proposed} drafts accepted, "
                         f"{m.spec_mean_accepted_length:.2f} tokens/step")
        else:
            parts.append("speculative: no drafts")
    if llm.backend_name:
        parts.append(f"backend {llm.backend_name}")
    return "[" + ", ".join(parts) + "]"


def _fail_on_error(out) -> None:
    if out is not None and out.error:
        raise MojollmError(out.error)


def _print_completion(llm, prompt_or_messages, params, as_json: bool, quiet: bool, chat: bool = False):
    """Stream (n = 1, no beams, not --json) or print the outputs of one prompt; returns the text."""
    if params.n == 1 and not params.use_beam_search and not as_json:
        stream = llm.chat_stream(prompt_or_messages, params) if chat else llm.stream(prompt_or_messages, params)
        for delta in stream:
            click.echo(delta, nl=False)
        click.echo()
        out = stream.output
        _fail_on_error(out)
        if not quiet and out is not None:
            click.echo(_stats_line(llm, out), err=True)
        return out.text if out is not None else ""
    out = llm.chat(prompt_or_messages, params) if chat else llm.generate(prompt_or_messages, params)[0]
    _fail_on_error(out)
    if as_json:
        click.echo(json.dumps(_output_json(llm, out)))
    else:
        for o in out.outputs:
            if len(out.outputs) > 1:
                head = f"--- {'beam' if params.use_beam_search else 'sample'} {o.index}"
                if o.cumulative_logprob is not None:
                    head += f" (logprob {o.cumulative_logprob:.3f})"
                click.echo(head + " ---")
            click.echo(o.text)
        if not quiet:
            click.echo(_stats_line(llm, out), err=True)
    return out.text


# ---------------------------------------------------------------- commands

@cli.command()
@click.argument("prompt")
@model_options
@sampling_options
@speculative_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or statistics on stderr.")
def generate(prompt, model, backend, kv_cache_memory, kv_cache_dtype, max_model_len, speculative, num_speculative_tokens, draft_model,
             draft_layers, as_json, quiet, **kw):
    """Complete PROMPT (streams the text as it is decoded)."""
    if prompt == "":
        raise click.UsageError("the prompt is empty")
    check_text(prompt, "the prompt")  # undecodable bytes fail here, before the model loads
    params = _sampling_params(kw)  # bad values fail here, before the model loads
    spec = speculative_dict(speculative, num_speculative_tokens, draft_model, draft_layers)
    llm = _load_llm(model, backend, quiet, **_engine_kwargs(kv_cache_memory, max_model_len, spec, kv_cache_dtype))
    _print_completion(llm, prompt, params, as_json, quiet)


@cli.command()
@click.argument("prompt", required=False)
@model_options
@sampling_options
@speculative_options
@click.option("--system", default=None, help="A system message opening the conversation.")
@click.option("--json", "as_json", is_flag=True, help="One turn: print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or statistics on stderr.")
def chat(prompt, model, backend, kv_cache_memory, kv_cache_dtype, max_model_len, speculative, num_speculative_tokens, draft_model,
         draft_layers, system, as_json, quiet, **kw):
    """Chat with the model: one turn for PROMPT, else interactive (/exit or Ctrl-D to leave)."""
    if prompt is not None and prompt.strip() == "":
        raise click.UsageError("the prompt is empty")
    for text, what in ((prompt, "the prompt"), (system, "the system message")):
        if text is not None:
            check_text(text, what)
    params = _sampling_params(kw)
    spec = speculative_dict(speculative, num_speculative_tokens, draft_model, draft_layers)
    llm = _load_llm(model, backend, quiet, **_engine_kwargs(kv_cache_memory, max_model_len, spec, kv_cache_dtype))
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _print_completion(llm, history + [{"role": "user", "content": prompt}], params, as_json, quiet, chat=True)
        return
    stdin = sys.stdin
    interactive = stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _print_completion(llm, history, params, False, quiet, chat=True)
        except (MojollmError, ValueError) as e:  # e.g. the history outgrew the context: say so, go on
            history.pop()
            _error(e)
            continue
        history.append({"role": "assistant", "content": reply})


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@model_options
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens of the file.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def perplexity(file, model, backend, kv_cache_memory, kv_cache_dtype, max_model_len, max_tokens, as_json, quiet):
    """Perplexity of the model on a text FILE (windows of the context length)."""
    if max_tokens is not None and max_tokens < 2:
        raise click.UsageError(f"--max-tokens must be >= 2, got {max_tokens}")
    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise click.UsageError(f"{file} is not UTF-8 text ({e.reason})")
    if not text.strip():
        raise click.UsageError(f"{file} is empty")
    llm = _load_llm(model, backend, quiet, **_engine_kwargs(kv_cache_memory, max_model_len, kv_cache_dtype=kv_cache_dtype))
    res = llm.perplexity(text, max_tokens=max_tokens)
    if as_json:
        click.echo(json.dumps({"ppl": res["ppl"], "tokens": res["tokens"], "nll": res["nll"],
                               "backend": llm.backend_name}))
    else:
        click.echo(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens")


@cli.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq", "smoothquant", "w8a8", "fp8"]), default="rtn",
              show_default=True,
              help="Round to nearest, GPTQ (Hessian from calibration activations), AWQ (activation-aware scales), "
                   "SmoothQuant W8A8 (int8 weights and per-token int8 activations), W8A8 without smoothing, or "
                   "FP8 E4M3 per output channel (a HF directory only).")
@click.option("--bits", type=int, default=4, show_default=True,
              help="8, 4, 3 or 2. A .gguf holds 8 (Q8_0) or 4 (Q4_1; Q4_0 with --symmetric); a directory any.")
@click.option("--symmetric", is_flag=True, help="No zero point / per-block minimum (4 bits in a .gguf: Q4_0).")
@click.option("--group-size", type=int, default=32, show_default=True,
              help="Weights per scale: 32, 64, 128 or -1 (per output channel); a .gguf holds 32.")
@click.option("--calib", "calib_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text (default: the docs that ship with CPython, ~150k tokens).")
@click.option("--calib-tokens", type=int, default=16384, show_default=True)
@click.option("--act-order", is_flag=True, help="GPTQ: columns by decreasing activation energy.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="SmoothQuant's migration strength: the share of the activations' range moved into the weights.")
@click.option("--out", "out", required=True, type=click.Path(),
              help="A .gguf file, or a directory: Hugging Face GPTQ / AWQ safetensors (rtn, gptq, awq) or "
                   "compressed-tensors (fp8; W8A8 int8 for smoothquant, w8a8).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def quantize(model, method, bits, symmetric, group_size, calib_file, calib_tokens, act_order, alpha, out, as_json,
             quiet):
    """Quantize a Llama-family MODEL (a GGUF, or a float Hugging Face directory) by RTN, GPTQ, AWQ,
    SmoothQuant / W8A8 or FP8 into a GGUF (Q8_0 / Q4_1 / Q4_0 blocks, which the cpu and cuda kernels
    run) or, when --out is a directory, Hugging Face safetensors: GPTQ / AWQ packed integers (2-8 bits,
    groups of 32 / 64 / 128 or per channel) or compressed-tensors (FP8, or W8A8 int8 per channel)."""
    from mojollm.model_quantizer import quantize_model, target_type

    if method == "fp8":  # FP8 E4M3 per channel into a HF directory: no bits, groups or calibration
        given = [f"--{n.replace('_', '-')}" for n in ("bits", "symmetric", "group_size", "calib_file", "calib_tokens",
                                                       "act_order", "alpha")
                 if click.get_current_context().get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given).replace('--calib-file', '--calib')} do not apply to "
                                   "--method fp8 (8-bit E4M3, one scale per output channel, no calibration)")
        if out.endswith(".gguf"):
            raise click.UsageError(f"--method fp8 writes a Hugging Face directory, not a .gguf: got --out {out}")
    else:  # a .gguf (GGUF's blocks) or a directory (GPTQ / AWQ packed integers, any grid)
        if bits not in (8, 4, 3, 2):
            raise click.UsageError(f"--bits must be 8, 4, 3 or 2, got {bits}")
        if group_size not in (32, 64, 128, -1):
            raise click.UsageError(f"--group-size must be 32, 64, 128 or -1 (per output channel), got {group_size}")
        if out.endswith(".gguf"):
            if os.path.isdir(model):
                raise click.UsageError("a Hugging Face directory MODEL writes a directory (GPTQ / AWQ safetensors): "
                                       f"give --out a directory, not {out}")
            try:
                target_type(bits, symmetric)
            except ValueError as e:
                raise click.UsageError(f"{e}; --out DIR writes other bits")
            if symmetric and bits != 4:
                raise click.UsageError("--symmetric applies to 4 bits (Q4_0); 8 bits are always symmetric (Q8_0)")
            if group_size != 32:
                raise click.UsageError(f"group_size must be 32: GGUF's Q8_0 / Q4_0 / Q4_1 blocks hold 32 weights, "
                                       f"got {group_size}; --out DIR writes other group sizes")
        elif os.path.isfile(out):
            raise click.UsageError(f"--out {out} is a file: give a directory (HF safetensors) or a .gguf path")
        elif method in ("smoothquant", "w8a8") and (symmetric or group_size != 32):
            raise click.UsageError(f"--symmetric and --group-size do not apply to --method {method} into a directory "
                                   "(compressed-tensors W8A8: symmetric int8, one scale per output channel)")
    if calib_tokens < 16:
        raise click.UsageError(f"--calib-tokens must be >= 16, got {calib_tokens}")
    if method in ("rtn", "w8a8") and (calib_file or act_order):
        raise click.UsageError(f"--calib and --act-order apply to gptq / awq ({method} uses no calibration)")
    if method in ("smoothquant", "w8a8") and bits != 8:
        raise click.UsageError(f"--method {method} is W8A8: give --bits 8")
    if act_order and method != "gptq":
        raise click.UsageError("--act-order applies to gptq")
    text = None
    if calib_file:
        try:
            with open(calib_file, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise click.UsageError(f"{calib_file} is not UTF-8 text ({e.reason})")
    with _progress_bar(quiet) as say:
        summary = quantize_model(model, out, method=method, bits=bits, symmetric=symmetric,
                                 group_size=group_size, calib_text=text, calib_tokens=calib_tokens,
                                 act_order=act_order, alpha=alpha, progress=say)
    if as_json:
        click.echo(json.dumps({**summary, "out": out}))
    else:
        click.echo(f"{out}: {summary['type']} by {method}, {summary['bytes'] / 2**20:.1f} MiB "
                   f"({summary['bits_per_weight']} bits/weight), {summary['seconds']} s")


@cli.command()
@click.option("--quiet", "-q", is_flag=True)
def pull(quiet):
    """Download the default model into the cache (once)."""
    from mojollm import model_store

    with _progress(quiet) as say:
        path = model_store.pull(progress=say)
    click.echo(str(path))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def backends(as_json):
    """List the backends and whether each can run here (and why not)."""
    from mojollm.backends import probe_all

    probes = [p.as_dict() for p in probe_all()]
    if as_json:
        click.echo(json.dumps(probes))
        return
    width = max(len(p["name"]) for p in probes)
    for p in probes:
        state = "available" if p["available"] else "unavailable"
        detail = p["device"] if p["available"] else p["reason"]
        click.echo(f"{p['name']:<{width}}  {state:<11}  {detail}")


@cli.command()
@click.option("--target", "targets", multiple=True,
              help="host (default), cuda:sm_XX or rocm:gfxNNN; repeatable.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write DIR/<target>/<module>.so (the layout MOJOLLM_KERNEL_DIR reads).")
@click.option("--model", "-m", "model", default=None, metavar="PATH",
              help="Also build the GPU targets' kernels specialised for this model's shapes "
                   "(.gguf file or Hugging Face directory; 'default' for the default model).")
@click.option("--quiet", "-q", is_flag=True)
def build(targets, out_dir, model, quiet):
    """Compile every kernel module for the given targets (cached; --out for prebuilt sets)."""
    from pathlib import Path

    from mojollm.kernels import Target, available_modules, build_module

    parsed = [Target.parse(t) for t in (targets or ("host",))]
    with _progress(quiet) as say:
        specialised = None
        if model is not None:
            from mojollm.backends.cuda.backend import CudaBackend, library_defines
            from mojollm.models import load_checkpoint
            from mojollm.models.llama import kernel_specialisation

            _, ckpt = load_checkpoint(None if model == "default" else model, progress=say)
            specialised = kernel_specialisation(ckpt.config, ckpt.weights, CudaBackend.kv_cache_dtype)
        for target in parsed:
            backend = "cpu" if target.kind == "host" else target.kind
            names = available_modules(backend)
            if not names:
                raise MojollmError(f"no kernel modules found for {target} (backend folder {backend!r})")
            dest = Path(out_dir) / target.dirname if out_dir else None
            for name in names:
                path = build_module(name, backend, target, out_dir=dest, progress=say)
                click.echo(f"{target}\t{name}\t{path}")
            if specialised is not None and target.kind in ("cuda", "rocm"):
                defines = library_defines(*specialised, nvidia=target.kind == "cuda")
                path = build_module("gpu_library", backend, target, out_dir=dest, progress=say, defines=defines)
                click.echo(f"{target}\tgpu_library (model)\t{path}")


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="MOJOLLM_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` (default: $MOJOLLM_API_KEY, else no key).")
@click.option("--served-model-name", default=None, help="The model's name in the API (default: its file name).")
@click.option("--max-num-seqs", type=click.IntRange(1), default=64, show_default=True,
              help="Requests decoded together in one batch.")
@click.option("--max-queue", type=click.IntRange(0), default=256, show_default=True,
              help="Requests that may wait for a batch slot; more are answered 429.")
@click.option("--max-body-size", default="1MiB", show_default=True, metavar="SIZE",
              help="Largest request body; larger ones are answered 413.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are aborted.")
@speculative_options
@click.option("--quiet", "-q", is_flag=True, help="Warnings and errors only.")
def serve(model, backend, kv_cache_memory, kv_cache_dtype, max_model_len, host, port, api_key, served_model_name, max_num_seqs,
          max_queue, max_body_size, shutdown_timeout, speculative, num_speculative_tokens, draft_model, draft_layers,
          quiet):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /tokenize, /detokenize, /metrics).

    With --speculative, a request may ask for fewer drafts per step with the extra body field
    `num_speculative_tokens` (0: none for that request; at most the server's K)."""
    from mojollm.engine.engine import parse_bytes
    from mojollm.server import default_model_name, serve as run_server

    body_limit = parse_bytes(max_body_size)
    spec = speculative_dict(speculative, num_speculative_tokens, draft_model, draft_layers)
    engine_kw = dict(_engine_kwargs(kv_cache_memory, max_model_len, spec, kv_cache_dtype), max_num_seqs=max_num_seqs)
    name = served_model_name or default_model_name(model)

    def say(msg, *a, **k):
        if not quiet:
            click.echo(f"mojollm: {msg}", err=True)

    def load():
        from mojollm.llm import LLM

        llm = LLM(model=model, backend=backend, progress=say, **engine_kw)
        extra = "" if spec is None else f", speculative {spec['method']} (k={spec['num_tokens']})"
        say(f"{name} loaded on {llm.backend_name}: context {llm.max_model_len} tokens, "
            f"{llm.engine.num_blocks} KV blocks{extra}; ready")
        return llm

    run_server(load, name, host=host, port=port, api_key=api_key, max_queue=max_queue, max_body_size=body_limit,
               shutdown_timeout=shutdown_timeout, log_level="warning" if quiet else "info",
               on_listening=lambda url: click.echo(f"mojollm: serving {name} on {url} (loading the model)", err=True))


@cli.group(cls=click.Group)
def bench():
    """Benchmarks (throughput in-process; kernels, e2e run the scripts in bench/)."""


@bench.command("throughput")
@model_options
@click.option("--num-prompts", type=click.IntRange(1), default=64, show_default=True)
@click.option("--input-len", type=click.IntRange(1), default=64, show_default=True,
              help="Mean prompt length (prompts are uniform in [L/2, 3L/2]).")
@click.option("--output-len", type=click.IntRange(1), default=64, show_default=True,
              help="Mean output length (uniform in [L/2, 3L/2]).")
@click.option("--sequential-prompts", type=click.IntRange(1), default=None,
              help="Run only this many of the requests one at a time (default: all).")
@click.option("--shared-prefix-len", type=click.IntRange(0), default=256, show_default=True,
              help="System-prompt length of the prefix-cache comparison (0 skips it).")
@click.option("--max-num-seqs", type=click.IntRange(1), default=64, show_default=True)
@click.option("--max-num-batched-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@speculative_options
@click.option("--json", "as_json", is_flag=True, help="Print the result document (bench/SCHEMA.md).")
@click.option("--quiet", "-q", is_flag=True)
def bench_throughput(model, backend, kv_cache_memory, kv_cache_dtype, max_model_len, num_prompts, input_len, output_len,
                     sequential_prompts, shared_prefix_len, max_num_seqs, max_num_batched_tokens, seed,
                     speculative, num_speculative_tokens, draft_model, draft_layers, as_json, quiet):
    """Continuous batching vs one request at a time; prefix cache on vs off.

    Random-token prompts of mixed lengths, greedy, ignore_eos (every run produces the same number of
    tokens). Each run reports output tokens/s, TTFT and inter-token latency percentiles, steps, and
    the weight bytes streamed per second (every step reads all weights once) against the device's
    measured memory bandwidth: the physical limit of a decode step."""
    import shlex

    from mojollm.measure import device_bandwidth

    spec = speculative_dict(speculative, num_speculative_tokens, draft_model, draft_layers)
    engine_kw = dict(_engine_kwargs(kv_cache_memory, max_model_len, spec, kv_cache_dtype), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens)
    llm = _load_llm(model, backend, quiet, **engine_kw)
    run_kw = dict(engine_kw)
    draft = getattr(getattr(llm.engine, "proposer", None), "model", None)
    if spec is not None and spec["method"] == "draft" and draft is not None:
        run_kw["speculative"] = dict(spec, draft_model=draft)  # every run's LLM reuses the loaded draft model
    with _progress(quiet) as say:
        res = throughput_benchmark(llm.model, num_prompts, input_len, output_len, seed=seed,
                                   sequential_prompts=sequential_prompts, shared_prefix_len=shared_prefix_len,
                                   engine_kwargs=run_kw, progress=say)
        say("measuring memory bandwidth")
        bandwidth, how = device_bandwidth(llm.backend)
    rows = throughput_rows(res, llm.backend_name, bandwidth)
    if as_json:
        from mojollm.measure import bench_document

        config = {"model": str(getattr(llm.model, "path", model)), "backend": llm.backend_name,
                  "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
                  "sequential_prompts": sequential_prompts, "shared_prefix_len": shared_prefix_len,
                  **engine_kw, "seed": seed, "weight_bytes": getattr(llm.model, "weight_bytes", None),
                  "bandwidth_method": how}
        argv = ["mojollm", "bench", "throughput", "--num-prompts", str(num_prompts), "--input-len", str(input_len),
                "--output-len", str(output_len), "--shared-prefix-len", str(shared_prefix_len), "--seed", str(seed)]
        for flag, v in (("--model", model), ("--backend", backend), ("--kv-cache-memory", kv_cache_memory),
                        ("--kv-cache-dtype", kv_cache_dtype),
                        ("--max-model-len", max_model_len), ("--sequential-prompts", sequential_prompts)):
            if v is not None:
                argv += [flag, str(v)]
        argv += speculative_argv(spec)
        doc = bench_document("throughput", config, rows, shlex.join(argv + ["--json"]))
        doc["summary"] = {"batched_over_sequential": res["batched_over_sequential"],
                          "prefix_cache_speedup": res.get("prefix_cache_speedup")}
        click.echo(json.dumps(doc))
        return
    for r in rows:
        click.echo("  ".join(f"{k}={v}" for k, v in r.items()))
    click.echo(f"batched / sequential output tok/s: {res['batched_over_sequential']}")
    if res.get("prefix_cache_speedup") is not None:
        click.echo(f"prefix cache on / off (shared system prompt): {res['prefix_cache_speedup']}")
    click.echo(f"device memory bandwidth: {'–' if bandwidth is None else round(bandwidth, 1)} GB/s ({how})")


# The workload and its runs live with the command that runs them, and drive the product through
# LLM, as every published speed figure must (bench/SCHEMA.md, kind mojollm.bench.throughput).

def throughput_workload(tokenizer, vocab_size: int, num_prompts: int, input_len: int, output_len: int,
                        seed: int = 0, shared_prefix_len: int = 0, mixed: bool = True) -> list[tuple[list[int], int]]:
    """Random-token prompts of mixed lengths (uniform in [len/2, 3 len/2] when `mixed`).

    Returns [(prompt_token_ids, max_tokens)]. Token ids avoid the tokenizer's special tokens so
    that no prompt ends early; a shared prefix (a "system prompt") opens every prompt when
    shared_prefix_len > 0.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    special = set(getattr(tokenizer, "eos_token_ids", set()) or set())
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        special.add(bos)
    low = min(1000, vocab_size // 2)  # ordinary tokens sit above the special ones in every BPE vocab

    def tokens(n):
        ids = rng.integers(low, vocab_size, size=n).tolist()
        return [t if t not in special else low for t in ids]

    prefix = tokens(shared_prefix_len)
    work = []
    for _ in range(num_prompts):
        il = int(rng.integers(max(1, input_len // 2), input_len * 3 // 2 + 1)) if mixed else input_len
        ol = int(rng.integers(max(1, output_len // 2), output_len * 3 // 2 + 1)) if mixed else output_len
        work.append((prefix + tokens(il), ol))
    return work


def run_workload(llm, workload, sequential: bool = False) -> dict:
    """Run `workload` through `llm.generate` (all requests in one call, or one call per request)
    and summarize it with the engine's stats."""
    import time

    from mojollm.engine.metrics import summarize
    from mojollm.sampling_params import SamplingParams

    prompts = [ids for ids, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    t0 = time.perf_counter()
    if sequential:
        outputs = [out for ids, sp in zip(prompts, params) for out in llm.generate([ids], sp)]
    else:
        outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    summary = summarize(outputs, wall)
    st = llm.engine.stats
    summary["prefix_cache_hit_rate"] = round(llm.engine.block_manager.hit_rate, 4)
    summary["preemptions"] = st.preemptions
    summary["steps"] = st.steps
    summary["mean_tokens_per_step"] = round((st.prefill_tokens + st.decode_tokens) / st.steps, 2) if st.steps else None
    summary["forward_s"] = round(st.forward_time, 3)
    summary["engine_overhead_s"] = round(wall - st.forward_time, 3)  # scheduling, sampling, detokenizing
    weight_bytes = getattr(llm.model, "weight_bytes", 0) or 0
    # every step streams all the weights once, however many sequences it carries
    summary["weight_read_gbs"] = round(st.steps * weight_bytes / wall / 1e9, 3) if weight_bytes and wall > 0 else None
    if getattr(llm.engine, "speculative", None) is not None:
        summary.update(_spec_summary(st))
    return summary


def _spec_summary(stats) -> dict:
    """Speculative decoding over an engine's life: verify steps, drafts proposed and accepted,
    the acceptance rate and the tokens a verify step yields on average."""
    def r(v):
        return None if v is None else round(v, 4)

    return {"spec_steps": stats.spec_steps, "spec_proposed": stats.spec_proposed,
            "spec_accepted": stats.spec_accepted, "spec_acceptance_rate": r(stats.spec_acceptance_rate),
            "spec_mean_accepted_length": r(stats.spec_mean_accepted_length),
            "propose_s": round(stats.propose_time, 3)}


def throughput_benchmark(model, num_prompts: int = 64, input_len: int = 64, output_len: int = 64,
                         seed: int = 0, sequential_prompts: int | None = None, shared_prefix_len: int = 256,
                         engine_kwargs: dict | None = None, progress=None) -> dict:
    """Continuous batching vs one request at a time, and prefix cache on vs off, each run on a fresh
    LLM over the loaded `model` (its own KV cache, prefix cache and stats).

    The sequential run uses `sequential_prompts` of the same requests (default: all) so that a slow
    machine can compare per-token rates without running the whole workload twice.
    """
    from mojollm.llm import LLM

    engine_kwargs = dict(engine_kwargs or {})
    vocab = model.config.vocab_size
    work = throughput_workload(model.tokenizer, vocab, num_prompts, input_len, output_len, seed)
    result = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len}
    note = progress or (lambda msg: None)

    note(f"batched: {num_prompts} requests")
    result["batched"] = run_workload(LLM(model, **engine_kwargs), work)
    seq_work = work[: sequential_prompts or num_prompts]
    note(f"sequential: {len(seq_work)} requests one at a time")
    result["sequential"] = run_workload(LLM(model, **engine_kwargs), seq_work, sequential=True)
    b, s = result["batched"]["output_tokens_per_s"], result["sequential"]["output_tokens_per_s"]
    result["batched_over_sequential"] = round(b / s, 2) if b and s else None

    if shared_prefix_len > 0:
        shared = throughput_workload(model.tokenizer, vocab, num_prompts, max(1, input_len // 4),
                                     output_len // 2 or 1, seed + 1, shared_prefix_len=shared_prefix_len)
        for flag in (True, False):
            note(f"shared {shared_prefix_len}-token system prompt, prefix cache {'on' if flag else 'off'}")
            llm = LLM(model, **dict(engine_kwargs, enable_prefix_caching=flag))
            result[f"shared_prefix_cache_{'on' if flag else 'off'}"] = run_workload(llm, shared)
        on = result["shared_prefix_cache_on"]["total_tokens_per_s"]
        off = result["shared_prefix_cache_off"]["total_tokens_per_s"]
        result["prefix_cache_speedup"] = round(on / off, 2) if on and off else None
    return result


def throughput_rows(result: dict, backend: str | None, bandwidth_gbs: float | None) -> list[dict]:
    """Flat rows (bench/SCHEMA.md) of a throughput_benchmark result, one per run; the weight bytes
    streamed per second against the device's measured bandwidth (`bandwidth_gbs`, None: unknown)."""
    rows = []
    peers = {"batched": "sequential", "shared_prefix_cache_on": "shared_prefix_cache_off"}
    for mode in ("batched", "sequential", "shared_prefix_cache_on", "shared_prefix_cache_off"):
        if mode not in result:
            continue
        row = {"mode": mode, "backend": backend, **result[mode]}
        peer = peers.get(mode)
        if peer in result:
            key = "output_tokens_per_s" if mode == "batched" else "total_tokens_per_s"
            a, b = result[mode][key], result[peer][key]
            row["vs_peer"] = round(a / b, 3) if a and b else None
        row["bandwidth_gbs"] = None if bandwidth_gbs is None else round(bandwidth_gbs, 2)
        row["fraction_of_bandwidth"] = (round(row["weight_read_gbs"] / bandwidth_gbs, 3)
                                        if bandwidth_gbs and row.get("weight_read_gbs") else None)
        row["ok"] = result[mode]["errors"] == 0
        rows.append(row)
    return rows


def _register_extras() -> None:
    """`compare` and the script-backed bench commands live in cli_compare (another module)."""
    try:
        from mojollm.cli_compare import register
    except ImportError:
        return
    register(cli)


_register_extras()

if __name__ == "__main__":  # pragma: no cover
    main()
