"""Request JSON -> ``SamplingParams``: field types checked here (JSON has no int/float split:
``bool`` is not a number, an integral float such as ``50.0`` is accepted where an int is wanted),
ranges checked by ``SamplingParams`` itself. Every problem is an ``APIError`` 400 naming the field.
Unknown fields are ignored: routers and SDKs add their own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from loopserve.core.sched.sampling_params import SamplingParams
from loopserve.core.server.errors import APIError, bad_request

_MISSING = object()


def get_int(body: dict[str, Any], name: str, default: Any = None, *, minimum: int | None = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and (not math.isfinite(v) or v != int(v))):
        raise bad_request(f"{name} must be an integer, got {v!r}", name)
    v = int(v)
    if minimum is not None and v < minimum:
        raise bad_request(f"{name} must be >= {minimum}, got {v}", name)
    return v


def get_float(body: dict[str, Any], name: str, default: Any = None) -> Any:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"{name} must be a finite number, got {v!r}", name)
    return float(v)


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false, got {v!r}", name)
    return v


def get_str_list(body: dict[str, Any], name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad_request(f"{name} must be a non-empty string or a list of them, got {v!r}", name)
    return v


def get_int_list(body: dict[str, Any], name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad_request(f"{name} must be a list of non-negative integers, got {v!r}", name)
    return v


def make_sampling_params(fields: dict[str, Any], *, names: dict[str, str] | None = None) -> SamplingParams:
    """``SamplingParams(**fields)``; its ``ValueError`` becomes a 400 whose ``param`` is the
    request field (``names`` maps SamplingParams names to request names, e.g. max_tokens)."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unsupported = [k for k in fields if k not in known]
    if unsupported:
        name = (names or {}).get(unsupported[0], unsupported[0])
        raise bad_request(f"{name} is not supported by this server's sampler", name)
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        field = next((f for f in fields if text.startswith(f)), None)
        param = (names or {}).get(field, field) if field else None
        if param and field and param != field:
            text = text.replace(field, param, 1)
        raise bad_request(text, param) from None


def openai_sampling(body: dict[str, Any], *, max_tokens: int | None, max_tokens_name: str) -> SamplingParams:
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""
    fields: dict[str, Any] = {
        "temperature": get_float(body, "temperature", 1.0),
        "top_p": get_float(body, "top_p", 1.0),
        "top_k": get_int(body, "top_k", -1),
        "min_p": get_float(body, "min_p", 0.0),
        "presence_penalty": get_float(body, "presence_penalty", 0.0),
        "frequency_penalty": get_float(body, "frequency_penalty", 0.0),
        "repetition_penalty": get_float(body, "repetition_penalty", 1.0),
        "seed": get_int(body, "seed", None),
        "stop": get_str_list(body, "stop"),
        "stop_token_ids": get_int_list(body, "stop_token_ids"),
        "ignore_eos": get_bool(body, "ignore_eos", False),
        "skip_special_tokens": get_bool(body, "skip_special_tokens", True),
    }
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    min_tokens = get_int(body, "min_tokens", 0, minimum=0)
    if min_tokens:
        fields["min_new_tokens"] = min_tokens
    return make_sampling_params(fields, names={"max_new_tokens": max_tokens_name, "min_new_tokens": "min_tokens"})


# SGLang's sampling_params names that map 1:1 onto SamplingParams.
_SGLANG_FLOATS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


def sglang_sampling(sp: Any) -> SamplingParams:
    """``/generate``'s ``sampling_params`` dict (SGLang's names)."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise bad_request(f"sampling_params must be an object, got {type(sp).__name__}", "sampling_params")
    fields: dict[str, Any] = {name: get_float(sp, name) for name in _SGLANG_FLOATS}
    fields.update(
        max_new_tokens=get_int(sp, "max_new_tokens", 128),
        top_k=get_int(sp, "top_k", -1),
        seed=get_int(sp, "sampling_seed", get_int(sp, "seed", None)),
        stop=get_str_list(sp, "stop"),
        stop_token_ids=get_int_list(sp, "stop_token_ids"),
        ignore_eos=get_bool(sp, "ignore_eos", False),
        skip_special_tokens=get_bool(sp, "skip_special_tokens", True),
    )
    min_tokens = get_int(sp, "min_new_tokens", 0, minimum=0)
    if min_tokens:
        fields["min_new_tokens"] = min_tokens
    fields = {k: v for k, v in fields.items() if v is not None}
    if get_int(sp, "n", 1, minimum=1) != 1:
        raise bad_request("sampling_params.n must be 1 on /generate; send the prompt n times", "sampling_params.n")
    return make_sampling_params(fields, names={k: f"sampling_params.{k}" for k in fields})


def sampling_dict(sp: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(sp)


def check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{served}`",
                       param="model", code="model_not_found")
