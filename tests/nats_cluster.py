"""A real three-node JetStream cluster on loopback for the mirror tests and benchmark (nothing mocked).

Each node is a `nats-server` process with its own store directory under `root`, client and route ports
picked free on 127.0.0.1, and a shared `--cluster_name`.  Nodes are stopped by PID (SIGKILL or SIGTERM) and
can be started again on the same ports and store, to test a node that goes down and comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NATS_SERVER_CANDIDATES = ("nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server")


def find_nats_server() -> str:
    """The nats-server binary, or RuntimeError saying how to install it (tests fail with this, never skip)."""
    for c in NATS_SERVER_CANDIDATES:
        path = shutil.which(c) or (c if os.access(c, os.X_OK) else None)
        if path:
            return path
    raise RuntimeError("nats-server is not installed (apt-get install nats-server); the mirror tests need a "
                       "real JetStream cluster")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    """Three JetStream nodes; `urls` for clients; `stop(i)` / `start(i)` one node."""

    def __init__(self, root: Path, size: int = 3, name: str = "walsvc-test") -> None:
        self.binary = find_nats_server()
        self.root = Path(root)
        self.size = size
        self.name = name
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        self.route_ports = ports[size:]
        self.procs: list[subprocess.Popen | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, i: int | None = None) -> "Cluster":
        for n in range(self.size) if i is None else [i]:
            store = self.root / f"n{n}"
            store.mkdir(parents=True, exist_ok=True)
            routes = ",".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != n)
            log = open(self.root / f"n{n}.log", "ab")
            self.procs[n] = subprocess.Popen(
                [self.binary, "-a", "127.0.0.1", "-p", str(self.client_ports[n]), "--server_name", f"n{n}",
                 "-js", "-sd", str(store), "--cluster_name", self.name,
                 "--cluster", f"nats://127.0.0.1:{self.route_ports[n]}", "--routes", routes],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running node accepts clients and a stream with a replica on each can be made: a meta
        leader alone is not enough, as it may not know every peer yet (creating an R3 stream then fails with
        "no suitable peers for placement", err_code 10005)."""
        import asyncio

        import nats
        deadline = time.monotonic() + timeout

        async def quiet(exc: Exception) -> None:
            """Nodes still starting refuse connections: expected here, not worth a traceback."""

        async def probe() -> bool:
            try:
                nc = await nats.connect(self.urls, connect_timeout=1, max_reconnect_attempts=0,
                                        allow_reconnect=False, error_cb=quiet)
            except Exception:
                return False
            try:
                js = nc.jetstream()
                await js.add_stream(name="WALSVC_READY_PROBE", subjects=["walsvc.ready-probe"],
                                    num_replicas=sum(p is not None and p.poll() is None for p in self.procs))
                await js.delete_stream("WALSVC_READY_PROBE")
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        while time.monotonic() < deadline:
            for n, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"nats-server n{n} exited with {p.returncode}: "
                                       f"{(self.root / f'n{n}.log').read_text()[-2000:]}")
            if asyncio.run(probe()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"JetStream cluster not ready after {timeout} s (logs in {self.root})")

    def stop(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)
            p.wait(30)
        self.procs[i] = None

    def close(self) -> None:
        for i in range(self.size):
            self.stop(i, signal.SIGTERM)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
