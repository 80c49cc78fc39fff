"""The polling data source: the snapshot every ``poll_interval`` seconds, with ``If-None-Match``."""

from __future__ import annotations

from ._datasource import DataSource


class PollingSource(DataSource):
    """Polls over one keep-alive connection; after a failure, polls again as the backoff says."""

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._guarded(self._poll, "while polling"):
                self._backoff.reset()
                delay = self.poll_interval
            else:
                delay = self._backoff.next_delay()
            self._stop.wait(delay)
