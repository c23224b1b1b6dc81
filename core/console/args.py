"""Command-line arguments that are not config overrides, and checks that run before heavy imports.

``prompt=`` is taken verbatim (Hydra's grammar would reject ordinary text such as "Hello,
world" and strip spaces); ``input_ids=[1,2,3]`` gives token ids directly (the sim worker has
no tokenizer, and ids make runs reproducible across tokenizers). ``early_checks`` looks at
the raw overrides for what can be judged without composing the config or importing torch: a
``model.path`` that does not exist is reported in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class GenerateArgs:
    prompt: str | None = None
    input_ids: list[int] | None = None
    overrides: list[str] = field(default_factory=list)


def parse_input_ids(text: str) -> list[int]:
    """``[1, 2, 3]`` (JSON, or Hydra's bare ``[1,2,3]``) -> a non-empty list of token ids >= 0."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           and v >= 0 for v in value):
        raise ValueError(f"input_ids must be a non-empty list of token ids >= 0, such as input_ids=[1,2,3]; "
                         f"got {text!r}")
    return value


def split_generate_args(args: list[str]) -> GenerateArgs:
    """Take ``prompt=...`` (verbatim) and ``input_ids=[...]`` out of the overrides; the last of
    each wins."""
    out = GenerateArgs()
    for arg in args:
        if arg.startswith("prompt="):
            out.prompt = arg[len("prompt="):]
        elif arg.startswith("input_ids="):
            out.input_ids = parse_input_ids(arg[len("input_ids="):])
        else:
            out.overrides.append(arg)
    if out.prompt is not None and out.input_ids is not None:
        raise ValueError("give either prompt=... or input_ids=[...], not both")
    return out


def _raw(overrides: list[str], key: str) -> str | None:
    value = None
    for ov in overrides:
        name, sep, rest = ov.partition("=")
        if sep and name.lstrip("+") == key:
            value = rest
    return value


def early_checks(overrides: list[str]) -> None:
    """What the raw overrides already show to be wrong (before the config is composed).

    Only ``model.path`` for now: the model worker's directory must exist. Values that Hydra
    would transform (interpolations, quotes) are left to the full check in ``build``."""
    worker = _raw(overrides, "worker")
    path = _raw(overrides, "model.path")
    if path is None or (worker is not None and worker != "model"):
        return
    if path in ("", "null") or any(c in path for c in "${}'\"\\"):
        return
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ValueError(f"model.path: directory {path!r} does not exist; set model.path to a local Hugging "
                         "Face checkpoint directory (or leave it unset for the embedded tiny model)")
