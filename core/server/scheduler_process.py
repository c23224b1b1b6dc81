"""The scheduler process of ``loopserve serve``: the loop plugin, KV cache and worker, built by the
one build path (so every loop, policy and worker plugin runs here unchanged), fed over ZMQ.

Threads: the loop thread runs ``loop.run()``; the main thread receives requests and control
messages and watches the parent. Outputs leave once per loop iteration: every request that
advanced in the iteration is collected by its ``on_update`` callback, and one ``StepOutputs``
message carries all of them. Token ids only: tokenization and detokenization stay in the
frontend, so this process spends its time scheduling and running the model.

Started with the ``spawn`` start method (forking a process that already runs threads or holds
torch state is unsafe); the child ignores SIGINT, so Ctrl-C reaches the frontend, which then
stops this process in order.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import zmq

from loopserve.core.hookspecs import hookimpl
from loopserve.core.server import protocol as P

log = logging.getLogger("loopserve.server.scheduler")

POLL_MS = 100
LINGER_MS = 2000


class LogprobCollector:
    """Keeps each request's logprobs from the worker's results (``ForwardResult.logprobs``) in
    ``req.extra["logprobs"]``, keyed by output position, for ``flush`` to send with the tokens.
    A hook per forward, not per token; nothing to do in a step whose batch asked for none.

    NOTE: rows are matched to requests by ``req_pool_idx``. Under the overlap loop a result may
    arrive after its request finished and its row went to a new request; keying by position
    (sequence length after the pass minus prompt length) makes such a stale value land at a
    position the new request's own, later result overwrites, or at none."""

    def __init__(self) -> None:
        self.live: dict[str, Any] = {}

    @hookimpl
    def loopserve_after_forward(self, batch: Any, result: Any) -> None:
        if result.prompt_logprobs is not None:
            self._prompt(batch, result.prompt_logprobs)
        if result.logprobs is None:
            return
        by_row = {r.req_pool_idx: r for r in list(self.live.values())
                  if r.sampling_params.logprobs is not None and r.req_pool_idx is not None}
        need = batch.need_sample or [True] * len(result.logprobs)
        tops = result.top_logprobs or [None] * len(result.logprobs)
        for i, (row, lp, top, sampled) in enumerate(zip(batch.req_pool_indices, result.logprobs, tops, need)):
            req = by_row.get(row)
            if req is None or lp is None or not sampled:
                continue
            pos = batch.prefix_lens[i] + batch.extend_lens[i] - len(req.input_ids)
            if pos >= 0:
                req.extra.setdefault("logprobs", {})[pos] = (lp, [[int(t), v] for t, v in (top or [])])

    def _prompt(self, batch: Any, scored: list) -> None:
        """Prompt logprobs into ``req.extra["prompt_logprobs"]``, keyed by prompt position
        (the first scored token of row ``i`` is at ``prefix_lens[i] + 1``)."""
        by_row = {r.req_pool_idx: r for r in list(self.live.values())
                  if r.sampling_params.prompt_logprobs is not None and r.req_pool_idx is not None}
        for i, (row, got) in enumerate(zip(batch.req_pool_indices, scored)):
            req = by_row.get(row)
            if req is None or got is None:
                continue
            store = req.extra.setdefault("prompt_logprobs", {})
            for j, (lp, top) in enumerate(zip(*got)):
                pos = batch.prefix_lens[i] + 1 + j
                if pos < len(req.input_ids):
                    store[pos] = (lp, [[int(t), v] for t, v in top])


class SchedulerService:
    """Connects one built engine (``Built``) to the frontend's sockets."""

    def __init__(self, built: Any, ctx: zmq.Context, out: zmq.Socket, endpoints: dict[str, str],
                 parent_pid: int, collector: LogprobCollector) -> None:
        self.built = built
        self.scheduler = built.scheduler
        self.loop = built.loop
        self.out = out  # owned by the loop thread while it runs, by the main thread otherwise
        self.parent_pid = parent_pid
        self.requests = ctx.socket(zmq.PULL)
        self.requests.connect(endpoints["requests"])
        self.control = ctx.socket(zmq.ROUTER)
        self.control.connect(endpoints["control"])
        self.live: dict[str, Any] = collector.live  # rid -> Req, until its final output is sent
        self.sent: dict[str, int] = {}  # rid -> output ids already sent
        self._updated: dict[int, Any] = {}
        self.loop_error: BaseException | None = None
        orig = self.loop.iteration

        def iteration() -> bool:
            # NOTE: per iteration, not per token: one message for every request that advanced.
            did = orig()
            if self._updated:
                self.flush()
            return did

        # The loop's own step()/run() call self.iteration(), whatever the loop plugin is.
        self.loop.iteration = iteration
        self.thread = threading.Thread(target=self._run_loop, name="loopserve-loop", daemon=True)

    # ------------------------------------------------------------------ loop thread
    def _run_loop(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting client
            log.exception("the loop failed")
            self.loop_error = exc
            self.scheduler.shutdown(f"the server's loop failed: {exc!r}")
            self.flush()

    def _on_update(self, req: Any) -> None:
        self._updated[id(req)] = req

    def flush(self) -> None:
        updated, self._updated = self._updated, {}
        outputs = []
        for req in updated.values():
            rid = req.rid
            if rid not in self.live:
                continue
            ids = req.output_ids
            start = self.sent[rid]
            end = len(ids)
            # The overlap loop leaves a negative placeholder for a token still computing.
            while end > start and ids[end - 1] < 0:
                end -= 1
            new = ids[start:end]
            if any(t < 0 for t in new):
                new = new[: next(i for i, t in enumerate(new) if t < 0)]
            self.sent[rid] = start + len(new)
            reason = req.finished_reason
            out = P.ReqOutput(rid, new, cached_tokens=req.num_cached_tokens)
            if reason is not None:
                out.finish = reason.kind.value
                out.matched = reason.matched
                out.error = reason.message
                del self.live[rid], self.sent[rid]
            # A one-token prompt has nothing scored, yet its (null) entry is still reported.
            plp = (req.extra.pop("prompt_logprobs", {}) if req.sampling_params.prompt_logprobs is not None
                   and start == 0 and (new or reason is not None) else None)
            if plp is not None:
                got = [plp.get(p, (None, [])) for p in range(len(req.input_ids))]
                out.prompt_logprobs = [g[0] for g in got]
                out.prompt_top_logprobs = [g[1] for g in got]
            lp = req.extra.get("logprobs")
            if lp is not None:
                got = [lp.pop(p, (None, [])) for p in range(start, start + len(new))]
                out.logprobs = [g[0] for g in got]
                out.top_logprobs = [g[1] for g in got]
            if new or reason is not None:
                outputs.append(out)
        if outputs:
            s = self.scheduler
            self.out.send(P.encoder.encode(P.StepOutputs(outputs, len(s.running), len(s.waiting_queue))))

    # ------------------------------------------------------------------ main thread
    def serve(self) -> int:
        """Run until ``Stop``, the parent's death or the loop's failure; the exit code."""
        from loopserve.core.sched.req import Req
        from loopserve.core.sched.sampling_params import SamplingParams
        from loopserve.core.sched.scheduler import AbortReq

        self.thread.start()
        poller = zmq.Poller()
        poller.register(self.requests, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        stop_message = None
        while stop_message is None:
            events = dict(poller.poll(POLL_MS))
            if self.requests in events:
                new, aborts = [], []
                while True:  # everything queued now goes to the loop as one batch
                    try:
                        raw = self.requests.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = P.to_scheduler_decoder.decode(raw)
                    if isinstance(msg, P.Generate):
                        req = Req(rid=msg.rid, input_ids=msg.input_ids,
                                  sampling_params=SamplingParams(**msg.sampling),
                                  traceparent=msg.traceparent, priority=msg.priority)
                        if msg.bootstrap is not None:
                            from loopserve.core.disagg.base import BootstrapAddr

                            req.bootstrap = BootstrapAddr(*msg.bootstrap)
                        req.on_update = self._on_update
                        self.live[msg.rid] = req
                        self.sent[msg.rid] = 0
                        new.append(req)
                    elif isinstance(msg, P.Abort):
                        aborts.append(AbortReq(msg.rid, msg.message))
                    elif isinstance(msg, P.Stop):
                        stop_message = msg.message
                if new:
                    self.scheduler.submit(*new)
                for a in aborts:
                    self.scheduler.abort(a.rid, a.message)
            if self.control in events:
                self._answer_control()
            if os.getppid() != self.parent_pid:
                stop_message = "the frontend process exited"
            if not self.thread.is_alive():
                break
        if stop_message is None:  # the loop thread ended on its own: it failed
            self.close("the server's loop stopped")
            return 1
        self.close(stop_message)
        return 0

    def _answer_control(self) -> None:
        while True:
            try:
                ident, raw = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = P.control_decoder.decode(raw)
            alive = self.thread.is_alive() and self.loop_error is None
            reply = P.ControlReply(msg.id, alive)
            if msg.kind == "metrics":
                reply.text = self.built.telemetry.metrics_text()
            elif msg.kind == "load":
                s = self.scheduler
                running, waiting = list(s.running), list(s.waiting_queue)
                if hasattr(s, "transfer_reqs"):  # disaggregated: requests waiting on KV transfers
                    waiting += s.transfer_reqs()
                reply.load = {
                    "num_running": len(running),
                    "num_waiting": len(waiting),
                    "num_tokens": sum(r.seq_len for r in running),
                    "kv_pages_used": s.kv.num_pages - s.kv.available_pages(),
                    "kv_pages_total": s.kv.num_pages,
                }
            self.control.send_multipart([ident, P.encoder.encode(reply)])

    def close(self, message: str) -> None:
        self.loop.stop()
        self.thread.join(30.0)
        try:
            self.built.close(message)  # aborts what is still queued: their outputs go below
        finally:
            self.flush()


def main(overrides: list[str], endpoints: dict[str, str], parent_pid: int) -> None:
    """Entry point of the spawned process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, LINGER_MS)
    out.connect(endpoints["outputs"])
    code = 1
    try:
        try:
            from loopserve.core.server.heap import freeze_startup_heap
            from loopserve.core.loop.build import build

            collector = LogprobCollector()
            built = build(overrides, plugins=[("server.logprobs", collector)])
        except BaseException as exc:  # noqa: BLE001 - reported to the frontend, which exits 2/1
            kind = "config" if isinstance(exc, ValueError) else "error"
            out.send(P.encoder.encode(P.StartFailed(f"{kind}: {exc}")))
            return
        service = SchedulerService(built, ctx, out, endpoints, parent_pid, collector)
        import torch  # noqa: F401 - the loop's grad mode imports it on its first step: before the freeze
        frozen = freeze_startup_heap()
        w = built.worker
        cfg = built.config
        out.send(P.encoder.encode(P.Ready(
            pid=os.getpid(),
            model_path=getattr(w, "model_path", None),
            has_tokenizer=getattr(w, "tokenizer", None) is not None,
            context_len=int(w.context_len),
            vocab_size=int(w.vocab_size),
            kv_slots=int(w.num_kv_slots),
            max_running_requests=int(cfg.scheduler.max_running_requests),
            supports_logprobs=bool(getattr(w, "supports_logprobs", False)),
            loop=built.loop.name,
            policy=str(cfg.policy.name),
            worker=str(cfg.worker.name),
            gc_frozen_objects=frozen,
        )))
        code = service.serve()
    finally:
        ctx.destroy(linger=LINGER_MS)
        logging.shutdown()
        sys.stdout.flush()
        # Exit without running atexit hooks of torch's threads, which can hang after a stop.
        os._exit(code)
