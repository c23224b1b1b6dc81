"""The Triton kernels, the Triton attention backend and the CUDA-graph logic on the CPU, in
Triton's interpreter: runs tests/triton_interp_cases.py in a subprocess with
TRITON_INTERPRET=1.

Why a subprocess: triton decides interpreter or compiler when a function is decorated, and
its own library functions are decorated when triton is first imported — by whichever test
(or torch) imports it first. Setting the variable in this process would be too late or would
leak into the rest of the suite; a child process gets it from its first line.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

CASES = os.path.join(os.path.dirname(__file__), "triton_interp_cases.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.timeout(900)
def test_kernels_backend_and_graph_logic_in_the_interpreter(tmp_path):
    report = tmp_path / "cases.xml"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", CASES, f"--junitxml={report}"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, capture_output=True, text=True,
        timeout=840,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # Every case ran and passed: none may be skipped (e.g. for want of the interpreter).
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, tail)
    assert counts["tests"] >= 35, (counts, tail)
