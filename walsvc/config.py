"""Configuration: one schema per section, checked before anything touches a file.

A config is a TOML file with `[log]`, `[retention]` and `[service]` tables (configs/default.toml documents
every key), or keyword arguments to `Log.open`.  Unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from . import access
from .errors import ConfigError
from .record import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_RECORD_BYTES

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# A record's header and CRC (at most 45 bytes) plus an APPEND header (28): what an ingest message of one
# record of the maximum size adds to it, rounded up.
MESSAGE_FRAMING_BYTES = 128
MESSAGE_ROOM_BYTES = 64 * KiB  # what the default max_message_bytes adds to max_record_bytes


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def _choice(*options: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}, got {v!r}"


def _any(_v: Any) -> str | None:
    return None


def _existing_group(name: str) -> str | None:
    if name:
        access.group_id(name)  # ConfigError naming log.group if there is no such group
    return None


@dataclass(frozen=True)
class LogConfig:
    """Everything the storage engine needs.  Field metadata lives in `_LOG_SCHEMA`."""
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
    # retention
    max_bytes: int = 0
    max_age_s: int = 0
    max_cursor_lag_bytes: int = 64 * GiB

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f"log.{f.name}" if f.name in _LOG_KEYS else f"retention.{f.name}", getattr(self, f.name),
                   *_SCHEMA[f.name])
        if self.max_batch_bytes < self.max_record_bytes + 64:
            raise ConfigError("log.max_batch_bytes", f"must exceed max_record_bytes ({self.max_record_bytes}) "
                              "so that one record of the maximum size fits in a batch")

    @property
    def read_limits(self) -> dict[str, int]:
        """The bounds a reader of this log applies: the write limits, but never below the reader defaults, so
        records written under an older, larger default (16 MiB) still read."""
        return {"max_record_bytes": max(self.max_record_bytes, DEFAULT_MAX_RECORD_BYTES),
                "max_batch_bytes": max(self.max_batch_bytes, DEFAULT_MAX_BATCH_BYTES)}

    @classmethod
    def from_options(cls, options: dict[str, Any], *, where: str = "option") -> "LogConfig":
        unknown = sorted(set(options) - set(_SCHEMA))
        if unknown:
            raise ConfigError(unknown[0], f"unknown {where}; known: {', '.join(sorted(_SCHEMA))}")
        return cls(**options)


# name: (type, check)
_SCHEMA: dict[str, tuple[type, Callable[[Any], str | None]]] = {
    "segment_bytes": (int, _int_range(1 * MiB, 64 * GiB)),
    "max_record_bytes": (int, _int_range(1 * KiB, 1 * GiB)),
    "max_batch_bytes": (int, _int_range(2 * KiB, 2 * GiB)),
    "fsync": (str, _choice("always", "batch", "os")),
    "fsync_window_ms": (int, _int_range(1, 1000)),
    "preallocate": (bool, _any),
    "on_corruption": (str, _choice("fail", "truncate")),
    "index_interval_bytes": (int, _int_range(4 * KiB, 1 * GiB)),
    "producer_window": (int, _int_range(1, 65536)),
    "max_producers": (int, _int_range(1, 1_000_000)),
    "group": (str, _existing_group),
    "max_bytes": (int, _int_range(0, 1 << 62)),
    "max_age_s": (int, _int_range(0, 1 << 40)),
    "max_cursor_lag_bytes": (int, _int_range(0, 1 << 62)),
}
_LOG_KEYS = {"segment_bytes", "max_record_bytes", "max_batch_bytes", "fsync", "fsync_window_ms", "preallocate",
             "on_corruption", "index_interval_bytes", "producer_window", "max_producers", "group"}
_RETENTION_KEYS = {"max_bytes", "max_age_s", "max_cursor_lag_bytes"}


def _check(key: str, value: Any, typ: type, check: Callable[[Any], str | None]) -> None:
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(key, f"must be an integer, got {type(value).__name__} {value!r}")
    if typ is not int and not isinstance(value, typ):
        raise ConfigError(key, f"must be a {typ.__name__}, got {type(value).__name__} {value!r}")
    problem = check(value)
    if problem:
        raise ConfigError(key, problem)


@dataclass(frozen=True)
class ServiceConfig:
    """Where the writer listens.  Empty endpoints mean ipc sockets in the log (or socket) directory."""
    socket_dir: str = ""
    ingest: str = ""
    publish: str = ""
    control: str = ""
    allow_remote: bool = False
    curve_secret_key: str = ""
    curve_public_key: str = ""
    max_message_bytes: int = 0  # 0: log.max_record_bytes + 64 KiB (Config.max_message_bytes)
    ingest_hwm: int = 1
    produce_group: bool = False  # members of log.group may also connect to the ingest socket


    metrics_port: int = 0  # Prometheus /metrics on 127.0.0.1:PORT; 0: off

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            typ = type(f.default)
            _check(f"service.{f.name}", value, typ, _SERVICE_CHECKS.get(f.name, _any))
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


_SERVICE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "max_message_bytes": lambda v: None if v == 0 else _int_range(4 * KiB, 2 * GiB)(v),
    "ingest_hwm": _int_range(1, 1_000_000),
    "metrics_port": _int_range(0, 65535),
}


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Config:
    """A whole config file: the log directory plus each section."""
    directory: Path
    log: LogConfig
    service: ServiceConfig

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
    unknown = sorted(set(data) - {"log", "retention", "service"})
    if unknown:
        raise ConfigError(unknown[0], "unknown section; known: log, retention, service")
    log_table = dict(data.get("log", {}))
    dir_value = log_table.pop("dir", "./wal-data")
    if not isinstance(dir_value, str):
        raise ConfigError("log.dir", f"must be a string, got {type(dir_value).__name__}")
    retention = data.get("retention", {})
    for key in log_table:
        if key not in _LOG_KEYS:
            raise ConfigError(f"log.{key}", f"unknown key; known: dir, {', '.join(sorted(_LOG_KEYS))}")
    for key in retention:
        if key not in _RETENTION_KEYS:
            raise ConfigError(f"retention.{key}", f"unknown key; known: {', '.join(sorted(_RETENTION_KEYS))}")
    service = data.get("service", {})
    known_service = {f.name for f in fields(ServiceConfig)}
    for key in service:
        if key not in known_service:
            raise ConfigError(f"service.{key}", f"unknown key; known: {', '.join(sorted(known_service))}")
    base = Path(path).parent if path is not None else Path(".")
    directory = Path(directory) if directory is not None else base / dir_value
    return Config(directory, LogConfig(**log_table, **retention), ServiceConfig(**service))


def log_directory(target: "str | os.PathLike | Config") -> Path:
    """The log directory a client means: a Config, a TOML config file (its `[log] dir`), or the directory."""
    if isinstance(target, Config):
        return target.directory
    path = Path(target)
    return load(path, key="directory").directory if path.is_file() else path
