"""aggregate_results: one table of every variant (CSV + Markdown), whether neighbours are told apart, and
Pareto plots with error bars.

Pareto fronts are drawn for "smaller and better": a variant is on the front when no other variant is at
least as small and at least as good, and strictly better in one of the two.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bitsweep.manifest import failure_record_path, read_json

COLUMNS = [
    ("backend", "backend", "{}"),
    ("scheme", "scheme", "{}"),
    ("bits", "bits", "{}"),
    ("bpw", "bits/weight", "{:.2f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("ppl", "ppl", "num"),
    ("ppl_ratio", "ppl ratio [95% CI]", "ci"),
    ("kld", "KLD nats [95% CI]", "ci"),
    ("top1", "top-1 % [95% CI]", "ci%"),
    ("ppl_llamacpp", "ppl (llama.cpp)", "num"),
    ("bits_per_byte", "bits/byte", "{:.4f}"),
    ("greedy_prefix_match", "greedy match %", "{:.0%}"),
    ("pp_tok_s", "prompt tok/s", "speed0"),
    ("tg_tok_s", "gen tok/s", "speed1"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]

# Across models only what does not depend on the tokenizer compares directly (bits per byte of the same text);
# KLD and top-1 are each model's distance from its own reference.
CROSS_MODEL_COLUMNS = [
    ("backend", "backend", "{}"),
    ("scheme", "scheme", "{}"),
    ("model", "model", "{}"),
    ("bpw", "bits/weight", "{:.2f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("bits_per_byte", "bits/byte", "{:.4f}"),
    ("kld", "KLD to own reference [95% CI]", "ci"),
    ("top1", "top-1 % [95% CI]", "ci%"),
    ("tg_tok_s", "gen tok/s", "speed1"),
]
CROSS_MODEL_NOTE = """Each model is scored on windows made by its own tokenizer: *bits/byte* (the negative log-likelihood of
the same evaluation text per UTF-8 byte) compares models; perplexity, KLD and top-1 compare a model's variants with
its own reference only."""

HOW_TO_READ = """How to read this table. Every variant is scored on the same token windows (made once by the reference
tokenizer) against one full-precision reference (torch fp32). Protocol: *ppl*, *KLD* and *top-1* score every
position of every window (tokens 1..n-1 given their prefix); *ppl (llama.cpp)* scores the second half of each
window as `llama-perplexity` does; *bits/byte* is the same log-likelihood per byte of the text scored (lm-eval's
bits_per_byte; it does not depend on the tokenizer). KLD is over the whole vocabulary (the reference's log-probs
kept at 16 bits, as llama.cpp does). Intervals are 95% paired bootstrap intervals over windows (tokens within a
window are correlated, so whole windows are resampled; the ratio to the reference uses the same draws on both
sides). *greedy match* is how much of a greedy continuation of prompts cut from the evaluation text follows the
reference's before the first different token. Two neighbours on a backend's ladder or on the Pareto front of KLD vs size are *resolved* when the interval of
their paired KLD difference excludes 0;
*windows needed* estimates how many windows would resolve a difference of that size. *tok/s*: the median (llama-bench
protocol: the mean) of the timed repeats ± their standard deviation; ⚠ marks a figure measured while other
processes kept a quarter of a core or more busy, or whose repeats spread more than 10%."""


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        data = read_json(path)
        row = {k: data[k] for k in ("model", "backend", "scheme", "bits", "status")} | data["metrics"]
        row["per_window"] = data.get("per_window")
        rows.append(row)
    return sorted(
        rows, key=lambda r: (r["model"], r["backend"] != "reference", r["backend"], -r["bpw"], r["scheme"])
    )


def by_model(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by model (sorted): quality metrics compare variants of one model, never across models."""
    return {m: [r for r in rows if r.get("model") == m] for m in sorted({r.get("model") for r in rows})}


def neighbours(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each backend's ladder (by bits/weight, largest first): is each adjacent pair's KLD difference resolved?"""
    from bitsweep.stats import paired_difference

    out = []
    for model, mine in by_model(rows).items():
        for backend in sorted({r["backend"] for r in mine} - {"reference"}):
            ladder = [r for r in mine if r["backend"] == backend and r.get("per_window") and "kld" in r]
            for a, b in itertools.pairwise(ladder):
                diff = paired_difference(b["per_window"]["all"], a["per_window"]["all"], "kld")
                out.append(
                    {
                        "model": model,
                        "backend": backend,
                        "larger": a["scheme"],
                        "smaller": b["scheme"],
                        **diff,
                    }
                )
    return out


def front_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent variants on each model's Pareto front of KLD vs file size (any backend): is each step resolved?"""
    from bitsweep.stats import paired_difference

    out = []
    for model, mine in by_model(rows).items():
        scored = [r for r in mine if r["backend"] != "reference" and r.get("per_window") and "kld" in r]
        front = sorted((scored[i] for i in pareto_front([(r["size_mb"], r["kld"]) for r in scored])),
                       key=lambda r: -r["size_mb"])  # fmt: skip
        out += [{"model": model, "backend": "front", "larger": f"{a['backend']}/{a['scheme']}",
                 "smaller": f"{b['backend']}/{b['scheme']}",
                 **paired_difference(b["per_window"]["all"], a["per_window"]["all"], "kld")}
                for a, b in itertools.pairwise(front)]  # fmt: skip
    return out


def variant_outcomes(expected: dict[tuple[str, str], list[Path]]) -> tuple[list[Path], list[dict]]:
    """Split a sweep's variants into finished results and failures.

    ``expected`` maps (model, backend, scheme) to the outputs of its jobs, the result JSON last. A failure record
    beside any of them (``<output>.failed.json``, written when that job fails and removed when it next succeeds:
    bitsweep.cli.run) wins over an older result. A variant with neither did not run: a job it needs failed.
    """
    results, failed = [], []
    for (model, backend, scheme), outputs in expected.items():
        result = outputs[-1]
        records = [record for record in map(failure_record_path, outputs) if record.is_file()]
        if records:
            info = read_json(records[0])
            failed.append({"model": model, "backend": backend, "scheme": scheme, "status": "failed",
                           "stage": info.get("stage"), "error": info.get("error")})  # fmt: skip
        elif result.is_file():
            results.append(result)
        else:
            failed.append({"model": model, "backend": backend, "scheme": scheme, "status": "not run",
                           "stage": None, "error": "a job it depends on failed or was interrupted"})  # fmt: skip
    return results, failed


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be minimised."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def rule_times(bench_dir: Path) -> list[dict[str, Any]]:
    """Where a sweep's time went, from Snakemake's benchmark files (``benchmarks/<rule>/<model>/[<backend>/]
    <name>.tsv``): per rule and backend (or format, for ``convert``), its jobs, their summed and longest wall time,
    the cores they kept busy on average (CPU time over wall time, from each job's log: a 2-thread rule at 1.0
    leaves a core idle) and the largest peak RSS, the costliest first."""
    jobs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for tsv in sorted(bench_dir.rglob("*.tsv")) if bench_dir.is_dir() else []:
        with open(tsv, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows:
            rel = tsv.relative_to(bench_dir)
            parts = rel.parts
            rule = parts[0] if len(parts) > 1 else rel.stem  # benchmarks/init_tracking.tsv: a rule of its own
            # <rule>/<model>/<backend>/<scheme>.tsv, or <rule>/<model>/<format>.tsv (convert, check_conversion)
            what = parts[2] if len(parts) >= 4 else rel.stem if len(parts) == 3 else ""
            wall = float(rows[-1]["s"])
            jobs.setdefault((rule, what), []).append(
                (wall, job_cpu_seconds(bench_dir.parent / "logs" / rel.with_suffix(".log"), wall),
                 _float(rows[-1].get("max_rss")))
            )  # fmt: skip
    table = [{"rule": rule, "what": what, "jobs": len(runs), "total_s": sum(s for s, _, _ in runs),
              "max_s": max(s for s, _, _ in runs), "cores": _cores(runs),
              "max_rss_mb": max((r for _, _, r in runs if not math.isnan(r)), default=math.nan)}
             for (rule, what), runs in jobs.items()]  # fmt: skip
    return sorted(table, key=lambda r: -r["total_s"])


def _cores(runs: list[tuple[float, float, float]]) -> float:
    """CPU over wall seconds of the jobs whose logs said (NaN when none did)."""
    known = [(wall, cpu) for wall, cpu, _ in runs if not math.isnan(cpu)]
    wall = sum(w for w, _ in known)
    return sum(c for _, c in known) / wall if wall > 0 else math.nan


def job_cpu_seconds(log: Path, wall_s: float) -> float:
    """A job's CPU seconds from the usage line ``scripts/run_stage.py`` ends its log with (NaN without one),
    scaled to Snakemake's wall time, which also counts the shell around the process."""
    from bitsweep.usage import USAGE_PREFIX

    try:
        last = [
            line for line in log.read_text(errors="replace").splitlines() if line.startswith(USAGE_PREFIX)
        ][-1:]
    except OSError:
        return math.nan
    if not last:
        return math.nan
    usage = json.loads(last[0][len(USAGE_PREFIX) :])
    return usage["cpu_s"] * wall_s / usage["wall_s"] if usage["wall_s"] > 0 else math.nan


def _float(value: str | None) -> float:
    return float(value) if value not in (None, "NA", "-", "") else math.nan


def time_section(times: list[dict[str, Any]]) -> list[str]:
    if not times:
        return []
    total = sum(t["total_s"] for t in times)
    lines = ["", f"## Where the time went (Snakemake's benchmark files; {total / 60:.1f} min of job time in all)", "",
             "Job time summed per rule and backend; jobs that ran side by side overlap, so the sweep's wall time is "
             "shorter. *Cores busy*: CPU time over wall time (a job given 2 threads at 1.0 leaves a core idle).", "",
             "| rule | backend / format | jobs | total min | share | longest job s | cores busy | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in times:
        lines.append(f"| {t['rule']} | {t['what'] or '–'} | {t['jobs']} | {t['total_s'] / 60:.1f} | "
                     f"{t['total_s'] / total:.0%} | {t['max_s']:.0f} | {_dash(t['cores'], '{:.2f}')} | "
                     f"{_dash(t['max_rss_mb'], '{:.0f}')} |")  # fmt: skip
    return lines


def _dash(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def write_tables(rows: list[dict[str, Any]], out_dir: Path, times: list[dict[str, Any]] = ()) -> None:
    flat = [{k: v for k, v in row.items() if k != "per_window"} for row in rows]
    keys = sorted(
        {k for row in flat for k in row}, key=lambda k: (([c[0] for c in COLUMNS] + [k]).index(k), k)
    )
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    models = sorted({r.get("model") for r in rows})
    lines = [HOW_TO_READ]
    for model, mine in by_model(ok).items():  # one table per model: its variants against its own reference
        lines += ["", f"## {model}" if len(models) > 1 else "", *_table(COLUMNS, mine)]
    pairs = neighbours(ok) + front_pairs(ok)
    if pairs:
        lines += ["", "## Neighbours on each ladder and on the Pareto front (KLD of the smaller minus the larger)", "",
                  "| model | backend | larger | smaller | ΔKLD nats [95% CI] | resolved | windows needed |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in pairs:
            lines.append(f"| {p['model']} | {p['backend']} | {p['larger']} | {p['smaller']} | {_num(p['diff'])} "
                         f"[{_num(p['lo'])}, {_num(p['hi'])}] | {'yes' if p['resolved'] else '**no**'} | "
                         f"{p['windows_needed'] if p['windows_needed'] is not None else '–'} |")  # fmt: skip
    if len(models) > 1:
        lines += ["", "## Models side by side (each format: size and quality of every model)", "", CROSS_MODEL_NOTE,
                  "", *_table(CROSS_MODEL_COLUMNS, sorted(ok, key=lambda r: (r["backend"], r["scheme"], r["model"])))]  # fmt: skip
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    if failed:
        lines += ["", f"## Failed variants ({len(failed)})", "", "| model | backend | scheme | status | stage | error |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in failed:
            error = str(row.get("error") or "").replace("|", "\\|")
            lines.append(f"| {row.get('model') or '–'} | {row['backend']} | {row['scheme']} | {row['status']} | "
                         f"{row.get('stage') or '–'} | {error} |")  # fmt: skip
    flagged = [r for r in ok if r.get("speed_flag")]
    if flagged:
        lines += ["", f"## Speed figures not measured on a quiet machine ({len(flagged)}, marked ⚠)", "",
                  "Compare their tokens/s with nothing: re-run them alone (`snakemake --forcerun evaluate ...`).", "",
                  "| model | backend | scheme | why |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['model']} | {r['backend']} | {r['scheme']} | {r['speed_flag']} |" for r in flagged]
    lines += time_section(list(times))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def _table(columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(fmt, key, row) for key, _, fmt in columns) + " |" for row in rows]


def _num(value: float) -> str:
    """4 significant digits; scientific notation past 10^5 (a destroyed variant reads 1.1e+08, not 114044705.765)."""
    if abs(value) >= 1e5 or (value and abs(value) < 1e-4):
        return f"{value:.2g}" if abs(value) >= 1e5 else f"{value:.1e}"
    return f"{value:#.4g}".rstrip(".")  # 13.00, not 13


def _cell(fmt: str, key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "num":
        return _num(value)
    if fmt.startswith("speed"):  # ± sd, and a mark when the figure was not measured on a quiet machine
        text = f"{value:.{fmt[-1]}f}"
        if row.get(f"{key}_sd") is not None:
            text += f" ± {row[f'{key}_sd']:.{fmt[-1]}f}"
        return text + (" ⚠" if row.get("speed_flag") else "")
    if fmt in ("ci", "ci%"):
        scale, unit = (100, "") if fmt == "ci%" else (1, "")
        text = _num(scale * value) + unit
        lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
        return text if lo is None or hi is None else f"{text} [{_num(scale * lo)}, {_num(scale * hi)}]"
    return fmt.format(value)


AXIS_LABELS = {
    "size_mb": "file size (MB)",
    "bpw": "bits per weight (measured from the file)",
    "kld": "KL divergence to the reference (nats/token)",
    "ppl": "perplexity (all positions)",
    "tg_tok_s": "generation speed (tokens/s)",
    "bits_per_byte": "bits per byte of the evaluation text (lower is better)",
}
MARKERS = "osD^vP*Xh<>p"


def styles_of(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[Any, str]]:
    """One colour and marker per value of ``key`` (backend, model), the same in every plot of a sweep."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    names = sorted({r[key] for r in rows})
    return {b: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, b in enumerate(names)}


def plot(
    rows: list[dict[str, Any]], x: str, y: str, path: Path, title: str, maximise_y: bool = False,
    styles: dict[str, tuple[Any, str]] | None = None, colour_by: str = "backend",
) -> None:  # fmt: skip
    """Scatter of ``y`` against ``x`` on log axes with plain tick labels, 95% error bars where the results
    carry ``<y>_lo``/``<y>_hi``, references as stars, and each model's Pareto front dashed.

    ``colour_by="backend"``: one colour and marker per backend (``styles``); ``"model"``: one colour per model
    (its front in that colour) and one marker per backend, for plots that compare models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = styles or styles_of(rows, "backend")
    model_styles = styles_of(rows, "model") if rows else {}
    rows = [r for r in rows if r.get(x) is not None and r.get(y) is not None and r[y] > 0 and r[x] > 0]
    several = len({r["model"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for key in sorted({(r[colour_by], r["backend"]) for r in rows}):
        mine = [r for r in rows if (r[colour_by], r["backend"]) == key]
        colour = styles[key[0]][0] if colour_by == "backend" else model_styles[key[0]][0]
        marker = "*" if key[1] == "reference" else styles[key[1]][1]
        ys = np.array([r[y] for r in mine])
        lo = np.array([r.get(f"{y}_lo", r[y]) for r in mine])
        hi = np.array([r.get(f"{y}_hi", r[y]) for r in mine])
        ax.errorbar([r[x] for r in mine], ys, yerr=[np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)], fmt=marker,
                    color=colour, ms=11 if key[1] == "reference" else 6, capsize=2, lw=0.8, zorder=3,
                    label=key[0] if colour_by == "backend" else None)  # fmt: skip
    for row in rows:
        label = f"{row['model']}:{row['scheme']}" if several and colour_by == "backend" else row["scheme"]
        ax.annotate(label, (row[x], row[y]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for model, mine in by_model(rows).items():
        front = sorted((mine[i] for i in pareto_front([(r[x], -r[y] if maximise_y else r[y]) for r in mine])),
                       key=lambda r: r[x])  # fmt: skip
        colour = model_styles[model][0] if colour_by == "model" else "k"
        ax.plot([r[x] for r in front], [r[y] for r in front], "--", color=colour, lw=1, zorder=2,
                label=f"{model} Pareto front" if several else "Pareto front")  # fmt: skip
    if colour_by == "model":  # markers say the backend; the fronts' colours say the model
        for backend in sorted({r["backend"] for r in rows}):
            marker = "*" if backend == "reference" else styles[backend][1]
            ax.add_line(Line2D([], [], ls="", marker=marker, color="grey", label=backend))
    _plain_log_axes(ax, rows, x, y)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plain_log_axes(ax, rows: list[dict[str, Any]], x: str, y: str) -> None:
    """Log axes labelled 20, 50, 100 rather than 2x10^1, 5x10^1, 10^2, named with their units."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis, key in ((ax.xaxis, x), (ax.yaxis, y)):
        values = [r[key] for r in rows]
        decades = np.log10(max(values) / min(values)) if values else 0
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 2 else (1.0, 2.0, 5.0) if decades < 4 else (1.0,)
        axis.set_major_locator(LogLocator(subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))


def aggregate_results(
    results: list[Path], out_dir: Path, failed: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The report: finished variants in the tables and plots, ``failed`` ones listed with their error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(results)
    # the workflow keeps benchmarks beside the report: results/<experiment>/{benchmarks,report}
    write_tables(rows + list(failed), out_dir, rule_times(out_dir.parent / "benchmarks"))
    variants = [r for r in rows if r["backend"] != "reference"]
    styles = styles_of(rows, "backend")
    plot(variants, "size_mb", "kld", out_dir / "kld_vs_size.png", "KL divergence to the reference by file size",
         styles=styles)  # fmt: skip
    plot(rows, "bpw", "ppl", out_dir / "ppl_vs_bpw.png", "Perplexity by bits per weight", styles=styles)
    plot(rows, "size_mb", "tg_tok_s", out_dir / "speed_vs_size.png", "Generation speed by file size", True,
         styles=styles)  # fmt: skip
    plot(rows, "size_mb", "bits_per_byte", out_dir / "bpb_vs_size.png",
         "Quality per byte across models: bits per byte of the evaluation text by file size", styles=styles,
         colour_by="model")  # fmt: skip
    return rows
