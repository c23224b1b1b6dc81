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
