"""What a user of Kafka, Redis Streams or NATS expects from the command line and the Python API.

The command, its flags and help; positions that are honest (no silent skip, no cursor moving backwards);
named cursors with one reader at a time; produce/tail/dump options.  Real processes, real files.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT, python_env, run_all, run_cli, wait_for, walsvc_cmd

import walsvc
from walsvc.errors import ConfigError, CursorBusyError, CursorError


def make_log(directory: Path, batches: list[list[walsvc.Record]], pause: float = 0.0) -> list[int]:
    """An offline log written with the embedded API; returns each batch's first LSN."""
    firsts = []
    with walsvc.Log.open(directory, fsync="os") as log:
        for batch in batches:
            firsts.append(log.append_batch(batch)[0])
            time.sleep(pause)
    return firsts


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def one_line_error(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


# -- the command itself ---------------------------------------------------------------------------------

def test_bare_command_lists_commands_and_version_is_the_package_version() -> None:
    bare = run_cli()
    assert bare.returncode == 2 and "required" not in bare.stdout + bare.stderr
    for command in ("serve", "produce", "tail", "status", "verify", "dump", "up", "cursors"):
        assert f"\n    {command} " in bare.stdout, bare.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith(f"walsvc {walsvc.__version__} (record codec: ")
    assert walsvc.__version__.count(".") == 2


def test_errors_name_the_subcommand_and_suggest(tmp_path: Path) -> None:
    typo, flag, unknown, policy, action = run_all(
        ["stauts"], ["status", "--dir", str(tmp_path), "--jsn"], ["tail", "--bogus"],
        ["serve", "--dir", str(tmp_path / "w"), "--fsync", "bogus"], ["cursors", "dleete", "--dir", str(tmp_path)])
    one_line_error(typo, "'stauts'", "did you mean status")
    one_line_error(flag, "walsvc status:", "--jsn", "did you mean --json")
    one_line_error(unknown, "walsvc tail:", "--bogus")
    # A flag's or an argument's value gets the choices, no guess: "did you mean os?" steered to the least
    # durable fsync policy.
    assert "did you mean" not in one_line_error(policy, "--fsync", "'always', 'batch', 'os'")
    assert "did you mean" not in one_line_error(action, "'list', 'reset', 'delete'")


def test_a_typo_in_dir_is_an_error_not_empty_output(tmp_path: Path) -> None:
    make_log(tmp_path / "wal", [[walsvc.Record.put(b"k", b"v")]])
    (tmp_path / "empty").mkdir()
    commands = [["tail"], ["dump"], ["status"], ["cursors", "list"], ["verify"]]
    n = len(commands)
    results = run_all(*[c + ["--dir", str(tmp_path / "wall")] for c in commands],
                      *[c + ["--dir", str(tmp_path / "empty")] for c in commands],
                      ["verify", "--dir", str(REPO_ROOT / "walsvc")], ["verify", "--dir", ""],
                      ["tail", "--dir", str(tmp_path / "wal")], ["verify", "--dir", str(tmp_path / "wal")])
    for result in results[:n]:
        one_line_error(result, "--dir", "does not exist")
    for result in results[n:2 * n + 1]:  # verify said "OK. 0 segments" with exit 0 for any directory
        one_line_error(result, "--dir", "not a walsvc log")
    one_line_error(results[2 * n + 1], "--dir", "empty")  # not the working directory
    assert len(lines(results[2 * n + 2])) == 1
    assert "OK" in lines(results[2 * n + 3])[0]


def test_log_open_on_a_file_is_a_walsvc_error(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a log directory"):
        walsvc.Log.open(f)


def test_a_new_log_takes_16_mib_not_128(tmp_path: Path) -> None:
    make_log(tmp_path / "wal", [[walsvc.Record.put(b"k", b"v")]] * 2)
    size = sum(p.stat().st_blocks * 512 for p in (tmp_path / "wal").iterdir() if p.is_file())
    assert size <= 17 * 2**20, size
    assert walsvc.LogConfig().segment_bytes == 16 * 2**20


def test_status_watch_takes_only_a_positive_finite_interval(tmp_path: Path) -> None:
    """--watch -1 / nan printed once then a ValueError traceback; inf and 1e300 an OverflowError one."""
    d = tmp_path / "wal"
    make_log(d, [[walsvc.Record.put(b"k", b"v")]])
    for result in run_all(*[["status", "--dir", str(d), "--watch", v] for v in ("-1", "nan", "inf", "1e300", "0")]):
        one_line_error(result, "--watch", "more than 0")
        assert result.stdout == "", result.stdout


# -- produce, tail, dump options -------------------------------------------------------------------------

def test_produce_delete_and_ttl_then_tail_and_dump_ranges(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d, fsync="os").start()
    assert lines(run_cli("produce", "--dir", str(d), "--kv", "--ttl", "60000", input="a\t1\nb\t2\nc\t3\n")) == ["1", "2", "3"]
    assert lines(run_cli("produce", "--dir", str(d), "--delete", input="a\nb\n")) == ["4", "5"]
    one_line_error(run_cli("produce", "--dir", str(d), "--delete", "--ttl", "5", input="a\n"), "--ttl")
    tail, to, limit, dump_to, dump_limit, follow = run_all(
        ["tail", "--dir", str(d), "--json"], ["tail", "--dir", str(d), "--from", "2", "--to", "4"],
        ["tail", "--dir", str(d), "--from", "2", "--limit", "2"], ["dump", "--dir", str(d), "--to", "2"],
        ["dump", "--dir", str(d), "--from", "3", "--limit", "1"],
        ["tail", "--dir", str(d), "--follow", "--to", "5"])  # ends after LSN 5 instead of waiting forever
    rows = [json.loads(x) for x in lines(tail)]
    assert [(r["lsn"], r["key"], r["tombstone"], r["ttl_ms"]) for r in rows] == [
        (1, "a", False, 60000), (2, "b", False, 60000), (3, "c", False, 60000), (4, "a", True, None),
        (5, "b", True, None)]
    assert [x.split("\t")[0] for x in lines(to)] == ["2", "3", "4"]
    assert [x.split("\t")[0] for x in lines(limit)] == ["2", "3"]
    assert [json.loads(x)["lsn"] for x in lines(dump_to)] == [1, 2]
    assert [json.loads(x)["lsn"] for x in lines(dump_limit)] == [3]
    assert len(lines(follow)) == 5


def test_tail_text_escapes_what_could_pass_for_another_field_or_record(tmp_path: Path) -> None:
    """Keys and values went out raw (a value with "\\n7\\tPUT\\tfake\\tvalue" read as a second record) and bytes
    that are not UTF-8 were replaced lossily; now each line is one record and reads back to the stored bytes."""
    d = tmp_path / "wal"
    put = walsvc.Record.put
    make_log(d, [[put(b"k", b"ok\n7\tPUT\tfake\tvalue"), put(b"a\tb", b"back\\slash\r"),
                  put(b"\xff\xfe", "caf\u00e9 \x1b[31m \u0085 \U0001f600".encode()), walsvc.Record.delete(b"\\x41")]])
    tail, json_tail = run_all(["tail", "--dir", str(d)], ["tail", "--dir", str(d), "--json"])
    assert lines(tail) == ["1\tPUT\tk\tok\\n7\\tPUT\\tfake\\tvalue",
                           "2\tPUT\ta\\tb\tback\\\\slash\\r",
                           "3\tPUT\t\\xff\\xfe\tcaf\u00e9 \\x1b[31m \\u0085 \U0001f600",
                           "4\tDEL\t\\\\x41\t"]
    rows = [json.loads(x) for x in lines(json_tail)]  # unchanged: JSON has its own escapes
    assert rows[0]["value"] == "ok\n7\tPUT\tfake\tvalue" and rows[3]["key"] == "\\x41"
    assert "key_b64" in rows[2]
    assert "\\xff" in run_cli("tail", "--help").stdout


def test_produce_reports_what_was_stored_before_a_bad_line(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d, fsync="os").start()
    result = run_cli("produce", "--dir", str(d), "--kv", input="a\t1\nb\t2\nno tab here\nc\t3\n")
    one_line_error(result, "line 3", "no TAB")
    assert result.stdout.split() == ["1", "2"]
    # Each LSN appears once durable, while stdin is still open (a person typing, a slow pipe).
    typing = subprocess.Popen(walsvc_cmd("produce", "--dir", str(d)), cwd=REPO_ROOT, env=python_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        typing.stdin.write("first\n")
        typing.stdin.flush()
        assert typing.stdout.readline() == "3\n"
        typing.stdin.write("second\n")
        typing.stdin.close()
        assert typing.stdout.read() == "4\n" and typing.wait(30) == 0
    finally:
        typing.kill()


def test_from_past_the_end_is_an_error_never_a_silent_skip(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, [[walsvc.Record.put(b"k", b"v")] * 3])
    tail, dump, next_one = run_all(["tail", "--dir", str(d), "--from", "10"], ["dump", "--dir", str(d), "--from", "5"],
                                   ["tail", "--dir", str(d), "--from", "4"])
    one_line_error(tail, "--from", "LSN 10", "committed up to LSN 3")
    one_line_error(dump, "--from", "LSN 5")
    assert lines(next_one) == []  # one past the end: the next record


def test_from_time_starts_at_the_first_record_written_then(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, [[walsvc.Record.put(b"old", b"1")], [walsvc.Record.put(b"new", b"2")] * 2], pause=0.05)
    with walsvc.Log.open(d) as log:
        stamps = [r.timestamp for r in log.read(1)]
    between = datetime.datetime.fromtimestamp((stamps[0] + stamps[1]) / 2e6, tz=datetime.timezone.utc)
    assert walsvc.lsn_at_time(d, between) == 2 and walsvc.lsn_at_time(d, stamps[0]) == 1
    tail = ["tail", "--dir", str(d), "--from-time"]
    mid, early, late, bad, both, ancient, first = run_all(
        tail + [between.isoformat()], ["dump", "--dir", str(d), "--from-time", "2000-01-01T00:00:00Z"],
        tail + ["2999-01-01T00:00:00+00:00"], tail + ["yesterday"], tail + [between.isoformat(), "--from", "1"],
        tail + ["0001-01-01"], tail + ["0001-01-01T00:00:00Z"])
    assert [x.split("\t")[:3] for x in lines(mid)] == [["2", "PUT", "new"], ["3", "PUT", "new"]]
    assert [json.loads(x)["lsn"] for x in lines(early)] == [1, 2, 3]
    assert lines(late) == []
    one_line_error(bad, "--from-time")
    one_line_error(both, "--from")
    # A local time before year 1 in UTC said "invalid _time value" (the parser's function name).
    assert "_time" not in one_line_error(ancient, "--from-time", "'0001-01-01'", "0001-01-01T00:00:00Z")
    assert len(lines(first)) == 3


# -- named cursors ---------------------------------------------------------------------------------------

def test_a_named_cursor_has_one_reader_and_the_error_names_the_holder(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d, fsync="os").start()
    holder = subprocess.Popen(walsvc_cmd("tail", "--dir", str(d), "--name", "billing", "--follow"), cwd=REPO_ROOT,
                              env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = d / "cursors" / "billing.lock"
        wait_for(lambda: lock.exists() and lock.read_text().split()[:1] == [str(holder.pid)], 30,
                 "the tail to hold billing")
        fds = set(os.listdir("/proc/self/fd"))
        with pytest.raises(CursorBusyError, match=f"process {holder.pid}"):
            walsvc.Reader(d, name="billing")
        assert set(os.listdir("/proc/self/fd")) == fds, "the refused reader left descriptors open"
        one_line_error(run_cli("tail", "--dir", str(d), "--name", "billing"), f"process {holder.pid}", code=1)
        with pytest.raises(CursorBusyError):
            walsvc.reset_cursor(d, "billing", "earliest")
        with walsvc.Reader(d, name="other"):  # other names are free
            pass
    finally:
        holder.terminate()
        holder.wait(30)
    with walsvc.Reader(d, name="billing"):  # free again once its holder is gone
        pass


def test_cursors_move_forward_only_unless_reset_on_purpose(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, [[walsvc.Record.put(b"k", b"v")] * 5])
    with walsvc.Reader(d, name="c") as reader:
        assert len(reader.poll(1)) == 5
        reader.commit(4)
        reader.commit(4)  # the same LSN again: a no-op
        with pytest.raises(CursorError, match="backwards"):
            reader.commit(2)
    assert walsvc.list_cursors(d) == {"c": 4}
    # An LSN or a time beside an existing named cursor is refused in Python too: Reader(name=, start=2) read
    # from LSN 5 without a word.  'earliest'/'latest' only start a new cursor (Kafka's auto.offset.reset).
    for start in (2, datetime.datetime(2020, 1, 1)):
        with pytest.raises(ConfigError, match="the cursor 'c' exists \\(at LSN 4\\)"):
            walsvc.Reader(d, start, name="c")
    with walsvc.Reader(d, "earliest", name="c") as reader:
        assert [r.lsn for r in reader.poll(1)] == [5]
    with walsvc.Reader(d, 2, name="new") as reader:  # a new cursor starts where it is told
        assert [r.lsn for r in reader.poll(1)] == [2, 3, 4, 5]
    walsvc.delete_cursor(d, "new")
    # A commit past what the reader delivered was stored (commit(10**6): every later record up to LSN
    # 1,000,000 skipped, unread); a commit after close moved a cursor this reader no longer held.
    with walsvc.Reader(d, name="ahead") as reader:
        with pytest.raises(CursorError, match="past the last record this reader delivered \\(LSN 0\\)"):
            reader.commit(1)
        assert [r.lsn for r in reader.poll(1)] == [1, 2, 3, 4, 5]
        with pytest.raises(CursorError, match="commit\\(1000000\\) is past"):
            reader.commit(10**6)
        reader.commit(3)
    assert walsvc.list_cursors(d)["ahead"] == 3
    with pytest.raises(walsvc.LogClosedError, match="'ahead' is closed"):
        reader.commit(5)
    with pytest.raises(walsvc.LogClosedError):
        reader.lag()
    assert walsvc.list_cursors(d)["ahead"] == 3
    walsvc.delete_cursor(d, "ahead")
    # --from beside an existing named cursor is refused, not silently ignored
    one_line_error(run_cli("tail", "--dir", str(d), "--name", "c", "--from", "1"), "--from", "'c'", "LSN 4")
    assert [x.split("\t")[0] for x in lines(run_cli("tail", "--dir", str(d), "--name", "c"))] == ["5"]
    assert "c\tat LSN 5\t0 records behind" in lines(run_cli("cursors", "list", "--dir", str(d)))
    assert lines(run_cli("cursors", "reset", "c", "--to", "2", "--dir", str(d))) == ["cursor c: the reader resumes at LSN 2"]
    assert json.loads(run_cli("cursors", "list", "--json", "--dir", str(d)).stdout) == {"c": {"lsn": 1, "lag_records": 4}}
    assert [x.split("\t")[0] for x in lines(run_cli("tail", "--dir", str(d), "--name", "c", "--limit", "1"))] == ["2"]
    # A bad argument: exit 2 naming --to (it was exit 1, naming nothing); `list` takes no name (it was ignored).
    past, extra = run_all(["cursors", "reset", "c", "--to", "9", "--dir", str(d)],
                          ["cursors", "list", "c", "--dir", str(d)])
    one_line_error(past, "--to", "LSN 9 is past the end", "committed up to LSN 5", "LSN 6 at most")
    one_line_error(extra, "cursors list", "takes no cursor name", "'c'")
    resumes = lines(run_cli("cursors", "reset", "c", "--to", "6", "--dir", str(d)))  # one past the end: allowed
    assert resumes == ["cursor c: the reader resumes at LSN 6"]
    assert walsvc.reset_cursor(d, "c", "latest") == 5
    assert lines(run_cli("cursors", "delete", "c", "--dir", str(d))) == ["cursor c deleted"]
    assert walsvc.list_cursors(d) == {}
    one_line_error(run_cli("cursors", "delete", "c", "--dir", str(d)), "no cursor named 'c'", code=1)
    assert walsvc.delete_cursor(d, "c") is False
    walsvc.reset_cursor(d, "fresh", "earliest")
    assert walsvc.list_cursors(d) == {"fresh": 0}
