"""The `walsvc` command as a user runs it: `python -m walsvc ...` subprocesses against a real writer process."""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path


from helpers import REPO_ROOT, python_env, read_log, run_cli, status, walsvc_cmd

import pytest

import walsvc
from walsvc.record import Record


def run_many(commands: list[list[str]], timeout: float = 30.0) -> list[tuple[int, str, str]]:
    """Run several `walsvc` commands at once (each is quick to fail; this keeps the suite fast)."""
    procs = [subprocess.Popen(walsvc_cmd(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, cwd=REPO_ROOT, env=python_env()) for c in commands]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            raise AssertionError(f"walsvc {p.args[3:]} still running after {timeout} s (it should have failed)")
        out.append((p.returncode, stdout, stderr))
    return out


def assert_one_line_error(result: tuple[int, str, str], command: list[str], names: str) -> None:
    code, _, stderr = result
    assert code == 2, (command, code, stderr)
    assert "Traceback" not in stderr, (command, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, (command, stderr)
    assert names in lines[0], (command, names, stderr)


# -- bad flags and bad config ------------------------------------------------------------------------------

def test_bad_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    cases = [
        (["serve", "--dir", str(tmp_path / "w"), "--fsync", "sometimes"], "--fsync"),
        (["serve", "--dir", str(tmp_path / "w"), "--cpus", "first"], "--cpus"),
        (["serve", "--dir", str(tmp_path / "w"), "--cpus", "99999"], "--cpus"),
        (["up", "--dir", str(tmp_path / "w"), "--cpus", "0-"], "--cpus"),
        (["tail", "--dir", str(tmp_path / "w"), "--from", "-5"], "--from"),
        (["tail", "--dir", str(tmp_path / "w"), "--from", "0"], "--from"),
        (["tail", "--dir", str(tmp_path / "w"), "--from", "soon"], "--from"),
        (["dump", "--dir", str(tmp_path / "w"), "--from", "x"], "--from"),
        (["up", "--dir", str(tmp_path / "w"), "--producers", "-1"], "--producers"),
        (["up", "--dir", str(tmp_path / "w"), "--consumers", "two"], "--consumers"),
        (["up", "--dir", str(tmp_path / "w"), "--seconds", "abc"], "--seconds"),
        (["produce", "--dir", str(tmp_path / "w"), "--linger-ms", "abc"], "--linger-ms"),
        (["produce", "--dir", str(tmp_path / "w"), "--linger-ms", "-1"], "--linger-ms"),  # not producer.linger_ms
        (["produce", "--dir", str(tmp_path / "w"), "--timeout", "-1"], "--timeout"),
        (["produce", "--dir", str(tmp_path / "w"), "--timeout", "nan"], "--timeout"),
        (["produce", "--dir", str(tmp_path / "w"), "--timeout", "0"], "--timeout"),
        (["produce", "--dir", str(tmp_path / "w"), "--timeout", "1e300"], "--timeout"),
        (["produce", "--dir", str(tmp_path / "w"), "--ttl", "99999999999999999999999"], "--ttl"),
        (["mirror", "--dir", str(tmp_path / "w"), "--stream", "S", "--ack-timeout", "-1"], "--ack-timeout"),
        (["mirror", "--dir", str(tmp_path / "w"), "--stream", "S", "--open-timeout", "nan"], "--open-timeout"),
        (["mirror", "--dir", str(tmp_path / "w"), "--stream", "S", "--max-age", "-5"], "--max-age"),
        (["mirror", "--dir", str(tmp_path / "w"), "--stream", "S", "--duplicate-window", "0"], "--duplicate-window"),
        (["mirror", "--dir", str(tmp_path / "w"), "--stream", "S", "--commit-interval-ms", "inf"],
         "--commit-interval-ms"),
        (["status", "--dir", str(tmp_path / "w"), "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
        (["status", "--dir", str(tmp_path / "missing")], "--dir"),
        (["status", "--dir", str(a_file)], "--dir"),
        (["serve", "--dir", str(a_file)], "--dir"),
        (["tail", "--dir", str(a_file)], "--dir"),
        (["tail", "--dir", str(tmp_path / "w"), "--name", "bad/name"], "name"),
        (["up", "--dir", str(tmp_path / "w"), "--workers", str(tmp_path / "nowhere"), "--seconds", "1"], "--workers"),
    ]
    for (command, names), result in zip(cases, run_many([c for c, _ in cases])):
        assert_one_line_error(result, command, names)


BAD_CONFIGS = [
    ('[log]\nfsync = "never"\n', "log.fsync"),
    ('[log]\nsegment_bytes = "big"\n', "log.segment_bytes"),
    ("[log]\nsegment_bytes = 10\n", "log.segment_bytes"),
    ("[log]\ncolour = 1\n", "log.colour"),
    ("[log]\nmax_record_bytes = 1048576\nmax_batch_bytes = 4096\n", "log.max_batch_bytes"),
    ("[log]\npreallocate = 1\n", "log.preallocate"),
    ("[log]\ndir = 5\n", "log.dir"),
    ("[retention]\nmax_bytes = -1\n", "retention.max_bytes"),
    ("[retention]\nkeep = 3\n", "retention.keep"),
    ('[service]\ningest = "udp://127.0.0.1:1"\n', "service.ingest"),
    ('[service]\ningest = "tcp://10.1.2.3:5555"\npublish = "tcp://10.1.2.3:5556"\n'
     'control = "tcp://10.1.2.3:5557"\n', "service.ingest"),
    ("[service]\ningest_hwm = 0\n", "service.ingest_hwm"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[log\nfsync = \n", "--config"),
]


def test_bad_config_values_exit_2_with_one_line(tmp_path: Path) -> None:
    commands = []
    for i, (text, _) in enumerate(BAD_CONFIGS):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        commands.append(["serve", "--config", str(path), "--dir", str(tmp_path / f"wal{i}")])
    commands.append(["status", "--config", str(tmp_path / "missing.toml")])
    expected = [key for _, key in BAD_CONFIGS] + ["--config"]
    for command, key, result in zip(commands, expected, run_many(commands)):
        assert_one_line_error(result, command, key)
    # Nothing was created for a config that failed its checks.
    assert not any((tmp_path / f"wal{i}").exists() for i in range(len(BAD_CONFIGS)))


# -- produce, tail, status, verify --------------------------------------------------------------------------

def test_produce_kv_prints_one_lsn_per_line_once_durable(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    lines = "".join(f"key{i}\tvalue {i}\n" for i in range(50))
    result = run_cli("produce", "--dir", str(d), "--kv", input=lines, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(i) for i in range(1, 51)]
    assert status(d)["committed_lsn"] >= 50  # printed means committed
    # Without --kv each line is a value with an empty key.
    plain = run_cli("produce", "--dir", str(d), input="just a line\nanother\n")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["51", "52"]
    # A --kv line without a TAB: exit 2, one line naming --kv; the lines before it are in the log.
    bad = run_cli("produce", "--dir", str(d), "--kv", input="good\t1\nno tab here\n")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--kv" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    assert writer.stop() == 0
    records = read_log(d)
    assert [(r.key, r.value) for r in records[:50]] == [(f"key{i}".encode(), f"value {i}".encode())
                                                       for i in range(50)]
    assert [(r.key, r.value) for r in records[50:]] == [(b"", b"just a line"), (b"", b"another"), (b"good", b"1")]

    verify = run_cli("verify", "--dir", str(d), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True


def test_produce_without_a_writer_fails_at_once(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    assert writer.stop() == 0  # ENDPOINTS stays behind, naming a process that has exited
    started = time.monotonic()
    result = run_cli("produce", "--dir", str(d), "--kv", "--timeout", "60", input="a\tb\n", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert "no writer is running" in result.stderr and "walsvc serve" in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s, not the --timeout"
    # A writer that runs but does not answer (SIGSTOP): the --timeout applies, and the error says it runs.
    writer = writers(d).start()
    writer.pause()
    try:
        result = run_cli("produce", "--dir", str(d), "--kv", "--timeout", "1", input="a\tb\n", timeout=60)
    finally:
        writer.resume()
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "runs but has not acknowledged" in result.stderr, result.stderr
    # A directory where no writer ever ran: one line, exit 1.
    none = run_cli("produce", "--dir", str(tmp_path / "empty"), input="x\n")
    assert none.returncode == 1 and len(none.stderr.splitlines()) == 1 and "Traceback" not in none.stderr
    assert "walsvc serve" in none.stderr


def test_produce_fails_when_the_lsns_cannot_be_written_to_stdout(tmp_path: Path, writers) -> None:
    """A full disk under stdout (/dev/full) ended the acks thread silently and produce exited 0."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    d = tmp_path / "wal"
    writers(d).start()
    with open("/dev/full", "w") as full:
        proc = subprocess.run(walsvc_cmd("produce", "--dir", str(d)), input="1\n2\n3\n4\n5\n", stdout=full,
                              stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=python_env(), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "cannot write the LSNs to stdout: No space left on device" in proc.stderr, proc.stderr
    assert "all 5 appended line(s) were stored" in proc.stderr, proc.stderr
    assert status(d)["committed_lsn"] == 5


def test_serve_on_a_log_of_another_account_says_so(tmp_path: Path) -> None:
    """A 0700 log owned by another uid was reported as 'open to other users'."""
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another account (chown) needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    d = tmp_path / "wal"
    with walsvc.Log.open(d, fsync="os") as log:
        log.append(Record.put(b"k", b"v"))
    for path in [d, *d.rglob("*")]:
        os.chown(path, nobody, -1)
    # Without the capabilities that let root ignore file modes, as the writer of another account would run.
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown"] if setpriv else []
    result = subprocess.run(prefix + walsvc_cmd("serve", "--dir", str(d)), capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT, env=python_env())
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"log directory {d} belongs to another account: {d} is owned by uid {nobody}" in result.stderr
    assert "open to other users" not in result.stderr and "run it as the owner" in result.stderr


def test_tail_json_from_earliest(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        futures = [producer.put("text", "hello wörld"),
                   producer.put(b"\xff\xfekey", b"\x00\x80\xffvalue"),
                   producer.delete("gone"),
                   producer.put("ttl", "v", ttl_ms=60_000),
                   producer.append(Record.put("zipped", "z" * 500, compression="zstd"))]
        lsns = [f.result(30) for f in futures]
    assert lsns == [1, 2, 3, 4, 5]
    before = time.time() * 1e6

    result = run_cli("tail", "--dir", str(d), "--from", "earliest", "--json")
    assert result.returncode == 0, result.stderr
    assert "no writer is running" not in result.stderr, "tail says offline beside a live writer"
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["lsn"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"lsn", "timestamp", "tombstone", "ttl_ms"} <= set(r)
        assert 0 < before - r["timestamp"] < 120e6, "timestamp should be µs since the epoch, recent"
    assert (rows[0]["key"], rows[0]["value"], rows[0]["tombstone"], rows[0]["ttl_ms"]) == \
        ("text", "hello wörld", False, None)
    assert "key" not in rows[1] and "value" not in rows[1]
    assert base64.b64decode(rows[1]["key_b64"]) == b"\xff\xfekey"
    assert base64.b64decode(rows[1]["value_b64"]) == b"\x00\x80\xffvalue"
    assert (rows[2]["key"], rows[2]["value"], rows[2]["tombstone"]) == ("gone", "", True)
    assert (rows[3]["key"], rows[3]["ttl_ms"]) == ("ttl", 60_000)
    assert (rows[4]["key"], rows[4]["value"]) == ("zipped", "z" * 500)

    from_three = run_cli("tail", "--dir", str(d), "--from", "3", "--json")
    assert [json.loads(line)["lsn"] for line in from_three.stdout.splitlines()] == [3, 4, 5]
    text = run_cli("tail", "--dir", str(d), "--from", "latest")
    assert text.returncode == 0 and text.stdout == ""

    # A named tail keeps a durable cursor: the second run prints only what is new.
    named = run_cli("tail", "--dir", str(d), "--name", "audit", "--json")
    assert [json.loads(line)["lsn"] for line in named.stdout.splitlines()] == [1, 2, 3, 4, 5]
    with walsvc.Producer(d) as producer:
        assert producer.put("sixth", "6").result(30) == 6
    again = run_cli("tail", "--dir", str(d), "--name", "audit", "--json")
    assert [(r["lsn"], r["key"]) for r in map(json.loads, again.stdout.splitlines())] == [(6, "sixth")]
    rows.append(json.loads(again.stdout))

    assert writer.stop() == 0
    offline = run_cli("tail", "--dir", str(d), "--json")
    assert offline.returncode == 0
    assert "no writer is running" in offline.stderr
    assert [json.loads(line) for line in offline.stdout.splitlines()] == rows


def test_status_json_with_and_without_a_writer(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with walsvc.Producer(d) as producer:
        for i in range(7):
            producer.put(f"k{i}", "v")
        producer.flush(30)
    live = run_cli("status", "--dir", str(d), "--json")
    assert live.returncode == 0, live.stderr
    st = json.loads(live.stdout)
    assert st["writer"] == "running"
    assert st["pid"] == writer.pid
    assert (st["committed_lsn"], st["first_lsn"], st["fsync"]) == (7, 1, "os")
    assert st["counters"]["records"] == 7 and {k: v for k, v in st["rejected"].items() if v} == {}
    human = run_cli("status", "--dir", str(d))
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith(f"writer: running, pid {writer.pid}"), human.stdout
    assert "committed up to LSN 7" in human.stdout and "appended: 7 records" in human.stdout, human.stdout
    assert not re.search(r"\b(True|False|None)\b|[{}]", human.stdout), human.stdout  # no Python reprs

    assert writer.stop() == 0
    off = run_cli("status", "--dir", str(d), "--json")
    assert off.returncode == 0, off.stderr
    st = json.loads(off.stdout)
    assert st["writer"] == "offline"
    assert (st["committed_lsn"], st["first_lsn"], st["segments"]) == (7, 1, 1)
    assert st["bytes"] > 0

    # After kill -9 the HEAD still names a PID: status must notice it is dead.
    writer.start()
    writer.kill9()
    killed = json.loads(run_cli("status", "--dir", str(d), "--json").stdout)
    assert killed["writer"] == "offline" and killed["committed_lsn"] == 7


def test_up_runs_workers_and_exits_0(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    result = run_cli("up", "--dir", str(d), "--producers", "2", "--consumers", "1", "--seconds", "3",
                     "--fsync", "os", timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    done = re.search(r"walsvc up: done; ([\d,]+) records acknowledged, consumed \[([\d, ]+)\], writer exit code 0",
                     result.stdout)
    assert done, result.stdout
    acked = int(done.group(1).replace(",", ""))
    consumed = int(done.group(2).replace(",", "").strip())
    assert acked > 0
    assert consumed == acked, result.stdout
    records = read_log(d)
    assert len(records) == acked
    assert {r.key[:3] for r in records} == {b"w00", b"w01"}


def test_bench_outside_a_checkout_says_where_the_suite_is(tmp_path: Path) -> None:
    """The benchmark suite is not installed: an installed copy of the package (here: the package alone,
    copied away from the checkout) refuses `walsvc bench` with the way to run it, instead of a traceback."""
    import shutil
    shutil.copytree(REPO_ROOT / "walsvc", tmp_path / "site" / "walsvc")
    env = python_env()
    env["PYTHONPATH"] = str(tmp_path / "site")
    proc = subprocess.run([*walsvc_cmd(), "bench", "--quick"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "benchmark suite is in the source checkout" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench-results").exists()


def test_records_above_the_new_default_limit_still_read(tmp_path: Path) -> None:
    """The writer's default record limit is 1 MiB (it was 16 MiB): a log holding a 2 MiB record, written
    before or under a larger limit, still opens, reads and tails with the default config."""
    from walsvc.record import Record
    d = tmp_path / "w"
    log = walsvc.Log.open(d, max_record_bytes=4 << 20, max_batch_bytes=8 << 20)
    log.append(Record.put(b"big", b"v" * (2 << 20)))
    log.append(Record.put(b"small", b"s"))
    log.close()
    log = walsvc.Log.open(d)
    try:
        assert [(r.key, len(r.value)) for r in log.read()] == [(b"big", 2 << 20), (b"small", 1)]
    finally:
        log.close()
    proc = run_cli("tail", "--dir", str(d), "--from", "earliest", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["key"] for line in proc.stdout.splitlines()] == ["big", "small"]


def test_serve_runs_the_writer_and_all_its_threads_on_the_cpus_asked(tmp_path: Path, writers) -> None:
    """`[service] cpus`: every thread of the writer process (its loop, ZeroMQ's I/O thread, the fsync and
    rotation threads) may run only there; the log still takes appends and acks them."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to tell a pinned writer from one the kernel places")
    cpu = max(os.sched_getaffinity(0))
    config = tmp_path / "walsvc.toml"
    config.write_text(f'[service]\ncpus = "{cpu}"\n')
    w = writers(config=config, fsync="always").start()
    tasks = list(Path(f"/proc/{w.pid}/task").iterdir())
    assert len(tasks) >= 3, tasks  # the loop, ZeroMQ's I/O thread, the fsync thread at least
    for task in tasks:
        allowed = re.search(r"^Cpus_allowed_list:\s*(\S+)$", (task / "status").read_text(), re.M)
        assert allowed and allowed.group(1) == str(cpu), (task, allowed)
    with walsvc.Producer(w.directory) as producer:
        assert producer.put(b"k", b"v").result(10) == 1
    assert status(w.directory)["cpus"] == [cpu]  # and status says so
    assert io_thread_policies(w.pid) == [os.SCHED_BATCH]  # it never preempts the loop on their one CPU


def io_thread_policies(pid: int) -> list[int]:
    """The scheduling policy of each of libzmq's I/O threads in process `pid`."""
    return [os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()
            if (task / "comm").read_text().startswith("ZMQbg/IO")]


def test_an_unpinned_writer_leaves_its_io_thread_to_the_usual_scheduling(tmp_path: Path, writers) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a process on one CPU is pinned")
    w = writers().start()
    assert io_thread_policies(w.pid) == [os.SCHED_OTHER]
