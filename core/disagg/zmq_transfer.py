"""The ``zmq`` KV-transfer backend: pages move over TCP with pyzmq, metadata as msgspec structs.

One connection per (decode server, prefill server) pair: the prefill manager binds a ROUTER
socket (its endpoint is what the bootstrap server publishes); a decode manager connects one
DEALER to each prefill it talks to. Messages:

- ``Meta`` decode -> prefill: a room's destination pages (pre-allocated on the decode server);
- ``Data`` prefill -> decode: the room's first token, followed by one raw frame per KV buffer
  holding the gathered pages (sent zero-copy: zmq holds the gathered array, no pickling);
- ``Ack`` decode -> prefill once the pages are written: only then is the prefill's KV freed;
- ``Fail`` either way: the other side gave up on the room (timeout, abort, unknown room).

Each manager runs one thread that owns every socket (zmq sockets are single-threaded); the
scheduler thread hands it commands through a queue and a wake-up socket and reads the per-room
state it writes. ``MooncakeManager`` reuses all of this and only replaces how pages travel
(``_deliver`` / ``_accept``).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any

import numpy as np
import zmq

from loopserve.core.disagg.base import (
    BootstrapAddr, KVArgs, KVManager, KVPoll, KVReceiver, KVSender, TransferError, TransferTimer)
from loopserve.core.disagg.bootstrap import BootstrapServer, fetch_route, put_route
from loopserve.core.disagg.zmq_rooms import Ack, Data, Fail, Meta, Room, ZmqReceiver, ZmqSender, decode, encode


class ZmqManager(KVManager):
    """See the module docstring. ``host`` is the address the prefill's ROUTER binds and
    publishes; ``bootstrap_port`` (prefill, None = none, 0 = any free port) starts the
    bootstrap server beside it."""

    backend = "zmq"

    def __init__(self, role: str, args: KVArgs, timeout_s: float, *, host: str = "127.0.0.1",
                 bootstrap_port: int | None = None) -> None:
        super().__init__(role, args, timeout_s)
        self.host = host
        self._views = args.page_views()
        self._rooms: dict[int, Room] = {}
        self._orphans: dict[int, tuple[Meta, bytes, TransferTimer]] = {}  # prefill: Meta before the request
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._wake_lock = threading.Lock()
        self._wake_addr = f"inproc://loopserve-kv-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.connect(self._wake_addr)
        self._dealers: dict[str, zmq.Socket] = {}
        self._router: zmq.Socket | None = None
        self.endpoint_port = 0
        if role == "prefill":
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._router.setsockopt(zmq.LINGER, 0)
            self.endpoint_port = self._router.bind_to_random_port(f"tcp://{host}")
        self._lookups = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loopserve-kv-lookup")
        self._stopped = threading.Event()
        self.bootstrap: BootstrapServer | None = None
        self._thread = threading.Thread(target=self._run, name=f"loopserve-kv-{role}", daemon=True)
        self._thread.start()
        if role == "prefill" and bootstrap_port is not None:
            self.bootstrap = BootstrapServer(host, bootstrap_port)
            self.register_to_bootstrap(self.bootstrap.url)

    # ------------------------------------------------------------------ scheduler side
    def route(self) -> dict[str, Any]:
        """What the bootstrap server publishes for this prefill server."""
        return {"rank_ip": self.host, "rank_port": self.endpoint_port, "backend": self.backend,
                "page_size": self.args.page_size, "page_bytes": self.args.page_bytes}

    def register_to_bootstrap(self, bootstrap_url: str) -> None:
        put_route(bootstrap_url, self.route())

    def _new_room(self, addr: BootstrapAddr) -> Room:
        if addr.room in self._rooms:
            raise ValueError(f"bootstrap_room {addr.room} is already in use on this server; "
                             "every request needs a fresh room id")
        room = Room(addr.room, self.timeout_s)
        self._rooms[addr.room] = room
        return room

    def make_sender(self, addr: BootstrapAddr) -> KVSender:
        room = self._new_room(addr)
        self._command(("adopt", room))
        return ZmqSender(self, room)

    def make_receiver(self, addr: BootstrapAddr) -> KVReceiver:
        return ZmqReceiver(self, self._new_room(addr), addr)

    def release(self, room: int) -> None:
        """The scheduler is done with ``room`` (finished, failed or aborted)."""
        self._rooms.pop(room, None)

    @property
    def num_rooms(self) -> int:
        return len(self._rooms)

    def _command(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        with self._wake_lock:
            if not self._stopped.is_set():
                self._wake_tx.send(b"", zmq.NOBLOCK)

    def _lookup(self, room: Room, addr: BootstrapAddr) -> None:
        def run() -> None:
            while room.state is KVPoll.Bootstrapping and not self._stopped.is_set():
                route = fetch_route(addr.host, addr.port, timeout=1.0)
                if route is not None:
                    self._command(("route", room, route))
                    return
                if room.timer.expired():
                    return  # the scheduler's next poll() reports the timeout
                self._stopped.wait(0.05)
        self._lookups.submit(run)

    def close(self) -> None:
        if self._stopped.is_set():
            return
        with self._wake_lock:
            self._stopped.set()
            self._wake_tx.send(b"", zmq.NOBLOCK)
        self._thread.join(5)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        if self.bootstrap is not None:
            self.bootstrap.close()
        self._ctx.destroy(linger=0)

    # ------------------------------------------------------------------ manager thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        while not self._stopped.is_set():
            events = poller.poll(100)
            for sock, _ in events:
                if sock is self._wake_rx:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                elif sock is self._router:
                    self._on_prefill_message(self._router.recv_multipart(copy=False))
                else:
                    self._on_decode_message(sock.recv_multipart(copy=False))
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._apply(cmd, poller)
                except Exception as exc:  # noqa: BLE001 - one room fails, the thread lives on
                    cmd[1].fail(f"the KV transfer failed: {exc}")
            self._expire_orphans()
            if events and self.on_progress is not None:
                self.on_progress()

    def _apply(self, cmd: tuple, poller: zmq.Poller) -> None:
        kind, room = cmd[0], cmd[1]
        if kind == "adopt":  # prefill: a Meta may have come before the request
            orphan = self._orphans.pop(room.room, None)
            if orphan is not None:
                room.meta, room.peer = orphan[0], orphan[1]
                room.state = KVPoll.WaitingForInput
        elif kind == "send":
            self._send(room, cmd[2], cmd[3])
        elif kind == "route":
            route = cmd[2]
            mismatch = self._check_layout(route.get("page_size"), route.get("page_bytes"))
            if mismatch:
                room.fail(mismatch)
                return
            endpoint = f"tcp://{route['rank_ip']}:{route['rank_port']}"
            if endpoint not in self._dealers:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                self._dealers[endpoint] = sock
                poller.register(sock, zmq.POLLIN)
            room.peer = endpoint
            room.meta = None
            if room.state is KVPoll.Bootstrapping:
                room.state = KVPoll.WaitingForInput
        elif kind == "meta":
            meta = Meta(room.room, cmd[2], self.args.page_size, self.args.page_bytes, self._meta_extra())
            room.meta = meta
            self._dealers[room.peer].send(encode(meta), zmq.NOBLOCK)
        elif kind == "forget":
            self._tell_peer(room, cmd[2])

    def _tell_peer(self, room: Room, reason: str) -> None:
        try:
            if self.role == "prefill" and room.peer is not None and self._router is not None:
                self._router.send_multipart([room.peer, encode(Fail(room.room, reason))], zmq.NOBLOCK)
            elif self.role == "decode" and room.peer in self._dealers:
                self._dealers[room.peer].send(encode(Fail(room.room, reason)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone already

    def _check_layout(self, page_size: Any, page_bytes: Any) -> str | None:
        if page_size != self.args.page_size or list(page_bytes or []) != self.args.page_bytes:
            return (f"the prefill and decode servers lay out KV differently (page size {page_size} vs "
                    f"{self.args.page_size}, bytes per page {page_bytes} vs {self.args.page_bytes}); "
                    "run both with the same model, dtype and kv_cache.page_size")
        return None

    # prefill side
    def _on_prefill_message(self, frames: list[zmq.Frame]) -> None:
        ident, msg = frames[0].bytes, decode(frames[1].bytes)
        room = self._rooms.get(msg.room)
        if isinstance(msg, Meta):
            if room is None:
                self._orphans[msg.room] = (msg, ident, TransferTimer(self.timeout_s))
                return
            mismatch = self._check_layout(msg.page_size, msg.page_bytes)
            room.meta, room.peer = msg, ident
            if mismatch:
                room.fail(mismatch)
                self._tell_peer(room, mismatch)
            elif room.state is KVPoll.Bootstrapping:
                room.state = KVPoll.WaitingForInput
        elif isinstance(msg, Ack) and room is not None and room.state is KVPoll.Transferring:
            room.state = KVPoll.Success
        elif isinstance(msg, Fail):
            if room is not None:
                room.fail(f"the decode server gave up: {msg.reason}")
            self._orphans.pop(msg.room, None)

    def _send(self, room: Room, pages: list[int], aux: list[int]) -> None:
        if room.state is KVPoll.Failed:
            return
        if room.meta is None:
            room.fail("pages were sent before the decode server asked for them")
            return
        if len(pages) > len(room.meta.pages):
            room.fail(f"the decode server reserved {len(room.meta.pages)} pages but the prompt needs {len(pages)}")
            self._tell_peer(room, "too few pages reserved")
            return
        room.state = KVPoll.Transferring
        frames = self._deliver(room, pages)
        try:
            self._router.send_multipart([room.peer, encode(Data(room.room, len(pages), aux)), *frames],
                                        copy=False)
        except zmq.ZMQError as exc:
            room.fail(f"the decode server is unreachable ({exc})")

    def _deliver(self, room: Room, pages: list[int]) -> list[Any]:
        """Move the pages (or prepare their frames): one gathered array per buffer."""
        idx = np.asarray(pages, dtype=np.int64)
        return [np.ascontiguousarray(v[idx]) for v in self._views]

    def _meta_extra(self) -> dict[str, Any]:
        return {}

    def _expire_orphans(self) -> None:
        if self._orphans:
            for key in [k for k, (_, _, t) in self._orphans.items() if t.expired()]:
                del self._orphans[key]

    # decode side
    def _on_decode_message(self, frames: list[zmq.Frame]) -> None:
        msg = decode(frames[0].bytes)
        room = self._rooms.get(msg.room)
        if isinstance(msg, Fail):
            if room is not None:
                room.fail(f"the prefill server gave up: {msg.reason}")
            return
        if not isinstance(msg, Data):
            return
        if room is None or room.state is not KVPoll.Transferring or room.meta is None:
            return  # aborted or timed out here: the pages are dropped, never written
        try:
            self._accept(room, msg.num_pages, frames[1:])
        except Exception as exc:  # noqa: BLE001
            room.fail(f"the KV pages could not be written: {exc}")
            self._tell_peer(room, str(room.error))
            return
        room.aux = list(msg.aux)
        room.state = KVPoll.Success
        self._dealers[room.peer].send(encode(Ack(room.room)), zmq.NOBLOCK)

    def _accept(self, room: Room, num_pages: int, frames: list[zmq.Frame]) -> None:
        """Write the received pages into the reserved ones."""
        assert room.meta is not None
        if len(frames) != len(self._views):
            raise TransferError(f"got {len(frames)} KV buffers, expected {len(self._views)}")
        dst = np.asarray(room.meta.pages[:num_pages], dtype=np.int64)
        for view, frame in zip(self._views, frames):
            view[dst] = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(num_pages, -1)
