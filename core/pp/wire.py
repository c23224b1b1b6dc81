"""What travels between pipeline stages, over a torch.distributed gloo group.

A micro-batch goes down the pipeline as three point-to-point messages from stage ``r`` to
``r + 1``: a fixed header tensor ``[kind, payload bytes, micro-batch id]``, the
``ForwardBatch`` encoded with msgspec (explicit msgpack, never pickle: a stage on another
host must not be able to run code in this one), and the hidden states ``[T, H]``. The last
stage sends the sampled token ids back to rank 0. Each kind has its own tag, and gloo keeps
the order of messages with one tag between two ranks, so no sequence numbers are needed.

Gloo closes the connection when a wait times out, so a timeout here is final: waits that may
legitimately last (an idle stage waiting for work) use no timeout and end when the peer's
process exits (its sockets close); waits for work in flight use ``parallel.stage_timeout_s``.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from loopserve.core.sched.forward_batch import ForwardBatch

BATCH, STOP = 1, 2
_TAG_HEADER, _TAG_PAYLOAD, _TAG_HIDDEN, _TAG_TOKENS = 1, 2, 3, 4
# Idle waits: "forever" for gloo (it needs some timeout); a dead peer ends them at once.
_IDLE = timedelta(days=7)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ForwardBatch)


class StageError(RuntimeError):
    """A pipeline stage died, hung past ``parallel.stage_timeout_s`` or failed."""


def local_address_toward(host: str) -> str:
    """The local address that reaches ``host`` (the interface gloo must listen on)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent; this only picks the route
            return s.getsockname()[0]
        except OSError as exc:
            raise ValueError(f"parallel.dist_init_addr host {host!r} is not reachable: {exc}") from None


def encode(fb: ForwardBatch) -> bytes:
    return _encoder.encode(fb)


def decode(payload: bytes) -> ForwardBatch:
    return _decoder.decode(payload)


class Link:
    """This rank's end of the pipeline's gloo group (its own group object, not the global
    default one, so two engines in one process each have theirs)."""

    def __init__(self, store: Any, rank: int, size: int, host: str, timeout_s: float) -> None:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _IDLE
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_toward(host))]
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("loopserve-pp", store), rank, size, opts)
        self.rank, self.size = rank, size
        self.timeout = timedelta(seconds=timeout_s)

    def _wait(self, work: Any, what: str, timeout: timedelta | None) -> None:
        try:
            work.wait(timeout) if timeout is not None else work.wait()
        except RuntimeError as exc:
            raise StageError(f"pipeline rank {self.rank}: {what} failed: {exc}") from None

    # ---- down the pipeline -------------------------------------------------------------

    def send_batch(self, dst: int, fb: ForwardBatch | None, mb_id: int, hidden: torch.Tensor | None) -> list[Any]:
        """Start sending a micro-batch (``fb`` None: the stop message); returns the send works
        to ``wait_sends`` before their tensors may change."""
        if fb is None:
            header = torch.tensor([STOP, 0, mb_id], dtype=torch.int64)
            return [self.pg.send([header], dst, _TAG_HEADER)]
        payload = encode(fb)
        header = torch.tensor([BATCH, len(payload), mb_id], dtype=torch.int64)
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        works = [self.pg.send([header], dst, _TAG_HEADER), self.pg.send([body], dst, _TAG_PAYLOAD)]
        if hidden is not None:
            works.append(self.pg.send([hidden.detach().contiguous().cpu()], dst, _TAG_HIDDEN))
        return works

    def wait_sends(self, works: list[Any]) -> None:
        for w in works:
            self._wait(w, "sending to the next stage", self.timeout)

    def recv_batch(self, src: int, hidden_shape: tuple[int, int] | None, dtype: torch.dtype,
                   idle: bool = True) -> tuple[ForwardBatch | None, int, torch.Tensor | None]:
        """The next micro-batch from ``src``: ``(fb, id, hidden)``, ``fb`` None on stop. The
        header wait has no timeout when ``idle`` (a stage waits for work as long as rank 0
        lives); the rest of the message is in flight and gets the stage timeout."""
        header = torch.zeros(3, dtype=torch.int64)
        self._wait(self.pg.recv([header], src, _TAG_HEADER), "waiting for the previous stage",
                   None if idle else self.timeout)
        kind, nbytes, mb_id = header.tolist()
        if kind == STOP:
            return None, mb_id, None
        body = torch.empty(nbytes, dtype=torch.uint8)
        self._wait(self.pg.recv([body], src, _TAG_PAYLOAD), "receiving batch metadata", self.timeout)
        fb = decode(body.numpy().tobytes())
        hidden = None
        if hidden_shape is not None:
            hidden = torch.empty((fb.num_tokens, hidden_shape[1]), dtype=dtype)
            self._wait(self.pg.recv([hidden], src, _TAG_HIDDEN), "receiving hidden states", self.timeout)
        return fb, mb_id, hidden

    # ---- back to rank 0 ------------------------------------------------------------------

    def send_tokens(self, dst: int, tokens: torch.Tensor) -> Any:
        return self.pg.send([tokens.to(torch.int64).contiguous().cpu()], dst, _TAG_TOKENS)

    def recv_tokens(self, src: int, n: int) -> list[int]:
        tokens = torch.empty(n, dtype=torch.int64)
        self._wait(self.pg.recv([tokens], src, _TAG_TOKENS), "waiting for the last stage's tokens",
                   self.timeout)
        return tokens.tolist()
