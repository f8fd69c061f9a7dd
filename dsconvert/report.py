"""Report helpers shared by every command: peak RSS, the command line, environment facts."""

from __future__ import annotations

import platform
import resource
import sys

from . import __version__


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss`` is KiB on Linux)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru if sys.platform == "darwin" else ru * 1024)


def current_rss_bytes() -> int:
    """Current resident set size in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def base_report(command: str) -> dict:
    """Fields every JSON report starts with."""
    return {
        "tool": "dsconvert",
        "version": __version__,
        "command": command,
        "argv": list(sys.argv),
        "python": platform.python_version(),
    }
