"""Per-request sampling settings and the one validation layer every frontend shares.

``SamplingParams`` checks every field on construction, and again (with the vocabulary size)
when a request is submitted, since a caller may change a field in between. ``from_dict``
builds one from JSON-like data (the HTTP server's request bodies), so the Python API and the
server reject the same things with the same messages: a ``ValueError`` that names the field
and says what to change.

Types are exact, because a value that only looks right fails later, on the loop thread, for
every user: ``True`` is not an integer, a ``Decimal`` or ``Fraction`` is not a float, a string
is not a number. JSON has no integer type of its own in some clients, so an integral float
(``50.0``) is accepted where an integer is expected, and converted. Numbers must be finite.

This module is part of the scheduling core and does not import torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

#: Temperatures below this are greedy. Dividing logits by a smaller temperature overflows
#: float32 (and even when it does not, the result is the argmax up to rounding), so the
#: sampler takes the argmax instead of producing infinities.
GREEDY_TEMPERATURE = 1e-5
#: Bounds on integer fields, far beyond any real use, so arithmetic on them stays cheap and
#: never overflows a float (the scheduler multiplies max_new_tokens by a ratio).
MAX_NEW_TOKENS_LIMIT = 2**31 - 1
SEED_LIMIT = 2**64


def _int_field(name: str, value: Any, *, what: str) -> int:
    """``value`` as an int: an integer (not a bool), or a float with an integral value (JSON)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got the boolean {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be {what}, got {value!r} (not a whole number)")
    raise ValueError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _float_field(name: str, value: Any, *, what: str) -> float:
    """``value`` as a finite float: an int (not a bool) or a float, nothing else."""
    if isinstance(value, bool) or not isinstance(value, (float, numbers.Integral)):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {what}, got {value!r} (too large)") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be {what}, got {value!r}; use a finite number")
    return f


def check_text(name: str, value: Any) -> str:
    """``value`` must be a string that encodes as UTF-8 (no lone surrogates); returns it."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid Unicode text: {value[exc.start:exc.end]!r} at position {exc.start} "
            "is a lone surrogate (undecodable input); send valid UTF-8") from None
    return value


MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows


@dataclass
class SamplingParams:
    """How one request is decoded.

    Defaults follow vLLM/SGLang: ``temperature=1.0`` samples; ``temperature=0`` is greedy, and
    so is any temperature below ``GREEDY_TEMPERATURE`` (1e-5). Every field is checked in
    ``__post_init__`` (see ``validate``); a bad value raises ``ValueError`` saying which field
    to change and what it accepts.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Return the log-probability of each sampled token and of this many top alternatives
    # (0 = the sampled token only); None = no logprobs. Needs a worker that computes them.
    logprobs: int | None = None
    # Also score the prompt: the log-probability of every prompt token after the first, given
    # the tokens before it, with this many top alternatives; None = not asked. Such a request
    # does not reuse a cached prefix (the logits of its whole prompt must be computed).
    prompt_logprobs: int | None = None
    # EOS and stop token ids cannot be sampled before this many tokens (stop strings still stop).
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: Any, *, vocab_size: int | None = None, strict: bool = False) -> "SamplingParams":
        """Build from a JSON object (``{"temperature": 0.5, "max_new_tokens": 16.0, ...}``).

        A ``null`` value means the field's default. Unknown keys are ignored (the HTTP API
        ignores unknown fields) unless ``strict``.

        :param vocab_size: also check ``stop_token_ids`` against the vocabulary.
        :raises ValueError: naming the field, on any bad value.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"sampling_params must be an object (a dict), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                if strict:
                    raise ValueError(f"sampling_params has no field {key!r}; known fields: {', '.join(sorted(known))}")
                continue
            if value is not None or key == "seed":
                kwargs[key] = value
        sp = cls(**kwargs)
        if vocab_size is not None:
            sp.validate(vocab_size)
        return sp

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check and normalize every field in place (idempotent); returns ``self``.

        :param vocab_size: when given, ``stop_token_ids`` must lie in ``[0, vocab_size)``.
        :raises ValueError: naming the field and what it accepts.
        """
        self.max_new_tokens = _int_field("max_new_tokens", self.max_new_tokens, what="an integer >= 1")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be >= 1 (and at most {MAX_NEW_TOKENS_LIMIT}), got "
                             f"{self.max_new_tokens}; ask for at least one token")
        self.temperature = _float_field("temperature", self.temperature, what="a number >= 0 (0 means greedy)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        top_k = -1 if self.top_k is None else self.top_k
        self.top_k = _int_field("top_k", top_k, what="an integer: -1 or 0 (disabled) or >= 1")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        self.top_p = _float_field("top_p", self.top_p, what="a number in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _float_field("min_p", self.min_p, what="a number in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _float_field("repetition_penalty", self.repetition_penalty,
                                               what="a number > 0 (1.0 disables it)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = _float_field(name, getattr(self, name), what="a number in [-2, 2]")
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        if self.seed is not None:
            self.seed = _int_field("seed", self.seed, what="an integer or None")
            if not -SEED_LIMIT < self.seed < SEED_LIMIT:
                raise ValueError(f"seed must be an integer with |seed| < 2**64, got {self.seed}")
        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids, vocab_size)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.min_new_tokens = _int_field("min_new_tokens", self.min_new_tokens, what="an integer >= 0")
        if not 0 <= self.min_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = _int_field(name, value, what=f"None or an integer in [0, {MAX_LOGPROBS}]")
                if not 0 <= value <= MAX_LOGPROBS:
                    raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value}")
                setattr(self, name, value)
        # Derived flags, read per request on every decode step: plain attributes, computed here
        # (validate runs on construction and again at submit, after any later field changes).
        self.needs_penalties = (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                                or self.presence_penalty != 0.0)
        #: The worker must see this request's output ids (penalties, min_new_tokens).
        self.needs_output_ids = self.min_new_tokens > 0 or self.needs_penalties
        return self

    @staticmethod
    def _check_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
        out = []
        for i, s in enumerate(stop):
            check_text(f"stop[{i}]", s)
            if not s:
                raise ValueError(f"stop[{i}] is an empty string; stop strings must be non-empty")
            out.append(s)
        return out

    @staticmethod
    def _check_stop_token_ids(ids: Any, vocab_size: int | None) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {type(ids).__name__} {ids!r}")
        out = []
        for i, t in enumerate(ids):
            t = _int_field(f"stop_token_ids[{i}]", t, what="a token id (an integer >= 0)")
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise ValueError(f"stop_token_ids[{i}]={t} is outside the vocabulary {bound}; "
                                 "use ids the tokenizer produces")
            out.append(t)
        return out

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

