"""What travels between pipeline stages, over a torch.distributed gloo group.

A micro-batch goes down the pipeline from stage ``r`` to ``r + 1`` as one fixed-size frame:
a header ``[kind, metadata bytes, hidden bytes, micro-batch id, inline]``, the
``ForwardBatch`` encoded with msgspec (explicit msgpack, never pickle: a stage on another
host must not be able to run code in this one), and the hidden states ``[T, H]`` when they
fit; what does not fit follows as one more message each. The last
stage sends the sampled token ids back to rank 0 (with the time they are ready, which only
the sim worker's modelled device sets). Each kind has its own tag, and gloo keeps
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

from loopserve.core.pp.future import StageError
from loopserve.core.sched.forward_batch import ForwardBatch

BATCH, STOP = 1, 2
_TAG_FRAME, _TAG_OVERFLOW, _TAG_HIDDEN, _TAG_TOKENS, _TAG_EXTRA_LEN, _TAG_EXTRA = 1, 2, 3, 4, 5, 6
# One fixed-size frame per micro-batch carries the header, the metadata and, when they fit,
# the hidden states: every message costs the receiver a wake-up and a handshake, so a small
# micro-batch (a decode step) crosses in one message. Larger parts follow in their own.
FRAME_BYTES = 1 << 16
_HEADER_BYTES = 40  # int64: kind, metadata bytes, hidden bytes, micro-batch id, hidden inline
# Idle waits: "forever" for gloo (it needs some timeout); a dead peer ends them at once.
_IDLE = timedelta(days=7)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ForwardBatch)


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
        buf = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        if fb is None:
            buf[:_HEADER_BYTES].view(torch.int64)[:] = torch.tensor([STOP, 0, 0, mb_id, 0])
            return [self.pg.send([buf], dst, _TAG_FRAME)]
        payload = torch.frombuffer(bytearray(encode(fb)), dtype=torch.uint8)
        flat = None if hidden is None else hidden.detach().contiguous().cpu().view(-1).view(torch.uint8)
        n_pay, n_hid = len(payload), 0 if flat is None else len(flat)
        room = FRAME_BYTES - _HEADER_BYTES
        inline = flat is not None and n_pay + n_hid <= room
        buf[:_HEADER_BYTES].view(torch.int64)[:] = torch.tensor([BATCH, n_pay, n_hid, mb_id, int(inline)])
        head = min(n_pay, room)
        buf[_HEADER_BYTES:_HEADER_BYTES + head] = payload[:head]
        if inline:
            buf[_HEADER_BYTES + n_pay:_HEADER_BYTES + n_pay + n_hid] = flat
        works = [self.pg.send([buf], dst, _TAG_FRAME)]
        if n_pay > room:
            works.append(self.pg.send([payload[room:].clone()], dst, _TAG_OVERFLOW))
        if flat is not None and not inline:
            works.append(self.pg.send([flat], dst, _TAG_HIDDEN))
        return works

    def wait_sends(self, works: list[Any]) -> None:
        for w in works:
            self._wait(w, "sending to the next stage", self.timeout)

    def recv_batch(self, src: int, hidden_shape: tuple[int, int] | None, dtype: torch.dtype,
                   idle: bool = True) -> tuple[ForwardBatch | None, int, torch.Tensor | None]:
        """The next micro-batch from ``src``: ``(fb, id, hidden)``, ``fb`` None on stop. The
        frame wait has no timeout when ``idle`` (a stage waits for work as long as rank 0
        lives); the rest of a large message is in flight and gets the stage timeout."""
        buf = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self._wait(self.pg.recv([buf], src, _TAG_FRAME), "waiting for the previous stage",
                   None if idle else self.timeout)
        kind, n_pay, n_hid, mb_id, inline = buf[:_HEADER_BYTES].view(torch.int64).tolist()
        if kind == STOP:
            return None, mb_id, None
        room = FRAME_BYTES - _HEADER_BYTES
        payload = buf[_HEADER_BYTES:_HEADER_BYTES + min(n_pay, room)].numpy().tobytes()
        if n_pay > room:
            rest = torch.empty(n_pay - room, dtype=torch.uint8)
            self._wait(self.pg.recv([rest], src, _TAG_OVERFLOW), "receiving batch metadata", self.timeout)
            payload += rest.numpy().tobytes()
        fb = decode(payload)
        hidden = None
        if hidden_shape is not None:
            hidden = torch.empty((fb.num_tokens, hidden_shape[1]), dtype=dtype)
            flat = hidden.view(-1).view(torch.uint8)
            if n_hid != len(flat):
                raise StageError(f"pipeline rank {self.rank}: got {n_hid} bytes of hidden states, "
                                 f"expected {len(flat)} (do all stages run the same model and dtype?)")
            if inline:
                flat[:] = buf[_HEADER_BYTES + n_pay:_HEADER_BYTES + n_pay + n_hid]
            else:
                self._wait(self.pg.recv([hidden], src, _TAG_HIDDEN), "receiving hidden states", self.timeout)
        return fb, mb_id, hidden

    # ---- back to rank 0 ------------------------------------------------------------------

    def send_tokens(self, dst: int, tokens: torch.Tensor, ready_at_ns: int = 0) -> Any:
        """The sampled ids, then when they are ready on the sending device (this host's
        monotonic clock in ns; 0: now). Only the sim worker's modelled device sets it."""
        msg = torch.empty(len(tokens) + 1, dtype=torch.int64)
        msg[:-1] = tokens.to(torch.int64).cpu()
        msg[-1] = int(ready_at_ns)
        return self.pg.send([msg], dst, _TAG_TOKENS)

    def send_extras(self, dst: int, extras: Any) -> list[Any]:
        """Logprobs of a micro-batch that asked for them (``wants_extras``), after its tokens:
        a length, then the msgpack bytes."""
        payload = torch.frombuffer(bytearray(msgspec.msgpack.encode(extras)), dtype=torch.uint8)
        return [self.pg.send([torch.tensor([len(payload)], dtype=torch.int64)], dst, _TAG_EXTRA_LEN),
                self.pg.send([payload], dst, _TAG_EXTRA)]

    def recv_extras(self, src: int) -> Any:
        n = torch.empty(1, dtype=torch.int64)
        self._wait(self.pg.recv([n], src, _TAG_EXTRA_LEN), "waiting for the last stage's logprobs", self.timeout)
        payload = torch.empty(int(n.item()), dtype=torch.uint8)
        self._wait(self.pg.recv([payload], src, _TAG_EXTRA), "receiving the last stage's logprobs", self.timeout)
        return msgspec.msgpack.decode(payload.numpy().tobytes())

    def recv_tokens(self, src: int, n: int) -> tuple[list[int], int]:
        """``(token ids, ready_at_ns)`` as ``send_tokens`` sent them."""
        msg = torch.empty(n + 1, dtype=torch.int64)
        self._wait(self.pg.recv([msg], src, _TAG_TOKENS), "waiting for the last stage's tokens",
                   self.timeout)
        values = msg.tolist()
        return values[:-1], values[-1]


def wants_extras(fb: ForwardBatch) -> bool:
    """Whether the last stage sends logprobs back with this micro-batch's tokens (both ends
    decide it from the batch alone)."""
    return bool(fb.prompt_scores) or any(sp.logprobs is not None for sp in fb.sampling_params)
