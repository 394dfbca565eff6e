"""walsvc: a write-ahead log that many Python processes on one host share.

Embedded: `Log.open(directory)` with `Record.put/delete`, `log.append_batch`, `log.read`.
Service: one writer process (`walsvc serve`), any number of `Producer`s and `Reader`s in other processes.

The embedded log needs only crc32c and zstandard: the service classes (`Producer`, `RecordFuture`, `Reader`)
are imported on first use, so `import walsvc` works where pyzmq is not installed.
"""

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (tool.setuptools.dynamic)

from .config import LogConfig
from .cursor import delete_cursor, list_cursors, reset_cursor
from .errors import *  # noqa: F401,F403  (every exception is part of the public API)
from .log import Log
from .nori import import_nori
from .record import Record
from .recovery import RecoveryInfo
from .scan import LogReader
from .seek import lsn_at_time

_SERVICE = {"Producer": "producer", "RecordFuture": "producer", "Reader": "reader"}


def __getattr__(name: str) -> object:
    """The service classes, on first use (they need pyzmq)."""
    if name in _SERVICE:
        import importlib
        return getattr(importlib.import_module(f".{_SERVICE[name]}", __name__), name)
    raise AttributeError(f"module 'walsvc' has no attribute {name!r}")


__all__ = ["__version__", "Log", "LogConfig", "LogReader", "Producer", "Reader", "Record", "RecordFuture",
           "RecoveryInfo", "delete_cursor", "import_nori", "list_cursors", "lsn_at_time", "reset_cursor"]
