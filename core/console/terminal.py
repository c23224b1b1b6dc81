"""Printing generated text to a terminal without letting it drive the terminal.

A model's output can hold any character, and a tiny random model's output holds many control
characters: printed raw, an escape sequence can recolor, move the cursor or retitle the
user's terminal. On a terminal, control characters (except newline and tab) are shown as
escapes (``\\x1b``, ``\\u202e``); piped or redirected output, and JSON output, stay exact.
"""

from __future__ import annotations

import unicodedata
from typing import TextIO

_KEEP = "\n\t"


def escape_controls(text: str) -> str:
    """``text`` with every control or format character except newline and tab escaped."""
    out = []
    for ch in text:
        if ch not in _KEEP and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def for_stream(text: str, stream: TextIO) -> str:
    """``text`` as it should be written to ``stream``: escaped when it is a terminal."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return escape_controls(text) if tty else text
