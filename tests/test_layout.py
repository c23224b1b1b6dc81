"""core/ is laid out by concern; the scheduling core and KV bookkeeping never import torch.

The packages are walked, not listed, so a new module is checked the day it is added.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import loopserve.core.loop
import loopserve.core.mem
import loopserve.core.sched

TORCH_FREE = [loopserve.core.sched, loopserve.core.mem, loopserve.core.loop]


def _modules(pkg) -> list[str]:
    return [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]


@pytest.mark.parametrize("module", [m for pkg in TORCH_FREE for m in _modules(pkg)])
def test_the_scheduling_core_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", f"{module} imports torch:\n{proc.stderr}"


def test_core_has_one_subpackage_per_concern():
    import loopserve.core

    packages = {m.name for m in pkgutil.iter_modules(loopserve.core.__path__) if m.ispkg}
    assert {"sched", "mem", "loop", "model", "bench"} <= packages
    flat = [m.name for m in pkgutil.iter_modules(loopserve.core.__path__) if not m.ispkg]
    # What stays at the top: entry points and the plugin machinery every package shares.
    assert len(flat) <= 8, f"core/ is filling up with flat modules again: {flat}"


def test_plugin_authors_imports_keep_working():
    from loopserve.core import (BatchingPolicy, Engine, EventLoop, ForwardBatch, ForwardMode,  # noqa: F401
                                ForwardResult, Req, RunnerLoop, SamplingParams, ScheduleBatch, Scheduler,
                                hookimpl)
