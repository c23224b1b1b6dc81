"""The disaggregated loops: ``disagg_prefill`` and ``disagg_decode``.

Each is the normal or the overlap loop (``scheduler.enable_overlap``; unset = where overlap
measured faster, as for ``loop=auto``) driving a prefill or decode scheduler role, plus that
role's ``extra_stages`` — the transfer-queue polls — run as traced stages right after
``process_input_requests``. The loop bodies are not copied: the extra stages hook into the
base loop's ``stage`` call.

The transfer queues alone never keep the loop spinning: the KV manager wakes the loop when a
transfer changes state, and timeouts are checked every ``scheduler.idle_wait_s``.
"""

from __future__ import annotations

from typing import Any, Callable

from loopserve.core import hookimpl
from loopserve.core.disagg.decode import DecodeScheduler
from loopserve.core.disagg.prefill import PrefillScheduler
from loopserve.core.loop import EventLoop
from loopserve.plugins.loop_auto import overlap_by_default
from loopserve.plugins.loop_normal import NormalLoop
from loopserve.plugins.loop_overlap import OverlapLoop


class _ExtraStages:
    """Runs the scheduler role's ``extra_stages`` after ``process_input_requests``."""

    moved = False

    def stage(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        result = super().stage(name, fn, *args)  # type: ignore[misc]
        if name == "process_input_requests":
            s = self.scheduler  # type: ignore[attr-defined]
            moved = False
            for extra in s.extra_stages:
                moved = bool(super().stage(extra, getattr(s, extra))) or moved  # type: ignore[misc]
            self.moved = moved
        return result

    def iteration(self) -> bool:
        did = super().iteration()  # type: ignore[misc]
        return did or self.moved


def _uses_overlap(config: Any) -> bool:
    if config is None:
        return False
    flag = config.scheduler.enable_overlap
    return overlap_by_default(config) if flag is None else bool(flag)


def _variants(role_name: str, scheduler_cls: type) -> tuple[type[EventLoop], type[EventLoop], type[EventLoop]]:
    normal = type(f"{role_name}Normal", (_ExtraStages, NormalLoop),
                  {"name": role_name, "scheduler_cls": scheduler_cls, "depth": 0})
    overlap = type(f"{role_name}Overlap", (_ExtraStages, OverlapLoop),
                   {"name": role_name, "scheduler_cls": scheduler_cls, "depth": 1})

    class Chooser(EventLoop):
        """Registered under ``role_name``: builds the normal or the overlap variant."""

        name = role_name

        def __new__(cls, scheduler: Any, pm: Any, config: Any = None) -> Any:  # noqa: D102
            variant = overlap if _uses_overlap(config) else normal
            return variant(scheduler, pm, config)

        def iteration(self) -> bool:  # pragma: no cover - never instantiated itself
            raise NotImplementedError

    Chooser.scheduler_cls = scheduler_cls
    Chooser.__qualname__ = Chooser.__name__ = f"{role_name}Loop"
    return Chooser, normal, overlap


DisaggPrefillLoop, DisaggPrefillNormal, DisaggPrefillOverlap = _variants("disagg_prefill", PrefillScheduler)
DisaggDecodeLoop, DisaggDecodeNormal, DisaggDecodeOverlap = _variants("disagg_decode", DecodeScheduler)


@hookimpl
def loopserve_register_loops():
    return {"disagg_prefill": DisaggPrefillLoop, "disagg_decode": DisaggDecodeLoop}
