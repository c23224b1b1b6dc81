"""One request's output as text, built from the token ids the scheduler sends.

Streaming and non-streaming give the same text: deltas come from the tokenizer's incremental
detokenizer (an incomplete UTF-8 character is held back until its last byte arrives), and when
the request has stop strings the last ``len(longest stop) - 1`` characters are held back too,
because the scheduler finishes a request when a stop string completes and the text is cut where
the stop string begins (as ``Engine`` does). Without a tokenizer the text stays empty.
"""

from __future__ import annotations

from typing import Any, Sequence


class OutputText:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.output_ids: list[int] = []
        self._detok = tokenizer.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens) if tokenizer else None
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""  # everything the detokenizer produced
        self.sent = 0  # characters of _text handed out as deltas

    def add(self, new_ids: Sequence[int], *, emit: bool = True) -> str:
        """The text that can be shown now after ``new_ids`` (possibly ""). ``emit=False``
        only takes the ids in (their text is decided by ``finish``)."""
        self.output_ids.extend(new_ids)
        if self._detok is None or not new_ids:
            return ""
        self._text += self._detok.step(self.output_ids)
        if not emit:
            return ""
        safe = len(self._text) - self._hold
        if safe <= self.sent:
            return ""
        delta = self._text[self.sent:safe]
        self.sent = safe
        return delta

    def finish(self, matched: Any = None) -> str:
        """The rest of the text once the request finished; ``matched`` is the stop string (if
        a stop string ended it), cut off with everything after it."""
        if self._detok is None:
            return ""
        self._text += self._detok.finish()
        end = len(self._text)
        if isinstance(matched, str):
            cut = self._text.find(matched)
            if cut >= 0:
                end = cut
        delta = self._text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self._text = self._text[:end]
        return delta

    @property
    def text(self) -> str:
        return self._text[: self.sent]
