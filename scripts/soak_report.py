#!/usr/bin/env python3
"""Summary, verdict and plot of a soak run's samples (scripts/soak.sh writes the CSV).

Per process: RSS, open descriptors, threads, tokio tasks and sessions at the end of the warm-up and at the
end of the load (each the median of a minute of samples), the least-squares slope after warm-up
per 10 minutes, and the idle values before and after the load. Exits 1 when a server process
(coordinator or comm server) grew after warm-up by more than the thresholds, or did not go back
to its idle sessions, descriptors and tasks once the load had left. Draws the samples as an SVG with
no third-party packages. Standard library only.
"""

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict

SERVERS = ["coordinator", "s1", "s2", "s3"]
COLOURS = {"coordinator": "#444444", "s1": "#1f77b4", "s2": "#d62728", "s3": "#2ca02c"}
METRICS = [  # key, name in the summary, panel title in the plot
    ("rss_mib", "RSS MiB", "RSS (MiB)"),
    ("anon_mib", "RSS anon MiB", "of it anonymous (RssAnon, MiB): the heap; the rest is the mapped binary"),
    ("fds", "open fds", "open file descriptors"),
    ("threads", "threads", "threads"),
    ("tasks", "tokio tasks", "tokio tasks alive (two per client session)"),
    ("sessions", "sessions", "sessions (comm servers: clients; coordinator: the sum it sees)"),
]
WINDOW_S = 60.0


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load(path):
    rows = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rss = num(r["rss_kib"])
            anon = num(r.get("rss_anon_kib"))
            rows[r["process"]].append(
                {
                    "t": float(r["t_s"]),
                    "phase": r["phase"],
                    "rss_mib": rss / 1024 if rss is not None else None,
                    "anon_mib": anon / 1024 if anon is not None else None,
                    "fds": num(r["fds"]),
                    "threads": num(r["threads"]),
                    "tasks": num(r.get("tasks")),
                    "sessions": num(r["sessions"]),
                }
            )
    return rows


def window(samples, key, lo, hi):
    vals = [s[key] for s in samples if lo <= s["t"] < hi and s[key] is not None]
    return statistics.median(vals) if vals else None


def slope(samples, key):
    pts = [(s["t"], s[key]) for s in samples if s[key] is not None]
    if len(pts) < 3:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in pts) / den


def fmt(v, digits=1):
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def summarise(rows, args):
    failed = []
    print(
        f"after warm-up ({args.warmup_s / 60:g} min) and at the end: medians over "
        f"{WINDOW_S:.0f} s; slope: least squares after warm-up, per 10 min"
    )
    print()
    print("| process | metric | idle before | warm-up | end | growth | slope /10 min | idle after |")
    print("|---|---|---|---|---|---|---|---|")
    for proc in SERVERS + ["simulation"]:
        samples = rows.get(proc, [])
        load_s = [s for s in samples if s["phase"] == "load"]
        if not load_s:
            continue
        t_end = max(s["t"] for s in load_s)
        after_warm = [s for s in load_s if s["t"] >= args.warmup_s]
        before = next((s for s in samples if s["phase"] == "before"), None)
        after = next((s for s in samples if s["phase"] == "after"), None)
        for key, label, _ in METRICS:
            if proc == "simulation" and key in ("sessions", "tasks"):
                continue
            digits = 1 if key.endswith("_mib") else 0
            w = window(load_s, key, args.warmup_s, args.warmup_s + WINDOW_S)
            e = window(load_s, key, t_end - WINDOW_S, t_end + 1)
            sl = slope(after_warm, key)
            growth = e - w if w is not None and e is not None else None
            name = proc if proc != "simulation" else "simulation (generator)"
            print(
                f"| {name} | {label} | {fmt(before and before[key], digits)} | "
                f"{fmt(w, digits)} | {fmt(e, digits)} | "
                f"{'-' if growth is None else f'{growth:+.{digits}f}'} | "
                f"{'-' if sl is None else f'{sl * 600:+.2f}'} | {fmt(after and after[key], digits)} |"
            )
            if proc == "simulation" or growth is None:
                continue
            if key == "rss_mib":
                limit = max(w * args.max_growth_pct / 100, args.max_growth_mib)
                if growth > limit:
                    failed.append(
                        f"{proc}: RSS grew {growth:.1f} MiB after warm-up (limit {limit:.1f} MiB)"
                    )
            if key in ("fds", "tasks"):
                limit = max(w * args.max_growth_pct / 100, args.max_fd_growth)
                if growth > limit:
                    failed.append(
                        f"{proc}: {label} grew by {growth:.0f} after warm-up (limit {limit:.0f})"
                    )
        if proc != "simulation" and before and after:
            if proc != "coordinator" and after["sessions"] not in (None, 0):
                failed.append(f"{proc}: {after['sessions']:.0f} sessions left after the load")
            if after["fds"] is not None and before["fds"] is not None and after["fds"] > before["fds"] + 2:
                failed.append(
                    f"{proc}: {after['fds']:.0f} descriptors after the load, {before['fds']:.0f} before"
                )
            if after["tasks"] is not None and before["tasks"] is not None and after["tasks"] > before["tasks"] + 2:
                failed.append(
                    f"{proc}: {after['tasks']:.0f} tasks after the load, {before['tasks']:.0f} before"
                )
    print()
    for f in failed:
        print(f"FAIL {f}")
    return not failed


def nice_ticks(lo, hi, n=4):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plot(rows, path, title, warmup_s):
    width, left, right, top, panel_h, gap = 960, 80, 150, 50, 150, 45
    height = top + len(METRICS) * (panel_h + gap) + 10
    pw = width - left - right
    load_rows = {p: [s for s in rows.get(p, []) if s["phase"] == "load"] for p in SERVERS}
    t_max = max((s["t"] for ss in load_rows.values() for s in ss), default=60) / 60
    xt = nice_ticks(0, t_max, 6)
    x_hi = max(t_max, 1e-9)
    xt = [t for t in xt if t <= x_hi + 1e-9]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{esc(title)}</text>',
    ]
    for i, (key, _, label) in enumerate(METRICS):
        y0 = top + i * (panel_h + gap)
        vals = [s[key] for ss in load_rows.values() for s in ss if s[key] is not None]
        if not vals:
            continue
        lo = 0.0
        yt = nice_ticks(lo, max(vals) * 1.05 if max(vals) > 0 else 1, 4)
        y_hi = yt[-1]

        def X(t):
            return left + pw * (t / 60) / x_hi

        def Y(v):
            return y0 + panel_h - panel_h * (v - lo) / (y_hi - lo)

        out.append(f'<text x="{left}" y="{y0 - 8}" font-weight="bold">{esc(label)}</text>')
        out.append(
            f'<rect x="{left}" y="{y0}" width="{pw}" height="{panel_h}" fill="none" stroke="#999"/>'
        )
        for v in yt:
            y = Y(v)
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        for t in xt:
            x = left + pw * t / x_hi
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + panel_h}" stroke="#eee"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{y0 + panel_h + 15}" text-anchor="middle">{t:g}</text>'
            )
        wx = X(warmup_s)
        out.append(
            f'<line x1="{wx:.1f}" x2="{wx:.1f}" y1="{y0}" y2="{y0 + panel_h}" stroke="#888" '
            f'stroke-dasharray="4,3"/>'
        )
        if i == 0:
            out.append(f'<text x="{wx + 4:.1f}" y="{y0 + 12}" fill="#666">end of warm-up</text>')
        for proc in SERVERS:
            pts = [(s["t"], s[key]) for s in load_rows[proc] if s[key] is not None]
            if not pts:
                continue
            d = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in pts)
            out.append(
                f'<polyline points="{d}" fill="none" stroke="{COLOURS[proc]}" stroke-width="1.3"/>'
            )
        if i == len(METRICS) - 1:
            out.append(
                f'<text x="{left + pw / 2}" y="{y0 + panel_h + 32}" text-anchor="middle">'
                f"minutes since the load started</text>"
            )
    for j, proc in enumerate(SERVERS):
        y = top + 10 + j * 18
        out.append(
            f'<line x1="{left + pw + 15}" x2="{left + pw + 40}" y1="{y}" y2="{y}" '
            f'stroke="{COLOURS[proc]}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw + 46}" y="{y + 4}">{proc}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--svg")
    ap.add_argument("--title", default="relaymesh soak")
    ap.add_argument("--warmup-s", type=float, default=300)
    ap.add_argument("--max-growth-pct", type=float, default=10)
    ap.add_argument("--max-growth-mib", type=float, default=2)
    ap.add_argument("--max-fd-growth", type=float, default=10)
    args = ap.parse_args()
    rows = load(args.csv)
    ok = summarise(rows, args)
    if args.svg:
        plot(rows, args.svg, args.title, args.warmup_s)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
