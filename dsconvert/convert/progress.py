"""One rich progress display on stderr: bytes done/total, speed, an ETA weighted by bytes, the current item.

Off when ``enabled`` is False (``-q``, or stderr is not a terminal and no one asked for it). Thread-safe:
workers call ``advance`` from several threads.
"""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)


class ByteProgress:
    """``with ByteProgress(total, "fp8-to-bf16") as p: p.advance(n); p.describe("shard 3/163")``."""

    def __init__(self, total_bytes: int, label: str, *, enabled: bool | None = None, unit: str = "bytes"):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self.total = max(int(total_bytes), 1)
        self.done = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.label = label
        if enabled:
            cols = [TextColumn("[bold]{task.fields[label]}"), BarColumn(), TaskProgressColumn()]
            if unit == "bytes":
                cols += [DownloadColumn(binary_units=False), TransferSpeedColumn()]
            else:
                cols += [TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit)]
            cols += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}")]
            self._p = Progress(*cols, console=Console(stderr=True), transient=False, refresh_per_second=4)
            self._task = self._p.add_task("", total=self.total, label=label)

    def __enter__(self):
        if self.enabled:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.stop()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self.enabled:
            self._p.update(self._task, advance=n)

    def describe(self, text: str) -> None:
        if self.enabled:
            self._p.update(self._task, description=text)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0
