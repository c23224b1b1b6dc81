"""Builds the pluggy plugin manager: hookspecs, the core defaults, then every entry point of
group ``loopserve`` (built-ins and third-party alike), minus the blocked names.

Nothing happens at import time; each Engine or CLI run builds its own manager.

Plugin errors on the loop thread are contained here (the event loop is the production heart:
one bad hook is not a reason to stop serving everyone). The observer hooks called per step
(``CONTAINED_HOOKS``) have each plain implementation guarded at registration: an exception is
caught for that one call, logged once per plugin and hook, and counted in
``PluginErrors`` (``Scheduler.stats.num_plugin_errors``, metric
``loopserve_plugin_errors_total``); the other implementations of the call still run. Wrapper
hooks around stages and iterations are contained by ``EventLoop`` with ``call_wrapped``.
Lifecycle hooks (configure, make_worker, startup, ...) are not contained: failing there fails
construction, loudly, with nothing left running.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, Iterable

import pluggy

from loopserve.core import hookspecs
from loopserve.core.hookspecs import PROJECT, hookimpl


class _CoreDefaults:
    """The innermost implementations of the wrapper hooks: they just run the call."""

    @hookimpl(trylast=True)
    def loopserve_run_iteration(self, call: Callable[[], Any]) -> Any:
        return call()

    @hookimpl(trylast=True)
    def loopserve_run_stage(self, call: Callable[[], Any]) -> Any:
        return call()


CORE_DEFAULTS_NAME = "loopserve.core.defaults"
#: Per-step observer hooks whose plain implementations are contained (see the module doc).
CONTAINED_HOOKS = frozenset({"loopserve_before_forward", "loopserve_after_forward", "loopserve_requests_finished"})

log = logging.getLogger("loopserve.plugins")


class PluginErrors:
    """Exceptions raised by plugin hooks and contained: counts per (plugin, hook), each pair
    logged with its traceback the first time only (a hook failing every step must not flood
    the log)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, plugin: str, hook: str, exc: BaseException) -> None:
        key = (plugin, hook)
        with self._lock:
            n = self.counts.get(key, 0)
            self.counts[key] = n + 1
        if n == 0:
            log.error("plugin %r raised in %s; the call is skipped and the engine keeps serving "
                      "(further errors of this plugin and hook are only counted)", plugin, hook,
                      exc_info=(type(exc), exc, exc.__traceback__))


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the containment of ``CONTAINED_HOOKS`` (see the module doc)."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.plugin_errors = PluginErrors()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        plugin_name = super().register(plugin, name)
        if plugin_name is None:
            return None
        for caller in self.get_hookcallers(plugin) or ():
            if caller.name not in CONTAINED_HOOKS:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = self._guard(impl.function, plugin_name, caller.name)
        return plugin_name

    def _guard(self, fn: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
        errors = self.plugin_errors

        @functools.wraps(fn)
        def guarded(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - contained by design, counted and logged
                errors.record(plugin, hook, exc)
                return None

        return guarded


def plugin_errors(pm: Any) -> PluginErrors:
    """The manager's error counter (a fresh one for a plain pluggy manager)."""
    errors = getattr(pm, "plugin_errors", None)
    if errors is None:
        errors = PluginErrors()
        try:
            pm.plugin_errors = errors
        except AttributeError:
            pass
    return errors


def _blame(pm: Any, hook: Any, exc: BaseException) -> str:
    """The plugin whose implementation of ``hook`` raised ``exc``: the innermost traceback
    frame that runs one of the hook's implementations."""
    codes = {}
    for impl in hook.get_hookimpls():
        code = getattr(getattr(impl.function, "__wrapped__", impl.function), "__code__", None)
        if code is not None:
            codes[code] = impl.plugin_name
    name = "unknown"
    tb = exc.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code, name)
        tb = tb.tb_next
    return name


def call_wrapped(pm: Any, hook: Any, fn: Callable[..., Any], fn_args: tuple, **hook_kwargs: Any) -> Any:
    """Call the wrapper hook ``hook`` around ``fn(*args)`` and contain the wrappers' errors.

    ``hook`` gets ``call`` (running ``fn(*fn_args)``) and ``hook_kwargs``. The call's own
    exception (from ``fn``) propagates unchanged. A wrapper that raises after
    ``fn`` ran costs only its own work: ``fn``'s result is returned. A wrapper that raises
    before calling ``fn`` means ``fn`` runs unwrapped. Either way the error is recorded.
    """
    outcome: list[tuple[bool, Any]] = []

    def call() -> Any:
        try:
            result = fn(*fn_args)
        except BaseException as exc:
            outcome.append((False, exc))
            raise
        outcome.append((True, result))
        return result

    try:
        return hook(call=call, **hook_kwargs)
    except Exception as exc:
        failed = outcome and not outcome[0][0]
        if failed and exc is outcome[0][1]:
            raise
        plugin_errors(pm).record(_blame(pm, hook, exc), hook.name, exc)
        if failed:
            raise outcome[0][1]  # a wrapper failed while handling the call's own error
        if outcome:
            return outcome[0][1]
    return fn(*fn_args)


def make_plugin_manager(
    disable: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
    load_entrypoints: bool = True,
) -> pluggy.PluginManager:
    """A fresh plugin manager.

    :param disable: plugin names to block (entry-point names such as ``loop_normal``).
    :param plugins: extra ``(name, plugin)`` pairs to register directly (tests, embedding apps).
    :param load_entrypoints: load the entry points of group ``loopserve``.
    """
    pm = PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_CoreDefaults(), name=CORE_DEFAULTS_NAME)
    for name in disable:
        pm.set_blocked(name)
    for name, plugin in plugins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(PROJECT)
    # A misspelled hook name in any plugin fails here, not silently at run time.
    pm.check_pending()
    return pm


def has_wrappers(hook: Any) -> bool:
    """Whether any plugin besides the core default implements ``hook`` (e.g. a tracer)."""
    return any(impl.plugin_name != CORE_DEFAULTS_NAME for impl in hook.get_hookimpls())


def collect_named(results: list[dict[str, Any] | None], what: str) -> dict[str, Any]:
    """Merge the ``{name: class}`` dicts that a ``register_*`` hook returned."""
    merged: dict[str, Any] = {}
    for result in results:
        for name, cls in (result or {}).items():
            if name in merged and merged[name] is not cls:
                raise ValueError(f"two plugins register a {what} named {name!r}; disable one with plugins.disable=[...]")
            merged[name] = cls
    return merged
