"""Progress on stderr: bytes done/total, speed, an ETA weighted by bytes, the current shard/file/tensor.

Three modes, chosen by ``enabled`` and whether stderr is a terminal:

* ``bar`` (a terminal): one rich progress line. Its columns fit an 80-column terminal: the label, a short
  bar, percent, bytes done/total, speed and ETA keep their width, and only the current item (a file name)
  shrinks, from the middle (``model-000…-of-000163.safetensors``), so nothing wraps.
* ``lines`` (stderr is a pipe or a file: nohup, CI logs): plain lines such as
  ``fp8-to-bf16: 1.234/15.800 GB (7.8%) 105.2 MB/s eta 0:02:19 | model-00003-of-000163.safetensors``
  at every boundary (:meth:`ByteProgress.describe`: shard, file, layer) and at least every ``interval``
  seconds (10 s) from a ticker thread, so a long computation that advances nothing still shows up.
* ``off`` (``-q``, or ``enabled=False``).

The speed and the ETA count only bytes processed by this run: bytes found already done on a resume are
passed to :meth:`ByteProgress.skip`, which moves "done" without inflating the speed. Thread-safe: workers call
``advance`` from several threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.measure import Measurement
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Column
from rich.text import Text

INTERVAL_S = 10.0


def shorten(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` characters by replacing its middle with ``…`` (a file name keeps its
    start and its ``-of-000163.safetensors`` end)."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    if width == 1:
        return "…"
    tail = (width - 1) // 2
    head = width - 1 - tail
    return text[:head] + "…" + (text[-tail:] if tail else "")


class _Shrinkable:
    """A renderable holding one line of text that takes the width it is given, shortened in the middle."""

    def __init__(self, text: str):
        self.text = text

    def __rich_measure__(self, console, options):
        return Measurement(0, len(self.text))

    def __rich_console__(self, console, options):
        yield Text(shorten(self.text, options.max_width), no_wrap=True, overflow="crop")


class _ItemColumn(ProgressColumn):
    """The current item (``task.description``), the one column that gives way in a narrow terminal."""

    def __init__(self):
        super().__init__(table_column=Column(ratio=1, no_wrap=True, overflow="crop", min_width=0))

    def render(self, task):
        return _Shrinkable(task.description)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _fmt_rate(bps: float) -> str:
    return f"{bps / 1e6:.1f} MB/s" if bps < 1e9 else f"{bps / 1e9:.2f} GB/s"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ByteProgress:
    """``with ByteProgress(total, "fp8-to-bf16") as p: p.advance(n); p.describe("shard 3/163")``.

    Args:
        total_bytes: units of work for the whole run (bytes, or ``unit`` items).
        label: the command name shown first.
        enabled: None = ``bar`` on a terminal, ``lines`` otherwise; False = off; True = on (``bar`` on a
            terminal, ``lines`` otherwise).
        unit: ``"bytes"`` or a plural noun (``"layers"``) for counted work.
        stream: where to write (stderr).
        interval: seconds between ticker lines in ``lines`` mode.
        clock: monotonic seconds (tests inject one).
        width: terminal width for ``bar`` (None: the terminal's).
    """

    def __init__(self, total_bytes: int, label: str, *, enabled: bool | None = None, unit: str = "bytes",
                 stream: TextIO | None = None, interval: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, width: int | None = None, mode: str | None = None):
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if mode is None:
            mode = "off" if enabled is False else ("bar" if tty else "lines")
        self.mode = mode
        self.enabled = mode != "off"
        self.total = max(int(total_bytes), 1)
        self.done = 0
        self.skipped = 0
        self.unit = unit
        self.label = label
        self.item = ""
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._t0 = clock()
        self._last_line = self._t0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if mode == "bar":
            cols: list = [TextColumn("[bold]{task.fields[label]}", table_column=Column(no_wrap=True)),
                          BarColumn(bar_width=10), TaskProgressColumn()]
            if unit == "bytes":
                cols += [DownloadColumn(binary_units=False), TransferSpeedColumn()]
            else:
                cols += [TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit)]
            cols += [TextColumn("eta"), TimeRemainingColumn(), _ItemColumn()]
            console = Console(file=self.stream, stderr=stream is None, width=width,
                              force_terminal=True if stream is not None else None)
            self._p = Progress(*cols, console=console, transient=False, refresh_per_second=4, expand=True)
            self._task = self._p.add_task("", total=self.total, label=label)

    # -- context ------------------------------------------------------------------------------------------
    def __enter__(self):
        if self.mode == "bar":
            self._p.start()
        elif self.mode == "lines" and self.interval > 0:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.mode == "bar":
            self._p.stop()
        elif self.mode == "lines":
            if self._ticker is not None:
                self._ticker.join(timeout=1)
            if exc[0] is None:
                self._emit("done")

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            if self._clock() - self._last_line >= self.interval:
                self._emit()

    # -- updates ------------------------------------------------------------------------------------------
    def advance(self, n: int) -> None:
        """``n`` more units processed by this run."""
        with self._lock:
            self.done += n
        if self.mode == "bar":
            self._p.update(self._task, advance=n)
        elif self.mode == "lines" and self._clock() - self._last_line >= self.interval:
            self._emit()

    def skip(self, n: int) -> None:
        """``n`` units found already done (a resume): counted as done, but not in the speed or the ETA."""
        with self._lock:
            self.done += n
            self.skipped += n
        if self.mode == "bar":
            self._p.update(self._task, advance=n)

    def describe(self, text: str, boundary: bool = True) -> None:
        """The current item (shard, file, ``layer (12/61)``, tensor). In ``lines`` mode a ``boundary`` prints a
        line at once; other descriptions show in the next periodic line."""
        self.item = text
        if self.mode == "bar":
            self._p.update(self._task, description=text)
        elif self.mode == "lines" and boundary:
            self._emit()

    # -- lines mode -----------------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Units per second processed by this run (skipped units excluded), or None before any."""
        el = self._clock() - self._t0
        work = self.done - self.skipped
        return work / el if el > 0 and work > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return max(0.0, (self.total - self.done) / r) if r else None

    def line(self, item: str | None = None) -> str:
        """The plain progress line for the current state."""
        with self._lock:
            done = self.done
        pct = 100.0 * min(done, self.total) / self.total
        r = self.rate()
        if self.unit == "bytes":
            nums = f"{_fmt_bytes(done)}/{_fmt_bytes(self.total)} ({pct:.1f}%) " \
                   f"{_fmt_rate(r) if r else '- MB/s'}"
        else:
            nums = f"{done}/{self.total} {self.unit} ({pct:.1f}%)" + (f" {r:.2f} {self.unit}/s" if r else "")
        item = item if item is not None else self.item
        return f"{self.label}: {nums} eta {_fmt_eta(self.eta())}" + (f" | {item}" if item else "")

    def _emit(self, item: str | None = None) -> None:
        text = self.line(item)
        with self._lock:
            self._last_line = self._clock()
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed pipe must not kill the conversion
                pass

    @property
    def seconds(self) -> float:
        return self._clock() - self._t0
