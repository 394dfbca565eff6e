"""The `walsvc` command: serve | produce | tail | status | verify | dump | cursors | import-nori | up | mirror |
restore | bench.

Every subcommand takes `--dir` (default ./wal-data) or `--config FILE`.  Bad flags and bad config print
one line naming the flag or key and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import config as C
from .errors import ConfigError, MirrorError, WalError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        commands = [a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        choices = re.findall(r"'([^']*)'", bad.group(2)) if bad else []
        # A misspelled subcommand: suggest the nearest ones.  Never for a flag's value: `--fsync bogus`
        # suggested `os`, the least durable policy, and a typo in `cursors dleete` is no reason to offer delete.
        if bad and commands and set(choices) == set(commands[0]):
            near = difflib.get_close_matches(bad.group(1), choices, n=2, cutoff=0.5)
            message += f"; did you mean {' or '.join(near)}?" if near else ""
        raise SystemExit(_fail(f"{self.prog}: {message}", 2))


def _unknown_flags(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> int:
    """`walsvc CMD: unrecognized arguments: --x`, naming the subcommand and the nearest real flags."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [o for a in sub._actions for o in a.option_strings]
    hints = []
    for word in extra:
        near = difflib.get_close_matches(word.partition("=")[0], flags, n=1, cutoff=0.6) if word.startswith("-") else []
        if near:
            hints.append(f"{word}: did you mean {near[0]}?")
    return _fail(f"walsvc {command}: unrecognized arguments: {' '.join(extra)}"
                 + (f" ({'; '.join(hints)})" if hints else f"; see walsvc {command} --help"), 2)


def _fail(message: str, code: int) -> int:
    print(f"walsvc: error: {message}", file=sys.stderr)
    return code


def _start(value: str) -> int | str:
    if value in ("earliest", "latest"):
        return value
    try:
        lsn = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an LSN, 'earliest' or 'latest', not {value!r}") from None
    if lsn < 1:
        raise argparse.ArgumentTypeError(f"LSNs start at 1, got {lsn}")
    return lsn


def _lsn(value: str) -> int:
    lsn = _start(value)
    if not isinstance(lsn, int):
        raise argparse.ArgumentTypeError(f"must be an LSN, not {value!r}")
    return lsn


def _not_negative(convert: Callable[[str], Any], noun: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, refusing what is not a `noun` and what is negative or infinite."""
    def parse(value: str) -> Any:
        try:
            n = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, not {value!r}") from None
        if not 0 <= n < float("inf"):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
        return n
    return parse


_seconds = _not_negative(float, "a number of seconds")
_count = _not_negative(int, "a whole number")


def _ttl(value: str) -> int:
    """An argparse type for a TTL in milliseconds: what a record can store (a u64)."""
    ms = _count(value)
    if ms >= 1 << 64:
        raise argparse.ArgumentTypeError(f"must be at most {(1 << 64) - 1} ms, got {value}")
    return ms


def _positive(unit: str, per_second: int) -> Callable[[str], float]:
    """An argparse type for a wait or a period in `unit`s: more than 0 (0 is no wait, or a busy loop) and at
    most what `time.sleep` and lock timeouts take (else OverflowError deep inside)."""
    import threading
    most = threading.TIMEOUT_MAX * per_second

    def parse(value: str) -> float:
        try:
            n = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of {unit}, not {value!r}") from None
        if not 0 < n <= most:
            raise argparse.ArgumentTypeError(f"must be more than 0 and at most {most:.0f} {unit}, got {value}")
        return n
    return parse


_interval = _positive("seconds", 1)
_interval_ms = _positive("milliseconds", 1000)


def _load(args: argparse.Namespace, **overrides: Any) -> C.Config:
    """The config file (or defaults), with --dir and any non-None flag overrides applied."""
    if args.dir == "":  # Path("") is the working directory: a script's unset variable must not pick it
        raise ConfigError("--dir", "is empty: give the log directory")
    cfg = C.load(args.config, directory=args.dir)
    if cfg.directory.exists() and not cfg.directory.is_dir():  # else a traceback from deep inside
        raise ConfigError("--dir" if args.dir is not None else "log.dir", f"{cfg.directory} is not a directory")
    flags = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, **flags)) if flags else cfg


def _with_cpus(cfg: C.Config, cpus: str | None) -> C.Config:
    """The config with `--cpus` (the writer's CPUs) applied, when given."""
    if cpus is None:
        return cfg
    try:
        return dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, cpus=cpus))
    except ConfigError as exc:
        raise ConfigError("--cpus", exc.detail) from None


def _require_log(directory: Path, key: str) -> None:
    """A typo in --dir must be an error, not an empty result with exit status 0."""
    from .head import NAME as HEAD
    from .segment import list_segments
    if not directory.exists():
        raise ConfigError(key, f"{directory} does not exist (no log there)")
    if not directory.is_dir():
        raise ConfigError(key, f"{directory} is not a directory")
    if not list_segments(directory) and not (directory / HEAD).exists():
        raise ConfigError(key, f"{directory} is not a walsvc log (no segment files, no HEAD)")


def _require_nori(source: str, key: str) -> None:
    """SRC must hold a nori-wal log: a typo or the wrong directory is a bad argument (exit 2), found before
    --dir is created (an import of an empty directory made a 16 MiB log and recorded the import as done)."""
    from .nori import list_nori_segments
    path = Path(source)
    if not path.exists():
        raise ConfigError(key, f"{source} does not exist (no nori-wal log there)")
    if not path.is_dir():
        raise ConfigError(key, f"{source} is not a directory")
    if not list_nori_segments(path)[0]:
        raise ConfigError(key, f"{source} is not a nori-wal log (no <number>.wal segment files)")


# -- subcommands ---------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .writer import Writer
    cfg = _with_cpus(_load(args, fsync=args.fsync), args.cpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s walsvc %(levelname)s %(message)s")
    try:
        writer = Writer(cfg)
    except ConfigError as exc:
        if exc.key == "service.cpus" and args.cpus is not None:
            raise ConfigError("--cpus", exc.detail) from None  # name what the user typed
        raise
    writer.install_signal_handlers()
    eps = writer.endpoints
    print(f"recovery: {writer.log.recovery.summary()}", flush=True)
    print(f"ingest  {eps.ingest}\npublish {eps.publish}\ncontrol {eps.control}", flush=True)
    print(f"walsvc writer ready: dir={cfg.directory} pid={os.getpid()} fsync={cfg.log.fsync} "
          f"committed_lsn={writer.log.committed_lsn}", flush=True)
    writer.serve()
    if writer.log.stop_reason is not None:
        # Told to stop after the log stopped: not a failure of this shutdown (every acked batch is durable),
        # so exit 0, but say once more why the log refused writes.
        print(f"walsvc log had stopped: {writer.log.stop_reason}", flush=True)
    print(f"walsvc writer stopped: committed_lsn={writer.log.committed_lsn}", flush=True)
    return 0


class _LsnPrinter:
    """Prints each record's LSN, in input order, as soon as it is durable, from its own thread: stdin may
    block (a person typing) while acks arrive.  Stops at the first failed record, or at the first failed
    write to stdout (a full disk, a closed pipe), and keeps its error."""

    def __init__(self) -> None:
        import queue
        import threading
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.error: BaseException | None = None
        self.printed = 0
        self._done = False  # the thread reached the end of the queue (not killed by an unexpected exception)
        self._stop = threading.Event()
        self._print_lock = threading.Lock()  # `finish` takes it: no LSN goes out after the caller's report
        self._thread = threading.Thread(target=self._run, name="walsvc-produce-acks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (future := self.queue.get()) is not None:
            while self.error is None and not self._stop.is_set():
                try:
                    lsn = future.result(0.2)
                except TimeoutError:
                    continue
                except Exception as exc:  # a nack or a closed producer: reported by the main thread
                    self.error = exc
                    break
                with self._print_lock:
                    if self._stop.is_set():
                        break
                    try:
                        print(lsn, flush=True)
                    except OSError as exc:  # EPIPE, ENOSPC (> /dev/full), EIO: the LSNs can no longer be shown
                        self.error = exc
                        break
                    self.printed += 1
                break
        self._done = True

    def finish(self, timeout: float) -> bool:
        """Wait up to `timeout` for every queued LSN to print, then stop printing; False if some LSNs are
        still unknown or the thread died without saying why (never a silent success)."""
        self.queue.put(None)
        self._thread.join(timeout)
        with self._print_lock:
            self._stop.set()
        if not self._thread.is_alive() and not self._done and self.error is None:
            self.error = RuntimeError("the thread printing the LSNs stopped unexpectedly")
        return self._done


def cmd_produce(args: argparse.Namespace) -> int:
    """One record per line.  Each LSN is printed as soon as it is durable; on a bad line, an error or Ctrl-C,
    what was already stored is printed before the message, so the user knows exactly which lines made it."""
    import time

    from .producer import Producer
    from .record import Record
    cfg = _load(args)
    if args.delete and args.ttl_ms is not None:
        raise ConfigError("--ttl", "a tombstone (--delete) has no time to live; use one or the other")
    try:
        producer = Producer(cfg, linger_ms=args.linger_ms)
    except ConfigError as exc:
        if exc.key == "producer.linger_ms" and args.linger_ms is not None:
            raise ConfigError("--linger-ms", exc.detail) from None  # name what the user typed
        raise
    printer = _LsnPrinter()
    appended = 0

    def settle(timeout: float) -> str:
        """Wait for the acks of what was appended; a sentence about any that did not come."""
        deadline = time.monotonic() + timeout
        try:
            producer.flush(timeout)
        except (TimeoutError, WalError) as exc:
            printer.finish(max(0.0, deadline - time.monotonic()))
            return f"{exc}; {printer.printed} of {appended} appended line(s) confirmed stored (their LSNs are above)"
        finished = printer.finish(max(1.0, deadline - time.monotonic()))
        if isinstance(printer.error, OSError):  # every record is stored (flushed above); only the output failed
            return (f"cannot write the LSNs to stdout: {printer.error.strerror or printer.error}; all {appended} "
                    f"appended line(s) were stored, but only the first {printer.printed} LSN(s) were printed")
        if not finished or printer.error is not None:
            return (f"{printer.error or 'acks did not arrive in time'}; {printer.printed} of {appended} appended "
                    "line(s) confirmed stored (their LSNs are above)")
        return ""

    try:
        for n, line in enumerate(sys.stdin.buffer, 1):
            line = line.rstrip(b"\n")
            if args.kv and not args.delete:
                key, sep, value = line.partition(b"\t")
                if not sep:
                    problem = settle(args.timeout)
                    return _fail(f"--kv: line {n} has no TAB: {line[:60]!r}; " + (problem or
                                 f"the {appended} line(s) before it were stored (their LSNs are above), "
                                 "this one and later ones were not"), 2)
            elif args.delete:  # the whole line is the key (with --kv: the part before a TAB)
                key, value = (line.partition(b"\t")[0] if args.kv else line), b""
            else:
                key, value = b"", line
            record = Record.delete(key) if args.delete else Record.put(key, value, ttl_ms=args.ttl_ms)
            printer.queue.put(producer.append(record))
            appended += 1
            if printer.error is not None:
                break
        problem = settle(args.timeout)
        return _fail(problem, 1) if problem else 0
    except KeyboardInterrupt:
        problem = settle(min(args.timeout, 5.0))
        print(f"walsvc: interrupted: {problem or f'all {appended} appended line(s) were stored'}", file=sys.stderr)
        return 130
    finally:
        try:
            producer.close(0)  # flushed above, or failing: not another 30 s wait (close's default) on top
        except TimeoutError:
            pass


def _position(args: argparse.Namespace, directory: Path, default: str = "earliest") -> int | str:
    """Where tail/dump start: --from, --from-time or `default`, checked against the log (never a silent skip)."""
    from .seek import committed_end, lsn_at_time
    if args.from_time is not None:
        return lsn_at_time(directory, args.from_time)
    start = args.start if args.start is not None else default
    if isinstance(start, int):
        end = committed_end(directory)
        if start > end + 1:
            raise ConfigError("--from", f"LSN {start} is past the end of the log (committed up to LSN {end}); "
                              "--from latest waits for new records")
    return start


def _stop_at(args: argparse.Namespace) -> Callable[[int, int], bool]:
    """True once `lsn` is past --to or `count` records have been printed (--limit)."""
    to, limit = args.to, args.limit
    return lambda lsn, count: (to is not None and lsn > to) or (limit is not None and count >= limit)


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(data: bytes) -> str:
    """`data` for a line of tail's text output: a key or value holding a TAB or newline must not pass for more
    fields or another record, nor undecodable bytes be lost.  So \\, TAB, LF and CR become \\\\, \\t, \\n and \\r,
    other non-printable characters \\xNN (below 0x80) or \\uNNNN / \\UNNNNNNNN, and bytes that are not UTF-8
    \\xNN (0x80-0xff): every line reads back to exactly the bytes stored."""
    text = data.decode("utf-8", errors="surrogateescape")  # an undecodable byte B becomes U+DC00+B
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        code = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif code < 0x80 or 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code & 0xFF:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


def cmd_tail(args: argparse.Namespace) -> int:
    from . import cursor
    from .record import record_dict
    from .reader import Reader
    cfg = _load(args)
    if args.name is not None:
        cursor.check_name(args.name)
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")
    start = _position(args, cfg.directory, cfg.reader.start)
    if args.name and (args.start is not None or args.from_time is not None):
        stored = cursor.load(cfg.directory, cursor.check_name(args.name))
        if stored is not None:
            raise ConfigError("--from", f"the cursor {args.name!r} exists (at LSN {stored}): --name resumes there; "
                              f"drop --from/--from-time, or move it with `walsvc cursors reset {args.name} --to LSN`")
    done = _stop_at(args)
    printed = 0
    with Reader(cfg, start, name=args.name) as reader:
        if reader.offline:
            print(f"walsvc: note: no writer is running for {cfg.directory}; reading what is on disk",
                  file=sys.stderr)
        while True:
            batch = reader.poll(None if args.follow else 0.2)
            if not batch:
                if not args.follow:
                    return 0
                continue
            lines = []
            last = None
            for r in batch:
                if done(r.lsn, printed):
                    break
                if args.json:
                    lines.append(json.dumps(record_dict(r)))
                else:
                    kind = "DEL" if r.tombstone else "PUT"
                    lines.append(f"{r.lsn}\t{kind}\t{_escape(r.key)}\t{_escape(r.value)}")
                printed += 1
                last = r.lsn
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            if args.name and last is not None:
                reader.commit(last)
            if len(lines) < len(batch) or done(batch[-1].lsn + 1, printed):
                return 0


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from .status import collect, format_text
    cfg = _load(args)
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")
    before: dict[str, Any] | None = None
    while True:
        st = collect(cfg.directory)
        print(json.dumps(st, indent=1) if args.json else format_text(st, before, args.watch or 0.0), flush=True)
        if not args.watch:
            return 1 if st.get("damage") else 0  # a damaged log is a state problem, as verify's are
        before = st
        time.sleep(args.watch)
        if not args.json:
            print(flush=True)


def _progress_bar(what: str, unit: str = "segment") -> Any:
    """A progress bar on stderr when it is a terminal (tqdm), else None: pipes and logs stay clean."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(desc=what, unit=unit, leave=False, file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify
    cfg = _load(args)
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")  # not "OK, 0 segments" for /etc
    bar = _progress_bar(f"verify {cfg.directory}")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        report = verify(cfg.directory, progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_dump(args: argparse.Namespace) -> int:
    from .verify import dump
    cfg = _load(args)
    if args.nori is not None:
        return _dump_nori(args, cfg)
    from .logid import load as load_log_id
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")
    done = _stop_at(args)
    log_id = load_log_id(cfg.directory)
    # Into a file or pipe, with a terminal beside it: show how far the dump got (every 1,000 lines).
    bar = None if sys.stdout.isatty() else _progress_bar(f"dump {cfg.directory}", "frame" if args.frames else "record")
    try:
        for n, item in enumerate(dump(cfg.directory, _position(args, cfg.directory), frames=args.frames)):
            if done(item["lsn"] if "lsn" in item else item["base_lsn"], n):
                break
            item["log_id"] = log_id  # (log id, LSN) names the record world-wide
            print(json.dumps(item))
            if bar is not None and n % 1000 == 999:
                bar.update(1000)
    finally:
        if bar is not None:
            bar.close()
    return 0


def _dump_nori(args: argparse.Namespace, cfg: C.Config) -> int:
    from .nori import dump_nori
    if args.frames or args.start is not None or args.from_time is not None:
        return _fail("dump --nori: nori-wal records have no frames or LSNs; --frames, --from and --from-time do not apply", 2)
    _require_nori(args.nori, "--nori")
    for item in dump_nori(args.nori, max_record_bytes=cfg.log.max_record_bytes, skip_damaged=args.skip_damaged,
                          on_issue=lambda issue: print(f"walsvc: note: {issue}", file=sys.stderr)):
        print(json.dumps(item))
    return 0


def cmd_import_nori(args: argparse.Namespace) -> int:
    import time

    from .nori import import_nori
    cfg = _load(args)
    _require_nori(args.source, "import-nori SRC")
    shown = [0.0]

    def progress(phase: str, done: int, total: int, records: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 0.2 or done >= total:
            shown[0] = now
            sys.stderr.write(f"\r{phase} {args.source}: {100 * done // max(total, 1):3d}%, {records} records")
            sys.stderr.flush()

    tty = sys.stderr.isatty()
    try:
        report = import_nori(args.source, cfg.directory, config=cfg.log, skip_damaged=args.skip_damaged,
                             progress=progress if tty else None)
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())


def cmd_cursors(args: argparse.Namespace) -> int:
    from .cursor import delete_cursor, lag_rows, list_cursors, reset_cursor
    from .seek import committed_end
    cfg = _load(args)
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")
    if args.action == "list":
        if args.name is not None:  # `cursors list billing` must not print every cursor as if filtered
            raise ConfigError("cursors list", f"takes no cursor name, got {args.name!r}: walsvc cursors list "
                              "lists them all")
        cursors = list_cursors(cfg.directory)
        end = committed_end(cfg.directory)
        rows = lag_rows(dict(sorted(cursors.items())), end)
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print(f"no named cursors in {cfg.directory}")
        else:
            for name, row in rows.items():
                print(f"{name}\tat LSN {row['lsn']}\t{row['lag_records']} records behind")
        return 0
    if not args.name:
        raise ConfigError("cursors", f"{args.action} needs a cursor name: walsvc cursors {args.action} NAME")
    if args.action == "reset":
        if args.to is None:
            raise ConfigError("--to", "reset needs --to LSN, earliest or latest (where the reader resumes)")
        end = committed_end(cfg.directory)
        if isinstance(args.to, int) and args.to > end + 1:  # a bad argument: exit 2 naming it, as --from does
            raise ConfigError("--to", f"LSN {args.to} is past the end of the log (committed up to LSN {end}): "
                              f"the reader can resume at LSN {end + 1} at most (--to latest)")
        lsn = reset_cursor(cfg.directory, args.name, args.to)
        print(f"cursor {args.name}: the reader resumes at LSN {lsn + 1}")
        return 0
    if not delete_cursor(cfg.directory, args.name):
        return _fail(f"cursors delete: no cursor named {args.name!r} in {cfg.directory}", 1)
    print(f"cursor {args.name} deleted")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .up import run
    cfg = _with_cpus(_load(args, fsync=args.fsync), args.cpus)
    return run(cfg, producers=args.producers, consumers=args.consumers, seconds=args.seconds,
               record_bytes=args.record_bytes, workers_dir=args.workers)


def find_benchmarks() -> Path:
    """The checkout holding `benchmarks/suite/`: the suite is not installed with the package (it needs Redis,
    SQLite and a source tree to compare), so look in the working directory, its parents and beside the code."""
    here = Path.cwd().resolve()
    for root in (here, *here.parents, Path(__file__).resolve().parent.parent):
        if (root / "benchmarks" / "suite" / "run.py").is_file():
            return root
    raise ConfigError("bench", "the benchmark suite is in the source checkout, not in the installed package: "
                      "run `walsvc bench` inside a walsvc checkout (or `python benchmarks/run.py` there)")


def cmd_bench(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(find_benchmarks()))
    from benchmarks.suite.run import main as bench_main
    argv = ["--out", args.out] + (["--quick"] if args.quick else []) + (["--runs", str(args.runs)] if args.runs else [])
    return bench_main(argv) or 0


def _time(value: str) -> int:
    """ISO 8601 (a time without a zone is local time) -> µs since the epoch.  Every failure is an
    ArgumentTypeError: argparse turns a bare ValueError into "invalid _time value" and lets others through."""
    import datetime
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO 8601 time such as 2026-01-31T12:00:00Z, "
                                         f"not {value!r}") from None
    try:
        return int(when.timestamp() * 1_000_000)
    except (ValueError, OverflowError, OSError) as exc:  # 0001-01-01 local time: "year 0 is out of range"
        raise argparse.ArgumentTypeError(f"{value!r} cannot be converted to a time since the epoch ({exc}); "
                                         "give a time with a zone, such as 0001-01-01T00:00:00Z") from None


def _range_flags(p: argparse.ArgumentParser) -> None:
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", type=_start,
                       help="LSN, earliest or latest (default: earliest; for tail [reader] start); an LSN past "
                            "the committed end is an error")
    start.add_argument("--from-time", type=_time, metavar="ISO8601",
                       help="start at the first record written at or after this time")
    p.add_argument("--to", type=_lsn, metavar="LSN", help="stop after this LSN")
    p.add_argument("--limit", type=_count, help="stop after this many records (frames with --frames)")


def _jetstream() -> Any:
    """walsvc.jetstream, or one line saying how to install nats-py (an optional dependency) when it is missing."""
    try:
        from . import jetstream
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "nats":
            raise
        raise MirrorError("mirror and restore need nats-py, which is not installed: pip install 'walsvc[nats]'") \
            from None
    return jetstream


def _sink(args: argparse.Namespace) -> Any:
    return _jetstream().JetStreamSink(args.servers.split(","), args.stream, args.subject or f"walsvc.{args.stream}",
                         create=args.create, replicas=args.replicas, retention=args.retention,
                         max_age_s=args.max_age, duplicate_window_s=args.duplicate_window,
                         order_check=not args.shared_stream, open_timeout_s=args.open_timeout)


def cmd_mirror(args: argparse.Namespace) -> int:
    import asyncio

    from .mirror import Mirror
    cfg = _load(args)
    _require_log(cfg.directory, "--dir" if args.dir is not None else "log.dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s walsvc %(levelname)s %(message)s")
    mirror = Mirror(cfg.directory, _sink(args), name=args.name, packed=args.packed, window=args.window,
                    ack_timeout_s=args.ack_timeout, commit_interval_s=args.commit_interval_ms / 1000,
                    start=args.start, once=args.once)

    async def run() -> Any:
        mirror.install_signal_handlers()
        return await mirror.run()

    state = asyncio.run(run())
    print(f"walsvc mirror stopped: mirrored_lsn={state.mirrored_lsn} published={state.published} "
          f"publish_errors={state.publish_errors}", flush=True)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    restore = _jetstream().restore
    cfg = _load(args)
    report = restore(cfg.directory, args.servers.split(","), args.stream, subject=args.subject, log_id=args.log_id)
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="walsvc", description="A write-ahead log shared by many Python processes on one host.",
                     epilog="`walsvc COMMAND --help` describes a command's flags.")
    from .record import implementation
    parser.add_argument("--version", action="version",
                        version=f"walsvc {__version__} (record codec: {implementation()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", help="log directory (default ./wal-data)")
        p.add_argument("--config", help="TOML config file (see configs/default.toml)")
        return p

    def cpus_flag(p: argparse.ArgumentParser, more: str = "") -> None:
        p.add_argument("--cpus", metavar="LIST", help="run the writer on these CPUs (\"0\", \"2,3\", \"0-3\")"
                                                     f"{more}: overrides [service] cpus")

    p = command("serve", "run the writer: recover the log, bind sockets, serve until SIGTERM/SIGINT")
    p.add_argument("--fsync", choices=["always", "batch", "os"], help="override the config's fsync policy")
    cpus_flag(p)
    p.set_defaults(func=cmd_serve)

    p = command("produce", "append one record per stdin line; print each LSN once durable")
    p.add_argument("--kv", action="store_true", help="split each line into key<TAB>value")
    p.add_argument("--linger-ms", type=float, help="batching delay (default: [producer] linger_ms, 1)")
    p.add_argument("--timeout", type=_interval, default=60.0, help="seconds to wait for the last acks (default 60)")
    p.add_argument("--delete", action="store_true",
                   help="each line is a key to delete (a tombstone); with --kv, the part before a TAB")
    p.add_argument("--ttl", dest="ttl_ms", type=_ttl, metavar="MS",
                   help="time to live of each record in milliseconds, counted from its write timestamp")
    p.set_defaults(func=cmd_produce)

    p = command("tail", "print records as JSON lines or text")
    p.epilog = ("Text output is one line per record: LSN<TAB>PUT or DEL<TAB>key<TAB>value, where a backslash, TAB, "
                "newline and CR in a key or value are written \\\\, \\t, \\n and \\r, other control characters "
                "\\xNN or \\uNNNN, and bytes that are not UTF-8 \\xNN (e.g. \\xff): each line is exactly one "
                "record. --json is not escaped this way (bytes that are not UTF-8 go in key_b64/value_b64).")
    _range_flags(p)
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument("--name", help="named reader: resume after its durable cursor and commit as it prints "
                                  "(--from applies only when the cursor does not exist yet)")
    p.add_argument("--json", action="store_true", help="JSON lines (lsn, timestamp, tombstone, ttl_ms, key, value)")
    p.set_defaults(func=cmd_tail)

    p = command("status", "the writer's state, LSNs, segments, rates, latency, producers, cursors, counters")
    p.add_argument("--json", action="store_true", help="JSON (fields in docs/PROTOCOL.md)")
    p.add_argument("--watch", type=_interval, metavar="SECONDS",
                   help="repeat every SECONDS, with rates over the last interval")
    p.set_defaults(func=cmd_status)

    p = command("verify", "check every segment, frame and record (read-only, safe on a live log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = command("dump", "print records (or frames) as JSON lines (read-only)")
    _range_flags(p)
    p.add_argument("--frames", action="store_true", help="one line per frame instead of per record")
    p.add_argument("--nori", metavar="SRC", help="show the records of the nori-wal directory SRC instead")
    p.add_argument("--skip-damaged", action="store_true", help="with --nori: report damaged bytes and go on")
    p.set_defaults(func=cmd_dump)

    p = command("import-nori", "append every record of a nori-wal directory to the log at --dir (no writer running)")
    p.add_argument("source", metavar="SRC", help="the nori-wal directory (its <id>.wal segment files)")
    p.add_argument("--skip-damaged", action="store_true",
                   help="skip damaged bytes and records walsvc cannot store, reporting each, instead of stopping")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_import_nori)

    p = command("cursors", "list named readers' cursors, move one (reset) or forget one (delete)")
    p.add_argument("action", choices=["list", "reset", "delete"])
    p.add_argument("name", nargs="?", help="the cursor (reader name) for reset and delete")
    p.add_argument("--to", type=_start, help="reset: the LSN the reader resumes at, earliest or latest")
    p.add_argument("--json", action="store_true", help="list: JSON")
    p.set_defaults(func=cmd_cursors)

    p = command("up", "run the writer with N producer and M consumer workers; Ctrl-C stops everything")
    p.add_argument("--producers", type=_count, default=2)
    p.add_argument("--consumers", type=_count, default=1)
    p.add_argument("--seconds", type=_seconds, default=0.0,
                   help="stop after this long, a hard bound (default: until Ctrl-C)")
    p.add_argument("--record-bytes", type=_count, default=100)
    p.add_argument("--fsync", choices=["always", "batch", "os"])
    p.add_argument("--workers", help="a directory with your own producer_worker.py and consumer_worker.py "
                   "(default: the built-in walsvc.workers)")
    cpus_flag(p, ", and the workers on the others")
    p.set_defaults(func=cmd_up)

    def stream_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--servers", default="nats://127.0.0.1:4222", help="NATS URLs, comma-separated")
        p.add_argument("--stream", required=True, help="JetStream stream name")
        p.add_argument("--subject", help="subject of the mirrored records (default walsvc.STREAM)")

    p = command("mirror", "publish every committed record to a JetStream stream (exactly once, resumable)")
    stream_flags(p)
    p.add_argument("--name", default="mirror", help="the mirror's cursor name (default mirror)")
    p.add_argument("--packed", action="store_true", help="one message per walsvc batch instead of per record")
    p.add_argument("--create", action="store_true", help="create the stream if it does not exist")
    p.add_argument("--replicas", type=_count, default=3, help="replicas of a created stream (default 3)")
    p.add_argument("--retention", default="limits", choices=["limits", "interest", "workqueue"])
    p.add_argument("--max-age", type=_seconds, default=0.0, help="created stream's max age in seconds (0: none)")
    p.add_argument("--duplicate-window", type=_interval, default=120.0, help="created stream's dedup window, s")
    p.add_argument("--shared-stream", action="store_true",
                   help="others publish to the stream too: no Nats-Expected-Last-Msg-Id order check")
    p.add_argument("--open-timeout", type=_interval, default=60.0,
                   help="seconds to wait for NATS and the stream at start before giving up (default 60)")
    p.add_argument("--window", type=_count, default=256, help="publishes in flight (default 256)")
    p.add_argument("--ack-timeout", type=_interval, default=5.0, help="seconds to wait for a PubAck (default 5)")
    p.add_argument("--commit-interval-ms", type=_interval_ms, default=200.0, help="cursor commit interval (default 200)")
    p.add_argument("--from", dest="start", type=_start, default="earliest", help="start of a new cursor")
    p.add_argument("--once", action="store_true", help="exit once everything committed at start is mirrored")
    p.set_defaults(func=cmd_mirror)

    p = command("restore", "rebuild a log from its JetStream mirror (same LSNs, same log id)")
    stream_flags(p)
    p.add_argument("--log-id", help="restore only this log's records (when several share the subject)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("bench", help="benchmark walsvc against Redis Streams and SQLite (from a source checkout)")
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--runs", type=_count, default=0)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # `walsvc` alone: what it can do, not "the following arguments are required"
        parser.print_help()
        return 2
    if extra:
        return _unknown_flags(parser, args.command, extra)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except WalError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # includes TimeoutError (produce --timeout): one line, never a traceback
        return _fail(str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
