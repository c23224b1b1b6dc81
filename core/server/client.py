"""The frontend's side of the scheduler process: start it, send requests, route its outputs to
the request that waits for them, ask it control questions, and notice at once when it dies.

All of it runs on the frontend's asyncio loop; each ZMQ socket is used from that loop only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any

import zmq
import zmq.asyncio

from loopserve.core.server import protocol as P

log = logging.getLogger("loopserve.server")

DIED = "the scheduler process died; the request could not finish"


class SchedulerDied(RuntimeError):
    pass


class RequestStream:
    """One submitted request: its outputs arrive on ``queue`` in order, the last with ``finish``."""

    def __init__(self, client: "SchedulerClient", rid: str, queue: "asyncio.Queue[P.ReqOutput] | None" = None) -> None:
        self.client = client
        self.rid = rid
        # Requests of one HTTP call may share a queue (outputs carry their rid).
        self.queue: asyncio.Queue[P.ReqOutput] = queue if queue is not None else asyncio.Queue()
        self.finished = False
        self.got_first = False

    def close(self) -> None:
        """Abort the request if it has not finished (the client went away); idempotent."""
        self.client.release(self.rid, abort=not self.finished)
        self.finished = True


class SchedulerClient:
    """Owns the scheduler process and the three sockets to it (see ``protocol``)."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = list(overrides)
        self.info: P.Ready | None = None
        self.process: Any = None
        self.dead = False  # the process is gone (and not because we stopped it)
        self.stopping = False
        self.streams: dict[str, RequestStream] = {}
        self.num_running = 0
        self.num_waiting = 0
        self.num_queued = 0  # submitted here and not yet producing tokens
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[Any]] = []
        self._control_lock = asyncio.Lock()
        self._on_death: list[Any] = []
        self._dir = tempfile.mkdtemp(prefix="loopserve-ipc-")
        self.endpoints = {name: f"ipc://{os.path.join(self._dir, name)}" for name in ("requests", "outputs", "control")}
        self.ctx = zmq.asyncio.Context()
        self.requests = self.ctx.socket(zmq.PUSH)
        self.outputs = self.ctx.socket(zmq.PULL)
        self.control = self.ctx.socket(zmq.DEALER)
        for sock in (self.requests, self.outputs, self.control):
            sock.setsockopt(zmq.LINGER, 0)
        self.requests.bind(self.endpoints["requests"])
        self.outputs.bind(self.endpoints["outputs"])
        self.control.bind(self.endpoints["control"])

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout_s: float) -> P.Ready:
        """Spawn the scheduler process and wait until it has built its engine.

        :raises ValueError: the config is bad (the process says so).
        :raises RuntimeError: it failed otherwise, died, or was not ready in ``timeout_s``.
        """
        from loopserve.core.server.scheduler_process import main

        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=main, args=(self.overrides, self.endpoints, os.getpid()),
                                   name="loopserve-scheduler", daemon=False)
        self.process.start()
        deadline = time.monotonic() + timeout_s
        while True:
            if await self.outputs.poll(200):
                msg = P.from_scheduler_decoder.decode(await self.outputs.recv())
                if isinstance(msg, P.StartFailed):
                    self.process.join(10)
                    kind, _, text = msg.message.partition(": ")
                    raise (ValueError if kind == "config" else RuntimeError)(text)
                if isinstance(msg, P.Ready):
                    self.info = msg
                    break
            if not self.process.is_alive():
                raise RuntimeError(f"the scheduler process exited with code {self.process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler process was not ready within {timeout_s:.0f} s")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_outputs()), loop.create_task(self._watch_process())]
        return self.info

    def on_death(self, callback: Any) -> None:
        self._on_death.append(callback)

    async def _watch_process(self) -> None:
        # NOTE: polling exitcode is cheap and catches kill -9, which sends nothing on a socket.
        while True:
            await asyncio.sleep(0.1)
            if self.process.exitcode is not None and not self.stopping:
                log.error("the scheduler process (pid %s) exited with code %s", self.process.pid, self.process.exitcode)
                self._fail_all(DIED)
                for cb in self._on_death:
                    cb()
                return

    def _fail_all(self, message: str) -> None:
        self.dead = True
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(P.ReqOutput(stream.rid, [], "abort", error=message))

    async def _read_outputs(self) -> None:
        decode = P.from_scheduler_decoder.decode
        while True:
            msg = decode(await self.outputs.recv())
            if not isinstance(msg, P.StepOutputs):
                continue
            self.num_running, self.num_waiting = msg.num_running, msg.num_waiting
            for out in msg.outputs:
                stream = self.streams.get(out.rid)
                if stream is None:
                    continue
                if not stream.got_first:
                    stream.got_first = True
                    self.num_queued -= 1
                stream.queue.put_nowait(out)

    async def close(self, timeout_s: float = 30.0) -> int | None:
        """Stop the scheduler process (abort what is left) and wait for it; the exit code."""
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        proc = self.process
        if proc is not None and proc.exitcode is None:
            try:
                self.requests.send(P.encoder.encode(P.Stop()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout_s
            while proc.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.exitcode is None:
                log.warning("the scheduler process did not stop in %.0f s; killing it", timeout_s)
                proc.kill()
                proc.join(5)
        self._fail_all("the server shut down")
        self.ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
        return None if proc is None else proc.exitcode

    # ------------------------------------------------------------------ requests
    def submit(self, msgs: list[P.Generate], queue: "asyncio.Queue[P.ReqOutput] | None" = None) -> list[RequestStream]:
        """Queue requests (one message each, sent without waiting); raises ``SchedulerDied``."""
        if self.dead or self.stopping:
            raise SchedulerDied(DIED if self.dead else "the server is shutting down")
        streams = []
        for msg in msgs:
            stream = RequestStream(self, msg.rid, queue)
            self.streams[msg.rid] = stream
            self.num_queued += 1
            streams.append(stream)
        for msg in msgs:
            self.requests.send(P.encoder.encode(msg), zmq.NOBLOCK)
        return streams

    def release(self, rid: str, abort: bool) -> None:
        stream = self.streams.pop(rid, None)
        if stream is not None and not stream.got_first:
            self.num_queued -= 1
        if abort and stream is not None and not self.dead and not self.stopping:
            self.abort(rid)

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        try:
            self.requests.send(P.encoder.encode(P.Abort(rid, message)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def fresh_rid(self, prefix: str) -> str:
        rid = f"{prefix}"
        while rid in self.streams:
            rid = f"{prefix}-{next(self._ids)}"
        return rid

    async def ask(self, kind: str, timeout_s: float = 5.0) -> P.ControlReply | None:
        """A control question; None if the process is dead or did not answer in time."""
        if self.dead or self.process is None or self.process.exitcode is not None:
            return None
        async with self._control_lock:
            mid = next(self._ids)
            await self.control.send(P.encoder.encode(P.Control(mid, kind)))
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                # Short polls: a process that died meanwhile answers "no" at once, not at the deadline.
                if not await self.control.poll(int(min(left, 0.1) * 1000) + 1):
                    if self.dead or self.process.exitcode is not None:
                        return None
                    continue
                reply = P.control_reply_decoder.decode(await self.control.recv())
                if reply.id == mid:
                    return reply
            return None
