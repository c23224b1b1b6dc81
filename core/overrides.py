"""User overrides before Hydra composes them: ``~`` in paths, unparsable values, misspelled keys.

Hydra's override grammar reads ``model.path=~/models/x`` as a syntax error (``~`` is its
delete operator, and bash does not expand ``~`` after ``=``), answers a value with spaces or
brackets with a lexer message, and says only "Key 'max_new_tokens' is not in struct" for a key
that exists one level down. Each of those becomes a ``ValueError`` that says what to type
instead; path values are expanded here, so ``~`` works on the command line and in
``Engine(overrides=...)`` alike.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from typing import Any, Iterable, get_type_hints

# Keys that hold file-system paths: a leading ``~`` is expanded to the home directory.
PATH_KEYS = ("model.path", "bench.output_dir", "bench.results_file", "bench.peer_python")
# Free-form dictionaries: plugins read keys below these that no schema knows.
FREE_FORM = ("loop.params", "policy.params", "worker.params", "tracing.headers")


def schema_keys() -> list[str]:
    """Every key of the config schema, dotted (``sampling.max_new_tokens``), groups included."""
    from loopserve.core.config import LoopServeConfig

    out: list[str] = []

    def walk(cls: Any, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            name = f"{prefix}{f.name}"
            out.append(name)
            if is_dataclass(hints.get(f.name)):
                walk(hints[f.name], f"{name}.")

    walk(LoopServeConfig, "")
    return out


def suggest_key(key: str, known: Iterable[str] | None = None) -> list[str]:
    """Likely meant keys for an unknown ``key``: the same last name one level elsewhere
    (``max_new_tokens`` -> ``sampling.max_new_tokens``), or a close spelling of each part
    (``schedular.max_running_requests`` -> ``scheduler.max_running_requests``)."""
    known = list(schema_keys() if known is None else known)
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == last and k != key]
    if same_name:
        return same_name[:3]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    if close:
        return close
    # Part by part: fix the first unknown part, keep the rest if that makes a known key.
    parts, fixed = key.split("."), []
    for i, part in enumerate(parts):
        prefix = ".".join(fixed)
        options = {k.split(".")[i] for k in known if k.count(".") >= i and (not prefix or k.startswith(prefix + "."))}
        if part in options:
            fixed.append(part)
            continue
        match = difflib.get_close_matches(part, sorted(options), n=1, cutoff=0.6)
        if not match:
            return []
        fixed.append(match[0])
    candidate = ".".join(fixed)
    return [candidate] if candidate in known else []


def _is_known(key: str, known: set[str]) -> bool:
    return key in known or any(key.startswith(f"{free}.") for free in FREE_FORM)


def unknown_key_message(key: str) -> str:
    hint = suggest_key(key)
    meant = f"; did you mean {' or '.join(hint)}?" if hint else "; check its spelling"
    return f"unknown config key {key!r}{meant} (`loopserve config` prints every key with its value)"


def _quote_hint(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep:
        return "write overrides as key=value"
    inner = value.replace("\\", "\\\\").replace("'", "\\'")
    return (f"quote the value for Hydra, and the whole override for the shell: "
            f"'{key}=\"{inner}\"'" if "'" not in value else
            f"quote the value for Hydra: {key}='{inner}' (inside double quotes for the shell)")


def expand_path(override: str) -> str:
    """``key=~/x`` -> ``key='/home/me/x'`` for path keys; other overrides unchanged."""
    key, sep, value = override.partition("=")
    if sep and key.lstrip("+") in PATH_KEYS and value.startswith("~"):
        expanded = os.path.expanduser(value)
        return f"{key}='{expanded}'" if "'" not in expanded else override
    return override


def prepare(overrides: Iterable[str]) -> list[str]:
    """Expand ``~`` in path values, then parse every override: a ``ValueError`` names the one
    Hydra cannot read (with how to quote it) or the unknown key (with what it likely meant)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    out = [expand_path(o) for o in overrides]
    parser = OverridesParser.create()
    known = set(schema_keys())
    for original, ov in zip(overrides, out):
        try:
            parsed = parser.parse_override(ov)
        except Exception as exc:  # OverrideParseException, or antlr's own on some inputs
            text = str(exc).strip() if isinstance(exc, OverrideParseException) else ""
            first = text.splitlines()[0] if text and text != "None" else "Hydra's override grammar rejects it"
            raise ValueError(f"cannot parse override {original!r} ({first}); {_quote_hint(original)}") from None
        key = parsed.key_or_group
        if parsed.package is None and not _is_known(key, known) and not key.startswith("hydra"):
            raise ValueError(unknown_key_message(key))
    # A plugin's free-form settings (loop.params.depth=2) need no "+": add or override.
    return [f"++{o}" if not o.startswith(("+", "~")) and any(o.startswith(f"{f}.") for f in FREE_FORM) else o
            for o in out]


def expand_config_paths(cfg: Any) -> None:
    """Expand ``~`` in the path keys of a composed config (values from YAML or the API)."""
    from omegaconf import OmegaConf

    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), merge=False)
