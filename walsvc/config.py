"""Configuration: one schema mechanism for every section, checked before anything touches a file.

A config is a TOML file with `[log]`, `[retention]`, `[service]`, `[producer]` and `[reader]` tables
(configs/default.toml documents every key), or keyword arguments: `Log.open(**options)` takes the `[log]`
and `[retention]` keys, `Producer(...)` and `Reader(...)` their sections' keys.  Every section is a `Section`:
a frozen dataclass whose fields are its keys, each typed by its default and checked by its section's
`CHECKS`, so a TOML table, keyword arguments and a constructor call pass the same gate.  Unknown keys, wrong
types and out-of-range values raise `ConfigError` naming the key (`log.segment_bytes`, `producer.linger_ms`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from . import access
from .errors import ConfigError
from .record import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_RECORD_BYTES, MAX_RECORD_OVERHEAD

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# A record's header and CRC (at most 45 bytes) plus an APPEND header (28): what an ingest message of one
# record of the maximum size adds to it, rounded up.
MESSAGE_FRAMING_BYTES = 128
MESSAGE_ROOM_BYTES = 64 * KiB  # what the default max_message_bytes adds to max_record_bytes

Check = Callable[[Any], "str | None"]


def _int_range(lo: int, hi: int) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def _number_range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v:g}"


def _choice(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}, got {v!r}"


def _any(_v: Any) -> str | None:
    return None


def _existing_group(name: str) -> str | None:
    if name:
        access.group_id(name)  # ConfigError naming log.group if there is no such group
    return None


def _checked(key: str, value: Any, default: Any, check: Check) -> Any:
    """`value` if it has the type of `default` and passes `check`; an int is taken for a float (TOML
    `linger_ms = 5`), a bool never for a number."""
    typ = type(default)
    if not isinstance(value, (int, float) if typ is float else typ) or (isinstance(value, bool) and typ is not bool):
        kind = {int: "an integer", float: "a number"}.get(typ, f"a {typ.__name__}")
        raise ConfigError(key, f"must be {kind}, got {type(value).__name__} {value!r}")
    value = float(value) if typ is float else value
    problem = check(value)
    if problem:
        raise ConfigError(key, problem)
    return value


class Section:
    """One table of the config file: subclasses are frozen dataclasses (`init=False`) whose fields are the
    table's keys; `NAME` is the table, `CHECKS` maps a key to its range or choice check (type: its default's)."""

    NAME: ClassVar[str]
    CHECKS: ClassVar[dict[str, Check]] = {}

    def __init__(self, **values: Any) -> None:
        known = [f.name for f in fields(self)]
        for key in values:
            if key not in known:
                raise ConfigError(f"{self.NAME}.{key}", f"unknown key; known: {', '.join(sorted(self.keys()))}")
        for f in fields(self):
            value = values.get(f.name, f.default)
            object.__setattr__(self, f.name, _checked(f"{self.NAME}.{f.name}", value, f.default,
                                                      self.CHECKS.get(f.name, _any)))
        self._check_together()

    def _check_together(self) -> None:
        """Rules across keys of the section (one key's range is in CHECKS)."""

    @classmethod
    def keys(cls) -> list[str]:
        """The keys of this section's table (a nested section, `LogConfig.retention`, is a table of its own)."""
        return [f.name for f in fields(cls) if not isinstance(f.default, Section)]


@dataclass(frozen=True, init=False)
class RetentionConfig(Section):
    """`[retention]`: which sealed segments the writer deletes (walsvc/retention.py)."""
    NAME = "retention"
    max_bytes: int = 0
    max_age_s: int = 0
    max_cursor_lag_bytes: int = 64 * GiB

    CHECKS = {
        "max_bytes": _int_range(0, 1 << 62),
        "max_age_s": _int_range(0, 1 << 40),
        "max_cursor_lag_bytes": _int_range(0, 1 << 62),
    }


@dataclass(frozen=True, init=False)
class LogConfig(Section):
    """`[log]`, and the `[retention]` section it applies: everything the storage engine needs.

    The retention keys are also taken flat (`LogConfig(max_bytes=...)`, `Log.open(dir, max_age_s=...)`) and
    read flat (`config.max_bytes`), as before `[retention]` had a dataclass of its own."""
    NAME = "log"
    segment_bytes: int = 16 * MiB  # small enough for a demo log, large enough that rotation is rare
    max_record_bytes: int = 1 * MiB  # bounds the writer's memory, through Config.max_message_bytes
    max_batch_bytes: int = 32 * MiB
    fsync: str = "batch"
    fsync_window_ms: int = 5
    preallocate: bool = True
    on_corruption: str = "fail"
    index_interval_bytes: int = 64 * KiB
    producer_window: int = 128
    max_producers: int = 4096
    group: str = ""  # "": private to the owner; else readable by this group (see access.py)
    retention: RetentionConfig = RetentionConfig()

    CHECKS = {
        "segment_bytes": _int_range(1 * MiB, 64 * GiB),
        "max_record_bytes": _int_range(1 * KiB, 1 * GiB),
        "max_batch_bytes": _int_range(2 * KiB, 2 * GiB),
        "fsync": _choice("always", "batch", "os"),
        "fsync_window_ms": _int_range(1, 1000),
        "on_corruption": _choice("fail", "truncate"),
        "index_interval_bytes": _int_range(4 * KiB, 1 * GiB),
        "producer_window": _int_range(1, 65536),
        "max_producers": _int_range(1, 1_000_000),
        "group": _existing_group,
    }

    def __init__(self, **values: Any) -> None:
        flat = {key: values.pop(key) for key in RetentionConfig.keys() if key in values}
        if flat:
            values["retention"] = dataclasses.replace(values.get("retention", RetentionConfig()), **flat)
        super().__init__(**values)

    def _check_together(self) -> None:
        if self.max_batch_bytes < self.max_record_bytes + MAX_RECORD_OVERHEAD:
            raise ConfigError("log.max_batch_bytes", f"must exceed max_record_bytes ({self.max_record_bytes}) "
                              "so that one record of the maximum size fits in a batch")

    @property
    def read_limits(self) -> dict[str, int]:
        """The bounds a reader of this log applies: the write limits, but never below the reader defaults, so
        records written under an older, larger default (16 MiB) still read."""
        return {"max_record_bytes": max(self.max_record_bytes, DEFAULT_MAX_RECORD_BYTES),
                "max_batch_bytes": max(self.max_batch_bytes, DEFAULT_MAX_BATCH_BYTES)}

    @property
    def max_bytes(self) -> int:
        return self.retention.max_bytes

    @property
    def max_age_s(self) -> int:
        return self.retention.max_age_s

    @property
    def max_cursor_lag_bytes(self) -> int:
        return self.retention.max_cursor_lag_bytes

    @classmethod
    def from_options(cls, options: dict[str, Any], *, where: str = "option") -> "LogConfig":
        """From `Log.open`'s keyword options: the `[log]` and `[retention]` keys, flat."""
        known = cls.keys() + RetentionConfig.keys()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown {where}; known: {', '.join(sorted(known))}")
        return cls(**options)


@dataclass(frozen=True, init=False)
class ServiceConfig(Section):
    """`[service]`: where the writer listens.  Empty endpoints mean ipc sockets in the log (or socket) directory."""
    NAME = "service"
    socket_dir: str = ""
    ingest: str = ""
    publish: str = ""
    control: str = ""
    allow_remote: bool = False
    curve_secret_key: str = ""
    curve_public_key: str = ""
    max_message_bytes: int = 0  # 0: log.max_record_bytes + 64 KiB (Config.max_message_bytes)
    ingest_hwm: int = 4
    produce_group: bool = False  # members of log.group may also connect to the ingest socket
    metrics_port: int = 0  # Prometheus /metrics on 127.0.0.1:PORT; 0: off
    cpus: str = ""  # the CPUs the writer process runs on ("0", "2,3", "0-3"); "": wherever the kernel puts it

    CHECKS = {
        "max_message_bytes": lambda v: None if v == 0 else _int_range(4 * KiB, 2 * GiB)(v),  # 0: Config's
        "ingest_hwm": _int_range(1, 1_000_000),
        "metrics_port": _int_range(0, 65535),
        "cpus": lambda v: _cpu_problem(v),
    }

    def _check_together(self) -> None:
        if "\0" in self.socket_dir:  # os.mkdir would raise a bare ValueError when the writer starts
            raise ConfigError("service.socket_dir", f"must not contain a NUL byte, got {self.socket_dir!r}")
        for name in ("ingest", "publish", "control"):
            endpoint = getattr(self, name)
            if endpoint and not endpoint.startswith(("ipc://", "tcp://")):
                raise ConfigError(f"service.{name}", f"must be an ipc:// or tcp:// endpoint, got {endpoint!r}")
            if endpoint.startswith("tcp://") and not _is_loopback(endpoint):
                if not self.allow_remote:
                    raise ConfigError(f"service.{name}", f"{endpoint} is not a loopback address; set "
                                      "service.allow_remote = true and CURVE keys to listen beyond this host")
                if not (self.curve_secret_key and self.curve_public_key):
                    raise ConfigError("service.curve_secret_key", "a non-loopback bind needs "
                                      "curve_secret_key and curve_public_key")
        endpoints = {name: getattr(self, name) for name in ("ingest", "publish", "control")}
        unset = [name for name, endpoint in endpoints.items() if not endpoint]
        if unset and len(unset) < len(endpoints):  # the writer binds all three as given, or ipc sockets: never a mix
            given = " and ".join(name for name in endpoints if name not in unset)
            raise ConfigError(f"service.{unset[0]}", f"must be set too: the writer binds explicit endpoints only when "
                              f"ingest, publish and control are all set (only {given} is), else ipc sockets")


def cpu_list(text: str, count: int | None = None) -> set[int]:
    """The CPUs of a list as `taskset -c` takes it: numbers and ranges, comma-separated ("0", "2,3", "0-3"),
    each below `count` (this machine's CPU count unless given).  Raises ValueError with the reason.  A range
    is bounded before it is expanded: `0-99999999999` would otherwise be a set of 10**11 numbers (8 GB)."""
    count = (os.cpu_count() or 1) if count is None else count
    cpus: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a CPU number or a range such as 0-3")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ValueError(f"range {first}-{last} runs backwards")
        if last >= count:
            raise ValueError(f"CPU {last} does not exist: this machine's CPUs are 0-{count - 1}")
        cpus.update(range(first, last + 1))
    return cpus


def _cpu_problem(text: str) -> str | None:
    """Why `text` cannot be the writer's CPUs, or None.  Whether a cgroup lets the writer use them is known
    only when it pins itself (writer.pin_cpus): a `taskset` of the shell that starts it is no limit."""
    if not text:
        return None
    if not hasattr(os, "sched_getaffinity"):
        return "CPU affinity is not supported on this platform; leave it empty"
    try:
        cpu_list(text)
    except ValueError as exc:
        return str(exc)
    return None


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True, init=False)
class ProducerConfig(Section):
    """`[producer]`: how a `walsvc.Producer` batches and waits (its keyword arguments of the same names win).
    The record and batch limits are not here: a producer learns them from the writer (ENDPOINTS)."""
    NAME = "producer"
    linger_ms: float = 1.0
    batch_bytes: int = 256 * KiB
    max_buffer_bytes: int = 64 * MiB
    max_in_flight: int = 16
    ack_timeout_s: float = 5.0
    block_timeout_s: float = 30.0

    CHECKS = {
        "linger_ms": _number_range(0, 60_000),
        "batch_bytes": _int_range(1, 2 * GiB),
        "max_buffer_bytes": _int_range(1 * KiB, 1 << 40),
        "max_in_flight": _int_range(1, 65536),
        "ack_timeout_s": _number_range(0.001, 86_400),
        "block_timeout_s": _number_range(0, 86_400),
    }


@dataclass(frozen=True, init=False)
class ReaderConfig(Section):
    """`[reader]`: where a `walsvc.Reader` starts, what wakes it (`wake`: "auto" watches HEAD with inotify
    where it can, "commit" always subscribes to the writer's COMMIT messages) and how often it rechecks HEAD;
    a group consumer's claim size and lease.  Its keyword arguments of the same names win."""
    NAME = "reader"
    start: str = "earliest"
    wake: str = "auto"
    recheck_s: float = 0.05
    max_records: int = 1000
    lease_ms: int = 30_000

    CHECKS = {
        "start": _choice("earliest", "latest"),
        "wake": _choice("auto", "commit"),
        "recheck_s": _number_range(0.001, 60),
        "max_records": _int_range(1, 1_000_000),
        "lease_ms": _int_range(1, 86_400_000),
    }


SECTIONS: dict[str, type[Section]] = {cls.NAME: cls for cls in (LogConfig, RetentionConfig, ServiceConfig,
                                                                 ProducerConfig, ReaderConfig)}


@dataclass(frozen=True)
class Config:
    """A whole config file: the log directory plus each section (`[retention]` is `log.retention`)."""
    directory: Path
    log: LogConfig
    service: ServiceConfig
    producer: ProducerConfig = ProducerConfig()
    reader: ReaderConfig = ReaderConfig()

    def __post_init__(self) -> None:
        if self.service.produce_group and not self.log.group:
            raise ConfigError("service.produce_group", "needs [log] group: the group whose members may produce")
        if self.max_message_bytes < self.log.max_record_bytes + MESSAGE_FRAMING_BYTES:
            raise ConfigError("service.max_message_bytes", f"must hold one record of log.max_record_bytes "
                              f"({self.log.max_record_bytes}) plus framing: at least "
                              f"{self.log.max_record_bytes + MESSAGE_FRAMING_BYTES}, or 0 for the default (ZeroMQ "
                              "drops a longer message unanswered)")

    @property
    def max_message_bytes(self) -> int:
        """The longest ingest message the writer takes (ZeroMQ MAXMSGSIZE): `[service] max_message_bytes`, or
        one record of `max_record_bytes` plus room for framing.  With `ingest_hwm` it bounds the writer's
        memory per connection (docs/PROTOCOL.md, "Input limits and the writer's memory")."""
        return self.service.max_message_bytes or self.log.max_record_bytes + MESSAGE_ROOM_BYTES

    @property
    def retention(self) -> RetentionConfig:
        return self.log.retention


def load(path: str | Path | None = None, *, directory: str | Path | None = None, key: str = "--config") -> Config:
    """Read a TOML config (or only defaults); `directory` overrides `[log] dir`.  `key` names where `path`
    came from in errors: the CLI flag, or the Python argument."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(key, f"{path} is a file, so it must be a TOML config, but it is not valid TOML: "
                                   f"{exc}") from None
        secret = data.get("service", {}).get("curve_secret_key") if isinstance(data.get("service"), dict) else ""
        if secret and mode & 0o077:
            raise ConfigError("service.curve_secret_key", f"{path} holds a CURVE secret key but its mode is "
                              f"{mode & 0o777:04o} (group or others may read it): `chmod 600 {path}`")
    for name in sorted(data):
        if name not in SECTIONS:
            raise ConfigError(name, f"unknown section; known: {', '.join(SECTIONS)}")
        if not isinstance(data[name], dict):
            raise ConfigError(name, f"must be a table ([{name}]), got {type(data[name]).__name__}")
        known = SECTIONS[name].keys() + (["dir"] if name == "log" else [])
        for key in data[name]:
            if key not in known:
                raise ConfigError(f"{name}.{key}", f"unknown key; known: {', '.join(sorted(known))}")
    log_table = dict(data.get("log", {}))
    dir_value = log_table.pop("dir", "./wal-data")
    if not isinstance(dir_value, str):
        raise ConfigError("log.dir", f"must be a string, got {type(dir_value).__name__}")
    base = Path(path).parent if path is not None else Path(".")
    directory = Path(directory) if directory is not None else base / dir_value
    return Config(directory, LogConfig(**log_table, retention=RetentionConfig(**data.get("retention", {}))),
                  ServiceConfig(**data.get("service", {})), ProducerConfig(**data.get("producer", {})),
                  ReaderConfig(**data.get("reader", {})))


def check_lsn(key: str, value: Any, lowest: int = 1) -> int:
    """`value` if it is an LSN (an integer from `lowest` to 2**64-1), else ConfigError naming `key`."""
    if type(value) is not int or not lowest <= value < 1 << 64:
        raise ConfigError(key, f"must be an LSN, an integer from {lowest} to 2**64-1, not {value!r}")
    return value


def check_timeout(value: Any) -> float | None:
    """A wait in seconds: None (for ever) or a number >= 0, else ConfigError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
        raise ConfigError("timeout", f"must be None or a number of seconds >= 0, not {value!r}")
    return value


def directory_path(value: "str | os.PathLike", key: str = "directory") -> Path:
    """A path argument as a Path; ConfigError naming `key` for anything else (None, a number)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(key, f"must be a path (str or os.PathLike), not {type(value).__name__} {value!r}")
    return Path(value)


def client_config(target: "str | os.PathLike | Config", key: str = "directory") -> tuple[Path, Config | None]:
    """What a client was given: a Config, a TOML config file (loaded), or a log directory (no config)."""
    if isinstance(target, Config):
        return target.directory, target
    path = directory_path(target, key)
    if path.is_file():
        cfg = load(path, key=key)
        return cfg.directory, cfg
    if path.suffix == ".toml" and not path.exists():  # a mistyped config file, not a log directory to serve
        raise ConfigError(key, f"config file {path} does not exist")
    return path, None


def log_directory(target: "str | os.PathLike | Config", key: str = "directory") -> Path:
    """The log directory a caller means: a Config, a TOML config file (its `[log] dir`), or the directory."""
    return client_config(target, key)[0]
