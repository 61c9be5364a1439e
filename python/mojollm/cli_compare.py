"""CLI commands `mojollm compare` and the script-backed `mojollm bench` commands (kernels | e2e).

`register(main)` attaches them to the main click group; when the main CLI already has a `bench`
group, the missing subcommands are added to it instead of making a second group.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click

from mojollm.kv_dtypes import KV_CACHE_DTYPES

BENCH_SCRIPTS = {  # `mojollm bench throughput` runs in-process (mojollm.cli)
    "kernels": "kernels.py",
    "e2e": "e2e.py",
}


class UserError(click.ClickException):
    """A bad option or missing extra: exit 2, like every other user error of the mojollm CLI."""

    exit_code = 2


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mojollm[bench]'")


@click.command("compare")
@click.option("--model", "-m", default=None, metavar="PATH",
              help="GGUF file or Hugging Face directory (default: the default model, pulled once).")
@click.option("--backends", "-b", default="all", show_default=True,
              help="Comma-separated backends (cpu,cuda,rocm,tpu) or 'all'; unavailable ones are listed with the reason.")
@click.option("--prompt-len", default=64, show_default=True, type=click.IntRange(1), help="Prompt tokens per sequence.")
@click.option("--output-len", default=32, show_default=True, type=click.IntRange(2), help="Greedy tokens to generate.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Sequences decoded together.")
@click.option("--reference", default="cpu", show_default=True, help="Backend every other one is checked against.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs (median reported).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed runs first.")
@click.option("--logprob-tol", default=5e-2, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Allowed max |log-prob diff| as a fraction of the reference's largest |log-prob|.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Write the results as JSON (schema: bench/SCHEMA.md).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Write a PNG chart (needs mojollm[bench]).")
@click.option("--speculative", type=click.Choice(["ngram", "draft", "self"], case_sensitive=False), default=None,
              help="Run every backend (the reference too) with speculative decoding and report its acceptance "
                   "rate and mean accepted length: ngram, draft (--draft-model) or self. Default: off.")
@click.option("--num-speculative-tokens", type=click.IntRange(1, 16), default=None, metavar="K",
              help="Tokens proposed per step (default 4; needs --speculative).")
@click.option("--draft-model", type=click.Path(exists=True), default=None, metavar="PATH",
              help="The draft model of --speculative draft (same vocabulary).")
@click.option("--draft-layers", type=click.IntRange(1), default=None, metavar="N",
              help="--speculative self: draft with the first N layers (default: half of them).")
@click.option("--kv-cache-dtype", type=click.Choice(("auto",) + KV_CACHE_DTYPES, case_sensitive=False), default=None,
              help="KV-cache element type of every backend (default auto: each backend's choice).")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
def compare(model, backends, prompt_len, output_len, batch, reference, repeats, warmup, logprob_tol,
            json_path, plot_path, speculative, num_speculative_tokens, draft_model, draft_layers, kv_cache_dtype,
            quiet):
    """Run the same prompts on several backends through the product's engine (LLM): speed,
    memory, roofline, energy, and a correctness cross-check against a reference backend. Exits 1
    when a backend disagrees or fails (after printing and writing everything), 2 on a user error."""
    from rich.console import Console

    from mojollm.cli import speculative_argv, speculative_dict
    from mojollm.compare import CompareConfig, PlotUnavailable, Thresholds, print_table, run_compare, write_plot
    from mojollm.errors import MojollmError

    try:
        spec = speculative_dict(speculative, num_speculative_tokens, draft_model, draft_layers)
    except click.UsageError as e:
        raise UserError(e.format_message())
    if plot_path:
        _check_matplotlib()  # fail before a long run, not after it
    err = Console(stderr=True)
    config = CompareConfig(model=model, backends=backends.split(","), prompt_len=prompt_len,
                           output_len=output_len, batch=batch, reference=reference.strip().lower(),
                           repeats=repeats, warmup=warmup, thresholds=Thresholds(logprob_rel_tol=logprob_tol),
                           speculative=spec, kv_cache_dtype=(kv_cache_dtype or "auto").lower())
    try:
        doc = run_compare(config, progress=None if quiet else (lambda m: err.print(f"[dim]{m}[/]")))
    except (MojollmError, ValueError) as e:
        raise UserError(str(e))
    doc["command"] = shlex.join(
        ["mojollm", "compare"] + (["--model", model] if model else [])
        + ["--backends", backends, "--prompt-len", str(prompt_len), "--output-len", str(output_len),
           "--batch", str(batch), "--reference", reference, "--repeats", str(repeats), "--warmup", str(warmup),
           "--logprob-tol", str(logprob_tol)] + speculative_argv(spec)
        + (["--kv-cache-dtype", kv_cache_dtype] if kv_cache_dtype else [])
        + (["--json", json_path] if json_path else []) + (["--plot", plot_path] if plot_path else []))
    print_table(doc)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        err.print(f"wrote {json_path}")
    if plot_path:
        try:
            write_plot(doc, plot_path)
        except PlotUnavailable as e:
            raise UserError(str(e))
        err.print(f"wrote {plot_path}")
    bad = [b["name"] for b in doc["backends"] if b["available"] and b.get("ok") is False]
    if bad:
        raise click.ClickException(f"{', '.join(bad)}: failed (disagrees with {reference} or errored); see the table")


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def _bench_command(name: str, script: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def run(args):
        path = _bench_dir() / script
        if not path.is_file():
            raise UserError(f"{path} not found: `mojollm bench {name}` runs the scripts of a source checkout")
        sys.exit(subprocess.call([sys.executable, str(path), *args]))

    run.help = (f"Run bench/{script} (arguments pass through; --help shows its own options). "
                "Results use the JSON envelope of bench/SCHEMA.md.")
    return run


@click.group("bench")
def bench():
    """Benchmarks from bench/ (kernels, e2e); JSON output per bench/SCHEMA.md."""


def _add_bench_commands(group: click.Group) -> None:
    for name, script in BENCH_SCRIPTS.items():
        if name not in group.commands:
            group.add_command(_bench_command(name, script))


_add_bench_commands(bench)


def register(main: click.Group) -> None:
    """Attach `compare` and `bench` to the main CLI (merging into an existing `bench` group)."""
    if "compare" not in main.commands:
        main.add_command(compare)
    existing = main.commands.get("bench")
    if isinstance(existing, click.Group):
        _add_bench_commands(existing)
    elif existing is None:
        main.add_command(bench)
