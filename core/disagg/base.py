"""The KV-transfer interface every backend implements: a manager per server, a sender per
request on the prefill server, a receiver per request on the decode server.

The shape follows SGLang's disaggregation connectors, so that a transport written for one
translates to the other: both sides are *polled* by the scheduler loop (never blocking it),
through the states ``Bootstrapping -> WaitingForInput -> Transferring -> Success | Failed``.

- Prefill: ``manager.make_sender(room, addr)``; ``init(num_pages, aux_index)`` once the pages
  are known; ``send(page_ids, aux)`` after the prompt's forward; ``poll()`` until Success
  (the decode server acknowledged the pages) or Failed.
- Decode: ``manager.make_receiver(room, addr)``; ``poll()`` is Bootstrapping until the prefill
  server was found, then WaitingForInput; ``send_metadata(page_ids, aux_index)`` says where the
  pages go; ``poll()`` until Success, when ``aux()`` returns the prefill's auxiliary data (its
  first sampled token).

Pages are moved as raw bytes: ``KVArgs.buffers`` are the worker's KV buffers as 2-D ``uint8``
arrays of ``[num_slots, bytes_per_slot]`` (one per layer and K/V), and page ``p`` is rows
``p * page_size .. (p + 1) * page_size - 1`` of every buffer. Both servers must use the same
page size and per-layer buffer shapes; the handshake checks it.

Pipeline parallelism (``parallel.pp_size > 1``) on either side: every pipeline stage holds the
KV of its own layers, so every stage runs a manager of its own over its buffers
(``KVArgs.layers``; ``KVArgs.split`` is the whole server's layer split). A decode stage
exchanges pages with each prefill stage whose layers overlap its own (a *leg* of the room),
so the two servers may split the layers differently. The first sampled token travels on the
leg between the two stage-0 managers, which always exists.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["BootstrapAddr", "KVArgs", "KVManager", "KVPoll", "KVReceiver", "KVSender", "TransferError",
           "buffer_indices", "layer_range", "linked", "overlap"]

#: Largest bootstrap room id the router draws (a u64 masked to 63 bits).
MAX_ROOM = (1 << 63) - 1
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def valid_host(host: str) -> str | None:
    """``host`` as an IP address or DNS name (RFC 1123), brackets of an IPv6 literal removed;
    None when it is neither (a URL, a port, spaces, ...)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    with contextlib.suppress(ValueError):  # not an address: maybe a name
        return str(ipaddress.ip_address(bare))
    if bare is host and len(host) <= 253 and all(_HOST_LABEL.fullmatch(x) for x in host.removesuffix(".").split(".")):
        return host
    return None


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host else host


class KVPoll(enum.IntEnum):
    """Transfer state of one request (SGLang's numbering)."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class TransferError(RuntimeError):
    """Why a request's KV transfer failed (``failure_exception()``)."""


@dataclass(frozen=True)
class BootstrapAddr:
    """Where a request's prefill server is found, and the room that pairs the two sides."""

    host: str
    port: int
    room: int

    @classmethod
    def parse(cls, host: Any, port: Any, room: Any) -> "BootstrapAddr":
        """Validate user-given bootstrap fields; ``ValueError`` naming the field otherwise."""
        checked = valid_host(host) if isinstance(host, str) else None
        if checked is None:
            raise ValueError(f"bootstrap_host must be the prefill server's host name or IP address (no scheme or "
                             f"port); got {host!r:.80}")
        host = checked
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bootstrap_port must be the prefill server's bootstrap port (1-65535); got {port!r}")
        if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room <= MAX_ROOM:
            raise ValueError(f"bootstrap_room must be an integer in [0, 2**63); got {room!r}")
        return cls(host, port, room)


@dataclass
class KVArgs:
    """What a backend moves: the worker's KV buffers and how they are paged.

    ``buffers``: 2-D ``uint8`` numpy arrays ``[num_slots, bytes_per_slot]`` sharing memory with
    the worker's cache (empty for a worker without KV data). ``aux_bytes`` is the size of one
    request's auxiliary record (the first sampled token)."""

    buffers: list[Any]
    page_size: int
    num_slots: int
    aux_bytes: int = 8
    #: The global decoder layers ``[start, end)`` the buffers hold (K of each, then V of
    #: each); None: the buffers are one opaque unit (a worker without a pipeline split).
    layers: tuple[int, int] | None = None
    #: The whole server's layer split over its pipeline stages; None: one stage.
    split: list[tuple[int, int]] | None = None

    @property
    def layer_range(self) -> tuple[int, int]:
        return layer_range(self.layers, len(self.buffers))

    @property
    def layer_split(self) -> list[tuple[int, int]]:
        if self.split:
            return [(int(a), int(b)) for a, b in self.split]
        return [self.layer_range]

    @property
    def pp_rank(self) -> int:
        """This manager's pipeline stage (the index of its layers in the split)."""
        split = self.layer_split
        return split.index(self.layer_range) if self.layer_range in split else 0

    def buffer_indices(self, lo: int, hi: int) -> list[int]:
        """Indices into ``buffers`` of global layers ``[lo, hi)``: their K buffers, then V."""
        return buffer_indices(self.layers, len(self.buffers), lo, hi)

    @property
    def num_pages(self) -> int:
        return self.num_slots // self.page_size

    @property
    def page_bytes(self) -> list[int]:
        return [int(b.shape[1]) * self.page_size for b in self.buffers]

    def page_views(self) -> list[Any]:
        """Each buffer as ``[num_pages, page_bytes]`` (a view: writes land in the cache)."""
        return [b[: self.num_pages * self.page_size].reshape(self.num_pages, -1) for b in self.buffers]


def layer_range(layers: Any, num_buffers: int) -> tuple[int, int]:
    """The layers a stage's buffers hold; opaque buffers (``layers`` None) count as layer 0."""
    if layers:
        return (int(layers[0]), int(layers[1]))
    return (0, 1) if num_buffers else (0, 0)


def buffer_indices(layers: Any, num_buffers: int, lo: int, hi: int) -> list[int]:
    """Where global layers ``[lo, hi)`` are among a stage's ``num_buffers`` buffers holding
    ``layers`` (K of each of its layers, then V of each; all of them when opaque)."""
    if not num_buffers:
        return []
    if not layers:
        return list(range(num_buffers)) if lo <= 0 < hi else []
    start, n = int(layers[0]), int(layers[1]) - int(layers[0])
    ks = list(range(lo - start, hi - start))
    return ks + [n + i for i in ks]


def overlap(a: Any, b: Any) -> tuple[int, int] | None:
    """The layers two ``[start, end)`` ranges share, or None."""
    lo, hi = max(int(a[0]), int(b[0])), min(int(a[1]), int(b[1]))
    return (lo, hi) if lo < hi else None


def linked(rank_a: int, layers_a: Any, rank_b: int, layers_b: Any) -> bool:
    """Whether a prefill stage and a decode stage exchange anything for a room: they share
    layers, or both are stage 0 (that leg carries the first token, also with no KV data)."""
    return overlap(layers_a, layers_b) is not None or (rank_a == 0 and rank_b == 0)


@dataclass
class TransferTimer:
    """Deadline bookkeeping shared by senders and receivers."""

    timeout_s: float
    start: float = field(default_factory=time.monotonic)

    def expired(self) -> bool:
        return time.monotonic() - self.start > self.timeout_s

    def restart(self) -> None:
        self.start = time.monotonic()


class KVSender(ABC):
    """One request's transfer on the prefill server. Called from the scheduler thread only."""

    def __init__(self, room: int) -> None:
        self.room = room

    @abstractmethod
    def init(self, num_pages: int, aux_index: int = 0) -> None:
        """The request will send ``num_pages`` pages (its prompt's KV)."""

    @abstractmethod
    def send(self, page_ids: list[int], aux: list[int]) -> None:
        """Send the prompt's pages (its KV is computed) and the auxiliary data (first token)."""

    @abstractmethod
    def poll(self) -> KVPoll:
        """The current state; turns Failed itself when its timeout passes."""

    @abstractmethod
    def failure_exception(self) -> TransferError:
        """Why the transfer failed (only meaningful after ``poll()`` returned Failed)."""

    @abstractmethod
    def abort(self) -> None:
        """Give up: the request is gone; release what the transfer holds."""


class KVReceiver(ABC):
    """One request's transfer on the decode server. Called from the scheduler thread only."""

    def __init__(self, room: int) -> None:
        self.room = room

    @abstractmethod
    def init(self) -> None:
        """Start looking up the prefill server (asynchronously)."""

    @abstractmethod
    def send_metadata(self, page_ids: list[int], aux_index: int = 0) -> None:
        """Tell the prefill server where this request's pages go (pre-allocated here)."""

    @abstractmethod
    def poll(self) -> KVPoll:
        """The current state; turns Failed itself when its timeout passes."""

    @abstractmethod
    def aux(self) -> list[int]:
        """The auxiliary data received with the pages (after Success): the first token."""

    @abstractmethod
    def failure_exception(self) -> TransferError:
        """Why the transfer failed."""

    @abstractmethod
    def abort(self) -> None:
        """Give up: late pages for this room are dropped, never written."""


class KVManager(ABC):
    """A server's transfer endpoint: one per scheduler, made by ``loopserve_make_kv_manager``.

    On the prefill server it also registers with the bootstrap server
    (``register_to_bootstrap``). ``close()`` stops its threads and sockets; idempotent."""

    def __init__(self, role: str, args: KVArgs, timeout_s: float) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode; got {role!r}")
        self.role = role
        self.args = args
        self.timeout_s = timeout_s
        #: Called (from any thread) when a transfer changed state, so an idle loop wakes up
        #: to poll instead of sleeping out its idle wait. The scheduler sets it.
        self.on_progress: Callable[[], None] | None = None

    @abstractmethod
    def make_sender(self, addr: BootstrapAddr) -> KVSender:
        """A sender for one request (prefill role)."""

    @abstractmethod
    def make_receiver(self, addr: BootstrapAddr) -> KVReceiver:
        """A receiver for one request (decode role)."""

    def register_to_bootstrap(self, bootstrap_url: str) -> None:
        """Publish this prefill server's transfer endpoint at ``bootstrap_url`` (prefill role)."""

    def release(self, room: int) -> None:
        """The scheduler is done with ``room`` (finished, failed or aborted): forget it, so
        the id may be used again."""

    @abstractmethod
    def close(self) -> None:
        """Stop threads, close sockets."""
