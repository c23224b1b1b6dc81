"""Builds the pluggy plugin manager: hookspecs, the core defaults, then every entry point of
group ``loopserve`` (built-ins and third-party alike), minus the blocked names.

Nothing happens at import time; each Engine or CLI run builds its own manager.
"""

from __future__ import annotations

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
    pm = pluggy.PluginManager(PROJECT)
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
