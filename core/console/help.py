"""``loopserve COMMAND --help``: what each command does, the config keys it reads (with their
defaults and the schema's own comments), and examples; ``loopserve --version``.

The key lists are read from the config schema (``core/config.py``), so a key added there shows
up in the help without anyone editing this file. Printing help imports no torch and composes
no config.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, get_type_hints


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("loopserve")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


_FIELD = re.compile(r"^\s+(\w+)\s*:")


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its trailing ``# comment`` in the dataclass source, or else the first
    sentence of the comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = _COMMENT.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
        else:
            f = _FIELD.match(line)
            if f and above:
                text = " ".join(above)
                cut = text.find(". ")
                out[f.group(1)] = (text[:cut + 1] if 0 < cut < 100 else text[:100] + ("..." if len(text) > 100 else ""))
        above = []
    return out


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "???"
    value = getattr(value, "value", value)  # enums
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return value


def key_lines(section: str) -> list[str]:
    """``  section.key = default   comment`` for every leaf of one schema section."""
    from loopserve.core.config import LoopServeConfig

    cls: Any = LoopServeConfig
    prefix = ""
    if section:
        hints = get_type_hints(cls)
        cls = hints[section]
        prefix = f"{section}."
    if not is_dataclass(cls):
        f = next(f for f in fields(LoopServeConfig) if f.name == section)
        comment = _comments(LoopServeConfig).get(section, "")
        return [_line(section, _default(f), comment)]
    comments = _comments(cls)
    hints = get_type_hints(cls)
    lines = []
    for f in fields(cls):
        if is_dataclass(hints.get(f.name)):
            continue
        lines.append(_line(f"{prefix}{f.name}", _default(f), comments.get(f.name, "")))
    return lines


def _line(key: str, default: Any, comment: str) -> str:
    left = f"  {key}={default}"
    return f"{left:<44} {comment}".rstrip() if comment else left


GROUPS = """config groups (pick one option each):
  loop=auto|normal|overlap|...     the event loop; auto picks from parallel.pp_size,
                                   disaggregation.mode and scheduler.enable_overlap
  policy=fcfs|lpm|priority|...     how waiting requests are ordered and admitted
  worker=model|sim                 the real model, or a cost model that needs no weights
  (plugins add options: see docs/architecture.md)"""

COMMON_SECTIONS = ("model", "scheduler", "kv_cache")

COMMANDS: dict[str, dict[str, Any]] = {
    "generate": {
        "usage": 'loopserve generate prompt="..." [key=value ...]\n'
                 "       loopserve generate input_ids=[1,2,3] [key=value ...]",
        "what": "Print the completion of one prompt (text, or JSON with output_format=json).\n"
                "prompt=... is taken verbatim (commas, quotes and '=' need no Hydra quoting);\n"
                "input_ids=[...] passes token ids instead (needed for worker=sim, which has no\n"
                "tokenizer). On a terminal, control characters in the text are printed escaped.",
        "sections": ("sampling", "output_format", *COMMON_SECTIONS, "grad_mode"),
        "examples": [
            'loopserve generate prompt="Hello"',
            'loopserve generate prompt="Hello" sampling.max_new_tokens=64 sampling.temperature=0.7',
            "loopserve generate prompt=Hi model.path=~/models/Qwen2.5-0.5B-Instruct output_format=json",
            "loopserve generate worker=sim input_ids=[1,2,3] sampling.max_new_tokens=8",
        ],
    },
    "bench": {
        "usage": "loopserve bench [-m] [key=value ...]",
        "what": "Offline throughput benchmark: a fixed-seed random workload through the engine,\n"
                "one JSON summary on stdout (and a results file). -m runs every combination of\n"
                "comma-separated values and compares them.",
        "sections": ("bench", *COMMON_SECTIONS),
        "examples": [
            "loopserve bench",
            "loopserve bench bench.num_requests=64 bench.peer=hf_generate",
            "loopserve bench bench.model_shape=llama-75m bench.num_requests=64 bench.peer=vllm "
            "bench.peer_python=~/vllm-venv/bin/python",
            "loopserve bench -m loop=normal,overlap worker=sim",
            "loopserve bench bench.mode=scheduler_overhead worker=sim",
        ],
    },
    "config": {
        "usage": "loopserve config [key=value ...]",
        "what": "Print the composed config as YAML: every key with the value it would have.",
        "sections": ("", ),
        "examples": [
            "loopserve config",
            "loopserve config loop=overlap scheduler.max_running_requests=64",
        ],
    },
    "serve": {
        "usage": "loopserve serve [key=value ...]",
        "what": "Run the HTTP server (OpenAI- and SGLang-compatible endpoints).",
        "sections": ("server", *COMMON_SECTIONS, "tracing", "metrics"),
        "examples": [
            "loopserve serve",
            "loopserve serve server.port=8080 model.path=~/models/x loop=overlap",
        ],
    },
}


def command_help(command: str) -> str:
    spec = COMMANDS[command]
    out = [f"usage: {spec['usage']}", "", spec["what"], ""]
    if spec["sections"] == ("",):
        out.append("Every key of the config can be overridden; `loopserve config` lists them all.")
        from loopserve.core.config import LoopServeConfig

        out.append("sections: " + ", ".join(f.name for f in fields(LoopServeConfig)))
    else:
        out.append("keys (key=default):")
        for section in spec["sections"]:
            out.extend(key_lines(section))
        out.append("  ... and every other key: `loopserve config` prints them all")
    out += ["", GROUPS, "", "examples:"]
    out += [f"  {e}" for e in spec["examples"]]
    out += ["", "A value Hydra cannot parse (spaces, brackets, '~' outside a path key) needs quotes:",
            "  loopserve COMMAND 'model.served_name=\"my model\"'", ""]
    return "\n".join(out)


def wants_help(args: list[str]) -> bool:
    """``-h`` / ``--help`` anywhere among a command's arguments (never inside ``prompt=``)."""
    return any(a in ("-h", "--help") for a in args)
