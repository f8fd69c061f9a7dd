"""One process-wide cancellation token for the writing commands (SIGINT / SIGTERM).

The CLI's signal handler calls :func:`request` with the signal number; every thread that reads, computes,
writes or commits (the producer threads of :mod:`.pipeline`, the shard workers, the commit thread, the GGUF
writer) calls :func:`check` between chunks and stops with :class:`Cancelled`. Whatever is in flight is
aborted (its ``.tmp`` deleted, or for a GGUF file kept with its resume sidecar); whatever was committed stays,
so rerunning the same command resumes.

The token is a :class:`threading.Event`, so any thread may test it; only the main thread receives signals
(Python runs signal handlers there), which is why the handler sets the token *and* raises in the main thread.
"""

from __future__ import annotations

import signal
import threading

_event = threading.Event()
_signum: list[int] = []


class Cancelled(BaseException):
    """The run was cancelled (a signal, or another thread's failure). A ``BaseException`` so that no
    ``except Exception`` on the way turns it into an ordinary error.

    Attributes:
        signum: the signal that cancelled the run, or None.
    """

    def __init__(self, signum: int | None = None):
        super().__init__(f"cancelled by {signal.Signals(signum).name}" if signum else "cancelled")
        self.signum = signum


def request(signum: int | None = None) -> None:
    """Ask every thread to stop; the first signal number is kept for the exit code."""
    if signum is not None and not _signum:
        _signum.append(signum)
    _event.set()


def requested() -> bool:
    """True once cancellation was requested."""
    return _event.is_set()


def signum() -> int | None:
    """The signal that requested cancellation, or None."""
    return _signum[0] if _signum else None


def check() -> None:
    """Raise :class:`Cancelled` if cancellation was requested (call between chunks)."""
    if _event.is_set():
        raise Cancelled(signum())


def event() -> threading.Event:
    """The underlying event (for ``wait(timeout)`` loops)."""
    return _event


def reset() -> None:
    """Clear the token (tests running several commands in one process)."""
    _event.clear()
    _signum.clear()


def wait_all(futures: list, poll_s: float = 0.25) -> None:
    """Wait for every future, raising the first failure as soon as it happens and :class:`Cancelled` within
    ``poll_s`` seconds of a request (the futures left running are the caller's to cancel).

    Raises:
        Cancelled: a cancellation was requested while waiting.
        BaseException: the first exception a future raised.
    """
    from concurrent.futures import FIRST_EXCEPTION, wait

    while True:
        done, not_done = wait(futures, timeout=poll_s, return_when=FIRST_EXCEPTION)
        for f in done:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()
        if not not_done:
            return
        check()
