"""`walsvc status`: ask the running writer, or read the directory when none runs; say it in plain words.

The JSON form (`status --json`) is documented field by field in docs/PROTOCOL.md; the text form puts the
writer's state first and never shows a Python repr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .head import Head, HeadReader


def query_writer(directory: Path, timeout_ms: int = 1000) -> dict[str, Any] | None:
    """The writer's status reply, or None when no writer runs or it does not answer within the timeout."""
    import zmq

    from .endpoints import load as load_endpoints
    from .errors import ServiceUnavailableError
    from .protocol import encode_request
    head = HeadReader(directory).read()
    if head is None or not head.writer_alive():
        return None
    try:
        eps = load_endpoints(directory)
    except ServiceUnavailableError:
        return None
    ctx = zmq.Context()
    try:
        sock = eps.secure(ctx.socket(zmq.REQ))
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(eps.control)
        sock.send(encode_request("status"))
        if not sock.poll(timeout_ms):
            return None
        return json.loads(sock.recv())
    finally:
        ctx.destroy(linger=0)


def offline_status(directory: Path, live_head: Head | None = None) -> dict[str, Any]:
    """What the files say: LSN range, segments, bytes, cursors (no counters: they live in the writer).

    With no writer the end is where the next open would end the log (`recovery.offline_end`), and `damage` says
    what that open would refuse.  `live_head`: the HEAD of a writer that runs but did not answer; its
    committed LSN is the end (the bytes past it are a write in progress, not damage).
    """
    from .cursor import lag_rows, load_all
    from .logid import load as load_log_id
    from .recovery import head_lost, offline_end
    from .segment import list_segments
    segments = list_segments(directory)
    head = live_head or HeadReader(directory).read()
    damage = torn = stop = lost = None
    if live_head is not None:
        last = live_head.committed_lsn
    else:
        end = offline_end(directory)
        last, torn = end.committed_lsn, end.torn_tail
        if end.damage is not None:
            damage = end.damage.location.after(end.damage.detail)
        else:
            lost = head_lost(head, last + 1)
            if lost is not None and lost.durable:
                damage = (f"LSNs {lost.first}..{lost.end - 1} were committed and fsynced (HEAD's durable LSN is "
                          f"{head.durable_lsn}) but are not on disk")
                lost = None
        if end.stop is not None:
            stop = {"committed_lsn": end.stop.committed_lsn, "reason": end.stop.reason}
    return {"writer": "offline", "directory": str(directory), "log_id": load_log_id(directory),
            "first_lsn": segments[0][0] if segments else 1, "committed_lsn": last,
            "head_committed_lsn": head.committed_lsn if head else None, "damage": damage, "torn_tail": torn,
            "lost": {"first_lsn": lost.first, "last_lsn": lost.end - 1} if lost else None,
            "stopped_at": stop, "segments": len(segments), "bytes": sum(p.stat().st_size for _, p in segments),
            "cursors": lag_rows(load_all(directory), last)}


def collect(directory: Path) -> dict[str, Any]:
    """The writer's status if one answers, else the offline view with `writer` saying why; with the state
    of every mirror (`walsvc mirror`) either way."""
    from .mirror import load_all_states
    status = query_writer(directory)
    if status is not None:
        status.pop("ok", None)
        status["writer"] = "stopped" if status.get("stopped") else "running"
    else:
        head = HeadReader(directory).read()
        if head is not None and head.writer_alive():
            # The process exists but did not answer within the timeout: stopped (SIGSTOP) or overloaded.
            status = offline_status(directory, head)
            status["writer"] = "unresponsive"
            status["writer_pid"] = head.writer_pid
        else:
            status = offline_status(directory)
    status["mirrors"] = load_all_states(directory)
    return status


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _latency(h: dict[str, Any]) -> str:
    if not h or not h.get("count"):
        return "no samples yet"
    return (f"p50 {h['p50_us']:,.0f} us, p99 {h['p99_us']:,.0f} us, max {h['max_us']:,.0f} us "
            f"({h['count']:,} samples)")


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, seconds: float) -> str:
    if before is None or seconds <= 0:
        return ""
    return f", {(now.get(key, 0) - before.get(key, 0)) / seconds:,.0f}/s over the last {seconds:.0f} s"


def format_text(st: dict[str, Any], before: dict[str, Any] | None = None, interval: float = 0.0) -> str:
    """Plain words, the writer's state first.  `before` (an earlier status) adds rates over `interval`."""
    lines = []
    if st.get("damage"):
        lines.append(f"DAMAGED: {st['damage']}; run walsvc verify")
    w = st["writer"]
    if w == "running":
        lines.append(f"writer: running, pid {st['pid']}, up {st['uptime_s']:,.0f} s, fsync {st['fsync']}, "
                     f"record codec {st.get('codec', 'unknown')}, batch store {st.get('batch_store', 'unknown')}")
    elif w == "stopped":
        why = st["stopped"]
        lines.append(f"writer: STOPPED (refuses writes until restarted), pid {st['pid']}: {why['operation']} failed"
                     + (f" on {why['path']}" if why.get("path") else "")
                     + (f" ({why['errno_name']})" if why.get("errno_name") else "") + f": {why['detail']}")
    elif w == "unresponsive":
        lines.append(f"writer: unresponsive (pid {st['writer_pid']} did not answer within 1 s: stopped or "
                     "overloaded); the rest is read from disk")
    else:
        lines.append("writer: not running; the rest is read from disk")
    lines.append(f"directory: {st['directory']}" + (f", log id {st['log_id']}" if st.get("log_id") else ""))
    first, last = st["first_lsn"], st["committed_lsn"]
    held = f"LSNs {first:,} to {last:,}" if last >= first else "no records"
    if st.get("damage"):
        said = st.get("head_committed_lsn")
        lines.append(f"records: {held} readable up to the damage"
                     + (f"; HEAD says committed up to LSN {said:,}" if said is not None else ""))
    else:
        lines.append(f"records: {held}, committed up to LSN {last:,}")
    stop = st.get("stopped_at")
    if stop:
        lines.append(f"stopped on an error at LSN {stop['committed_lsn']:,}: {stop['reason']}; the next start "
                     "cuts what was written after it")
    if st.get("torn_tail"):
        lines.append(f"torn tail: {st['torn_tail']}; the next start cuts it (what a crash leaves, not damage)")
    lost = st.get("lost")
    if lost:
        lines.append(f"lost: LSNs {lost['first_lsn']:,} to {lost['last_lsn']:,} were committed (HEAD says so) but "
                     "the log's data ends before them: never fsynced (fsync \"os\"), a crash lost or tore them; the "
                     "next start never hands them out again")
    # Status reads what recovery reads, so sealed segments go unchecked: say so, or a clean-looking status
    # passes for a clean log while a sealed segment is damaged.
    lines.append(f"segments: {st['segments']:,}, {_bytes(st['bytes'])}; status checks the active segment only, "
                 "`walsvc verify` every frame")
    if w in ("running", "stopped"):
        c = st.get("counters", {})
        lines.append(f"appended: {c.get('records', 0):,} records in {c.get('batches', 0):,} batches since start"
                     + _rate(c, (before or {}).get("counters"), "records", interval))
        lines.append(f"fsyncs: {st['fsyncs']:,}; latency {_latency(st.get('fsync_latency', {}))}")
        lines.append(f"append to ack: {_latency(st.get('append_to_ack_latency', {}))}")
        lines.append(f"producers: {st['producers']:,} known; duplicates resent {c.get('duplicates', 0):,}")
        rejected = {k: v for k, v in st.get("rejected", {}).items() if v}
        lines.append("rejected: " + (", ".join(f"{k} {v:,}" for k, v in sorted(rejected.items())) or "none"))
        lines.append(f"retention: {st['segments_deleted']:,} segments deleted")
        rec = st.get("recovery")
        if rec:
            lines.append(f"recovery at start: {rec}")
    cursors = st.get("cursors") or {}
    if cursors:
        lines.append("cursors:")
        for name, cur in sorted(cursors.items()):
            lines.append(f"  {name}: at LSN {cur['lsn']:,}, {cur['lag_records']:,} records behind")
    else:
        lines.append("cursors: none")
    for name, group in sorted((st.get("groups") or {}).items()):
        lines.append(f"group {name}: at LSN {group['position']:,}, {group['lag_records']:,} records behind, "
                     f"{len(group['consumers'])} consumers, {group['leases']} ranges out, "
                     f"{group['redelivered_records']:,} records redelivered")
    for name, m in sorted((st.get("mirrors") or {}).items()):
        lines.append(f"mirror {name}: " + ", ".join(f"{k} {_n(v)}" for k, v in m.items() if not isinstance(v, dict)))
    return "\n".join(lines)
