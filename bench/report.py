"""Turn JSON results (bench/SCHEMA.md) into markdown tables and PNG plots for bench/RESULTS.md.

    python bench/report.py out.json [more.json ...]                 # markdown to stdout
    python bench/report.py out.json --plots-dir bench/plots         # + one PNG per compare result
    python bench/report.py out.json --plots-dir bench/plots \
        --update bench/RESULTS.md --section "## Backend comparison (CPU machine)"

`--update` replaces the body of that section (from its heading to the next `## ` heading) and
leaves every other section as it is; a missing section is appended.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    from mojollm import compare, measure

    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "kind" not in doc or "schema_version" not in doc:
        raise SystemExit(f"{path}: not a mojollm result (no schema_version and kind; see bench/SCHEMA.md)")
    want = compare.SCHEMA_VERSION if doc["kind"] == compare.KIND else measure.SCHEMA_VERSION
    if doc["schema_version"] != want:
        raise SystemExit(f"{path}: {doc['kind']} schema_version {doc['schema_version']}, but this report reads "
                         f"version {want} (bench/SCHEMA.md): re-run the command that wrote it")
    return doc


def _provenance(doc: dict) -> list[str]:
    env = doc.get("environment", {})
    threads = env.get("threads", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = []
    if doc.get("command"):
        lines.append(f"Command: `{doc['command']}`")
    load = env.get("load_average")
    lines.append(f"Date: {env.get('date', '?')}; machine: {env.get('cpu', '?')} "
                 f"({threads.get('affinity', threads.get('cpu_count', '?'))} threads, "
                 f"{(env.get('memory_bytes') or 0) / 2**30:.0f} GiB"
                 + (f", load average {load[0]:.1f} at the start" if load else "")
                 + f"); commit {env.get('git_commit') or '?'}")
    lines.append(f"Versions: {versions}")
    return lines


def _generic_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, bool):
            return "ok" if v else "**FAILED**"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def render(doc: dict, source: Path, plots_dir: Path | None, relative_to: Path | None) -> str:
    lines = _provenance(doc)
    if doc["kind"] == "mojollm.compare":
        from mojollm.compare import PlotUnavailable, markdown_table, write_plot

        model = doc.get("model") or {}
        if model:
            lines.append(f"Model: {model['path']} ({model['arch']}, {model['num_layers']} layers, "
                         f"{model['weight_bytes'] / 2**20:.1f} MiB of weights read per decode step)")
        lines += ["", markdown_table(doc)]
        if plots_dir is not None:
            plots_dir.mkdir(parents=True, exist_ok=True)
            png = plots_dir / f"{source.stem}.png"
            try:
                write_plot(doc, str(png))
                shown = png.relative_to(relative_to) if relative_to else png
                lines += ["", f"![{source.stem}]({shown.as_posix()})"]
            except PlotUnavailable as e:
                print(f"{source}: no plot: {e}", file=sys.stderr)
            except ValueError:  # plots dir outside the markdown file's folder: link it absolute
                lines += ["", f"![{source.stem}]({png.resolve().as_posix()})"]
    else:
        lines += ["", *_generic_table(doc.get("rows", []))]
    if doc.get("ok") is False:
        lines += ["", "**At least one correctness check FAILED in this run.**"]
    return "\n".join(lines)


def update_section(markdown_file: Path, heading: str, body: str) -> None:
    """Replace the body under `heading` (up to the next `## ` heading), or append the section."""
    text = markdown_file.read_text() if markdown_file.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == heading.strip())
    except StopIteration:
        new = text.rstrip("\n") + f"\n\n{heading}\n\n{body}\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = lines[end:]
        new = "\n".join(lines[:start + 1] + ["", body, ""] + tail).rstrip("\n") + "\n"
    markdown_file.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="JSON result files")
    ap.add_argument("--plots-dir", type=Path, default=None, help="write one PNG per compare result here")
    ap.add_argument("--update", type=Path, default=None, metavar="RESULTS.md", help="markdown file to update")
    ap.add_argument("--section", default=None, help="heading of the section to replace, e.g. '## Backend comparison (CPU machine)'")
    ap.add_argument("--note", default=None, help="a sentence to put above the tables")
    args = ap.parse_args(argv)
    if (args.update is None) != (args.section is None):
        ap.error("--update and --section go together")
    relative_to = args.update.parent.resolve() if args.update else None
    plots = args.plots_dir.resolve() if args.plots_dir else None
    parts = [args.note] if args.note else []
    parts += [render(load(p), p, plots, relative_to) for p in args.results]
    body = "\n\n".join(parts)
    if args.update:
        update_section(args.update, args.section, body)
        print(f"updated {args.section!r} in {args.update}", file=sys.stderr)
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
