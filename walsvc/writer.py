"""The writer process: owns the log, ingests producer batches, publishes commits and acks.

One thread does all socket work.  Each turn of its loop drains every waiting ingest message and appends each
valid batch as one frame.  The log's fsync thread makes them durable (at once under `always`, within the
window under `batch`) while this loop goes on appending, so one fsync covers every batch that arrived
during the previous one: group commit across producers.  It pokes this loop through an inproc socket.
Acks go out only once the commit the policy promises covers the batch; a commit message follows each
advance of the committed LSN.  Bad input is counted, logged (rate-limited), nacked when the sender can be
identified, and never reaches the log.

Fail-stop: once the log stops (an I/O error on the write path, in any thread), the writer acks nothing more,
nacks every batch not yet acked with `log_stopped` (those in flight at once, new ones as they come), and keeps
answering status, which names the failed operation, file and errno, until SIGTERM/SIGINT; it then exits 0.
An unexpected exception while handling a batch stops the log too, with that exception as the reason.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from . import protocol as P
from .config import Config
from .endpoints import Endpoints, ipc_candidates, ipc_endpoints, private_dir
from .errors import LogStoppedError, ProtocolError, RecordError, RecordTooLargeError, ServiceUnavailableError
from .log import Log
from .metrics import Metrics
from .record import count_records

log = logging.getLogger("walsvc.writer")
DRAIN_LIMIT = 2000


class RateLimitedLog:
    """At most one warning per second per kind; the rest are counted and summarized."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, 0.0) >= 1.0:
            extra = f" ({self._suppressed.pop(kind)} similar suppressed)" if self._suppressed[kind] else ""
            log.warning("%s%s", message, extra)
            self._last[kind] = now
        else:
            self._suppressed[kind] += 1


class Writer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.directory = config.directory
        self.metrics = Metrics()
        self._warn = RateLimitedLog()
        self._pending: collections.deque[tuple[int, float, P.Reply]] = collections.deque()
        self._published_commit = -1
        self._flusher_poke = threading.Event()
        self._main_thread = threading.get_ident()
        self._stop = threading.Event()
        self.started = time.time()
        self.log = Log.open(self.directory, config=config.log, on_commit=self._on_commit, on_stop=self._on_stop)
        try:
            self._open_sockets()
        except BaseException:
            self.log.close()
            raise

    # -- sockets ---------------------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        svc = self.config.service
        self.ctx = zmq.Context()
        self.wake_rx = self.ctx.socket(zmq.PAIR)
        self.wake_rx.bind("inproc://walsvc-wake")
        self.wake_tx = self.ctx.socket(zmq.PAIR)
        self.wake_tx.connect("inproc://walsvc-wake")
        if svc.ingest and svc.publish and svc.control:
            eps = Endpoints(svc.ingest, svc.publish, svc.control)
            self._bind(eps)
        else:
            eps = self._bind_ipc()
        self.endpoints = Endpoints(eps.ingest, eps.publish, eps.control, os.getpid(), svc.curve_public_key)
        self.endpoints.save(self.directory)

    def _bind(self, eps: Endpoints) -> None:
        """Create the three service sockets and bind them; on failure close them again."""
        svc = self.config.service
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, svc.ingest_hwm)
        self.pull.setsockopt(zmq.MAXMSGSIZE, svc.max_message_bytes)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        self.rep = self.ctx.socket(zmq.REP)
        sockets = (self.pull, self.pub, self.rep)
        try:
            for sock, endpoint in zip(sockets, (eps.ingest, eps.publish, eps.control)):
                sock.setsockopt(zmq.LINGER, 1000)
                if svc.curve_secret_key:
                    sock.curve_server = True
                    sock.curve_secretkey = svc.curve_secret_key.encode()
                    sock.curve_publickey = svc.curve_public_key.encode()
                sock.bind(endpoint)
        except zmq.ZMQError:
            for sock in sockets:
                sock.close(linger=0)
            raise

    def _bind_ipc(self) -> Endpoints:
        errors = []
        for candidate in ipc_candidates(self.directory, self.config.service):
            try:
                eps = ipc_endpoints(private_dir(candidate))
                for endpoint in (eps.ingest, eps.publish, eps.control):
                    Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
                self._bind(eps)
                return eps
            except (zmq.ZMQError, OSError) as exc:
                errors.append(f"{candidate}: {exc}")
        raise ServiceUnavailableError("cannot bind ipc sockets: " + "; ".join(errors))

    # -- commits ---------------------------------------------------------------------------------------

    def _on_commit(self, committed_lsn: int) -> None:
        """Called by the log after each commit; from another thread, only poke the loop."""
        self._poke_from_flusher()

    def _on_stop(self, reason: LogStoppedError) -> None:
        """Called once by the log when it stops; from another thread, wake the loop so it nacks at once."""
        self._poke_from_flusher()

    def _poke_from_flusher(self) -> None:
        if threading.get_ident() != self._main_thread:
            if not self._flusher_poke.is_set():
                self._flusher_poke.set()
                self.wake_tx.send(b"", zmq.NOBLOCK)

    def _publish_commits(self) -> None:
        stopped = self.log.stop_reason  # first: once the log stopped, the committed LSN read next is final
        committed = self.log.committed_lsn
        now = time.perf_counter()
        pending = self._pending
        send = self.pub.send
        while pending and pending[0][0] <= committed:
            _, appended_at, reply = pending.popleft()
            self.metrics.append_to_ack.record(now - appended_at)
            send(P.encode_reply(reply))
        if stopped is not None and pending:
            # Nothing more will commit: every batch still waiting learns so now, not after its resend timeout.
            for last_lsn, appended_at, reply in pending:
                if last_lsn <= committed:
                    send(P.encode_reply(reply))
                else:
                    self.metrics.rejected[P.LOG_STOPPED] += 1
                    send(P.encode_reply(P.Reply(reply.producer_id, P.NACK, reply.seq, 0, 0,
                                                f"{P.LOG_STOPPED}: {stopped}")))
            pending.clear()
        if committed != self._published_commit:
            send(P.encode_commit(committed, self.log.first_lsn))
            self._published_commit = committed

    # -- ingest ----------------------------------------------------------------------------------------

    def _reply(self, reply: P.Reply) -> None:
        self.pub.send(P.encode_reply(reply))

    def _reject(self, code: str, detail: str, msg: bytes) -> None:
        self.metrics.rejected[code] += 1
        ident = P.peek_producer(msg)
        self._warn.warn(code, f"rejected a message ({code}): {detail}"
                              + (f" from producer {ident[0]:016x} seq {ident[1]}" if ident else ""))
        if ident is not None:
            self._reply(P.Reply(ident[0], P.NACK, ident[1], 0, 0, f"{code}: {detail}"))

    def _reject_stopped(self, reason: LogStoppedError, msg: bytes) -> None:
        """Nack a batch because the log stopped, after answering every batch still pending: a producer that
        gets a log_stopped nack fails all it has in flight, so the acks of batches committed before the stop
        must reach it first (they were still queued until the end of this drain)."""
        self._publish_commits()
        self._reject(P.LOG_STOPPED, str(reason), msg)

    def _handle(self, msg: bytes) -> None:
        try:
            a = P.decode_append(msg)
        except ProtocolError as exc:
            self._reject(exc.code, exc.detail, msg)
            return
        cfg = self.log.config
        if len(a.payload) > cfg.max_batch_bytes:
            self._reject(P.TOO_LARGE, f"batch of {len(a.payload)} bytes exceeds max_batch_bytes "
                                      f"({cfg.max_batch_bytes})", msg)
            return
        window = self.log.producer_batches(a.producer_id)
        if window:
            last = window[-1]
            if a.seq <= last.seq:
                self.metrics.counters["duplicates"] += 1
                for b in window:
                    if b.seq == a.seq:
                        reply = P.Reply(a.producer_id, P.DUPLICATE, a.seq, b.base_lsn, b.count)
                        self._pending.append((b.base_lsn + b.count - 1, time.perf_counter(), reply))
                        return
                self._reply(P.Reply(a.producer_id, P.DUPLICATE, a.seq, 0, 0, "older than the dedup window"))
                return
            if self.log.stop_reason is not None:
                self._reject_stopped(self.log.stop_reason, msg)
                return
            if a.seq != last.seq + 1:
                self._reject(P.OUT_OF_SEQUENCE, f"expected sequence {last.seq + 1}, got {a.seq}", msg)
                return
        payload = bytes(a.payload)
        try:
            n = count_records(payload, 0, len(payload), max_record_bytes=cfg.max_record_bytes)
        except RecordError as exc:
            code = P.TOO_LARGE if isinstance(exc, RecordTooLargeError) else P.MALFORMED
            self._reject(code, f"record at payload offset {exc.offset}: {exc.detail}", msg)
            return
        if n != a.count:
            self._reject(P.MALFORMED, f"header says {a.count} records, payload holds {n}", msg)
            return
        try:
            base = self.log.append_encoded(payload, n, producer_id=a.producer_id, producer_seq=a.seq,
                                           wait=False)
        except LogStoppedError as exc:
            # Fatal for the log, not for the process: keep answering status and nacking, so every
            # producer and operator learns why (a restart runs recovery).
            self._reject_stopped(exc, msg)
            return
        self.metrics.counters["batches"] += 1
        self.metrics.counters["records"] += n
        self._pending.append((base + n - 1, time.perf_counter(), P.Reply(a.producer_id, P.ACK, a.seq, base, n)))

    def _drain(self) -> int:
        recv = self.pull.recv
        handled = 0
        while handled < DRAIN_LIMIT:
            try:
                msg = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                self._handle(msg)
            except Exception as exc:  # a bug or an I/O error nobody named: stop with it as the reason
                self._reject_stopped(self.log.stop("handling a batch in the writer loop", exc), msg)
            handled += 1
        return handled

    # -- control ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.log.stats()
        st.update({
            "directory": str(self.directory), "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
            "endpoints": {"ingest": self.endpoints.ingest, "publish": self.endpoints.publish,
                          "control": self.endpoints.control},
            "cursors": self.log.cursors(),
            "recovery": self.log.recovery.summary(),
            **self.metrics.as_dict(),
        })
        return st

    def _control(self) -> None:
        try:
            # Read every part: answering while parts of a multipart request are unread raises EFSM and
            # killed the writer.  A request is one frame; more is malformed.
            parts = self.rep.recv_multipart()
            if len(parts) != 1:
                raise ProtocolError(P.MALFORMED, f"control request of {len(parts)} frames; send one JSON frame")
            req = P.decode_json(parts[0])
            op = req.get("op")
            if op == "status":
                reply = {"ok": True, **self.status()}
            elif op == "committed":
                reply = {"ok": True, "committed_lsn": self.log.committed_lsn, "first_lsn": self.log.first_lsn}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}; known: status, committed, ping"}
        except ProtocolError as exc:
            self.metrics.rejected["control_" + exc.code] += 1
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # status reads files (cursors): an error there must not end the writer
            log.exception("control request failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.rep.send(json.dumps(reply).encode())

    # -- loop ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT via `install_signal_handlers`), then drain, fsync, close."""
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.rep, zmq.POLLIN)
        poller.register(self.wake_rx, zmq.POLLIN)
        self._publish_commits()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self.wake_rx in events:
                    while True:
                        try:
                            self.wake_rx.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                    self._flusher_poke.clear()
                if self.pull in events:
                    while self._drain() == DRAIN_LIMIT:
                        self._publish_commits()
                if self.rep in events:
                    self._control()
                self._publish_commits()
            while self._drain():
                pass
            if self.log.stop_reason is None:
                try:
                    self.log.sync()
                except LogStoppedError:
                    pass  # logged by the log; the nacks below tell the producers
            self._publish_commits()
        finally:
            self.close()

    def close(self) -> None:
        """Close the log (its last fsync, unless stopped) and the sockets.  A stopped log is not an error
        here: the stop was reported when it happened, and every acked batch is durable."""
        try:
            self.log.close()
        except LogStoppedError:
            pass
        finally:
            self.ctx.destroy(linger=1000)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
