"""tcp endpoints and CURVE: opt-in, loopback unless allowed, and clients that find the key in ENDPOINTS."""

from __future__ import annotations

import socket

import pytest
import zmq

from helpers import WriterProcess, run_cli
from walsvc import Producer, Reader
from walsvc.config import ServiceConfig
from walsvc.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_bind_needs_allow_remote_and_curve_keys():
    with pytest.raises(ConfigError, match="service.ingest.*allow_remote"):
        ServiceConfig(ingest="tcp://0.0.0.0:5555", publish="tcp://0.0.0.0:5556", control="tcp://0.0.0.0:5557")
    with pytest.raises(ConfigError, match="curve_secret_key"):
        ServiceConfig(ingest="tcp://0.0.0.0:5555", publish="tcp://0.0.0.0:5556", control="tcp://0.0.0.0:5557",
                      allow_remote=True)
    with pytest.raises(ConfigError, match="service.publish"):
        ServiceConfig(publish="udp://127.0.0.1:1")


def test_curve_over_tcp_end_to_end(tmp_path):
    public, secret = zmq.curve_keypair()
    ports = [_free_port() for _ in range(3)]
    config = tmp_path / "curve.toml"
    config.write_text(f"""
[log]
dir = "log"
[service]
ingest = "tcp://127.0.0.1:{ports[0]}"
publish = "tcp://127.0.0.1:{ports[1]}"
control = "tcp://127.0.0.1:{ports[2]}"
curve_public_key = "{public.decode()}"
curve_secret_key = "{secret.decode()}"
""")
    config.chmod(0o600)  # a config holding a secret key must not be readable by others (as ssh demands)
    directory = tmp_path / "log"
    writer = WriterProcess(directory, config=config).start()
    try:
        with Producer(directory) as producer:
            lsns = [producer.put(b"k%d" % i, b"secret").result(20) for i in range(5)]
        assert lsns == [1, 2, 3, 4, 5]
        with Reader(directory, "earliest") as reader:
            got = reader.poll(10)
            assert not reader.offline
        assert [r.lsn for r in got] == lsns
        # A client without the server key cannot talk to it: plain ZeroMQ gets no reply.
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{ports[2]}")
        req.send(b'{"op": "ping"}')
        assert not req.poll(500)
        ctx.destroy(linger=0)
        out = run_cli("status", "--dir", str(directory), "--json")
        assert out.returncode == 0 and '"writer": "running"' in out.stdout
    finally:
        writer.stop()
