"""NATS JetStream as the mirror's sink, and the way back: `StreamReader` and `restore`.

`JetStreamSink` publishes with `publish_async` (many in flight; the mirror loop bounds the window) and
turns JetStream's answers into the `Sink` contract of walsvc/mirror.py: a PubAck completes the publish; no
answer, no responders, or a cluster without quorum is `SinkUnavailableError` (the mirror retries with
backoff); a request the stream refuses for good is `MirrorError`.

`StreamReader` is `walsvc.Reader` for the stream: the same `Record` objects with the same LSNs, from
either message mode, so a consumer moves from the local log to the cluster by changing one line.
`restore` rebuilds a local log from the stream with the same LSNs and the same log id.
Needs nats-py (`pip install walsvc[nats]`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Iterator, Sequence

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from . import access, logid
from .errors import ConfigError, LogClosedError, MirrorError, SinkUnavailableError, TruncatedError
from .mirror import H_COUNT, H_LOG_ID, H_LSN, Message, decode_message
from .record import Record

logger = logging.getLogger("walsvc.jetstream")

RETENTION = {"limits": api.RetentionPolicy.LIMITS, "interest": api.RetentionPolicy.INTEREST,
             "workqueue": api.RetentionPolicy.WORK_QUEUE}
HEADER_ROOM = 8192  # bytes of a NATS message left for headers below the server's max_payload


async def connect(servers: Sequence[str], name: str, timeout: float = 10.0) -> nats.NATS:
    """A connection that reconnects forever (a node going down is routine), failing fast only at first."""

    last_error = ["", 0.0]

    async def on_error(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if text != last_error[0] or time.monotonic() - last_error[1] > 10:  # not once per reconnect attempt
            logger.warning("%s: NATS connection: %s", name, text)
            last_error[:] = [text, time.monotonic()]

    async def on_disconnect() -> None:
        if not closing:
            logger.warning("%s: disconnected from NATS; reconnecting", name)

    closing: list[bool] = []  # nats-py reports its own close as a disconnect: say nothing then
    try:
        nc = await asyncio.wait_for(nats.connect(list(servers), name=name, connect_timeout=min(timeout, 5),
                                                 max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                                 error_cb=on_error, disconnected_cb=on_disconnect,
                                                 allow_reconnect=True), timeout)
    except asyncio.TimeoutError:
        raise MirrorError(f"cannot connect to NATS at {', '.join(servers)}: no server answered within "
                          f"{timeout:g} s") from None
    except Exception as exc:
        raise MirrorError(f"cannot connect to NATS at {', '.join(servers)}: {exc or type(exc).__name__}") from None
    original_close = nc.close

    async def close() -> None:
        closing.append(True)
        await original_close()

    nc.close = close  # type: ignore[method-assign]
    return nc


WRONG_LAST_MSG_ID = 10070  # JetStream's error code when Nats-Expected-Last-Msg-Id does not match
# Creating a stream while the meta leader does not see enough peers for its replicas: a cluster still
# forming, or a node down.  It passes once they are there, so `--create` waits for it like for a leader.
NO_SUITABLE_PEERS = 10005
# Replicas > 1 asked of a server that is not in a cluster: no wait can help, so it fails at once.
REPLICAS_NEED_A_CLUSTER = 10074


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.APIError) and exc.code is not None and 400 <= exc.code < 500 \
            and exc.code != 408 and exc.err_code != WRONG_LAST_MSG_ID:
        return False
    return True


class JetStreamSink:
    """Publish mirror messages to `stream` on `subject`; `create` makes the stream when it is missing."""

    def __init__(self, servers: Sequence[str], stream: str, subject: str, *, create: bool = False,
                 replicas: int = 3, retention: str = "limits", max_age_s: float = 0.0,
                 duplicate_window_s: float = 120.0, open_timeout_s: float = 60.0, order_check: bool = True) -> None:
        if retention not in RETENTION:
            raise MirrorError(f"--retention must be one of {', '.join(RETENTION)}, not {retention!r}")
        self.servers = list(servers)
        self.stream = stream
        self.subject = subject
        self.create = create
        self.replicas = replicas
        self.retention = retention
        self.max_age_s = max_age_s
        self.duplicate_window_s = duplicate_window_s
        self.open_timeout_s = open_timeout_s
        self.order_check = order_check
        self.description = f"JetStream stream {stream} (subject {subject})"
        self.max_message_bytes = 1 << 20
        self.dedup_window_s = duplicate_window_s
        self._nc: nats.NATS | None = None
        self._js: Any = None

    async def open(self) -> None:
        self._nc = await connect(self.servers, "walsvc-mirror", self.open_timeout_s)
        self._js = self._nc.jetstream(timeout=5, publish_async_max_pending=1 << 20)
        info = await self._stream_info()
        cfg = info.config
        if self.subject not in (cfg.subjects or []) and not any(_matches(s, self.subject) for s in cfg.subjects or []):
            raise MirrorError(f"stream {self.stream} does not take subject {self.subject} (its subjects: "
                              f"{', '.join(cfg.subjects or [])})")
        self.dedup_window_s = float(cfg.duplicate_window or 120.0)
        limit = self._nc.max_payload
        if cfg.max_msg_size and cfg.max_msg_size > 0:
            limit = min(limit, cfg.max_msg_size)
        self.max_message_bytes = max(1024, limit - HEADER_ROOM)

    async def _stream_info(self) -> api.StreamInfo:
        """The stream's info, creating it if asked; waits (with backoff) while the cluster has no leader."""
        deadline = time.monotonic() + self.open_timeout_s
        delay = 0.2
        while True:
            try:
                return await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                if not self.create:
                    raise MirrorError(f"stream {self.stream} does not exist; pass --create to make it") from None
                try:
                    return await self._js.add_stream(api.StreamConfig(
                        name=self.stream, subjects=[self.subject], retention=RETENTION[self.retention],
                        num_replicas=self.replicas, storage=api.StorageType.FILE, max_age=self.max_age_s or None,
                        duplicate_window=self.duplicate_window_s))
                except nats.js.errors.APIError as exc:
                    if exc.err_code == REPLICAS_NEED_A_CLUSTER:
                        raise MirrorError(f"creating stream {self.stream} with {self.replicas} replicas failed: "
                                          "the NATS server is not part of a cluster; pass --replicas 1 for a "
                                          f"single server ({exc})") from None
                    if not _transient(exc) and exc.err_code != NO_SUITABLE_PEERS:
                        raise MirrorError(f"creating stream {self.stream} failed: {exc}") from None
                    last: Exception = exc
                except Exception as exc:
                    last = exc
            except Exception as exc:  # timeouts, no responders, no meta leader: the cluster is not ready yet
                last = exc
            if time.monotonic() > deadline:
                raise MirrorError(f"stream {self.stream} unavailable after {self.open_timeout_s:g} s: "
                                  f"{last or type(last).__name__}")
            logger.warning("stream %s not available yet (%s); retrying in %.1f s", self.stream,
                           last or type(last).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def publish(self, msg: Message) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        out = loop.create_future()
        try:
            headers = msg.headers
            if self.order_check and msg.prev_id is not None:
                headers = {**headers, "Nats-Expected-Last-Msg-Id": msg.prev_id}
            fut = await self._js.publish_async(self.subject, msg.payload, headers=headers)
        except Exception as exc:
            raise SinkUnavailableError(f"publish of LSN {msg.first_lsn} to {self.stream} failed: "
                                       f"{exc or type(exc).__name__}") from None

        def settle(f: asyncio.Future) -> None:
            if out.done():
                return
            if f.cancelled():
                out.set_exception(SinkUnavailableError(f"publish of LSN {msg.first_lsn} cancelled"))
                return
            exc = f.exception()
            if exc is None:
                out.set_result(bool(f.result().duplicate))
            elif isinstance(exc, nats.js.errors.APIError) and exc.err_code == WRONG_LAST_MSG_ID:
                out.set_exception(SinkUnavailableError(f"{self.stream} refused LSN {msg.first_lsn}: the message "
                                                       "before it is not the stream's last (one was lost)"))
            elif isinstance(exc, nats.js.errors.NoStreamResponseError):
                out.set_exception(SinkUnavailableError(f"no leader of stream {self.stream} answered for LSN "
                                                       f"{msg.first_lsn} (no quorum, or electing a leader)"))
            elif _transient(exc):
                out.set_exception(SinkUnavailableError(f"{self.stream} did not store LSN {msg.first_lsn}: "
                                                       f"{exc or type(exc).__name__}"))
            else:
                out.set_exception(MirrorError(f"{self.stream} refused LSN {msg.first_lsn}: {exc}"))

        fut.add_done_callback(settle)
        out.add_done_callback(lambda o: fut.cancel() if o.cancelled() and not fut.done() else None)
        return out

    async def last_lsn(self, log_id: str) -> int | None:
        try:
            m = await self._js.get_last_msg(self.stream, self.subject)
        except Exception:
            return None
        h = m.headers or {}
        if h.get(H_LOG_ID) != log_id or H_LSN not in h:
            return None
        return int(h[H_LSN]) + int(h.get(H_COUNT, "1")) - 1

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.close()
            finally:
                self._nc = None


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject wildcard match ('*' one token, '>' the rest)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class StreamReader:
    """Records from a mirrored stream, like `walsvc.Reader`: `poll(timeout)`, iteration, `next_lsn`.

    `start` is "earliest", "latest" or an LSN (found by binary search over the stream's sequences).
    Messages of other logs on the subject are skipped when `log_id` is given, else the first message's log
    id is taken and any other is an error.  A resent message the stream stored twice (outside its
    duplicate window) is skipped by LSN, so records come out once, in LSN order.
    """

    def __init__(self, servers: Sequence[str] | str, stream: str, start: int | str = "earliest", *,
                 subject: str | None = None, log_id: str | None = None, connect_timeout: float = 10.0) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.log_id = logid.check(log_id, "log_id") if log_id else None
        self._filter_log = log_id is not None
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._sub: Any = None
        self._nc: Any = None
        try:
            self._nc = self._run(connect(self.servers, "walsvc-stream-reader", connect_timeout))
            self._js = self._nc.jetstream(timeout=10)
            try:
                info = self._run(self._js.stream_info(stream))
            except nats.js.errors.NotFoundError:
                raise MirrorError(f"stream {stream} does not exist (at {', '.join(self.servers)})") from None
            self.subject = subject or (info.config.subjects or [">"])[0]
            self.next_lsn = 1
            seq = self._run(self._start_seq(info, start))
            cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq) \
                if seq else api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
            self._sub = self._run(self._js.subscribe(self.subject, stream=stream, ordered_consumer=True,
                                                     config=cfg, pending_msgs_limit=1 << 20))
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def _records_at(self, seq: int) -> tuple[int, list[Record]] | None:
        """(stream sequence, records) of the first message at or after `seq` on the subject, None past the end."""
        try:
            m = await self._js.get_msg(self.stream, seq, subject=self.subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        return m.seq, self._accept(m.headers, m.data or b"")

    async def _start_seq(self, info: api.StreamInfo, start: int | str) -> int | None:
        first, last = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0:
            if start == "latest" or start == "earliest":
                return None if start == "latest" else 1
            self.next_lsn = int(start)
            return None
        if start == "earliest":
            return first
        if start == "latest":
            at = await self._records_at(last)
            if at and at[1]:
                self.next_lsn = at[1][-1].lsn + 1
            return None
        if not isinstance(start, int) or isinstance(start, bool) or start < 1:
            raise ConfigError("start", f"must be 'earliest', 'latest' or an LSN >= 1, not {start!r}")
        head = await self._records_at(first)
        if head and head[1] and start < head[1][0].lsn:
            raise TruncatedError(start, head[1][0].lsn)
        lo, hi = first, last  # the first message whose last LSN is >= start
        while lo < hi:
            mid = (lo + hi) // 2
            at = await self._records_at(mid)
            if at is None:
                hi = mid
                continue
            if at[1] and at[1][-1].lsn >= start:
                hi = mid
            else:
                lo = max(at[0], mid) + 1
        self.next_lsn = start
        return lo

    def _accept(self, headers: dict[str, str] | None, payload: bytes) -> list[Record]:
        h = headers or {}
        lid = h.get(H_LOG_ID)
        if self.log_id is None and lid is not None:
            self.log_id = lid
        elif lid != self.log_id:
            if self._filter_log:
                return []
            raise MirrorError(f"stream {self.stream} mixes logs on {self.subject}: {self.log_id} and {lid}; "
                              "pass log_id= to read one")
        return decode_message(h, payload)

    def poll(self, timeout: float | None = None) -> list[Record]:
        """The next records (one batch), waiting up to `timeout` seconds (None: forever); [] on timeout."""
        if self._closed:
            raise LogClosedError("stream reader is closed")
        return self._run(self._poll(timeout))

    async def _poll(self, timeout: float | None) -> list[Record]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Record] = []
        while not out:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return out
            try:
                msg = await self._sub.next_msg(timeout=min(wait, 1.0))
            except nats.errors.TimeoutError:
                continue
            self._take(msg, out)
            while self._sub.pending_msgs and len(out) < 4096:
                self._take(await self._sub.next_msg(timeout=1.0), out)
        return out

    def _take(self, msg: Any, out: list[Record]) -> None:
        for r in self._accept(msg.headers, msg.data):
            if r.lsn >= self.next_lsn:
                out.append(r)
                self.next_lsn = r.lsn + 1

    def last_lsn(self) -> int | None:
        """The last LSN the stream holds now (of this reader's log once known), or None if it is empty."""
        try:
            m = self._run(self._js.get_last_msg(self.stream, self.subject))
        except nats.js.errors.NotFoundError:
            return None
        h = m.headers or {}
        return int(h[H_LSN]) + int(h.get(H_COUNT, "1")) - 1 if H_LSN in h else None

    def __iter__(self) -> Iterator[Record]:
        while True:
            yield from self.poll(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        nc = getattr(self, "_nc", None)
        try:
            if getattr(self, "_sub", None) is not None:
                self._run(self._sub.unsubscribe())
            if nc is not None:
                self._run(nc.close())
        except Exception as exc:  # closing a connection to a cluster that is gone: nothing left to do
            logger.debug("closing the stream reader: %s", exc)
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._run(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore(directory: str | os.PathLike, servers: Sequence[str], stream: str, *, subject: str | None = None,
            log_id: str | None = None, idle_timeout_s: float = 30.0) -> dict[str, Any]:
    """Rebuild the log in `directory` (which must hold no log) from `stream`: the same LSNs, gaps and log id.

    Records are appended in runs of consecutive LSNs; a gap becomes `Log.skip_to`.  Write timestamps are
    those of the restore (the stream's are in its headers), so TTLs restart from the restore.
    """
    from .log import Log
    from .segment import list_segments
    directory = Path(directory)
    if directory.exists() and (list_segments(directory) or logid.load(directory)):
        raise MirrorError(f"{directory} already holds a log; restore only into an empty or new directory")
    restored = 0
    with StreamReader(servers, stream, "earliest", subject=subject, log_id=log_id) as reader:
        end = reader.last_lsn()
        if end is None:
            raise MirrorError(f"stream {stream} holds no walsvc records to restore")
        log: Log | None = None
        try:
            while reader.next_lsn <= end:
                batch = reader.poll(idle_timeout_s)
                if not batch:
                    raise MirrorError(f"stream {stream} stopped delivering at LSN {reader.next_lsn} "
                                      f"(expected up to {end}) for {idle_timeout_s:g} s")
                if log is None:  # the directory is made only now the stream answered, private like any log's
                    access.prepare(directory, "")
                    logid.store(directory, reader.log_id)
                    log = Log.open(directory, first_lsn=batch[0].lsn, fsync="os")
                run: list[Record] = []
                for r in batch:
                    if run and r.lsn != run[-1].lsn + 1:
                        log.append_batch(run)
                        run = []
                    if not run and r.lsn != log.next_lsn:
                        log.skip_to(r.lsn)
                    run.append(r)
                    if len(run) >= 1000:
                        log.append_batch(run)
                        run = []
                if run:
                    log.append_batch(run)
                restored += len(batch)
            log.sync()
            return {"directory": str(directory), "log_id": reader.log_id, "first_lsn": log.first_lsn,
                    "last_lsn": log.committed_lsn, "records": restored}
        finally:
            if log is not None:
                log.close()
