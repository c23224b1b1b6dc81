"""The HTTP side of disaggregated serving: the bootstrap fields that sglang-router adds to every
request it sends to a prefill and a decode server (``bootstrap_host``, ``bootstrap_port``,
``bootstrap_room``; lists of them for a batch), validated into one ``BootstrapAddr`` per
generated sequence, and the rooms this server has in flight (a reused room is a 400, not two
requests sharing one transfer).

``bootstrap_port`` may be null (the router was given no port for the prefill server): the
decode side then assumes the default ``disaggregation.bootstrap_port``. A prefill server only
needs the room (it is the bootstrap host itself).
"""

from __future__ import annotations

from typing import Any

from loopserve.core.disagg.base import BootstrapAddr
from loopserve.core.disagg.role import RoomBook
from loopserve.core.server.errors import bad_request

FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
DEFAULT_BOOTSTRAP_PORT = 8998


def _per_item(body: dict[str, Any], name: str, n: int) -> list[Any]:
    value = body.get(name)
    if isinstance(value, list):
        if len(value) != n:
            raise bad_request(f"{name} has {len(value)} entries for {n} sequences; send one per sequence "
                              "(sglang-router does)", name)
        return value
    if n > 1 and name == "bootstrap_room":
        raise bad_request(f"bootstrap_room must be a list of {n} distinct room ids for a batch of {n}", name)
    return [value] * n


def bootstrap_addrs(config: Any, body: dict[str, Any], n: int) -> list[BootstrapAddr]:
    """One address per sequence, or a 400 saying which field is missing or malformed."""
    mode = config.disaggregation.mode
    missing = [f for f in FIELDS if body.get(f) is None and not (f == "bootstrap_port" or
                                                                  (mode == "prefill" and f == "bootstrap_host"))]
    if missing:
        raise bad_request(f"this is a disaggregated {mode} server: requests need bootstrap_host, bootstrap_port "
                          f"and bootstrap_room (sglang-router adds them); missing {', '.join(missing)}", missing[0])
    hosts = _per_item(body, "bootstrap_host", n)
    ports = _per_item(body, "bootstrap_port", n)
    rooms = _per_item(body, "bootstrap_room", n)
    default_port = int(config.disaggregation.bootstrap_port) or DEFAULT_BOOTSTRAP_PORT
    addrs = []
    for host, port, room in zip(hosts, ports, rooms):
        if mode == "prefill" and host is None:
            host = str(config.server.host)
        if port is None:
            port = default_port
        if isinstance(port, float) and port.is_integer():
            port = int(port)
        try:
            addrs.append(BootstrapAddr.parse(host, port, room))
        except ValueError as exc:
            field = next((f for f in FIELDS if str(exc).startswith(f)), None)
            raise bad_request(str(exc), field) from None
    if len({a.room for a in addrs}) != n:
        raise bad_request("bootstrap_room must differ between the sequences of one request", "bootstrap_room")
    return addrs


class Rooms:
    """Rooms of this server's requests in flight (claimed at submission, released when the
    request's HTTP call ends)."""

    def __init__(self) -> None:
        self.book = RoomBook()

    def claim(self, addrs: list[BootstrapAddr], rids: list[str]) -> None:
        done = []
        try:
            for addr, rid in zip(addrs, rids):
                self.book.claim(addr, rid)
                done.append(addr.room)
        except ValueError as exc:
            for room in done:
                self.book.release(room)
            raise bad_request(str(exc), "bootstrap_room") from None

    def release(self, addrs: list[BootstrapAddr]) -> None:
        for addr in addrs:
            self.book.release(addr.room)
