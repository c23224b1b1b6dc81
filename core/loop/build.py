"""The one build path: plugin manager, config, worker, observers, scheduler and loop, assembled
in the documented hook order and torn down in reverse if any step fails.

``Engine``, the server's scheduler process, the benchmarks and the tests' stepping harness all
call ``build``; none of them assembles the parts its own way. Order:

1. ``make_plugin_manager`` (``plugins.disable`` known before the config exists);
2. ``compose_config`` (``loopserve_add_config``), then ``loopserve_configure``;
3. loop and policy classes resolved by name (a typo fails before any weights load);
4. ``loopserve_make_worker``;
5. telemetry, then ``loopserve_register_observers`` (tracing, metrics) — before the scheduler
   and loop exist, because they decide once whether any wrapper is there to call;
6. the scheduler of the role the loop asks for (``EventLoop.scheduler_class``), then the loop;
7. ``loopserve_startup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from loopserve.core.loop.base import EventLoop, available_loops, resolve_loop_class
from loopserve.core.plugin_manager import collect_named, make_plugin_manager


@dataclass
class Built:
    """What ``build`` assembled. ``close()`` releases it in reverse order (idempotent)."""

    config: Any
    pm: Any
    worker: Any
    scheduler: Any
    loop: EventLoop
    telemetry: Any
    _closed: bool = False

    def close(self, message: str = "the engine shut down") -> None:
        """Stop-side teardown: the loop's threads, queued requests, plugins, worker, telemetry.
        Every step runs even if an earlier one raises; the first error is re-raised."""
        if self._closed:
            return
        self._closed = True
        _teardown([
            self.loop.close,
            lambda: self.scheduler.shutdown(message),
            lambda: self.pm.hook.loopserve_shutdown(scheduler=self.scheduler),
            self.worker.shutdown,
            self.telemetry.shutdown,
        ])


def _teardown(steps: Sequence[Callable[[], Any]]) -> None:
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - keep tearing down, report the first
            first = first or exc
    if first is not None:
        raise first


def disabled_plugins(overrides: Sequence[str]) -> list[str]:
    """``plugins.disable`` must be known before the plugin manager (and so the config) exists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    disabled: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if o.lstrip("+~").startswith("plugins.disable=")])
    except Exception as exc:  # the full compose reports it properly
        raise ValueError(f"invalid plugins.disable override: {exc}") from None
    for ov in parsed:
        value = ov.value()
        disabled = [str(v) for v in (value if isinstance(value, list) else [value])]
    return disabled


def resolve_policy_class(config: Any, pm: Any) -> type:
    policies = collect_named(pm.hook.loopserve_register_policies(), "policy")
    name = str(config.policy.name)
    if name not in policies:
        raise ValueError(f"policy {name!r} is not installed (installed policies: "
                         f"{', '.join(sorted(policies)) or 'none'}); pick one with policy=NAME")
    return policies[name]


def register_observers(pm: Any, config: Any, telemetry: Any) -> None:
    """Register what ``loopserve_register_observers`` returns (tracing and metrics objects)."""
    for name, plugin in collect_named(
            pm.hook.loopserve_register_observers(config=config, telemetry=telemetry), "observer").items():
        pm.register(plugin, name=name)


def build(
    overrides: Iterable[str] | None = None,
    *,
    config: Any = None,
    plugins: Iterable[tuple[str, object]] = (),
    tracer_provider: Any = None,
    wrap_worker: Callable[[Any], Any] | None = None,
) -> Built:
    """Assemble scheduler, worker, policy, observers and loop for ``config`` (or the config
    composed from ``overrides``).

    :param plugins: extra ``(name, plugin)`` pairs registered before the config is composed
        (tests' fake worker, an application's own hooks).
    :param tracer_provider: an OpenTelemetry ``TracerProvider`` to use instead of the one
        ``tracing.exporter`` would build; the caller keeps it.
    :param wrap_worker: wraps the worker before the scheduler sees it (the overhead benchmark
        times forwards this way).
    :raises ValueError: on a bad config or a missing plugin, with nothing left running.
    """
    from loopserve.core import preflight
    from loopserve.core.config import compose_config
    from loopserve.core.telemetry import setup_telemetry

    overrides = list(overrides or [])
    disable = list(config.plugins.disable) if config is not None else disabled_plugins(overrides)
    pm = make_plugin_manager(disable=disable, plugins=plugins)
    if config is None:
        config = compose_config(overrides, pm)
    pm.hook.loopserve_configure(config=config)
    # Before anything imports torch: a bad path or plugin name is reported at once.
    preflight.check_paths(config)
    preflight.check_plugins(config, pm)
    loop_cls = resolve_loop_class(config, pm)
    preflight.check_ignored(config, next((n for n, c in available_loops(pm).items() if c is loop_cls), ""))
    policy_cls = resolve_policy_class(config, pm)
    worker = pm.hook.loopserve_make_worker(name=str(config.worker.name), config=config)
    if worker is None:
        raise ValueError(f"no installed plugin provides worker {config.worker.name!r}; "
                         "use worker=model or worker=sim, or install the plugin")
    if wrap_worker is not None:
        worker = wrap_worker(worker)
    undo: list[Callable[[], Any]] = [worker.shutdown]
    try:
        telemetry = setup_telemetry(config, tracer_provider)
        undo.insert(0, telemetry.shutdown)
        register_observers(pm, config, telemetry)
        scheduler = loop_cls.scheduler_class(config)(config, pm, worker, policy_cls)
        undo.insert(0, lambda: scheduler.shutdown("the engine failed to start"))
        loop = loop_cls(scheduler, pm, config)
        undo.insert(0, loop.close)
        pm.hook.loopserve_startup(scheduler=scheduler, loop=loop)
    except BaseException:
        try:
            _teardown(undo)
        except BaseException:  # noqa: BLE001 - the construction error is the one to report
            pass
        raise
    return Built(config=config, pm=pm, worker=worker, scheduler=scheduler, loop=loop, telemetry=telemetry)
