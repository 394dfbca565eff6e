"""Producers: batch records client-side, send them to the writer, resolve each record's LSN on its ack.

A record counts as accepted only when its ack comes back.  The protocol state (sequence numbers, resends,
lost replies, nacks, renumbering) lives in `ProducerSession` (walsvc/producer_session.py), which does no
I/O; this module is the shell around it: client-side batching, the ZeroMQ sockets and one I/O thread.

Threads: callers touch the open batch and the session under a lock, and send from their own thread while
the pipeline has room; one I/O thread owns the clock and the linger.  The reply socket belongs to one
thread at a time (`Producer._receiver`): a caller waiting in `result()` receives its own reply when no
other caller is receiving, so a record in flight costs no hand-off through the I/O thread (one thread
wake-up less per round trip); otherwise the I/O thread receives, and resolves the futures.  The common
`put` (a plain put of bytes into an open batch with room) is, with the compiled codec, one call into the
batch's buffer (`record.put_buffer`), atomic under the GIL, so it takes no lock and makes no future; each
record's handle is its batch plus the record's index.  A batch's outcome is plain attributes, set under the
lock and read by `result()` without one; its concurrent.futures.Future is made only when something asks for
one (a done callback, `await`, `flush`), since a round trip of one record costs about as much Python
as making and resolving a Future.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import os
import secrets
import threading
import time
import weakref
from typing import Callable, Iterable
import zmq

from . import protocol as P
from .config import Config, ProducerConfig, client_config
from .endpoints import Endpoints, load as load_endpoints
from .errors import (AckTimeoutError, BackpressureError, CompressionUnavailableError, ConfigError, LogClosedError,
                     RecordTooLargeError, ServiceUnavailableError)
from .producer_session import Action, Fail, LogChanged, ProducerSession, Resolve, Subscribe
from .record import (DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_RECORD_BYTES, MAX_RECORD_OVERHEAD, Record, encode,
                     encode_put, encode_puts, put_buffer)

logger = logging.getLogger("walsvc.producer")
EAGER_IN_FLIGHT = 8
RECEIVE_SLICE_MS = 100  # a caller receiving its reply looks at `close` and its deadline this often
LOOK_BEFORE_RECV = 5  # see _take_replies
LAZY_TURN_S = 0.01  # while nobody watches for replies, the I/O thread takes them this often (see _next_turn)
IDLE_POLL_MS = 1000  # the I/O thread's longest sleep when nothing is due
_LIVE: "weakref.WeakSet[Producer]" = weakref.WeakSet()  # marked by `_after_fork` in a forked child


def _limits(endpoints: Endpoints, config: Config | None, own_max_record: int | None,
            batch_bytes: int) -> tuple[int, int, int]:
    """(max_record_bytes, batch_bytes, max_payload) within what the writer accepts: its limits from ENDPOINTS
    (else the config's [log] section, else the defaults), `own_max_record` lowering the record limit.

    max_payload is the longest batch the writer takes (max_batch_bytes, and one ZeroMQ message with its
    header: a longer one is dropped unanswered); an open batch is closed before a record would take it past."""
    record = endpoints.max_record_bytes or (config.log.max_record_bytes if config else DEFAULT_MAX_RECORD_BYTES)
    payload = endpoints.max_batch_bytes or (config.log.max_batch_bytes if config else DEFAULT_MAX_BATCH_BYTES)
    if endpoints.max_message_bytes:
        payload = min(payload, endpoints.max_message_bytes - P.APPEND_HEADER_SIZE)
    record = min(record, payload - MAX_RECORD_OVERHEAD, own_max_record or record)
    return record, max(1, min(batch_bytes, payload)), payload


class _Batch:
    """One batch's outcome, shared by its records' handles.  While the batch is open its records are in the
    producer's put buffer; `size` and `count` are set when it closes.  `Producer._finish` sets `base` (the
    first LSN) or `error`, then `done`."""

    __slots__ = ("size", "count", "opened_at", "producer", "done", "base", "error", "_future")

    def __init__(self, producer: "Producer") -> None:
        self.producer = producer  # for a timeout's message: which writer, and whether it runs
        self.size = 0
        self.count = 0
        self.opened_at = time.monotonic()
        self.done = False
        self.base = 0
        self.error: BaseException | None = None
        self._future: concurrent.futures.Future | None = None

    @property
    def future(self) -> concurrent.futures.Future:
        """The batch's Future, made on first use (resolved at once if the batch already is)."""
        future = self._future
        if future is None:
            with self.producer._future_lock:  # against `_finish` deciding whether a Future exists to resolve
                future = self._future
                if future is None:
                    future = concurrent.futures.Future()
                    if self.done:
                        if self.error is not None:
                            future.set_exception(self.error)
                        else:
                            future.set_result(self.base)
                    self._future = future
        return future


class RecordFuture:
    """The pending LSN of one appended record: `result(timeout)` blocks until the writer acked it.

    A light handle (its batch and its index in the batch), made without `__init__` by the put buffer.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    def result(self, timeout: float | None = None) -> int:
        """The LSN; AckTimeoutError (a TimeoutError) if no ack came within `timeout` seconds."""
        batch = self._batch
        if not batch.done:
            batch.producer._await(batch, timeout)
            if not batch.done:
                raise AckTimeoutError(f"no ack within {timeout} s: {batch.producer.writer_state()}")
        if batch.error is not None:
            raise batch.error
        return batch.base + self._index

    def done(self) -> bool:
        if self._batch.done:
            return True
        self._batch.producer._want_replies()
        return False

    def exception(self, timeout: float | None = None) -> BaseException | None:
        batch = self._batch
        if not batch.done:
            batch.producer._await(batch, timeout)
            if not batch.done:
                raise AckTimeoutError(f"no ack within {timeout} s: {batch.producer.writer_state()}")
        return batch.error

    def add_done_callback(self, fn: "Callable[[RecordFuture], object]") -> None:
        """Call `fn(self)` once the record is acked or failed (at once if it already is), as
        concurrent.futures.Future does; it runs in the thread that receives the ack (the producer's I/O
        thread, a caller waiting in `result()`, or one whose `put` took replies), after the producer's lock
        is released, so it may call the producer (`put` the next record); callbacks run one at a time, in the
        order their batches finished.  Keep it short, and do not wait in it for another record: replies
        may be taken by the very thread that runs it."""
        producer = self._batch.producer
        producer._check_process()  # before the batch's Future lock, which the parent may have held at fork
        self._batch.future.add_done_callback(lambda _: fn(self))
        producer._want_replies()

    def __await__(self):
        """Await the LSN.  Each await has its own asyncio future, woken by the batch's: cancelling the
        awaiting task cancels that one only, never the batch's outcome, which other records share."""
        batch = self._batch
        batch.producer._want_replies()  # before the batch's Future lock: LogClosedError in a forked child
        if not batch.done:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: object) -> None:  # in the thread that resolved the batch
                try:
                    loop.call_soon_threadsafe(_settle, waiter)
                except RuntimeError:
                    pass  # the event loop closed meanwhile: nobody awaits any more

            batch.future.add_done_callback(wake)
            yield from waiter.__await__()
        if batch.error is not None:
            raise batch.error
        return batch.base + self._index


def _settle(waiter: asyncio.Future) -> None:
    if not waiter.done():  # a cancelled await has nothing to wake
        waiter.set_result(None)


class Producer:
    """Appends records to the log whose writer serves `directory` (its endpoints are read from there); a
    Config or a TOML config file path names the directory too, and then its `[producer]` section sets the
    options below (a keyword argument wins over the file).

    linger_ms / batch_bytes: how long a batch stays open and how big it may grow (Kafka's linger.ms and
    batch.size).  While fewer than EAGER_IN_FLIGHT batches await acks, a batch goes out at once, so a lone
    record never waits for the linger; under load, records gather while earlier batches await their acks
    (self-clocking, like Nagle's algorithm), and linger_ms bounds how long they gather.  max_buffer_bytes
    caps unacknowledged data; `append` blocks up to `block_timeout_s` for space, then raises
    BackpressureError.

    The record and batch limits are the writer's, learned from its ENDPOINTS file: a record the writer would
    refuse as too large is refused here (RecordTooLargeError) before it is sent, and batches stay within the
    writer's max_batch_bytes and max_message_bytes.  `max_record_bytes` may only lower the writer's limit.
    They are read once, here: a writer restarted with lower limits nacks what exceeds them (`too_large`).

    A Producer serves the process that made it: in a forked child every call raises LogClosedError (its
    sockets and I/O thread stay in the parent); make a new Producer there.  Close it (or use `with`): one
    dropped without close frees its thread and sockets once collected, and a record put just before that
    whose future nobody holds may then never be sent.

    producer_id: the id the writer deduplicates this producer's batches by (with their sequence numbers, from
    1); it is stored in each frame's header, so a fixed one names the producer in the log.  Default: random.
    It must be unique to one Producer for its whole life, never reused by a later one: the writer remembers
    an id's batches across restarts, so a reused id's batches look like resends.  A batch the writer says it
    already holds though this producer sent it once fails with ProducerIdError, as does every later batch
    under that id, and the producer goes on under a fresh random id (`producer_id` tells which).  Two
    producers using one id at once are caught only when one of them meets such a reply; until then one may
    take the other's acks for its own.

    Replies nobody watches for (records put and not waited on) are taken in bulk, not with one wake-up of
    the I/O thread per ack: by the caller once the pipeline is nearly full, else by the I/O thread at its
    next turn (every LAZY_TURN_S while batches are unacked; right after a caller's own wait, within
    ack_timeout_s or IDLE_POLL_MS, whichever is longer).  `result()`, `done()`, a done callback, `await`
    and `flush` make them be taken as they come.
    """

    def __init__(self, directory: str | os.PathLike | Config = "./wal-data", *, endpoints: Endpoints | None = None,
                 linger_ms: float | None = None, batch_bytes: int | None = None,
                 max_buffer_bytes: int | None = None, max_in_flight: int | None = None,
                 ack_timeout_s: float | None = None, block_timeout_s: float | None = None,
                 max_record_bytes: int | None = None, producer_id: int | None = None) -> None:
        self.directory, config = client_config(directory)
        given = {"linger_ms": linger_ms, "batch_bytes": batch_bytes, "max_buffer_bytes": max_buffer_bytes,
                 "max_in_flight": max_in_flight, "ack_timeout_s": ack_timeout_s, "block_timeout_s": block_timeout_s}
        settings = dataclasses.replace(config.producer if config else ProducerConfig(),
                                       **{k: v for k, v in given.items() if v is not None})
        if max_record_bytes is not None and (type(max_record_bytes) is not int or max_record_bytes < 1):
            raise ConfigError("max_record_bytes", f"must be a positive integer, got {max_record_bytes!r}")
        if producer_id is not None and (type(producer_id) is not int or not 0 < producer_id < 1 << 64):
            raise ConfigError("producer_id", f"must be an integer from 1 to 2**64-1, got {producer_id!r}")
        self.endpoints = endpoints or load_endpoints(self.directory)
        if endpoints is None and not self.endpoints.writer_running(self.directory):
            raise ServiceUnavailableError(f"no writer is running for {self.directory} (pid {self.endpoints.pid}, "
                                          f"which recorded its endpoints, is not running it); start one with "
                                          f"`walsvc serve --dir {self.directory}`")
        self.producer_id = producer_id or (secrets.randbits(64) | 1)
        self.linger = settings.linger_ms / 1000.0
        self.max_buffer_bytes = settings.max_buffer_bytes
        self.max_in_flight = max_in_flight = settings.max_in_flight
        self.ack_timeout = ack_timeout_s = settings.ack_timeout_s
        self.block_timeout = settings.block_timeout_s
        self.max_record_bytes, self.batch_bytes, self._max_payload = _limits(
            self.endpoints, config, max_record_bytes, settings.batch_bytes)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._sleeping = 0  # threads in `_sleep`: nobody to notify costs no notify_all
        self._future_lock = threading.Lock()  # see _Batch.future
        # Finished batches' Futures, resolved outside `_lock` (`_resolve_futures`), in order, one thread at a time.
        self._settling: collections.deque[tuple[concurrent.futures.Future, int, BaseException | None]] = (
            collections.deque())
        self._settle_lock = threading.Lock()
        self._open: _Batch | None = None
        # The open batch's records: a plain put goes straight in, without the lock where the buffer is atomic.
        self._pending = put_buffer(RecordFuture, self.max_record_bytes)
        self._put_fast = self._pending.put if self._pending.atomic else None
        self._buffered = 0  # bytes of closed batches not yet acked (the open batch's are in _pending.size)
        self._session = ProducerSession(self.producer_id, ack_timeout=ack_timeout_s, max_in_flight=max_in_flight,
                                        where=f"the writer for {self.directory}")
        self._closed = False
        self._closed_reason = "producer is closed"
        self._pid = os.getpid()
        self._forked = False  # set in a forked child (`_after_fork`): every entry point refuses
        _LIVE.add(self)
        self._receiver: str | None = None  # who may use the reply socket now: "io", "caller" or nobody
        self._waiters = 0  # callers inside `_await`
        # The I/O thread holds the reply socket but is not watching it (it looks every LAZY_TURN_S): whoever
        # holds the lock may take the replies waiting.  Only changed under the lock; set by the I/O thread.
        self._io_lazy = False
        self._watched = False  # someone looks at a batch's outcome: replies are taken as they come
        self.acked_records = 0
        self._ctx = zmq.Context()
        self._poke_tx = self._ctx.socket(zmq.PAIR)
        self._poke_rx = self._ctx.socket(zmq.PAIR)
        addr = f"inproc://walsvc-producer-{id(self)}"
        self._poke_rx.bind(addr)
        self._poke_tx.connect(addr)
        self._push = self.endpoints.secure(self._ctx.socket(zmq.PUSH))
        self._push.setsockopt(zmq.SNDHWM, max(4, max_in_flight * 2))
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.endpoints.ingest)
        # Nothing is sent before the writer's READY on this topic (the session waits for it): only then can
        # no reply to us be dropped (docs/PROTOCOL.md, "Producer sessions").
        self._sub = self.endpoints.secure(self._ctx.socket(zmq.SUB))
        self._sub.setsockopt(zmq.SUBSCRIBE, P.reply_topic(self.producer_id))
        self._sub.setsockopt(zmq.RCVHWM, 0)
        self._sub.connect(self.endpoints.publish)
        # A caller holding the reply socket blocks in recv (one poll of its mailbox, against two rounds for a
        # zmq_poll), for at most RCVTIMEO ms at a time, so that it sees a close or its deadline.
        self._sub_timeout = RECEIVE_SLICE_MS
        self._sub.setsockopt(zmq.RCVTIMEO, RECEIVE_SLICE_MS)
        self._sub_in = [(self._sub, zmq.POLLIN)]  # for zmq.zmq_poll: Socket.poll builds a Poller per call
        self._poke_in = [(self._poke_rx, zmq.POLLIN)]
        # The thread holds the producer weakly while nothing awaits an ack (`_io_main`), so a Producer dropped
        # without close is freed, its thread and sockets with it.
        self._io = threading.Thread(target=_io_main, args=(weakref.ref(self),), name="walsvc-producer-io",
                                    daemon=True)
        self._io.start()

    @property
    def log_id(self) -> str | None:
        """The id of the log the writer's acks come from (its READY names it), None before the first READY.
        With the LSN a future resolves to, it names the record world-wide; it changes only if a new log
        replaced the old one at the same place (a warning is logged then)."""
        return self._session.log_id

    @property
    def resends(self) -> int:
        """Batches sent again (after a lost reply, a re-made reply path, a gap or the ack timeout)."""
        return self._session.resends

    # -- public API ------------------------------------------------------------------------------------

    def append(self, record: Record) -> RecordFuture:
        """Queue a record; the returned future resolves to its LSN once the writer has committed it."""
        if record.compression and self.endpoints.codecs and record.compression not in self.endpoints.codecs:
            raise CompressionUnavailableError(
                f"the writer for {self.directory} cannot decode {record.compression} values (it decodes "
                f"{', '.join(self.endpoints.codecs)}): install 'lz4' beside the writer, or compress with zstd")
        return self._add(encode(record, self.max_record_bytes))

    def put(self, key: bytes | str, value: bytes | str, *, ttl_ms: int | None = None,
            compression: str | None = None) -> RecordFuture:
        if ttl_ms is None and compression is None:
            # The common case, kept short: no Record object, straight into the open batch if it has room.
            fast = self._put_fast  # None in a forked child (`_after_fork`)
            if fast is not None:
                handle = fast(key, value)
            else:
                self._check_process()
                with self._lock:
                    handle = self._pending.put(key, value)
            if handle is not None:
                return handle
            if type(key) is bytes and type(value) is bytes and len(key) + len(value) <= self.max_record_bytes:
                return self._add(encode_put(key, value))
        return self.append(Record.put(key, value, ttl_ms=ttl_ms, compression=compression))

    def delete(self, key: bytes | str) -> RecordFuture:
        return self.append(Record.delete(key))

    def append_many(self, records: Iterable[Record]) -> list[RecordFuture]:
        """Queue several records at once (one lock round trip); they go out in order, usually in one batch."""
        return self._add_many([encode(r, self.max_record_bytes) for r in records])

    def put_many(self, items: Iterable[tuple[bytes | str, bytes | str]]) -> list[RecordFuture]:
        """Queue plain puts of (key, value) pairs at once: the cheapest way to append many records.  Each pair
        is checked as `put` checks it (str is UTF-8 encoded; other types are refused)."""
        items = items if isinstance(items, (list, tuple)) else list(items)
        if not items:
            return []
        payload = encode_puts(items, self.max_record_bytes)
        if len(payload) < self.batch_bytes:
            self._check_process()
            with self._lock:
                batch, first = self._add_locked(payload, len(items))
            if self._settling:
                self._resolve_futures()
            return self._pending.handles(batch, first, len(items))
        return self._add_many([encode(Record.put(k, v), self.max_record_bytes) for k, v in items])

    def _add_many(self, encoded: list[bytes]) -> list[RecordFuture]:
        total = sum(map(len, encoded))
        self._check_process()
        with self._lock:
            batch = self._open
            if batch is not None and total < self._room() - self._pending.size and not self._closed:
                first = self._pending.add(b"".join(encoded), len(encoded))
                return self._pending.handles(batch, first, len(encoded))
            handles = [RecordFuture(*self._add_locked(data)) for data in encoded]
        if self._settling:
            self._resolve_futures()
        return handles

    def _add(self, data: bytes) -> RecordFuture:
        if self._forked:  # a plain test here: a put of one record in flight comes this way every time
            self._check_process()
        with self._lock:
            handle = RecordFuture(*self._add_locked(data))
        if self._settling:  # replies taken in `_add_locked`
            self._resolve_futures()
        return handle

    def _add_locked(self, data: bytes, count: int = 1) -> tuple[_Batch, int]:
        """Add `count` encoded records (laid end to end in `data`) to the open batch (lock held); returns the
        batch and the index of the first of them in it."""
        if self._closed:
            raise LogClosedError(self._closed_reason)
        pending = self._pending
        if self._buffered + pending.size + len(data) > self.max_buffer_bytes:
            self._wait_for_space(len(data))
        batch = self._open
        if batch is None:
            self._take_unwatched_replies()
        if batch is None and len(self._session) < EAGER_IN_FLIGHT:
            # Nothing open and the pipeline has room: these records are the whole batch, sent from this thread
            # now (what opening, filling and closing a batch in the put buffer would come to, in fewer steps).
            batch = _Batch(self)
            batch.size, batch.count = len(data), count
            self._buffered += batch.size
            self._session.submit(batch, data, count)
            self._send_now()
            self._take_unwatched_replies()
            return batch, 0
        if batch is not None and pending.size + len(data) > self._max_payload:
            self._close_open_batch()  # together they would be longer than the writer takes
            batch = None
        fresh = batch is None
        if fresh:
            batch = self._open = _Batch(self)
            pending.open(batch, self._room())
        else:
            pending.limit = self._room()  # acks since it opened may have made room
        first = pending.add(data, count)
        if pending.size >= self.batch_bytes or (fresh and self._pipeline_idle()):
            # Full, or the pipeline has room: send from this thread, no hop through the I/O thread.
            self._close_open_batch()
            self._send_now()
        elif fresh:
            self._poke()  # the I/O thread closes it when the linger expires
        return batch, first

    async def append_async(self, record: Record) -> int:
        """The asyncio form: `await producer.append_async(record)` gives the LSN once committed."""
        return await self.append(record)

    def flush(self, timeout: float | None = None) -> None:
        """Send the open batch now and wait until every appended record is acked or failed (each future
        tells which); AckTimeoutError if some are still waiting after `timeout` seconds."""
        self._check_process()
        with self._lock:
            if self._open is not None:
                self._close_open_batch()
                self._send_now()
            pending = [batch.future for batch in self._session.tokens()]  # made here, resolved by `_finish`
            self._want_replies_locked()
        _, waiting = concurrent.futures.wait(pending, timeout)
        if waiting:
            raise AckTimeoutError(f"records still unacknowledged after {timeout} s: {self.writer_state()}")

    def writer_state(self) -> str:
        """In words, for error messages: whether a writer runs for this log."""
        try:
            endpoints = load_endpoints(self.directory)
        except ServiceUnavailableError as exc:
            return str(exc)
        if endpoints.writer_running(self.directory):
            return f"the writer for {self.directory} (pid {endpoints.pid}) runs but has not acknowledged them"
        return (f"no writer is running for {self.directory} (pid {endpoints.pid} has exited); start one with "
                f"`walsvc serve --dir {self.directory}`")

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout`), then stop the I/O thread; the producer is closed whatever it raises, and
        records still unacked fail with LogClosedError.  Raises AckTimeoutError (as `flush`) when records were
        still unacked after `timeout`, ServiceUnavailableError at once (not after `timeout`) when no writer
        runs, and LogClosedError in a forked child."""
        self._check_process()
        if self._closed:
            self._ctx.destroy(linger=0)  # closed by a failed I/O thread: the sockets are still ours to free
            return
        try:
            with self._lock:
                unacked = sum(batch.count for batch in self._session.tokens()) + self._pending.count
            if unacked:
                try:
                    running = load_endpoints(self.directory).writer_running(self.directory)
                except ServiceUnavailableError:
                    running = False
                if not running:
                    raise ServiceUnavailableError(f"{unacked} records were never acknowledged and may or may not "
                                                  f"be in the log: {self.writer_state()}")
            self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                if self._open is not None:
                    self._close_open_batch()  # opened after the flush: its records fail below, none hang
                self._poke()
            self._io.join()
            with self._lock:
                while self._receiver == "caller":  # it sees `_closed` within one receive slice
                    self._sleep(0.1)
                self._apply(self._session.fail_all(
                    LogClosedError("producer closed before the writer acknowledged these records")))
            self._resolve_futures()
            self._ctx.destroy(linger=0)

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- caller side (lock held) -----------------------------------------------------------------------

    def _check_process(self) -> None:
        """LogClosedError in a forked child: the sockets and the I/O thread are the parent's (the child has no
        I/O thread, and its copies of the locks may be held for good), so nothing here may touch them."""
        if self._forked:
            raise LogClosedError(f"this producer belongs to process {self._pid} and cannot be used in a forked "
                                 "child (its sockets and I/O thread stay in the parent): create a new Producer "
                                 "after fork")

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
        self._want_replies_locked()
        while self._buffered + self._pending.size + need > self.max_buffer_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise BackpressureError(f"{self._buffered} bytes are waiting for acks (max_buffer_bytes "
                                        f"{self.max_buffer_bytes}) after {self.block_timeout} s: the writer for "
                                        f"{self.directory} is behind or not running")
            self._sleep(remaining)

    def _sleep(self, timeout: float | None) -> None:
        """Wait on `_space` (lock held) until notified or `timeout`."""
        self._sleeping += 1
        try:
            self._space.wait(timeout)
        finally:
            self._sleeping -= 1

    def _wake_sleepers(self) -> None:
        if self._sleeping:
            self._space.notify_all()

    def _room(self) -> int:
        """The open batch's put limit: a record goes in while size + its bytes < this (batch_bytes, and
        max_buffer_bytes over everything unacked)."""
        return min(self.batch_bytes, self.max_buffer_bytes - self._buffered + 1)

    def _take_unwatched_replies(self) -> None:
        """While no thread watches the reply socket (lock held): once the pipeline is nearly full, take the
        replies waiting here, so the next record still goes out alone and at once.  After a send, this costs
        the caller time the record has already left in (a paced caller sleeps next)."""
        if (len(self._session) >= EAGER_IN_FLIGHT - 1 and self._reply_socket_free()
                and zmq.zmq_poll(self._sub_in, 0)):
            self._apply_replies(self._take_replies(), time.monotonic())

    def _reply_socket_free(self) -> bool:
        """Whether the holder of the lock may take replies now: nobody holds the reply socket, or the I/O
        thread holds it without watching it (either way it touches it next under the lock)."""
        return self._receiver is None or self._io_lazy

    def _pipeline_idle(self) -> bool:
        return len(self._session) < EAGER_IN_FLIGHT

    def _send_now(self) -> None:
        """Send what may go out from the calling thread (lock held); leave the rest to the I/O thread."""
        if self._send_ready(time.monotonic()):
            self._poke()

    # -- waiting for an ack ------------------------------------------------------------------------------

    def _want_replies(self) -> None:
        self._check_process()
        with self._lock:
            self._want_replies_locked()

    def _want_replies_locked(self) -> None:
        """Someone will look at a future without receiving (done, a callback, await, flush, a full buffer):
        replies are to be taken as they come, so wake the I/O thread if nobody is receiving or it is not
        watching.  A batch that is only sent does not wake it: its sender usually calls `result()` next and
        receives the reply itself (see the class docstring for batches nobody watches)."""
        self._watched = True
        if self._io_lazy or (self._receiver is None and not self._waiters):
            self._poke()

    def _await(self, batch: _Batch, timeout: float | None) -> None:
        """Return once `batch` is done or `timeout` passed.  If no thread is receiving replies, receive them
        in this one (the I/O thread hands the socket over when asked), so the reply wakes this thread
        directly; other waiters sleep until the receiver resolves their batches or hands the socket on."""
        self._check_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._waiters += 1
            try:
                while not batch.done:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    if self._reply_socket_free() and not self._closed:
                        self._receiver = "caller"
                        self._io_lazy = False
                        self._lock.release()
                        try:
                            self._receive_until(batch, deadline)
                        finally:
                            self._lock.acquire()
                            self._receiver = None
                            self._wake_sleepers()  # another waiter may take the socket over
                        continue
                    if self._receiver == "io":
                        self._poke()  # asks the I/O thread to hand the reply socket over
                    self._sleep(remaining)  # notified by every resolved batch and every hand-over
            finally:
                self._waiters -= 1
                if not self._waiters and self._receiver is None and (len(self._session) or self._open is not None):
                    self._poke()  # the I/O thread takes the replies of what is still unacked

    def _receive_until(self, batch: _Batch, deadline: float | None) -> None:
        """As the receiver: take replies (and send what they let go out) until `batch` is done, the deadline
        passed or the producer closes (looked at every RECEIVE_SLICE_MS)."""
        sub = self._sub
        while not batch.done:
            wait_ms = RECEIVE_SLICE_MS
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                wait_ms = min(wait_ms, int(remaining * 1000) + 1)
            if wait_ms != self._sub_timeout:
                sub.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._sub_timeout = wait_ms
            try:
                msg = sub.recv()
            except zmq.Again:
                msg = None
            if msg is not None:
                self._receive_replies(msg)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                self._session.tick(now)
                self._send_ready(now)

    def _close_open_batch(self) -> None:
        batch = self._open
        self._open = None
        payload, batch.count = self._pending.take()  # one call: a lock-free put lands before or after it
        batch.size = len(payload)
        self._buffered += batch.size
        self._session.submit(batch, payload, batch.count)

    # -- I/O thread ------------------------------------------------------------------------------------

    def _io_failed(self, exc: BaseException) -> None:
        """An exception nobody named (a bug) in the I/O thread must not end it silently while records wait on
        it: the producer closes, and every record not yet acked fails at once with the reason."""
        logger.error("producer %016x: its I/O thread failed", self.producer_id, exc_info=exc)
        with self._lock:
            self._closed = True
            self._closed_reason = (f"producer closed: its I/O thread failed ({exc!r}); records not acked "
                                   "before that may or may not be in the log")
            if self._receiver == "io":
                self._receiver = None
            self._io_lazy = False
            if self._open is not None:
                self._close_open_batch()
            self._apply(self._session.fail_all(LogClosedError(self._closed_reason)))
            self._wake_sleepers()
        self._resolve_futures()

    def _idle(self) -> bool:
        """Nothing put awaits its send or ack: the I/O thread may let go of a producer nobody else holds."""
        return not len(self._session) and self._open is None and not self._pending.count and not self._settling

    def _io_turn(self, events: dict) -> tuple[bool, int] | None:
        """One turn of the I/O thread after its poll: the next poll's (receives, timeout), None once closed."""
        session = self._session
        if self._poke_rx in events:
            while zmq.zmq_poll(self._poke_in, 0):  # a fraction of the zmq.Again a recv would raise
                self._poke_rx.recv(zmq.NOBLOCK)
        take = self._sub in events
        replies: list[P.Reply] | tuple[()] = ()
        if take and self._lock.acquire(blocking=False):
            # Nobody is in a `put`: take the replies off the socket without the lock, so a `put` that
            # comes meanwhile does not wait for that socket work.
            self._lock.release()
            replies, take = self._take_replies(), False
        with self._lock:  # once per turn: every lock round trip here is one a `put` may have to wait for
            if not take and self._reply_socket_free() and not self._waiters:
                # It did not watch the reply socket: take what waits (before `tick` judges ack timeouts).
                self._receiver = "io"
                take = bool(zmq.zmq_poll(self._sub_in, 0))
            self._io_lazy = False
            if take:
                # A `put` held the lock: it may be inside its send, which gave this thread the GIL.  Waiting
                # for the lock at once hands the GIL back, and the replies are taken after.
                replies = self._take_replies()
            if self._closed:
                return None
            now = time.monotonic()
            self._apply_replies(replies, now)
            # Close the open batch when the pipeline has room, or its linger is over and it could go out
            # now (while every slot is taken it keeps growing instead of queueing as many small batches).
            if self._open is not None and (self._pipeline_idle() or (
                    now - self._open.opened_at >= self.linger and session.in_flight < self.max_in_flight
                    and len(session) == session.in_flight)):
                self._close_open_batch()
            session.tick(now)
            self._send_ready(now)
            if self._receiver == "io" and self._waiters:
                self._receiver = None  # a caller waits for a reply: it receives from now on
                self._wake_sleepers()
            turn = self._next_turn(now)
        if self._settling:
            self._resolve_futures()
        return turn

    def _next_turn(self, now: float) -> tuple[bool, int]:
        """For the I/O thread's next poll (lock held): whether it watches the reply socket, and the poll
        timeout in ms.  It takes the reply socket when nobody holds it and no caller waits.  It watches it
        only while READY is awaited, someone looks at a batch's outcome, the pipeline is full or records
        wait in the open batch: otherwise a wake-up per ack costs a paced producer more CPU than the acks
        themselves, and the replies are taken in bulk (`_take_unwatched_replies`, and every LAZY_TURN_S)."""
        if self._receiver is None and not self._waiters:
            self._receiver = "io"
        session = self._session
        if self._watched and not len(session):
            self._watched = False
        receives = self._receiver == "io"
        self._io_lazy = lazy = receives and session.ready_seen and not (
            self._watched or self._open is not None or len(session) >= EAGER_IN_FLIGHT)
        deadlines = [now + LAZY_TURN_S] if lazy and len(session) else []
        if self._open is not None:
            deadlines.append(self._open.opened_at + self.linger)
        ack_deadline = session.deadline()
        if ack_deadline is not None:
            deadlines.append(ack_deadline)
        if session.next_send() is not None:
            deadlines.append(now + 0.001)  # the PUSH queue was full: retry soon
        watches = receives and not lazy
        if not deadlines:
            return watches, IDLE_POLL_MS
        return watches, max(0, int((min(deadlines) - now) * 1000) + 1)

    def _send_ready(self, now: float) -> bool:
        """Send what the session lets go out (lock held); True if the socket refused one (its queue is full)."""
        session = self._session
        while (out := session.next_send()) is not None:
            try:
                self._push.send(out.message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            session.sent(out, now)
        return False

    def _receive_replies(self, msg: bytes | None = None) -> None:
        """Handle `msg` (a reply this thread already took) and every reply waiting, under one lock round trip.
        The caller (or the I/O thread) sends what they let go out after the last, in one burst, so that a
        pipelining producer's batches reach the writer together (`writer.Pipelining` looks for two in one
        drain)."""
        replies = self._take_replies(msg)
        with self._lock:
            self._apply_replies(replies, time.monotonic())
        if self._settling:
            self._resolve_futures()

    def _take_replies(self, msg: bytes | None = None) -> list[P.Reply]:
        """`msg` and every reply waiting on the socket, decoded.  The I/O thread and a waiting caller call it
        without the lock, so a `put` never waits for that socket work (only for `_apply_replies`); a `put` that
        takes unwatched replies calls it under the lock (`_take_unwatched_replies`)."""
        replies: list[P.Reply] = []
        while True:
            if msg is None:
                # After each of the first few replies look (zmq_poll, ~1.7 us) instead of letting a recv raise
                # zmq.Again (~10 us in pyzmq): a wake-up finds one to four replies when records are in flight
                # one at a time or paced; past that, recv until Again (a pipeline's burst: one look per reply
                # would cost more).  With no other batch unacked, do not look at all (one record in flight):
                # what may still come (a READY again after a reconnect, a late duplicate) is as well taken at
                # the next receive.
                n = len(replies)
                if n and (len(self._session) <= n or (n < LOOK_BEFORE_RECV and not zmq.zmq_poll(self._sub_in, 0))):
                    return replies
                try:
                    msg = self._sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return replies
            replies.append(P.decode_reply(msg))
            msg = None

    def _apply_replies(self, replies: list[P.Reply], now: float) -> None:
        """Let the session judge each reply and carry out what it decides (lock held)."""
        session = self._session
        for reply in replies:
            self._apply(session.receive(reply, now))

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the session's decisions (lock held)."""
        for action in actions:
            if type(action) is Resolve:
                self._finish(action.token, result=action.base_lsn)
            elif type(action) is Fail:
                self._finish(action.token, error=action.error)
            elif type(action) is Subscribe:
                # log_stopped: new batches go out under a fresh producer id, so their replies come on a new
                # topic; the old one stays, for the acks of earlier batches (one topic per writer failure).
                self.producer_id = action.producer_id
                self._sub.setsockopt(zmq.SUBSCRIBE, P.reply_topic(action.producer_id))
            elif type(action) is LogChanged:
                logger.warning("the writer for %s now serves log %s, not %s (a new log at the same place): acks "
                               "from now on carry its LSNs; a batch sent before may be in the old log, the new one, "
                               "or neither, and one that cannot be told fails with ProducerIdError",
                               self.directory, action.new, action.old)

    def _finish(self, batch: _Batch, *, result: int = 0, error: BaseException | None = None) -> None:
        self._buffered -= batch.size
        self._wake_sleepers()
        if error is not None:
            batch.error = error
        else:
            self.acked_records += batch.count
            batch.base = result
        with self._future_lock:
            batch.done = True
            future = batch._future
        if future is not None:
            self._settling.append((future, result, error))

    def _resolve_futures(self) -> None:
        """Resolve the Futures `_finish` queued, without the producer's lock: their done callbacks may call the
        producer (a `put` from a callback deadlocked it while `_finish` resolved them under the lock).  One
        thread at a time, in the order the batches finished; a thread that finds another settling leaves its
        Futures to that one, which looks again after it lets go (a callback's own `put` lands there)."""
        queue = self._settling
        while queue and self._settle_lock.acquire(blocking=False):
            try:
                while queue:
                    future, result, error = queue.popleft()
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
            finally:
                self._settle_lock.release()


def _io_main(ref: "weakref.ref[Producer]") -> None:
    """The I/O thread.  It holds its producer only while records await their send or ack, and weakly while
    it sleeps with nothing to do: a Producer dropped without close (and collected) ends the thread, which
    frees the sockets.  Records put and not yet sent by then, with no future of theirs held, are lost with it,
    as a dropped file's unflushed bytes: close a producer (or use `with`) to know they went in."""
    producer = ref()
    receiving = zmq.Poller()  # while this thread holds the reply socket
    receiving.register(producer._sub, zmq.POLLIN)
    receiving.register(producer._poke_rx, zmq.POLLIN)
    idle = zmq.Poller()  # while a caller holds it
    idle.register(producer._poke_rx, zmq.POLLIN)
    ctx = producer._ctx
    sockets = (producer._poke_tx, producer._poke_rx, producer._push, producer._sub)
    with producer._lock:
        receives, timeout = producer._next_turn(time.monotonic())
    while True:
        if producer._idle():
            producer = None
        try:
            events = dict((receiving if receives else idle).poll(timeout))
            if producer is None:
                producer = ref()
                if producer is None:  # dropped without close: nobody else will free these
                    for sock in sockets:
                        sock.close(linger=0)
                    ctx.term()
                    return
            turn = producer._io_turn(events)
        except BaseException as exc:
            producer = producer or ref()
            if producer is not None:
                producer._io_failed(exc)
            return
        if turn is None:
            return
        receives, timeout = turn


def _after_fork() -> None:
    """In a forked child, every Producer inherited refuses to be used (`Producer._check_process`); its plain
    `put` loses its lock-free path, which would take records nothing sends."""
    for producer in list(_LIVE):
        producer._forked = True
        producer._put_fast = None


os.register_at_fork(after_in_child=_after_fork)
