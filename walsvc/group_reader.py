"""A consumer of a consumer group: claims LSN ranges from the writer, reads them from the segment files.

`Reader(dir, group="billing", consumer="w1")` hands its work to this class.  Each poll first acks the range
the previous poll returned (its records count as processed once the caller asks for more, as with Kafka's
auto-commit), then claims the next range over the control socket and reads it straight from the files, as
any reader does.  The writer decides who gets what (walsvc/group.py); a consumer that dies or stalls past
`lease_ms` loses its range to the next consumer that claims.
"""

from __future__ import annotations

import json
import os
import time

import zmq

from . import protocol as P
from .config import Config, check_timeout, client_config
from .endpoints import load as load_endpoints
from .errors import GroupError, LogClosedError, ServiceUnavailableError
from .reader import Reader, read_limits, reader_settings
from .wakeup import wait_for_commit
from .scan import LogReader
from .record import Record

REQUEST_TIMEOUT_S = 5.0


class GroupReader(Reader):
    """One consumer of a group; see `walsvc.Reader` for the options it shares.  `max_records` bounds one
    claimed range; `lease_ms` is how long the group waits for its ack before giving the range to another.
    These two, `start` and `recheck_s` take their defaults from the `[reader]` section of a given Config or
    config file."""

    def __init__(self, directory: str | os.PathLike | Config = "./wal-data", start: int | str | None = None, *,
                 group: str, consumer: str, max_records: int | None = None, lease_ms: int | None = None,
                 max_record_bytes: int | None = None, max_batch_bytes: int | None = None,
                 recheck_s: float | None = None) -> None:
        self.directory, config = client_config(directory)
        settings = reader_settings(config, max_records=max_records, lease_ms=lease_ms, recheck_s=recheck_s)
        self.group = group
        self.consumer = consumer
        self.start = settings.start if start is None else start
        self.max_records = settings.max_records
        self.lease_ms = settings.lease_ms
        self.max_record_bytes, self.max_batch_bytes = read_limits(self.directory, config, max_record_bytes,
                                                                  max_batch_bytes)
        self.recheck_s = settings.recheck_s
        self.redelivered = 0
        self._lease: dict | None = None  # the range the last poll returned, acked by the next poll
        self._end = 0  # end of the range being read: the bound of the file reader
        self._log: LogReader | None = None
        self._ctx = zmq.Context()
        self._req: zmq.Socket | None = None
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, P.TOPIC_COMMIT)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._closed = False
        try:
            self._endpoints = load_endpoints(self.directory)
        except ServiceUnavailableError as exc:
            self._ctx.destroy(linger=0)
            raise ServiceUnavailableError(f"consumer group {group!r} needs a running writer: {exc}") from None
        self._endpoints.secure(self._sub).connect(self._endpoints.publish)

    def _request(self, op: str, **args: object) -> dict:
        """One control request, with a fresh socket after a timeout (a REQ socket cannot resend)."""
        if self._req is None:
            self._req = self._endpoints.secure(self._ctx.socket(zmq.REQ))
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self._endpoints.control)
        self._req.send(P.encode_request(op, group=self.group, consumer=self.consumer, **args))
        if not self._req.poll(int(REQUEST_TIMEOUT_S * 1000)):
            self._req.close(linger=0)
            self._req = None
            raise ServiceUnavailableError(f"the writer of {self.directory} did not answer {op} within "
                                          f"{REQUEST_TIMEOUT_S:g} s")
        reply = json.loads(self._req.recv())
        if not reply.get("ok"):
            raise GroupError(self.group, reply.get("error", "refused"))
        return reply

    def _ack_previous(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._request("group_ack", lease=lease["id"])
            except GroupError:
                pass  # the lease expired: its records go to another consumer as well (at-least-once)

    def poll(self, timeout: float | None = None) -> list[Record]:
        """The records of the next claimed range, waiting up to `timeout` s (None: forever); [] on timeout.

        Calling poll again tells the group the previous records are processed."""
        if self._closed:
            raise LogClosedError("group reader is closed")
        check_timeout(timeout)
        self._ack_previous()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._request("group_claim", max_records=self.max_records, lease_ms=self.lease_ms,
                                  start=self.start)
            lease = reply["lease"]
            if lease is not None:
                records = self._read(lease["first"], lease["end"])
                self._lease = lease
                if lease["redelivery"]:
                    self.redelivered += len(records)
                return records
            wait = self.recheck_s if deadline is None else min(self.recheck_s, deadline - time.monotonic())
            if wait <= 0:
                return []
            wait_for_commit(self._sub, wait)

    def _read(self, first: int, end: int) -> list[Record]:
        """Records first..end-1 from the files: every one of them is committed (the writer said so)."""
        self._end = end
        if self._log is None or self._log.next_lsn != first:
            if self._log is not None:
                self._log.close()
            self._log = LogReader(self.directory, first, bound=lambda: self._end - 1,
                                  max_record_bytes=self.max_record_bytes, max_batch_bytes=self.max_batch_bytes)
        out: list[Record] = []
        while self._log.next_lsn < end:
            batch = self._log.read_batch()
            if not batch:
                raise GroupError(self.group, f"records {self._log.next_lsn}..{end - 1} of a claimed range are "
                                             "not readable in the log files")
            out.extend(batch)
        if out and out[-1].lsn >= end:  # the last frame ran past the range: keep ours, reopen next time
            out = [r for r in out if r.lsn < end]
            self._log.close()
            self._log = None
        return out

    def commit(self, lsn: int) -> None:
        """Ack the range the last poll returned now, if `lsn` is its last record or later."""
        if self._lease is not None and lsn >= self._lease["end"] - 1:
            self._ack_previous()

    @property
    def woken_by(self) -> str:
        """Always "commit": a consumer's claims go to the writer, and its COMMIT messages wake it."""
        return "commit"

    @property
    def next_lsn(self) -> int:
        return self._lease["end"] if self._lease else 0

    def lag(self) -> dict[str, int]:
        """The group's lag: committed records not yet acked by any consumer (this call is a heartbeat too)."""
        reply = self._request("group_renew")
        return {"records": max(0, reply["committed_lsn"] + 1 - reply["position"]),
                "committed_lsn": reply["committed_lsn"]}

    def close(self) -> None:
        """Leave the group: the last polled range counts as processed, anything else goes to the others."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ack_previous()
            self._request("group_leave")
        except (GroupError, ServiceUnavailableError):
            pass  # the writer is gone or forgot us: our leases expire on their own
        finally:
            if self._log is not None:
                self._log.close()
            self._ctx.destroy(linger=0)

    def __enter__(self) -> "GroupReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
