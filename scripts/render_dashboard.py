#!/usr/bin/env python3
"""Renders the dashboard's freshness panels from a real Prometheus into a PNG
(docs/img/freshness.png) for the README. The queries are read from
config/grafana/dashboards/streamscore.json, so the picture shows exactly
what the dashboard shows.

    render_dashboard.py PROMETHEUS_URL SECONDS OUT.png
"""
import json
import os
import sys
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = [
    "Event → score latency",
    "Event-time lag by partition",
    "Age of recommendations",
    "Consumer lag by partition (messages)",
]


def query_range(base, expr, seconds):
    end = time.time()
    q = urllib.parse.urlencode(
        {"query": expr, "start": end - seconds, "end": end, "step": max(1, seconds // 200)}
    )
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        sys.exit(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def main():
    base, seconds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(ROOT, "config/grafana/dashboards/streamscore.json")) as f:
        dash = json.load(f)
    by_title = {p["title"]: p for p in dash["panels"] if p.get("type") != "row"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 7))
    for ax, title in zip(axes.flat, PANELS):
        panel = by_title[title]
        for t in panel["targets"]:
            if title == "Age of recommendations" and "generation" in t["legendFormat"]:
                continue
            for series in query_range(base, t["expr"], seconds):
                xs = [float(v[0]) - time.time() for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                label = t["legendFormat"]
                for k, v in series["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                ax.plot(xs, ys, label=label)
        ax.set_title(title)
        ax.set_xlabel("seconds ago")
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("streamscore freshness (from Prometheus, scripts/render_dashboard.sh)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
