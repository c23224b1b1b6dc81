"""KV-transfer backends (zmq, mooncake) moving real KV pages between two processes on
127.0.0.1: the bootstrap lookup, the poll states, the page bytes landing where the decode side
asked, and the failure paths (peer gone, timeouts, room reuse, layout mismatch)."""

from __future__ import annotations

import os

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loopserve.core.disagg.base import BootstrapAddr, KVPoll
from loopserve.core.disagg.bootstrap import BootstrapServer, fetch_route, put_route

sys.path.insert(0, str(Path(__file__).parent))
from kv_peer import PAGE_SIZE, make_buffers, make_manager  # noqa: E402

PEER = Path(__file__).parent / "kv_peer.py"


def _mooncake_available() -> bool:
    if os.environ.get("CI"):
        return True  # CI installs it (.ci/run, the test extra): a missing install must fail there
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception:  # noqa: BLE001 - missing wheel or system libraries
        return False
    return True


BACKENDS = ["zmq", pytest.param("mooncake", marks=pytest.mark.skipif(
    not _mooncake_available(), reason="mooncake-transfer-engine-non-cuda is not installed"))]


class Peer:
    """The prefill side in its own process (tests/kv_peer.py)."""

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PEER), backend, str(timeout_s)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = self.read(30)["port"]

    def read(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the peer process did not answer in time"
        line = self.proc.stdout.readline()
        assert line, f"the peer process exited ({self.proc.poll()})"
        return json.loads(line)

    def send(self, room: int, pages: list[int], aux: list[int]) -> None:
        self.proc.stdin.write(json.dumps({"room": room, "pages": pages, "aux": aux}) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"exit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def wait_state(handle, states, timeout: float = 20.0) -> KVPoll:
    deadline = time.monotonic() + timeout
    while (state := handle.poll()) not in states:
        assert time.monotonic() < deadline, f"stuck in {state.name}"
        time.sleep(0.005)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_move_between_processes(backend):
    peer = Peer(backend, timeout_s=10)
    args = make_buffers(None)
    decode = make_manager(backend, "decode", args, 10, None)
    try:
        src_view = make_buffers(7).page_views()
        for room, src, dst, tok in [(5, [3, 5, 1], [7, 2, 9], 42), (6, [0, 15], [14, 4], 7)]:
            recv = decode.make_receiver(BootstrapAddr("127.0.0.1", peer.port, room))
            recv.init()
            assert wait_state(recv, {KVPoll.WaitingForInput, KVPoll.Failed}) is KVPoll.WaitingForInput
            peer.send(room, src, [tok])
            recv.send_metadata(dst)
            assert wait_state(recv, {KVPoll.Success, KVPoll.Failed}) is KVPoll.Success, recv.failure_exception()
            assert recv.aux() == [tok]
            assert peer.read(20) == {"room": room, "state": "Success", "error": None}
            for got, want in zip(args.page_views(), src_view):
                np.testing.assert_array_equal(got[dst], want[src])
            decode.release(room)
        # Only the requested pages were written.
        untouched = sorted(set(range(args.num_pages)) - {7, 2, 9, 14, 4})
        for got in args.page_views():
            assert not got[untouched].any()
    finally:
        decode.close()
        peer.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_prefill_dies_or_hangs_decode_fails(backend, how):
    """A prefill process that dies closes its connection: the decode side fails the room at
    once (timeout 30 s) and closes its side. One that hangs (SIGSTOP) keeps it open: the room
    fails at its timeout (0.5 s)."""
    peer = Peer(backend, timeout_s=10)
    timeout_s = 30.0 if how == "killed" else 0.5
    decode = make_manager(backend, "decode", make_buffers(None), timeout_s, None)
    try:
        recv = decode.make_receiver(BootstrapAddr("127.0.0.1", peer.port, 9))
        recv.init()
        assert wait_state(recv, {KVPoll.WaitingForInput, KVPoll.Failed}) is KVPoll.WaitingForInput
        recv.send_metadata([1, 2])
        peer.proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        assert wait_state(recv, {KVPoll.Success, KVPoll.Failed}) is KVPoll.Failed
        took = time.monotonic() - start
        if how == "killed":
            assert took < 3.0
            assert "closed the connection" in str(recv.failure_exception())
            # The dead endpoint's connection is closed, not retried forever.
            deadline = time.monotonic() + 5
            while decode.num_connections:
                assert time.monotonic() < deadline, "the connection to the dead prefill was kept"
                time.sleep(0.01)
        else:
            assert 0.3 < took < 2.5
            assert "did not send the KV" in str(recv.failure_exception())
    finally:
        decode.close()
        if how == "hung":
            peer.proc.kill()
        peer.proc.wait(10)
        peer.close()


def test_unreachable_bootstrap_fails_after_timeout():
    server = BootstrapServer("127.0.0.1", 0)  # nothing registered: /route answers 503
    decode = make_manager("zmq", "decode", make_buffers(None), 0.4, None)
    try:
        recv = decode.make_receiver(BootstrapAddr("127.0.0.1", server.port, 1))
        recv.init()
        assert wait_state(recv, {KVPoll.WaitingForInput, KVPoll.Failed}, 5) is KVPoll.Failed
        assert "could not be reached" in str(recv.failure_exception())
    finally:
        decode.close()
        server.close()


def test_decode_never_asks_sender_fails_after_timeout():
    prefill = make_manager("zmq", "prefill", make_buffers(7), 0.3, 0)
    try:
        sender = prefill.make_sender(BootstrapAddr("127.0.0.1", prefill.bootstrap.port, 3))
        sender.init(2)
        assert wait_state(sender, {KVPoll.Failed, KVPoll.WaitingForInput}, 5) is KVPoll.Failed
        assert "did not ask" in str(sender.failure_exception())
    finally:
        prefill.close()


def test_decode_dies_after_asking_sender_fails_after_timeout():
    prefill = make_manager("zmq", "prefill", make_buffers(7), 0.4, 0)
    decode = make_manager("zmq", "decode", make_buffers(None), 5, None)
    try:
        addr = BootstrapAddr("127.0.0.1", prefill.bootstrap.port, 4)
        sender = prefill.make_sender(addr)
        recv = decode.make_receiver(addr)
        recv.init()
        assert wait_state(recv, {KVPoll.WaitingForInput}) is KVPoll.WaitingForInput
        recv.send_metadata([1])
        assert wait_state(sender, {KVPoll.WaitingForInput}) is KVPoll.WaitingForInput
        decode.close()  # gone before the pages arrive: no confirmation ever comes
        sender.send([2], [1])
        assert wait_state(sender, {KVPoll.Success, KVPoll.Failed}, 5) is KVPoll.Failed
    finally:
        decode.close()
        prefill.close()


@pytest.mark.parametrize("when", ["asked", "sent"])
def test_decode_gone_fails_the_prefill_room_at_once(when):
    """The decode side closes (its process died) after asking for a room's pages, before the
    prefill sent them or just as it sends them: the prefill side fails the room at once
    (timeout 30 s), so the request's KV is freed; another decode server's room on the same
    prefill is untouched."""
    prefill = make_manager("zmq", "prefill", make_buffers(7), 30, 0)
    doomed = make_manager("zmq", "decode", make_buffers(None), 30, None)
    other = make_manager("zmq", "decode", make_buffers(None), 30, None)
    try:
        rooms = {}
        for room, decode in ((11, doomed), (12, other)):
            addr = BootstrapAddr("127.0.0.1", prefill.bootstrap.port, room)
            sender = prefill.make_sender(addr)
            sender.init(1)
            recv = decode.make_receiver(addr)
            recv.init()
            assert wait_state(recv, {KVPoll.WaitingForInput}) is KVPoll.WaitingForInput
            recv.send_metadata([room % 8])
            assert wait_state(sender, {KVPoll.WaitingForInput}) is KVPoll.WaitingForInput
            rooms[room] = (sender, recv)
        doomed.close()
        if when == "sent":
            rooms[11][0].send([1], [11])  # no Ack will come
        start = time.monotonic()
        assert wait_state(rooms[11][0], {KVPoll.Success, KVPoll.Failed}, 5) is KVPoll.Failed
        assert time.monotonic() - start < 3.0
        why = str(rooms[11][0].failure_exception())
        # Sent after the close: the send itself may already find the peer unroutable.
        assert "closed its connection" in why or (when == "sent" and "unreachable" in why), why
        # The other decode server's room still completes.
        sender, recv = rooms[12]
        assert sender.poll() is KVPoll.WaitingForInput
        sender.send([2], [12])
        assert wait_state(recv, {KVPoll.Success, KVPoll.Failed}) is KVPoll.Success
        assert wait_state(sender, {KVPoll.Success, KVPoll.Failed}) is KVPoll.Success
    finally:
        other.close()
        doomed.close()
        prefill.close()


def test_room_reuse_is_refused_and_abort_drops_late_pages():
    prefill = make_manager("zmq", "prefill", make_buffers(7), 5, 0)
    decode_args = make_buffers(None)
    decode = make_manager("zmq", "decode", decode_args, 5, None)
    try:
        addr = BootstrapAddr("127.0.0.1", prefill.bootstrap.port, 8)
        sender = prefill.make_sender(addr)
        with pytest.raises(ValueError, match="bootstrap_room 8 is already in use"):
            prefill.make_sender(addr)
        recv = decode.make_receiver(addr)
        recv.init()
        wait_state(recv, {KVPoll.WaitingForInput})
        recv.send_metadata([3])
        wait_state(sender, {KVPoll.WaitingForInput})
        recv.abort()
        assert recv.poll() is KVPoll.Failed
        # The prefill side learns that the decode side gave up.
        assert wait_state(sender, {KVPoll.Failed}, 5) is KVPoll.Failed
        sender.send([1], [5])
        time.sleep(0.2)
        assert not decode_args.page_views()[0][3].any()
    finally:
        decode.close()
        prefill.close()


def _transfer(prefill, decode, port: int, room: int, send: bool = True) -> KVPoll:
    """One room from ``prefill`` (bootstrap ``port``) to ``decode``: the receiver's end state."""
    addr = BootstrapAddr("127.0.0.1", port, room)
    sender = prefill.make_sender(addr)
    sender.init(1)
    recv = decode.make_receiver(addr)
    recv.init()
    if wait_state(recv, {KVPoll.WaitingForInput, KVPoll.Failed}) is KVPoll.WaitingForInput:
        recv.send_metadata([room % 8])
        deadline = time.monotonic() + 20
        while sender.poll() is KVPoll.Bootstrapping and recv.poll() is not KVPoll.Failed:
            assert time.monotonic() < deadline, "neither side moved"
            time.sleep(0.005)
        if sender.poll() is KVPoll.WaitingForInput and send:
            sender.send([1], [room])
    state = wait_state(recv, {KVPoll.Success, KVPoll.Failed})
    if state is KVPoll.Success:
        assert recv.aux() == [room]
    decode.release(room)
    sender.abort()
    prefill.release(room)
    return state


def test_decode_reuses_a_prefill_route_and_looks_it_up_again_when_stale():
    """The decode side asks a prefill's bootstrap server once per ``route_ttl_s``, not once a
    request. It asks again sooner when the prefill's connection closed (the prefill restarted
    on the same bootstrap port, with a new endpoint) or a transfer over the route failed."""
    decode = make_manager("zmq", "decode", make_buffers(None), 0.5, None)
    decode.route_ttl_s = 60.0
    prefill = make_manager("zmq", "prefill", make_buffers(7), 5, 0)
    port = prefill.bootstrap.port
    try:
        assert [_transfer(prefill, decode, port, r) for r in (1, 2, 3)] == [KVPoll.Success] * 3
        assert decode.num_route_fetches == 1
        old_endpoint = prefill.endpoint_port
        prefill.close()
        prefill = make_manager("zmq", "prefill", make_buffers(7), 5, port)
        assert prefill.endpoint_port != old_endpoint
        # The old connection closed: the route was dropped, the restarted prefill is found.
        assert _transfer(prefill, decode, port, 4) is KVPoll.Success
        assert decode.num_route_fetches == 2
        # Past the TTL it is looked up again.
        decode.route_ttl_s = 0.2
        time.sleep(0.3)
        assert _transfer(prefill, decode, port, 5) is KVPoll.Success
        assert decode.num_route_fetches == 3
        # A transfer that fails on a live connection (the prefill never sends) drops it too.
        decode.route_ttl_s = 60.0
        assert _transfer(prefill, decode, port, 6, send=False) is KVPoll.Failed
        assert decode.num_route_fetches == 3
        assert _transfer(prefill, decode, port, 7) is KVPoll.Success
        assert decode.num_route_fetches == 4
    finally:
        decode.close()
        prefill.close()


def test_layout_mismatch_fails_with_a_message():
    prefill = make_manager("zmq", "prefill", make_buffers(7), 5, 0)
    other = make_buffers(None)
    other.page_size = PAGE_SIZE * 2
    decode = make_manager("zmq", "decode", other, 5, None)
    try:
        recv = decode.make_receiver(BootstrapAddr("127.0.0.1", prefill.bootstrap.port, 1))
        recv.init()
        assert wait_state(recv, {KVPoll.WaitingForInput, KVPoll.Failed}) is KVPoll.Failed
        assert "kv_cache.page_size" in str(recv.failure_exception())
    finally:
        decode.close()
        prefill.close()


def test_bootstrap_server_routes_and_health():
    server = BootstrapServer("127.0.0.1", 0)
    try:
        assert fetch_route("127.0.0.1", server.port) is None  # 503 until registered
        put_route(server.url, {"rank_ip": "127.0.0.1", "rank_port": 1234, "page_size": 4})
        assert fetch_route("127.0.0.1", server.port)["rank_port"] == 1234
        import urllib.request

        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.close()


@pytest.mark.parametrize("head, body", [
    (b"Content-Length: -1", b"{}"),  # would read until the client hangs up
    (b"Content-Length: 99999999999", b"{}"),  # would wait for (and hold) 100 GB
    (b"Content-Length: x", b"{}"),
    (b"Content-Length: 5", b"{nope"),
    (b"Content-Length: 2", b"[]"),
])
def test_bootstrap_server_refuses_bad_registrations_at_once(head, body):
    import socket

    server = BootstrapServer("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"PUT /route HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.0 400"), reply
        assert fetch_route("127.0.0.1", server.port) is None  # nothing registered
    finally:
        server.close()


@pytest.mark.parametrize("fields, match", [
    (("", 1, 1), "bootstrap_host"),
    (("http://prefill", 1, 1), "bootstrap_host"),
    (("prefill:8998", 1, 1), "bootstrap_host"),
    (("a" * 300, 1, 1), "bootstrap_host"),
    (("pre fill", 1, 1), "bootstrap_host"),
    (("-prefill", 1, 1), "bootstrap_host"),
    ((123, 1, 1), "bootstrap_host"),
    (("h", 0, 1), "bootstrap_port"),
    (("h", "80", 1), "bootstrap_port"),
    (("h", 80, -1), "bootstrap_room"),
    (("h", 80, 1 << 63), "bootstrap_room"),
    (("h", 80, None), "bootstrap_room"),
])
def test_bootstrap_fields_are_validated(fields, match):
    with pytest.raises(ValueError, match=match):
        BootstrapAddr.parse(*fields)


@pytest.mark.parametrize("host, want", [("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"),
                                        ("prefill-0.pd.svc.cluster.local", "prefill-0.pd.svc.cluster.local"),
                                        ("[::1]", "::1"), ("::1", "::1")])
def test_bootstrap_hosts_that_are_names_or_addresses_are_taken(host, want):
    assert BootstrapAddr.parse(host, 8998, 1).host == want


def test_an_ipv6_bootstrap_host_is_bracketed_in_urls():
    from loopserve.core.disagg.base import url_host

    assert url_host(BootstrapAddr.parse("[::1]", 8998, 1).host) == "[::1]"
    assert url_host("127.0.0.1") == "127.0.0.1" and url_host("prefill-0") == "prefill-0"


def test_bootstrap_server_waits_for_every_pipeline_stage():
    """A prefill server with pipeline stages: ``/route`` answers 503 until every stage has
    registered, then stage 0's route with all of them under ``ranks``."""
    server = BootstrapServer("127.0.0.1", 0)
    try:
        route = {"rank_ip": "127.0.0.1", "page_size": 4, "pp_size": 3}
        put_route(server.url, dict(route, rank_port=1000, pp_rank=0, layers=[0, 2]))
        put_route(server.url, dict(route, rank_port=1002, pp_rank=2, layers=[3, 4]))
        assert fetch_route("127.0.0.1", server.port) is None
        put_route(server.url, dict(route, rank_port=1001, pp_rank=1, layers=[2, 3]))
        got = fetch_route("127.0.0.1", server.port)
        assert got["rank_port"] == 1000 and [r["rank_port"] for r in got["ranks"]] == [1000, 1001, 1002]
        with pytest.raises(Exception, match="400"):
            put_route(server.url, dict(route, rank_port=1, pp_rank=3))
    finally:
        server.close()


def _stage_buffers(layers, split, fill: bool):
    """One pipeline stage's KV buffers (K of each of its layers, then V), every byte telling
    its layer, K/V and slot when ``fill``; zeros otherwise."""
    from loopserve.core.disagg.base import KVArgs

    width = 12
    bufs = []
    for kv in (0, 1):
        for g in range(*layers):
            b = np.zeros((64, width), dtype=np.uint8)
            if fill:
                b[:] = (np.arange(64)[:, None] * 3 + g * 50 + kv * 25) % 251
            bufs.append(b)
    return KVArgs(buffers=bufs, page_size=PAGE_SIZE, num_slots=64, layers=layers, split=split)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stages_move_only_the_layers_they_share(backend):
    """Prefill layers split 2+1 (3 layers), decode split 1+2: four legs (p0-d0, p0-d1, p1-d1
    and none between p1 and d0); every decode stage ends with exactly the prefill's bytes of
    its layers in the asked pages, the first token arrives on stage 0, and each side's rooms
    reach Success only when all their legs are done."""
    from loopserve.core.disagg.mooncake_transfer import MooncakeManager
    from loopserve.core.disagg.zmq_transfer import ZmqManager

    cls = ZmqManager if backend == "zmq" else MooncakeManager
    psplit, dsplit = [(0, 2), (2, 3)], [(0, 1), (1, 3)]
    pargs = [_stage_buffers(r, psplit, True) for r in psplit]
    dargs = [_stage_buffers(r, dsplit, False) for r in dsplit]
    made = []
    try:
        p0 = cls("prefill", pargs[0], 5, host="127.0.0.1", bootstrap_port=0)
        made.append(p0)
        p1 = cls("prefill", pargs[1], 5, host="127.0.0.1")
        made.append(p1)
        put_route(p0.bootstrap.url, p1.route())
        decs = [cls("decode", a, 5, host="127.0.0.1") for a in dargs]
        made.extend(decs)
        addr = BootstrapAddr("127.0.0.1", p0.bootstrap.port, 42)
        recvs = [d.make_receiver(addr) for d in decs]
        for r in recvs:
            r.init()
        assert [wait_state(r, {KVPoll.WaitingForInput}) for r in recvs] == [KVPoll.WaitingForInput] * 2
        src, dst = [1, 3], [5, 2]
        senders = [p.make_sender(addr) for p in (p0, p1)]
        # Stage 1 sends before any decode stage has asked: held until they have.
        senders[1].send(src, [])
        time.sleep(0.05)
        assert senders[1].poll() is KVPoll.Bootstrapping and senders[1]._r.pending is not None
        for r in recvs:
            r.send_metadata(dst)
        assert wait_state(senders[0], {KVPoll.WaitingForInput}) is KVPoll.WaitingForInput
        senders[0].send(src, [77])
        assert [wait_state(s, {KVPoll.Success, KVPoll.Failed}) for s in senders] == [KVPoll.Success] * 2
        assert [wait_state(r, {KVPoll.Success, KVPoll.Failed}) for r in recvs] == [KVPoll.Success] * 2
        assert recvs[0].aux() == [77]
        rows = lambda pages: np.concatenate([np.arange(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in pages])
        for a, (lo, hi) in zip(dargs, dsplit):
            n = hi - lo
            for kv in (0, 1):
                for g in range(lo, hi):
                    got = a.buffers[kv * n + g - lo]
                    want = (rows(src)[:, None] * 3 + g * 50 + kv * 25) % 251
                    assert (got[rows(dst)] == want).all(), (g, kv)
                    assert not got[rows([0, 1, 3, 4])].any()  # nothing else written
        assert [len(s._r.legs) for s in senders] == [2, 1] and [len(r._r.legs) for r in recvs] == [1, 2]
    finally:
        for m in made:
            m.close()


def test_a_stage_that_cannot_start_its_manager_fails_the_start_with_its_reason():
    """Under pipeline parallelism rank 0 waits for every stage's transfer manager; a stage
    whose backend cannot start says why, and rank 0's start fails with that at once."""
    from datetime import timedelta

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from loopserve.core.config import compose_config
    from loopserve.core.disagg.staged import StageAgent, StagedKVManager
    from loopserve.core.disagg.zmq_transfer import ZmqManager

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    split = [(0, 1), (1, 2)]
    config = compose_config(["disaggregation.transfer_backend=no-such-backend"])
    spec = {"role": "prefill", "split": [list(s) for s in split], "config": OmegaConf.to_container(config)}
    agent = StageAgent(spec, 1, _stage_buffers((1, 2), split, False), ("127.0.0.1", store.port), 30)
    local = ZmqManager("prefill", _stage_buffers((0, 1), split, True), 5, host="127.0.0.1", bootstrap_port=0)
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="pipeline stage 1 could not start.*no-such-backend"):
            StagedKVManager(local, store, "127.0.0.1", 2, hello_timeout_s=60)
        assert time.monotonic() - start < 15
    finally:
        agent.close()
        local.close()
