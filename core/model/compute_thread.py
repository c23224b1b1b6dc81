"""``ComputeThread``: one thread that runs every torch computation of the model workers.

On the CPU, torch parallelizes each op over an OpenMP thread team, and every OS thread that
runs parallel ops gets a team of its own. With two teams in a process (say the model loaded
on the caller's thread, forward passes on the loop's thread) there are more OpenMP threads
than cores; the runtime then stops spinning between parallel regions and every op pays a
thread wake-up instead: small ops, which a decode step is made of, run two to three times
slower and the engine's throughput drops by a quarter or more. Loading, allocating and
running the models on one thread keeps a single team busy. A call costs a thread hop (about
50 µs here), once per forward pass.

The thread is shared by all model workers of the process (``acquire`` / ``release``), so two
engines in one process (tests, side-by-side benchmarks) still make one team; their passes take
turns, as they would for the cores anyway. It stops when the last worker releases it, so an
engine that shut down leaves no thread (and no idle OpenMP team) behind.

The calling thread's autograd mode (``DynamicGradMode`` of the loop) is carried over to each
call, since torch keeps that mode per thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class _Call:
    __slots__ = ("fn", "args", "inference", "grad", "reply")

    def __init__(self, fn: Callable[..., Any], args: tuple, inference: bool, grad: bool) -> None:
        self.fn, self.args, self.inference, self.grad = fn, args, inference, grad
        self.reply: queue.SimpleQueue[tuple[bool, Any]] | None = queue.SimpleQueue()


class ComputeThread:
    _shared: "ComputeThread | None" = None
    _users = 0
    _lock = threading.Lock()

    @classmethod
    def acquire(cls) -> "ComputeThread":
        """The process's compute thread, started if no worker holds it; pair with ``release``."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            cls._users += 1
            return cls._shared

    @classmethod
    def release(cls) -> None:
        """One holder less; the last one stops the thread (after the calls already queued)."""
        with cls._lock:
            cls._users -= 1
            shared = cls._shared if cls._users == 0 else None
            if shared is not None:
                cls._shared = None
        if shared is not None:
            shared.close()

    def __init__(self, name: str = "loopserve-compute") -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread under the caller's autograd mode and return
        its result (or raise its exception). A call from the compute thread itself runs inline."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        import torch

        job = _Call(fn, args, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        self._queue.put(job)
        ok, value = job.reply.get()
        if not ok:
            raise value
        return value

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` under the caller's autograd mode and return at once; ``fn``
        must handle its own errors (an asynchronous launch reports them on its future)."""
        import torch

        job = _Call(fn, args, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        job.reply = None
        self._queue.put(job)

    def _run(self) -> None:
        import torch

        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.inference:
                    with torch.inference_mode():
                        result = (True, job.fn(*job.args))
                else:
                    with torch.set_grad_enabled(job.grad):
                        result = (True, job.fn(*job.args))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                result = (False, exc)
            if job.reply is not None:
                job.reply.put(result)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread once the queued calls are done."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
