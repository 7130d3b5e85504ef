"""Self-contained HTML pages for `optimize`, `diff` and `split` (``--html R.html``).

One file: inline CSS, a few lines of inline JS (sortable tables, a filter, an error trap),
and inline SVG charts (``html_charts``). Nothing is fetched. Every model-provided string
(names, reasons, paths) is escaped. Pages render the JSON-safe dicts the commands already
produce (the optimize report, the diff result, split's result), so they can be rebuilt
from saved JSON.
"""

from __future__ import annotations

import math
from pathlib import Path

from .html_charts import bar_chart, esc, fmt, line_chart, number

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d232b;background:#fafbfc;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2e8;padding-bottom:4px}
.meta{color:#57606a;margin:0 0 12px}.meta code{background:#eef1f4;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #dde2e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;cursor:pointer;user-select:none;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdeceb}tr.first td{background:#fff4d6;font-weight:600}.status-ok{color:#1f7a3d}
.status-failed,.status-rolled_back{color:#b0413e;font-weight:600}.status-skipped{color:#8c8c8c}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600}
.badge.ok{background:#dff3e4;color:#1f7a3d}.badge.fail{background:#fdeceb;color:#b0413e}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart-box{margin:0;background:#fff;border:1px solid #dde2e8;border-radius:4px;flex:1 1 540px;max-width:580px}
svg.chart{display:block;width:100%;height:auto}.chart-title{font-weight:600;font-size:13px}
.tick{font-size:10px;fill:#57606a}.axis-label{font-size:11px;fill:#57606a}.grid{stroke:#eef1f4}
.line{stroke-width:1.4}.highlight{stroke:#b0413e;stroke-width:1.5;stroke-dasharray:4 3}.legend{font-size:11px}
.callout{background:#fff4d6;border:1px solid #e7c76b;padding:8px 12px;border-radius:4px;margin:8px 0}
details{margin:6px 0}summary{cursor:pointer;color:#2f6fb0}input.filter{margin:4px 0;padding:3px 6px;width:280px}
#js-errors{color:#b0413e}
"""

_JS = """
(function(){
  var errors=[];
  window.addEventListener('error',function(e){errors.push(String(e.message));
    document.documentElement.setAttribute('data-errors',errors.join(' | '));});
  function cellValue(td){var v=td.getAttribute('data-v');if(v===null){v=td.textContent.trim();}
    var n=parseFloat(v);return isNaN(n)?v.toLowerCase():n;}
  function sortTable(table,col){var body=table.tBodies[0];if(!body){return;}
    var rows=Array.prototype.slice.call(body.rows);var dir=table.getAttribute('data-dir')==='asc'?-1:1;
    rows.sort(function(a,b){var x=cellValue(a.cells[col]),y=cellValue(b.cells[col]);
      if(typeof x===typeof y){return x<y?-dir:x>y?dir:0;}return typeof x==='number'?-dir:dir;});
    rows.forEach(function(r){body.appendChild(r);});table.setAttribute('data-dir',dir===1?'asc':'desc');}
  document.addEventListener('DOMContentLoaded',function(){
    Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(table){
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
        th.addEventListener('click',function(){sortTable(table,i);});});});
    Array.prototype.forEach.call(document.querySelectorAll('input.filter'),function(input){
      var table=document.getElementById(input.getAttribute('data-table'));
      input.addEventListener('input',function(){var q=input.value.toLowerCase();
        Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
          r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});});
    document.documentElement.setAttribute('data-charts',String(document.querySelectorAll('svg.chart').length));
    document.documentElement.setAttribute('data-ready','1');
  });
})();
"""


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_JS}</script></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"meta\">{subtitle}</p>" + "".join(sections) +
            "<p class=\"meta\">written by onnxopt; self-contained, no network access</p></body></html>\n")


def write_page(text: str, path: str | Path) -> Path:
    """Write the page atomically."""
    from .model_io import write_atomically

    return write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def table(headers: list[str], rows: list[list], *, table_id: str | None = None, row_classes: list[str] | None = None,
          numeric: set[int] | None = None) -> str:
    """A sortable table; cells are escaped text, or ``(text, sort_value)`` pairs."""
    numeric = numeric or set()
    out = [f'<table class="sortable"{f" id={chr(34)}{esc(table_id)}{chr(34)}" if table_id else ""}><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        out.append(f'<tr class="{esc(cls)}">' if cls else "<tr>")
        for j, cell in enumerate(row):
            text, key = cell if isinstance(cell, tuple) else (cell, None)
            attrs = ' class="num"' if j in numeric else ""
            if key is not None:
                attrs += f' data-v="{esc(key)}"'
            out.append(f"<td{attrs}>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def _metric_cell(value) -> tuple[str, str]:
    x = number(value)
    return fmt(value), ("" if x is None else ("1e308" if x == math.inf else "-1e308" if x == -math.inf else repr(x)))


def _mb(count) -> str:
    count = number(count) or 0.0
    return f"{count / 2**20:.2f} MB" if count >= 2**20 else f"{count / 1024:.1f} KB"


def _worst(metrics: dict | None) -> dict:
    """Worst value of each metric across outputs (lowest cosine/SNR, highest errors)."""
    worst: dict[str, float] = {}
    for values in (metrics or {}).values():
        for key, value in (values or {}).items():
            x = number(value)
            if x is None:
                continue
            if key in ("max_abs", "max_rel"):
                worst[key] = max(worst.get(key, -math.inf), x)
            else:
                worst[key] = min(worst.get(key, math.inf), x)
    return worst


# -- diff -----------------------------------------------------------------------------------------

def tensor_error_section(tensors: dict, title: str = "Per-tensor error along topological order") -> str:
    """SNR per compared tensor in the reference's topological order, the first divergence marked."""
    rows = tensors.get("rows") or []
    first = tensors.get("first_divergence")
    finite = [number(r.get("snr_db")) for r in rows]
    finite = [x for x in finite if x is not None and math.isfinite(x)]
    cap = max(finite + [60.0]) + 10.0
    labels = [f"#{r['index']} {r['tensor']} ({r['op']})" for r in rows]
    chart = line_chart(title.replace("Per-tensor error", "SNR"), "tensor-snr", [r["index"] for r in rows],
                       [("snr_db (exact drawn at top)", [cap if number(r.get("snr_db")) == math.inf else r.get("snr_db")
                                                         for r in rows])],
                       y_label="SNR dB", x_label="node position in topological order", point_labels=labels,
                       highlight=[first["index"]] if first else None)
    error_chart = line_chart("max abs error", "tensor-maxabs", [r["index"] for r in rows],
                             [("log10 max_abs", [_log10(r.get("max_abs")) for r in rows])],
                             y_label="log10 max |B - A|", x_label="node position in topological order",
                             point_labels=labels, highlight=[first["index"]] if first else None)
    if first:
        callout = (f'<div class="callout" id="first-divergence">First divergence: tensor <b>{esc(first["tensor"])}</b> '
                   f'from {esc(first["op"])} node <b>{esc(first["node"])}</b> (position {esc(first["index"])}): '
                   f'max_abs {esc(fmt(first.get("max_abs")))}, cosine {esc(fmt(first.get("cosine"), 7))}, '
                   f'SNR {esc(fmt(first.get("snr_db")))} dB</div>')
    else:
        callout = '<div class="callout" id="first-divergence">No tensor diverges beyond tolerance.</div>'
    tol = tensors.get("tolerance") or {}
    summary = (f'<p class="meta">{esc(tensors.get("compared", len(rows)))} tensors compared on '
               f'{esc(tensors.get("samples", "?"))} samples, {esc(tensors.get("diverged", 0))} beyond tolerance '
               f'(rtol {esc(tol.get("rtol", "?"))}, atol {esc(tol.get("atol", "?"))} at each tensor\'s scale)</p>')
    body = [[(str(r["index"]), r["index"]), r["tensor"], r.get("tensor_b", ""), r["node"], r["op"],
             "yes" if r.get("equal") else "no", _metric_cell(r.get("max_abs")), _metric_cell(r.get("cosine")),
             _metric_cell(r.get("snr_db"))] for r in rows]
    classes = ["first" if first and r["index"] == first["index"] and r["tensor"] == first["tensor"]
               else ("" if r.get("equal") else "bad") for r in rows]
    listing = ('<details><summary>every compared tensor</summary>'
               '<input class="filter" data-table="tensor-table" placeholder="filter by name or op">'
               + table(["#", "tensor", "tensor in B", "node", "op", "within tolerance", "max_abs", "cosine", "snr_db"],
                       body, table_id="tensor-table", row_classes=classes, numeric={0, 6, 7, 8}) + "</details>")
    return section(title, summary, callout, f'<div class="charts">{chart}{error_chart}</div>', listing)


def _log10(value):
    x = number(value)
    if x is None or math.isnan(x):
        return None
    if x <= 0:
        return -12.0
    return math.log10(x) if math.isfinite(x) else x


def render_diff_page(result: dict) -> str:
    s = result["structure"]
    subtitle = (f'A <code>{esc(result.get("model_a", "A"))}</code> vs B <code>{esc(result.get("model_b", "B"))}</code>')
    summary = table(["", "A", "B"], [
        ["nodes", str(s["nodes"][0]), str(s["nodes"][1])],
        ["weights", _mb(s["initializer_bytes"][0]), _mb(s["initializer_bytes"][1])],
        ["opsets", str((s.get("opsets") or [None])[0] or "same"), str((s.get("opsets") or [None, None])[1] or "same")],
    ])
    matched = s.get("nodes_matched", {})
    summary += (f'<p class="meta">nodes matched: {esc(matched.get("name", 0))} by name, '
                f'{esc(matched.get("structure", 0))} by structure</p>')
    hist_a, hist_b = (s.get("op_histogram") or [{}, {}])
    ops = sorted(set(hist_a) | set(hist_b))
    op_rows = [[op, (str(hist_a.get(op, 0)), hist_a.get(op, 0)), (str(hist_b.get(op, 0)), hist_b.get(op, 0)),
                (f"{hist_b.get(op, 0) - hist_a.get(op, 0):+d}", hist_b.get(op, 0) - hist_a.get(op, 0))] for op in ops]
    op_chart = bar_chart("op count change (B - A)", "op-delta", list(s.get("op_delta", {})),
                         list(s.get("op_delta", {}).values()), y_label="nodes",
                         colors=["#3a9a5b" if v > 0 else "#b0413e" for v in s.get("op_delta", {}).values()]) \
        if s.get("op_delta") else ""
    io = s.get("io_signature") or {}
    io_rows = []
    for kind in ("inputs", "outputs"):
        for side, values in zip(("A", "B"), io.get(kind, [[], []])):
            for name, dtype, shape in values:
                io_rows.append([kind, side, name, dtype, shape])
    lists = []
    for key in ("initializers_removed", "initializers_added", "initializers_changed", "initializers_values_changed",
                "initializers_renamed", "constants_lifted", "initializers_inlined", "nodes_removed", "nodes_added",
                "nodes_renamed", "nodes_changed"):
        items = s.get(key) or []
        if items:
            shown = [" → ".join(i) if isinstance(i, list) else (f"{i['node']} ({', '.join(i['attributes'])})"
                     if isinstance(i, dict) else str(i)) for i in items]
            lists.append(f"<details><summary>{esc(key.replace('_', ' '))} ({len(items)})</summary>"
                         f"<p>{esc(', '.join(shown))}</p></details>")
    sections = [section("Structure", summary, f'<div class="charts">{op_chart}</div>' if op_chart else "",
                        "".join(lists) or "<p>No structural differences.</p>"),
                section("Op histogram", table(["op", "A", "B", "change"], op_rows, numeric={1, 2, 3})),
                section("IO signature", table(["", "model", "name", "dtype", "shape"], io_rows))]
    if "tensors" in result:
        sections.append(tensor_error_section(result["tensors"]))
    return page("onnxopt diff", subtitle, sections)


# -- optimize ---------------------------------------------------------------------------------------

def render_optimize_page(report: dict) -> str:
    steps = report.get("passes") or []
    ok = report.get("ok")
    subtitle = (f'<span class="badge {"ok" if ok else "fail"}">{"ok" if ok else "failed"}</span> '
                f'model <code>{esc(report.get("model"))}</code> → <code>{esc(report.get("output"))}</code>; '
                f'pipeline <code>{esc(report.get("pipeline"))}</code>; budget <code>{esc(report.get("budget") or "none")}'
                f'</code>; inputs {esc((report.get("inputs") or {}).get("source"))}')
    rows, classes = [], []
    for step in steps:
        before, after = step.get("before") or {}, step.get("after") or {}
        worst = _worst(step.get("fidelity_metrics"))
        rows.append([(str(step["index"]), step["index"]), step["spec"], step["status"] +
                     ("" if step.get("modified") or step["status"] != "ok" else " (no change)"),
                     (f"{number(step.get('seconds')) or 0:.3f}", step.get("seconds") or 0),
                     f"{before.get('nodes', '-')} → {after.get('nodes', '-')}" if before else "-",
                     f"{_mb(_weights(before))} → {_mb(_weights(after))}" if before else "-",
                     _metric_cell(worst.get("cosine")), _metric_cell(worst.get("snr_db")), step.get("reason") or ""])
        classes.append("bad" if step["status"] in ("failed", "rolled_back") else "")
    pass_table = table(["#", "pass", "status", "seconds", "nodes", "weights", "worst cosine", "worst SNR dB", "reason"],
                       rows, table_id="pass-table", row_classes=classes, numeric={0, 3, 6, 7})
    labels = ["input"] + [f"{s['index']} {s['name']}" for s in steps]
    first_before = next((s.get("before") for s in steps if s.get("before")), {}) or {}
    sizes = [_weights(first_before) if first_before else None] + [_weights(s.get("after")) if s.get("after") else None
                                                                  for s in steps]
    nodes = [first_before.get("nodes")] + [(s.get("after") or {}).get("nodes") for s in steps]
    charts = [bar_chart("weights after each pass", "size-chart", labels, [None if v is None else v / 2**20 for v in sizes],
                        y_label="MB", unit=" MB"),
              bar_chart("nodes after each pass", "nodes-chart", labels, nodes, y_label="nodes")]
    latency = report.get("latency") or {}
    if latency:
        lat_labels = ["input"] + [f"{s['index']} {s['name']}" for s in steps]
        values = [latency.get("input")] + [latency.get(str(s["index"])) for s in steps]
        charts.append(bar_chart(f"model latency after each pass (ORT, {latency.get('note', 'median')})",
                                "latency-chart", lat_labels, [None if v is None else v * 1e3 for v in values],
                                y_label="ms", unit=" ms", colors=["#d9822b"] * len(lat_labels)))
    charts.append(bar_chart("pass time", "time-chart", [f"{s['index']} {s['name']}" for s in steps],
                            [s.get("seconds") for s in steps], y_label="seconds", unit=" s",
                            colors=["#7b5ea7"] * len(steps)))
    snr = [_worst(s.get("fidelity_metrics")).get("snr_db") for s in steps]
    cos = [_worst(s.get("fidelity_metrics")).get("cosine") for s in steps]
    if any(v is not None for v in snr):
        finite = [v for v in snr if v is not None and math.isfinite(v)]
        cap = max(finite + [60.0]) + 10.0
        charts.append(line_chart("fidelity after each pass (worst output)", "fidelity-chart",
                                 [s["index"] for s in steps],
                                 [("SNR dB (exact at top)", [cap if v == math.inf else v for v in snr])],
                                 y_label="SNR dB", x_label="pass", point_labels=[f"{s['index']} {s['name']}: cosine "
                                                                                 f"{fmt(c, 7)}" for s, c in zip(steps, cos)]))
    sections = [section("Passes", pass_table), section("Size, latency and fidelity",
                                                      f'<div class="charts">{"".join(charts)}</div>')]
    fallback = _fallback_sections(steps)
    if fallback:
        sections.append(section("Fallback trials (mixed precision)", *fallback))
    sqnr = [s for s in steps if s.get("tensor_sqnr")]
    for step in sqnr:
        entries = [e for e in step["tensor_sqnr"] if "tensor" in e]
        if entries:
            sections.append(section(f"Lowest-SQNR tensors after pass {step['index']} {step['name']}",
                                    table(["tensor", "SQNR dB"], [[e["tensor"], _metric_cell(e.get("sqnr_db"))]
                                                                  for e in entries], numeric={1})))
    if report.get("tensors"):
        sections.append(tensor_error_section(report["tensors"], "Per-tensor error of the output against the input model"))
    notes = [report.get("crash"), *(report.get("structure_problems") or []), *(report.get("notes") or [])]
    notes = [n for n in notes if n]
    if notes:
        sections.append(section("Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"))
    return page("onnxopt optimize", subtitle, sections)


def _weights(stats: dict | None) -> float:
    stats = stats or {}
    return (number(stats.get("initializer_bytes")) or 0.0) + (number(stats.get("constant_bytes")) or 0.0)


def _fallback_sections(steps: list[dict]) -> list[str]:
    parts = []
    for step in steps:
        fallback = step.get("fallback")
        if not fallback or not fallback.get("trials"):
            continue
        trials = fallback["trials"]
        rows = [[(str(i), i), t.get("stage", ""), t.get("precision") or "", (str(t.get("promoted", 0)), t.get("promoted", 0)),
                 (str(t.get("float_nodes", 0)), t.get("float_nodes", 0)), "yes" if t.get("ok") else "no",
                 _metric_cell((t.get("worst") or {}).get("cosine")), _metric_cell((t.get("worst") or {}).get("snr_db")),
                 "; ".join(t.get("breaches") or [])] for i, t in enumerate(trials)]
        chart = bar_chart(f"pass {step['index']} {step['name']}: worst cosine per trial", f"fallback-{step['index']}",
                          [f"{i} {t.get('stage', '')}" for i, t in enumerate(trials)],
                          [(t.get("worst") or {}).get("cosine") for t in trials], y_label="cosine",
                          colors=["#3a9a5b" if t.get("ok") else "#b0413e" for t in trials])
        chosen = (f'<p class="meta">chosen: {len(fallback.get("promoted_nodes") or [])} nodes promoted to '
                  f'{esc(fallback.get("precision") or "-")}, {len(fallback.get("float_nodes") or [])} kept in float: '
                  f'{esc(", ".join((fallback.get("float_nodes") or [])[:20]))}</p>')
        parts.append(f"<h3>{esc(step['index'])} {esc(step['spec'])}</h3>" + chosen + chart +
                     table(["trial", "stage", "precision", "promoted", "float nodes", "holds", "worst cosine",
                            "worst SNR dB", "breaches"], rows, row_classes=["" if t.get("ok") else "bad" for t in trials],
                           numeric={0, 3, 4, 6, 7}))
    return parts


# -- split ----------------------------------------------------------------------------------------

def render_split_page(result: dict) -> str:
    """The split result (``SplitResult.as_dict()``): stage costs against the ideal, stage table,
    the wiring between stages, and the stitch-back check."""
    stages = result.get("stages") or []
    balance = result.get("balance") or {}
    stitch = result.get("stitch") or {}
    ok = result.get("ok")
    subtitle = (f'<span class="badge {"ok" if ok else "fail"}">{"stitch-back exact" if ok else "stitch-back failed"}'
                f'</span> pass <code>{esc(result.get("pass"))}</code>; {len(stages)} stages in '
                f'<code>{esc(result.get("outdir"))}</code>')
    labels = [f"stage {s.get('index', i)}" + (f" ({s['partition']})" if s.get("partition") else "")
              for i, s in enumerate(stages)]
    costs = balance.get("stage_costs") or [s.get("cost") for s in stages]
    charts = []
    if any(number(c) is not None for c in costs):
        by = balance.get("by") or "cost"
        ideal = number(balance.get("ideal_cost"))
        ratio = number(balance.get("max_over_ideal"))
        title = f"stage cost by {by}" + (f" (largest / ideal = {ratio:.3f})" if ratio is not None else "")
        charts.append(bar_chart(title, "stage-cost-chart", labels, costs, y_label=str(by),
                                reference=("ideal", ideal) if ideal is not None else None))
    charts.append(bar_chart("parameters per stage", "stage-params-chart", labels, [s.get("params") for s in stages],
                            y_label="parameters", colors=["#d9822b"] * len(stages)))
    charts.append(bar_chart("nodes per stage", "stage-nodes-chart", labels, [s.get("nodes") for s in stages],
                            y_label="nodes", colors=["#3a9a5b"] * len(stages)))
    rows = [[(str(s.get("index", i)), s.get("index", i)), s.get("file", ""), s.get("partition") or "",
             (str(s.get("nodes", "-")), s.get("nodes") or 0), (str(s.get("params", "-")), s.get("params") or 0),
             (_mb(s.get("weight_bytes")), s.get("weight_bytes") or 0), _metric_cell(s.get("cost")),
             ", ".join(s.get("inputs") or []), ", ".join(s.get("outputs") or [])] for i, s in enumerate(stages)]
    stage_table = table(["stage", "file", "partition", "nodes", "params", "weights", "cost", "inputs", "outputs"],
                        rows, table_id="stage-table", numeric={0, 3, 4, 5, 6})
    wiring = [[t.get("name", ""), "model input" if t.get("model_input") else f"stage {t.get('from')}",
               ", ".join(f"stage {x}" for x in t.get("to") or []) + (" + model output" if t.get("model_output") else "")]
              for t in result.get("tensors") or []]
    metrics = stitch.get("metrics") or {}
    stitch_rows = [[name, _metric_cell(m.get("max_abs")), _metric_cell(m.get("cosine")), _metric_cell(m.get("snr_db")),
                    str(m.get("error", ""))] for name, m in metrics.items()]
    seconds = result.get("seconds") or {}
    timing = ", ".join(f"{esc(k)} {number(v) or 0:.2f} s" for k, v in seconds.items())
    sections = [section("Stage costs", f'<div class="charts">{"".join(charts)}</div>', stage_table),
                section("Wiring between stages", table(["tensor", "from", "to"], wiring)),
                section(f"Stitch-back against {stitch.get('against', 'the original')}: "
                        f"{'exact' if stitch.get('equal') else 'DIFFERS'}",
                        table(["output", "max_abs", "cosine", "snr_db", "error"], stitch_rows, numeric={1, 2, 3}),
                        f'<p class="meta">{timing}</p>' if timing else "")]
    return page("onnxopt split", subtitle, sections)
