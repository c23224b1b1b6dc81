"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Response and stream shapes follow OpenAI's API (what the official ``openai`` client parses):
SSE ``data: {json}`` chunks ending with ``data: [DONE]``, ``stream_options.include_usage`` adding
a last chunk with ``usage`` and no choices. An error during a stream is sent as a
``data: {"error": ...}`` event before ``[DONE]`` (the status line has already gone out).
"""

from __future__ import annotations

import json
import time

import msgspec
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loopserve.core.server.chat_template import render_chat
from loopserve.core.server.errors import APIError, bad_request
from loopserve.core.server.frontend import Frontend, Item, RequestGroup
from loopserve.core.server.params import check_model, get_bool, get_int, openai_sampling

router = APIRouter()

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DONE = b"data: [DONE]\n\n"


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


_json_encode = msgspec.json.Encoder().encode


def sse(obj: Any) -> bytes:
    """One server-sent event (msgspec's JSON encoder: several times faster than json.dumps,
    and this runs once per chunk of every stream)."""
    return b"data: " + _json_encode(obj) + b"\n\n"


def finish_or_raise(items: list[Item]) -> None:
    for it in items:
        if it.finish == "abort":
            raise APIError(500 if "died" not in (it.error or "") else 503,
                           f"the request was aborted: {it.error or 'unknown reason'}")


def usage(items: list[Item], prompt_tokens: int) -> dict[str, int]:
    completion = sum(len(it.output_ids) for it in items)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def stream_options(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    return get_bool(opts, "include_usage", False)


def logprobs_wanted(fe: Frontend, n_top: int | None, name: str) -> int | None:
    if n_top is None:
        return None
    if not fe.info.supports_logprobs:
        raise bad_request("logprobs not supported by this worker", name)
    if n_top > 20:
        raise bad_request(f"{name} must be at most 20, got {n_top}", name)
    return n_top


def token_str(fe: Frontend, token_id: int) -> str:
    return fe.tokenizer.decode([token_id], skip_special_tokens=False) if fe.tokenizer is not None else str(token_id)


# ---------------------------------------------------------------------- /v1/models
@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    fe: Frontend = request.app.state.frontend
    return JSONResponse({"object": "list", "data": [{
        "id": fe.served_model_name, "object": "model", "created": int(fe.start_time), "owned_by": "loopserve",
        "root": fe.info.model_path, "max_model_len": fe.info.context_len}]})


# ---------------------------------------------------------------------- /v1/completions
def parse_prompts(fe: Frontend, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """String, list of strings, token ids, or list of token id lists."""
    if isinstance(prompt, str):
        return [(prompt, fe.encode(prompt, "prompt"))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, fe.encode(p, f"prompt[{i}]")) for i, p in enumerate(prompt)]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [(None, fe.check_ids(prompt, "prompt"))]
        if all(isinstance(p, list) for p in prompt):
            return [(None, fe.check_ids(p, f"prompt[{i}]")) for i, p in enumerate(prompt)]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                      "prompt")


def completion_logprobs(fe: Frontend, it: Item, start: int, text_offset: int) -> dict[str, Any]:
    ids = it.output_ids[start:len(it.logprobs)]
    tokens = [token_str(fe, t) for t in ids]
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": it.logprobs[start:start + len(ids)],
        "top_logprobs": [{token_str(fe, int(tid)): lp for tid, lp in top} for top in it.top[start:start + len(ids)]],
        "text_offset": offsets,
    }


def echo_logprobs(fe: Frontend, it: Item, n_top: int) -> dict[str, Any]:
    """The prompt's part of an echoed completion's ``logprobs``: the first token has none
    (nothing precedes it), every later one its log-probability given the tokens before it."""
    tokens = [token_str(fe, t) for t in it.input_ids]
    lps = it.prompt_logprobs or [None] * len(tokens)
    tops = it.prompt_top or [[] for _ in tokens]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": list(lps),
        "top_logprobs": [None if lp is None else {token_str(fe, int(tid)): v for tid, v in top[:n_top]}
                         for lp, top in zip(lps, tops)],
        "text_offset": offsets,
    }


def join_logprobs(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    return {k: head[k] + tail[k] for k in head}


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    fe: Frontend = request.app.state.frontend
    body = await read_json(request)
    check_model(body, fe.served_model_name)
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    prompts = parse_prompts(fe, body["prompt"])
    n = get_int(body, "n", 1, minimum=1)
    max_tokens = get_int(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, minimum=1)
    sp = openai_sampling(body, max_tokens=max_tokens, max_tokens_name="max_tokens")
    n_top = logprobs_wanted(fe, get_int(body, "logprobs", None, minimum=0), "logprobs")
    echo = get_bool(body, "echo", False)
    stream = get_bool(body, "stream", False)
    include_usage = stream_options(body)
    # echo + logprobs also scores the prompt, as OpenAI's legacy completions did.
    score_prompt = echo and n_top is not None
    items = [Item(ids, sp, text, n_top, n_top if score_prompt else None) for text, ids in prompts for _ in range(n)]
    fe.fit_max_tokens(items)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    group = fe.group(request, items, "cmpl", body)
    cid, created = items[0].rid if items[0].rid.startswith("cmpl-") else f"cmpl-{items[0].rid}", int(time.time())

    def echo_text(it: Item) -> str:
        if not echo:
            return ""
        return it.prompt_text if it.prompt_text is not None else (
            fe.tokenizer.decode(it.input_ids, skip_special_tokens=False) if fe.tokenizer else "")

    if not stream:
        await group.wait()
        finish_or_raise(items)
        choices = []
        for it in items:
            head = echo_text(it)
            lp = None
            if n_top is not None:
                lp = completion_logprobs(fe, it, 0, len(head))
                if score_prompt:
                    lp = join_logprobs(echo_logprobs(fe, it, n_top), lp)
            choices.append({"index": it.index, "text": head + it.text.text, "logprobs": lp,
                            "finish_reason": it.finish})
        return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                             "model": fe.served_model_name, "choices": choices, "usage": usage(items, prompt_tokens)},
                            headers={"X-Request-Id": items[0].rid})

    async def gen() -> AsyncIterator[bytes]:
        sent_lp = {it.index: 0 for it in items}
        text_pos = {it.index: 0 for it in items}
        echoed: set[int] = set()

        def echo_chunk(it: Item) -> bytes:
            # With logprobs it waits for the request's first output, which brings the prompt's.
            echoed.add(it.index)
            head = echo_text(it)
            text_pos[it.index] = len(head)
            return sse({"id": cid, "object": "text_completion", "created": created, "model": fe.served_model_name,
                        "choices": [{"index": it.index, "text": head,
                                     "logprobs": echo_logprobs(fe, it, n_top) if score_prompt else None,
                                     "finish_reason": None}]})

        if echo and not score_prompt:
            for it in items:
                yield echo_chunk(it)
        async for it, delta in _guarded(group):
            if it is None:
                yield delta
                return
            if echo and it.index not in echoed and it.finish != "abort":
                yield echo_chunk(it)
            # NOTE: one chunk per step that brought tokens, even while the text holds back an
            # incomplete character (empty text): clients time tokens by chunks.
            if not delta and not it.num_new and it.finish is None:
                continue
            if it.finish == "abort":
                yield sse(APIError(500, f"the request was aborted: {it.error}").body())
                yield DONE
                return
            lp = None
            if n_top is not None:
                lp = completion_logprobs(fe, it, sent_lp[it.index], text_pos[it.index])
                sent_lp[it.index] = len(it.output_ids)
            text_pos[it.index] += len(delta)
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": fe.served_model_name,
                       "choices": [{"index": it.index, "text": delta, "logprobs": lp, "finish_reason": it.finish}]})
        if include_usage:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": fe.served_model_name,
                       "choices": [], "usage": usage(items, prompt_tokens)})
        yield DONE

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"X-Request-Id": items[0].rid})


async def _guarded(group: RequestGroup) -> AsyncIterator[tuple[Any, Any]]:
    """``group.events()``; an unexpected error becomes one SSE error event ``(None, text)``."""
    try:
        async for it, delta in group.events():
            yield it, delta
    except Exception as exc:  # noqa: BLE001 - the status line is sent; report in the stream
        yield None, sse(APIError(500, f"internal error: {exc!r}").body()) + DONE


# ---------------------------------------------------------------------- /v1/chat/completions
def chat_logprobs(fe: Frontend, it: Item, start: int, n_top: int) -> dict[str, Any]:
    content = []
    for tid, lp, top in zip(it.output_ids[start:], it.logprobs[start:], it.top[start:]):
        s = token_str(fe, tid)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": token_str(fe, int(t)), "logprob": l,
                                          "bytes": list(token_str(fe, int(t)).encode("utf-8"))} for t, l in top[:n_top]]})
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    fe: Frontend = request.app.state.frontend
    body = await read_json(request)
    check_model(body, fe.served_model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    if fe.tokenizer is None:
        raise bad_request("this server's worker has no tokenizer; chat needs one", "messages")
    prompt = render_chat(fe.chat_template, messages, fe.special_tokens,
                         add_generation_prompt=get_bool(body, "add_generation_prompt", True))
    ids = fe.check_ids(fe.tokenizer.encode(prompt, add_special_tokens=False), "messages")
    n = get_int(body, "n", 1, minimum=1)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_int(body, name, None, minimum=1)
    sp = openai_sampling(body, max_tokens=max_tokens if max_tokens is not None else fe.info.context_len,
                         max_tokens_name=name)
    n_top = None
    if get_bool(body, "logprobs", False):
        n_top = logprobs_wanted(fe, get_int(body, "top_logprobs", 0, minimum=0), "logprobs")
    elif body.get("top_logprobs") is not None:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    stream = get_bool(body, "stream", False)
    include_usage = stream_options(body)
    items = [Item(list(ids), sp, None, n_top) for _ in range(n)]
    fe.fit_max_tokens(items)
    group = fe.group(request, items, "chatcmpl", body)
    rid0 = items[0].rid
    cid = rid0 if rid0.startswith("chatcmpl-") else f"chatcmpl-{rid0}"
    created, model = int(time.time()), fe.served_model_name

    if not stream:
        await group.wait()
        finish_or_raise(items)
        choices = [{"index": it.index, "message": {"role": "assistant", "content": it.text.text},
                    "logprobs": chat_logprobs(fe, it, 0, n_top) if n_top is not None else None,
                    "finish_reason": it.finish} for it in items]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(items, len(ids))},
                            headers={"X-Request-Id": items[0].rid})

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra})

    async def gen() -> AsyncIterator[bytes]:
        sent_lp = {it.index: 0 for it in items}
        for it in items:
            yield chunk([{"index": it.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for it, delta in _guarded(group):
            if it is None:
                yield delta
                return
            if not delta and it.finish is None:
                continue
            if it.finish == "abort":
                yield sse(APIError(500, f"the request was aborted: {it.error}").body())
                yield DONE
                return
            lp = None
            if n_top is not None:
                lp = chat_logprobs(fe, it, sent_lp[it.index], n_top)
                sent_lp[it.index] = len(it.output_ids)
            yield chunk([{"index": it.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                          "finish_reason": it.finish}])
        if include_usage:
            yield chunk([], usage=usage(items, len(ids)))
        yield DONE

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"X-Request-Id": items[0].rid})
