"""``ComputeThread``: one persistent thread that runs every torch computation of a worker.

On the CPU, torch parallelizes each op over an OpenMP thread team, and every OS thread that
runs parallel ops gets a team of its own. With two teams in a process (say the model loaded
on the caller's thread, forward passes on the loop's thread) there are more OpenMP threads
than cores; the runtime then stops spinning between parallel regions and every op pays a
thread wake-up instead: small ops, which a decode step is made of, run two to three times
slower and the engine's throughput drops by a quarter or more. Loading, allocating and
running the model on one thread keeps a single team busy. On CUDA it costs nothing either
(a thread hop per forward, microseconds).

One thread serves every model worker of the process (``ComputeThread.shared()``), so two
engines in one process (tests, side-by-side benchmarks) still make one team; their passes
take turns, as they would for the cores anyway.

The calling thread's autograd mode (``DynamicGradMode`` of the loop) is carried over to the
call, since torch keeps that mode per thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    _shared: "ComputeThread | None" = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "ComputeThread":
        """The process-wide compute thread (started on first use, never closed)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def close_shared(cls) -> None:
        """Stop the process-wide compute thread, if any (the next ``shared()`` starts a new
        one). Its OpenMP team goes with it, so torch code run on another thread afterwards
        (a benchmark's transformers peer) has the cores to itself, as it would alone."""
        with cls._shared_lock:
            shared, cls._shared = cls._shared, None
        if shared is not None:
            shared.close()

    def __init__(self, name: str = "loopserve-compute") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None
        self._closed = False

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the compute thread under the caller's autograd mode
        and return its result (or raise its exception). Re-entrant: a call from the compute
        thread itself runs inline."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        if self._closed:
            raise RuntimeError("the worker is shut down")
        import torch

        inference = torch.is_inference_mode_enabled()
        grad = torch.is_grad_enabled()
        future: Future[T] = self._executor.submit(self._run, fn, args, kwargs, inference, grad)
        return future.result()

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict, inference: bool, grad: bool) -> T:
        import torch

        self._ident = threading.get_ident()
        if inference:
            with torch.inference_mode():
                return fn(*args, **kwargs)
        with torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    def close(self) -> None:
        """Finish the queued calls and stop the thread; idempotent."""
        self._closed = True
        self._executor.shutdown(wait=True)
