"""``loopserve bench bench.mode=http``: starts a server, runs the workload through it over HTTP and
stops it; the summary counts every token the workload asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_bench_http_mode_starts_a_server_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loopserve.core.cli", "bench", "bench.mode=http", "bench.num_requests=6",
         "bench.input_len_min=4", "bench.input_len_max=16", "bench.output_len_min=3", "bench.output_len_max=9",
         "bench.progress=false", "bench.warmup=false", f"bench.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "http" and summary["server_started"] is True
    assert summary["failed_requests"] == 0
    assert summary["total_output_tokens"] == summary["expected_output_tokens"] > 0
    assert summary["p50_ttft_ms"] > 0 and summary["p99_itl_ms"] >= summary["p50_itl_ms"] > 0
    assert 0 < summary["busy_fraction"] <= 1
    assert "scheduler process exited with code 0" in out.stderr  # the server it started is gone


@pytest.mark.timeout(300)
def test_the_lean_stream_client_reads_what_httpx_reads():
    """The benchmark's own HTTP/1.1 stream reader and httpx see the same streams: completion
    tokens, token chunks, and errors (a wrong API key answers 401)."""
    import asyncio

    from loopserve.core.bench.http import _run_all
    from server_util import ServerProc

    srv = ServerProc("server.api_key=sekret").wait_ready({"Authorization": "Bearer sekret"})
    try:
        inputs, outs = [[5, 6, 7], [9] * 40, [1]], [4, 11, 1]
        auth = {"Authorization": "Bearer sekret"}
        lean = asyncio.run(_run_all(srv.url, auth, inputs, outs))
        ref = asyncio.run(_run_all(srv.url, auth, inputs, outs, raw=False))
        assert [r["tokens"] for r in lean] == [r["tokens"] for r in ref] == outs
        # One chunk per loop step that produced tokens (steps the frontend had not sent yet
        # may share one), so the counts depend on timing, not on the client.
        assert all(1 <= len(r["times"]) <= n for r, n in zip(lean + ref, outs + outs))
        assert all(r["error"] is None and r["times"] == sorted(r["times"]) and r["times"][0] > r["t0"] for r in lean)
        (bad,) = asyncio.run(_run_all(srv.url, {"Authorization": "Bearer nope"}, inputs[:1], outs[:1]))
        assert bad["error"].startswith("HTTP 401")
    finally:
        srv.stop()
