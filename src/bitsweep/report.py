"""aggregate_results: one table of every variant (CSV + Markdown) and Pareto plots.

Pareto fronts are drawn for "smaller and better": a variant is on the front when no other variant is at
least as small and at least as good, and strictly better in one of the two.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from bitsweep.manifest import failure_record_path, read_json

COLUMNS = [
    ("backend", "backend", "{}"),
    ("scheme", "scheme", "{}"),
    ("bits", "bits", "{}"),
    ("bpw", "bits/weight", "{:.2f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("kld", "KLD", "{:.4f}"),
    ("top1", "top-1 %", "{:.1%}"),
    ("pp_tok_s", "prompt tok/s", "{:.0f}"),
    ("tg_tok_s", "gen tok/s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        data = read_json(path)
        rows.append({k: data[k] for k in ("model", "backend", "scheme", "bits", "status")} | data["metrics"])
    reference = next((r for r in rows if r["backend"] == "reference"), None)
    for row in rows:
        row["ppl_delta_pct"] = 100 * (row["ppl"] / reference["ppl"] - 1) if reference else math.nan
    return sorted(rows, key=lambda r: (r["backend"] != "reference", r["backend"], -r["bpw"], r["scheme"]))


def variant_outcomes(expected: dict[tuple[str, str], list[Path]]) -> tuple[list[Path], list[dict]]:
    """Split a sweep's variants into finished results and failures.

    ``expected`` maps (backend, scheme) to the outputs of its jobs, the result JSON last. A failure record
    beside any of them (``<output>.failed.json``, written when that job fails and removed when it next succeeds:
    bitsweep.cli.run) wins over an older result. A variant with neither did not run: a job it needs failed.
    """
    results, failed = [], []
    for (backend, scheme), outputs in expected.items():
        result = outputs[-1]
        records = [record for record in map(failure_record_path, outputs) if record.is_file()]
        if records:
            info = read_json(records[0])
            failed.append({"backend": backend, "scheme": scheme, "status": "failed", "stage": info.get("stage"),
                           "error": info.get("error")})  # fmt: skip
        elif result.is_file():
            results.append(result)
        else:
            failed.append({"backend": backend, "scheme": scheme, "status": "not run", "stage": None,
                           "error": "a job it depends on failed or was interrupted"})  # fmt: skip
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


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    keys = sorted(
        {k for row in rows for k in row}, key=lambda k: (([c[0] for c in COLUMNS] + [k]).index(k), k)
    )
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        cells = [_fmt(fmt, row.get(key)) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    if failed:
        lines += ["", f"## Failed variants ({len(failed)})", "", "| backend | scheme | status | stage | error |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in failed:
            error = str(row.get("error") or "").replace("|", "\\|")
            lines.append(
                f"| {row['backend']} | {row['scheme']} | {row['status']} | {row.get('stage') or '–'} | {error} |"
            )
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def plot(
    rows: list[dict[str, Any]], x: str, y: str, path: Path, title: str, maximise_y: bool = False
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(x) is not None and r.get(y) is not None and r[y] > 0 and r[x] > 0]
    points = [(r[x], -r[y] if maximise_y else r[y]) for r in rows]
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        ax.scatter([r[x] for r in mine], [r[y] for r in mine], label=backend, s=36, zorder=3)
    for row in rows:
        ax.annotate(row["scheme"], (row[x], row[y]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front_rows = sorted((rows[i] for i in front), key=lambda r: r[x])
    ax.plot(
        [r[x] for r in front_rows], [r[y] for r in front_rows], "k--", lw=1, label="Pareto front", zorder=2
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def aggregate_results(
    results: list[Path], out_dir: Path, failed: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The report: finished variants in the tables and plots, ``failed`` ones listed with their error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(results)
    write_tables(rows + list(failed), out_dir)
    variants = [r for r in rows if r["backend"] != "reference"]
    plot(variants, "size_mb", "kld", out_dir / "kld_vs_size.png", "KL divergence vs reference, by file size")
    plot(rows, "bpw", "ppl", out_dir / "ppl_vs_bpw.png", "Perplexity by effective bits per weight")
    plot(rows, "size_mb", "tg_tok_s", out_dir / "speed_vs_size.png", "Generation speed by file size", True)
    return rows
