"""Tables of the demos: markdown and CSV, and the mean and spread of a row over seeds."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["markdown_table", "write_csv", "aggregate_seeds", "fmt"]


def fmt(v: object) -> str:
    """A cell: floats with about three significant digits, NaN empty, anything else as text."""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs.

    A row holding ``key`` and ``key_sd`` shows ``mean ± sd``.
    """
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"

    def cell(r: dict[str, object], k: str) -> str:
        sd = r.get(f"{k}_sd")
        text = fmt(r.get(k, ""))
        return f"{text} ± {fmt(sd)}" if isinstance(sd, float) and not math.isnan(sd) and text else text

    body = ["| " + " | ".join(cell(r, k) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Writes ``rows`` as CSV at full precision (the union of their keys, in first-seen order)."""
    if not rows:
        path.write_text("")
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def aggregate_seeds(runs: Sequence[Sequence[dict[str, object]]], key: str = "method") -> list[dict[str, object]]:
    """Rows of several seeds (one list per seed, rows matched by ``key``) as mean and sample sd per number.

    Returns:
        One row per method in first-seen order: each numeric field ``f`` as the mean, ``f_sd`` the sample
        standard deviation over the seeds that have it (NaN for one seed), ``seeds`` the count.
    """
    order: list[object] = []
    by: dict[object, list[dict[str, object]]] = {}
    for rows in runs:
        for r in rows:
            k = r[key]
            if k not in by:
                order.append(k)
                by[k] = []
            by[k].append(r)
    out = []
    for k in order:
        rows = by[k]
        agg: dict[str, object] = {key: k, "seeds": len(rows)}
        for f in rows[0]:
            if f == key:
                continue
            vals = [r[f] for r in rows if isinstance(r.get(f), (int, float)) and not isinstance(r.get(f), bool)]
            if len(vals) != len(rows):
                agg[f] = rows[0][f]
                continue
            vals = [float(v) for v in vals if not math.isnan(float(v))]
            agg[f] = statistics.fmean(vals) if vals else math.nan
            agg[f"{f}_sd"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        out.append(agg)
    return out
