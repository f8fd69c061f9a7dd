"""Error types shared by every layer, each carrying the process exit code the CLI maps it to.

Exit codes (documented in README.md and ``dsconvert --help``):

====  =====================================================
0     success
1     internal error (a bug: please report it)
2     usage error (bad flag value, conflicting options)
3     bad input or unsupported checkpoint
4     validation failed (metrics outside thresholds)
====  =====================================================

Library code raises these; only :mod:`dsconvert.cli` turns them into messages and exit codes.
No layer calls ``sys.exit``.

The tensor kernels (:mod:`dsconvert.quant`) state facts in their own terms (parameter names such as
``group_size``, never a command-line flag) and name the caller-side fix as a ``remedy`` key with its
parameters; :mod:`dsconvert.convert.remedies` turns the key into the command-line hint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_VALIDATION = 4


class DsconvertError(Exception):
    """Base class. ``hint`` is a one-line remedy printed under the message; ``remedy`` (a key of
    :data:`dsconvert.convert.remedies.HINTS`) and ``facts`` (its parameters) let a layer that knows no
    command-line flags name the fix, which the convert layer words as ``hint``."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None, remedy: str | None = None, **facts):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.remedy = remedy
        self.facts = facts

    def to_dict(self) -> dict:
        """JSON-serialisable form used by ``--json`` error reports."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UsageError(DsconvertError):
    """A request that cannot be satisfied as asked (bad flag value, conflicting options). Exit 2."""

    exit_code = EXIT_USAGE


class BadInputError(DsconvertError):
    """The checkpoint on disk is malformed or inconsistent. Exit 3."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedError(BadInputError):
    """The checkpoint is well-formed but of a kind dsconvert refuses to guess about. Exit 3."""


class ShapeError(UsageError):
    """A requested quantization does not fit a tensor's shape (e.g. group size not dividing in_features N). Exit 2."""


class OutputExistsError(UsageError):
    """The output path exists and is not a resumable dsconvert output. Exit 2."""


class DiskSpaceError(DsconvertError):
    """The output does not fit on its disk (found at pre-flight, before anything is written). Exit 1, the code
    of I/O errors such as a full disk (README exit-code table)."""

    exit_code = EXIT_INTERNAL


class ReportedFailure(DsconvertError):
    """The command ran to the end and its report says the result failed. The CLI prints ``report`` exactly as on
    success (human or ``--json``, and ``--report PATH``), then exits with ``exit_code``."""

    def __init__(self, message: str, report: dict, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.report = report


class ValidationFailed(ReportedFailure):
    """Validation ran and the metrics are outside their thresholds. Exit 4."""

    exit_code = EXIT_VALIDATION


class ProblemsFound(ReportedFailure):
    """``inspect`` or ``verify`` finished and found problems in the checkpoint or output. Exit 3."""

    exit_code = EXIT_BAD_INPUT


class WorkerFailed(DsconvertError):
    """A work unit kept failing on the cluster's workers (a node or process died each time it ran). Exit 1, the
    code of I/O-type failures: the finished units are kept, and rerunning the same command resumes."""

    exit_code = EXIT_INTERNAL
