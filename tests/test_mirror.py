"""The mirror to JetStream, the way back (StreamReader, restore) and the log id, against a real cluster.

A three-node JetStream cluster (tests/nats_cluster.py) runs for the whole module on free loopback ports;
the mirror runs as a `walsvc mirror` subprocess and is killed with SIGKILL; nodes are killed and restarted
by PID.  Stream contents are checked with a plain nats-py consumer, not with walsvc's own reader.  Without
nats-server the module fails with the reason (it never skips).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import python_env, run_cli, wait_for, walsvc_cmd, REPO_ROOT
from nats_cluster import Cluster
from walsvc import Log, Record
from walsvc import cursor, logid
from walsvc.errors import ConfigError, LogIdError, MirrorError
from walsvc.record import decode, encode
from walsvc.jetstream import JetStreamSink, StreamReader, restore
from walsvc.mirror import (H_KEY, H_LOG_ID, H_LSN, H_TIMESTAMP, H_TOMBSTONE, H_TTL, MirrorState, decode_message,
                           load_state, packed_messages, record_message, resume_refusal)

LOG_ID = "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("nats")).start()
    try:
        c.wait_ready(60)
        yield c
    finally:
        c.close()


def stream_messages(cluster: Cluster, stream: str, stall_s: float = 8.0) -> list[tuple[dict, bytes]]:
    """Every message in `stream`, in stream order: an ordered consumer, then, if it stalls, one direct get per
    remaining sequence.  (A consumer reads its own replica: right after a node came back, nats-server 2.9
    can leave that replica behind the leader for a while; a get is answered by the stream leader.)"""

    async def read() -> list[tuple[dict, bytes]]:
        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            state = (await js.stream_info(stream)).state
            sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
            out = []
            seq = state.first_seq - 1
            progress = time.monotonic()
            while seq < state.last_seq and time.monotonic() - progress < stall_s:
                try:
                    m = await sub.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    continue
                out.append((dict(m.headers or {}), m.data))
                seq = m.metadata.sequence.stream
                progress = time.monotonic()
            await sub.unsubscribe()
            for missing in range(seq + 1, state.last_seq + 1):
                try:
                    m = await js.get_msg(stream, missing)
                except nats.js.errors.NotFoundError:
                    continue
                out.append((dict(m.headers or {}), m.data))
            return out
        finally:
            await nc.close()

    # A cluster that just regained its quorum answers 503 ("JetStream system temporarily unavailable") until
    # its meta leader settles, which took over 10 s on a loaded machine: ask again for up to a minute.
    deadline = time.monotonic() + 60
    while True:
        try:
            return asyncio.run(read())
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            if time.monotonic() >= deadline:
                raise
            print(f"reading {stream}: {exc!r}; again in 1 s")
            time.sleep(1)


def stream_count(cluster: Cluster, stream: str) -> int:
    """Messages in `stream` now (0 if the cluster did not answer in time: callers poll)."""

    async def count() -> int:
        nc = await nats.connect(cluster.urls)
        try:
            return (await nc.jetstream().stream_info(stream)).state.messages
        finally:
            await nc.close()

    try:
        return asyncio.run(count())
    except (nats.errors.Error, nats.js.errors.Error):
        return 0


def mirrored_lsns(cluster: Cluster, stream: str, log_id: str) -> list[int]:
    """The LSNs in the stream in stream order, from the message ids (packed: every LSN of the message)."""
    out = []
    for h, data in stream_messages(cluster, stream):
        lid, _, lsn = h["Nats-Msg-Id"].partition(":")
        assert lid == log_id
        out.extend(r.lsn for r in decode_message(h, data))
        assert out[-len(decode_message(h, data))] == int(lsn)
    return out


def mirror_cmd(d: Path, cluster: Cluster, stream: str, *flags: str) -> list[str]:
    return walsvc_cmd("mirror", "--dir", d, "--servers", ",".join(cluster.urls), "--stream", stream, *flags)


def spawn_mirror(d: Path, cluster: Cluster, stream: str, out: Path, *flags: str) -> subprocess.Popen:
    with open(out, "ab") as f:
        return subprocess.Popen(mirror_cmd(d, cluster, stream, *flags), stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, env=python_env())


def run_mirror(d: Path, cluster: Cluster, stream: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(mirror_cmd(d, cluster, stream, "--once", *flags), capture_output=True, text=True,
                       timeout=timeout, cwd=REPO_ROOT, env=python_env())
    return r


def varied_records() -> list[Record]:
    return [Record.put(b"k%d" % i, b"v" * (i % 50)) for i in range(200)] + [
        Record.delete(b"gone"), Record.put(b"\xff\x00bin", b"\x00\x01" * 300, ttl_ms=60_000, compression="zstd"),
        Record(b"ver", b"x", version=(7, 42)), Record.put("", "")]


# -- log id and the engine hook (no cluster) -------------------------------------------------------------

def test_log_id_given_once_kept_and_shown(tmp_path):
    d = tmp_path / "w"
    with Log.open(d) as log:
        first = log.log_id
        log.append(Record.put("a", "b"))
        assert log.stats()["log_id"] == first
    assert (d / logid.FILENAME).read_text() == first + "\n"
    with Log.open(d) as log:
        assert log.log_id == first
    (d / logid.FILENAME).unlink()  # a log from before log ids: the next writer gives it one
    with Log.open(d) as log:
        assert log.log_id != first and logid.load(d) == log.log_id
        second = log.log_id
    status = json.loads(run_cli("status", "--dir", d, "--json").stdout)
    assert status["log_id"] == second
    dumped = [json.loads(line) for line in run_cli("dump", "--dir", d).stdout.splitlines()]
    assert [x["log_id"] for x in dumped] == [second]
    (d / logid.FILENAME).write_text("not-a-uuid\n")
    with pytest.raises(LogIdError, match="not a log id"):
        Log.open(d)


def test_first_lsn_and_skip_to_survive_reopen(tmp_path):
    d = tmp_path / "w"
    with Log.open(d, first_lsn=1000) as log:
        assert log.append(Record.put("a", "1")) == 1000
        log.skip_to(1005)
        log.skip_to(1005)  # already there: nothing to do
        assert log.append_batch([Record.put("b", "2"), Record.put("c", "3")]) == [1005, 1006]
        with pytest.raises(ConfigError, match="already handed out"):
            log.skip_to(1003)
    with Log.open(d) as log:
        assert [(r.lsn, r.key) for r in log.read()] == [(1000, b"a"), (1005, b"b"), (1006, b"c")]
        assert log.first_lsn == 1000 and log.next_lsn == 1007
        assert log.append(Record.put("d", "4")) == 1007
    with pytest.raises(ConfigError, match="already holds segments"):
        Log.open(d, first_lsn=5)
    assert run_cli("verify", "--dir", d).returncode == 0


# -- messages and the resume decision (pure) ---------------------------------------------------------------

records_st = st.lists(st.builds(
    lambda k, v, tomb, ttl, comp, ver: Record.delete(k) if tomb else
    Record(k, v, ttl_ms=ttl, compression=comp, version=ver),
    st.binary(max_size=20), st.binary(max_size=200), st.booleans(), st.none() | st.integers(0, 2**40),
    st.sampled_from([None, "zstd"]), st.none() | st.tuples(st.integers(0, 2**32), st.integers(0, 2**32))),
    min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(records_st, st.integers(1, 2**40), st.integers(64, 4096))
def test_messages_round_trip_in_both_modes(records, base, max_bytes):
    records = [decode(encode(r))[0] for r in records]  # as a log gives them back (e.g. no codec on b"")
    for i, r in enumerate(records):
        r.lsn, r.timestamp = base + i, 1_700_000_000_000_000 + i // 3
    for r, m in zip(records, [record_message(LOG_ID, r) for r in records]):
        assert m.msg_id == f"{LOG_ID}:{r.lsn}" and m.headers["Nats-Msg-Id"] == m.msg_id
        got = decode_message(m.headers, m.payload)
        assert got == [r] and got[0].lsn == r.lsn and got[0].timestamp == r.timestamp
    packed = packed_messages(LOG_ID, records, max_bytes)
    back = [x for m in packed for x in decode_message(m.headers, m.payload)]
    assert back == records and [x.lsn for x in back] == [r.lsn for r in records]
    assert [x.timestamp for x in back] == [r.timestamp for r in records]
    assert [m.msg_id for m in packed] == [f"{LOG_ID}:{m.first_lsn}" for m in packed]


def test_resume_refusal_rules():
    st_ = MirrorState("m", LOG_ID, "s", "record", mirrored_lsn=10, safe_since=1000.0)
    assert resume_refusal(None, None, 120, 5000, None) is None  # a new cursor
    assert resume_refusal(10, st_, 120, 1100, 20) is None  # within the window
    why = resume_refusal(10, st_, 120, 1200, 20)
    assert "duplicate window is 120 s" in why and "LSN 10" in why
    assert resume_refusal(10, st_, 120, 9999, 10) is None  # nothing past the cursor is in the stream
    assert resume_refusal(10, st_, 120, 9999, 11) is not None  # one record past it is
    assert resume_refusal(10, st_, 120, 1116, 20) is not None  # within the margin (5 s) before the window ends
    clean = MirrorState("m", LOG_ID, "s", "record", mirrored_lsn=10, safe_since=0.0, clean=True)
    assert resume_refusal(10, clean, 120, 9999, 20) is None
    assert "state file is missing" in resume_refusal(10, None, 120, 5000, 20)


# -- against the cluster ----------------------------------------------------------------------------------

def test_mirror_both_modes_then_stream_reader_and_restore(cluster, tmp_path):
    d = tmp_path / "w"
    records = varied_records()
    with Log.open(d, first_lsn=50) as log:  # as if retention had deleted LSNs below 50
        log.append_batch(records[:120])
        log.skip_to(300)  # a gap, as a torn batch leaves
        log.append_batch(records[120:])
        log_id = log.log_id
    original = list(Log.open(d).read())
    for stream, flags in (("PER", []), ("PACK", ["--packed"])):
        r = run_mirror(d, cluster, stream, "--create", "--name", f"m-{stream}", *flags)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"mirrored_lsn={original[-1].lsn}" in r.stdout
    raw = stream_messages(cluster, "PER")
    assert [h["Nats-Msg-Id"] for h, _ in raw] == [f"{log_id}:{r.lsn}" for r in original]
    by_lsn = {int(h[H_LSN]): (h, data) for h, data in raw}
    h, data = by_lsn[original[200].lsn]
    assert (h[H_LOG_ID], h[H_TOMBSTONE], data) == (log_id, "1", b"")
    h, data = by_lsn[original[201].lsn]
    assert h[H_TTL] == "60000" and data == b"\x00\x01" * 300 and h[H_KEY] == "/wBiaW4="
    assert int(h[H_TIMESTAMP]) == original[201].timestamp
    assert len(stream_messages(cluster, "PACK")) < 10
    status = json.loads(run_cli("status", "--dir", d, "--json").stdout)
    assert status["mirrors"]["m-PER"]["mirrored_lsn"] == original[-1].lsn
    assert status["mirrors"]["m-PACK"]["mode"] == "packed" and status["mirrors"]["m-PACK"]["lag_records"] == 0
    assert status["cursors"]["m-PER"]["lsn"] == original[-1].lsn  # a named cursor: retention protects it
    for stream in ("PER", "PACK"):
        with StreamReader(cluster.urls, stream) as sr:  # the one-line change from walsvc.Reader
            got = sr.poll(10)
            while len(got) < len(original):
                more = sr.poll(5)
                assert more, "stream reader stopped early"
                got += more
            assert sr.log_id == log_id
        assert got == original and [x.lsn for x in got] == [x.lsn for x in original]
        with StreamReader(cluster.urls, stream, original[60].lsn) as sr:
            assert sr.poll(10)[0].lsn == original[60].lsn
        with StreamReader(cluster.urls, stream, 250) as sr:  # inside the gap: the next record after it
            assert sr.poll(10)[0].lsn == original[120].lsn == 300
    # Disaster recovery: the local log is lost; rebuild it from each stream.
    shutil.rmtree(d)
    for stream in ("PER", "PACK"):
        target = tmp_path / f"restored-{stream}"
        r = subprocess.run(walsvc_cmd("restore", "--dir", target, "--servers", ",".join(cluster.urls), "--stream",
                                      stream), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                           env=python_env(), umask=0o022)  # a usual umask: the directory is 0700 all the same
        assert r.returncode == 0, r.stderr
        assert target.stat().st_mode & 0o777 == 0o700, oct(target.stat().st_mode)
        assert json.loads(r.stdout)["last_lsn"] == original[-1].lsn
        assert run_cli("verify", "--dir", target).returncode == 0
        with Log.open(target) as log:
            back = list(log.read())
            assert log.log_id == log_id and log.first_lsn == 50
        assert back == original and [x.lsn for x in back] == [x.lsn for x in original]
    r = run_cli("restore", "--dir", tmp_path / "restored-PER", "--servers", ",".join(cluster.urls), "--stream", "PER")
    assert r.returncode == 1 and "already holds a log" in r.stderr


def test_a_mirror_run_with_one_record_to_publish_moves_its_cursor(cluster, tmp_path):
    """The cursor follows every acked record, also when a run has a single one to publish (a mirror resumed
    after one more append): else the next run publishes it again, and the status shows a lag that is not."""
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append_batch([Record.put(b"a", b"1"), Record.put(b"b", b"2")])
    r = run_mirror(d, cluster, "ONE", "--create", "--name", "m-one")
    assert r.returncode == 0 and "mirrored_lsn=2" in r.stdout, r.stdout + r.stderr
    with Log.open(d) as log:
        log.append(Record.put(b"c", b"3"))
    r = run_mirror(d, cluster, "ONE", "--name", "m-one")
    assert r.returncode == 0 and "mirrored_lsn=3" in r.stdout, r.stdout + r.stderr
    status = json.loads(run_cli("status", "--dir", d, "--json").stdout)
    assert status["cursors"]["m-one"]["lsn"] == 3 and status["mirrors"]["m-one"]["lag_records"] == 0
    assert [int(h[H_LSN]) for h, _ in stream_messages(cluster, "ONE")] == [1, 2, 3]


class Appender:
    """Appends small batches to an open log from a thread until stopped (the live log being mirrored)."""

    def __init__(self, log: Log, per_second: int = 2000) -> None:
        self.log = log
        self.per_second = per_second
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.log.append_batch([Record.put(b"k%d" % (n + i), b"v" * 40) for i in range(20)])
            n += 20
            time.sleep(20 / self.per_second)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(10)
        return self.log.sync()


@pytest.mark.parametrize("mode,kills", [("record", 20), ("packed", 8)])
def test_kill9_mirror_every_lsn_once_in_order(cluster, tmp_path, mode, kills):
    d = tmp_path / "w"
    rng = random.Random(11)
    out = tmp_path / "mirror.out"
    stream = f"KILL-{mode}"
    with Log.open(d) as log:
        appender = Appender(log)
        flags = ("--create", "--window", "64", "--commit-interval-ms", "50")
        flags += ("--packed",) if mode == "packed" else ()
        for i in range(kills):
            proc = spawn_mirror(d, cluster, stream, out, *flags)
            time.sleep(rng.uniform(0.3, 1.6))  # during start-up, publishing, or between commits
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        last = appender.finish()
        log_id = log.log_id
        r = run_mirror(d, cluster, stream, *flags)
        assert r.returncode == 0, r.stdout + r.stderr + out.read_text()[-3000:]
    assert "refuses" not in out.read_text()
    assert load_state(d, "mirror").duplicates > 0  # kills did leave publishes past the cursor: resent, dropped
    lsns = mirrored_lsns(cluster, stream, log_id)
    assert len(lsns) > 1000
    assert lsns == list(range(1, last + 1))


def test_node_down_and_quorum_lost_no_record_lost(cluster, tmp_path):
    d = tmp_path / "w"
    out = tmp_path / "mirror.out"
    with Log.open(d) as log:
        log_id = log.log_id
        appender = Appender(log, per_second=1000)
        proc = spawn_mirror(d, cluster, "FAULT", out, "--create", "--packed", "--ack-timeout", "2")
        try:
            wait_for(lambda: (s := load_state(d, "mirror")) and s.mirrored_lsn > 500, 60, "mirroring to start")
            cluster.stop(1)  # one node of three down: the stream keeps its quorum
            time.sleep(2)
            before = load_state(d, "mirror").mirrored_lsn
            wait_for(lambda: load_state(d, "mirror").mirrored_lsn > before + 500, 60, "mirroring with a node down")
            cluster.start(1)
            cluster.stop(0)
            cluster.stop(2)  # two of three down: no quorum, no PubAck
            wait_for(lambda: load_state(d, "mirror").condition.startswith("waiting"), 60, "the mirror to wait")
            stalled = load_state(d, "mirror")
            assert stalled.publish_errors >= 1 and stalled.lag_records > 0
            cluster.start(0)
            cluster.start(2)
            last = appender.finish()
            wait_for(lambda: load_state(d, "mirror").mirrored_lsn >= last, 120, "the mirror to catch up")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = out.read_text()
    assert "waiting for the sink" in text and "retrying in" in text, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    final = load_state(d, "mirror")
    assert final.clean and final.condition == "mirroring" and final.lag_records == 0
    assert mirrored_lsns(cluster, "FAULT", log_id) == list(range(1, last + 1))


def test_refuses_to_resume_past_the_duplicate_window_and_retention_keeps_unmirrored(cluster, tmp_path):
    d = tmp_path / "w"
    with Log.open(d, segment_bytes=1 << 20, max_bytes=1 << 20) as log:
        for i in range(3):
            log.append_batch([Record.put(b"k%d" % i, b"v" * 1000) for _ in range(500)])
        r = run_mirror(d, cluster, "WIN", "--create", "--duplicate-window", "2", "--replicas", "1")
        assert r.returncode == 0, r.stderr
        for i in range(40):  # ~4 MiB: rotations run retention, which must keep LSNs above the cursor
            log.append_batch([Record.put(b"x%d" % i, b"w" * 1000) for _ in range(100)])
        assert 1 < log.first_lsn <= 1501  # retention ran, and kept every LSN the mirror has not published
        out = tmp_path / "mirror.out"
        proc = spawn_mirror(d, cluster, "WIN", out, "--commit-interval-ms", "600000", "--window", "16")
        wait_for(lambda: stream_count(cluster, "WIN") > 1700, 60, "publishes past the cursor")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(2.5)  # past the stream's 2 s duplicate window
        r = run_mirror(d, cluster, "WIN")
        assert r.returncode == 1
        assert "refuses to resume" in r.stderr and "duplicate window is 2 s" in r.stderr, r.stderr
        lsns = mirrored_lsns(cluster, "WIN", log.log_id)
        assert len(lsns) > 1700 and lsns == list(range(1, len(lsns) + 1))  # nothing stored twice
    with pytest.raises(MirrorError):
        restore(tmp_path / "nothing", cluster.urls, "NO-SUCH-STREAM")


def test_refuses_to_resume_after_a_kill_before_its_first_cursor_store(cluster, tmp_path):
    """A mirror killed before it stored a cursor past its start (its commit interval is longer than the run),
    restarted after the duplicate window, must refuse.  Before, it kept no cursor file until the first
    stored ack, and the resume check ran only with one: the restart started over from `--from` and stored
    every record published so far a second time.  A state left without its cursor is checked too."""
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append_batch([Record.put(b"k%d" % i, b"v" * 100) for i in range(2000)])
        log_id = log.log_id
    proc = spawn_mirror(d, cluster, "FIRST", tmp_path / "mirror.out", "--create", "--replicas", "1",
                        "--duplicate-window", "2", "--commit-interval-ms", "600000")
    wait_for(lambda: stream_count(cluster, "FIRST") > 0, 60, "the first publishes")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(2.5)  # past the stream's 2 s duplicate window
    r = run_mirror(d, cluster, "FIRST")
    assert r.returncode == 1 and "refuses to resume" in r.stderr and "LSNs after 0" in r.stderr, r.stdout + r.stderr
    assert cursor.load(d, "mirror") == 0  # stored before the first publish
    (d / cursor.DIRNAME / f"mirror{cursor.SUFFIX}").unlink()  # the state alone, as a mirror before the fix left it
    r = run_mirror(d, cluster, "FIRST")
    assert r.returncode == 1 and "refuses to resume" in r.stderr and "LSNs after 0" in r.stderr, r.stdout + r.stderr
    lsns = mirrored_lsns(cluster, "FIRST", log_id)
    assert lsns and lsns == list(range(1, len(lsns) + 1))  # nothing stored twice


class AckDropProxy:
    """A TCP proxy to one NATS node that drops everything the server sends while `mute` is set: publishes
    still reach the stream and are stored, their PubAcks are lost (as when a reply is lost on the way)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mute = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"nats://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (from_server and self.mute.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def spawn_via(proxy: AckDropProxy, d: Path, stream: str, out: Path, *flags: str) -> subprocess.Popen:
    """`walsvc mirror` of `d` into `stream` through `proxy`, its output appended to `out`."""
    with open(out, "ab") as f:
        return subprocess.Popen(walsvc_cmd("mirror", "--dir", d, "--servers", proxy.url, "--stream", stream,
                                           "--ack-timeout", "1", *flags),
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=python_env())


def lose_pubacks_of_101_to_120(log: Log, d: Path, cluster: Cluster, proxy: AckDropProxy, stream: str) -> float:
    """With LSNs 1-100 mirrored, mute the proxy and append 20 records: the stream stores them, their PubAcks
    are lost.  Returns a time by which the stream held them all."""
    wait_for(lambda: (s := load_state(d, "mirror")) and s.mirrored_lsn == 100, 60, "the first records")
    proxy.mute.set()
    log.append_batch([Record.put(b"b%d" % i, b"v") for i in range(20)])
    wait_for(lambda: stream_count(cluster, stream) == 120, 30, "the stream to store LSNs 101-120")
    return time.time()


def test_resends_of_publishes_stored_without_their_puback_keep_safe_since(cluster, tmp_path):
    """Publishes the stream stored but whose PubAcks were lost are resent at every retry; the stream's
    duplicate window counts from the stored copies, so `safe_since` must stay at their first publish.
    Before, each retry stored `safe_since` = now (only the resends in flight counted), and after a kill -9
    the restart passed the resume check and stored the records a second time (20 duplicates here)."""
    d = tmp_path / "w"
    proxy = AckDropProxy(cluster.client_ports[0])
    out = tmp_path / "mirror.out"
    try:
        with Log.open(d) as log:
            log.append_batch([Record.put(b"a%d" % i, b"v") for i in range(100)])
            proc = spawn_via(proxy, d, "ACKLOST", out, "--create", "--replicas", "1", "--duplicate-window", "6")
            try:
                stored_by = lose_pubacks_of_101_to_120(log, d, cluster, proxy, "ACKLOST")
                # The state is stored at each retry: kill right after the fourth (~9 s after the first publish).
                wait_for(lambda: load_state(d, "mirror").publish_errors >= 4, 60, "four failed rounds")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            state = load_state(d, "mirror")
            assert state.mirrored_lsn == 100 and not state.clean
            assert state.safe_since <= stored_by, (state.safe_since, stored_by)
            r = run_mirror(d, cluster, "ACKLOST")  # straight to the cluster
            assert r.returncode == 1, r.stdout + r.stderr + out.read_text()[-3000:]
            assert "refuses to resume" in r.stderr and "duplicate window is 6 s" in r.stderr, r.stderr
            log_id = log.log_id
    finally:
        proxy.close()
    assert mirrored_lsns(cluster, "ACKLOST", log_id) == list(range(1, 121))


def test_mirror_worker_program_stops_cleanly_on_sigterm(cluster, tmp_path):
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append_batch([Record.put(b"k%d" % i, b"v") for i in range(300)])
        log_id = log.log_id
    out = tmp_path / "worker.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "walsvc.workers.mirror_worker", "--dir", str(d),
                                 "--servers", ",".join(cluster.urls), "--stream", "WORKER", "--create",
                                 "--replicas", "1", "--packed"], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, env=python_env())
    try:
        wait_for(lambda: (s := load_state(d, "mirror")) and s.mirrored_lsn == 300, 60, "the worker to mirror")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0 and "mirrored_lsn=300" in out.read_text(), out.read_text()[-2000:]
    assert load_state(d, "mirror").clean
    assert mirrored_lsns(cluster, "WORKER", log_id) == list(range(1, 301))


def test_mirror_and_restore_say_why_they_cannot_start(cluster, tmp_path):
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append(Record.put("a", "b"))
    r = run_mirror(d, cluster, "MISSING")
    assert r.returncode == 1 and "stream MISSING does not exist; pass --create" in r.stderr, r.stderr
    r = run_cli("mirror", "--dir", d, "--servers", "nats://127.0.0.1:1", "--stream", "S", "--open-timeout", "2")
    assert r.returncode == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in r.stderr, r.stderr
    r = run_cli("restore", "--dir", tmp_path / "r", "--servers", ",".join(cluster.urls), "--stream", "MISSING")
    assert r.returncode == 1 and "stream MISSING does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()  # an empty directory was left behind
    (d / logid.FILENAME).unlink()
    r = run_mirror(d, cluster, "MISSING")
    assert r.returncode == 1 and "has no log id yet" in r.stderr, r.stderr


def test_mirror_and_restore_without_a_log_or_a_server_leave_nothing_behind(tmp_path):
    """`mirror --dir` a directory that does not exist said 'has no log id yet: start its writer', exit 1;
    `restore` with no NATS reachable left an empty directory (0755 under a usual umask) behind."""
    mirror = run_cli("mirror", "--dir", tmp_path / "nodir", "--servers", "nats://127.0.0.1:1", "--stream", "S",
                     "--open-timeout", "2")
    assert mirror.returncode == 2 and len(mirror.stderr.splitlines()) == 1, mirror.stderr
    assert "--dir" in mirror.stderr and "does not exist" in mirror.stderr, mirror.stderr
    r = subprocess.run(walsvc_cmd("restore", "--dir", tmp_path / "new", "--servers", "nats://127.0.0.1:1",
                                  "--stream", "S"), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                       env=python_env(), umask=0o022)
    assert r.returncode == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_create_waits_for_the_peers_a_replicated_stream_needs(tmp_path):
    """A cluster still forming: two of three nodes up, so a meta leader but no room for an R3 stream
    (JetStream: "no suitable peers for placement").  `--create` waits within its open timeout, as it waits
    for a leader, and makes the stream once the third node is up.  Before, it failed at once."""
    c = Cluster(tmp_path / "nats").start(0).start(1)
    try:
        c.wait_ready(60)  # the two nodes make R2 streams
        sink = JetStreamSink(c.urls, "FORMING", "forming.x", create=True, replicas=3, open_timeout_s=60)

        async def open_then_start_the_third() -> None:
            opening = asyncio.ensure_future(sink.open())
            await asyncio.sleep(2)
            assert not opening.done(), opening  # still waiting for the peers: neither open nor failed
            c.start(2)
            await opening
            try:
                assert (await sink._js.stream_info("FORMING")).config.num_replicas == 3
            finally:
                await sink.close()

        asyncio.run(open_then_start_the_third())
    finally:
        c.close()


def test_a_resume_keeps_the_last_runs_safe_since_until_its_copies_are_behind_the_cursor(cluster, tmp_path):
    """The stream stored LSNs 101-120, their PubAcks lost, and the mirror was killed.  A restart within the
    duplicate window resumes; killed again right after its first state store, it must leave the first run's
    `safe_since`: the stored copies' window counts from then.  Before, that store said "now", and a third
    start after the window (measured from the copies) passed the resume check and stored 101-120 twice."""
    d = tmp_path / "w"
    proxy = AckDropProxy(cluster.client_ports[0])
    out = tmp_path / "mirror.out"
    try:
        with Log.open(d) as log:
            log.append_batch([Record.put(b"a%d" % i, b"v") for i in range(100)])
            proc = spawn_via(proxy, d, "CARRY", out, "--create", "--replicas", "1", "--duplicate-window", "10")
            try:
                stored_by = lose_pubacks_of_101_to_120(log, d, cluster, proxy, "CARRY")
                wait_for(lambda: load_state(d, "mirror").safe_since <= stored_by < load_state(d, "mirror").updated,
                         30, "a state store with 101-120 in flight")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            proxy.mute.clear()
            time.sleep(max(0.0, stored_by + 3 - time.time()))
            proc = spawn_via(proxy, d, "CARRY", out, "--commit-interval-ms", "600000")  # resumes; stores at start only
            try:
                wait_for(lambda: load_state(d, "mirror").pid == proc.pid, 30, "the resumed mirror's first store")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            state = load_state(d, "mirror")
            assert not state.clean and state.safe_since <= stored_by, (state.safe_since, stored_by)
            time.sleep(max(0.0, stored_by + 10.5 - time.time()))  # past the window of the copies, not of the resume
            r = run_mirror(d, cluster, "CARRY")
            assert r.returncode == 1, r.stdout + r.stderr + out.read_text()[-3000:]
            assert "refuses to resume" in r.stderr and "duplicate window is 10 s" in r.stderr, r.stderr
            log_id = log.log_id
    finally:
        proxy.close()
    assert mirrored_lsns(cluster, "CARRY", log_id) == list(range(1, 121))


def test_mirror_stops_on_sigterm_while_waiting_for_nats(tmp_path):
    """`timeout 5 walsvc mirror ...` with no NATS server answering ran on for the whole 60 s open timeout:
    SIGTERM (and Ctrl-C) only stopped the mirror loop, not the wait for the servers."""
    from nats_cluster import free_ports
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append(Record.put("a", "b"))
    proc = subprocess.Popen(walsvc_cmd("mirror", "--dir", d, "--servers", f"nats://127.0.0.1:{free_ports(1)[0]}",
                                       "--stream", "S", "--open-timeout", "60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=python_env())
    time.sleep(2)
    assert proc.poll() is None
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - began < 5, err
    assert proc.returncode == 1 and "stopped while opening JetStream stream S" in err, err
    assert "Traceback" not in err and not (d / "mirror").exists()


def test_create_on_a_single_server_asks_for_one_replica_at_once(tmp_path):
    """The README's `walsvc mirror --dir wal-data --stream S --create` against one nats-server (not a cluster):
    the default 3 replicas are refused ('replicas > 1 not supported in non-clustered mode'), which no wait
    cures, yet it was retried for the whole open timeout, as 'not available yet'."""
    from nats_cluster import find_nats_server, free_ports
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append(Record.put("a", "b"))
    port = free_ports(1)[0]
    server = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                               str(tmp_path / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return True
            except OSError:
                return False

        wait_for(accepting, 20, "nats-server to accept clients")
        began = time.monotonic()
        r = run_cli("mirror", "--dir", d, "--servers", url, "--stream", "S", "--create", "--once")
        assert time.monotonic() - began < 20 and r.returncode == 1, r.stderr
        assert "pass --replicas 1 for a single server" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = run_cli("mirror", "--dir", d, "--servers", url, "--stream", "S", "--create", "--replicas", "1", "--once")
        assert r.returncode == 0 and "mirrored_lsn=1" in r.stdout, r.stdout + r.stderr
    finally:
        server.terminate()
        server.wait(10)


def test_mirror_and_restore_without_nats_py_say_how_to_install_it(tmp_path):
    """Without the optional nats-py, `walsvc mirror` and `walsvc restore` ended in a ModuleNotFoundError
    traceback."""
    d = tmp_path / "w"
    with Log.open(d) as log:
        log.append(Record.put("a", "b"))
    for args in (["mirror", "--dir", str(d), "--stream", "S"], ["restore", "--dir", str(tmp_path / "r"), "--stream", "S"]):
        code = f"import sys; sys.modules['nats'] = None; from walsvc.cli import main; sys.exit(main({args!r}))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                           env=python_env())
        assert r.returncode == 1 and "pip install 'walsvc[nats]'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
