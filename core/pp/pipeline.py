"""``PipelineWorker``: rank 0's view of the whole pipeline as one worker.

The scheduler on rank 0 is the only real one: it admits requests, hands out KV slots and
request rows, retracts and aborts, and every micro-batch's ``ForwardBatch`` carries those
decisions down the pipeline. Every stage has a KV pool of the same size for its own layers,
and every stage runs the micro-batches in the same order, so a slot that rank 0 frees and
hands to a later micro-batch is overwritten at each stage only after the earlier micro-batch
has used it there: rank 0's books are right for every stage.

Two threads keep the pipeline full: the *launch* thread runs stage 0's layers for a
micro-batch and starts its sends to rank 1 (metadata, hidden states); the *receive* thread
waits, oldest first, for the tokens the last stage sends back and completes the
micro-batch's future. ``submit`` returns at once, so up to ``pp_size`` micro-batches (plus
the async depth) are in flight; ``forward_batch`` is the synchronous form for plain loops.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Callable

from loopserve.core.pp.split import Placement, placement, split_layers
from loopserve.core.pp.stage import stage_main, stage_tracing_spec
from loopserve.core.pp.future import PPFuture, StageError
from loopserve.core.pp.wire import Link, wants_extras
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardResult

# Loading a large stage's weights takes minutes; a stage that dies while loading is noticed
# at once (its exit code, or the error it leaves in the store), so this only bounds a hang.
STARTUP_TIMEOUT_S = 600.0


def _listen(place: Placement) -> socket.socket:
    """Rank 0's rendezvous socket, bound before anything starts (a busy port is a ValueError)."""
    host = place.host if place.port is not None else "127.0.0.1"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, place.port or 0))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ValueError(f"parallel.dist_init_addr={host}:{place.port} cannot be bound ({exc.strerror}); "
                         "pick a free port (or leave dist_init_addr unset on a single node)") from None
    return sock


class PipelineWorker:
    """The pipeline behind the ``Worker`` interface (rank 0's stage plus the stage processes).

    :param make_stage0: builds rank 0's own stage worker given ``(layer_range, kv_size_layers)``.
    :param stage_spec: what a stage process needs to build its worker (``worker``,
        ``worker_kwargs``); rank, layers and addresses are filled in here.
    """

    def __init__(self, config: Any, num_layers: int, make_stage0: Callable[[tuple[int, int], int], Any],
                 stage_spec: dict[str, Any]) -> None:
        par = config.parallel
        self.place = placement(par)
        if self.place.node_rank != 0:
            raise ValueError("PipelineWorker runs on node 0; other nodes run their stages only")
        pp_layers = par.get("pp_layers") if hasattr(par, "get") else None
        self.bounds = split_layers(num_layers, self.place.pp_size, list(pp_layers) if pp_layers else None)
        self.pp_size = self.place.pp_size
        self.timeout_s = float(par.stage_timeout_s)
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.stage: Any = None
        self.disagg: dict[str, Any] | None = None
        self._propagator: Any = None
        self.link: Link | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._next_mb = 0
        self._threads: list[threading.Thread] = []
        self._launch_q: queue.SimpleQueue[PPFuture | None] = queue.SimpleQueue()
        self._recv_q: queue.SimpleQueue[PPFuture | None] = queue.SimpleQueue()
        self.busy_s = 0.0  # stage 0's compute time
        self.forwards = 0
        self.start_time = time.perf_counter()
        sock = _listen(self.place)
        port = sock.getsockname()[1]
        import torch.distributed as dist

        try:
            self.store = dist.TCPStore(self.place.host, port, None, True, timedelta(seconds=STARTUP_TIMEOUT_S),
                                       wait_for_workers=False, master_listen_fd=sock.fileno(), use_libuv=True)
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store owns the listening socket now
        self.addr = f"{self.place.host}:{port}"
        try:
            ctx = multiprocessing.get_context("spawn")
            # Stages on one host share its cores: each stage process gets its share of them
            # (on the CPU more OpenMP threads than cores make every op wait for wake-ups).
            threads = max(1, (os.cpu_count() or 1) // len(self.place.local_ranks))
            from loopserve.core.disagg.staged import stage_disagg_spec

            self.disagg = stage_disagg_spec(config, self.bounds)
            tracing = stage_tracing_spec(config)
            self._propagator = None
            if tracing is not None:
                from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

                self._propagator = TraceContextTextMapPropagator()
            for rank in self.place.local_ranks[1:]:
                spec = dict(stage_spec, disagg=self.disagg, tracing=tracing, rank=rank, size=self.pp_size,
                            host=self.place.host, port=port, layer_range=self.bounds[rank], timeout_s=self.timeout_s,
                            startup_timeout_s=STARTUP_TIMEOUT_S, num_threads=threads)
                proc = ctx.Process(target=stage_main, args=(spec, os.getpid()), name=f"loopserve-pp-{rank}",
                                   daemon=True)
                proc.start()
                self.procs.append(proc)
            max_layers = max(e - s for s, e in self.bounds)
            self.stage = make_stage0(self.bounds[0], max_layers)
            self.store.set("kv_slots", str(self.stage.num_kv_slots))
            self._wait_loaded()
            self.link = Link(self.store, 0, self.pp_size, self.place.host, self.timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._threads = [threading.Thread(target=target, name=f"loopserve-pp-{name}", daemon=True)
                         for name, target in (("launch", self._launch_loop), ("receive", self._recv_loop))]
        for t in self._threads:
            t.start()

    # ---- the Worker interface -------------------------------------------------------------

    @property
    def context_len(self) -> int:
        return self.stage.context_len

    @property
    def num_kv_slots(self) -> int:
        return self.stage.num_kv_slots

    @property
    def vocab_size(self) -> int:
        return self.stage.vocab_size

    @property
    def eos_token_ids(self) -> Any:
        return self.stage.eos_token_ids

    @property
    def model_path(self) -> str | None:
        return getattr(self.stage, "model_path", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.stage, "tokenizer", None)

    @property
    def supports_logprobs(self) -> bool:
        """The last stage computes them and sends them back with the tokens."""
        return bool(getattr(self.stage, "supports_logprobs", False))

    def kv_buffers(self) -> Any:
        """Stage 0's KV buffers for a KV-transfer backend, with the whole pipeline's layer
        split (None: the stages' worker has no KV data to move)."""
        own = getattr(self.stage, "kv_buffers", None)
        if own is None or self.disagg is None:
            return None
        args = own()
        args.split = [tuple(b) for b in self.bounds]
        return args

    def kv_transfer_stages(self, local: Any) -> Any:
        """Rank 0's KV manager ``local`` joined by every other stage's (core/disagg/staged.py)."""
        from loopserve.core.disagg.staged import StagedKVManager

        return StagedKVManager(local, self.store, self.place.host if self.place.port is not None else "127.0.0.1",
                               self.pp_size)

    def forward_batch(self, fb: ForwardBatch) -> ForwardResult:
        """Run one micro-batch through every stage and wait for its tokens."""
        return self.submit(fb).wait(self.timeout_s * self.pp_size)

    def launch_batch(self, fb: ForwardBatch, job: Any) -> None:
        """The runner's asynchronous launch (core/loop/runner.py): returns at once. Stage 0
        runs on the launch thread after the job's placeholders are resolved, and sets the
        job's ``launch_done``; ``job.run`` completes it on the receive thread once the last
        stage's tokens are back, so up to ``pp_size`` micro-batches are in flight."""
        fut = self.submit(fb, job)
        job.entry.batch.mb_id = fut.mb_id  # tracing: the micro-batch id on the batch's spans

    @property
    def error(self) -> BaseException | None:
        """Why the pipeline failed (a stage died, hung or raised), or None."""
        return self._error

    def submit(self, fb: ForwardBatch, job: Any = None) -> PPFuture:
        """Start a micro-batch down the pipeline; returns at once."""
        if self._error is not None:
            raise StageError(f"the pipeline failed: {self._error}") from self._error
        if self._closed:
            raise RuntimeError("the pipeline is shut down")
        if self._propagator is not None:  # the traced iteration launching it, for the other stages' spans
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            fb.trace_context = carrier.get("traceparent")
        fut = PPFuture(fb, self._next_mb)
        fut.job = job
        self._next_mb += 1
        self._launch_q.put(fut)
        return fut

    # ---- threads ----------------------------------------------------------------------------

    def _await_producers(self, fb: ForwardBatch, launched: "collections.deque[PPFuture]") -> None:
        """With ``pp_async_depth > 0`` a micro-batch may read a token still in the pipeline (a
        placeholder id): wait until the micro-batch that samples it is back."""
        needed = [t for t in fb.input_ids if t < 0]
        for ids in fb.output_ids or ():
            if ids:
                needed.extend(t for t in ids if t < 0)
        if not needed:
            return
        lo_need, hi_need = min(needed), max(needed)
        for prev in launched:
            ph = prev.job.entry.placeholders
            if ph and ph[-1] <= hi_need and lo_need <= ph[0] and not prev.done.is_set():
                if not prev.done.wait(self.timeout_s * self.pp_size):
                    raise StageError(f"micro-batch {prev.mb_id} did not come back within "
                                     f"{self.timeout_s * self.pp_size} s")

    def _launch_loop(self) -> None:
        launched: collections.deque[PPFuture] = collections.deque()
        pending: list[Any] = []
        while True:
            fut = self._launch_q.get()
            if fut is None:
                if self._error is None and self.link is not None:
                    try:  # the stop message follows the last micro-batch down the pipeline
                        self.link.wait_sends(pending)
                        self.link.wait_sends(self.link.send_batch(1, None, -1, None))
                    except StageError:
                        pass
                return
            if self._error is not None:
                self._fail(fut, self._error)
                continue
            try:
                fut.t_launch = time.perf_counter()
                job = fut.job
                if job is not None:
                    fb = fut.fb
                    self._await_producers(fb, launched)
                    fb.input_ids = job.futures.resolve(fb.input_ids)
                    if fb.output_ids:
                        fb.output_ids = [None if ids is None else job.futures.resolve(ids) for ids in fb.output_ids]
                t0 = time.perf_counter()  # busy from here: the waits above are bubbles
                modelled = getattr(self.stage, "busy_s", None)
                hidden = self.stage.forward_stage(fut.fb)
                fut.launch_done.set()
                if job is not None:
                    job.entry.launch_done.set()  # stage 0 has read the inputs
                # The sim worker's modelled compute (its device may run it later), else wall time.
                self.busy_s += (self.stage.busy_s - modelled) if modelled is not None else time.perf_counter() - t0
                self.forwards += 1
                assert self.link is not None
                self.link.wait_sends(pending)
                pending = self.link.send_batch(1, fut.fb, fut.mb_id, hidden)
                fut.t_sent = time.perf_counter()
                self._recv_q.put(fut)
                if job is not None:
                    launched.append(fut)
                    while launched and launched[0].done.is_set():
                        launched.popleft()
            except BaseException as exc:  # noqa: BLE001 - fails this and every later micro-batch
                self._set_error(exc)
                self._fail(fut, self._error or exc)

    def _recv_loop(self) -> None:
        while True:
            fut = self._recv_q.get()
            if fut is None:
                return
            if self._error is not None:
                self._fail(fut, self._error)
                continue
            try:
                assert self.link is not None
                tokens, ready_ns = self.link.recv_tokens(self.pp_size - 1, fut.fb.batch_size)
                extras = self.link.recv_extras(self.pp_size - 1) if wants_extras(fut.fb) else None
                if ready_ns:  # the sim's modelled device: the host sync waits for it
                    delay = ready_ns / 1e9 - time.monotonic()
                    if delay > self.timeout_s:  # never a wait without bound (a clock from another host)
                        raise StageError(f"the last stage's tokens are ready only in {delay:.0f} s, beyond "
                                         f"parallel.stage_timeout_s={self.timeout_s} s")
                    if delay > 0:
                        time.sleep(delay)
                fut.t_done = time.perf_counter()
                fut.result = ForwardResult(next_token_ids=tokens, forward_time_s=fut.t_done - fut.t_launch)
                if extras is not None:
                    fut.result.logprobs, fut.result.top_logprobs, fut.result.prompt_logprobs = extras
                if fut.job is not None:
                    result = fut.result
                    fut.job.run(lambda fb: result)  # stores the tokens, completes the entry
                fut.done.set()
            except BaseException as exc:  # noqa: BLE001
                self._set_error(exc)
                self._fail(fut, self._error or exc)

    def _fail(self, fut: PPFuture, exc: BaseException) -> None:
        fut.error = exc
        if fut.job is not None:
            def raise_it(fb: ForwardBatch) -> ForwardResult:
                raise exc

            fut.job.run(raise_it)  # the entry gets the error, its placeholders a value
        fut.launch_done.set()
        fut.done.set()

    def _explain(self, exc: BaseException) -> BaseException:
        """A message that says which stage failed, rather than gloo's socket error."""
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            return StageError(f"no answer from the pipeline within parallel.stage_timeout_s={self.timeout_s} s "
                              f"(a stage hung or is too slow; raise the timeout if it is slow): {exc}")
        deadline = time.monotonic() + 1.0  # a peer's reset arrives before its exit is reaped
        while time.monotonic() < deadline:
            dead = [(r, p.exitcode) for r, p in zip(self.place.local_ranks[1:], self.procs) if p.exitcode is not None]
            if dead:
                what = ", ".join(f"stage {r} exited with code {c}" for r, c in dead)
                return StageError(f"a pipeline stage died ({what}): {exc}")
            time.sleep(0.05)
        return exc

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = self._explain(exc)
            # A failed pipeline is not restarted: stop the local stages now, so none is left
            # hanging in a collective until the engine shuts down.
            self._kill_children()

    # ---- start-up and teardown --------------------------------------------------------------

    def _wait_loaded(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = set(range(1, self.pp_size))
        while waiting:
            for rank in sorted(waiting):
                if self.store.check([f"error/{rank}"]):
                    raise ValueError(f"pipeline stage {rank} failed to start: "
                                     f"{self.store.get(f'error/{rank}').decode()}")
                if self.store.check([f"loaded/{rank}"]):
                    waiting.discard(rank)
            for proc in self.procs:
                if proc.exitcode is not None:
                    raise StageError(f"pipeline stage process {proc.name} exited with code {proc.exitcode} "
                                     "while starting")
            if waiting and time.monotonic() > deadline:
                raise StageError(f"pipeline stages {sorted(waiting)} did not start within {STARTUP_TIMEOUT_S} s "
                                 f"(other nodes must join {self.addr})")
            time.sleep(0.02)

    def _kill_children(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()

    def stage_stats(self) -> list[dict[str, float]]:
        """Per stage: ``busy_s`` (compute time since start; at most a quarter second old for
        the other stages, read at ``at`` on the stage's monotonic clock, None before its
        first report), ``forwards`` and ``link_wait_s`` (the sim worker's modelled
        hidden-state transfers). ``busy_fraction`` = busy_s / time since start."""
        wall = time.perf_counter() - self.start_time
        queued = getattr(self.stage, "queued_s", None)  # the sim's modelled compute not yet run
        busy0 = self.busy_s - (queued() if queued is not None else 0.0)
        out = [dict(pp_rank=0, busy_s=busy0, forwards=self.forwards, link_wait_s=0.0, at=time.monotonic())]
        for rank in range(1, self.pp_size):
            busy, n, wait, at = 0.0, 0, 0.0, None
            store = self.store
            if store is not None and store.check([f"stats/{rank}"]):
                busy_s, count, wait_s, at_s = store.get(f"stats/{rank}").decode().split()
                busy, n, wait, at = float(busy_s), int(count), float(wait_s), float(at_s)
            out.append(dict(pp_rank=rank, busy_s=busy, forwards=n, link_wait_s=wait, at=at))
        for d in out:
            d["busy_fraction"] = min(1.0, d["busy_s"] / wall) if wall > 0 else 0.0
        return out

    def stage_exitcodes(self) -> list[int | None]:
        return [p.exitcode for p in self.procs]

    def shutdown(self) -> None:
        """Stop the stages (a stop message down the pipeline, then kill what lingers), the
        threads and the rendezvous; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._launch_q.put(None)
        if self._threads:
            self._threads[0].join(self.timeout_s)
        self._recv_q.put(None)
        if self._threads:
            self._threads[1].join(self.timeout_s)
        deadline = time.monotonic() + min(10.0, self.timeout_s)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill_children()
        for proc in self.procs:
            proc.join(5.0)
        if self.stage is not None:
            self.stage.shutdown()
        self.link = None
        self.store = None  # closes the rendezvous socket
