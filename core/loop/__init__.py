"""Event loops: the loop base class (``base``), the runner that executes batches at a given
in-flight depth (``runner``), the one build path that assembles scheduler, worker, policy,
observers and loop (``build``), and ``DynamicGradMode`` (``grad_mode``)."""

from loopserve.core.loop.base import EventLoop, RunnerLoop, available_loops, resolve_loop_class

__all__ = ["EventLoop", "RunnerLoop", "available_loops", "resolve_loop_class"]
