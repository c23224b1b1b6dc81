"""Chat messages -> prompt text, with the checkpoint's Jinja chat template (``chat_template`` in
tokenizer_config.json, rendered in a sandbox as transformers does) or, when the checkpoint has
none, ``DEFAULT_CHAT_TEMPLATE``:

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

(one ``<|role|>`` line, then the content, per message; the generation prompt is the final
``<|assistant|>`` line).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from loopserve.core.server.errors import bad_request

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool", "developer")


def load_chat_template(model_dir: str | None) -> tuple[str, dict[str, str]]:
    """The template and the special-token strings (bos_token, eos_token) templates refer to."""
    cfg: dict[str, Any] = {}
    path = os.path.join(model_dir, "tokenizer_config.json") if model_dir else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    specials = {}
    for key in ("bos_token", "eos_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        specials[key] = v if isinstance(v, str) else ""
    return (template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE), specials


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def normalize_messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                              f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts can be served here
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}] must be a text part "
                                      "({\"type\": \"text\", \"text\": ...}); this model takes text only",
                                      f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                              f"messages[{i}].content")
        out.append({**m, "role": role, "content": content})
    return out


def render_chat(template: str, messages: list[Any], specials: dict[str, str], *,
                add_generation_prompt: bool = True) -> str:
    msgs = normalize_messages(messages)
    try:
        return _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt, **specials)
    except ValueError as exc:  # the template's raise_exception (e.g. roles must alternate)
        raise bad_request(f"messages do not fit the model's chat template: {exc}", "messages") from None
    except Exception as exc:  # noqa: BLE001 - a broken template is the checkpoint's problem
        raise bad_request(f"the chat template failed to render: {exc}", "messages") from None
