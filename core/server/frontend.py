"""What every HTTP route shares: the scheduler client, the tokenizer, prompt validation, the
queue limit, and ``RequestGroup`` (the requests of one HTTP call, their outputs merged in
arrival order, aborted together if the client goes away)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from loopserve.core.sched.sampling_params import SamplingParams
from loopserve.core.server import protocol as P
from loopserve.core.server.client import SchedulerClient, SchedulerDied
from loopserve.core.server.errors import APIError, bad_request
from loopserve.core.server.output_text import OutputText

DISCONNECT_POLL_S = 0.5


@dataclass
class Item:
    """One generation: its prompt ids, sampling and (when streamed) its text so far."""

    input_ids: list[int]
    sp: SamplingParams
    prompt_text: str | None = None
    top_logprobs: int | None = None
    # Score the prompt too, with this many alternatives per position (echo + logprobs, or
    # SGLang's logprob_start_len); None = no.
    prompt_top_logprobs: int | None = None
    index: int = 0
    rid: str = ""
    text: OutputText | None = None
    finish: str | None = None
    matched: Any = None
    error: str | None = None
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top: list[Any] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # per prompt position, None for the first
    prompt_top: list[Any] | None = None
    logprob_start: int = 0  # SGLang's logprob_start_len: the first prompt position reported
    num_new: int = 0  # tokens the latest output brought (a step's worth)
    bootstrap: Any = None  # disaggregated mode: the BootstrapAddr pairing prefill and decode

    @property
    def output_ids(self) -> list[int]:
        assert self.text is not None
        return self.text.output_ids


class RequestGroup:
    """The requests one HTTP call submitted. ``events()`` yields ``(item, delta_text)`` as
    outputs arrive; on exit (normal, error or cancellation) unfinished requests are aborted."""

    def __init__(self, frontend: "Frontend", items: list[Item], http_request: Any) -> None:
        self.frontend = frontend
        self.items = items
        self.http_request = http_request
        self.queue: asyncio.Queue[P.ReqOutput] = asyncio.Queue()
        self.by_rid = {it.rid: it for it in items}
        self.streams: list[Any] = []

    def start(self, traceparent: str | None) -> None:
        fe = self.frontend
        for it in self.items:
            it.text = OutputText(fe.tokenizer, it.input_ids, skip_special_tokens=it.sp.skip_special_tokens,
                                 stops=it.sp.stop)
        for it in self.items:
            if it.top_logprobs is not None and it.sp.logprobs != it.top_logprobs:
                it.sp = dataclasses.replace(it.sp, logprobs=it.top_logprobs)
            if it.prompt_top_logprobs is not None and it.sp.prompt_logprobs != it.prompt_top_logprobs:
                it.sp = dataclasses.replace(it.sp, prompt_logprobs=it.prompt_top_logprobs)
        msgs = [P.Generate(it.rid, it.input_ids, fe.sampling_dict(it.sp), traceparent,
                           bootstrap=None if it.bootstrap is None else
                           [it.bootstrap.host, it.bootstrap.port, it.bootstrap.room])
                for it in self.items]
        try:
            self.streams = fe.client.submit(msgs, self.queue)
        except SchedulerDied as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "1"}) from None

    async def events(self) -> AsyncIterator[tuple[Item, str]]:
        left = len(self.items)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while left:
                # A client that went away is noticed within DISCONNECT_POLL_S even while
                # outputs keep coming (a stream's own send fails sooner; this covers the rest).
                if self.http_request is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await self.http_request.is_disconnected():
                        return
                # NOTE: the common case (outputs already queued) takes no timer and no task.
                if self.queue.empty():
                    try:
                        first = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if self.http_request is not None and await self.http_request.is_disconnected():
                            return
                        continue
                else:
                    first = self.queue.get_nowait()
                # Everything that queued up meanwhile becomes one event per request: a client
                # that reads slower than the loop steps gets fewer, larger chunks, not a backlog.
                outs = [first]
                while not self.queue.empty():
                    outs.append(self.queue.get_nowait())
                ready: dict[str, tuple[Item, list[str]]] = {}
                for out in outs:
                    it = self.by_rid.get(out.rid)
                    if it is None or it.finish is not None:
                        continue
                    left -= self._apply(it, out, ready)
                for it, deltas in ready.values():
                    yield it, "".join(deltas)
        finally:
            self.close()

    def _apply(self, it: Item, out: P.ReqOutput, ready: dict[str, tuple[Item, list[str]]]) -> int:
        """Take one output into ``it``; 1 if it finished the request."""
        assert it.text is not None
        entry = ready.get(it.rid)
        if entry is None:
            entry = ready[it.rid] = (it, [])
            it.num_new = 0
        # NOTE: a final output's text is cut at its stop string before anything is shown.
        entry[1].append(it.text.add(out.new_ids, emit=out.finish is None))
        it.num_new += len(out.new_ids)
        if out.prompt_logprobs is not None:
            it.prompt_logprobs, it.prompt_top = out.prompt_logprobs, out.prompt_top_logprobs
        if out.logprobs is not None:
            it.logprobs.extend(out.logprobs)
            it.top.extend(out.top_logprobs or [[] for _ in out.logprobs])
        if out.finish is None:
            return 0
        entry[1].append(it.text.finish(out.matched))
        it.finish, it.matched, it.error = out.finish, out.matched, out.error
        it.cached_tokens = out.cached_tokens
        for s in self.streams:
            if s.rid == out.rid:
                s.finished = True
        return 1

    async def wait(self) -> list[Item]:
        async for _ in self.events():
            pass
        return self.items

    def close(self) -> None:
        for s in self.streams:
            s.close()
        if self.frontend.rooms is not None:
            self.frontend.rooms.release([it.bootstrap for it in self.items if it.bootstrap is not None])
            for it in self.items:
                it.bootstrap = None


class Frontend:
    """Shared state of the HTTP app, created once the scheduler process is ready."""

    def __init__(self, client: SchedulerClient, config: Any) -> None:
        self.client = client
        self.config = config
        info = client.info
        assert info is not None
        self.info = info
        self.gc_frozen_objects = 0  # set by the launcher once the process has started (core/server/heap.py)
        self.tokenizer = None
        if info.has_tokenizer and info.model_path:
            from loopserve.core.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(info.model_path)
        sc = config.server
        self.served_model_name = str(sc.served_model_name or config.model.served_name
                                     or (os.path.basename(os.path.normpath(info.model_path)) if config.model.path else None)
                                     or "loopserve-tiny")
        from loopserve.core.server.chat_template import load_chat_template

        self.chat_template, self.special_tokens = load_chat_template(info.model_path)
        self.max_queued = sc.max_queued_requests
        self.rooms = None
        if config.disaggregation.mode is not None:
            from loopserve.core.server.disagg import Rooms

            self.rooms = Rooms()
        self.start_time = time.time()
        self.model_config = {}
        if info.model_path and os.path.isfile(os.path.join(info.model_path, "config.json")):
            with open(os.path.join(info.model_path, "config.json"), encoding="utf-8") as f:
                self.model_config = json.load(f)

    @staticmethod
    def sampling_dict(sp: SamplingParams) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(sp)

    def new_rid(self, http_request: Any, prefix: str) -> str:
        given = http_request.headers.get("x-request-id") if http_request is not None else None
        return self.client.fresh_rid(given or f"{prefix}-{uuid.uuid4().hex}")

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str, field_name: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(f"this server's worker has no tokenizer; send token ids instead of text in {field_name}",
                              field_name)
        if text == "":
            raise bad_request(f"{field_name} is empty; send at least one character", field_name)
        try:
            return self.tokenizer.encode(text)
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates
            raise bad_request(f"{field_name} could not be tokenized: {exc}", field_name) from None

    def check_ids(self, ids: Any, field_name: str) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad_request(f"{field_name} must be a list of integer token ids", field_name)
        if not ids:
            raise bad_request(f"{field_name} is empty; send at least one token", field_name)
        vocab = self.info.vocab_size
        bad = next((t for t in ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} in {field_name} is outside the vocabulary [0, {vocab})", field_name)
        ctx = self.info.context_len
        if len(ids) >= ctx:
            raise bad_request(f"{field_name} has {len(ids)} tokens but the model's context length is {ctx}; "
                              "shorten the prompt", field_name)
        if len(ids) + 1 > self.info.kv_slots:
            raise bad_request(f"{field_name} has {len(ids)} tokens but the KV cache holds only "
                              f"{self.info.kv_slots}", field_name)
        return ids

    def fit_max_tokens(self, items: Sequence[Item]) -> None:
        """Cap max_new_tokens at what the context leaves (unset max_tokens means "up to the end")."""
        ctx = self.info.context_len
        for it in items:
            room = ctx - len(it.input_ids)
            if it.sp.max_new_tokens > room:
                it.sp = SamplingParams(**{**self.sampling_dict(it.sp), "max_new_tokens": room})

    # ------------------------------------------------------------------ admission
    def check_capacity(self, n: int) -> None:
        if self.client.dead:
            raise APIError(503, "the scheduler process died; the server cannot take requests",
                           headers={"Retry-After": "5"})
        if self.client.stopping:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.max_queued is not None and self.client.num_queued + n > int(self.max_queued):
            raise APIError(429, f"too many queued requests (server.max_queued_requests={self.max_queued}); "
                           "retry later", code="too_many_requests", headers={"Retry-After": "1"})

    def group(self, http_request: Any, items: list[Item], prefix: str,
              body: dict[str, Any] | None = None) -> RequestGroup:
        """Submit ``items`` as one group. In disaggregated mode ``body`` carries the bootstrap
        fields (400 when missing, malformed or a room is in use)."""
        addrs = None
        if self.rooms is not None:
            from loopserve.core.server.disagg import bootstrap_addrs

            addrs = bootstrap_addrs(self.config, body or {}, len(items))
        self.check_capacity(len(items))
        base = self.new_rid(http_request, prefix)
        for i, it in enumerate(items):
            it.index = i
            it.rid = base if len(items) == 1 else self.client.fresh_rid(f"{base}-{i}")
        if addrs is not None:
            self.rooms.claim(addrs, [it.rid for it in items])
            for it, addr in zip(items, addrs):
                it.bootstrap = addr
        group = RequestGroup(self, items, http_request)
        traceparent = http_request.headers.get("traceparent") if http_request is not None else None
        group.start(traceparent)
        return group
