"""Render a few steps of a Chrome trace (from `mirror.trace`) as a Gantt chart PNG.

    python -m benchmarks.timeline trace.json [--out trace.png] [--first-step 1] [--steps 4]

One lane per track of the trace (the in-process runtime writes one track per pipeline side:
target, draft, channel); spans are bars, instant events (channel messages) are markers.
"""
from __future__ import annotations

import argparse
import json

COLORS = {"target.prefix": "#1f77b4", "target.suffix": "#2ca02c", "target.verify": "#17becf",
          "target.start": "#7f7f7f", "draft.on_signal": "#ff7f0e", "draft.on_verdict": "#d62728",
          "draft.start": "#8c564b", "request": "#dddddd"}


def load_events(src) -> list[dict]:
    if isinstance(src, str):
        with open(src) as f:
            src = json.load(f)
    return src["traceEvents"] if isinstance(src, dict) else list(src)


def step_window(events: list[dict], first_step: int, steps: int) -> tuple[float, float] | None:
    """[t0, t1] in us covering target steps first_step .. first_step + steps - 1."""
    ts = [(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events
          if e.get("ph") in ("X", "i") and e.get("cat") == "target"
          and first_step <= e.get("args", {}).get("step", -1) < first_step + steps]
    if not ts:
        return None
    return min(a for a, _ in ts), max(b for _, b in ts)


def render_gantt(src, path: str, first_step: int = 1, steps: int = 4, title: str | None = None) -> str:
    """Write a PNG Gantt chart of `steps` target steps from a trace (path, dict or event list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = load_events(src)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    win = step_window(events, first_step, steps) or step_window(events, 0, steps)
    timed = [e for e in events if e.get("ph") in ("X", "i") and e.get("cat") != "request"]
    if win is None:
        if not timed:
            raise ValueError("the trace has no spans to draw")
        win = (min(e["ts"] for e in timed), max(e["ts"] + e.get("dur", 0.0) for e in timed))
    t0, t1 = win
    pad = 0.02 * (t1 - t0 or 1.0)
    shown = [e for e in timed if e["ts"] <= t1 + pad and e["ts"] + e.get("dur", 0.0) >= t0 - pad]
    order = {"target": 0, "channel": 1, "draft": 2}
    lanes = sorted({(e["pid"], e["tid"], e.get("cat", "")) for e in shown},
                   key=lambda k: (order.get(k[2], 9), k[0], k[1]))
    row = {k[:2]: i for i, k in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.8 * len(lanes)))
    ms = 1e-3  # us -> ms
    for e in shown:
        y = row[(e["pid"], e["tid"])]
        x = (e["ts"] - t0) * ms
        if e["ph"] == "X":
            w = e["dur"] * ms
            ax.barh(y, w, left=x, height=0.6, color=COLORS.get(e["name"], "#9467bd"), edgecolor="black",
                    linewidth=0.4)
            step = e.get("args", {}).get("step")
            label = e["name"].split(".", 1)[-1] + (f" {step}" if step is not None else "")
            if w > 0.025 * (t1 - t0) * ms and e["ts"] >= t0 - pad and e["ts"] + e["dur"] <= t1 + pad:
                ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=6, rotation=90 if w < 0.06 * (t1 - t0) * ms else 0)
        else:
            ax.plot([x], [y], marker="v", color="black", markersize=6)
            ax.text(x, y + 0.35, e["name"].split(".", 1)[-1], fontsize=6, rotation=30)
    from matplotlib.patches import Patch

    used = sorted({e["name"] for e in shown if e["ph"] == "X"})
    ax.legend(handles=[Patch(color=COLORS.get(n, "#9467bd"), label=n) for n in used], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([names.get(k[:2], f"{k[2]} ({k[0]}/{k[1]})") for k in lanes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-pad * ms, (t1 - t0 + pad) * ms)
    ax.set_xlabel("ms")
    ax.set_title(title or f"Mirror-SD timeline, steps {first_step}..{first_step + steps - 1}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--out", default=None, help="PNG path (default: the trace's name with .png)")
    ap.add_argument("--first-step", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    out = args.out or args.trace.rsplit(".", 1)[0] + ".png"
    print(render_gantt(args.trace, out, args.first_step, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
