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

    def result(self, timeout: float | None = None) -> RequestOutput:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.1):
            if self.engine._loop_error is not None:
                raise RuntimeError("the engine's loop failed") from self.engine._loop_error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.rid} did not finish within {timeout} s")
        return self.engine._make_output(self.req, self.prompt)


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
            self.scheduler.shutdown(f"the engine's loop failed: {exc!r}")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, abort what is still queued, release the worker. Idempotent."""
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
        if prompt is not None:
            prompts: list[Any] = _as_list(prompt)
            ids_list: list[Any] = [None] * len(prompts)
        else:
            assert input_ids is not None
            if not isinstance(input_ids, (list, tuple)):
                raise ValueError("input_ids must be a list of token ids, or a list of such lists")
            if input_ids and all(isinstance(t, int) for t in input_ids):
                ids_list = [list(input_ids)]
            else:
                # A non-list item is left as is for _validate_ids to reject with a ValueError.
                ids_list = [list(x) if isinstance(x, (list, tuple)) else x for x in input_ids]
            prompts = [None] * len(ids_list)
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given; pass at least one prompt")
        if sampling_params is None:
            sps = [SamplingParams() for _ in range(n)]
        elif isinstance(sampling_params, SamplingParams):
            sps = [sampling_params] * n
        else:
            sps = list(sampling_params)
            if len(sps) != n:
                raise ValueError(f"got {len(sps)} sampling_params for {n} prompts; pass one, or one per prompt")
        priorities = priority if isinstance(priority, list) else [priority] * n
        if len(priorities) != n:
            raise ValueError(f"got {len(priorities)} priorities for {n} prompts; pass one, or one per prompt")
        addrs = self._bootstrap_addrs(n, bootstrap_host, bootstrap_port, bootstrap_room)
        handles = self._submit_many(list(zip(prompts, ids_list, sps, [None] * n)), traceparent, priorities, addrs)
        return [h.result(timeout) for h in handles]

    def abort(self, rid: str) -> None:
        """Abort a queued or running request; its output ends with finish_reason 'abort'."""
        self.scheduler.abort(rid)

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

    def _submit_many(self, items: list[tuple[Any, Any, SamplingParams, str | None]],
                     traceparent: str | None, priorities: list[int],
                     addrs: list[Any] | None = None) -> list[RequestHandle]:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._loop_error is not None:
            raise RuntimeError("the engine's loop failed") from self._loop_error
        prepared = []
        # Validate everything first: a bad item rejects the call before anything is queued.
        for prompt, ids, sp, rid in items:
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            if prompt is not None:
                if not isinstance(prompt, str):
                    raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
                if prompt == "":
                    raise ValueError("the prompt is empty; send at least one character")
                if self.tokenizer is None:
                    raise ValueError("this worker has no tokenizer; pass input_ids instead of text")
                ids = self.tokenizer.encode(prompt)
            self._validate_ids(ids)
            prepared.append((prompt, ids, sp, rid))
        handles = []
        addrs = addrs or [None] * len(prepared)
        for (prompt, ids, sp, rid), prio, addr in zip(prepared, priorities, addrs):
            if not isinstance(prio, int) or isinstance(prio, bool):
                raise ValueError(f"priority must be an integer, got {prio!r}")
            req = Req(rid=rid or f"req-{self._rid_tag}-{next(self._ids)}", input_ids=list(ids),
                      sampling_params=sp, traceparent=traceparent, priority=prio, bootstrap=addr)
            handle = RequestHandle(self, req, prompt)
            req.on_update = handle._on_update
            handles.append(handle)
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
        self.scheduler.submit(*(h.req for h in handles))
        return handles

    def _validate_ids(self, ids: Any) -> None:
        # C-level passes (set/map/min/max): a burst of long prompts is validated in the
        # caller's thread before anything is queued, so this must not cost much per token.
        if not isinstance(ids, list) or (set(map(type, ids)) - {int} and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ValueError("input_ids must be a list of integers")
        if not ids:
            raise ValueError("the prompt is empty; send at least one token")
        vocab = getattr(self.worker, "vocab_size", None)
        if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(t for t in ids if t < 0 or t >= vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab}); check the tokenizer")
        ctx = self.scheduler.context_len
        if len(ids) >= ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context length is {ctx}; "
                             "shorten the prompt (at most context length - 1 tokens)")
        slots = self.scheduler.allocator.num_slots
        if len(ids) + 1 > slots:
            raise ValueError(f"the prompt has {len(ids)} tokens but the KV cache holds only {slots}; "
                             "raise kv_cache.num_tokens")

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
