"""``reports/budget.html``: the estimate as a picture a person can read, with no network.

One row per profile: a stacked bar of the estimate's terms against the profile's budget line, and
beside it the measured worst-case peak when there is one (the context part and the model part).
Inline SVG and CSS only (no scripts, fonts or images fetched), so it opens anywhere offline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

TERMS = (
    "weights", "lm_head_prepack", "nbits_prepack", "kv_cache", "logits", "activations", "slack",
    "load_transient", "reserved",
)  # fmt: skip
COLOURS = {
    "weights": "#4e79a7",
    "lm_head_prepack": "#a0cbe8",
    "nbits_prepack": "#86bcb6",
    "kv_cache": "#f28e2b",
    "logits": "#e15759",
    "activations": "#76b7b2",
    "slack": "#edc948",
    "load_transient": "#b07aa1",
    "reserved": "#9c9c9c",
    "measured_context": "#6b6b6b",
    "measured_model": "#59a14f",
}
WIDTH, LABEL, BAR_H, GAP = 1000, 150, 22, 14
MIB = 2**20


def _rect(x: float, y: float, w: float, h: float, colour: str, title: str) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h}" fill="{colour}">'
        f"<title>{html.escape(title)}</title></rect>"
    )


def _estimate_bar(report: dict[str, Any], y: float, scale: float) -> list[str]:
    parts, x = [], float(LABEL)
    for term in TERMS:
        value = report["terms_bytes"].get(term, 0)
        width = value * scale
        parts.append(_rect(x, y, width, BAR_H, COLOURS[term], f"{term}: {value / MIB:.1f} MiB"))
        x += width
    parts.append(
        f'<text x="{x + 4:.1f}" y="{y + 15}" class="v">estimate '
        f"{report['estimate_bytes'] / MIB:.0f} MiB</text>"
    )
    return parts


def _measured_bar(measured: dict[str, Any], y: float, scale: float) -> list[str]:
    probes = measured["probes_bytes"]
    context, peak = probes["context"], probes["worst_case_peak"]
    x = float(LABEL)
    return [
        _rect(x, y, context * scale, BAR_H, COLOURS["measured_context"], "measured context"),
        _rect(
            x + context * scale,
            y,
            (peak - context) * scale,
            BAR_H,
            COLOURS["measured_model"],
            f"measured model-dependent: {(peak - context) / MIB:.1f} MiB",
        ),
        f'<text x="{x + peak * scale + 4:.1f}" y="{y + 15}" class="v">measured '
        f"{peak / MIB:.0f} MiB ({html.escape(str(measured.get('device', '')))})</text>",
    ]


def _row(entry: dict[str, Any], y: float, scale: float) -> tuple[list[str], float]:
    report, measured = entry["estimate"], entry.get("measured") or {}
    name = html.escape(report["profile"])
    parts = [f'<text x="4" y="{y + 15}" class="n">{name}</text>']
    parts += _estimate_bar(report, y, scale)
    height = BAR_H
    if measured.get("status") == "measured":
        parts += _measured_bar(measured, y + BAR_H + 4, scale)
        height += BAR_H + 4
    else:
        status = html.escape(measured.get("status", "not measured"))
        parts.append(f'<text x="{LABEL}" y="{y + BAR_H + 16}" class="m">measured: {status}</text>')
        height += 20
    budget_x = LABEL + report["budget_bytes"] * scale
    parts.append(
        f'<line x1="{budget_x:.1f}" x2="{budget_x:.1f}" y1="{y - 4}" y2="{y + height + 4}" '
        f'class="budget"><title>budget {report["budget_bytes"] / MIB:.0f} MiB</title></line>'
    )
    return parts, height + GAP


def _legend(y: float) -> str:
    items, x = [], float(LABEL)
    for key, colour in COLOURS.items():
        items.append(_rect(x, y, 12, 12, colour, key))
        items.append(f'<text x="{x + 16}" y="{y + 11}" class="l">{key}</text>')
        x += 16 + 7 * len(key) + 12
    items.append(f'<line x1="{x}" x2="{x}" y1="{y - 2}" y2="{y + 14}" class="budget"/>')
    items.append(f'<text x="{x + 6}" y="{y + 11}" class="l">budget</text>')
    return "".join(items)


def _table(entries: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{t}</th>" for t in (*TERMS, "estimate", "budget", "measured", "fits"))
    rows = []
    for entry in entries:
        report, measured = entry["estimate"], entry.get("measured") or {}
        cells = [f"{report['terms_bytes'].get(t, 0) / MIB:.1f}" for t in TERMS]
        cells += [f"{report['estimate_bytes'] / MIB:.1f}", f"{report['budget_bytes'] / MIB:.0f}"]
        cells.append(
            f"{measured['probes_bytes']['worst_case_peak'] / MIB:.1f}"
            if measured.get("status") == "measured"
            else html.escape(measured.get("status", "not measured"))
        )
        cells.append("yes" if report["fits"] else "NO")
        body = "".join(f"<td>{c}</td>" for c in cells)
        rows.append(f"<tr><th>{html.escape(report['profile'])}</th>{body}</tr>")
    return f"<table><tr><th>profile (MiB)</th>{head}</tr>{''.join(rows)}</table>"


def render(entries: list[dict[str, Any]], title: str) -> str:
    """The page: ``entries`` are ``{"estimate": budget report, "measured": measured report}``."""
    widest = max(
        max(e["estimate"]["estimate_bytes"], e["estimate"]["budget_bytes"],
            ((e.get("measured") or {}).get("probes_bytes") or {}).get("worst_case_peak", 0))
        for e in entries
    )  # fmt: skip
    scale = (WIDTH - LABEL - 170) / widest
    parts, y = [], 40.0
    for entry in entries:
        row, height = _row(entry, y, scale)
        parts += row
        y += height
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y + 10:.0f}" '
        f'role="img" aria-label="memory estimate per profile">{_legend(10)}{"".join(parts)}</svg>'
    )
    style = (
        "body{font:14px sans-serif;margin:24px;color:#222;background:#fff}"
        "table{border-collapse:collapse;margin-top:16px}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}.n{font-weight:bold}.v,.m,.l{font-size:12px}"
        ".budget{stroke:#000;stroke-width:2;stroke-dasharray:4 2}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Estimate terms (docs/budget.md) against each profile's "
        "budget; measured: the worst-case probe (prompt of max_length - 16 tokens, decode to "
        f"max_length).</p>{svg}{_table(entries)}</body></html>\n"
    )


def write(path: Path, entries: list[dict[str, Any]], title: str) -> Path:
    """Write the page to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(entries, title), encoding="utf-8")
    return path
