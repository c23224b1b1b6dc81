"""Start ``loopserve serve`` as a subprocess on a free loopback port, wait until it answers, and
make sure it (and its scheduler process) are gone afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, *overrides: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loopserve.core.cli", "serve", f"server.port={self.port}",
                "server.shutdown_timeout_s=5", *overrides]
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"loopserve-test-{self.port}.log")
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.scheduler_pid: int | None = None

    def wait_ready(self, headers: dict[str, str] | None = None) -> "ServerProc":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loopserve serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    info = httpx.get(self.url + "/server_info", headers=headers, timeout=5.0)
                    if info.status_code == 200:
                        self.scheduler_pid = info.json()["scheduler_pid"]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"loopserve serve did not answer within {START_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL of the whole session if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.scheduler_pid is not None and pid_alive(self.scheduler_pid):
            os.kill(self.scheduler_pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
