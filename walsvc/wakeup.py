"""How a tailing reader sleeps until the next commit.

The writer rewrites HEAD after every commit (head.py) and then publishes a COMMIT message (PROTOCOL.md).
Either can wake a reader.  On Linux a reader watches HEAD with inotify: the writer's `pwrite` wakes it
straight from the kernel, one hop, where a COMMIT crosses two of libzmq's I/O threads on its way
(PERFORMANCE.md section 12 measures the difference).  Where inotify is missing or the user is out of
instances (`fs.inotify.max_user_instances`) the reader subscribes to COMMIT messages instead.  Either way
HEAD stays the truth a reader reads its bound from, and it is reread at least every `recheck_s`, so a lost
wake-up costs that much at most.

Both return from `wait` the committed LSN they learned (0: "something committed, read HEAD"), or None
when nothing came within the time given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
from pathlib import Path
from typing import Protocol

import zmq

from . import protocol as P
from .endpoints import load as load_endpoints
from .errors import ProtocolError, ServiceUnavailableError

IN_MODIFY = 0x002  # the writer's pwrite of HEAD; nothing else is watched (it never replaces or removes HEAD)
_READ_SIZE = 4096  # one read takes every queued event: the kernel folds repeats of an unread one into it


class Wakeup(Protocol):
    def wait(self, wait_s: float) -> int | None: ...

    def refresh(self) -> None: ...

    def close(self) -> None: ...


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 (missing on a libc without inotify)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc() if hasattr(select, "poll") else None


def wait_for_commit(sub: zmq.Socket, wait_s: float) -> int | None:
    """Sleep on a COMMIT subscription until the next message or `wait_s` (0: only look), and drain what came:
    the highest committed LSN the messages carry (0 if none was readable), None if none came."""
    if not sub.poll(int(wait_s * 1000) + 1 if wait_s > 0 else 0):
        return None
    committed, received = 0, 0
    while True:
        # After the first message look once (poll(0), ~2.4 us) instead of letting a recv raise zmq.Again
        # (~12 us in pyzmq): one COMMIT per wake-up is the common case.
        if received == 1 and not sub.poll(0):
            return committed
        try:
            msg = sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return committed
        received += 1
        try:
            committed = max(committed, P.decode_commit(msg)[0])
        except ProtocolError:
            pass  # not ours to judge: it still woke us, and HEAD has the truth


class HeadWatch:
    """Wakes on every change of the HEAD file (inotify).  Raises OSError where inotify is unavailable."""

    def __init__(self, head_path: Path) -> None:
        self.fd = -1  # before anything can raise: a watch never made is still closed on collection (__del__)
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "inotify is not available here")
        fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if _LIBC.inotify_add_watch(fd, os.fsencode(head_path), IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {head_path}: {os.strerror(err)}")
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def wait(self, wait_s: float) -> int | None:
        """0 once HEAD changed (its events drained), None if it did not within `wait_s` (0: only look).  It
        looks with poll first: a read of an empty descriptor would raise BlockingIOError, which costs more
        than the look, and a tailing reader finds it empty at every poll's first look."""
        if not self._poll.poll(int(wait_s * 1000) + 1 if wait_s > 0 else 0):
            return None
        os.read(self.fd, _READ_SIZE)
        return 0

    def refresh(self) -> None:
        """Nothing to look for: the watch is on HEAD's inode, which the writer never replaces."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # a reader dropped without close must not keep an inotify instance (128 per user)


class CommitSubscription:
    """Wakes on the writer's COMMIT messages (a ZeroMQ SUB to its PUB endpoint, from ENDPOINTS)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, P.TOPIC_COMMIT)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 1000)
        self._endpoint: str | None = None
        self._connect()

    def _connect(self) -> None:
        """Subscribe to the writer's commits if it recorded its endpoints (again when they change)."""
        try:
            endpoints = load_endpoints(self.directory)
        except ServiceUnavailableError:
            return
        if endpoints.publish != self._endpoint:
            if self._endpoint is not None:
                self._sub.disconnect(self._endpoint)
            endpoints.secure(self._sub).connect(endpoints.publish)
            self._endpoint = endpoints.publish

    def refresh(self) -> None:
        """After a wait that timed out with no writer known: look for one (a new writer, new endpoints)."""
        self._connect()

    def wait(self, wait_s: float) -> int | None:
        committed = wait_for_commit(self._sub, wait_s)
        if committed is None and wait_s > 0 and self._endpoint is None:
            self._connect()  # no writer had recorded its endpoints yet: one may have since
        return committed

    def close(self) -> None:
        close_context(self._ctx, self._sub)

    __del__ = close  # a reader dropped without close must not keep a context, its threads and sockets


def close_context(ctx: zmq.Context, *sockets: zmq.Socket | None) -> None:
    """Close `sockets`, then terminate `ctx`.  Not `ctx.destroy`: when the garbage collector frees an
    abandoned reader, the context's weak references to its sockets are already gone, so destroy would close
    none of them and its term would wait for them forever."""
    for sock in sockets:
        if sock is not None:
            sock.close(linger=0)
    ctx.term()
