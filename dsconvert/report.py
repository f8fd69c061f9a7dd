"""Report helpers shared by every command: peak RSS, the command line, environment facts."""

from __future__ import annotations

import platform
import resource
import sys

from . import __version__


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: ``VmHWM`` from /proc/self/status (reset at exec). ``ru_maxrss`` is not used there because it keeps the
    high-water mark of the parent across fork+exec, so a CLI run from a big process would report the parent's
    peak. Elsewhere: ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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
