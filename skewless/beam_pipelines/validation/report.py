"""The one-page HTML report of a validation: the anomalies as a table, and a chart (inline SVG,
no scripts, no files beside it) of the baseline and new distributions of each drifted feature."""

from __future__ import annotations

import html

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

from skewless.transforms.anomalies import categorical_distributions, numeric_distributions

CHARTED = ("distribution_drift", "unseen_categories")
MAX_BARS = 30
_W, _H, _PAD = 760, 220, 40
_BASE, _NEW = "#4c78a8", "#f58518"
_QUESTIONS = {
    1: "distribution", 2: "missing", 3: "unexpected", 4: "type", 5: "presence", 6: "value count",
}  # fmt: skip


def render_report(
    anomalies: list[dict],
    baseline: statistics_pb2.DatasetFeatureStatistics,
    new: statistics_pb2.DatasetFeatureStatistics,
    title: str,
    drift_checks: list[dict] = (),
) -> str:
    """The report's HTML text; `drift_checks` (baseline.drift_checks) lists every feature's
    drift next to its threshold and where the threshold comes from."""
    blocking = [a for a in anomalies if a["blocking"]]
    verdict = (
        f"<p class=bad>{len(blocking)} blocking anomal{'y' if len(blocking) == 1 else 'ies'}: "
        "exit code 3</p>"
        if blocking
        else "<p class=ok>No blocking anomaly: exit code 0</p>"
    )
    rows = "".join(
        "<tr{}><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            " class=block" if a["blocking"] else "",
            a["question"],
            _QUESTIONS.get(a["question"], ""),
            html.escape(a["feature"]),
            a["kind"],
            _fmt(a["value"]),
            _fmt(a["threshold"]),
            "yes" if a["blocking"] else "no",
            html.escape(a["description"]),
        )  # fmt: skip
        for a in anomalies
    )
    table = (
        "<table><tr><th>question</th><th>feature</th><th>kind</th><th>value</th>"
        f"<th>threshold</th><th>blocking</th><th>description</th></tr>{rows}</table>"
        if anomalies
        else "<p>No anomalies.</p>"
    )
    checks = "".join(
        "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            " class=block" if c["blocking"] else "",
            html.escape(c["feature"]),
            html.escape(c["measure"] or ""),
            _fmt(c["value"]),
            _fmt(c["threshold"]),
            html.escape(c["source"]),
        )
        for c in drift_checks
    )
    checks_table = (
        "<table><tr><th>feature</th><th>measure</th><th>value</th><th>threshold</th>"
        f"<th>threshold from</th></tr>{checks}</table>"
        if drift_checks
        else "<p>None.</p>"
    )
    base = {f.name: f for f in baseline.features}
    fresh = {f.name: f for f in new.features}
    charts = []
    for name in dict.fromkeys(a["feature"] for a in anomalies if a["kind"] in CHARTED):
        if name in base and name in fresh:
            charts.append(
                f"<h3>{html.escape(name)}</h3>{distribution_chart(base[name], fresh[name])}"
            )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px sans-serif; margin: 2em; max-width: 1100px }}
table {{ border-collapse: collapse }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left }}
tr.block td {{ background: #fde0dc }} .bad {{ color: #b00; font-weight: bold }} .ok {{ color: #070; font-weight: bold }}
.legend span {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>baseline: {baseline.num_examples:,} examples; new data: {new.num_examples:,} examples</p>
{verdict}
<h2>Anomalies</h2>
{table}
<h2>Drift checks</h2>
{checks_table}
<h2>Drifted features</h2>
<p class=legend><span style="background:{_BASE}"></span>baseline<span style="background:{_NEW}"></span>new data</p>
{"".join(charts) or "<p>None.</p>"}
</body></html>
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def distribution_chart(base, new) -> str:
    """Baseline and new distributions of one feature as grouped bars (SVG): the fractions of
    the most frequent values (strings), or the masses of the common buckets the drift check
    compares (numbers)."""
    if base.HasField("string_stats") and new.HasField("string_stats"):
        labels, p, q = categorical_distributions(base, new)
        order = np.argsort(-np.maximum(p, q), kind="stable")[:MAX_BARS]
        labels, p, q = [labels[i] for i in order], p[order], q[order]
    else:
        grid = numeric_distributions(base, new)
        if grid is None:
            return "<p>(no histogram)</p>"
        edges, p, q = grid
        labels = [f"{e:.4g}" for e in edges]
        if len(labels) > MAX_BARS:  # merge neighbouring buckets so the bars stay readable
            groups = np.array_split(np.arange(len(labels)), MAX_BARS)
            labels = [labels[g[0]] for g in groups]
            p = np.array([p[g].sum() for g in groups])
            q = np.array([q[g].sum() for g in groups])
    return _bars(labels, p, q)


def _bars(labels: list[str], p: np.ndarray, q: np.ndarray) -> str:
    n = max(len(labels), 1)
    top = float(max(p.max(initial=0), q.max(initial=0))) or 1.0
    slot = (_W - 2 * _PAD) / n
    bar = slot * 0.4
    parts = [f'<svg width="{_W}" height="{_H + 60}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(f'<line x1="{_PAD}" y1="{_H}" x2="{_W - _PAD}" y2="{_H}" stroke="#333"/>')
    parts.append(f'<text x="2" y="{_PAD - 20}" font-size="11">{top:.1%}</text>')
    for i, (label, a, b) in enumerate(zip(labels, p, q, strict=True)):
        x = _PAD + i * slot
        for offset, value, color in ((0.1, a, _BASE), (0.5, b, _NEW)):
            h = (_H - _PAD) * float(value) / top
            parts.append(
                f'<rect x="{x + offset * slot:.1f}" y="{_H - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{html.escape(label)}: {value:.2%}</title></rect>'
            )
        parts.append(
            f'<text x="{x + slot / 2:.1f}" y="{_H + 12}" font-size="10" text-anchor="end" '
            f'transform="rotate(-45 {x + slot / 2:.1f} {_H + 12})">{html.escape(label[:14])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
