"""The ``mooncake`` KV-transfer backend: the Mooncake transfer engine writes the pages straight
from the prefill server's KV buffers into the decode server's, one-sided.

Control messages (destination pages, completion, failure) travel exactly as in the ``zmq``
backend, which this subclasses; only the pages take another path. Each decode server registers
its KV buffers with its transfer engine and sends, with a room's destination pages, its engine
session (``host:rpc_port``) and the buffers' base addresses; the prefill server's engine then
writes each page with ``batch_transfer_sync_write`` before it announces the room's data.

The engine runs with the P2P handshake (no metadata server) over ``tcp`` by default; on RDMA
hosts set ``protocol="rdma"`` (``disaggregation`` options of the plugin). Needs the
``mooncake-transfer-engine-non-cuda`` wheel on CPU hosts (which needs the system libraries
libibverbs1, libnl-3-200 and libnl-route-3-200) or ``mooncake-transfer-engine`` on CUDA hosts.
"""

from __future__ import annotations

from typing import Any

from loopserve.core.disagg.base import KVArgs, TransferError, buffer_indices
from loopserve.core.disagg.zmq_rooms import Leg, Room
from loopserve.core.disagg.zmq_transfer import ZmqManager

#: Writes per ``batch_transfer_sync_write`` call.
MAX_BATCH = 128


def _load_engine() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise ValueError(
            "disaggregation.transfer_backend=mooncake needs the Mooncake transfer engine: "
            "`pip install mooncake-transfer-engine-non-cuda` (CPU hosts; also install the system "
            f"libraries libibverbs1 libnl-3-200 libnl-route-3-200) ({exc})") from None
    return TransferEngine


class MooncakeManager(ZmqManager):
    backend = "mooncake"

    def __init__(self, role: str, args: KVArgs, timeout_s: float, *, host: str = "127.0.0.1",
                 bootstrap_port: int | None = None, protocol: str = "tcp") -> None:
        engine = _load_engine()()
        if engine.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
            raise ValueError(f"the Mooncake transfer engine did not start on {host} with protocol {protocol}")
        self.engine = engine
        self.session = f"{host}:{engine.get_rpc_port()}"
        self._bases = [int(b.ctypes.data) for b in args.buffers]
        for base, buf in zip(self._bases, args.buffers):
            if engine.register_memory(base, int(buf.nbytes)) != 0:
                raise ValueError("the Mooncake transfer engine could not register the KV buffers")
        super().__init__(role, args, timeout_s, host=host, bootstrap_port=bootstrap_port)

    def _meta_extra(self) -> dict[str, Any]:
        return {"session": self.session, "bases": self._bases}

    def _deliver(self, room: Room, leg: Leg, pages: list[int]) -> list[Any]:
        if leg.layers is None or not self._bases:
            return []
        assert leg.meta is not None
        extra = leg.meta.extra
        remote = list(extra.get("bases") or [])
        theirs = buffer_indices(leg.remote, len(remote), *leg.layers)
        if not extra.get("session") or (theirs and max(theirs) >= len(remote)):
            raise TransferError("the decode server did not send its Mooncake session and buffer addresses")
        src: list[int] = []
        dst: list[int] = []
        lengths: list[int] = []
        for i, j in zip(self.args.buffer_indices(*leg.layers), theirs):
            base, rbase, size = self._bases[i], remote[j], self.args.page_bytes[i]
            for s, d in zip(pages, leg.meta.pages):
                a, b = base + s * size, rbase + d * size
                if src and src[-1] + lengths[-1] == a and dst[-1] + lengths[-1] == b:
                    lengths[-1] += size  # contiguous on both sides: one larger write
                else:
                    src.append(a)
                    dst.append(b)
                    lengths.append(size)
        session = str(extra["session"])
        # NOTE: the engine rejects very large batches; submit a bounded number of writes at a time.
        for i in range(0, len(src), MAX_BATCH):
            j = i + MAX_BATCH
            if self.engine.batch_transfer_sync_write(session, src[i:j], dst[i:j], lengths[i:j]) != 0:
                raise TransferError(f"the Mooncake transfer to {session} failed")
        return []  # the pages are in place; the Data message only announces them

    def _accept(self, room: Room, leg: Leg, msg: Any, frames: list[Any]) -> None:
        if frames:
            raise TransferError("unexpected page frames on the mooncake backend")
        if (msg.layers or None) != (list(leg.layers) if leg.layers else None):
            raise TransferError(f"got the pages of layers {msg.layers}, expected layers {leg.layers}")

    def close(self) -> None:
        if self._stopped.is_set():
            return
        super().close()
        for base in self._bases:
            self.engine.unregister_memory(base)
