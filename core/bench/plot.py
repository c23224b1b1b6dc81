"""PNG plots of benchmark results (matplotlib, an optional dependency: ``loopserve[bench]``).

A single throughput run: output tokens over time (loopserve and the peer) and the mean step
time split by stage. A sweep: output tok/s per run (with the peer's) and the step time split
by stage per run; a scheduler-overhead sweep: ms per iteration against running requests.
"""

from __future__ import annotations

import os
from typing import Any

STAGE_ORDER = ("recv_requests", "process_input_requests", "get_next_batch_to_run", "run_batch",
               "process_batch_result", "self_check_during_idle")


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("bench.plot=true needs matplotlib; pip install 'loopserve[bench]' "
                         "or drop bench.plot") from None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _split_forward(step: dict[str, float]) -> dict[str, float]:
    """Show the worker's forward apart from the rest of ``run_batch`` where it runs inside
    it (the normal loop); loops that overlap the forward keep their stages as measured."""
    fwd, run = step.get("forward", 0.0), step.get("run_batch")
    if run is None or fwd > run:
        return step
    return {**step, "run_batch": run - fwd, "forward (in run_batch)": fwd}


REST = "rest of the step (overlapped forward's wait, hooks)"


def _with_rest(step: dict[str, float]) -> dict[str, float]:
    """Stages plus what the iteration spent outside them, so the bar is as long as the step
    time the tables report (``total``). For the overlap loop that remainder is mostly the wait
    for the forward running on the other thread; leaving it out drew a 0.4 ms bar for a 3.6 ms
    step."""
    out = _split_forward(step)
    drawn = sum(v for k, v in out.items() if k in STAGE_ORDER or k == "forward (in run_batch)")
    rest = step.get("total", 0.0) - drawn
    return {**out, REST: rest} if rest > 1e-4 else out


def _stage_bars(ax: Any, labels: list[str], steps: list[dict[str, float]]) -> None:
    left = [0.0] * len(labels)
    steps = [_with_rest(s) for s in steps]
    names = [n for n in (*STAGE_ORDER[:4], "forward (in run_batch)", *STAGE_ORDER[4:], REST)
             if any(n in s for s in steps)]
    for name in names:
        widths = [s.get(name, 0.0) for s in steps]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("mean step time (ms)")
    ax.legend(fontsize=7, loc="best")


def plot_run(summary: dict[str, Any], path: str) -> None:
    """One run: tokens over time and the step-time split."""
    plt = _pyplot()
    if summary.get("bench") == "scheduler_overhead":
        plot_comparison([{**summary, "run": summary.get("loop", "run")}], path)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in (("trace", f"loopserve ({summary['loop']})"), ("peer_trace", summary.get("peer"))):
        trace = summary.get(key) or []
        if trace:
            ax1.plot([0.0] + [t for t, _ in trace], [0] + [n for _, n in trace], label=f"{name}")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("output tokens")
    title = f"{summary['output_throughput']:,.0f} tok/s"
    if summary.get("peer"):
        title += f" vs {summary['peer']} {summary['peer_output_throughput']:,.0f} ({summary['speedup_vs_peer']}x)"
    ax1.set_title(title, fontsize=9)
    ax1.legend(fontsize=8)
    _stage_bars(ax2, [summary["loop"]], [summary["step_time_ms"]])
    ax2.set_title(f"busy fraction {summary['busy_fraction']:.2f}", fontsize=9)
    _save(fig, path)


def plot_comparison(summaries: list[dict[str, Any]], path: str) -> None:
    """A sweep: one bar (or curve) per run."""
    plt = _pyplot()
    labels = [s["run"] for s in summaries]
    if all(s.get("bench") == "scheduler_overhead" for s in summaries):
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in summaries:
            sizes = sorted(int(n) for n in s["overhead_ms"])
            ax.plot(sizes, [s["overhead_ms"][str(n)] for n in sizes], marker="o", label=s["run"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("running decode requests")
        ax.set_ylabel("scheduler ms / iteration (forward excluded)")
        ax.legend(fontsize=8)
        _save(fig, path)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.5 * len(labels) + 2)))
    y = list(range(len(labels)))
    ax1.barh([i + 0.2 for i in y], [s["output_throughput"] for s in summaries], height=0.4, label="loopserve")
    peers = [s.get("peer_output_throughput") or 0 for s in summaries]
    if any(peers):
        ax1.barh([i - 0.2 for i in y], peers, height=0.4, label="peer")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlabel("output tok/s")
    ax1.legend(fontsize=8)
    _stage_bars(ax2, labels, [s["step_time_ms"] for s in summaries])
    ax2.tick_params(axis="y", labelsize=8)
    _save(fig, path)
