"""Producers: batch records client-side, send them to the writer, resolve each record's LSN on its ack.

A record counts as accepted only when its ack comes back: ZeroMQ PUSH may drop messages when the receiver
is behind or restarts, and PUB may drop acks.  So every batch carries (producer id, sequence); unacked
batches are resent after `ack_timeout_s`, and the writer drops what it already has (deduplication windows
rebuilt from the log at recovery), answering with the LSNs the batch got the first time.  Sequence numbers
must arrive in order: a nack "out_of_sequence: expected N" makes the producer resend from N (go-back-N).

Threads: callers only touch the open batch under a lock; one I/O thread owns both sockets.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import os
import secrets
import threading
import time
from typing import Iterable
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .config import Config, log_directory
from .endpoints import Endpoints, load as load_endpoints
from .errors import BackpressureError, LogClosedError, LogStoppedError, NackError, RecordTooLargeError
from .record import DEFAULT_MAX_RECORD_BYTES, Record, encode, encode_put

PERMANENT_NACKS = (P.MALFORMED, P.TOO_LARGE, P.UNKNOWN_VERSION)
EAGER_IN_FLIGHT = 8


class _Batch:
    __slots__ = ("parts", "size", "count", "seq", "message", "future", "sent_at", "opened_at")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.count = 0
        self.seq = 0
        self.message = b""
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.sent_at = 0.0
        self.opened_at = time.monotonic()


class RecordFuture:
    """The pending LSN of one appended record: `result(timeout)` blocks until the writer acked it.

    The result is None only in the rare case the writer reports the batch as already stored but older
    than its deduplication window, so it cannot say which LSNs it got.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    def result(self, timeout: float | None = None) -> int | None:
        base = self._batch.future.result(timeout)
        return None if base is None else base + self._index

    def done(self) -> bool:
        return self._batch.future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._batch.future.exception(timeout)

    def __await__(self):
        base = yield from asyncio.wrap_future(self._batch.future).__await__()
        return None if base is None else base + self._index


class Producer:
    """Appends records to the log whose writer serves `directory` (its endpoints are read from there); a
    Config or a TOML config file path names the directory too.

    linger_ms / batch_bytes: how long a batch stays open and how big it may grow (Kafka's linger.ms and
    batch.size).  While fewer than EAGER_IN_FLIGHT batches await acks, a batch goes out at once, so a lone
    record never waits for the linger; under load, records gather while earlier batches await their acks
    (self-clocking, like Nagle's algorithm), and linger_ms bounds how long they gather.  max_buffer_bytes
    caps unacknowledged data; `append` blocks up to `block_timeout_s` for space, then raises
    BackpressureError.
    """

    def __init__(self, directory: str | os.PathLike | Config = "./wal-data", *, endpoints: Endpoints | None = None,
                 linger_ms: float = 1.0, batch_bytes: int = 256 * 1024, max_buffer_bytes: int = 64 * 1024 * 1024,
                 max_in_flight: int = 16, ack_timeout_s: float = 5.0, block_timeout_s: float = 30.0,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, producer_id: int | None = None) -> None:
        self.directory = log_directory(directory)
        self.endpoints = endpoints or load_endpoints(self.directory)
        self.producer_id = producer_id or (secrets.randbits(64) | 1)
        self.linger = linger_ms / 1000.0
        self.batch_bytes = batch_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout_s
        self.block_timeout = block_timeout_s
        self.max_record_bytes = max_record_bytes
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._open: _Batch | None = None
        self._ready: collections.deque[_Batch] = collections.deque()  # closed, not sent yet
        self._in_flight: collections.OrderedDict[int, _Batch] = collections.OrderedDict()  # seq -> batch
        self._buffered = 0
        self._next_seq = 1
        self._closed = False
        self._stopped: LogStoppedError | None = None  # the writer's log stopped: see _log_stopped
        self._resend_from: tuple[int, float] = (0, 0.0)
        # Until the writer has stored one of our batches it has no window for us and accepts any sequence
        # (docs/PROTOCOL.md), so batch 2 could be stored before a lost batch 1, which would then be answered
        # "stored, LSNs unknown" while never written.  So only one batch is in flight until the first ack.
        self._stored_any = False
        self.acked_records = 0
        self.resends = 0
        self._ctx = zmq.Context()
        self._poke_tx = self._ctx.socket(zmq.PAIR)
        self._poke_rx = self._ctx.socket(zmq.PAIR)
        addr = f"inproc://walsvc-producer-{id(self)}"
        self._poke_rx.bind(addr)
        self._poke_tx.connect(addr)
        self._push = self.endpoints.secure(self._ctx.socket(zmq.PUSH))
        self._push.setsockopt(zmq.SNDHWM, max(4, max_in_flight * 2))
        self._push.setsockopt(zmq.LINGER, 0)
        self._monitor = self._push.get_monitor_socket(zmq.EVENT_CONNECTED)
        self._push.connect(self.endpoints.ingest)
        self._sub = self.endpoints.secure(self._ctx.socket(zmq.SUB))
        self._sub.setsockopt(zmq.SUBSCRIBE, P.reply_topic(self.producer_id))
        self._sub.setsockopt(zmq.RCVHWM, 0)
        # Replies published while the SUB was reconnecting are lost, and a restarted writer answers the
        # resend triggered by the PUSH reconnect at once, often before this SUB has resubscribed: without a
        # resend on the SUB's reconnect, such batches waited a whole ack_timeout.
        self._sub_monitor = self._sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._connects = {self._monitor: 0, self._sub_monitor: 0}
        self._sub.connect(self.endpoints.publish)
        self._io = threading.Thread(target=self._run, name="walsvc-producer-io", daemon=True)
        self._io.start()

    # -- public API ------------------------------------------------------------------------------------

    def append(self, record: Record) -> RecordFuture:
        """Queue a record; the returned future resolves to its LSN once the writer has committed it."""
        return self._add(encode(record, self.max_record_bytes))

    def put(self, key: bytes | str, value: bytes | str, *, ttl_ms: int | None = None,
            compression: str | None = None) -> RecordFuture:
        if (ttl_ms is None and compression is None and type(key) is bytes and type(value) is bytes
                and len(key) + len(value) <= self.max_record_bytes):
            # The common case, kept short: no Record object, and straight into an open batch with room.
            data = encode_put(key, value)
            with self._lock:
                batch = self._open
                size = len(data)
                if (batch is not None and batch.size + size < self.batch_bytes
                        and self._buffered + size <= self.max_buffer_bytes and not self._closed):
                    batch.parts.append(data)
                    batch.size += size
                    batch.count += 1
                    self._buffered += size
                    return RecordFuture(batch, batch.count - 1)
                return self._add_locked(data)
        return self.append(Record.put(key, value, ttl_ms=ttl_ms, compression=compression))

    def delete(self, key: bytes | str) -> RecordFuture:
        return self.append(Record.delete(key))

    def append_many(self, records: Iterable[Record]) -> list[RecordFuture]:
        """Queue several records at once (one lock round trip); they go out in order, usually in one batch."""
        return self._add_many([encode(r, self.max_record_bytes) for r in records])

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> list[RecordFuture]:
        """Queue plain puts of (key, value) bytes pairs at once: the cheapest way to append many records."""
        limit = self.max_record_bytes
        return self._add_many([encode_put(k, v) if len(k) + len(v) <= limit else encode(Record.put(k, v), limit)
                               for k, v in items])

    def _add_many(self, encoded: list[bytes]) -> list[RecordFuture]:
        total = sum(map(len, encoded))
        with self._lock:
            batch = self._open
            if (batch is not None and batch.size + total < self.batch_bytes
                    and self._buffered + total <= self.max_buffer_bytes and not self._closed):
                first = batch.count
                batch.parts.extend(encoded)
                batch.size += total
                batch.count += len(encoded)
                self._buffered += total
                return [RecordFuture(batch, i) for i in range(first, batch.count)]
            return [self._add_locked(data) for data in encoded]

    def _add(self, data: bytes) -> RecordFuture:
        with self._lock:
            return self._add_locked(data)

    def _add_locked(self, data: bytes) -> RecordFuture:
        """Add one encoded record to the open batch (lock held)."""
        if self._closed:
            raise LogClosedError("producer is closed")
        if self._stopped is not None:
            raise self._stopped
        if self._buffered + len(data) > self.max_buffer_bytes:
            self._wait_for_space(len(data))
        batch = self._open
        fresh = batch is None
        if fresh:
            batch = self._open = _Batch()
        batch.parts.append(data)
        batch.size += len(data)
        batch.count += 1
        self._buffered += len(data)
        future = RecordFuture(batch, batch.count - 1)
        if batch.size >= self.batch_bytes or (fresh and self._pipeline_idle()):
            # Full, or the pipeline has room: send from this thread, no hop through the I/O thread.
            self._close_open_batch()
            self._send_now()
        elif fresh:
            self._poke()  # the I/O thread closes it when the linger expires
        return future

    async def append_async(self, record: Record) -> int | None:
        """The asyncio form: `await producer.append_async(record)` gives the LSN once committed."""
        return await self.append(record)

    def flush(self, timeout: float | None = None) -> None:
        """Send the open batch now and wait until every appended record is acked (TimeoutError if not)."""
        with self._lock:
            if self._open is not None:
                self._close_open_batch()
                self._send_now()
            pending = list(self._ready) + list(self._in_flight.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        for batch in pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                batch.future.result(remaining)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"records still unacknowledged after {timeout} s: is the writer for "
                                   f"{self.directory} running?") from None

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout`), then stop the I/O thread.  Unacked records fail with LogClosedError."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._poke()
            self._io.join()
            failure = LogClosedError("producer closed before the writer acknowledged these records")
            for batch in list(self._ready) + list(self._in_flight.values()):
                if not batch.future.done():
                    batch.future.set_exception(failure)
            self._ctx.destroy(linger=0)

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- caller side (lock held) -----------------------------------------------------------------------

    def _poke(self) -> None:
        try:
            self._poke_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a poke is already waiting

    def _wait_for_space(self, need: int) -> None:
        if need > self.max_buffer_bytes:
            raise RecordTooLargeError(f"record of {need} bytes exceeds max_buffer_bytes ({self.max_buffer_bytes})")
        if self._open is not None:
            self._close_open_batch()
            self._send_now()
        deadline = time.monotonic() + self.block_timeout
        while self._buffered + need > self.max_buffer_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise BackpressureError(f"{self._buffered} bytes are waiting for acks (max_buffer_bytes "
                                        f"{self.max_buffer_bytes}) after {self.block_timeout} s: the writer for "
                                        f"{self.directory} is behind or not running")
            self._space.wait(remaining)

    def _pipeline_idle(self) -> bool:
        return len(self._in_flight) + len(self._ready) < EAGER_IN_FLIGHT

    def _send_now(self) -> None:
        """Send what may go out from the calling thread (lock held); leave the rest to the I/O thread."""
        self._send_ready(time.monotonic())
        if self._ready:
            self._poke()

    def _close_open_batch(self) -> None:
        batch = self._open
        self._open = None
        batch.seq = self._next_seq
        self._next_seq += 1
        payload = b"".join(batch.parts)
        batch.parts = []
        batch.message = P.encode_append(self.producer_id, batch.seq, batch.count, payload)
        self._ready.append(batch)

    # -- I/O thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._poke_rx, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._sub_monitor, zmq.POLLIN)
        while True:
            timeout = self._poll_timeout()
            events = dict(poller.poll(timeout))
            if self._poke_rx in events:
                while True:
                    try:
                        self._poke_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if self._sub in events:
                self._receive_replies()
            for monitor in (self._monitor, self._sub_monitor):
                if monitor in events:
                    self._on_connect(monitor)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                # Close the open batch when the pipeline has room, or its linger is over and it could go out
                # now (while every slot is taken it keeps growing instead of queueing as many small batches).
                if self._open is not None and (self._pipeline_idle() or (
                        now - self._open.opened_at >= self.linger and len(self._in_flight) < self.max_in_flight
                        and not self._ready)):
                    self._close_open_batch()
                self._check_timeouts(now)
                self._send_ready(now)

    def _on_connect(self, monitor: zmq.Socket) -> None:
        """A (re)connection to the writer: after a restart, resend what is unacked now, not at the timeout."""
        while True:
            try:
                recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._connects[monitor] += 1
            if self._connects[monitor] > 1:
                with self._lock:
                    if self._in_flight:
                        self._resend_from = (0, 0.0)
                        self._resend(next(iter(self._in_flight)), time.monotonic())

    def _poll_timeout(self) -> int:
        with self._lock:
            now = time.monotonic()
            deadlines = []
            if self._open is not None:
                deadlines.append(self._open.opened_at + self.linger)
            if self._in_flight:
                deadlines.append(next(iter(self._in_flight.values())).sent_at + self.ack_timeout)
            if self._ready and len(self._in_flight) < self._in_flight_limit():
                deadlines.append(now + 0.001)  # the PUSH queue was full: retry soon
        if not deadlines:
            return 1000
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def _in_flight_limit(self) -> int:
        return self.max_in_flight if self._stored_any else 1

    def _send_ready(self, now: float) -> None:
        limit = self._in_flight_limit()
        while self._ready and len(self._in_flight) < limit:
            batch = self._ready[0]
            try:
                self._push.send(batch.message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._ready.popleft()
            batch.sent_at = now
            self._in_flight[batch.seq] = batch

    def _resend(self, from_seq: int, now: float) -> None:
        """Go-back-N: put every in-flight batch from `from_seq` on back in front of the ready queue."""
        last_from, last_at = self._resend_from
        if last_from == from_seq and now - last_at < self.ack_timeout / 4:
            return  # the same gap was already answered a moment ago
        self._resend_from = (from_seq, now)
        again = [b for s, b in self._in_flight.items() if s >= from_seq]
        for b in again:
            del self._in_flight[b.seq]
        self._ready.extendleft(reversed(again))
        self.resends += len(again)

    def _check_timeouts(self, now: float) -> None:
        if self._in_flight:
            oldest = next(iter(self._in_flight.values()))
            if now - oldest.sent_at >= self.ack_timeout:
                self._resend(oldest.seq, now)

    def _receive_replies(self) -> None:
        while True:
            try:
                msg = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = P.decode_reply(msg)
            with self._lock:
                self._apply(reply)

    def _apply(self, reply: P.Reply) -> None:
        batch = self._in_flight.get(reply.seq)
        if reply.status in (P.ACK, P.DUPLICATE):
            self._stored_any = True
            if batch is None:
                batch = next((b for b in self._ready if b.seq == reply.seq), None)
                if batch is None:
                    return  # a late reply to a batch already resolved
                self._ready.remove(batch)
            else:
                del self._in_flight[reply.seq]
            self._finish(batch, result=reply.base_lsn if reply.count else None)
            self._resend_lost_reply(batch)
            return
        code = reply.code
        if code == P.OUT_OF_SEQUENCE:
            expected = int(reply.detail.rsplit("expected sequence ", 1)[-1].split(",")[0])
            self._resend(expected, time.monotonic())
        elif code == P.LOG_STOPPED:
            if self._stopped is None:  # later nacks answer batches already failed
                self._log_stopped(LogStoppedError.from_nack(reply.detail))
        elif code in PERMANENT_NACKS and batch is not None:
            del self._in_flight[reply.seq]
            self._finish(batch, error=NackError(code, reply.detail))
            self._renumber_after(reply.seq)

    def _log_stopped(self, error: LogStoppedError) -> None:
        """The writer's log stopped: nothing unacked will be acked.  Fail every unacked record at once, and
        refuse new ones: batches written before the stop may still be in the log after a restart, so this
        producer's sequence numbers are ambiguous from here on (a new Producer gets a new id)."""
        self._stopped = error
        for batch in list(self._in_flight.values()) + list(self._ready):
            self._finish(batch, error=error)
        self._in_flight.clear()
        self._ready.clear()
        if self._open is not None:
            self._buffered -= self._open.size
            self._open.future.set_exception(error)
            self._open = None
        self._space.notify_all()

    def _resend_lost_reply(self, answered: _Batch) -> None:
        """The writer answers a producer's batches in the order it got them, so a reply for `answered` while a
        batch sent before it still waits means that reply was lost (PUB drops while a SUB reconnects).  Resend
        it now: after ack_timeout the writer's dedup window may have moved past it, and the answer would be
        "stored, LSNs unknown" (a None result) instead of its LSNs."""
        oldest = next(iter(self._in_flight.values()), None)
        if oldest is not None and oldest.seq < answered.seq and oldest.sent_at <= answered.sent_at:
            del self._in_flight[oldest.seq]
            self._ready.appendleft(oldest)
            self.resends += 1

    def _renumber_after(self, failed_seq: int) -> None:
        """The writer never stored `failed_seq`, so every later batch moves down one sequence number."""
        later = sorted((b for b in itertools.chain(self._in_flight.values(), self._ready) if b.seq > failed_seq),
                       key=lambda b: b.seq)
        for b in later:
            self._in_flight.pop(b.seq, None)
            b.seq -= 1
            b.message = b.message[:12] + b.seq.to_bytes(8, "little") + b.message[20:]
        self._next_seq -= 1
        self._ready = collections.deque(later)

    def _finish(self, batch: _Batch, *, result: int | None = None, error: BaseException | None = None) -> None:
        self._buffered -= len(batch.message) - P.APPEND_HEADER_SIZE
        self._space.notify_all()
        if error is not None:
            batch.future.set_exception(error)
        else:
            self.acked_records += batch.count
            batch.future.set_result(result)
