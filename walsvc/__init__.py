"""walsvc: a write-ahead log that many Python processes on one host share.

Embedded: `Log.open(directory)` with `Record.put/delete`, `log.append_batch`, `log.read`.
Service: one writer process (`walsvc serve`), any number of `Producer`s and `Reader`s in other processes.
"""

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (tool.setuptools.dynamic)

from .config import LogConfig
from .cursor import delete_cursor, list_cursors, reset_cursor
from .errors import *  # noqa: F401,F403  (every exception is part of the public API)
from .log import Log
from .nori import import_nori
from .producer import Producer, RecordFuture
from .reader import LogReader, Reader
from .seek import lsn_at_time
from .record import Record
from .recovery import RecoveryInfo

__all__ = ["__version__", "Log", "LogConfig", "LogReader", "Producer", "Reader", "Record", "RecordFuture",
           "RecoveryInfo", "delete_cursor", "import_nori", "list_cursors", "lsn_at_time", "reset_cursor"]
