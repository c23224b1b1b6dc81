"""The ``zmq`` backend's wire messages and per-room state, and the sender / receiver handles the
schedulers poll. The manager that moves the messages is ``core/disagg/zmq_transfer.py``.

Messages are msgspec structs tagged by kind (never pickle). A ``Room`` is written by the
manager's thread and read by the scheduler thread (single attribute writes under the GIL); the
handles turn a room Failed themselves once its timeout passes without progress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from loopserve.core.disagg.base import BootstrapAddr, KVPoll, KVReceiver, KVSender, TransferError, TransferTimer

if TYPE_CHECKING:  # pragma: no cover
    from loopserve.core.disagg.zmq_transfer import ZmqManager

class Meta(msgspec.Struct, tag="meta"):
    """Decode stage -> prefill stage: where a room's pages go. ``layers`` are the decode
    stage's layers (its ``page_bytes`` cover them), ``split`` the decode server's whole layer
    split (so a prefill stage knows how many decode stages to wait for), ``rank`` its stage."""

    room: int
    pages: list[int]
    page_size: int
    page_bytes: list[int]
    extra: dict[str, Any] = {}
    rank: int = 0
    layers: list[int] = []
    split: list[list[int]] = []


class Data(msgspec.Struct, tag="data"):
    """Prefill stage -> decode stage: the pages of ``layers`` follow (K of each layer, then V)."""

    room: int
    num_pages: int
    aux: list[int]
    layers: list[int] = []


class Ack(msgspec.Struct, tag="ack"):
    room: int


class Fail(msgspec.Struct, tag="fail"):
    room: int
    reason: str


class Ping(msgspec.Struct, tag="ping"):
    """Prefill -> decode, ignored there: a send that tells the prefill whether a decode
    stage's connection is still routable (ROUTER_MANDATORY refuses a gone peer)."""


Message = Meta | Data | Ack | Fail | Ping
encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Message).decode


class Leg:
    """One pair of stages exchanging a room's pages (one leg per pair without pipelines)."""

    __slots__ = ("peer", "rank", "layers", "remote", "meta", "done")

    def __init__(self, peer: Any, rank: int, layers: tuple[int, int] | None, remote: Any,
                 meta: "Meta | None" = None) -> None:
        self.peer = peer  # prefill: the decode stage's ROUTER identity; decode: the prefill stage's endpoint
        self.rank = rank  # the other side's pipeline stage
        self.layers = layers  # the layers this leg moves; None: only the first token
        self.remote = remote  # the other side's ``KVArgs.layers`` (None: opaque buffers)
        self.meta = meta  # prefill: that decode stage's Meta
        self.done = False  # prefill: acknowledged; decode: written


class Room:
    """State of one room, written by the manager thread, read by the scheduler thread."""

    def __init__(self, room: int, timeout_s: float) -> None:
        self.room = room
        self.state = KVPoll.Bootstrapping
        self.error: TransferError | None = None
        self.timer = TransferTimer(timeout_s)
        self.aux: list[int] = []
        self.legs: dict[Any, Leg] = {}
        self.expected = 1  # legs to hear from (prefill: decode stages that ask for pages)
        self.pages: list[int] = []  # decode: the reserved destination pages
        self.pending: tuple[list[int], list[int]] | None = None  # prefill: a send before every Meta came
        self.num_pages = 0
        self.route_key: tuple[str, int] | None = None  # decode: the bootstrap server it was routed by

    def fail(self, reason: str) -> None:
        if self.state not in (KVPoll.Success, KVPoll.Failed):
            self.error = TransferError(reason)
            self.state = KVPoll.Failed

    def poll(self, what: str) -> KVPoll:
        if self.state not in (KVPoll.Success, KVPoll.Failed) and self.timer.expired():
            self.fail(f"{what} in {self.timer.timeout_s:g} s (disaggregation.transfer_timeout_s)")
        return self.state


class ZmqSender(KVSender):
    def __init__(self, manager: "ZmqManager", room: Room) -> None:
        super().__init__(room.room)
        self._m, self._r = manager, room

    def init(self, num_pages: int, aux_index: int = 0) -> None:
        self._r.num_pages = num_pages

    def send(self, page_ids: list[int], aux: list[int]) -> None:
        self._r.timer.restart()
        self._m._command(("send", self._r, list(page_ids), list(aux)))

    def poll(self) -> KVPoll:
        what = ("the decode server did not ask for this request's KV"
                if self._r.state is KVPoll.Bootstrapping else "the decode server did not confirm the KV")
        return self._r.poll(what)

    def failure_exception(self) -> TransferError:
        return self._r.error or TransferError("the transfer has not failed")

    def abort(self) -> None:
        self._r.fail("aborted")
        self._m._command(("forget", self._r, "the prefill server aborted the request"))


class ZmqReceiver(KVReceiver):
    def __init__(self, manager: "ZmqManager", room: Room, addr: BootstrapAddr) -> None:
        super().__init__(room.room)
        self._m, self._r, self._addr = manager, room, addr

    def init(self) -> None:
        self._m._lookup(self._r, self._addr)

    def send_metadata(self, page_ids: list[int], aux_index: int = 0) -> None:
        self._r.timer.restart()
        self._r.state = KVPoll.Transferring
        self._m._command(("meta", self._r, list(page_ids)))

    def poll(self) -> KVPoll:
        what = (f"the prefill server at {self._addr.host}:{self._addr.port} could not be reached"
                if self._r.state is KVPoll.Bootstrapping else "the prefill server did not send the KV")
        return self._r.poll(what)

    def aux(self) -> list[int]:
        return list(self._r.aux)

    def failure_exception(self) -> TransferError:
        return self._r.error or TransferError("the transfer has not failed")

    def abort(self) -> None:
        self._r.fail("aborted")
        self._m._command(("forget", self._r, "the decode server aborted the request"))
