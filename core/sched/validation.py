"""Checks of the request fields other than the sampling settings (those are
``SamplingParams.validate``): prompts, token ids, request ids, priorities, trace context and
timeouts. The offline ``Engine`` and the HTTP server call the same functions, so a bad field
gets the same ``ValueError`` (HTTP 400) naming it and saying what to change, before anything
is queued: nothing a caller sends may reach the loop thread in a shape that fails there.

Part of the scheduling core: no torch.
"""

from __future__ import annotations

import math
from typing import Any

from loopserve.core.sched.sampling_params import _int_field, check_text

#: Request ids are log and metric material, not payload.
MAX_RID_LEN = 256


def check_prompt(prompt: Any, name: str = "prompt") -> str:
    """A non-empty string that is valid Unicode (no lone surrogates from undecodable bytes)."""
    check_text(name, prompt)
    if prompt == "":
        raise ValueError(f"{name} is empty; send at least one character")
    return prompt


def check_input_ids(ids: Any, *, vocab_size: int | None, context_len: int, kv_slots: int,
                    name: str = "input_ids") -> list[int]:
    """A non-empty list of ints in the vocabulary that fits the context and the KV cache."""
    # C-level passes (set/map/min/max): a burst of long prompts is validated in the caller's
    # thread before anything is queued, so this must not cost much per token.
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids (integers), got {type(ids).__name__}")
    ids = list(ids)
    if set(map(type, ids)) - {int}:
        bad = next((i, t) for i, t in enumerate(ids) if type(t) is not int)
        raise ValueError(f"{name}[{bad[0]}] must be a token id (an integer), got {type(bad[1]).__name__} {bad[1]!r}")
    if not ids:
        raise ValueError(f"{name} is empty; send at least one token")
    if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
        i, bad = next((i, t) for i, t in enumerate(ids) if t < 0 or (vocab_size is not None and t >= vocab_size))
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name}[{i}]={bad} is outside the vocabulary {bound}; check the tokenizer")
    if len(ids) >= context_len:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model's context length is {context_len}; "
                         "shorten the prompt (at most context length - 1 tokens)")
    if len(ids) + 1 > kv_slots:
        raise ValueError(f"the prompt has {len(ids)} tokens but the KV cache holds only {kv_slots}; "
                         "raise kv_cache.num_tokens")
    return ids


def check_rid(rid: Any) -> str | None:
    """None (the engine picks one) or a non-empty string of at most ``MAX_RID_LEN`` characters."""
    if rid is None:
        return None
    check_text("rid", rid)
    if not rid or len(rid) > MAX_RID_LEN:
        raise ValueError(f"rid must be a non-empty string of at most {MAX_RID_LEN} characters, got {rid!r}")
    return rid


def check_priority(priority: Any, name: str = "priority") -> int:
    return _int_field(name, priority, what="an integer (higher runs first with policy=priority)")


def check_traceparent(traceparent: Any) -> str | None:
    """None or a string. A string that is not a valid W3C ``traceparent`` is ignored later (the
    request starts a trace of its own), as the W3C spec asks of a malformed header."""
    if traceparent is None:
        return None
    return check_text("traceparent", traceparent)


def check_timeout(timeout: Any) -> float | None:
    """None (wait as long as it takes) or a finite number of seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout < 0:
        raise ValueError(f"timeout must be None or a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)
