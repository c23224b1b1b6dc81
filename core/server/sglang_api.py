"""SGLang-native routes, so SGLang's router and tools drive this server unchanged:
``/generate``, ``/server_info`` (``/get_server_info``), ``/model_info`` (``/get_model_info``),
``/get_load``, ``/health_generate``, ``/abort_request``.

``/generate`` streams SGLang's way: every event carries the whole text and ``output_ids`` so far,
and ``meta_info`` (prompt/completion token counts, finish reason ``{type, matched}`` or
``{type: "length", length}``, the request id); the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loopserve.core.server.errors import APIError, bad_request
from loopserve.core.server.frontend import Frontend, Item
from loopserve.core.server.openai_api import DONE, logprobs_wanted, read_json, sse
from loopserve.core.server.params import get_bool, get_int, sglang_sampling

router = APIRouter()


def finish_reason(it: Item) -> dict[str, Any] | None:
    if it.finish is None:
        return None
    if it.finish == "length":
        return {"type": "length", "length": len(it.output_ids)}
    if it.finish == "abort":
        return {"type": "abort", "message": it.error}
    return {"type": "stop", "matched": it.matched}


def result(it: Item, t0: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": it.rid,
        "prompt_tokens": len(it.input_ids),
        "completion_tokens": len(it.output_ids),
        "cached_tokens": it.cached_tokens,
        "finish_reason": finish_reason(it),
        "e2e_latency": time.perf_counter() - t0,
    }
    if it.top_logprobs is not None:
        meta["output_token_logprobs"] = [[lp, tid, None] for lp, tid in zip(it.logprobs, it.output_ids)]
        meta["output_top_logprobs"] = [[[lp, int(t), None] for t, lp in top] for top in it.top]
    if it.prompt_logprobs is not None:
        start = it.logprob_start
        meta["input_token_logprobs"] = [[lp, tid, None] for lp, tid in
                                        zip(it.prompt_logprobs[start:], it.input_ids[start:])]
        tops = (it.prompt_top or [])[start:]
        meta["input_top_logprobs"] = [None if lp is None else [[v, int(t), None] for t, v in top]
                                      for lp, top in zip(it.prompt_logprobs[start:], tops)]
    return {"text": it.text.text if it.text else "", "output_ids": list(it.output_ids), "meta_info": meta}


@router.post("/generate")
async def generate(request: Request) -> Any:
    fe: Frontend = request.app.state.frontend
    body = await read_json(request)
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise bad_request("send exactly one of text or input_ids", "text")
    batch = isinstance(text, list) or (isinstance(input_ids, list) and bool(input_ids)
                                       and all(isinstance(x, list) for x in input_ids))
    if text is not None:
        texts = text if isinstance(text, list) else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise bad_request("text must be a string or a non-empty list of strings", "text")
        prompts = [(t, fe.encode(t, "text")) for t in texts]
    else:
        id_lists = input_ids if batch else [input_ids]
        prompts = [(None, fe.check_ids(ids, "input_ids")) for ids in id_lists]
    raw_sp = body.get("sampling_params")
    if isinstance(raw_sp, list):
        if len(raw_sp) != len(prompts):
            raise bad_request(f"got {len(raw_sp)} sampling_params for {len(prompts)} prompts", "sampling_params")
        sps = [sglang_sampling(s) for s in raw_sp]
    else:
        sps = [sglang_sampling(raw_sp)] * len(prompts)
    n_top = None
    if get_bool(body, "return_logprob", False):
        n_top = logprobs_wanted(fe, get_int(body, "top_logprobs_num", 0, minimum=0), "top_logprobs_num")
    # SGLang's logprob_start_len: score the prompt from this position (-1, the default: no).
    start = get_int(body, "logprob_start_len", -1, minimum=-1)
    score = n_top is not None and start >= 0
    stream = get_bool(body, "stream", False)
    items = [Item(ids, sp, t, n_top, n_top if score else None) for (t, ids), sp in zip(prompts, sps)]
    for it in items:
        if score and start >= len(it.input_ids):
            raise bad_request(f"logprob_start_len must be below the prompt's length ({len(it.input_ids)}), "
                              f"got {start}", "logprob_start_len")
        it.logprob_start = max(start, 0)
    fe.fit_max_tokens(items)
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, (str, list)):
        raise bad_request("rid must be a string", "rid")
    if isinstance(rid, str) and "x-request-id" not in request.headers:
        request.scope["headers"] = list(request.scope["headers"]) + [(b"x-request-id", rid.encode())]
        request = Request(request.scope, request.receive)
    t0 = time.perf_counter()
    group = fe.group(request, items, "gen", body)

    if not stream:
        await group.wait()
        for it in items:
            if it.finish == "abort" and it.error and "client" not in it.error:
                raise APIError(503 if "died" in it.error else 500, f"the request was aborted: {it.error}")
        out = [result(it, t0) for it in items]
        return JSONResponse(out if batch else out[0], headers={"X-Request-Id": items[0].rid})

    async def gen() -> AsyncIterator[bytes]:
        try:
            async for it, delta in group.events():
                if not delta and it.finish is None and not it.output_ids:
                    continue
                body = result(it, t0)
                if batch:
                    body["index"] = it.index
                yield sse(body)
        except Exception as exc:  # noqa: BLE001 - the status line is out: report in the stream
            yield sse(APIError(500, f"internal error: {exc!r}").body())
        yield DONE

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"X-Request-Id": items[0].rid})


def server_info(fe: Frontend) -> dict[str, Any]:
    cfg, info = fe.config, fe.info
    return {
        "model_path": info.model_path,
        "tokenizer_path": info.model_path,
        "served_model_name": fe.served_model_name,
        "host": str(cfg.server.host),
        "port": int(cfg.server.port),
        "dp_size": 1,
        "tp_size": 1,
        "pp_size": int(cfg.parallel.pp_size),
        "context_length": info.context_len,
        "max_running_requests": info.max_running_requests,
        "max_total_num_tokens": info.kv_slots,
        "page_size": int(cfg.kv_cache.page_size),
        "chunked_prefill_size": int(cfg.scheduler.chunked_prefill_size),
        "disaggregation_mode": cfg.disaggregation.mode or "null",
        "loop": info.loop,
        "policy": info.policy,
        "worker": info.worker,
        "scheduler_pid": info.pid,
        # Objects each process moved out of the garbage collector's reach after starting
        # (core/server/heap.py): 0 means full collections still walk the whole startup heap.
        "gc_frozen_objects": {"frontend": fe.gc_frozen_objects, "scheduler": info.gc_frozen_objects},
        "version": _version(),
    }


def _version() -> str:
    from loopserve.core.telemetry import loopserve_version

    return loopserve_version()


@router.get("/server_info")
@router.get("/get_server_info")
async def get_server_info(request: Request) -> JSONResponse:
    return JSONResponse(server_info(request.app.state.frontend))


@router.get("/model_info")
@router.get("/get_model_info")
async def get_model_info(request: Request) -> JSONResponse:
    fe: Frontend = request.app.state.frontend
    mc = fe.model_config
    return JSONResponse({
        "model_path": fe.info.model_path,
        "tokenizer_path": fe.info.model_path,
        "served_model_name": fe.served_model_name,
        "model_type": mc.get("model_type"),
        "architectures": mc.get("architectures"),
        "is_generation": True,
        "context_length": fe.info.context_len,
        "vocab_size": fe.info.vocab_size,
    })


@router.get("/get_load")
async def get_load(request: Request) -> JSONResponse:
    fe: Frontend = request.app.state.frontend
    reply = await fe.client.ask("load", 5.0)
    if reply is None:
        raise APIError(503, "the scheduler process does not answer", headers={"Retry-After": "1"})
    load = reply.load
    return JSONResponse([{"dp_rank": 0, "num_reqs": load["num_running"] + load["num_waiting"],
                          "num_waiting_reqs": load["num_waiting"], "num_tokens": load["num_tokens"]}])


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """A one-token generation through the whole path (SGLang's deep health check)."""
    from loopserve.core.sched.sampling_params import SamplingParams

    fe: Frontend = request.app.state.frontend
    if fe.rooms is not None:
        # Disaggregated: a generation needs its other half; the scheduler's loop answering
        # (alive, its idle KV check passing) is the health here.
        reply = await fe.client.ask("health", 5.0)
        return Response(status_code=200 if reply is not None and reply.ok else 503)
    ids = [min(1, fe.info.vocab_size - 1)]
    item = Item(ids, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    try:
        group = fe.group(None, [item], "health")
    except APIError:
        return Response(status_code=503)
    try:
        async for _ in _bounded(group.events(), 20.0):
            pass
    except TimeoutError:
        group.close()
        return Response(status_code=503)
    return Response(status_code=200 if item.finish in ("stop", "length") else 503)


async def _bounded(it: AsyncIterator[Any], timeout: float) -> AsyncIterator[Any]:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            yield await asyncio.wait_for(it.__anext__(), left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise TimeoutError from None


@router.post("/abort_request")
async def abort_request(request: Request) -> JSONResponse:
    fe: Frontend = request.app.state.frontend
    body = await read_json(request)
    if get_bool(body, "abort_all", False):
        rids = list(fe.client.streams)
    else:
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise bad_request("rid must be the id of a request (or send abort_all: true)", "rid")
        rids = [r for r in fe.client.streams if r == rid or r.startswith(rid + "-")]
    for rid in rids:
        fe.client.abort(rid)
    return JSONResponse({"aborted": rids})
