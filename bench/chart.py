"""SVG charts for the rush bench, written by hand with the stdlib (no matplotlib).

    svg = line_chart("title", [panel, ...])      panels stacked vertically, shared x axis
    svg = bar_chart("title", [(label, value, text)], unit="req/s")

A panel: {"title": str, "xlabel": str,
          "left":  {"label": str, "series": [{"name", "points": [(x, y)], "color"}], "log": bool},
          "right": {...} (optional, a second y axis),
          "marks": [(x, "label")] (optional vertical markers)}
Points with y None are gaps. Everything is plain SVG 1.1 text; browsers and GitHub render it.
"""
import math
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
FONT = 'font-family="Helvetica,Arial,sans-serif"'


def nice_ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while True:
        ticks.append(round(v, 10))
        if v >= hi - step * 1e-9:
            return ticks
        v += step


def log_ticks(lo, hi):
    lo = max(lo, 1e-3)
    ticks = []
    k = math.floor(math.log10(lo))
    while 10 ** k <= hi * 10:
        for m in (1, 2, 5):
            ticks.append(m * 10 ** k)
        k += 1
    return [t for t in ticks if lo / 2 <= t <= hi * 5] or [lo, hi]


def fmt(v):
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    if a >= 1 or a == 0:
        return f"{v:g}"
    return f"{v:.3g}"


class _Axis:
    def __init__(self, spec, top, height):
        self.spec = spec or {"series": []}
        self.log = bool(self.spec.get("log"))
        ys = [p[1] for s in self.spec["series"] for p in s["points"] if p[1] is not None]
        if self.log:
            ys = [y for y in ys if y > 0] or [1]
            self.ticks = log_ticks(min(ys), max(ys))
            self.lo, self.hi = math.log10(self.ticks[0]), math.log10(self.ticks[-1])
        else:
            hi = max(ys) if ys else 1
            self.ticks = nice_ticks(0, hi if hi > 0 else 1)
            self.lo, self.hi = self.ticks[0], self.ticks[-1]
        if self.hi <= self.lo:
            self.hi = self.lo + 1
        self.top, self.height = top, height

    def y(self, v):
        if self.log:
            v = math.log10(max(v, 10 ** self.lo))
        return self.top + self.height - (v - self.lo) / (self.hi - self.lo) * self.height


def line_chart(title, panels, width=960, panel_height=260):
    left_pad, right_pad, top_pad, gap = 80, 80, 40, 70
    plot_w = width - left_pad - right_pad
    height = top_pad + len(panels) * (panel_height + gap) + 10
    xs = [p[0] for pn in panels for side in ("left", "right") if pn.get(side)
          for s in pn[side]["series"] for p in s["points"]]
    xs += [m[0] for pn in panels for m in pn.get("marks", [])]
    xlo, xhi = (min(xs), max(xs)) if xs else (0, 1)
    xt = nice_ticks(xlo, xhi, 10)
    xlo, xhi = min(xt[0], xlo), max(xt[-1], xhi)
    if xhi <= xlo:
        xhi = xlo + 1

    def X(v):
        return left_pad + (v - xlo) / (xhi - xlo) * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT} font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="16" '
           f'font-weight="bold">{escape(title)}</text>']
    for i, pn in enumerate(panels):
        top = top_pad + 20 + i * (panel_height + gap)
        bottom = top + panel_height
        axes = {side: _Axis(pn.get(side), top, panel_height) for side in ("left", "right")
                if pn.get(side)}
        out.append(f'<text x="{left_pad}" y="{top - 8}" font-size="13" font-weight="bold">'
                   f'{escape(pn.get("title", ""))}</text>')
        out.append(f'<rect x="{left_pad}" y="{top}" width="{plot_w}" height="{panel_height}" '
                   f'fill="none" stroke="#888"/>')
        for t in xt:
            if xlo <= t <= xhi:
                x = X(t)
                out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
                out.append(f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{fmt(t)}</text>')
        out.append(f'<text x="{left_pad + plot_w / 2}" y="{bottom + 32}" text-anchor="middle">'
                   f'{escape(pn.get("xlabel", ""))}</text>')
        for side, ax in axes.items():
            for t in ax.ticks:
                y = ax.y(t)
                if side == "left":
                    out.append(f'<line x1="{left_pad}" y1="{y:.1f}" x2="{left_pad + plot_w}" '
                               f'y2="{y:.1f}" stroke="#eee"/>')
                    out.append(f'<text x="{left_pad - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
                else:
                    out.append(f'<text x="{left_pad + plot_w + 6}" y="{y + 4:.1f}">{fmt(t)}</text>')
            lx = 18 if side == "left" else width - 14
            ly = top + panel_height / 2
            out.append(f'<text x="{lx}" y="{ly}" text-anchor="middle" '
                       f'transform="rotate(-90 {lx} {ly})">{escape(ax.spec.get("label", ""))}</text>')
        for k, (x, label) in enumerate(pn.get("marks", [])):
            px = X(x)
            out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#999" '
                       f'stroke-dasharray="4 3"/>')
            out.append(f'<text x="{px + 3:.1f}" y="{top + 12 + 12 * (k % 2)}" fill="#666" font-size="11">'
                       f'{escape(label)}</text>')
        legend_x = left_pad + plot_w
        legend = []
        for side, ax in axes.items():
            for s in ax.spec["series"]:
                dash = ' stroke-dasharray="6 3"' if side == "right" else ""
                segs, cur = [], []
                for x, y in s["points"]:
                    if y is None:
                        if cur:
                            segs.append(cur)
                        cur = []
                    else:
                        cur.append(f"{X(x):.1f},{ax.y(y):.1f}")
                if cur:
                    segs.append(cur)
                for seg in segs:
                    if len(seg) == 1:
                        cx, cy = seg[0].split(",")
                        out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{s["color"]}"/>')
                    else:
                        out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="2"'
                                   f'{dash} points="{" ".join(seg)}"/>')
                legend.append((s["name"] + (" (right axis)" if side == "right" and len(axes) > 1 else ""),
                               s["color"], dash))
        # legend, right-aligned inside the plot's top edge
        ly = top + 14
        for name, color, dash in legend:
            tw = 7 * len(name)
            x0 = legend_x - tw - 34
            out.append(f'<rect x="{x0 - 4}" y="{ly - 11}" width="{tw + 36}" height="15" fill="white" '
                       f'fill-opacity="0.85"/>')
            out.append(f'<line x1="{x0}" y1="{ly - 4}" x2="{x0 + 22}" y2="{ly - 4}" stroke="{color}" '
                       f'stroke-width="2"{dash}/>')
            out.append(f'<text x="{x0 + 27}" y="{ly}">{escape(name)}</text>')
            ly += 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bar_chart(title, bars, unit="", width=720, bar_h=34):
    """bars: [(label, value, annotation)] drawn as horizontal bars."""
    left, right, top = 220, 170, 44
    height = top + len(bars) * (bar_h + 14) + 20
    vmax = max([b[1] for b in bars] + [1])
    plot_w = width - left - right
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT} font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" '
           f'font-weight="bold">{escape(title)}</text>']
    for i, (label, value, note) in enumerate(bars):
        y = top + i * (bar_h + 14)
        w = max(1.0, value / vmax * plot_w)
        out.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + bar_h / 2 + 4}">{fmt(value)} {escape(unit)} '
                   f'{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
