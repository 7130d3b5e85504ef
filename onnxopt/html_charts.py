"""Hand-written SVG charts for the HTML reports: bars and lines, no scripts, no network.

Every text that reaches the SVG goes through :func:`esc`. Values may be JSON-safe strings
("inf", "-inf", "nan") or None; they are drawn at the chart's edge or left out, never crash.
"""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT = 760, 280
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 30, 70
COLORS = ("#2f6fb0", "#d9822b", "#3a9a5b", "#b0413e", "#7b5ea7", "#8c8c8c")


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def number(value) -> float | None:
    """A float from a metric value (JSON-safe strings included); None when there is none."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt(value, digits: int = 4) -> str:
    x = number(value)
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e12:
        return str(int(x))
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def _short(value: float) -> str:
    """A tick label of a few characters: 2.5k, 4M, 1.2G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(value) >= scale:
            return f"{value / (scale if suffix != 'k' else 1e3):.3g}{suffix}"
    return fmt(value, 3)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _frame(title: str, chart_id: str, body: list[str], y_label: str, x_label: str) -> str:
    return (f'<figure class="chart-box"><svg class="chart" data-chart="{esc(chart_id)}" id="{esc(chart_id)}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
            f'<text class="chart-title" x="{MARGIN_LEFT}" y="18">{esc(title)}</text>'
            f'<text class="axis-label" transform="translate(14,{HEIGHT // 2}) rotate(-90)" text-anchor="middle">'
            f'{esc(y_label)}</text>'
            f'<text class="axis-label" x="{(WIDTH + MARGIN_LEFT) // 2}" y="{HEIGHT - 6}" text-anchor="middle">'
            f'{esc(x_label)}</text>' + "".join(body) + "</svg></figure>")


def _y_axis(lo: float, hi: float, scale) -> list[str]:
    parts = []
    for tick in _ticks(lo, hi):
        if tick < lo - 1e-12 or tick > hi + 1e-12:
            continue
        y = scale(tick)
        parts.append(f'<line class="grid" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(_short(tick))}</text>')
    return parts


def bar_chart(title: str, chart_id: str, labels: list[str], values: list, *, y_label: str = "",
              x_label: str = "", unit: str = "", colors: list[str] | None = None,
              reference: tuple[str, float] | None = None) -> str:
    """One bar per label; missing values leave a gap; ``colors`` per bar (default one colour);
    ``reference`` draws a labelled dashed level (e.g. the ideal stage cost)."""
    nums = [number(v) for v in values]
    finite = [v for v in nums if v is not None and math.isfinite(v)] + ([reference[1]] if reference else [])
    hi = max(finite + [0.0]) or 1.0
    lo = min(finite + [0.0])
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    scale = lambda v: MARGIN_TOP + plot_h * (1 - (v - lo) / (hi - lo or 1.0))  # noqa: E731
    body = _y_axis(lo, hi, scale)
    n = max(len(labels), 1)
    slot = plot_w / n
    bar_w = max(min(slot * 0.7, 60), 1.0)
    for i, (label, value) in enumerate(zip(labels, nums)):
        x = MARGIN_LEFT + slot * i + (slot - bar_w) / 2
        color = (colors[i] if colors else COLORS[0])
        if value is not None and math.isfinite(value):
            top, zero = scale(value), scale(0.0)  # lo <= 0 <= hi
            y, h = min(top, zero), max(abs(zero - top), 0.5)
            body.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                        f'fill="{esc(color)}"><title>{esc(label)}: {esc(fmt(value))}{esc(unit)}</title></rect>')
        if n <= 40:
            cx = x + bar_w / 2
            short = label if len(label) <= 18 else label[:17] + "…"
            body.append(f'<text class="tick" transform="translate({cx:.1f},{HEIGHT - MARGIN_BOTTOM + 12}) rotate(30)">'
                        f'{esc(short)}</text>')
    if reference:
        y = scale(reference[1])
        body.append(f'<line class="highlight reference" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" '
                    f'y2="{y:.1f}"/><text class="legend" x="{WIDTH - MARGIN_RIGHT - 4}" y="{y - 4:.1f}" '
                    f'text-anchor="end">{esc(reference[0])} {esc(fmt(reference[1]))}</text>')
    return _frame(title, chart_id, body, y_label, x_label)


def line_chart(title: str, chart_id: str, xs: list, series: list[tuple[str, list]], *, y_label: str = "",
               x_label: str = "", cap: float | None = None, highlight: list[int] | None = None,
               point_labels: list[str] | None = None) -> str:
    """Lines over a shared x axis. Infinite values are drawn at ``cap`` (or the plot's edge) as
    hollow points; ``highlight`` marks x positions (e.g. the first divergence) with a red rule."""
    finite = [v for _, ys in series for v in (number(y) for y in ys) if v is not None and math.isfinite(v)]
    xnums = [number(x) or 0.0 for x in xs]
    hi = max(finite + ([cap] if cap is not None else [])) if finite or cap is not None else 1.0
    lo = min(finite) if finite else 0.0
    if hi == lo:
        hi, lo = hi + 1.0, lo - 1.0
    x_lo, x_hi = (min(xnums), max(xnums)) if xnums else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1.0
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    sx = lambda v: MARGIN_LEFT + plot_w * (v - x_lo) / (x_hi - x_lo)  # noqa: E731
    sy = lambda v: MARGIN_TOP + plot_h * (1 - (v - lo) / (hi - lo))  # noqa: E731
    body = _y_axis(lo, hi, sy)
    for tick in _ticks(x_lo, x_hi):
        if x_lo <= tick <= x_hi:
            body.append(f'<text class="tick" x="{sx(tick):.1f}" y="{HEIGHT - MARGIN_BOTTOM + 16}" '
                        f'text-anchor="middle">{esc(fmt(tick, 4))}</text>')
    for x in highlight or []:
        px = sx(number(x) or 0.0)
        body.append(f'<line class="highlight" x1="{px:.1f}" x2="{px:.1f}" y1="{MARGIN_TOP}" '
                    f'y2="{HEIGHT - MARGIN_BOTTOM}"/>')
    for k, (name, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        points, marks = [], []
        for i, (x, y) in enumerate(zip(xnums, ys)):
            v = number(y)
            if v is None or math.isnan(v):
                continue
            hollow = math.isinf(v)
            v = (hi if v > 0 else lo) if hollow else v
            px, py = sx(x), sy(v)
            points.append(f"{px:.1f},{py:.1f}")
            label = point_labels[i] if point_labels else fmt(x)
            marks.append(f'<circle class="point{" hollow" if hollow else ""}" cx="{px:.1f}" cy="{py:.1f}" r="2.6" '
                         f'stroke="{color}" fill="{"none" if hollow else color}"><title>{esc(label)}: {esc(name)} '
                         f'{esc(fmt(y))}</title></circle>')
        if len(points) > 1:
            body.append(f'<polyline class="line" fill="none" stroke="{color}" points="{" ".join(points)}"/>')
        body.extend(marks)
        body.append(f'<text class="legend" x="{WIDTH - MARGIN_RIGHT - 150}" y="{18 + 14 * k}" fill="{color}">'
                    f'● {esc(name)}</text>')
    return _frame(title, chart_id, body, y_label, x_label)
