"""Text <-> token ids for a checkpoint directory, without transformers.

``Tokenizer`` wraps the fast ``tokenizers`` library on ``tokenizer.json`` and reads the special
tokens from tokenizer_config.json, generation_config.json and config.json, so encode/decode
agree with transformers' ``AutoTokenizer`` for the same directory. ``IncrementalDetokenizer``
turns a growing list of output ids into text deltas for streaming, holding back an incomplete
UTF-8 sequence until its last byte arrives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as _FastTokenizer


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where} must be a token id or a list of token ids, got {value!r}")
    return values


# transformers' clean_up_tokenization, applied only where tokenizer_config asks for it.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """The tokenizer of one checkpoint directory."""

    def __init__(self, model_dir: str) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} not found: loopserve needs a fast tokenizer (tokenizer.json) in the "
                "checkpoint directory; create one with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
            )
        try:
            self._tok = _FastTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise ValueError(f"{path} is not a valid tokenizer file ({e}); re-download the checkpoint or "
                             "re-save the tokenizer with transformers' save_pretrained") from None
        tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen_cfg = _read_json(os.path.join(model_dir, "generation_config.json"))
        model_cfg = _read_json(os.path.join(model_dir, "config.json"))
        gen_path = os.path.join(model_dir, "generation_config.json")
        cfg_path = os.path.join(model_dir, "config.json")

        bos_text = _token_text(tok_cfg.get("bos_token"))
        eos_text = _token_text(tok_cfg.get("eos_token"))
        bos = self._tok.token_to_id(bos_text) if bos_text else None
        if bos is None:
            bos = next(iter(_ids(gen_cfg.get("bos_token_id"), f"{gen_path}: bos_token_id")
                            or _ids(model_cfg.get("bos_token_id"), f"{cfg_path}: bos_token_id")), None)
        self.bos_token_id: int | None = bos
        # Generation stops on any of these (the generation config may list several, e.g.
        # Llama 3's <|eot_id|> next to <|end_of_text|>).
        eos_id = self._tok.token_to_id(eos_text) if eos_text else None
        listed = (_ids(gen_cfg.get("eos_token_id"), f"{gen_path}: eos_token_id")
                  + _ids(model_cfg.get("eos_token_id"), f"{cfg_path}: eos_token_id"))
        self.eos_token_id: int | None = eos_id if eos_id is not None else next(iter(listed), None)
        self.eos_token_ids: frozenset[int] = frozenset(listed + ([eos_id] if eos_id is not None else []))

        self._cleanup = bool(tok_cfg.get("clean_up_tokenization_spaces", False))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Whether <bos> (or anything else) is added is up to
        tokenizer.json's post-processor, as in transformers' fast tokenizers."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming detokenizer for one request (see ``IncrementalDetokenizer``)."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Text deltas of one request's growing output, for streaming.

    Decodes a short window of ids (the last emitted tokens plus the new ones) rather than the
    whole output, so a step costs O(new tokens). The context matters for tokenizers that
    decode a word differently at the start of a string (sentencepiece's leading space). Text
    ending in U+FFFD is an incomplete UTF-8 sequence and is held back until it completes.
    """

    _CONTEXT = 5  # prompt tokens decoded as context before the first output token

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT:])
        self._prefix_offset = 0  # start of the decode window in _ids
        self._read_offset = len(self._ids)  # ids before this are already emitted as text
        self._num_output = 0  # output ids seen so far
        self.text = ""  # all output text emitted so far

    def step(self, output_ids: Sequence[int]) -> str:
        """The text added by ``output_ids[seen:]``, where ``output_ids`` is the request's
        whole output so far. Returns "" while the new bytes do not yet form a character."""
        self._ids.extend(output_ids[self._num_output:])
        self._num_output = len(output_ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        # vLLM's scheme: decode [prefix_offset:read_offset] and [prefix_offset:], emit the
        # difference, and slide the window only when something complete was emitted.
        if self._read_offset >= len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
