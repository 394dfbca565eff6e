"""A producer's put buffer (record.put_buffer): the compiled one against its pure-Python reference, its lock-free
put under threads, and a Producer on each codec with plain puts from several threads landing exactly once.

The compiled PutBuffer's `put` takes no lock: it must be atomic against another thread's `take`, so every
handle it returns names the batch and the place its record really went to.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from helpers import verify_log

import walsvc
from walsvc import record as R
from walsvc.producer import RecordFuture

C = R._c
needs_c = pytest.mark.skipif(C is None and not os.environ.get("CI"),
                             reason="the compiled record codec is not built here (no C compiler?)")


class Owner:
    """A batch token: handles point at it."""

    def __init__(self, name: str) -> None:
        self.name = name


def _handle(h: RecordFuture | None) -> tuple | None:
    return None if h is None else (h._batch.name, h._index)


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.one_of(st.binary(max_size=40), st.text(max_size=3)), st.binary(max_size=300)),
    st.tuples(st.just("open"), st.integers(0, 2000)),
    st.tuples(st.just("add"), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=50)), max_size=4)),
    st.tuples(st.just("take")),
    st.tuples(st.just("limit"), st.integers(0, 2000)),
), max_size=40)


def _run(buf, script: list[tuple]) -> list:
    """What each call gives (or the error class it raises), and the state after it."""
    out: list = []
    opened = 0
    for op in script:
        try:
            if op[0] == "put":
                got = _handle(buf.put(op[1], op[2]))
            elif op[0] == "open":
                opened += 1
                got = buf.open(Owner(f"b{opened}"), op[1])
            elif op[0] == "add":
                got = buf.add(b"".join(R.encode_put_py(k, v) for k, v in op[1]), len(op[1]))
            elif op[0] == "take":
                got = buf.take()
            else:
                buf.limit = op[1]
                got = None
        except ValueError as exc:
            got = type(exc).__name__
        out.append((got, buf.size, buf.count, buf.is_open))
    return out


@needs_c
@settings(max_examples=300, deadline=None)
@given(script=ops, max_record_bytes=st.sampled_from([0, 10, 100, 1 << 20]))
def test_compiled_put_buffer_matches_the_reference(script: list[tuple], max_record_bytes: int) -> None:
    fast = C.PutBuffer(RecordFuture, max_record_bytes)
    slow = R.PutBufferPy(RecordFuture, max_record_bytes)
    assert fast.atomic and not slow.atomic
    assert _run(fast, script) == _run(slow, script)
    assert [_handle(h) for h in fast.handles(Owner("x"), 7, 3)] == [("x", 7), ("x", 8), ("x", 9)]


@needs_c
def test_lock_free_puts_are_atomic_against_take() -> None:
    """Four threads put without a lock while a fifth closes and reopens batches: each handle's (batch, index)
    is exactly where its record is, and no record is lost or doubled."""
    buf = C.PutBuffer(RecordFuture, 1 << 20)
    payloads: dict[str, bytes] = {}
    handles: list[list[tuple[RecordFuture, bytes]]] = [[] for _ in range(4)]
    lock = threading.Lock()  # the producer's lock guards open/take, never put
    stop = threading.Event()
    counter = iter(range(1 << 30))

    def reopen() -> None:
        with lock:
            buf.open(Owner(f"b{next(counter)}"), 1 << 30)

    def closer() -> None:
        while not stop.is_set():
            with lock:
                payloads[f"b{len(payloads)}"] = buf.take()[0]
            reopen()
        with lock:
            payloads[f"b{len(payloads)}"] = buf.take()[0]

    def putter(i: int) -> None:
        for n in range(20_000):
            key = b"t%d-%06d" % (i, n)
            while (h := buf.put(key, b"v" * (n % 50))) is None:
                pass  # between a take and the reopen: the producer would take its locked path here
            handles[i].append((h, key))

    reopen()
    threads = [threading.Thread(target=putter, args=(i,)) for i in range(4)]
    closing = threading.Thread(target=closer)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: a put that is not atomic would be caught mid-way
    try:
        closing.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        closing.join(60)
    finally:
        sys.setswitchinterval(interval)
    batches = {name: list(R.iter_decode(data)) for name, data in payloads.items()}
    assert len(batches) > 2, "no batch closed under the putters: the test saw no race"
    assert sum(map(len, batches.values())) == 4 * 20_000
    for per in handles:
        for h, key in per:
            assert batches[h._batch.name][h._index].key == key


def test_threads_putting_on_one_producer_land_exactly_once(tmp_path: Path, writers, codec: str) -> None:
    """Plain puts from four threads into one Producer (small batches, a small buffer, so batches close under
    the putters and the buffer fills), mixed with put_many: every future's LSN holds its own record."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d, batch_bytes=4096, max_buffer_bytes=64 * 1024) as producer:
        assert producer._pending.atomic == (codec == "c")
        sent: list[list[tuple[bytes, RecordFuture]]] = [[] for _ in range(4)]

        def produce(i: int) -> None:
            for n in range(3000):
                key = b"p%d-%05d" % (i, n)
                if n % 100 == 0:
                    keys = [key + b"-%d" % j for j in range(10)]
                    sent[i].extend(zip(keys, producer.put_many([(k, b"m") for k in keys])))
                else:
                    sent[i].append((key, producer.put(key, b"x" * (n % 200))))

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        acked = {f.result(60): key for per in sent for key, f in per}
    records = verify_log(d)
    assert len(acked) == len(records) == 4 * (2970 + 300)
    assert {r.lsn: r.key for r in records} == acked
    for per in sent:  # each thread's records keep its order
        lsns = [f.result(0) for _, f in per]
        assert lsns == sorted(lsns)
