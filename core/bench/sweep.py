"""``loopserve bench -m``: Hydra-style sweeps over overrides, run one after another in this
process, ending with a comparison table and a plot over the runs.

Overrides are expanded with Hydra's own override parser and ``BasicSweeper`` (``a=x,y``,
``glob``/``range`` sweeps, the Cartesian product over keys), but no Hydra app runs, so no
``outputs/`` or ``multirun/`` folders appear: everything goes under
``<bench.output_dir>/multirun-<time>/`` (one JSON per run, ``comparison.json``,
``comparison.md`` and ``comparison.png``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from loopserve.core.config import overrides_value


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the sweep overrides (a plain list of overrides is one run)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        raise ValueError(f"invalid sweep override: {exc}") from None
    runs = [run for batch in batches for run in batch]
    return runs or [[]]


def _label(run: list[str], swept: list[str]) -> str:
    parts = [ov for ov in run if ov.partition("=")[0] in swept]
    return " ".join(parts) or "default"


def run_sweep(runs: list[list[str]]) -> int:
    """Run each combination, print each summary as a JSON line, then the comparison."""
    from loopserve.core.bench.throughput import public, run_one, write_json

    keys = [ov.partition("=")[0] for ov in runs[0]]
    swept = [k for i, k in enumerate(keys) if len({run[i] for run in runs}) > 1]
    out_dir = overrides_value(runs[0], "bench.output_dir") or "bench_results"
    sweep_dir = os.path.join(out_dir, f"multirun-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    peer_cache: dict[Any, Any] = {}
    summaries = []
    for i, run in enumerate(runs):
        label = _label(run, swept)
        print(f"bench: run {i + 1}/{len(runs)}: {label}", file=sys.stderr, flush=True)
        summary = run_one(run, peer_cache, results_file=os.path.join(sweep_dir, f"run-{i}.json"))
        summary["run"] = label
        summaries.append(summary)
        print(json.dumps(public(summary)), flush=True)
    table = comparison_table(summaries)
    comparison = {"sweep_dir": sweep_dir, "runs": [public(s) for s in summaries], "table": table}
    write_json(os.path.join(sweep_dir, "comparison.json"), comparison)
    with open(os.path.join(sweep_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot_file = os.path.join(sweep_dir, "comparison.png")
    try:
        from loopserve.core.bench.plot import plot_comparison

        plot_comparison(summaries, plot_file)
    except ImportError:
        plot_file = None
        print("bench: matplotlib is not installed; no comparison plot "
              "(pip install 'loopserve[bench]')", file=sys.stderr)
    print(table)
    print(f"comparison: {os.path.join(sweep_dir, 'comparison.json')}"
          + (f"  plot: {plot_file}" if plot_file else ""), flush=True)
    return 0


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def comparison_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per run: throughput benchmarks show tok/s, busy fraction,
    step time and the peer; scheduler-overhead runs show ms per iteration per batch size."""
    if all(s.get("bench") == "scheduler_overhead" for s in summaries):
        sizes = sorted({int(n) for s in summaries for n in s["overhead_ms"]})
        head = ["run", "loop", "policy"] + [f"{n} running (ms/iter)" for n in sizes]
        rows = [[s["run"], s["loop"], s["policy"]] + [s["overhead_ms"].get(str(n)) for n in sizes] for s in summaries]
    else:
        head = ["run", "loop", "policy", "worker", "output tok/s", "input tok/s", "req/s", "busy",
                "step ms", "peer", "peer tok/s", "speedup"]
        rows = [[s["run"], s["loop"], s["policy"], s["worker"], s["output_throughput"], s["input_throughput"],
                 s["request_throughput"], s["busy_fraction"], s["step_time_ms"].get("total"), s.get("peer"),
                 s.get("peer_output_throughput"), s.get("speedup_vs_peer")] for s in summaries]
    cells = [head] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
