"""Mirroring a log to a replicated stream, whatever the stream is: the loop, the messages, the state.

The loop follows the log with its own named cursor (`walsvc.Reader(name=...)`, so retention keeps what it
has not mirrored yet), publishes every committed record to a `Sink` with up to `window` publishes in
flight, and advances the cursor only past messages the sink acknowledged durably.  After a crash it resends
from the cursor; the sink drops what it already holds by message id (`<log-id>:<lsn>`).  That dedup lasts
only as long as the sink's duplicate window, so the mirror records, beside its cursor, the time from which
every message past the cursor was first published (`safe_since`), and refuses to resume once that is older
than the window (see docs/SCALE-OUT.md for the whole argument).

A sink is anything with the `Sink` shape: JetStream (walsvc/jetstream.py) is one; a Kafka sink would be a
second class of the same shape (an idempotent producer's acks for PubAcks, the topic's retention for the
window).  Messages and headers are plain bytes and text, so consumers need no walsvc.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Iterable, Protocol

from . import cursor, logid
from .access import make_dir, replace_file
from .errors import InvalidRecordError, MirrorError, SinkUnavailableError
from .fsync import sync_dir
from .lock import signalable
from .reader import Reader
from .record import Record, decode_payload, encode_many

logger = logging.getLogger("walsvc.mirror")

# Message headers (text; the key is base64 because keys are bytes).  docs/SCALE-OUT.md documents them.
H_LOG_ID = "Walsvc-Log-Id"
H_LSN = "Walsvc-Lsn"               # the record's LSN; packed: the first record's
H_COUNT = "Walsvc-Count"           # packed only: records in the payload
H_KEY = "Walsvc-Key"               # base64 of the key
H_TOMBSTONE = "Walsvc-Tombstone"   # "1" for a delete
H_TTL = "Walsvc-Ttl-Ms"
H_TIMESTAMP = "Walsvc-Timestamp-Us"
H_COMPRESSION = "Walsvc-Compression"  # how the log stored the value ("zstd"/"lz4"); the payload is plain
H_VERSION = "Walsvc-Version"       # "term.index"
PACKED = "packed"
PER_RECORD = "record"

STATE_DIR = "mirrors"


@dataclass(slots=True)
class Message:
    """One publish: `payload` with `headers`, named `msg_id` for the sink's dedup."""
    msg_id: str
    first_lsn: int
    last_lsn: int
    timestamp_us: int
    payload: bytes
    headers: dict[str, str]
    prev_id: str | None = None  # the message published just before it in this run: a sink may require it
    # When it was first published (unix s), kept through resends: from then on it may be in the sink, even if
    # never acknowledged, and the sink's duplicate window counts from the copy it stored, not from a resend.
    first_sent: float | None = None


def msg_id(log_id: str, lsn: int) -> str:
    return f"{log_id}:{lsn}"


def record_message(log_id: str, r: Record) -> Message:
    """A per-record message: the value as the payload, everything else in headers."""
    h = {"Nats-Msg-Id": msg_id(log_id, r.lsn), H_LOG_ID: log_id, H_LSN: str(r.lsn),
         H_TIMESTAMP: str(r.timestamp), H_KEY: base64.b64encode(r.key).decode("ascii")}
    if r.tombstone:
        h[H_TOMBSTONE] = "1"
    if r.ttl_ms is not None:
        h[H_TTL] = str(r.ttl_ms)
    if r.compression is not None:
        h[H_COMPRESSION] = r.compression
    if r.version is not None:
        h[H_VERSION] = f"{r.version[0]}.{r.version[1]}"
    return Message(h["Nats-Msg-Id"], r.lsn, r.lsn, r.timestamp, r.value, h)


def packed_messages(log_id: str, records: list[Record], max_bytes: int) -> list[Message]:
    """Packed messages: the records of one batch (a writer run gives each batch its own timestamp) in the
    documented v1 record format, at most `max_bytes` of payload each (one record at least).

    Where messages split depends only on the records, never on how reads happened to be cut, so a mirror
    resending after a crash makes the same messages with the same ids, and the sink's dedup drops them
    whole.  (A reader batch holds whole frames after the first, which may start at the cursor, and the
    cursor always ends a message.)"""
    out: list[Message] = []
    group: list[Record] = []
    size = 0

    def close() -> None:
        first = group[0]
        out.append(Message(msg_id(log_id, first.lsn), first.lsn, group[-1].lsn, first.timestamp,
                           encode_many(group), {"Nats-Msg-Id": msg_id(log_id, first.lsn), H_LOG_ID: log_id,
                                                H_LSN: str(first.lsn), H_COUNT: str(len(group)),
                                                H_TIMESTAMP: str(first.timestamp)}))

    for r in records:
        cost = len(r.key) + len(r.value) + 16
        if group and (r.timestamp != group[0].timestamp or r.lsn != group[-1].lsn + 1 or size + cost > max_bytes):
            close()
            group, size = [], 0
        group.append(r)
        size += cost
    if group:
        close()
    return out


def decode_message(headers: dict[str, str] | None, payload: bytes) -> list[Record]:
    """The records in a mirrored message (either mode), with their LSNs: the inverse of the two above."""
    h = headers or {}
    try:
        lsn = int(h[H_LSN])
        ts = int(h.get(H_TIMESTAMP, "0"))
        if H_COUNT in h:
            return decode_payload(payload, lsn, int(h[H_COUNT]), ts)
        version = None
        if H_VERSION in h:
            term, _, index = h[H_VERSION].partition(".")
            version = (int(term), int(index))
        ttl = int(h[H_TTL]) if H_TTL in h else None
        return [Record(base64.b64decode(h[H_KEY], validate=True), payload, h.get(H_TOMBSTONE) == "1", ttl,
                       h.get(H_COMPRESSION), version, lsn, ts)]
    except (KeyError, ValueError) as exc:
        raise InvalidRecordError(f"not a walsvc mirror message (header {exc} missing or bad)") from None


# -- the sink ---------------------------------------------------------------------------------------------

class Sink(Protocol):
    """Where the mirror publishes.  `publish` sends at once and returns an awaitable that completes when the
    message is durable in the sink, with True if the sink already held its id (or raises
    SinkUnavailableError: retried, or another WalError: fatal)."""

    description: str
    max_message_bytes: int
    dedup_window_s: float  # how long the sink recognises a message id it already holds

    async def open(self) -> None: ...

    async def publish(self, msg: Message) -> Awaitable[Any]: ...

    async def last_lsn(self, log_id: str) -> int | None:
        """The highest LSN of `log_id` the sink holds at its end, or None when unknown."""

    async def close(self) -> None: ...


# -- the mirror's state beside its cursor ---------------------------------------------------------------

@dataclass
class MirrorState:
    """`DIR/mirrors/NAME.json`: what `walsvc status` shows, and `safe_since` for the resume check."""
    name: str
    log_id: str
    sink: str
    mode: str
    mirrored_lsn: int = 0
    safe_since: float = 0.0  # every message past the cursor was first published at or after this (unix s)
    clean: bool = False      # stopped with nothing in flight: nothing past the cursor was published
    committed_lsn: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    publish_errors: int = 0
    published: int = 0
    duplicates: int = 0  # resent messages the sink recognised by id and did not store again
    condition: str = "mirroring"
    pid: int = 0
    updated: float = 0.0


def state_path(directory: Path, name: str) -> Path:
    return directory / STATE_DIR / f"{cursor.check_name(name)}.json"


def load_state(directory: Path, name: str) -> MirrorState | None:
    try:
        data = json.loads(state_path(directory, name).read_text())
        return MirrorState(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise MirrorError(f"{state_path(directory, name)} is damaged ({exc}); delete it and the cursor "
                          f"{cursor.DIRNAME}/{name}{cursor.SUFFIX} to mirror from the start") from None


def store_state(directory: Path, state: MirrorState) -> None:
    """The old or the new state after any crash (access.replace_file)."""
    sdir = directory / STATE_DIR
    if not sdir.is_dir():
        make_dir(sdir)
        sync_dir(directory)
    replace_file(state_path(directory, state.name), json.dumps(asdict(state)).encode())


def load_all_states(directory: Path) -> dict[str, dict[str, Any]]:
    """Every mirror's state (for `walsvc status`), with whether its process still runs."""
    out: dict[str, dict[str, Any]] = {}
    sdir = directory / STATE_DIR
    if not sdir.is_dir():
        return out
    for fname in sorted(os.listdir(sdir)):
        if fname.endswith(".json") and not fname.startswith("."):
            try:
                st = load_state(directory, fname[:-5])
            except (MirrorError, OSError) as exc:  # status shows a damaged file, it does not fail on it
                out[fname[:-5]] = {"error": str(exc)}
                continue
            if st is not None:
                d = asdict(st)
                d["running"] = signalable(st.pid)
                out[st.name] = d
    return out




def resume_refusal(cursor_lsn: int | None, state: MirrorState | None, window_s: float, now: float,
                   sink_last_lsn: int | None) -> str | None:
    """Why resuming from `cursor_lsn` could put a record in the sink twice, or None when it cannot.

    Pure.  Past the cursor, only messages published at or after `state.safe_since` can be in the sink; the
    sink drops a resent one only while it is younger than its duplicate window.  When the sink's last
    LSN of this log is at or below the cursor, nothing past the cursor is there at all.
    """
    if cursor_lsn is None or (state is not None and state.clean):
        return None
    if sink_last_lsn is not None and sink_last_lsn <= cursor_lsn:
        return None
    if state is None:
        return (f"the cursor is at LSN {cursor_lsn} but the mirror's state file is missing, so when the records "
                "after it were published is unknown")
    margin = min(5.0, window_s * 0.1)
    age = now - state.safe_since
    if age > window_s - margin:
        return (f"the mirror stopped {age:.1f} s ago with publishes in flight past LSN {cursor_lsn} (the stream "
                f"holds up to LSN {sink_last_lsn}), and the stream's duplicate window is {window_s:g} s: "
                "resending them now could store them twice")
    return None


# -- the loop -------------------------------------------------------------------------------------------

class Mirror:
    """Follow the log in `directory` with cursor `name` and publish every committed record to `sink`."""

    def __init__(self, directory: str | os.PathLike, sink: Sink, *, name: str = "mirror", packed: bool = False,
                 window: int = 256, ack_timeout_s: float = 5.0, commit_interval_s: float = 0.2,
                 max_backoff_s: float = 5.0, start: int | str = "earliest", once: bool = False,
                 max_inflight_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        self.sink = sink
        self.name = cursor.check_name(name)
        self.packed = packed
        self.window = max(1, window)
        self.ack_timeout_s = ack_timeout_s
        self.commit_interval_s = commit_interval_s
        self.max_backoff_s = max_backoff_s
        self.start = start
        self.once = once
        self.max_inflight_bytes = max_inflight_bytes
        self._inflight_bytes = 0
        self.stop_event = asyncio.Event()
        self.state: MirrorState | None = None
        self._pending: collections.deque[Message] = collections.deque()
        self._inflight: collections.deque[tuple[Message, Any, float]] = collections.deque()
        self._acked = 0
        self._acked_id: str | None = None
        self._prev_id: str | None = None
        self._stored = 0
        self._last_store = 0.0
        self._carried: tuple[float, int] | None = None  # (safe_since of an unclean last run, until this LSN)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)

    async def _open_sink(self) -> None:
        """Open the sink unless a stop comes first: opening waits up to the open timeout (60 s by default)
        for the servers, and SIGTERM or Ctrl-C must not wait that long."""
        opening = asyncio.ensure_future(self.sink.open())
        stopping = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not opening.done():
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            raise MirrorError(f"stopped while opening {self.sink.description}: nothing was mirrored")
        opening.result()

    async def run(self) -> MirrorState:
        """Mirror until stopped (or, with `once`, until everything committed when it started is in the sink)."""
        log_id = logid.load(self.directory)
        if log_id is None:
            raise MirrorError(f"{self.directory} has no log id yet: start its writer (walsvc serve) once, which "
                              "gives it one")
        try:
            await self._open_sink()
            stored = cursor.load(self.directory, self.name)
            previous = load_state(self.directory, self.name)
            if previous is not None and previous.log_id != log_id:
                raise MirrorError(f"mirror state {state_path(self.directory, self.name)} belongs to log "
                                  f"{previous.log_id}, not this log ({log_id})")
            # A state that did not stop cleanly is checked even without a cursor file (one lost, or left by a
            # version that stored no cursor before its first ack): its mirrored_lsn is then the cursor.
            resume_lsn = stored if stored is not None else previous.mirrored_lsn if previous is not None else None
            sink_last = None
            if resume_lsn is not None and not (previous is not None and previous.clean):
                sink_last = await self.sink.last_lsn(log_id)
                why = resume_refusal(resume_lsn, previous, self.sink.dedup_window_s, time.time(), sink_last)
                if why:
                    raise MirrorError(f"mirror {self.name!r} refuses to resume: {why}.  Check the stream for "
                                      f"LSNs after {resume_lsn}, then delete {cursor.DIRNAME}/{self.name}"
                                      f"{cursor.SUFFIX} and {STATE_DIR}/{self.name}.json and mirror with "
                                      "--from set past the stream's last LSN")
            self.state = MirrorState(self.name, log_id, self.sink.description, PACKED if self.packed else PER_RECORD,
                                     publish_errors=previous.publish_errors if previous else 0,
                                     duplicates=previous.duplicates if previous else 0, pid=os.getpid())
            start = self.start if stored is None else None  # --from starts a new cursor only
            with Reader(self.directory, start, name=self.name) as reader:
                self._acked = self._stored = reader.next_lsn - 1
                self.state.mirrored_lsn = self._acked
                if previous is not None and not previous.clean and resume_lsn is not None:
                    # Copies the last run published may be in the sink, their window counting from then: keep
                    # that safe_since until the cursor passes every LSN they can hold (the sink's last, or,
                    # when it cannot say, every LSN committed by now), or a kill soon after this resume would
                    # date them from now.
                    until = sink_last if sink_last is not None else reader.lag()["committed_lsn"]
                    self._carried = (previous.safe_since, until)
                self._store(reader, clean=False, force=True)
                # The cursor too, before the first publish: without one a restart started over from `start`
                # with no resume check, after the duplicate window too.  After the state: a kill in between
                # leaves an unclean state with nothing published past it, which resumes within the window,
                # where a cursor without a state would be refused whenever the stream is empty.
                reader.commit(self._stored)
                await self._loop(reader, log_id)
                sent = bool(self._inflight) or any(m.first_sent is not None for m in self._pending)
                self._store(reader, clean=not sent, force=True)
        finally:
            await self.sink.close()
        return self.state

    async def _loop(self, reader: Reader, log_id: str) -> None:
        backoff = 0.1
        end = None
        if self.once:
            reader.lag()
            end = reader.last_head.committed_lsn if reader.last_head and not reader.offline else None
        drained = False
        while not self.stop_event.is_set():
            if len(self._pending) < self.window and not drained:
                if self._inflight or self._pending:
                    batch = reader.poll(0)
                else:
                    batch = await asyncio.to_thread(reader.poll, 0.2)
                if batch:
                    self._pending.extend(self._messages(log_id, batch))
                elif self.once and (end is None or reader.next_lsn > end):
                    drained = True
            try:
                while self._pending and len(self._inflight) < self.window \
                        and self._inflight_bytes < self.max_inflight_bytes:
                    msg = self._pending[0]
                    msg.prev_id = self._prev_id
                    now = time.time()
                    fut = await self.sink.publish(msg)
                    self._prev_id = msg.msg_id
                    if msg.first_sent is None:
                        msg.first_sent = now
                    self._pending.popleft()
                    self._inflight.append((msg, fut, now))
                    self._inflight_bytes += len(msg.payload)
                    self.state.published += 1
                if self._inflight:
                    await self._await_head()
                    backoff = 0.1
                    if self.state.condition != "mirroring":
                        logger.info("mirror %s: the sink acknowledges again (LSN %d)", self.name, self._acked)
                        self.state.condition = "mirroring"
            except SinkUnavailableError as exc:
                await self._rewind(exc, reader, backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self._store(reader, clean=False)
            if drained and not self._inflight and not self._pending:
                return
        await self._drain()

    async def _await_head(self) -> None:
        """Wait for the oldest publish's ack, then take every consecutive acked one off the window."""
        msg, fut, sent = self._inflight[0]
        remaining = self.ack_timeout_s - (time.time() - sent)
        if not fut.done():
            await asyncio.wait([fut], timeout=max(remaining, 0.001))
        if not fut.done():
            raise SinkUnavailableError(f"no acknowledgement for LSN {msg.first_lsn} within "
                                       f"{self.ack_timeout_s:g} s from {self.sink.description}") from None
        while self._inflight and self._inflight[0][1].done():
            msg, fut, _ = self._inflight[0]
            if fut.result():  # raises SinkUnavailableError (or a fatal error) for a failed publish
                self.state.duplicates += 1
            self._inflight.popleft()
            self._inflight_bytes -= len(msg.payload)
            self._acked = msg.last_lsn
            self._acked_id = msg.msg_id

    async def _rewind(self, exc: SinkUnavailableError, reader: Reader, backoff: float) -> None:
        """A publish failed: let the rest settle, put every unacknowledged message back, wait, resend in order."""
        self.state.publish_errors += 1
        self.state.condition = f"waiting for the sink: {exc}"
        logger.warning("mirror %s: waiting for the sink: %s; retrying in %.1f s, resending %d publishes in order",
                       self.name, exc, backoff, len(self._inflight) + len(self._pending))
        futures = [f for _, f, _ in self._inflight]
        if futures:
            await asyncio.wait(futures, timeout=self.ack_timeout_s)
        for f in futures:
            if f.done() and not f.cancelled():
                f.exception()  # looked at: the messages are resent, asyncio need not report it
        while self._inflight and self._inflight[0][1].done() and not self._inflight[0][1].cancelled() \
                and self._inflight[0][1].exception() is None:
            msg = self._inflight.popleft()[0]
            self._acked, self._acked_id = msg.last_lsn, msg.msg_id
        self._prev_id = self._acked_id  # the resent ones follow the last acknowledged one
        for msg, fut, _ in reversed(self._inflight):
            if not fut.done():
                fut.cancel()
            self._pending.appendleft(msg)
        self._inflight.clear()
        self._inflight_bytes = 0
        self._store(reader, clean=False, force=True)
        try:
            await asyncio.wait_for(self.stop_event.wait(), backoff)
        except asyncio.TimeoutError:
            pass

    async def _drain(self) -> None:
        """On stop: wait (bounded) for the acks of what is in flight, so the cursor covers it."""
        deadline = time.time() + self.ack_timeout_s
        while self._inflight and time.time() < deadline:
            try:
                await self._await_head()
            except SinkUnavailableError:
                return

    def _messages(self, log_id: str, batch: list[Record]) -> Iterable[Message]:
        if self.packed:
            return packed_messages(log_id, batch, self.sink.max_message_bytes)
        return [record_message(log_id, r) for r in batch]

    def _store(self, reader: Reader, *, clean: bool, force: bool = False) -> None:
        """Advance the cursor to the acked LSN, then the state (cursor first: see `resume_refusal`)."""
        now = time.time()
        if not force and now - self._last_store < self.commit_interval_s:
            return
        idle = self._acked == self._stored and not self._inflight
        if idle and not force and now - self._last_store < min(10.0, self.sink.dedup_window_s / 10):
            return  # caught up: refresh safe_since now and then, not an fsync per commit interval
        self._last_store = now
        st = self.state
        if self._acked > self._stored:
            reader.commit(self._acked)
            self._stored = self._acked
        # The first publish of every message not yet acknowledged, resent ones included: a resend's time would
        # move safe_since past a copy the sink stored earlier, whose PubAck was lost (see `resume_refusal`).
        unacked = [m for m, _, _ in self._inflight] + [m for m in self._pending if m.first_sent is not None]
        st.safe_since = min((m.first_sent for m in unacked), default=now)
        if self._carried is not None:
            if self._stored >= self._carried[1]:
                self._carried = None
            else:
                st.safe_since = min(st.safe_since, self._carried[0])
        st.clean = clean
        st.mirrored_lsn = self._stored
        lag = reader.lag()
        st.committed_lsn = lag["committed_lsn"] or max(st.committed_lsn, reader.next_lsn - 1)
        st.lag_records = max(0, st.committed_lsn - self._stored)
        oldest = self._inflight[0][0] if self._inflight else (self._pending[0] if self._pending else None)
        st.lag_seconds = round(max(0.0, now - oldest.timestamp_us / 1e6), 3) if oldest else 0.0
        if st.lag_records == 0 and oldest is None:
            st.lag_seconds = 0.0
        st.updated = now
        store_state(self.directory, st)
