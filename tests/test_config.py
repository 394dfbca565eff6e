"""One config model and one error hierarchy: every section goes through one schema, `[producer]` and
`[reader]` reach the clients (a keyword argument wins), a producer takes its limits from the writer, and
misuse of the public API raises walsvc errors only."""

from __future__ import annotations

import datetime
import inspect
import json
import tomllib
from pathlib import Path

import pytest

import walsvc
from helpers import run_cli
from walsvc import Log, Record, errors
from walsvc.config import SECTIONS, Config, LogConfig, RetentionConfig, cpu_list, load
from walsvc.errors import ConfigError, RecordTooLargeError, WalError

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# -- the error hierarchy --------------------------------------------------------------------------------

def test_every_exception_class_derives_from_wal_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert len(classes) > 20
    assert [c.__name__ for c in classes if not issubclass(c, WalError)] == []
    # The stdlib second bases that generic handlers rely on.
    assert issubclass(errors.AckTimeoutError, TimeoutError) and issubclass(errors.BackpressureError, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.WriteStepError, OSError)
    assert all(getattr(walsvc, c.__name__) is c for c in classes if not c.__name__.startswith("_"))  # all public


def test_a_location_reads_one_way_in_every_error() -> None:
    where = errors.Location("00000000000000000001.wal", 4096, 17)
    assert str(where) == "segment 00000000000000000001.wal, offset 4096, LSN 17"
    corrupt = errors.CorruptionError("bad", segment=where.segment, offset=4096, lsn=17)
    assert str(corrupt) == f"corruption: bad ({where})" and corrupt.location == where
    assert str(errors.ChecksumError("crc", offset=3)) == "crc (offset 3)"
    assert errors.ChecksumError("crc", offset=3).location == errors.Location(offset=3)
    assert errors.Location().after("plain") == "plain"


def _misuse(d: Path) -> dict:
    """name -> a call that uses the public API wrongly (a log with one record is in `d`)."""
    missing = d.parent / "missing"
    return {
        "Log.open: unknown option": lambda: Log.open(missing, segment_byte=MiB),
        "Log.open: wrong type": lambda: Log.open(missing, fsync_window_ms="5"),
        "Log.open: directory None": lambda: Log.open(None),
        "Log.open: directory a number": lambda: Log.open(5),
        "LogConfig: unknown key": lambda: LogConfig(colour="red"),
        "Log.open: config a dict": lambda: Log.open(missing, config={"fsync": "os"}),
        "Record.put: key an int": lambda: Record.put(1, b"v"),
        "Record.put: negative TTL": lambda: Record.put(b"k", b"v", ttl_ms=-1),
        "Record.put: unknown compression": lambda: Record.put(b"k", b"v", compression="gzip"),
        "append: not a Record": lambda: log_append(d, "text"),
        "append: Record with an int key": lambda: log_append(d, Record(1, b"v")),
        "append: Record with a str value": lambda: log_append(d, Record(b"k", "v")),
        "read: bad start": lambda: log_read(d, "first"),
        "read: LSN 0": lambda: log_read(d, 0),
        "LogReader: bad start": lambda: walsvc.LogReader(d, -3),
        "LogReader: directory None": lambda: walsvc.LogReader(None),
        "Log.open: first_lsn a string": lambda: Log.open(missing, first_lsn="1"),
        "import_nori: source None": lambda: walsvc.import_nori(None, missing),
        "lsn_at_time: a string": lambda: walsvc.lsn_at_time(d, "yesterday"),
        "lsn_at_time: directory None": lambda: walsvc.lsn_at_time(None, 0),
        "reset_cursor: bad name": lambda: walsvc.reset_cursor(d, "../x", 1),
        "reset_cursor: name a number": lambda: walsvc.reset_cursor(d, 5, 1),
        "reset_cursor: bad position": lambda: walsvc.reset_cursor(d, "x", "start"),
        "reset_cursor: no such log": lambda: walsvc.reset_cursor(missing, "x", 1),
        "delete_cursor: name a number": lambda: walsvc.delete_cursor(d, 7),
        "list_cursors: directory None": lambda: walsvc.list_cursors(None),
        "Reader: bad start": lambda: walsvc.Reader(d, "first"),
        "Reader: LSN past the end": lambda: walsvc.Reader(d, 100),
        "Reader: name a number": lambda: walsvc.Reader(d, name=3),
        "Reader: recheck_s a string": lambda: walsvc.Reader(d, recheck_s="fast"),
        "Reader: max_record_bytes negative": lambda: walsvc.Reader(d, max_record_bytes=-1),
        "Reader: directory None": lambda: walsvc.Reader(None),
        "Reader: commit unnamed": lambda: reader_commit(d, None, 1),
        "Reader: commit a negative LSN": lambda: reader_commit(d, "neg", -1),
        "Reader: commit a string": lambda: reader_commit(d, "str", "1"),
        "Reader: commit past 2**64": lambda: reader_commit(d, "big", 1 << 64),
        "Reader: group with a bad lease": lambda: walsvc.Reader(d, group="g", consumer="c", lease_ms=0),
        "Producer: no writer": lambda: walsvc.Producer(d),
        "Producer: linger_ms negative": lambda: walsvc.Producer(d, linger_ms=-1),
        "Producer: batch_bytes a string": lambda: walsvc.Producer(d, batch_bytes="1M"),
        "Producer: directory None": lambda: walsvc.Producer(None),
        "Producer: not a TOML file": lambda: walsvc.Producer(__file__),
        "Log.append_batch: None": lambda: log_call(d, lambda log: log.append_batch(None)),
        "Log.append_batch: a Record, not a list": lambda: log_call(d, lambda log: log.append_batch(Record.put(b"k", b"v"))),
        "Log.skip_to: a string": lambda: log_call(d, lambda log: log.skip_to("x")),
        "Log.wait_committed: a string": lambda: log_call(d, lambda log: log.wait_committed("x")),
        "Reader.poll: timeout a string": lambda: reader_call(d, lambda reader: reader.poll(timeout="x")),
        "Reader.poll: negative timeout": lambda: reader_call(d, lambda reader: reader.poll(timeout=-1)),
    }


def log_call(d: Path, call: object) -> None:
    with Log.open(d, fsync="os") as log:
        call(log)


def reader_call(d: Path, call: object) -> None:
    with walsvc.Reader(d) as reader:
        call(reader)


def log_append(d: Path, record: object) -> None:
    with Log.open(d, fsync="os") as log:
        log.append(record)


def log_read(d: Path, start: object) -> None:
    with Log.open(d, fsync="os") as log:
        list(log.read(start))


def reader_commit(d: Path, name: str | None, lsn: object) -> None:
    with walsvc.Reader(d, name=name) as reader:
        reader.commit(lsn)


def test_misuse_of_the_public_api_raises_walsvc_errors_only(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Log.open(d, fsync="os") as log:
        log.append(Record.put(b"k", b"v"))
    leaked = {}
    for name, call in _misuse(d).items():
        try:
            call()
        except WalError as exc:
            assert str(exc), name
        except Exception as exc:  # noqa: BLE001 - what this test looks for
            leaked[name] = f"{type(exc).__name__}: {exc}"
        else:
            leaked[name] = "no error at all"
    assert leaked == {}
    assert not (tmp_path / "missing").exists()  # refused before anything touched a file
    with Log.open(d, fsync="os") as log:  # and the log is intact
        assert [r.key for r in log.read()] == [b"k"]


# -- one schema for every section -----------------------------------------------------------------------

def test_default_toml_documents_every_key_with_its_default() -> None:
    data = tomllib.loads((ROOT / "configs/default.toml").read_text())
    assert set(data) == set(SECTIONS)
    for name, section in SECTIONS.items():
        table = dict(data[name])
        table.pop("dir", None) if name == "log" else None
        assert sorted(table) == sorted(section.keys()), name
        defaults = section()
        assert {k: getattr(defaults, k) for k in table} == table, name


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_an_unknown_key_in_any_section_is_refused_by_name(tmp_path: Path, section: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\ncolour = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == f"{section}.colour" and str(info.value).startswith(f"{section}.colour: unknown key")


@pytest.mark.parametrize("text, key", [
    ("[producer]\nlinger_ms = -1\n", "producer.linger_ms"),
    ("[producer]\nmax_in_flight = 0\n", "producer.max_in_flight"),
    ('[producer]\nbatch_bytes = "1M"\n', "producer.batch_bytes"),
    ("[producer]\nack_timeout_s = true\n", "producer.ack_timeout_s"),
    ('[reader]\nstart = "first"\n', "reader.start"),
    ("[reader]\nrecheck_s = 0\n", "reader.recheck_s"),
    ("[reader]\nlease_ms = 0\n", "reader.lease_ms"),
    ("[retention]\nmax_age_s = 1.5\n", "retention.max_age_s"),
    ("[log]\nretention = 1\n", "log.retention"),
    ("[log]\nmax_bytes = 1\n", "log.max_bytes"),  # a [retention] key, in its own section only
    ("producer = 1\n", "producer"),
    # a batch must hold one record of max_record_bytes and its overhead (64 bytes at most)
    ("[log]\nmax_record_bytes = 4096\nmax_batch_bytes = 4159\n", "log.max_batch_bytes"),
])
def test_bad_values_in_the_new_sections_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key


def test_a_batch_just_large_enough_for_one_record_of_the_maximum_size_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[log]\nmax_record_bytes = 4096\nmax_batch_bytes = 4160\n")
    assert load(path).log.max_batch_bytes == 4160


def test_retention_is_its_own_section_and_the_flat_keywords_still_work(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[log]\nsegment_bytes = 1048576\n[retention]\nmax_bytes = 3145728\nmax_age_s = 60\n")
    cfg = load(path)
    assert cfg.retention == cfg.log.retention == RetentionConfig(max_bytes=3 * MiB, max_age_s=60)
    assert cfg.log.max_bytes == 3 * MiB  # read flat, as before
    assert LogConfig(max_bytes=5, fsync="os").retention.max_bytes == 5
    with Log.open(tmp_path / "wal", fsync="os", max_age_s=7, max_cursor_lag_bytes=0) as log:
        assert log.config.retention == RetentionConfig(max_age_s=7, max_cursor_lag_bytes=0)
    with pytest.raises(ConfigError) as info:
        LogConfig(max_bytes=-1)
    assert info.value.key == "retention.max_bytes"


# -- the clients honour [producer] and [reader]; keywords win --------------------------------------------

def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walsvc.toml"
    path.write_text('[log]\ndir = "wal"\nfsync = "os"\n' + text)
    return path


def test_producer_and_reader_take_their_sections_from_the_file_and_keywords_win(tmp_path: Path, writers) -> None:
    path = _config(tmp_path, "[producer]\nlinger_ms = 7\nbatch_bytes = 65536\nmax_in_flight = 4\n"
                             "ack_timeout_s = 2.5\nblock_timeout_s = 3\n"
                             '[reader]\nstart = "latest"\nrecheck_s = 0.2\nmax_records = 3\nlease_ms = 9000\n')
    writers(tmp_path / "wal", config=path).start()
    with walsvc.Producer(path) as producer:
        assert (producer.linger, producer.batch_bytes, producer.max_in_flight) == (0.007, 65536, 4)
        assert (producer.ack_timeout, producer.block_timeout) == (2.5, 3.0)
        first = producer.put(b"old", b"v").result(10)
    with walsvc.Producer(load(path), linger_ms=0, max_in_flight=2) as producer:  # a Config object too
        assert (producer.linger, producer.max_in_flight, producer.batch_bytes) == (0.0, 2, 65536)
    with walsvc.Reader(path) as reader:  # [reader] start = "latest": the old record is not read
        assert reader.recheck_s == 0.2
        with walsvc.Producer(path) as producer:
            new = producer.put(b"new", b"v").result(10)
        assert [(r.lsn, r.key) for r in reader.poll(10)] == [(new, b"new")]
    with walsvc.Reader(path, "earliest", recheck_s=0.01) as reader:
        assert reader.recheck_s == 0.01
        assert [r.lsn for r in reader.poll(10)][:1] == [first]
    with walsvc.Reader(path, group="g", consumer="a", start="earliest") as member:  # a group member too
        assert (member.max_records, member.lease_ms, member.recheck_s) == (3, 9000, 0.2)
        assert [r.lsn for r in member.poll(10)] == [first, first + 1]
    with walsvc.Reader(path, group="h", consumer="a", max_records=1) as member:  # starts at "latest"
        assert member.poll(0.3) == []  # the first claim makes the group, at the end of the log
        with walsvc.Producer(path) as producer:
            newest = producer.put(b"newest", b"v").result(10)
        assert [r.lsn for r in member.poll(10)] == [newest]
    with pytest.raises(ConfigError) as info:
        walsvc.Producer(path, max_in_flight=0)
    assert info.value.key == "producer.max_in_flight"
    # The command line reads the same sections: `tail` starts at [reader] start unless --from says otherwise.
    assert run_cli("tail", "--config", str(path)).stdout == ""
    assert run_cli("tail", "--config", str(path), "--from", "earliest").stdout.count("\n") == newest


def test_a_producer_learns_the_writers_limits_and_refuses_a_too_large_record_itself(tmp_path: Path,
                                                                                      writers) -> None:
    path = _config(tmp_path, "max_record_bytes = 4096\nmax_batch_bytes = 16384\n")
    d = tmp_path / "wal"
    writers(d, config=path).start()
    limits = json.loads((d / "ENDPOINTS").read_text())
    assert (limits["max_record_bytes"], limits["max_batch_bytes"], limits["max_message_bytes"]) == \
        (4096, 16384, 4096 + 64 * 1024)  # max_message_bytes 0: one record plus 64 KiB
    with walsvc.Producer(d) as producer:  # the directory only: nothing but ENDPOINTS says 4096
        assert producer.max_record_bytes == 4096
        assert producer.batch_bytes <= 16384  # and an open batch is closed before it would pass 16384
        with pytest.raises(RecordTooLargeError, match="4096"):
            producer.put(b"k", b"x" * 4096)  # refused here, at once, not nacked later
        with pytest.raises(RecordTooLargeError):
            producer.append(Record.put(b"k", b"x" * 5000, ttl_ms=10))
        fits = producer.put(b"k", b"x" * 4095).result(10)
        many = [producer.put(b"m", b"y" * 3000) for _ in range(20)]  # batches stay under max_batch_bytes
        assert [f.result(10) for f in many] == list(range(fits + 1, fits + 21))
    with walsvc.Producer(d, max_record_bytes=100) as producer:  # a lower limit of one's own
        assert producer.max_record_bytes == 100
        with pytest.raises(RecordTooLargeError):
            producer.put(b"k", b"x" * 200)
    with walsvc.Producer(d, max_record_bytes=MiB) as producer:  # never above the writer's
        assert producer.max_record_bytes == 4096
    with walsvc.Reader(d) as reader:  # readers take the writer's limits when larger than their defaults
        assert len(reader.poll(10)) >= 1


def test_reader_start_default_from_a_datetime_or_config_object(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Log.open(d, fsync="os") as log:
        log.append(Record.put(b"a", b"1"))
    cfg = Config(d, LogConfig(), load().service, reader=load().reader)
    with walsvc.Reader(cfg) as reader:
        assert [r.key for r in reader.poll(1)] == [b"a"]
    future = datetime.datetime.now() + datetime.timedelta(days=1)
    with walsvc.Reader(d, future) as reader:
        assert reader.poll(0.1) == []


@pytest.mark.parametrize("text, cpus", [("0", {0}), ("0,2", {0, 2}), ("1-3", {1, 2, 3}), (" 0 , 4-5", {0, 4, 5})])
def test_a_cpu_list_reads_as_taskset_takes_it(text: str, cpus: set[int]) -> None:
    assert cpu_list(text, 8) == cpus
    with pytest.raises(ValueError, match=f"CPU {max(cpus)} does not exist"):
        cpu_list(text, max(cpus))


def test_a_socket_dir_with_a_nul_byte_is_refused_by_key(tmp_path: Path) -> None:
    """os.mkdir raised a bare ValueError (a traceback) when the writer started."""
    path = tmp_path / "c.toml"
    path.write_text('[service]\nsocket_dir = "/tmp/a\\u0000b"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "service.socket_dir" and "NUL" in str(info.value)
    proc = run_cli("serve", "--config", str(path), "--dir", str(tmp_path / "wal"), timeout=20)
    assert proc.returncode == 2 and "service.socket_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("given, missing", [
    ({"ingest": "tcp://127.0.0.1:1"}, "publish"),
    ({"control": "ipc:///tmp/c.sock"}, "ingest"),
    ({"ingest": "tcp://127.0.0.1:1", "publish": "tcp://127.0.0.1:2"}, "control"),
])
def test_explicit_endpoints_are_all_three_or_none(tmp_path: Path, given: dict[str, str], missing: str) -> None:
    """The writer binds explicit endpoints only when all three are set: one or two were silently ignored (it
    bound ipc sockets instead)."""
    path = tmp_path / "c.toml"
    path.write_text("[service]\n" + "".join(f'{key} = "{value}"\n' for key, value in given.items()))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == f"service.{missing}" and "all set" in str(info.value)
    every = {"ingest": "tcp://127.0.0.1:1", "publish": "tcp://127.0.0.1:2", "control": "tcp://127.0.0.1:3"}
    path.write_text("[service]\n" + "".join(f'{key} = "{value}"\n' for key, value in every.items()))
    assert load(path).service.control == every["control"]


@pytest.mark.parametrize("text", ["0-99999999999", "99999999998-99999999999", "0,1-99999999999"])
def test_a_huge_cpu_range_is_refused_before_it_is_expanded(tmp_path: Path, text: str) -> None:
    """Expanded first, `0-99999999999` was a set of 10**11 numbers: 8 GB in 8 s before the check."""
    path = tmp_path / "c.toml"
    path.write_text(f'[service]\ncpus = "{text}"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "service.cpus" and "CPU 99999999999 does not exist" in str(info.value)


@pytest.mark.parametrize("value, says", [
    ('"a"', "'a' is not a CPU number"),
    ('"3-1"', "range 3-1 runs backwards"),
    ('"0,"', "'' is not a CPU number"),
    ('"99999"', "CPU 99999 does not exist"),
    ("0", "must be a str"),
])
def test_bad_writer_cpus_are_refused_by_key_with_the_reason(tmp_path: Path, value: str, says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[service]\ncpus = {value}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "service.cpus"
    assert says in str(info.value)


def test_a_mistyped_config_file_is_named_as_one(tmp_path: Path) -> None:
    """`Producer("walsvc.tmol.toml")`, a file that does not exist, was taken for a log directory: "no writer
    has run for ... start one with `walsvc serve --dir walsvc.tmol.toml`"."""
    missing = tmp_path / "walsvc.tmol.toml"
    for make in (walsvc.Producer, walsvc.Reader, lambda p: walsvc.Reader(p, group="g", consumer="a")):
        with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
            make(missing)
    assert not missing.exists()
