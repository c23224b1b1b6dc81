"""loopserve's core: hook specifications, scheduler state, KV bookkeeping, model worker and
the entry points (``Engine``, the ``loopserve`` CLI).

Importing this package is cheap and has no side effects: no plugin manager, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode, ForwardResult
from loopserve.core.hookspecs import hookimpl, hookspec
from loopserve.core.sched.req import FinishKind, FinishReason, Req
from loopserve.core.sched.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from loopserve.core.engine import Engine, RequestOutput
    from loopserve.core.loop import EventLoop, RunnerLoop
    from loopserve.core.sched.policy import BatchingPolicy
    from loopserve.core.sched.schedule_batch import ScheduleBatch
    from loopserve.core.sched.scheduler import Scheduler

__all__ = [
    "BatchingPolicy",
    "Engine",
    "EventLoop",
    "FinishKind",
    "FinishReason",
    "ForwardBatch",
    "ForwardMode",
    "ForwardResult",
    "Req",
    "RequestOutput",
    "RunnerLoop",
    "SamplingParams",
    "ScheduleBatch",
    "Scheduler",
    "hookimpl",
    "hookspec",
]

_LAZY = {
    "Engine": "loopserve.core.engine",
    "RequestOutput": "loopserve.core.engine",
    "EventLoop": "loopserve.core.loop",
    "RunnerLoop": "loopserve.core.loop",
    "BatchingPolicy": "loopserve.core.sched.policy",
    "ScheduleBatch": "loopserve.core.sched.schedule_batch",
    "Scheduler": "loopserve.core.sched.scheduler",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `from loopserve.core import hookimpl` in a plugin does not pull in Hydra.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loopserve.core' has no attribute {name!r}")
