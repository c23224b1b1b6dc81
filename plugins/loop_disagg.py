"""The disaggregated loops: ``disagg_prefill`` and ``disagg_decode``.

Each is a ``RunnerLoop`` driving a scheduler role (``core/disagg/prefill.py``,
``core/disagg/decode.py``) with that role's transfer-queue polls as extra stages. Variants,
chosen from config like ``loop=auto`` chooses for plain serving:

- **pp** (``parallel.pp_size > 1``): the worker is the pipeline (core/pp/), the depth is the
  pipeline loop's (``pp_size * (1 + parallel.pp_async_depth) - 1``), the decode role keeps the
  pipeline scheduler's rule that a request is in one micro-batch at a time, and every stage
  moves its own layers' KV (core/disagg/staged.py);
- **overlap** (depth 1) when ``scheduler.enable_overlap`` is true, or unset where overlap
  measured faster (CUDA, the sim worker);
- **normal** (depth 0) otherwise.

``loop=auto`` picks these loops from ``disaggregation.mode``. The transfer queues alone never
keep the loop spinning: the KV manager wakes the loop when a transfer changes state, and
timeouts are checked every ``scheduler.idle_wait_s``.
"""

from __future__ import annotations

from typing import Any

from loopserve.core import hookimpl
from loopserve.core.disagg.decode import DecodeScheduler
from loopserve.core.disagg.prefill import PrefillScheduler
from loopserve.core.loop import RunnerLoop
from loopserve.core.pp.scheduler import PPScheduler
from loopserve.plugins.loop_auto import overlap_by_default
from loopserve.plugins.loop_pp import pipeline_iteration, pp_depth


def overlap_depth(config: Any) -> int:
    """1 where the overlap loop would be used for plain serving, else 0."""
    if config is None:
        return 0
    flag = config.scheduler.enable_overlap
    return int(overlap_by_default(config) if flag is None else bool(flag))


def pipelined(config: Any) -> bool:
    return config is not None and int(config.parallel.pp_size) > 1


class PPDecodeScheduler(DecodeScheduler, PPScheduler):
    """The decode role over a pipeline: a decode micro-batch takes only requests whose last
    token is back, spread over ``pp_size`` groups (``PPScheduler``)."""


class _DisaggLoop(RunnerLoop):
    pp_scheduler_cls: type = PrefillScheduler

    @classmethod
    def scheduler_class(cls, config: Any) -> type:
        return cls.pp_scheduler_cls if pipelined(config) else cls.scheduler_cls

    @property
    def pp_rank(self) -> int | None:
        """0 under pipeline parallelism (spans carry it, as the pp loop's do), else None."""
        return 0 if pipelined(self.config) else None

    def runner_depth(self) -> int:
        return pp_depth(self.config) if pipelined(self.config) else overlap_depth(self.config)

    def iteration(self) -> bool:
        if pipelined(self.config):
            return pipeline_iteration(self, super().iteration)
        return super().iteration()


class DisaggPrefillLoop(_DisaggLoop):
    name = "disagg_prefill"
    scheduler_cls = PrefillScheduler
    # A prefill server never decodes: the plain prefill role fills the pipeline with prompts.
    pp_scheduler_cls = PrefillScheduler
    extra_stages = PrefillScheduler.extra_stages


class DisaggDecodeLoop(_DisaggLoop):
    name = "disagg_decode"
    scheduler_cls = DecodeScheduler
    pp_scheduler_cls = PPDecodeScheduler
    extra_stages = DecodeScheduler.extra_stages


@hookimpl
def loopserve_register_loops():
    return [DisaggPrefillLoop, DisaggDecodeLoop]
