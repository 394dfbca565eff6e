"""Counters and latency histograms the writer reports in `walsvc status`.

Histograms use power-of-two microsecond buckets: recording is one int.bit_length() and one list increment,
cheap enough to run on every fsync and every commit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Histogram:
    """Latency distribution in microseconds, buckets [2^(i-1), 2^i)."""

    def __init__(self) -> None:
        self.buckets = [0] * 40
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        self.buckets[min(int(us).bit_length(), 39)] += 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    def quantile(self, q: float) -> float:
        """Upper bound (µs) of the bucket holding the q-th quantile; 0 when empty."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return float(min(1 << i, self.max_us)) if i else 1.0
        return self.max_us

    def summary(self) -> dict[str, float]:
        return {"count": self.count, "mean_us": round(self.total_us / self.count, 1) if self.count else 0.0,
                "p50_us": self.quantile(0.5), "p99_us": self.quantile(0.99), "max_us": round(self.max_us, 1)}


class Metrics:
    """The writer's counters: accepted and rejected input, and latency histograms."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.append_to_ack = Histogram()

    def as_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "rejected": dict(self.rejected),
                "append_to_ack_latency": self.append_to_ack.summary()}
