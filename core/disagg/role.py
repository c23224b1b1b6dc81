"""What the prefill and decode scheduler roles share: building the KV-transfer manager from
config, claiming bootstrap rooms, and failing a request whose transfer failed. No torch."""

from __future__ import annotations

import threading
from typing import Any

from loopserve.core.disagg.base import BootstrapAddr, KVArgs, KVManager
from loopserve.core.sched.req import FinishKind, Req


def make_kv_manager(scheduler: Any, role: str) -> KVManager:
    """Ask the ``loopserve_make_kv_manager`` hook for ``disaggregation.transfer_backend``."""
    config, worker = scheduler.config, scheduler.worker
    kv_args = worker.kv_buffers() if hasattr(worker, "kv_buffers") else None
    if kv_args is None:  # a worker without KV data: only the first token travels
        kv_args = KVArgs(buffers=[], page_size=scheduler.page_size, num_slots=int(worker.num_kv_slots))
    name = str(config.disaggregation.transfer_backend)
    manager = scheduler.pm.hook.loopserve_make_kv_manager(name=name, role=role, config=config, kv_args=kv_args)
    if manager is None:
        raise ValueError(f"no installed plugin provides the KV-transfer backend {name!r}; use "
                         "disaggregation.transfer_backend=zmq or mooncake, or install the plugin")
    stages = getattr(worker, "kv_transfer_stages", None)
    if stages is not None and len(kv_args.layer_split) > 1:  # pipeline stages move their own layers
        try:
            return stages(manager)
        except BaseException:
            manager.close()
            raise
    return manager


class RoomBook:
    """Bootstrap rooms in use on this server. A room id names one request's transfer; a second
    request with the same id is refused at submission (HTTP 400) rather than mixing KV."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[int, str] = {}

    def claim(self, addr: BootstrapAddr, rid: str) -> None:
        with self._lock:
            owner = self._rooms.get(addr.room)
            if owner is not None and owner != rid:
                raise ValueError(f"bootstrap_room {addr.room} is already in use on this server; "
                                 "send every request with a fresh room id")
            self._rooms[addr.room] = rid

    def release(self, room: int) -> None:
        with self._lock:
            self._rooms.pop(room, None)

    def __len__(self) -> int:
        return len(self._rooms)


class TransferRoleMixin:
    """Mixed into ``Scheduler`` by both roles."""

    role: str
    kv_manager: KVManager
    rooms: RoomBook

    def _init_transfer(self) -> None:
        self.rooms = RoomBook()
        self.kv_manager = make_kv_manager(self, self.role)
        self.kv_manager.on_progress = self.inbox.wake  # type: ignore[attr-defined]

    def claim_room(self, req: Req) -> str | None:
        """Claim ``req``'s room; the reason it cannot run, or None."""
        if not isinstance(req.bootstrap, BootstrapAddr):
            return (f"this is a disaggregated {self.role} server: the request needs bootstrap_host, "
                    "bootstrap_port and bootstrap_room (sglang-router adds them)")
        try:
            self.rooms.claim(req.bootstrap, req.rid)
        except ValueError as exc:
            return str(exc)
        return None

    def admit_transfer(self, req: Req, make_handle: Any) -> Any:
        """Claim ``req``'s room, validate it and make its sender or receiver with
        ``make_handle(req.bootstrap)``; on any error abort ``req`` (room released) and return
        None. Both roles admit new requests through here."""
        error = self.claim_room(req)
        claimed = error is None
        error = error or self.validate_request(req)  # type: ignore[attr-defined]
        handle = None
        if error is None:
            try:
                handle = make_handle(req.bootstrap)
            except ValueError as exc:
                error = str(exc)
        if error is not None:
            if claimed:
                self.rooms.release(req.bootstrap.room)
            req.finish(FinishKind.ABORT, message=error)
            self.stats.num_aborted += 1  # type: ignore[attr-defined]
            self._notify(req)  # type: ignore[attr-defined]
            return None
        if not req.eos_token_ids:
            req.eos_token_ids = self.eos_token_ids  # type: ignore[attr-defined]
        return handle

    def _end_transfer(self, req: Req) -> None:
        if isinstance(req.bootstrap, BootstrapAddr):
            self.kv_manager.release(req.bootstrap.room)
            self.rooms.release(req.bootstrap.room)

    def _fail_transfer(self, req: Req, message: str) -> None:
        """Finish ``req`` as aborted, free its KV and room, tell its waiter."""
        self.kv.release(req, cache=False)  # type: ignore[attr-defined]
        self._end_transfer(req)
        if not req.finished:
            req.finish(FinishKind.ABORT, message=message)
            self.stats.num_aborted += 1  # type: ignore[attr-defined]
            self._notify(req)  # type: ignore[attr-defined]

    def _close_transfer(self) -> None:
        self.kv_manager.close()
