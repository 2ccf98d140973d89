"""The paper's I/O cost model on a probed volume: time = requests x latency(request size).

From a `profiles.Profile`, per thread count, the time one request of size s takes on average
when `threads` of them are in flight is s / throughput(s). Measured tables are noisy, so the
model makes them physically consistent before use: a larger request never takes less time
(latency is non-decreasing in size) and never reads slower per byte (a large request can always
be split into smaller ones), and between probed sizes the latency is linear in size (a fixed cost
plus a per-byte cost). Outside the probed range: below, a request costs what the smallest probed
one does; above, time grows with bytes at the largest size's throughput.
"""

from __future__ import annotations

import numpy as np

from ..profiles import Profile


class CostModel:
    """Predict uncached read time from bytes, request count and threads (see module docstring)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.sizes = np.asarray(profile.sizes, dtype=np.float64)
        self.threads = list(profile.threads)
        table = profile.table() * 1e9  # bytes/s, (sizes, threads)
        table = np.maximum.accumulate(table, axis=0)  # splitting: never slower per byte
        latency = self.sizes[:, None] / table
        self.latency = np.maximum.accumulate(latency, axis=0)  # (sizes, threads) seconds

    def _column(self, threads: int) -> int:
        """The probed thread count at or below `threads` (the smallest probed one if none)."""
        below = [j for j, t in enumerate(self.threads) if t <= threads]
        return below[-1] if below else 0

    def request_seconds(self, size: float, threads: int) -> float:
        """Average time one request of `size` bytes costs with `threads` in flight."""
        lat, s = self.latency[:, self._column(threads)], self.sizes
        if size <= s[0]:
            return float(lat[0])
        if size >= s[-1]:
            return float(lat[-1] * size / s[-1])
        return float(np.interp(size, s, lat))

    def throughput(self, size: float, threads: int) -> float:
        """Predicted GB/s (1e9 bytes) of `size`-byte requests with `threads` threads."""
        return size / self.request_seconds(size, threads) / 1e9

    def seconds(self, nbytes: float, requests: float, threads: int) -> float:
        """Predicted time to read `nbytes` in `requests` requests of equal size."""
        if requests <= 0 or nbytes <= 0:
            return 0.0
        return requests * self.request_seconds(nbytes / requests, threads)

    def best_threads(self, size: float) -> int:
        """The probed thread count that reads `size`-byte requests fastest."""
        return self.threads[int(np.argmin([self.request_seconds(size, t) for t in self.threads]))]

    def floor_seconds(self, nbytes: float, requests: float) -> float:
        """The floor: `nbytes` at the volume's best throughput for that request size."""
        if requests <= 0 or nbytes <= 0:
            return 0.0
        size = nbytes / requests
        return self.seconds(nbytes, requests, self.best_threads(size))
