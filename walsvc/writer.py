"""The writer process: owns the log, ingests producer batches, publishes commits and acks.

One thread does all socket work.  Each turn of its loop drains every waiting ingest message and appends each
valid batch as one frame.  Under `always` the loop then fsyncs them itself and acks at once: whatever arrives
during that fsync waits in the socket and shares the next one (group commit across producers, with no thread
hand-off between the write, the fsync and the ack).  When a producer of the turn is pipelining (`Pipelining`),
the fsync goes to the log's thread instead, so the loop takes its next batches in while the disk works.  Under
`batch` the log's fsync thread makes them durable within the window while this loop goes on appending, and
pokes this loop through a pipe.  Under `os` the loop commits each turn's appends once, at the end of its drain
(one HEAD update).  Acks go out only once the commit the policy promises covers the batch; a commit message
follows each advance of the committed LSN.  Each producer's reply subscription is answered with READY (the
publish socket is an XPUB), so producers know when no reply to them can be dropped any more.  What to do with
each APPEND is decided by `IngestSession` (walsvc/ingest.py), which does no I/O.  Bad input is counted, logged
(rate-limited), nacked when the sender can be identified, and never reaches the log.  A producer's next batch,
the common case, is stored by one call of the compiled twin (walsvc/_writer_c.c) when it was built: the same
decision, append and bookkeeping, on the same objects, because each µs the loop spends per batch is waited for
by every record behind it.

Fail-stop: once the log stops (an I/O error on the write path, in any thread), the writer acks nothing more,
nacks every batch not yet acked with `log_stopped` (those in flight at once, new ones as they come), and keeps
answering status, which names the failed operation, file and errno, until SIGTERM/SIGINT; it then exits 0.
An unexpected exception while handling a batch stops the log too, with that exception as the reason.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import math
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from . import cursor
from . import protocol as P
from .config import Config, cpu_list
from .endpoints import Endpoints, ipc_candidates, ipc_endpoints, private_dir, share_sockets
from .errors import (ConfigError, GroupError, LogStoppedError, ProtocolError, ServiceUnavailableError,
                     WriteStepError)
from .frame import Appended
from .group import GROUP_OPS, GroupTable
from .ingest import IngestSession, Refuse, Store
from .record import _c as _record_c, codecs
from .log import Log
from .metrics import Metrics

if _record_c is None:  # no compiler, or WALSVC_PURE_PYTHON: the Python path throughout
    _writer_c = None
else:
    try:
        from . import _writer_c
    except ImportError:
        _writer_c = None

log = logging.getLogger("walsvc.writer")
DRAIN_LIMIT = 2000
LOOK_BEFORE_RECV = 5  # see _drain: a drain of one batch from each of up to 4 producers ends on a look, not an Again
GROUP_STORE_S = 0.1  # consumer group positions are stored at most this often (and when the writer stops)
CONTROL_HWM = 16
SCRAPE_WAIT_S = 1.0  # how long a /metrics scrape waits for the loop's fresh snapshot before taking the last one
SCRAPE_EVERY_S = 0.02  # the loop builds at most one per this, however fast scrapes come
READY_EVERY_S = 0.1  # READYs for one producer id at most this often; a subscription in between waits


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


class Pipelining:
    """Which drains carry a pipelining producer, for where the `always` fsync runs.

    A producer that sent two batches in one drain is pipelining, and counts as such for the next `turns`
    drains: its fsync goes to the fsync thread so that the loop takes its next batches in meanwhile.  A drain
    of producers with one batch in flight each is fsynced by the loop itself (no hand-off on their path)."""

    def __init__(self, turns: int = 64) -> None:
        self.turns = turns
        self.turn = 0
        self.turn_pipelined = False
        self._seen: set[int] = set()
        self._until: dict[int, int] = {}

    def new_turn(self) -> None:
        self.turn += 1
        self.turn_pipelined = False
        self._seen.clear()
        if self.turn % self.turns == 0 and self._until:
            # Forget producers whose window ended without their coming back (a producer process that
            # exited): one entry each would otherwise stay for the writer's lifetime.
            self._until = {pid: until for pid, until in self._until.items() if until >= self.turn}

    def note(self, producer_id: int) -> None:
        if producer_id in self._seen:
            self._until[producer_id] = self.turn + self.turns
            self.turn_pipelined = True
            return
        self._seen.add(producer_id)
        until = self._until.get(producer_id)
        if until is not None:
            if until >= self.turn:
                self.turn_pipelined = True
            else:
                del self._until[producer_id]


def pin_cpus(cpus: str) -> None:
    """Run this thread, and every thread it starts from now on, on the CPUs `[service] cpus` lists (nothing
    when empty).  The kernel narrows the list to the CPUs a cgroup cpuset allows, and refuses it when none is
    left (a ConfigError); the CPUs it kept are logged."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, cpu_list(cpus))
    except OSError as exc:
        raise ConfigError("service.cpus", f"cannot run the writer on CPUs {cpus}: {exc.strerror}") from None
    log.info("the writer runs on CPUs %s", ",".join(map(str, sorted(os.sched_getaffinity(0)))))


def one_cpu() -> bool:
    """Whether this thread may run on one CPU only (`[service] cpus`, a cpuset, a one-CPU machine), where the
    scheduler can say so."""
    return hasattr(os, "SCHED_BATCH") and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1


def raise_file_limit() -> None:
    """Raise the soft limit on open files to the hard one.  Each producer connection, group and /metrics
    scrape costs the writer a descriptor, and libzmq aborts the whole process when an accept meets EMFILE:
    the soft limit is often 1,024 where the hard one is far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a kernel that caps it lower (nr_open): keep what we have
            log.info("could not raise the open-file limit from %d to %d: %s", soft, target, exc)


class Writer:
    def __init__(self, config: Config) -> None:
        pin_cpus(config.service.cpus)  # first: every thread started below inherits it
        raise_file_limit()
        self.config = config
        self.directory = config.directory
        self.metrics = Metrics()
        self._warn = RateLimitedLog()
        # (last LSN, perf_counter at append, the encoded reply) per batch answered once that LSN is committed
        self._pending: collections.deque[tuple[int, float, bytes]] = collections.deque()
        self._published_commit = -1
        self._ready_sent: dict[int, float] = {}  # producer id -> when its last READY went out
        self._ready_due: dict[int, float] = {}  # producer id -> when its deferred READY is due
        self._main_thread = threading.get_ident()
        self._stop = threading.Event()
        self.started = time.time()
        self._group_locks: list[cursor.CursorLock] = []
        self.groups = GroupTable(cursor.check_name, self._claim_group_name, time.time_ns() // 1000)
        self._groups_stored_at = 0.0
        self._cursor_storer: cursor.CursorStorer | None = None
        self._sync_in_loop = config.log.fsync == "always"
        self._commit_in_loop = config.log.fsync == "os"
        self._pipelining = Pipelining()
        # Load the optional codec modules (lz4 is a C extension: dlopen) before the log starts its threads: a
        # dlopen racing another thread's file I/O deadlocks under LD_PRELOAD fault-injection shims.
        self._codecs = codecs()
        # The log's threads wake this loop through a pipe, not a ZeroMQ socket: a socket must never be used by
        # two threads at once, and the fsync and rotation threads can both commit at the same moment.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poked = False
        try:
            self.log = Log.open(self.directory, config=config.log, on_commit=self._on_commit,
                                on_stop=self._on_stop, fsync_thread=not (self._sync_in_loop or self._commit_in_loop))
        except BaseException:
            self._close_wake_pipe()
            raise
        self.metrics_server = None
        self._ingest = IngestSession(max_batch_bytes=self.log.config.max_batch_bytes,
                                     max_record_bytes=self.log.config.max_record_bytes)
        self._store_next = self._compiled_store()
        try:
            self._open_sockets()
            self._start_observing()
        except BaseException:
            if hasattr(self, "ctx"):
                self.ctx.destroy(linger=0)
            self.log.close()
            self._close_wake_pipe()
            raise

    # -- sockets ---------------------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        svc = self.config.service
        self.ctx = zmq.Context()
        if one_cpu():
            # On the loop's one CPU, libzmq's I/O thread preempted the loop each time it woke (a message read,
            # an ack to send).  As SCHED_BATCH it never preempts: it runs while the loop sleeps in poll.  Pinned
            # append-to-reader p99 fell from 601-763 to 394-607 us (PERFORMANCE.md 21.3).
            self.ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
        if svc.ingest and svc.publish and svc.control:
            eps = Endpoints(svc.ingest, svc.publish, svc.control)
            self._bind(eps, explicit=True)
        else:
            eps = self._bind_ipc()
        self.endpoints = Endpoints(eps.ingest, eps.publish, eps.control, os.getpid(), svc.curve_public_key,
                                   self._codecs, self.log.config.max_record_bytes, self.log.config.max_batch_bytes,
                                   self.config.max_message_bytes)
        self.endpoints.save(self.directory)

    def _bind(self, eps: Endpoints, explicit: bool = False) -> None:
        """Create the three service sockets and bind them; on failure close them again, and for endpoints the
        config names (`explicit`) say which one and why, as a ConfigError (ipc candidates are tried in turn)."""
        svc = self.config.service
        # What ZeroMQ may hold for one connected producer before the writer sees it: RCVHWM messages queued
        # plus one its I/O thread has read, each at most MAXMSGSIZE (docs/PROTOCOL.md, "Input limits and the
        # writer's memory").
        self.pull = self.ctx.socket(zmq.PULL)
        self._pull_in = [(self.pull, zmq.POLLIN)]
        self.pull.setsockopt(zmq.RCVHWM, svc.ingest_hwm)
        self.pull.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        # XPUB, not PUB: it hands us each subscription once applied, and we answer a producer's with READY on
        # its topic (`_confirm_subscriptions`); verbose, so a re-subscription after a reconnect shows too.
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        self.rep = self.ctx.socket(zmq.REP)
        # Control input is small: bound what ZeroMQ may queue for it (per client: RCVHWM x MAXMSGSIZE).
        self.rep.setsockopt(zmq.MAXMSGSIZE, P.CONTROL_SOCKET_MAX_BYTES)
        self.rep.setsockopt(zmq.RCVHWM, CONTROL_HWM)
        sockets = (self.pull, self.pub, self.rep)
        key = ""
        try:
            for sock, key, endpoint in zip(sockets, ("ingest", "publish", "control"),
                                           (eps.ingest, eps.publish, eps.control)):
                sock.setsockopt(zmq.LINGER, 1000)
                if svc.curve_secret_key:
                    sock.curve_server = True
                    sock.curve_secretkey = svc.curve_secret_key.encode()
                    sock.curve_publickey = svc.curve_public_key.encode()
                sock.bind(endpoint)
        except zmq.ZMQError as exc:
            for sock in sockets:
                sock.close(linger=0)
            if explicit:
                raise ConfigError(f"service.{key}", f"cannot bind {getattr(eps, key)!r}: {exc}") from None
            raise

    def _bind_ipc(self) -> Endpoints:
        errors = []
        group, svc = self.config.log.group, self.config.service
        for candidate in ipc_candidates(self.directory, svc, shared=bool(group)):
            try:
                eps = ipc_endpoints(private_dir(candidate))
                for endpoint in (eps.ingest, eps.publish, eps.control):
                    Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
                self._bind(eps)
                share_sockets(eps, group, svc.produce_group)
                return eps
            except (zmq.ZMQError, OSError) as exc:
                errors.append(f"{candidate}: {exc}")
        raise ServiceUnavailableError("cannot bind ipc sockets: " + "; ".join(errors))

    # -- events and metrics --------------------------------------------------------------------------------

    def _start_observing(self) -> None:
        """Events from recovery, the baseline the loop compares against, and the opt-in /metrics server."""
        rec = self.log.recovery
        if rec.corruption:
            self.metrics.event("corruption_found", detail=rec.corruption, quarantined=",".join(rec.quarantined))
        self._seen = self.log.activity()
        self._next_watch = 0.0
        self._snapshot = self.status()
        self._scrapes: list[threading.Event] = []
        self._scrapes_lock = threading.Lock()
        self._next_snapshot = 0.0
        port = self.config.service.metrics_port
        if port:
            from .prometheus import MetricsServer
            self.metrics_server = MetricsServer(port, self._scrape_snapshot,
                                                lambda detail: self.metrics.event("metrics_error", detail=detail))

    def _scrape_snapshot(self) -> dict[str, Any]:
        """A scrape's status (the metrics thread): the loop builds it between two turns, since only the loop
        may touch the log.  Built per scrape, not on a timer: a status costs the loop about 0.4 ms,
        which every record behind it would wait out; and at most one per SCRAPE_EVERY_S, so that scraping in
        a loop cannot take the loop over.  A loop that does not answer within SCRAPE_WAIT_S (stopping) leaves
        the last one built."""
        done = threading.Event()
        with self._scrapes_lock:
            self._scrapes.append(done)
        self._wake_loop()
        done.wait(SCRAPE_WAIT_S)
        return self._snapshot

    def _scrape_due_ms(self) -> int:
        """How long the loop may sleep while a scrape waits: until it may build the next snapshot."""
        return max(0, min(100, math.ceil((self._next_snapshot - time.monotonic()) * 1000)))

    def _answer_scrapes(self) -> None:
        now = time.monotonic()
        if now < self._next_snapshot:
            return  # a later turn answers: the loop sleeps no longer than until then (`_scrape_due_ms`)
        self._next_snapshot = now + SCRAPE_EVERY_S
        with self._scrapes_lock:
            waiting, self._scrapes = self._scrapes, []
        try:
            self._snapshot = self.status()
        except Exception as exc:  # an unreadable cursors folder, say: the scrape gets the last one
            self.metrics.event("metrics_error", detail=f"status for a scrape: {type(exc).__name__}: {exc}")
        finally:
            for done in waiting:
                done.set()

    def _watch(self) -> None:
        """Turn changes in the log's state into events."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + 0.25
        st, seen = self.log.activity(), self._seen
        rolled = (st["segments"] + st["segments_deleted"]) - (seen["segments"] + seen["segments_deleted"])
        if rolled > 0:
            self.metrics.event("segment_rolled", segments=st["segments"], next_lsn=st["next_lsn"])
        if st["segments_deleted"] > seen["segments_deleted"]:
            self.metrics.event("retention_deleted", segments=st["segments_deleted"] - seen["segments_deleted"],
                               first_lsn=st["first_lsn"])
        slow = st["slow_fsyncs"] - seen["slow_fsyncs"]
        if slow > 0:
            self.metrics.event("slow_fsync", count=slow, max_s=round(st["fsync_max_us"] / 1e6, 3))
        if st["stopped"] and not seen["stopped"]:
            self.metrics.event("log_stopped", reason=st["stopped"])
        if self.metrics_server is not None and not self.metrics_server.thread.is_alive():
            self.metrics.event("metrics_error", detail="the metrics thread ended")
            self.metrics_server = None
        self._seen = st

    # -- commits ---------------------------------------------------------------------------------------

    def _on_commit(self, committed_lsn: int) -> None:
        """Called by the log after each commit; from another thread, only poke the loop (from the loop itself,
        after each drain under `always` and `os`, nothing: it publishes right after)."""
        if threading.get_ident() != self._main_thread:
            self._wake_loop()

    def _on_stop(self, reason: LogStoppedError) -> None:
        """Called once by the log when it stops; from another thread, wake the loop so it nacks at once."""
        self._wake_loop()

    def _wake_loop(self) -> None:
        """Wake the loop from another thread.  A write to a pipe is safe from any number of threads; the flag
        only saves writes while a wake-up is already pending (a stale read of it costs one byte more)."""
        if threading.get_ident() != self._main_thread and not self._poked:
            self._poked = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups the loop has yet to read: it wakes anyway

    def _take_pokes(self) -> None:
        """Read the pipe empty, then clear the flag.  A poke skipped while the flag was still set came after a
        commit made before the clear, which the loop publishes later in this turn.  (Cleared first, a poke
        landing in between set the flag, and this read ate its byte: no later poke would write one.)"""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._poked = False

    def _close_wake_pipe(self) -> None:
        self._poked = True  # no more writes: a late scrape thread must not write into a reused descriptor
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _sync_appended(self) -> None:
        """Under `always`: make this turn's appends durable now, in this thread (one fdatasync for all of
        them), or, when a producer of this turn is pipelining, on the fsync thread while the loop takes its
        next batches in.  Producers with one batch in flight each are acked soonest by the loop itself: none
        of them can send again before its ack, and whatever the others send meanwhile shares the next fsync.
        Under `os`: commit this turn's appends, one HEAD update (and one wake-up of each reader) for all
        of them.  A failure has stopped the log; `_publish_commits` then nacks every batch still pending."""
        if not (self._sync_in_loop or self._commit_in_loop) or self.log.stop_reason is not None:
            return
        try:
            if self._commit_in_loop:
                self.log.commit_written()
            elif self._pipelining.turn_pipelined:
                self.log.sync_soon()
            else:
                self.log.sync()
        except LogStoppedError:
            pass
        except Exception as exc:  # a bug nobody named: stop with it as the reason, never end the loop
            self.log.stop("fsync in the writer loop", exc)

    def _publish_commits(self) -> None:
        """Send the replies of the batches the committed LSN now covers, then a COMMIT if it moved (called every
        loop turn: nothing to do costs two attribute reads and two comparisons)."""
        stopped = self.log.stop_reason  # first: once the log stopped, the committed LSN read next is final
        committed = self.log.committed_lsn
        pending = self._pending
        send = self.pub.send
        if pending and pending[0][0] <= committed:
            now = time.perf_counter()
            record = self.metrics.append_to_ack.record
            while pending and pending[0][0] <= committed:
                _, appended_at, reply = pending.popleft()
                record(now - appended_at)
                send(reply)
        if stopped is not None and pending:
            # Nothing more will commit: every batch still waiting learns so now, not after its resend timeout.
            for last_lsn, appended_at, reply in pending:
                if last_lsn <= committed:
                    send(reply)
                else:
                    self.metrics.rejected[P.LOG_STOPPED] += 1
                    ack = P.decode_reply(reply)
                    send(P.encode_reply(P.Reply(ack.producer_id, P.NACK, ack.seq, 0, 0,
                                                f"{P.LOG_STOPPED}: {stopped}")))
            pending.clear()
        if committed != self._published_commit:
            send(P.encode_commit(committed, self.log.first_lsn))
            self._published_commit = committed

    # -- ingest ----------------------------------------------------------------------------------------

    def _confirm_subscriptions(self) -> None:
        """Answer each producer's reply subscription with READY: from then on no reply to it can be dropped,
        so a producer sends only after READY, and resends what is unacked on each later one (a reconnect).

        At most one READY per producer id every READY_EVERY_S: a subscription sooner than that gets its READY
        when that time comes (never none).  Any account that may read the publish socket can subscribe to
        any topic, and each READY makes that producer resend everything in flight."""
        now = time.monotonic()
        for _ in range(DRAIN_LIMIT):
            try:
                msg = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            producer_id = P.subscribed_producer(msg)
            if producer_id is None or producer_id in self._ready_due:
                continue
            sent = self._ready_sent.get(producer_id)
            if sent is not None and now - sent < READY_EVERY_S:
                self._ready_due[producer_id] = sent + READY_EVERY_S
            else:
                self._send_ready(producer_id, now)
        if len(self._ready_sent) > 4096:  # forget ids whose window has passed
            self._ready_sent = {pid: at for pid, at in self._ready_sent.items() if now - at < READY_EVERY_S}

    def _send_ready(self, producer_id: int, now: float) -> None:
        self.pub.send(P.encode_ready(producer_id, self.log.log_id))
        self._ready_sent[producer_id] = now

    def _send_due_readies(self) -> None:
        now = time.monotonic()
        for producer_id, due in list(self._ready_due.items()):
            if due <= now:
                del self._ready_due[producer_id]
                self._send_ready(producer_id, now)

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

    def _compiled_store(self) -> Callable[[bytes], bool] | None:
        """The compiled twin of `_handle` for a producer's next batch (`_writer_c.BatchAppender`), or None
        when it was not built.  It declines every other message, and `_handle`'s Python then decides."""
        if _writer_c is None:
            return None
        cfg = self.log.config
        return _writer_c.BatchAppender(self.log, self._pending, self.metrics.counters, Appended,
                                       self._pipelining.note if self._sync_in_loop else None, time.perf_counter,
                                       cfg.max_record_bytes, cfg.max_batch_bytes, cfg.segment_bytes,
                                       cfg.index_interval_bytes).store

    def _handle(self, msg: bytes) -> None:
        """Store, answer or refuse one APPEND.  The compiled twin takes the common case (a producer's next
        batch, fitting the active segment): the same checks, append and bookkeeping as the Python below."""
        if self._store_next is not None:
            try:
                if self._store_next(msg):
                    return
            except LogStoppedError as exc:
                self._reject_stopped(exc, msg)
                return
        log = self.log
        decision = self._ingest.decide(msg, log.producer_batches)
        if type(decision) is Store:
            producer_id, seq, payload, n = decision
            if not log.producer_batches(producer_id):
                self.metrics.event("producer_connected", producer=f"{producer_id:016x}")
            try:
                base = log.append_encoded(payload, n, producer_id=producer_id, producer_seq=seq, wait=False)
            except LogStoppedError as exc:
                # Fatal for the log, not for the process: keep answering status and nacking, so every
                # producer and operator learns why (a restart runs recovery).
                self._reject_stopped(exc, msg)
                return
            counters = self.metrics.counters
            counters["batches"] += 1
            counters["records"] += n
            if self._sync_in_loop:
                self._pipelining.note(producer_id)
            self._pending.append((base + n - 1, time.perf_counter(), P.encode_ack(producer_id, seq, base, n)))
            return
        if type(decision) is Refuse:
            if decision.code == P.OUT_OF_SEQUENCE and self.log.stop_reason is not None:
                self._reject_stopped(self.log.stop_reason, msg)  # resending cannot help: nothing more is stored
            else:
                self._reject(decision.code, decision.detail, msg)
            return
        self.metrics.counters["duplicates"] += 1  # a Duplicate
        if decision.count:
            self._pending.append((decision.last_lsn, time.perf_counter(), P.encode_reply(decision.reply())))
        else:
            self._reply(decision.reply())

    def _drain(self) -> int:
        self._pipelining.new_turn()
        recv = self.pull.recv
        handled = 0
        while handled < DRAIN_LIMIT:
            # Look before each of the first few recvs after the first: a recv that finds nothing raises
            # zmq.Again, 4-12 us in pyzmq against ~1 us for a zmq_poll (Socket.poll builds a Poller per call:
            # 2.5 us), and with records in flight a drain takes one message per producer.  Past that, recv
            # until Again (one poll per message would cost more).
            if 0 < handled < LOOK_BEFORE_RECV and not zmq.zmq_poll(self._pull_in, 0):
                break
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if frame.more:
                self._reject_multipart(frame.bytes)
            else:
                try:
                    self._handle(frame.bytes)
                except Exception as exc:  # a bug or an I/O error nobody named: stop with it as the reason
                    self._reject_stopped(self.log.stop("handling a batch in the writer loop", exc), frame.bytes)
            handled += 1
        return handled

    def _reject_multipart(self, first: bytes) -> None:
        """An APPEND is one frame: refuse a multipart message whole (its parts arrive together)."""
        parts = 1
        while self.pull.rcvmore:
            self.pull.recv(zmq.NOBLOCK, copy=False)
            parts += 1
        self._reject(P.MALFORMED, f"ingest message of {parts} frames; an APPEND is one frame", first)

    # -- control ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.log.stats()
        st.update({
            "directory": str(self.directory), "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "endpoints": {"ingest": self.endpoints.ingest, "publish": self.endpoints.publish,
                          "control": self.endpoints.control},
            "cursors": self.log.cursors(),
            "groups": self.groups.describe(self.log.committed_lsn),
            "recovery": self.log.recovery.summary(),
            "metrics_url": self.metrics_server.url if self.metrics_server is not None else None,
            "batch_store": "C" if self._store_next is not None else "pure Python",
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
            elif op in GROUP_OPS:
                reply = self._group_request(req)
            else:
                reply = {"ok": False, "error": f"unknown op {op!r:.60}; known: status, committed, ping, "
                                               + ", ".join(GROUP_OPS)}
        except ProtocolError as exc:
            self.metrics.rejected["control_" + exc.code] += 1
            self._warn.warn("control", f"rejected a control request: {exc}")
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a request must never end the writer; say so loudly, and answer
            self.metrics.rejected["control_internal"] += 1
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        self.rep.send(json.dumps(reply).encode())

    def _claim_group_name(self, name: str) -> None:
        """Hold a new group's cursor lock while the group lives (no named reader may take the name).

        The first group creates the cursors folder and fsyncs the log directory.  That fsync failing stops
        the log like any write-path fsync: Linux reports a lost write-back of the directory once, so the
        next one, after a segment switch, would return 0 for entries that never reached the disk.  An EIO
        anywhere in the claim does too.  Any other refusal (another process holds the name, no permission,
        a folder where the lock file goes) refuses this group alone and the log serves on."""
        try:
            lock = cursor.CursorLock(self.directory, name)
        except OSError as exc:
            if isinstance(exc, WriteStepError) or exc.errno == errno.EIO:
                raise self.log.stop(f"group {name} cursor lock", exc) from exc
            raise GroupError(name, f"cannot take its cursor lock in {self.directory / cursor.DIRNAME}: "
                                   f"{exc}") from None
        self._group_locks.append(lock)

    def _group_request(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.groups.request(req, committed_lsn=self.log.committed_lsn, first_lsn=self.log.first_lsn,
                                       now_ms=time.monotonic() * 1000,
                                       stored=lambda name: cursor.load(self.directory, name))
        except GroupError as exc:
            self.metrics.rejected["control_group"] += 1
            return {"ok": False, "error": str(exc)}

    def _store_group_positions(self, force: bool = False) -> None:
        """Store each moved group position as the group's cursor, at most every GROUP_STORE_S: an fsync per
        ack would cap a group at a few hundred acks/s; a crash redelivers at most that window's records.  The
        cursor thread stores them (`cursor.CursorStorer`): two fsyncs each, which this loop must not wait for."""
        now = time.monotonic()
        if (not force and now - self._groups_stored_at < GROUP_STORE_S) or self.log.stop_reason is not None:
            return
        self._groups_stored_at = now
        moved = self.groups.take_moved()
        if moved:
            if self._cursor_storer is None:  # started by the first group to move: most logs have none
                self._cursor_storer = cursor.CursorStorer(self.directory, self.log.stop)
            self._cursor_storer.put({name: position - 1 for name, position in moved.items()})

    # -- loop ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT via `install_signal_handlers`), then drain, fsync, close."""
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.rep, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        self._publish_commits()
        try:
            while not self._stop.is_set():
                timeout = self._scrape_due_ms() if self._scrapes else 100
                events = dict(poller.poll(min(timeout, 10) if self._ready_due else timeout))
                if self._wake_r in events:
                    self._take_pokes()
                if self.pull in events:
                    while self._drain() == DRAIN_LIMIT:
                        self._sync_appended()
                        self._publish_commits()
                    self._sync_appended()
                if self.rep in events:
                    self._control()
                self._publish_commits()
                self._store_group_positions()
                self._watch()
                if self._scrapes:
                    self._answer_scrapes()
                if self.pub in events:
                    self._confirm_subscriptions()
                if self._ready_due:
                    self._send_due_readies()
            while self._drain():
                pass
            if self.log.stop_reason is None:
                try:
                    self.log.sync()
                except LogStoppedError:
                    pass  # logged by the log; the nacks below tell the producers
            self._publish_commits()
            self._store_group_positions(force=True)
        finally:
            self.close()

    def close(self) -> None:
        """Close the log (its last fsync, unless stopped) and the sockets.  A stopped log is not an error
        here: the stop was reported when it happened, and every acked batch is durable."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._cursor_storer is not None:
            self._cursor_storer.close()  # every group position handed over is stored before the locks go
        self.metrics.event("writer_stopped", committed_lsn=self.log.committed_lsn)
        try:
            self.log.close()
        except LogStoppedError:
            pass
        finally:
            for lock in self._group_locks:
                lock.release()
            self.ctx.destroy(linger=1000)
            self._close_wake_pipe()  # last: the log's threads, which poke through it, have ended

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
