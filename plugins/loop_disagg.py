"""The disaggregated loops: ``disagg_prefill`` and ``disagg_decode``.

Each is a ``RunnerLoop`` driving a scheduler role (``core/disagg/prefill.py``,
``core/disagg/decode.py``) with that role's transfer-queue polls as extra stages. The depth
follows ``scheduler.enable_overlap`` as ``loop=auto`` does for plain serving: 1 (overlap) when
true, 0 (normal) when false, and where overlap measured faster when unset (CUDA, the sim
worker). ``loop=auto`` picks these loops from ``disaggregation.mode``.

The transfer queues alone never keep the loop spinning: the KV manager wakes the loop when a
transfer changes state, and timeouts are checked every ``scheduler.idle_wait_s``.
"""

from __future__ import annotations

from typing import Any

from loopserve.core import hookimpl
from loopserve.core.disagg.decode import DecodeScheduler
from loopserve.core.disagg.prefill import PrefillScheduler
from loopserve.core.loop import RunnerLoop
from loopserve.plugins.loop_auto import overlap_by_default


def overlap_depth(config: Any) -> int:
    """1 where the overlap loop would be used for plain serving, else 0."""
    if config is None:
        return 0
    flag = config.scheduler.enable_overlap
    return int(overlap_by_default(config) if flag is None else bool(flag))


class DisaggPrefillLoop(RunnerLoop):
    name = "disagg_prefill"
    scheduler_cls = PrefillScheduler
    extra_stages = PrefillScheduler.extra_stages

    def runner_depth(self) -> int:
        return overlap_depth(self.config)


class DisaggDecodeLoop(RunnerLoop):
    name = "disagg_decode"
    scheduler_cls = DecodeScheduler
    extra_stages = DecodeScheduler.extra_stages

    def runner_depth(self) -> int:
        return overlap_depth(self.config)


@hookimpl
def loopserve_register_loops():
    return [DisaggPrefillLoop, DisaggDecodeLoop]
