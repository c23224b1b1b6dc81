"""The event-loop base class and the factory that picks a loop plugin from config.

Every loop is steppable (``step()`` runs one iteration; tests drive it step by step) and
stoppable (``run()`` returns soon after ``stop()``). ``step`` and ``run`` of every subclass,
third-party ones included, are wrapped in ``DynamicGradMode`` automatically. Stages run
through the ``loopserve_run_stage`` wrapper hook only when a plugin wraps it, so an
untraced loop pays nothing for the hook; a wrapper that raises is contained
(``call_wrapped``: logged once, counted, the stage still runs). A subclass constructor that
raises has ``close()`` called first, so a thread it already started does not outlive it.
"""

from __future__ import annotations

import enum
import functools
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from loopserve.core.loop.grad_mode import DynamicGradMode
from loopserve.core.plugin_manager import call_wrapped, collect_named, has_wrappers
from loopserve.core.sched.scheduler import Scheduler


class EventLoop(ABC):
    """Drives a ``Scheduler``'s stages.

    Subclasses implement ``iteration()`` (one pass over the stages, returning whether it did
    any work) and may override ``run``/``drain``; ``step`` and ``run`` are set up here.
    """

    name: ClassVar[str] = "base"
    #: The scheduler role this loop drives; the build path constructs it (a disaggregated or
    #: pipeline-stage loop names its own subclass here).
    scheduler_cls: ClassVar[type[Scheduler]] = Scheduler

    @classmethod
    def scheduler_class(cls, config: Any) -> type[Scheduler]:
        """The scheduler role for ``config`` (``scheduler_cls``; a loop with variants, such as
        the disaggregated loops under pipeline parallelism, may pick by config)."""
        return cls.scheduler_cls

    def __init__(self, scheduler: Any, pm: Any, config: Any = None) -> None:
        self.scheduler = scheduler
        self.pm = pm
        self.config = config
        mode = config.grad_mode if config is not None else "no_grad"
        self.grad_mode = mode.value if isinstance(mode, enum.Enum) else str(mode)
        self.idle_wait_s = float(config.scheduler.idle_wait_s) if config is not None else 0.05
        self._stop = threading.Event()
        self.num_iterations = 0
        self._wrap_iteration = has_wrappers(pm.hook.loopserve_run_iteration)
        self._wrap_stage = has_wrappers(pm.hook.loopserve_run_stage)
        # For a plugin that samples iterations (the tracing plugin): ``stage()`` calls the stage
        # wrappers only while ``wrap_stages`` is true, and ``step()`` runs the next
        # ``skip_wrappers`` iterations without calling the iteration wrappers. Only a plugin
        # that is the sole wrapper of the hooks it switches off may change them.
        self.wrap_stages = self._wrap_stage
        self.skip_wrappers = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr in ("step", "run"):
            if attr in cls.__dict__:
                setattr(cls, attr, DynamicGradMode(cls.__dict__[attr]))
        if "__init__" in cls.__dict__:
            cls.__init__ = _close_on_failure(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @abstractmethod
    def iteration(self) -> bool:
        """One pass over the stages; True if it received, ran or processed anything."""

    def has_pending(self) -> bool:
        """Work left that needs more iterations even with no new requests (queued results)."""
        return self.scheduler.has_work

    @DynamicGradMode
    def step(self) -> bool:
        """Run exactly one iteration."""
        self.num_iterations += 1
        if self._wrap_iteration:
            if self.skip_wrappers > 0:
                self.skip_wrappers -= 1
                return self.iteration()
            # A wrapper's error is contained (logged, counted); the iteration still runs once.
            return bool(call_wrapped(self.pm, self.pm.hook.loopserve_run_iteration, self.iteration, (), loop=self))
        return self.iteration()

    @DynamicGradMode
    def run(self) -> None:
        """Iterate until ``stop()``; sleep on the inbox while there is nothing to do."""
        while not self._stop.is_set():
            did_work = self.step()
            if not did_work and not self.has_pending():
                self.scheduler.wait_for_work(self.idle_wait_s)

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.inbox.wake()

    def close(self) -> None:
        """Release what the loop owns (threads, streams) after it stopped; idempotent."""

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stage(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one scheduler stage, through the stage wrappers when any plugin has one."""
        if self.wrap_stages:
            return call_wrapped(self.pm, self.pm.hook.loopserve_run_stage, fn, args, loop=self, stage=name, args=args)
        return fn(*args)


def _close_on_failure(init: Callable[..., None]) -> Callable[..., None]:
    """A loop whose constructor raises after starting a thread (a forward thread) has no
    object for the build path to close: close it here, best effort, then re-raise."""

    @functools.wraps(init)
    def wrapped(self: EventLoop, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            try:
                self.close()
            except BaseException:  # noqa: BLE001 - half-built: the constructor's error matters
                pass
            raise

    return wrapped
class RunnerLoop(EventLoop):
    """A loop composed of the scheduler's stages and a ``Runner`` of depth ``depth``.

    Each iteration: ``recv_requests`` -> ``process_input_requests`` -> the ``extra_stages``
    (scheduler methods a loop variant adds, e.g. polling KV transfers) ->
    ``get_next_batch_to_run`` -> ``run_batch`` (launch) -> ``process_batch_result`` for every
    result the runner says is due -> ``self_check_during_idle`` once nothing is left in flight.
    Depth 0 is the normal loop, depth 1 the overlap loop; a subclass picks the scheduler role
    (``scheduler_cls``), the depth and the extra stages, and needs no iteration body of its own.
    """

    depth: ClassVar[int] = 0
    #: Names of scheduler methods run as stages each iteration after process_input_requests;
    #: a truthy return counts as work done.
    extra_stages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, scheduler: Any, pm: Any, config: Any = None) -> None:
        super().__init__(scheduler, pm, config)
        from loopserve.core.loop.runner import Runner

        self.runner = Runner(scheduler, self.runner_depth(), grad_mode=self.grad_mode)

    def runner_depth(self) -> int:
        """Batches kept in flight; a loop whose depth comes from config overrides this."""
        return self.depth

    def has_pending(self) -> bool:
        return self.runner.pending or self.scheduler.has_work

    def iteration(self) -> bool:
        s, runner = self.scheduler, self.runner
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        worked = bool(received)
        for name in self.extra_stages:
            worked = bool(self.stage(name, getattr(s, name))) or worked
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is not None:
            self.stage("run_batch", runner.launch, batch)
        due = runner.due(batch is not None)
        for entry in due:
            self.stage("process_batch_result", runner.process, entry.batch, entry)
        if batch is None and not runner.pending:
            self.stage("self_check_during_idle", s.self_check_during_idle)
        return worked or batch is not None or bool(due) or runner.pending

    def close(self) -> None:
        self.runner.close()


def available_loops(pm: Any) -> dict[str, type[EventLoop]]:
    """Loop classes by name. A plugin's ``loopserve_register_loops`` may return the classes
    (keyed by their ``name``, written once) or a ``{name: class}`` dict."""
    results = pm.hook.loopserve_register_loops()
    return collect_named([r if r is None or isinstance(r, dict) else {cls.name: cls for cls in r}
                          for r in results], "loop")
def resolve_loop_class(config: Any, pm: Any) -> type[EventLoop]:
    """The loop class ``config.loop.name`` names (``auto`` asks ``loopserve_select_loop``)."""
    loops = available_loops(pm)
    names = ", ".join(sorted(loops)) or "none"
    name = str(config.loop.name)
    if name == "auto":
        chosen = pm.hook.loopserve_select_loop(config=config, available=sorted(loops))
        if chosen is None:
            raise ValueError(f"loop=auto found no plugin to pick a loop; installed loops: {names}")
        name = chosen
    if name not in loops:
        raise ValueError(
            f"loop {name!r} is not installed (installed loops: {names}); "
            f"pick one of them with loop=NAME or install the plugin that provides it"
            )
    return loops[name]


