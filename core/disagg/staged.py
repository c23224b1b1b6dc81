"""KV transfer with pipeline parallelism: every pipeline stage moves the KV of its own layers.

With ``parallel.pp_size > 1`` a disaggregated server's KV cache is spread over its stage
processes, each holding its layers' pages. Each stage therefore runs a KV manager of its own
(the configured backend, over its buffers, ``KVArgs.layers``), and a prefill stage sends
straight to the decode stages that hold the same layers: no KV crosses the pipeline.

Rank 0 (the scheduler's process) drives them through ``StagedKVManager``, which wraps rank
0's own manager and gives the scheduler the usual handles:

- a *sender* (prefill) sends rank 0's pages and tells every other stage to send its own as
  soon as the request's first token is back (by then every stage has computed the prompt:
  the last stage samples only after the others ran). It reports Success once every stage's
  pages were acknowledged, so the pages are freed only when no stage reads them any more.
- a *receiver* (decode) reserves pages as usual; ``send_metadata`` also tells every other
  stage to fetch its layers into the same pages. Success once every stage has them.

The control channel is two zmq PUSH/PULL pairs per stage (commands to the stage, states
back), msgspec-encoded; a stage finds rank 0's end through the pipeline's TCP store and
announces its command endpoint and (prefill) its transfer endpoint, which rank 0 registers
with the bootstrap server as that stage's route. Without KV data (a worker that moves only
the first token) no stage takes part and rank 0's manager is used alone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import msgspec
import zmq

from loopserve.core.disagg.base import (
    BootstrapAddr, KVArgs, KVManager, KVPoll, KVReceiver, KVSender, TransferError)
from loopserve.core.disagg.bootstrap import put_route

log = logging.getLogger("loopserve.disagg")

#: How long rank 0 waits for every stage to announce itself.
HELLO_TIMEOUT_S = 120.0
CTL_KEY = "disagg/ctl"


class Hello(msgspec.Struct, tag="hello"):
    rank: int
    endpoint: str  # the stage's command socket
    route: dict[str, Any] = {}  # prefill: the stage's transfer route for the bootstrap server
    error: str = ""  # the stage could not start its manager: why


class Cmd(msgspec.Struct, tag="cmd"):
    kind: str  # send | recv | abort
    room: int
    pages: list[int] = []
    host: str = ""
    port: int = 0


class State(msgspec.Struct, tag="state"):
    rank: int
    room: int
    state: int
    error: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Hello | Cmd | State).decode


def stage_disagg_spec(config: Any, bounds: list[tuple[int, int]]) -> dict[str, Any] | None:
    """What a stage process needs to run its part of the transfers (plain values), or None
    when the server is not disaggregated or its worker has no KV data to move."""
    mode = config.disaggregation.mode
    if mode not in ("prefill", "decode") or str(config.worker.name) != "model":
        return None
    from omegaconf import OmegaConf

    return {"role": str(mode), "split": [list(b) for b in bounds],
            "config": OmegaConf.to_container(config, resolve=True)}


# ---- rank 0 --------------------------------------------------------------------------------


class _Part:
    """Rank 0's view of one room on the other stages."""

    __slots__ = ("states", "error")

    def __init__(self) -> None:
        self.states: dict[int, KVPoll] = {}
        self.error = ""


class StagedKVManager(KVManager):
    """Rank 0's manager (``local``) plus the other stages' (driven over the control channel)."""

    def __init__(self, local: KVManager, store: Any, host: str, num_stages: int,
                 hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        super().__init__(local.role, local.args, local.timeout_s)
        self.local = local
        self.num_stages = num_stages
        self._parts: dict[int, _Part] = {}
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port(f"tcp://{host}")
        self._push: dict[int, zmq.Socket] = {}
        self._stopped = threading.Event()
        try:
            store.set(CTL_KEY, f"tcp://{host}:{port}")
            self._await_stages(hello_timeout_s)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._read, name="loopserve-kv-stages", daemon=True)
        self._thread.start()

    @property
    def bootstrap(self) -> Any:
        return getattr(self.local, "bootstrap", None)

    def _await_stages(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._push) < self.num_stages - 1:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pull.poll(int(min(left, 1.0) * 1000)):
                if left <= 0:
                    missing = sorted(set(range(1, self.num_stages)) - set(self._push))
                    raise ValueError(f"pipeline stages {missing} did not start their KV-transfer managers "
                                     f"within {timeout_s:g} s")
                continue
            msg = _decode(self._pull.recv())
            if not isinstance(msg, Hello):
                continue
            if msg.error:
                raise ValueError(f"pipeline stage {msg.rank} could not start its KV-transfer manager: {msg.error}")
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(msg.endpoint)
            self._push[msg.rank] = sock
            if msg.route and self.bootstrap is not None:
                put_route(self.bootstrap.url, msg.route)
        log.info("KV transfer: %d pipeline stages move their own layers (%s)", self.num_stages, self.role)

    def _read(self) -> None:
        while not self._stopped.is_set():
            try:
                if not self._pull.poll(100):
                    continue
                msg = _decode(self._pull.recv())
            except zmq.ZMQError:
                return
            if not isinstance(msg, State):
                continue
            with self._lock:
                part = self._parts.get(msg.room)
                if part is None:
                    continue
                part.states[msg.rank] = KVPoll(msg.state)
                if msg.error and not part.error:
                    part.error = f"pipeline stage {msg.rank}: {msg.error}"
            if self.on_progress is not None:
                self.on_progress()

    def _command(self, cmd: Cmd) -> None:
        data = _encode(cmd)
        for sock in self._push.values():
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a dead stage fails the pipeline, and the engine with it

    def _state(self, room: int, local: KVPoll) -> KVPoll:
        """The room's state over every stage: Failed if any failed, Success when all did."""
        with self._lock:
            part = self._parts.get(room)
            if part is None:
                return local
            if local is KVPoll.Failed or any(s is KVPoll.Failed for s in part.states.values()):
                return KVPoll.Failed
            if local is KVPoll.Success:
                done = len(part.states) == self.num_stages - 1
                return KVPoll.Success if done else KVPoll.Transferring
            return local

    def _error(self, room: int, local: Any) -> TransferError:
        with self._lock:
            part = self._parts.get(room)
            if part is not None and part.error:
                return TransferError(part.error)
        return local.failure_exception()

    # the KVManager interface
    @property
    def on_progress(self) -> Any:
        return self.__dict__.get("_on_progress")

    @on_progress.setter
    def on_progress(self, fn: Any) -> None:
        self.__dict__["_on_progress"] = fn
        if "local" in self.__dict__:
            self.local.on_progress = fn

    def make_sender(self, addr: BootstrapAddr) -> KVSender:
        sender = self.local.make_sender(addr)
        with self._lock:
            self._parts[addr.room] = _Part()
        return _StagedSender(self, sender)

    def make_receiver(self, addr: BootstrapAddr) -> KVReceiver:
        receiver = self.local.make_receiver(addr)
        with self._lock:
            self._parts[addr.room] = _Part()
        return _StagedReceiver(self, receiver, addr)

    def release(self, room: int) -> None:
        self.local.release(room)
        with self._lock:
            self._parts.pop(room, None)

    def register_to_bootstrap(self, bootstrap_url: str) -> None:
        self.local.register_to_bootstrap(bootstrap_url)

    def close(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(2)
        self._ctx.destroy(linger=0)
        self.local.close()


class _StagedSender(KVSender):
    def __init__(self, manager: StagedKVManager, local: KVSender) -> None:
        super().__init__(local.room)
        self._m, self._local = manager, local

    def init(self, num_pages: int, aux_index: int = 0) -> None:
        self._local.init(num_pages, aux_index)

    def send(self, page_ids: list[int], aux: list[int]) -> None:
        self._local.send(page_ids, aux)
        self._m._command(Cmd("send", self.room, list(page_ids)))

    def poll(self) -> KVPoll:
        return self._m._state(self.room, self._local.poll())

    def failure_exception(self) -> TransferError:
        return self._m._error(self.room, self._local)

    def abort(self) -> None:
        self._local.abort()
        self._m._command(Cmd("abort", self.room))


class _StagedReceiver(KVReceiver):
    def __init__(self, manager: StagedKVManager, local: KVReceiver, addr: BootstrapAddr) -> None:
        super().__init__(local.room)
        self._m, self._local, self._addr = manager, local, addr

    def init(self) -> None:
        self._local.init()

    def send_metadata(self, page_ids: list[int], aux_index: int = 0) -> None:
        self._local.send_metadata(page_ids, aux_index)
        self._m._command(Cmd("recv", self.room, list(page_ids), self._addr.host, self._addr.port))

    def poll(self) -> KVPoll:
        return self._m._state(self.room, self._local.poll())

    def aux(self) -> list[int]:
        return self._local.aux()

    def failure_exception(self) -> TransferError:
        return self._m._error(self.room, self._local)

    def abort(self) -> None:
        self._local.abort()
        self._m._command(Cmd("abort", self.room))


# ---- the other stages -------------------------------------------------------------------------


class StageAgent:
    """Runs in a pipeline stage process: this stage's KV manager, driven by rank 0's commands.

    One thread owns the control sockets and polls this stage's handles; it reports each room's
    end (Success or Failed) to rank 0 and forgets it."""

    def __init__(self, spec: dict[str, Any], rank: int, kv_args: KVArgs, store_addr: tuple[str, int],
                 timeout_s: float) -> None:
        from loopserve.core.pp.wire import local_address_toward

        self.rank = rank
        self.spec = spec
        self.kv_args = kv_args
        self.store_addr = store_addr
        self.host = local_address_toward(store_addr[0])  # where rank 0 (and the peers) reach this stage
        self.timeout_s = timeout_s
        self.manager: KVManager | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name="loopserve-kv-stage", daemon=True)
        self._thread.start()

    def _make_manager(self) -> KVManager:
        from omegaconf import OmegaConf

        from loopserve.core.plugin_manager import make_plugin_manager

        config = OmegaConf.create(self.spec["config"])
        config.server.host = self.host  # this stage's transfer endpoint binds here
        pm = make_plugin_manager(disable=list(config.plugins.disable))
        name = str(config.disaggregation.transfer_backend)
        manager = pm.hook.loopserve_make_kv_manager(name=name, role=self.spec["role"], config=config,
                                                    kv_args=self.kv_args)
        if manager is None:
            raise ValueError(f"no installed plugin provides the KV-transfer backend {name!r}")
        return manager

    def _main(self) -> None:
        from loopserve.core.pp.stage import connect_store

        ctx = zmq.Context()
        push = None
        try:
            store = connect_store(*self.store_addr, self.timeout_s)  # a client of its own
            store.wait([CTL_KEY], _timedelta(self.timeout_s))
            ctl = store.get(CTL_KEY).decode()
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(ctl)
            self.manager = self._make_manager()
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            port = pull.bind_to_random_port(f"tcp://{self.host}")
            route = self.manager.route() if self.spec["role"] == "prefill" else {}  # type: ignore[attr-defined]
            push.send(_encode(Hello(self.rank, f"tcp://{self.host}:{port}", route)))
            self._serve(pull, push)
        except Exception as exc:  # noqa: BLE001 - rank 0 is told (or times out waiting)
            log.exception("pipeline stage %d: the KV-transfer agent failed", self.rank)
            if push is not None and self.manager is None:
                push.send(_encode(Hello(self.rank, "", {}, error=f"{type(exc).__name__}: {exc}")))
        finally:
            if self.manager is not None:
                self.manager.close()
            ctx.destroy(linger=0)

    def _serve(self, pull: zmq.Socket, push: zmq.Socket) -> None:
        assert self.manager is not None
        handles: dict[int, tuple[Any, list[int] | None]] = {}  # room -> (handle, pages still to ask for)
        while not self._stopped.is_set():
            if pull.poll(2 if handles else 100):
                while pull.poll(0):
                    cmd = _decode(pull.recv())
                    if isinstance(cmd, Cmd):
                        self._apply(cmd, handles, push)
            for room, (handle, pages) in list(handles.items()):
                state = handle.poll()
                if pages is not None and state is KVPoll.WaitingForInput:
                    handle.send_metadata(pages)
                    handles[room] = (handle, None)
                elif state in (KVPoll.Success, KVPoll.Failed):
                    error = str(handle.failure_exception()) if state is KVPoll.Failed else ""
                    push.send(_encode(State(self.rank, room, int(state), error)))
                    del handles[room]
                    self.manager.release(room)

    def _apply(self, cmd: Cmd, handles: dict[int, tuple[Any, list[int] | None]], push: zmq.Socket) -> None:
        assert self.manager is not None
        try:
            if cmd.kind == "send":
                sender = self.manager.make_sender(BootstrapAddr("rank0", 1, cmd.room))
                sender.init(len(cmd.pages))
                sender.send(cmd.pages, [])
                handles[cmd.room] = (sender, None)
            elif cmd.kind == "recv":
                receiver = self.manager.make_receiver(BootstrapAddr(cmd.host, cmd.port, cmd.room))
                receiver.init()
                handles[cmd.room] = (receiver, list(cmd.pages))
            elif cmd.kind == "abort":
                entry = handles.pop(cmd.room, None)
                if entry is not None:
                    entry[0].abort()
                self.manager.release(cmd.room)
        except ValueError as exc:
            push.send(_encode(State(self.rank, cmd.room, int(KVPoll.Failed), str(exc))))

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)


def _timedelta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)
