"""The rotation thread: segment switches off the append path, as etcd's file_pipeline does.

Before: a rotation sealed the full segment (two fdatasyncs), created, preallocated and fsynced the next one
and fsynced the directory, all inline, while every append waited (44-78 ms with 64 MiB segments).  Now the
append that fills a segment only writes the next segment's header into a spare file prepared ahead of time
and renames it into place; this thread does everything else, in order: prepare the spare (the log first
fsyncs the active segment, so its header is durable before a later name can be; then create, preallocate,
fdatasync), then after each rotation seal the old segment and apply retention (jobs the log submits).
The log decides what each job does and what must be durable before an ack (log.py); this module only runs
them, and turns any error into a stop of the log: no exception ends the thread silently.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from .errors import LogStoppedError
from .fsync import fail_stop

WAIT_CHECK_S = 0.05  # a waiter re-checks the stop reason this often (the thread may die before it notifies)


class Pipeline:
    """Keeps one spare segment file ready (`prepare()` returns its descriptor) and runs submitted jobs in
    order.  `fail(operation, exc)` stops the log and returns the stop reason; `failed()` is that reason or
    None.  A new spare is prepared before the jobs a switch leaves: it takes a few milliseconds, and an
    append that fills a segment before it is ready waits for it, while no append waits for a seal."""

    def __init__(self, prepare: Callable[[], int], fail: Callable[[str, BaseException], LogStoppedError],
                 failed: Callable[[], LogStoppedError | None]) -> None:
        self._prepare = prepare
        self._fail = fail
        self._failed = failed
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._busy = False  # running a job (not preparing a spare)
        self._spare: int | None = None
        self._installing = False  # a taken spare is still under its temporary name: the next one must wait
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="walsvc-rotation", daemon=True)
        self._thread.start()

    def take_spare(self) -> int:
        """The prepared spare's descriptor (the caller owns it now, and renames it before its next
        `submit`); waits if it is not ready yet.  Raises the stop reason if the log stops meanwhile."""
        with self._cond:
            while self._spare is None:
                if (failed := self._failed()) is not None:
                    raise failed
                self._cond.wait(WAIT_CHECK_S)
            fd, self._spare = self._spare, None
            self._installing = True
            return fd

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._installing = False
            self._cond.notify_all()

    def backlog(self) -> int:
        """Jobs submitted and not finished (seals and retention passes still to run)."""
        with self._cond:
            return len(self._jobs) + int(self._busy)

    def drain(self) -> None:
        """Wait until every submitted job has run (or the log stopped)."""
        with self._cond:
            while (self._jobs or self._busy) and self._failed() is None and self._thread.is_alive():
                self._cond.wait(WAIT_CHECK_S)

    def close(self) -> int | None:
        """Stop the thread (jobs not yet started are dropped); returns the unused spare's descriptor, if any."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        fd, self._spare = self._spare, None
        return fd

    def _run(self) -> None:
        """The thread body: whatever ends it early stops the log, with the reason (never a silent death)."""
        try:
            fail_stop(self._serve, lambda exc: self._fail("rotation thread", exc))
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._jobs and (self._spare is not None or self._installing):
                    self._cond.wait()
                if self._stop or self._failed() is not None:
                    return
                want_spare = self._spare is None and not self._installing
                job = self._jobs.popleft() if self._jobs and not want_spare else None
                self._busy = job is not None
            if job is not None:
                job()
            else:
                fd = self._prepare()
                with self._cond:
                    self._spare = fd
            with self._cond:
                self._busy = False
                self._cond.notify_all()
