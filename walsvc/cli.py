"""The `walsvc` command: serve | produce | tail | status | verify | dump | up | bench.

Every subcommand takes `--dir` (default ./wal-data) or `--config FILE`.  Bad flags and bad config print
one line naming the flag or key and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import config as C
from .errors import ConfigError, WalError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise SystemExit(_fail(f"{self.prog}: {message}", 2))


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


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {n}")
    return n


def _load(args: argparse.Namespace, **overrides: Any) -> C.Config:
    """The config file (or defaults), with --dir and any non-None flag overrides applied."""
    cfg = C.load(args.config, directory=args.dir)
    if cfg.directory.exists() and not cfg.directory.is_dir():  # else a traceback from deep inside
        raise ConfigError("--dir" if args.dir is not None else "log.dir", f"{cfg.directory} is not a directory")
    flags = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, **flags)) if flags else cfg


# -- subcommands ---------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .writer import Writer
    cfg = _load(args, fsync=args.fsync)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s walsvc %(levelname)s %(message)s")
    writer = Writer(cfg)
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


def cmd_produce(args: argparse.Namespace) -> int:
    import collections

    from .producer import Producer
    from .record import Record
    cfg = _load(args)
    pending: collections.deque = collections.deque()
    producer = Producer(cfg.directory, linger_ms=args.linger_ms)
    try:
        for line in sys.stdin.buffer:
            line = line.rstrip(b"\n")
            if args.kv:
                key, sep, value = line.partition(b"\t")
                if not sep:
                    producer.flush(args.timeout)  # the lines before it are appended: wait for them as usual
                    return _fail(f"--kv: line without a TAB: {line[:60]!r}", 2)
            else:
                key, value = b"", line
            pending.append(producer.append(Record.put(key, value)))
            while pending and pending[0].done():
                print(pending.popleft().result(), flush=False)
        producer.flush(args.timeout)
        while pending:
            print(pending.popleft().result())
    finally:
        try:
            producer.close(0)  # flushed above, or failing: not another 30 s wait (close's default) on top
        except TimeoutError:
            pass
    sys.stdout.flush()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from .inspect import record_dict
    from .reader import Reader
    cfg = _load(args)
    with Reader(cfg.directory, args.start, name=args.name, max_record_bytes=cfg.log.max_record_bytes) as reader:
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
            for r in batch:
                if args.json:
                    lines.append(json.dumps(record_dict(r)))
                else:
                    kind = "DEL" if r.tombstone else "PUT"
                    lines.append(f"{r.lsn}\t{kind}\t{r.key.decode(errors='replace')}\t"
                                 f"{r.value.decode(errors='replace')}")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            if args.name:
                reader.commit(batch[-1].lsn)


def _writer_status(directory: Path, timeout_ms: int = 1000) -> dict[str, Any] | None:
    import zmq

    from .endpoints import load as load_endpoints
    from .errors import ServiceUnavailableError
    from .head import HeadReader
    from .protocol import encode_request
    head = HeadReader(directory).read()
    if head is None or not head.writer_alive():
        return None
    try:
        eps = load_endpoints(directory)
    except ServiceUnavailableError:
        return None
    ctx = zmq.Context()
    try:
        sock = eps.secure(ctx.socket(zmq.REQ))
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(eps.control)
        sock.send(encode_request("status"))
        if not sock.poll(timeout_ms):
            return None
        return json.loads(sock.recv())
    finally:
        ctx.destroy(linger=0)


def offline_status(directory: Path) -> dict[str, Any]:
    from .cursor import load_all
    from .head import HeadReader
    from .reader import end_of_valid_data
    from .segment import list_segments
    segments = list_segments(directory)
    head = HeadReader(directory).read()
    last = end_of_valid_data(directory) - 1 if segments else 0
    return {"writer": "offline", "directory": str(directory),
            "first_lsn": segments[0][0] if segments else 1, "committed_lsn": last,
            "head_committed_lsn": head.committed_lsn if head else None,
            "segments": len(segments), "bytes": sum(p.stat().st_size for _, p in segments),
            "cursors": {n: {"lsn": lsn, "lag_records": max(0, last - lsn)} for n, lsn in load_all(directory).items()}}


def cmd_status(args: argparse.Namespace) -> int:
    from .head import HeadReader
    cfg = _load(args)
    if not cfg.directory.is_dir():
        return _fail(f"--dir: {cfg.directory} is not a log directory (it does not exist)", 2)
    status = _writer_status(cfg.directory)
    if status is None:
        status = offline_status(cfg.directory)
        head = HeadReader(cfg.directory).read()
        if head is not None and head.writer_alive():
            # The process exists but did not answer within the timeout: stopped (SIGSTOP) or overloaded.
            status["writer"] = f"unresponsive (pid {head.writer_pid} did not answer within 1 s)"
    else:
        status["writer"] = "running"
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    for key, value in status.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .inspect import verify
    cfg = _load(args)
    report = verify(cfg.directory)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_dump(args: argparse.Namespace) -> int:
    from .inspect import dump
    cfg = _load(args)
    for item in dump(cfg.directory, args.start, frames=args.frames):
        print(json.dumps(item))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .up import run
    cfg = _load(args, fsync=args.fsync)
    return run(cfg, producers=args.producers, consumers=args.consumers, seconds=args.seconds,
               record_bytes=args.record_bytes, workers_dir=args.workers)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import main as bench_main
    argv = ["--out", args.out] + (["--quick"] if args.quick else []) + (["--runs", str(args.runs)] if args.runs else [])
    return bench_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="walsvc", description="A write-ahead log shared by many Python processes on one host.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", help="log directory (default ./wal-data)")
        p.add_argument("--config", help="TOML config file (see configs/default.toml)")
        return p

    p = command("serve", "run the writer: recover the log, bind sockets, serve until SIGTERM/SIGINT")
    p.add_argument("--fsync", choices=["always", "batch", "os"], help="override the config's fsync policy")
    p.set_defaults(func=cmd_serve)

    p = command("produce", "append one record per stdin line; print each LSN once durable")
    p.add_argument("--kv", action="store_true", help="split each line into key<TAB>value")
    p.add_argument("--linger-ms", type=float, default=5.0, help="batching delay (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last acks (default 60)")
    p.set_defaults(func=cmd_produce)

    p = command("tail", "print records as JSON lines or text")
    p.add_argument("--from", dest="start", type=_start, default="earliest", help="LSN, earliest or latest")
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument("--name", help="named reader: resume from and commit a durable cursor")
    p.add_argument("--json", action="store_true", help="JSON lines (lsn, timestamp, tombstone, ttl_ms, key, value)")
    p.set_defaults(func=cmd_tail)

    p = command("status", "LSNs, segments, policy, producers, cursors and counters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = command("verify", "check every segment, frame and record (read-only, safe on a live log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = command("dump", "print records (or frames) as JSON lines (read-only)")
    p.add_argument("--from", dest="start", type=_start, default="earliest")
    p.add_argument("--frames", action="store_true", help="one line per frame instead of per record")
    p.set_defaults(func=cmd_dump)

    p = command("up", "run the writer with N producer and M consumer workers; Ctrl-C stops everything")
    p.add_argument("--producers", type=_positive, default=2)
    p.add_argument("--consumers", type=_positive, default=1)
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--record-bytes", type=_positive, default=100)
    p.add_argument("--fsync", choices=["always", "batch", "os"])
    p.add_argument("--workers", help="directory of worker programs (default: ./workers or the installed copy)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("bench", help="benchmark walsvc against Redis Streams and SQLite")
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--runs", type=_positive, default=0)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
