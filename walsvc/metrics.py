"""Counters, latency histograms and events the writer reports in `walsvc status` and to Prometheus.

A histogram keeps two things, both cheap to record on every fsync and every ack:
- power-of-two microsecond buckets since start (one int.bit_length() and one list increment), which is what
  Prometheus wants (cumulative counts per upper bound; it computes quantiles itself);
- the last WINDOW samples in a ring, so that status shows real p50/p99 of recent samples, not bucket bounds.

Events are the things an operator wants to hear about (a segment rolled, a slow fsync, retention deleted
segments, a new producer, the log stopped, corruption found).  Each is logged as one logfmt line on the
`walsvc.events` logger (`event=NAME key=value ...`) and counted, every name present from the start at 0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

WINDOW = 4096
SLOW_US = 1 << 20  # an fsync of 2^20 µs (~1.05 s) or more is a `slow_fsync` event

EVENTS = ("segment_rolled", "slow_fsync", "retention_deleted", "producer_connected", "log_stopped",
          "corruption_found", "metrics_error", "writer_stopped")
COUNTERS = ("batches", "records", "duplicates")
REJECT_CODES = ("malformed", "too_large", "unknown_version", "out_of_sequence", "log_stopped")
_WARN_EVENTS = {"slow_fsync", "log_stopped", "corruption_found", "metrics_error"}

events_log = logging.getLogger("walsvc.events")


class Histogram:
    """Latency distribution in microseconds: buckets [2^(i-1), 2^i) since start, plus a window of samples."""

    def __init__(self) -> None:
        self.buckets = [0] * 40
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0
        self._ring = [0.0] * WINDOW
        self._next = 0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        self.buckets[min(int(us).bit_length(), 39)] += 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us
        self._ring[self._next] = us
        self._next = (self._next + 1) % WINDOW

    def window(self) -> list[float]:
        """The most recent samples (up to WINDOW), sorted."""
        return sorted(self._ring[:min(self.count, WINDOW)])

    def quantile(self, q: float) -> float | None:
        """The q-th quantile (µs) of the recent samples (nearest rank); None when there are none."""
        return _rank(self.window(), q)

    def slow_count(self) -> int:
        """Samples of SLOW_US or more since start."""
        return sum(self.buckets[SLOW_US.bit_length():])

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, samples at or below it) per bucket up to the last non-empty one."""
        out, seen = [], 0
        last = max((i for i, n in enumerate(self.buckets) if n), default=-1)
        for i in range(last + 1):
            seen += self.buckets[i]
            out.append(((1 << i) / 1e6, seen))
        return out

    def summary(self) -> dict[str, Any]:
        samples = self.window()
        p50, p99 = _rank(samples, 0.5), _rank(samples, 0.99)
        return {"count": self.count, "mean_us": round(self.total_us / self.count, 1) if self.count else None,
                "p50_us": None if p50 is None else round(p50, 1), "p99_us": None if p99 is None else round(p99, 1),
                "max_us": round(self.max_us, 1) if self.count else None,
                "window": len(samples), "slow": self.slow_count(), "sum_us": round(self.total_us, 1),
                "buckets": [[round(b * 1e6), n] for b, n in self.cumulative()]}


class Metrics:
    """The writer's counters, rejections per nack code, events, and the append-to-ack histogram."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.rejected: Counter[str] = Counter({code: 0 for code in REJECT_CODES})
        self.events: Counter[str] = Counter({name: 0 for name in EVENTS})
        self.append_to_ack = Histogram()

    def event(self, name: str, **fields: Any) -> None:
        """Count the event and log it as one logfmt line."""
        self.events[name] += 1
        text = " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        events_log.log(logging.WARNING if name in _WARN_EVENTS else logging.INFO, "event=%s %s", name, text)

    def as_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "rejected": dict(self.rejected), "events": dict(self.events),
                "append_to_ack_latency": self.append_to_ack.summary()}


def _rank(samples: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted samples."""
    if not samples:
        return None
    return samples[min(len(samples) - 1, max(0, math.ceil(q * len(samples)) - 1))]


def _logfmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text
