"""Command-line hints for the fixes the lower layers name.

:mod:`dsconvert.quant` raises errors that state what is wrong with a tensor or a request in the kernel's own
terms and name the fix as a ``remedy`` key (:class:`dsconvert.errors.DsconvertError`). This module is the one
place that words those fixes with the flags of ``dsconvert quantize`` / ``validate``.
"""

from __future__ import annotations

from ..errors import DsconvertError

#: remedy key -> hint template (``str.format`` over the error's ``facts``).
HINTS: dict[str, str] = {
    "keep-module": "--ignore this module (keep it BF16) or choose an integer scheme for it with --scheme-for",
    "smaller-group": "use --group-size {group_size}, or --ignore this layer to keep it unquantized",
    "per-channel": "use per-channel (--group-size -1), or --ignore this layer to keep it unquantized",
    "positive-group": "use a positive --group-size, e.g. 128, or -1 for per-channel",
    "group-or-w8a16": "use a positive --group-size, e.g. 128, or scheme W8A16",
    "drop-group-size": "drop --group-size",
    "drop-group-size-or-grouped": "drop --group-size (or pass -1), or use a group-wise scheme such as W8A16",
    "drop-scale-fmt": "drop --scale-fmt; --scale-fmt ue8m0 applies to FP8_BLOCK (power-of-two FP8 block scales)",
    "scale-fmt-values": "use --scale-fmt ue8m0 (power-of-two scales), or leave it out (amax / 448)",
    "bits": "use --scheme W4A16 or W8A16 (4 or 8 bits)",
    "float-format": "use --format compressed-tensors, or an integer scheme (W4A16, W8A16) for awq/gptq",
    "check-calibration": "the calibration activations likely hold NaN/inf: check --calib-data, or --ignore this "
                         "module",
    "calibrate-fp32": "the calibration activations overflowed: check --calib-data, or --ignore this module",
    "static-groups": "GPTQ with activation order needs static groups (llm-compressor actorder 'static')",
    "requantize": "the candidate checkpoint is incomplete; re-run dsconvert quantize",
    "weight-only": "validate the weights alone with a weight-only scheme",
}


def add_hint(e: DsconvertError) -> DsconvertError:
    """Give ``e`` the command-line hint of its ``remedy`` when it has none; returns ``e``.

    Raises:
        KeyError: a remedy key missing from :data:`HINTS` (a bug: every key raised must be worded here).
    """
    if e.hint is None and e.remedy is not None:
        e.hint = HINTS[e.remedy].format(**e.facts)
    return e
