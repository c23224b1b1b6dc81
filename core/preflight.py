"""Checks of a composed config that need no torch: paths, plugin names, and settings the chosen
loop or worker would silently ignore.

``build`` runs ``check_paths`` and ``check_plugins`` before anything heavy is imported (a
mistyped ``model.path`` is reported in a fraction of a second, not after torch has loaded),
and ``check_ignored`` once the loop is chosen. A setting that cannot take effect is an error
when ignoring it changes what the user gets (``parallel.nnodes=2`` on a single-process loop
would serve a different deployment than asked for), and a warning when the run is still what
was asked for, only without that setting's effect.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

log = logging.getLogger("loopserve.config")

# Keys that only some loops read, by key prefix -> the built-in loop names that read them.
# Loops this table does not name (a third-party plugin's) may read anything: not judged.
PP_LOOPS = frozenset({"pp", "disagg_prefill", "disagg_decode"})
DISAGG_LOOPS = frozenset({"disagg_prefill", "disagg_decode"})
BUILTIN_LOOPS = frozenset({"normal", "overlap"}) | PP_LOOPS
LOOP_KEYS: dict[str, tuple[frozenset[str], bool]] = {
    # prefix: (loops that read it, whether ignoring it is an error)
    "parallel.": (PP_LOOPS, True),
    "disaggregation.": (DISAGG_LOOPS, True),
}
# Keys the model worker reads and the sim worker does not.
MODEL_WORKER_KEYS = ("model.path", "model.dtype", "model.num_threads", "model.cpu_linear", "attention.backend",
                     "attention.cpu_kernel")


def check_paths(config: Any) -> None:
    """``model.path`` must be an existing directory (when the model worker will load it)."""
    if str(config.worker.name) != "model" or config.model.path is None:
        return
    path = str(config.model.path)
    if not os.path.exists(path):
        raise ValueError(f"model.path: directory {path!r} does not exist; set model.path to a local Hugging "
                         "Face checkpoint directory (or leave it unset for the embedded tiny model)")
    if not os.path.isdir(path):
        raise ValueError(f"model.path: {path!r} is a file, not a directory; set model.path to the checkpoint "
                         "directory that holds config.json and the *.safetensors files")


def check_plugins(config: Any, pm: Any) -> None:
    """Every name in ``plugins.disable`` must be a plugin that is installed (else the block
    does nothing, and a misspelled name would leave the plugin running)."""
    names = set(installed_plugin_names())
    names.update(name for name, plugin in pm.list_name_plugin() if plugin is not None)
    for name in config.plugins.disable:
        if str(name) not in names:
            close = difflib.get_close_matches(str(name), sorted(names), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"plugins.disable: no installed plugin is named {str(name)!r}; {hint}installed "
                             f"plugins: {', '.join(sorted(names - {'loopserve.core.defaults'}))}")


def installed_plugin_names() -> list[str]:
    """The entry-point names of group ``loopserve`` (what ``plugins.disable`` takes)."""
    from importlib.metadata import entry_points

    from loopserve.core.hookspecs import PROJECT

    return sorted({ep.name for ep in entry_points(group=PROJECT)})


def _changed(config: Any, prefix: str) -> list[tuple[str, Any]]:
    """The keys under ``prefix`` whose value differs from the schema's default."""
    from omegaconf import OmegaConf

    from loopserve.core.config import LoopServeConfig

    section = prefix.rstrip(".")
    default = OmegaConf.select(OmegaConf.structured(LoopServeConfig), section)
    current = OmegaConf.select(config, section)
    if default is None or current is None:
        return []
    return [(f"{prefix}{k}", current[k]) for k in current.keys()
            if k in default and current[k] != default[k]]


def check_ignored(config: Any, loop_name: str) -> list[str]:
    """Settings that ``loop_name`` and the chosen worker would ignore: raise ``ValueError`` for
    the ones that change the deployment, log (and return) a warning for the rest."""
    warnings: list[str] = []
    if loop_name in BUILTIN_LOOPS:
        for prefix, (loops, fatal) in LOOP_KEYS.items():
            if loop_name in loops:
                continue
            for key, value in _changed(config, prefix):
                message = (f"{key}={value} has no effect with loop={loop_name}: only "
                           f"{', '.join(sorted(loops))} read {prefix}* settings; select such a loop "
                           f"(loop=auto picks one from parallel.pp_size and disaggregation.mode) or drop the setting")
                if fatal:
                    raise ValueError(message)
                warnings.append(message)
        if str(config.loop.name) != "auto" and config.scheduler.enable_overlap is not None:
            warnings.append(f"scheduler.enable_overlap={config.scheduler.enable_overlap} only guides loop=auto; "
                            f"loop={config.loop.name} is used as selected")
    if str(config.worker.name) == "sim":  # other workers (a plugin's) may read model.*
        from omegaconf import OmegaConf

        from loopserve.core.config import LoopServeConfig

        default = OmegaConf.structured(LoopServeConfig)
        for key in MODEL_WORKER_KEYS:
            value = OmegaConf.select(config, key)
            if value != OmegaConf.select(default, key):
                warnings.append(f"{key}={value} is read by the model worker only; worker={config.worker.name} "
                                "ignores it")
    for message in warnings:
        log.warning(message)
    return warnings
