"""walsvc: a write-ahead log that many Python processes on one host share.

Embedded: `Log.open(directory)` with `Record.put/delete`, `log.append_batch`, `log.read`.
Service: one writer process (`walsvc serve`), any number of `Producer`s and `Reader`s in other processes.
"""

from .config import LogConfig
from .errors import *  # noqa: F401,F403  (every exception is part of the public API)
from .log import Log
from .nori import import_nori
from .producer import Producer, RecordFuture
from .reader import LogReader, Reader
from .record import Record
from .recovery import RecoveryInfo

__all__ = ["Log", "LogConfig", "LogReader", "Producer", "Reader", "Record", "RecordFuture", "RecoveryInfo",
           "import_nori"]
