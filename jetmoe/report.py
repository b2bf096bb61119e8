"""`jetmoe debug compare ... --html report.html`: one self-contained file to attach to an issue.

Everything is inline (CSS, SVG, a few lines of script for the filters), so the file opens offline and asks the
network for nothing. It holds the summary, the verdict table with filters (the first divergence is the row with
id "first-divergence"), the error plot along the trace with the tolerance line and each introduced point named,
the routing-agreement map (layer x token) and the commands and versions that produced it.
"""

import html
import math
import re
import platform
import sys
from importlib import metadata

import numpy as np

from reference.io.compare import VERDICTS, first_divergence

COLORS = {"ok": "#2e7d32", "introduced": "#c62828", "inherited": "#9e9e9e", "near-tie": "#ef6c00", "input": "#1565c0",
          "missing": "#6a1b9a"}
PLOT_W, PLOT_H, MARGIN = 960, 320, 56

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font: 12px ui-monospace, monospace; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap; }
td.num { text-align: right; }
tr.first td { background: #ffebee; font-weight: bold; }
.verdict { font-weight: bold; }
.filters button { margin-right: 6px; padding: 3px 10px; border: 1px solid #999; background: #fff; cursor: pointer; }
.filters button.active { background: #333; color: #fff; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""

SCRIPT = """
function show(verdict) {
  document.querySelectorAll('#verdicts tbody tr').forEach(function (row) {
    row.hidden = !(verdict === 'all' || (verdict === 'not-ok' ? row.dataset.verdict !== 'ok'
                                                               : row.dataset.verdict === verdict));
  });
  document.querySelectorAll('.filters button').forEach(function (b) {
    b.classList.toggle('active', b.dataset.filter === verdict);
  });
  document.getElementById('shown').textContent =
    document.querySelectorAll('#verdicts tbody tr:not([hidden])').length;
}
"""


def esc(value):
    return html.escape(str(value), quote=True)


def number(x):
    return f"{x:.2e}" if isinstance(x, float) and math.isfinite(x) else str(x)


def summary(rows, title, rtol, atol):
    """The counts, the first divergence and the introduced rows, as HTML."""
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    first = first_divergence(rows)
    introduced = [r.name for r in rows if r.verdict == "introduced"]
    parts = [f"<p><b>{esc(title)}</b>, rtol {rtol:g}, atol {atol:g}: " +
             ", ".join(f"{v} {n}" for v, n in counts.items() if n) + f" (of {len(rows)})</p>"]
    if first is None:
        parts.append(f'<p id="verdict-line">no divergence: all {len(rows)} shared tensors agree</p>')
    else:
        parts.append(f'<p id="verdict-line">first divergence: <a href="#first-divergence"><code>{esc(first.name)}'
                     f'</code></a> ({first.verdict}, max abs {number(first.max_abs)}, max rel '
                     f'{number(first.max_rel)})</p>')
    if introduced:
        parts.append("<p>introduced here: " + ", ".join(f"<code>{esc(n)}</code>" for n in introduced) + "</p>")
    return "\n".join(parts)


def verdict_table(rows):
    """Every row, filterable by verdict; the first divergence has id first-divergence."""
    buttons = "".join(f'<button data-filter="{f}" onclick="show(\'{f}\')">{f}</button>'
                      for f in ("all", "not-ok", *VERDICTS))
    first = getattr(first_divergence(rows), "name", None)
    lines = [f'<div class="filters">{buttons} <span><span id="shown">{len(rows)}</span> rows shown</span></div>',
             '<table id="verdicts"><thead><tr><th>#</th><th>name</th><th>shape</th><th>max abs</th><th>max rel</th>'
             '<th>verdict</th><th>worst / note</th></tr></thead><tbody>']
    for i, r in enumerate(rows):
        mark = ' id="first-divergence" class="first"' if r.name == first else ""
        where = r.where_text()
        note = "; ".join(x for x in (where, r.note) if x)
        lines.append(f'<tr data-verdict="{r.verdict}" data-name="{esc(r.name)}"{mark}><td class="num">{i}</td>'
                     f'<td>{esc(r.name)}</td><td>{esc(r.shape)}</td><td class="num">{number(r.max_abs)}</td>'
                     f'<td class="num">{number(r.max_rel)}</td><td class="verdict" style="color:'
                     f'{COLORS[r.verdict]}">{r.verdict}</td><td>{esc(note)}</td></tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def layer_starts(rows):
    """(row index, "L<i>") where each layer's rows begin (forward or backward order, decode steps included)."""
    starts, current = [], None
    for i, r in enumerate(rows):
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", r.name)
        if match and match.group(1) != current:
            current = match.group(1)
            starts.append((i, f"L{current}"))
    return starts


def error_plot(rows, rtol, x_label):
    """An inline SVG: max rel error per row on a log axis, where each layer begins, the tolerance as a dashed line,
    introduced points marked and named (the first 12), near-ties and inherited rows marked."""
    rel = np.array([r.max_rel if math.isfinite(r.max_rel) else np.nan for r in rows])
    positive = rel[rel > 0]
    floor = float(min(np.nanmin(positive), rtol) / 10) if positive.size else rtol / 1e3
    top = float(max(np.nanmax(positive) if positive.size else rtol, rtol) * 10)
    lo, hi = math.log10(floor), math.log10(top)
    width, height = PLOT_W - 2 * MARGIN, PLOT_H - 2 * MARGIN

    def x(i):
        return MARGIN + width * (i / max(len(rows) - 1, 1))

    def y(value):
        value = floor if not math.isfinite(value) or value <= floor else value
        return MARGIN + height * (1 - (math.log10(value) - lo) / (hi - lo))

    parts = [f'<svg id="error-plot" xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{PLOT_H}" '
             f'role="img" aria-label="max rel error per tensor">',
             f'<rect x="{MARGIN}" y="{MARGIN}" width="{width}" height="{height}" fill="none" stroke="#ccc"/>']
    for decade in range(math.ceil(lo), math.floor(hi) + 1):
        parts.append(f'<text x="{MARGIN - 6}" y="{y(10.0 ** decade) + 4:.1f}" font-size="10" text-anchor="end">'
                     f'1e{decade}</text>')
    for i, layer in layer_starts(rows):
        parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{MARGIN}" y2="{MARGIN + height}" stroke="#eee"/>'
                     f'<text class="layer" x="{x(i) + 2:.1f}" y="{MARGIN + height + 14}" font-size="10">{esc(layer)}'
                     '</text>')
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(rel))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#777" stroke-width="1"/>')
    parts.append(f'<line id="tolerance" x1="{MARGIN}" x2="{MARGIN + width}" y1="{y(rtol):.1f}" y2="{y(rtol):.1f}" '
                 f'stroke="#c62828" stroke-dasharray="6 4"/><text x="{MARGIN + width - 4}" y="{y(rtol) - 5:.1f}" '
                 f'font-size="11" text-anchor="end" fill="#c62828">tolerance rtol {rtol:g}</text>')
    named = 0
    for i, r in enumerate(rows):
        if r.verdict in ("introduced", "near-tie", "inherited"):
            parts.append(f'<circle class="{r.verdict}" cx="{x(i):.1f}" cy="{y(rel[i]):.1f}" r="3.5" '
                         f'fill="{COLORS[r.verdict]}"><title>{esc(r.name)}: {r.verdict}</title></circle>')
        if r.verdict == "introduced" and named < 12:
            parts.append(f'<text class="label" x="{x(i) + 5:.1f}" y="{y(rel[i]) - 6 - 11 * (named % 3):.1f}" '
                         f'font-size="10" fill="#c62828">{esc(r.name)}</text>')
            named += 1
    parts.append(f'<text x="{MARGIN + width / 2}" y="{PLOT_H - 14}" font-size="11" text-anchor="middle">'
                 f'{esc(x_label)}</text><text x="14" y="{MARGIN + height / 2}" font-size="11" '
                 f'transform="rotate(-90 14 {MARGIN + height / 2})" text-anchor="middle">max rel error</text></svg>')
    return "\n".join(parts)


def routing_map(trace_a, trace_b):
    """An inline SVG: one row per router, one cell per token, coloured by the share of its top-k choices the two
    sides share (green all, red none); '' when the traces hold no routing."""
    routers = [n for n in trace_b if n.endswith("top_k_indices") and n in trace_a
               and np.shape(trace_a[n]) == np.shape(trace_b[n])]
    if not routers:
        return ""
    agree = [np.mean(np.sort(np.asarray(trace_a[n]), axis=1) == np.sort(np.asarray(trace_b[n]), axis=1), axis=1)
             for n in routers]
    tokens = max(len(a) for a in agree)
    cell, left = max(2, min(16, 800 // max(tokens, 1))), 260
    width = max(left + cell * tokens + 10, left + 420)
    parts = [f'<svg id="routing-map" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{14 * len(routers) + 30}" role="img" aria-label="routing agreement">']
    for i, (name, shares) in enumerate(zip(routers, agree)):
        parts.append(f'<text x="{left - 6}" y="{14 * i + 11}" font-size="10" text-anchor="end">'
                     f'{esc(name.replace(".router.top_k_indices", ""))}</text>')
        for t, share in enumerate(shares):
            red, green = int(200 * (1 - share)), int(160 * share)
            parts.append(f'<rect x="{left + cell * t}" y="{14 * i}" width="{cell}" height="12" '
                         f'fill="rgb({red},{green},60)"><title>{esc(name)} token {t}: {share:.0%}</title></rect>')
    parts.append(f'<text x="{left}" y="{14 * len(routers) + 22}" font-size="11">token (N = B*T): share of top-k '
                 'choices shared, green all, red none</text></svg>')
    return "\n".join(parts)


def versions():
    """The versions that produced the report."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("jetmoe-from-scratch", "numpy", "safetensors", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_html(path, rows, trace_a, trace_b, title, rtol, atol, notes=(), x_label="trace point, in forward order"):
    """Write the report of a compare (rows: reference.io.compare.Divergence) to `path`."""
    command = " ".join(["jetmoe", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("jetmoe") else \
        " ".join(sys.argv)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    routing = routing_map(trace_a, trace_b)
    body = [f"<h1>jetmoe debug compare: {esc(title)}</h1>", "<h2>Summary</h2>", summary(rows, title, rtol, atol),
            f"<ul>{notes_html}</ul>" if notes_html else "",
            "<h2>Error along the trace</h2>", error_plot(rows, rtol, x_label),
            "<h2>Routing agreement</h2>", routing or "<p>The traces hold no top-k choices to compare.</p>",
            "<h2>Verdicts</h2>", verdict_table(rows),
            "<h2>Command and versions</h2>", f"<pre id='command'>{esc(command)}</pre>",
            "<table>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in versions().items()) +
            "</table>"]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; '
            f'script-src \'unsafe-inline\'; img-src data:"><style>{STYLE}</style>'
            f'<script>{SCRIPT}</script></head><body>\n' + "\n".join(body) + "\n</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
