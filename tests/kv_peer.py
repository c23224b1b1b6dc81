"""The prefill side of the KV-transfer backend tests, run as a separate process.

Protocol over stdin/stdout, one JSON object a line: it prints ``{"port": P}`` (its bootstrap
server), then for each ``{"room": R, "pages": [...], "aux": [...]}`` it sends those pages of
its buffers (filled by ``make_buffers``) and prints ``{"room": R, "state": ..., "error": ...}``.
``{"exit": true}`` (or end of input) stops it.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from loopserve.core.disagg.base import BootstrapAddr, KVArgs, KVPoll

SLOT_BYTES = (24, 40)
NUM_SLOTS = 64
PAGE_SIZE = 4


def make_buffers(seed: int | None) -> KVArgs:
    """Two KV buffers of different widths; random bytes for ``seed``, zeros for None."""
    rng = np.random.default_rng(seed)
    bufs = [rng.integers(0, 256, (NUM_SLOTS, w), dtype=np.uint8) if seed is not None
            else np.zeros((NUM_SLOTS, w), dtype=np.uint8) for w in SLOT_BYTES]
    return KVArgs(buffers=bufs, page_size=PAGE_SIZE, num_slots=NUM_SLOTS)


def make_manager(backend: str, role: str, args: KVArgs, timeout_s: float, bootstrap_port: int | None):
    if backend == "zmq":
        from loopserve.core.disagg.zmq_transfer import ZmqManager as cls
    else:
        from loopserve.core.disagg.mooncake_transfer import MooncakeManager as cls
    return cls(role, args, timeout_s, host="127.0.0.1", bootstrap_port=bootstrap_port)


def main() -> None:
    backend, timeout_s = sys.argv[1], float(sys.argv[2])
    manager = make_manager(backend, "prefill", make_buffers(7), timeout_s, bootstrap_port=0)
    print(json.dumps({"port": manager.bootstrap.port}), flush=True)
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg.get("exit"):
                break
            sender = manager.make_sender(BootstrapAddr("127.0.0.1", manager.bootstrap.port, msg["room"]))
            sender.init(len(msg["pages"]))
            deadline = time.monotonic() + 3 * timeout_s
            while sender.poll() is KVPoll.Bootstrapping and time.monotonic() < deadline:
                time.sleep(0.005)
            if sender.poll() is KVPoll.WaitingForInput:
                sender.send(msg["pages"], msg["aux"])
            while sender.poll() not in (KVPoll.Success, KVPoll.Failed) and time.monotonic() < deadline:
                time.sleep(0.005)
            state = sender.poll()
            error = str(sender.failure_exception()) if state is KVPoll.Failed else None
            manager.release(msg["room"])
            print(json.dumps({"room": msg["room"], "state": state.name, "error": error}), flush=True)
    finally:
        manager.close()


if __name__ == "__main__":
    main()
