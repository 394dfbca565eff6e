"""walsvc: a write-ahead log that many Python processes on one host share.

The embedded engine: `Log.open(directory)`, `Record.put/delete`, `LogReader`.  The service (one writer
process, producers over ZeroMQ, tailing readers) builds on it.
"""

from .config import LogConfig
from .errors import *  # noqa: F401,F403  (every exception is part of the public API)
from .log import Log
from .reader import LogReader
from .record import Record
from .recovery import RecoveryInfo

__all__ = ["Log", "LogConfig", "LogReader", "Record", "RecoveryInfo"]
