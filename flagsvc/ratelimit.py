"""Writes per token: a token bucket in each worker process, so that one operator or admin token
(a runaway script, a leaked token) cannot keep a worker busy with writes: the control listener
must stay free for the kill that matters.

A write beyond the budget is answered ``429`` with ``Retry-After``, after a pause (at most
:data:`TARPIT_SECONDS`): a client that retries at once is slowed to a pace that costs nothing,
rather than made faster by a cheap refusal. The pause is a sleep: a greenlet under gevent.
"""

from __future__ import annotations

import math
import threading
import time

#: The longest a refused write is held before its 429 is sent.
TARPIT_SECONDS = 1.0


class WriteBudget:
    """``rate`` writes per second per token, in bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # token id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, token_id: str) -> float:
        """Spend one write of ``token_id``: 0 if it may go on, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(token_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[token_id] = (tokens - 1, now)
                return 0.0
            self._buckets[token_id] = (tokens, now)
            return (1 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """``Retry-After`` for a wait of ``wait`` seconds (whole seconds, at least 1)."""
        return max(1, math.ceil(wait))

    @staticmethod
    def tarpit(wait: float) -> None:
        """Hold a refused write a while before answering."""
        time.sleep(min(wait, TARPIT_SECONDS))
