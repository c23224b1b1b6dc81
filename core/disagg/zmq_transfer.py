"""The ``zmq`` KV-transfer backend: pages move over TCP with pyzmq, metadata as msgspec structs.

One connection per (decode server, prefill server) pair: the prefill manager binds a ROUTER
socket (its endpoint is what the bootstrap server publishes); a decode manager connects one
DEALER to each prefill it talks to. Messages:

- ``Meta`` decode -> prefill: a room's destination pages (pre-allocated on the decode server);
- ``Data`` prefill -> decode: the room's first token, followed by one raw frame per KV buffer
  holding the gathered pages (sent zero-copy: zmq holds the gathered array, no pickling);
- ``Ack`` decode -> prefill once the pages are written: only then is the prefill's KV freed;
- ``Fail`` either way: the other side gave up on the room (timeout, abort, unknown room).

Both sides watch their connections (zmq socket monitors), so a peer process that dies fails
its rooms at once instead of at their timeout. A decode manager watches each DEALER: when a
prefill's connection closes or is refused, the rooms waiting for its pages fail, the dealer is
closed and routes naming that endpoint are looked up again (it reuses a looked-up route for
``route_ttl_s``). A prefill manager learns which decode identities talk over which connection
(the source fd of their Meta); when a connection closes it pings those identities until ROUTER_MANDATORY refuses
one (gone: its rooms fail) or ``SUSPECT_PROBE_S`` passes (a live peer, perhaps on a reused fd).
A peer that hangs keeps its connection and runs into the timeout.

Each manager runs one thread that owns every socket (zmq sockets are single-threaded); the
scheduler thread hands it commands through a queue and a wake-up socket and reads the per-room
state it writes. ``MooncakeManager`` reuses all of this and only replaces how pages travel
(``_deliver`` / ``_accept``).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from loopserve.core.disagg.base import (
    BootstrapAddr, KVArgs, KVManager, KVPoll, KVReceiver, KVSender, TransferError, TransferTimer, buffer_indices,
    layer_range, linked, overlap, url_host)
from loopserve.core.disagg.bootstrap import BootstrapServer, fetch_route, put_route
from loopserve.core.disagg.zmq_rooms import (
    Ack, Data, Fail, Leg, Meta, Ping, Room, ZmqReceiver, ZmqSender, decode, encode)


def _endpoint(route: dict[str, Any]) -> str:
    """The zmq endpoint of one prefill stage's route."""
    return f"tcp://{url_host(str(route.get('rank_ip')))}:{route.get('rank_port')}"


# How long the prefill side probes a decode stage whose connection closed before leaving it to
# the room timeouts.
SUSPECT_PROBE_S = 2.0


class ZmqManager(KVManager):
    """See the module docstring. ``host`` is the address the prefill's ROUTER binds and
    publishes; ``bootstrap_port`` (prefill, None = none, 0 = any free port) starts the
    bootstrap server beside it."""

    backend = "zmq"
    #: How long a decode server reuses a prefill server's looked-up route before asking its
    #: bootstrap server again. A failed transfer or a closed connection to the prefill drops
    #: it sooner, so a prefill server restarted with new endpoints is found at once.
    route_ttl_s = 1.0

    def __init__(self, role: str, args: KVArgs, timeout_s: float, *, host: str = "127.0.0.1",
                 bootstrap_port: int | None = None) -> None:
        super().__init__(role, args, timeout_s)
        self.host = host
        self._views = args.page_views()
        self._rooms: dict[int, Room] = {}
        self._orphans: dict[int, tuple[list[tuple[Meta, bytes]], TransferTimer]] = {}  # prefill: Metas before the request
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._wake_lock = threading.Lock()
        self._wake_addr = f"inproc://loopserve-kv-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.connect(self._wake_addr)
        self._dealers: dict[str, zmq.Socket] = {}
        self._endpoints: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, str] = {}  # decode: each dealer's connection events
        self._router: zmq.Socket | None = None
        self.endpoint_port = 0
        if role == "prefill":
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._router.setsockopt(zmq.LINGER, 0)
            self.endpoint_port = self._router.bind_to_random_port(f"tcp://{host}")
            # A decode stage's connection closing: its rooms fail at once (see _on_peer_closed).
            self._router_monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_peers: dict[int, set[bytes]] = {}  # prefill: connection fd -> decode identities seen on it
        self._suspects: dict[bytes, float] = {}  # prefill: identities whose connection closed -> probe until
        self._routes: dict[tuple[str, int], tuple[dict[str, Any], float]] = {}  # decode: (host, port) -> route
        self._routes_lock = threading.Lock()
        self.num_route_fetches = 0
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
        """What the bootstrap server publishes for this prefill stage."""
        a = self.args
        return {"rank_ip": self.host, "rank_port": self.endpoint_port, "backend": self.backend,
                "page_size": a.page_size, "page_bytes": a.page_bytes,
                "layers": list(a.layers) if a.layers else None, "pp_rank": a.pp_rank, "pp_size": len(a.layer_split)}

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
        r = self._rooms.pop(room, None)
        if r is not None and r.state is KVPoll.Failed and r.route_key is not None:
            with self._routes_lock:  # the route may be stale: look it up again next time
                self._routes.pop(r.route_key, None)

    @property
    def num_rooms(self) -> int:
        return len(self._rooms)

    def _command(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        with self._wake_lock:
            if not self._stopped.is_set():
                self._wake_tx.send(b"", zmq.NOBLOCK)

    def _lookup(self, room: Room, addr: BootstrapAddr) -> None:
        """Find the prefill server's endpoints for ``room``: from the route cache when looked
        up less than ``route_ttl_s`` ago, else from its bootstrap server (in a worker thread,
        retrying until the room's timeout)."""
        key = (addr.host, addr.port)
        room.route_key = key
        with self._routes_lock:
            cached = self._routes.get(key)
        if cached is not None and time.monotonic() - cached[1] < self.route_ttl_s:
            self._command(("route", room, cached[0]))
            return

        def run() -> None:
            while room.state is KVPoll.Bootstrapping and not self._stopped.is_set():
                route = fetch_route(addr.host, addr.port, timeout=1.0)
                with self._routes_lock:
                    self.num_route_fetches += 1
                    if route is not None:
                        self._routes[key] = (route, time.monotonic())
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
            poller.register(self._router_monitor, zmq.POLLIN)
        while not self._stopped.is_set():
            events = poller.poll(5 if self._suspects else 100)
            for sock, _ in events:
                if sock is self._wake_rx:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                elif sock is self._router:
                    self._on_prefill_message(self._router.recv_multipart(copy=False))
                elif self._router is not None and sock is self._router_monitor:
                    event = recv_monitor_message(sock)
                    self._on_peer_closed(int(event["value"]))
                elif sock in self._monitors:
                    self._on_connection_event(self._monitors[sock], recv_monitor_message(sock)["event"], poller)
                elif sock in self._endpoints:
                    self._on_decode_message(self._endpoints[sock], sock.recv_multipart(copy=False))
                # else: a dealer (or its monitor) closed earlier in this pass
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
            if self._suspects:
                self._probe_suspects()
            if events and self.on_progress is not None:
                self.on_progress()

    def _apply(self, cmd: tuple, poller: zmq.Poller) -> None:
        kind, room = cmd[0], cmd[1]
        if kind == "adopt":  # prefill: Metas may have come before the request
            orphan = self._orphans.pop(room.room, None)
            for meta, ident in orphan[0] if orphan is not None else ():
                self._add_leg(room, meta, ident)
        elif kind == "send":
            self._send(room, cmd[2], cmd[3])
        elif kind == "route":
            self._set_route(room, cmd[2], poller)
        elif kind == "meta":
            room.pages = list(cmd[2])
            a = self.args
            meta = Meta(room.room, room.pages, a.page_size, a.page_bytes, self._meta_extra(), rank=a.pp_rank,
                        layers=list(a.layers or ()), split=[list(x) for x in a.split or ()])
            for leg in room.legs.values():
                if leg.peer in self._dealers:  # else its connection was lost: the room failed then
                    self._dealers[leg.peer].send(encode(meta), zmq.NOBLOCK)
        elif kind == "forget":
            self._tell_peer(room, cmd[2])

    def _tell_peer(self, room: Room, reason: str) -> None:
        for leg in list(room.legs.values()):
            try:
                if self.role == "prefill" and self._router is not None:
                    self._router.send_multipart([leg.peer, encode(Fail(room.room, reason))], zmq.NOBLOCK)
                elif self.role == "decode" and leg.peer in self._dealers:
                    self._dealers[leg.peer].send(encode(Fail(room.room, reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer is gone already

    def _check_layout(self, page_size: Any, page_bytes: Any, layers: Any = None, split: Any = None) -> str | None:
        """Why a peer stage's pages cannot be exchanged with this one's (None: they can)."""
        a = self.args
        page_bytes = list(page_bytes or [])
        remote = layer_range(layers, len(page_bytes))
        total = int(split[-1][1]) if split else remote[1]
        shared = overlap(a.layer_range, remote)
        mine = theirs = []
        if shared is not None:
            mine = [a.page_bytes[i] for i in a.buffer_indices(*shared)]
            theirs = [page_bytes[i] for i in buffer_indices(layers, len(page_bytes), *shared)]
        if page_size != a.page_size or total != a.layer_split[-1][1] or mine != theirs:
            return (f"the prefill and decode servers lay out KV differently (page size {page_size} vs "
                    f"{a.page_size}, {total} vs {a.layer_split[-1][1]} layers, bytes per page {theirs} vs "
                    f"{mine}); run both with the same model, dtype and kv_cache.page_size")
        return None

    # prefill side
    def _on_prefill_message(self, frames: list[zmq.Frame]) -> None:
        ident, msg = frames[0].bytes, decode(frames[1].bytes)
        room = self._rooms.get(msg.room)
        if isinstance(msg, Meta):
            # Which connection this decode stage talks over (a Meta starts all it waits for).
            self._fd_peers.setdefault(frames[1].get(zmq.SRCFD), set()).add(ident)
            if room is None:
                metas, _ = self._orphans.setdefault(msg.room, ([], TransferTimer(self.timeout_s)))
                metas.append((msg, ident))
                return
            self._add_leg(room, msg, ident)
        elif isinstance(msg, Ack) and room is not None and room.state is KVPoll.Transferring:
            leg = room.legs.get(ident)
            if leg is not None:
                leg.done = True
            if all(leg.done for leg in room.legs.values()):
                room.state = KVPoll.Success
        elif isinstance(msg, Fail):
            if room is not None:
                room.fail(f"the decode server gave up: {msg.reason}")
            self._orphans.pop(msg.room, None)

    def _on_peer_closed(self, fd: int) -> None:
        """A decode stage's connection (socket ``fd``) closed: the peers seen on it become
        suspects, probed by ``_probe_suspects`` until they prove gone or a while passes (a new
        connection may already reuse the fd, and zmq drops a closed peer's route a little after
        it reports the close)."""
        deadline = time.monotonic() + SUSPECT_PROBE_S
        for ident in self._fd_peers.pop(fd, set()):
            self._suspects[ident] = deadline

    def _probe_suspects(self) -> None:
        """Ping each suspect; one that is no longer routable (ROUTER_MANDATORY refuses it) is
        gone: the rooms waiting on it fail now rather than at their timeout."""
        now = time.monotonic()
        for ident, deadline in list(self._suspects.items()):
            try:
                self._router.send_multipart([ident, encode(Ping())], zmq.NOBLOCK)
            except zmq.ZMQError:  # EHOSTUNREACH: gone
                del self._suspects[ident]
                self._fail_rooms_waiting_on(ident, "the decode server closed its connection (did the decode server stop?)")
                for key, (metas, _) in list(self._orphans.items()):
                    if any(i == ident for _, i in metas):
                        del self._orphans[key]
                continue
            if now > deadline:  # still routable: a live peer (or the timeout will tell)
                del self._suspects[ident]

    def _add_leg(self, room: Room, meta: Meta, ident: bytes) -> None:
        """A decode stage asked for this room's pages: one more leg; once every decode stage
        that shares layers with this one has asked, the room is ready (and a send that came
        first goes out)."""
        a = self.args
        mismatch = self._check_layout(meta.page_size, meta.page_bytes, meta.layers, meta.split)
        remote = layer_range(meta.layers, len(meta.page_bytes))
        room.legs[ident] = Leg(ident, meta.rank, overlap(a.layer_range, remote), meta.layers or None, meta)
        if mismatch:
            room.fail(mismatch)
            self._tell_peer(room, mismatch)
            return
        split = [tuple(x) for x in meta.split] or [remote]
        room.expected = sum(1 for r, lay in enumerate(split) if linked(a.pp_rank, a.layer_range, r, lay))
        if len(room.legs) >= room.expected and room.state is KVPoll.Bootstrapping:
            room.state = KVPoll.WaitingForInput
            if room.pending is not None:
                pages, aux = room.pending
                room.pending = None
                self._send(room, pages, aux)

    def _send(self, room: Room, pages: list[int], aux: list[int]) -> None:
        if room.state is KVPoll.Failed:
            return
        if room.state is KVPoll.Bootstrapping:
            if self.args.split is None or len(self.args.layer_split) < 2:
                room.fail("pages were sent before the decode server asked for them")
                return
            room.pending = (pages, aux)  # a pipeline stage: the decode stages' Metas are on their way
            return
        short = [leg for leg in room.legs.values() if leg.meta is not None and len(pages) > len(leg.meta.pages)]
        if short:
            room.fail(f"the decode server reserved {len(short[0].meta.pages)} pages but the prompt needs {len(pages)}")
            self._tell_peer(room, "too few pages reserved")
            return
        room.state = KVPoll.Transferring
        try:
            for leg in room.legs.values():
                frames = self._deliver(room, leg, pages)
                data = Data(room.room, len(pages), aux, layers=list(leg.layers or ()))
                self._router.send_multipart([leg.peer, encode(data), *frames], copy=False)
        except zmq.ZMQError as exc:
            room.fail(f"the decode server is unreachable ({exc})")

    def _deliver(self, room: Room, leg: Leg, pages: list[int]) -> list[Any]:
        """Move one leg's pages (or prepare their frames): one gathered array per buffer."""
        if leg.layers is None:
            return []
        idx = np.asarray(pages, dtype=np.int64)
        return [np.ascontiguousarray(self._views[i][idx]) for i in self.args.buffer_indices(*leg.layers)]

    def _meta_extra(self) -> dict[str, Any]:
        return {}

    def _expire_orphans(self) -> None:
        if self._orphans:
            for key in [k for k, (_, t) in self._orphans.items() if t.expired()]:
                del self._orphans[key]

    # decode side
    def _set_route(self, room: Room, route: dict[str, Any], poller: zmq.Poller) -> None:
        """The prefill server's stages are known: one leg per stage sharing layers with this
        one (and stage 0 to stage 0), each with a connection."""
        a = self.args
        ranks = route.get("ranks") or [route]
        legs: dict[str, Leg] = {}
        covered = 0
        split = [layer_range(x.get("layers"), len(x.get("page_bytes") or [])) for x in ranks]
        for r, info in enumerate(ranks):
            remote = split[r]
            if not linked(r, remote, a.pp_rank, a.layer_range):
                continue
            mismatch = self._check_layout(info.get("page_size"), info.get("page_bytes"), info.get("layers"), split)
            if mismatch:
                room.fail(mismatch)
                return
            endpoint = _endpoint(info)
            if endpoint not in self._dealers:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                # Watch the connection: a prefill server that goes away fails its rooms at once
                # instead of at their timeout.
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
                self._monitors[monitor] = endpoint
                poller.register(monitor, zmq.POLLIN)
                sock.connect(endpoint)
                self._dealers[endpoint] = sock
                self._endpoints[sock] = endpoint
                poller.register(sock, zmq.POLLIN)
            shared = overlap(remote, a.layer_range)
            covered += 0 if shared is None else shared[1] - shared[0]
            legs[endpoint] = Leg(endpoint, r, shared, info.get("layers"))
        if covered != a.layer_range[1] - a.layer_range[0]:
            room.fail(f"the prefill server's stages do not hold layers {a.layer_range} of this decode stage")
            return
        room.legs, room.expected = legs, len(legs)
        if room.state is KVPoll.Bootstrapping:
            room.state = KVPoll.WaitingForInput

    def _fail_rooms_waiting_on(self, peer: Any, reason: str) -> None:
        """Fail every unfinished room with a leg to ``peer`` that has not completed."""
        for room in list(self._rooms.values()):
            if room.state not in (KVPoll.Success, KVPoll.Failed) and any(
                    leg.peer == peer and not leg.done for leg in room.legs.values()):
                room.fail(reason)

    def _on_connection_event(self, endpoint: str, event: int, poller: zmq.Poller) -> None:
        """The connection to a prefill stage's ``endpoint`` dropped, or cannot be made: every
        room still waiting for pages from it fails now, routes naming it are looked up again,
        and its dealer is closed (zmq would otherwise retry a dead endpoint forever); a later
        route to it connects afresh."""
        why = "closed the connection" if event == zmq.EVENT_DISCONNECTED else "refused the connection"
        self._fail_rooms_waiting_on(endpoint, f"the prefill server's KV endpoint {endpoint} {why} "
                                              "(did the prefill server stop?)")
        with self._routes_lock:
            for key, (route, _) in list(self._routes.items()):
                if any(_endpoint(x) == endpoint for x in route.get("ranks") or [route]):
                    del self._routes[key]
        sock = self._dealers.pop(endpoint, None)
        if sock is not None:
            monitor = next(m for m, e in self._monitors.items() if e == endpoint)
            del self._monitors[monitor], self._endpoints[sock]
            poller.unregister(sock)
            poller.unregister(monitor)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    @property
    def num_connections(self) -> int:
        """Decode side: prefill stages this manager holds a connection (dealer) to."""
        return len(self._dealers)

    def _on_decode_message(self, endpoint: str, frames: list[zmq.Frame]) -> None:
        msg = decode(frames[0].bytes)
        room = self._rooms.get(msg.room)
        if isinstance(msg, Fail):
            if room is not None:
                room.fail(f"the prefill server gave up: {msg.reason}")
            return
        if not isinstance(msg, Data):
            return
        if room is None or room.state is not KVPoll.Transferring:
            return  # aborted or timed out here: the pages are dropped, never written
        leg = room.legs.get(endpoint)
        if leg is None or leg.done:
            return
        try:
            self._accept(room, leg, msg, frames[1:])
        except Exception as exc:  # noqa: BLE001
            room.fail(f"the KV pages could not be written: {exc}")
            self._tell_peer(room, str(room.error))
            return
        leg.done = True
        if msg.aux:
            room.aux = list(msg.aux)
        self._dealers[endpoint].send(encode(Ack(room.room)), zmq.NOBLOCK)
        if all(leg.done for leg in room.legs.values()):
            room.state = KVPoll.Success

    def _accept(self, room: Room, leg: Leg, msg: Data, frames: list[zmq.Frame]) -> None:
        """Write one leg's received pages into the reserved ones."""
        idx = self.args.buffer_indices(*leg.layers) if leg.layers is not None else []
        if len(frames) != len(idx) or (msg.layers or None) != (list(leg.layers) if leg.layers else None):
            raise TransferError(f"got {len(frames)} KV buffers of layers {msg.layers}, expected {len(idx)} of "
                                f"layers {leg.layers}")
        num_pages = msg.num_pages
        dst = np.asarray(room.pages[:num_pages], dtype=np.int64)
        for i, frame in zip(idx, frames):
            self._views[i][dst] = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(num_pages, -1)
