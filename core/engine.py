"""``Engine``: the offline Python API. It runs the same scheduler and loop plugin as the server,
in a background thread of this process, and turns prompts into ``RequestOutput`` objects.

Input is validated in the caller's thread before anything is queued, so a bad request raises
``ValueError`` and never disturbs the requests already running.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig

from loopserve.core.loop import EventLoop
from loopserve.core.loop.build import build
from loopserve.core.sched.req import FinishKind, Req
from loopserve.core.sched.sampling_params import SamplingParams
from loopserve.core.sched.scheduler import Scheduler
from loopserve.core.sched.validation import (
    check_input_ids, check_priority, check_prompt, check_rid, check_timeout, check_traceparent)
from loopserve.core.telemetry import Telemetry


@dataclass
class RequestMetrics:
    arrival_time: float  # wall clock (time.time())
    queue_time_s: float | None = None
    time_to_first_token_s: float | None = None
    e2e_latency_s: float | None = None


@dataclass
class RequestOutput:
    rid: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    matched_stop: int | str | None = None
    error: str | None = None  # why a request was aborted
    num_cached_tokens: int = 0  # prompt tokens reused from the radix prefix cache
    metrics: RequestMetrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RequestHandle:
    """A submitted request: wait for it with ``result()``, cancel it with ``Engine.abort``."""

    def __init__(self, engine: "Engine", req: Req, prompt: str | None) -> None:
        self.engine = engine
        self.req = req
        self.prompt = prompt
        self._done = threading.Event()

    @property
    def rid(self) -> str:
        return self.req.rid

    def done(self) -> bool:
        return self._done.is_set()

    def _on_update(self, req: Req) -> None:
        if req.finished:
            self._done.set()
            self.engine._forget(self)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the output. Wakes on completion, on the engine's shutdown or loop failure
        (RuntimeError) and on ``timeout`` (TimeoutError; the request is aborted then)."""
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.wait(deadline):
            self.engine.abort(self.rid, "the caller's timeout expired")
            raise TimeoutError(f"request {self.rid} did not finish within {timeout} s; it was aborted")
        return self.engine._make_output(self.req, self.prompt)

    def wait(self, deadline: float | None) -> bool:
        """Block until done (True) or ``deadline`` (``time.monotonic()``) passes (False)."""
        engine = self.engine
        while True:
            step = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if step <= 0:
                return self._done.is_set()
            if self._done.wait(step):
                return True
            if engine._loop_error is not None:
                if self._done.is_set():
                    # NOTE: the loop may finish this request (e.g. fail its batch with the
                    # stage's error) just before it fails; the request's own outcome wins.
                    return True
                raise RuntimeError("the engine's loop failed") from engine._loop_error
            if engine._closed and not engine._thread.is_alive() and not self._done.is_set():
                # Shut down, and the teardown did not (or could not) finish this request.
                raise RuntimeError(f"the engine shut down before request {self.rid} finished")


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Engine:
    """Offline inference with any loop, policy and worker plugin.

    >>> with Engine(overrides=["loop=normal"]) as engine:
    ...     outs = engine.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0))
    """

    def __init__(
        self,
        overrides: Iterable[str] | None = None,
        *,
        config: DictConfig | None = None,
        plugins: Iterable[tuple[str, object]] = (),
        tracer_provider: Any = None,
    ) -> None:
        """:param tracer_provider: an OpenTelemetry ``TracerProvider`` to send spans to instead
            of the one ``tracing.exporter`` would build (tracing is then on whatever the
            exporter says); the caller keeps it: the engine flushes it on shutdown but does
            not shut it down."""
        self._built = build(overrides, config=config, plugins=plugins, tracer_provider=tracer_provider)
        self.pm = self._built.pm
        self.config = self._built.config
        self.worker = self._built.worker
        self.tokenizer = getattr(self.worker, "tokenizer", None)
        self.telemetry: Telemetry = self._built.telemetry
        self.scheduler: Scheduler = self._built.scheduler
        self.loop: EventLoop = self._built.loop
        self._loop_error: BaseException | None = None
        self._closed = False
        # Guards _closed against submissions (a submit racing shutdown is either queued before
        # the teardown aborts the queue, or rejected) and the ids of live requests.
        self._lock = threading.Lock()
        self._live: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._rid_tag = uuid.uuid4().hex[:8]  # request ids unique across engines, cheap per request
        self._thread = threading.Thread(target=self._run_loop, name="loopserve-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle
    def _run_loop(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting caller
            self._loop_error = exc
            try:
                self.scheduler.shutdown(f"the engine's loop failed: {exc!r}")
            except BaseException:  # noqa: BLE001 - waiters see _loop_error anyway
                pass

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, abort what is still queued, release the worker. Idempotent; callers
        blocked in ``generate``/``result`` return (aborted outputs) or raise promptly."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.loop.stop()
        self._thread.join(timeout)
        self._built.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def loop_name(self) -> str:
        return self.loop.name

    def get_stats(self) -> dict[str, Any]:
        """Counters since start: prompt tokens computed vs reused, cache hit rate, ..."""
        s = self.scheduler.stats
        return {
            "prompt_tokens": s.num_prompt_tokens,
            "prompt_tokens_computed": s.num_prefill_tokens,
            "prompt_tokens_reused": s.num_cached_prompt_tokens,
            "cache_hit_rate": s.cache_hit_rate,
            "generated_tokens": s.num_generated_tokens,
            "finished_requests": s.num_finished,
            "aborted_requests": s.num_aborted,
            "retractions": s.num_retractions,
            "preemptions": s.num_preemptions,
            "plugin_errors": s.num_plugin_errors,
            "forwards": s.num_forwards,
            "forward_time_s": s.forward_time_s,
            "kv_usage": self.scheduler.kv_usage(),
            "cached_kv_pages": self.scheduler.kv.cached_pages,
        }

    def metrics(self) -> str:
        """Prometheus text exposition of this engine's metrics (its own registry, not the
        global one); "" with ``metrics.enabled=false``."""
        return self.telemetry.metrics_text()

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        input_ids: list[int] | None = None,
        rid: str | None = None,
        traceparent: str | None = None,
        priority: int = 0,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
    ) -> RequestHandle:
        """Queue one request and return at once. With ``disaggregation.mode`` set, the
        ``bootstrap_*`` arguments pair it with its other half (see ``generate``)."""
        addrs = self._bootstrap_addrs(1, bootstrap_host, bootstrap_port, bootstrap_room)
        return self._submit_many([(prompt, input_ids, sampling_params or SamplingParams(), rid)],
                                 traceparent, [priority], addrs)[0]

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        input_ids: list[int] | list[list[int]] | None = None,
        traceparent: str | None = None,
        timeout: float | None = None,
        priority: int | list[int] = 0,
        bootstrap_host: str | list[str] | None = None,
        bootstrap_port: int | list[int] | None = None,
        bootstrap_room: int | list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts (text or token ids); blocks until all finish.

        :param prompt: one prompt or a list of them.
        :param sampling_params: one for all requests, or one per request.
        :param input_ids: token ids instead of text: a list of ints or a list of lists.
        :param traceparent: W3C trace context that request spans are parented on.
        :param priority: for ``policy=priority``: one value for all, or one per request
            (higher runs first).
        :param bootstrap_host: disaggregated serving (``disaggregation.mode``): the prefill
            server's host, its bootstrap port (``bootstrap_port``) and the room id pairing the
            two halves of each request (``bootstrap_room``, one per prompt, unique while in
            flight); one value for all or one per prompt. Send the same call to the prefill
            and the decode engine; the decode engine's outputs are the completions.
        :raises ValueError: on bad input; nothing of the call is queued then.
        """
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt (text) or input_ids (token ids)")
        timeout = check_timeout(timeout)
        if prompt is not None:
            prompts: list[Any] = _as_list(prompt)
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ValueError(f"prompt[{i}] must be a string, got {type(p).__name__} {p!r}")
            ids_list: list[Any] = [None] * len(prompts)
        else:
            assert input_ids is not None
            if not isinstance(input_ids, (list, tuple)):
                raise ValueError("input_ids must be a list of token ids, or a list of such lists")
            if input_ids and not any(isinstance(t, (list, tuple)) for t in input_ids):
                ids_list = [list(input_ids)]  # one prompt; its items are checked as token ids
            else:
                # A non-list item is left as is for check_input_ids to reject with a ValueError.
                ids_list = [list(x) if isinstance(x, (list, tuple)) else x for x in input_ids]
            prompts = [None] * len(ids_list)
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given; pass at least one prompt")
        if sampling_params is None:
            sps = [SamplingParams() for _ in range(n)]
        elif isinstance(sampling_params, (SamplingParams, dict)):
            sps = [sampling_params] * n
        elif not isinstance(sampling_params, (list, tuple)):
            raise ValueError(f"sampling_params must be SamplingParams or a list of them, got "
                             f"{type(sampling_params).__name__}")
        else:
            sps = list(sampling_params)
            if len(sps) != n:
                raise ValueError(f"got {len(sps)} sampling_params for {n} prompts; pass one, or one per prompt")
        priorities = priority if isinstance(priority, list) else [priority] * n
        if len(priorities) != n:
            raise ValueError(f"got {len(priorities)} priorities for {n} prompts; pass one, or one per prompt")
        addrs = self._bootstrap_addrs(n, bootstrap_host, bootstrap_port, bootstrap_room)
        handles = self._submit_many(list(zip(prompts, ids_list, sps, [None] * n)), traceparent, priorities, addrs)
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            for h in handles:
                if not h.wait(deadline):
                    raise TimeoutError(f"{sum(not x.done() for x in handles)} of {n} requests did not finish "
                                       f"within {timeout} s; they were aborted")
            finished = True
        finally:
            if not finished:  # timeout, shutdown, loop failure, KeyboardInterrupt: abort the rest
                for h in handles:
                    if not h.done():
                        self.abort(h.rid, "the caller stopped waiting (timeout or error)")
        return [self._make_output(h.req, h.prompt) for h in handles]

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        """Abort a queued or running request; its output ends with finish_reason 'abort'."""
        if not self._closed:
            self.scheduler.abort(rid, message)

    def _forget(self, handle: RequestHandle) -> None:
        with self._lock:
            if self._live.get(handle.rid) is handle:
                del self._live[handle.rid]

    def _bootstrap_addrs(self, n: int, host: Any, port: Any, room: Any) -> list[Any]:
        """One ``BootstrapAddr`` per request in disaggregated mode (None otherwise)."""
        if self.config.disaggregation.mode is None:
            return [None] * n
        from loopserve.core.disagg.base import BootstrapAddr

        fields = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ValueError(f"disaggregation.mode={self.config.disaggregation.mode}: every request needs "
                             f"bootstrap_host, bootstrap_port and bootstrap_room; missing {', '.join(missing)}")
        per: dict[str, list[Any]] = {}
        for key, value in fields.items():
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"got {len(values)} values of {key} for {n} prompts; pass one, or one per prompt")
            per[key] = values
        addrs = [BootstrapAddr.parse(h, p, r) for h, p, r in
                 zip(per["bootstrap_host"], per["bootstrap_port"], per["bootstrap_room"])]
        if len({a.room for a in addrs}) != n:
            raise ValueError("bootstrap_room must differ between the requests of one call")
        return addrs

    def _submit_many(self, items: list[tuple[Any, Any, Any, Any]],
                     traceparent: Any, priorities: list[Any],
                     addrs: list[Any] | None = None) -> list[RequestHandle]:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._loop_error is not None:
            raise RuntimeError("the engine's loop failed") from self._loop_error
        traceparent = check_traceparent(traceparent)
        vocab = getattr(self.worker, "vocab_size", None)
        ctx, slots = self.scheduler.context_len, self.scheduler.allocator.num_slots
        many = len(items) > 1
        prepared = []
        # Validate everything first: a bad item rejects the call before anything is queued.
        for i, ((prompt, ids, sp, rid), prio) in enumerate(zip(items, priorities)):
            at = f"[{i}]" if many else ""
            if isinstance(sp, dict):
                sp = SamplingParams.from_dict(sp)
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params{at} must be SamplingParams, got {type(sp).__name__}")
            sp.validate(vocab)  # again: fields may have been changed since construction
            rid = check_rid(rid)
            prio = check_priority(prio, f"priority{at}")
            if prompt is not None:
                check_prompt(prompt, f"prompt{at}")
                if self.tokenizer is None:
                    raise ValueError("this worker has no tokenizer; pass input_ids instead of text")
                ids = self.tokenizer.encode(prompt)
            ids = check_input_ids(ids, vocab_size=vocab, context_len=ctx, kv_slots=slots, name=f"input_ids{at}")
            prepared.append((prompt, ids, sp, rid, prio))
        handles = []
        addrs = addrs or [None] * len(prepared)
        for (prompt, ids, sp, rid, prio), addr in zip(prepared, addrs):
            req = Req(rid=rid or f"req-{self._rid_tag}-{next(self._ids)}", input_ids=ids,
                      sampling_params=sp, traceparent=traceparent, priority=prio, bootstrap=addr)
            handle = RequestHandle(self, req, prompt)
            req.on_update = handle._on_update
            handles.append(handle)
        with self._lock:
            # Checked again under the lock: a shutdown that started while this call validated
            # has aborted the queue already, so nothing may be queued after it.
            if self._closed:
                raise RuntimeError("the engine is shut down")
            rids = [h.rid for h in handles]
            dup = next((r for r in rids if r in self._live), None)
            if dup is None and len(set(rids)) < len(rids):
                dup = next(r for r in rids if rids.count(r) > 1)
            if dup is not None:
                raise ValueError(f"request id {dup!r} is already in use by a live request; use a unique rid")
            rooms = getattr(self.scheduler, "rooms", None)
            if rooms is not None and addrs[0] is not None:
                claimed = []
                try:
                    for h in handles:  # a room in use rejects the call before anything is queued
                        rooms.claim(h.req.bootstrap, h.req.rid)
                        claimed.append(h.req.bootstrap.room)
                except ValueError:
                    for room in claimed:
                        rooms.release(room)
                    raise
            for h in handles:
                self._live[h.rid] = h
            self.scheduler.submit(*(h.req for h in handles))
        return handles

    def _make_output(self, req: Req, prompt: str | None) -> RequestOutput:
        reason = req.finished_reason
        text = ""
        if self.tokenizer is not None and req.output_ids:
            text = self.tokenizer.decode(req.output_ids, skip_special_tokens=req.sampling_params.skip_special_tokens)
            if reason is not None and isinstance(reason.matched, str):
                cut = text.find(reason.matched)
                if cut >= 0:
                    text = text[:cut]
        metrics = RequestMetrics(arrival_time=req.wall_arrival_time)
        if req.schedule_time is not None:
            metrics.queue_time_s = req.schedule_time - req.arrival_time
        if req.first_token_time is not None:
            metrics.time_to_first_token_s = req.first_token_time - req.arrival_time
        if req.finish_time is not None:
            metrics.e2e_latency_s = req.finish_time - req.arrival_time
        return RequestOutput(
            rid=req.rid,
            prompt=prompt,
            prompt_token_ids=list(req.input_ids),
            token_ids=list(req.output_ids),
            text=text,
            finish_reason=None if reason is None else reason.kind.value,
            matched_stop=None if reason is None else reason.matched,
            error=reason.message if reason is not None and reason.kind is FinishKind.ABORT else None,
            num_cached_tokens=req.num_cached_tokens,
            metrics=metrics,
        )
