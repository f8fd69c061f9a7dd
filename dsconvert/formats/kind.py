"""What kind of checkpoint a path holds, from ``config.json`` (or a GGUF's magic) alone, and the refusal a
command gives when it is handed the wrong kind.

One place for this question, so that every command answers it the same way: ``fp8-to-bf16`` needs DeepSeek's
block-FP8 release, ``quantize`` and ``gguf`` need that release or an unquantized (BF16) checkpoint, ``inspect``
and ``validate`` take anything. The kinds (docs/checkpoint-layout.md §1 for the FP8 layout, docs/int-formats.md
for the INT formats, docs/gguf-deepseek2.md for GGUF):

========  ====================================================================================================
kind      recognised by
========  ====================================================================================================
fp8       ``quantization_config.quant_method == "fp8"`` (DeepSeek's F8_E4M3 weights + ``weight_scale_inv``)
float     no ``quantization_config`` (BF16/F16/F32 weights)
int       a ``quantization_config`` one of the registered INT formats claims (compressed-tensors pack-quantized,
          AutoAWQ GEMM, GPTQ v1/v2); its bits, group size and symmetry come from that format's parser
gguf      a file starting with the ``GGUF`` magic (or named ``*.gguf``), or a folder of ``*.gguf`` files
          without ``config.json``
other     any other ``quantization_config`` (bitsandbytes, FP4, ...)
unknown   nothing readable: no such path, no ``config.json``, invalid JSON (the command's own reader reports
          it with its precise message)
========  ====================================================================================================

Reads at most ``config.json`` and 4 bytes of a file; never raises for what it finds.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DsconvertError, UnsupportedError

__all__ = ["CheckpointKind", "checkpoint_kind", "require_kind", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class CheckpointKind:
    """The answer of :func:`checkpoint_kind`.

    Attributes:
        kind: ``fp8`` | ``float`` | ``int`` | ``gguf`` | ``other`` | ``unknown`` (table in the module docstring).
        format: canonical format name for ``int`` (``compressed-tensors``, ``autoawq``, ``gptq``, ``gptq_v2``),
            ``gguf`` for GGUF, None otherwise.
        scheme: the quantize scheme name an ``int`` checkpoint matches (``W4A16``, ``W4A16_ASYM``, ``W8A16``),
            or None (no registered scheme has its bits and symmetry, or the config could not be parsed).
        bits, group_size, symmetric: of the ``int`` weights (``group_size`` -1 = per channel); None otherwise.
        dtype: ``torch_dtype`` of a ``float`` checkpoint as config.json states it, or None.
        quant_method: ``quantization_config.quant_method`` as written, or None.
    """

    kind: str
    format: str | None = None
    scheme: str | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    dtype: str | None = None
    quant_method: str | None = None

    def describe(self) -> str:
        """A noun phrase for messages: ``"an INT4 autoawq checkpoint (W4A16_ASYM, group size 32, asymmetric)"``."""
        if self.kind == "fp8":
            return "DeepSeek's block-FP8 release layout (F8_E4M3 weights with weight_scale_inv)"
        if self.kind == "float":
            return f"an unquantized {(self.dtype or 'float').upper().replace('BFLOAT16', 'BF16')} checkpoint"
        if self.kind == "int":
            if self.bits is None:
                return f"a {self.format} INT checkpoint"
            detail = [self.scheme] if self.scheme else []
            detail.append("per channel" if self.group_size == -1 else f"group size {self.group_size}")
            detail.append("symmetric" if self.symmetric else "asymmetric")
            return f"an INT{self.bits} {self.format} checkpoint ({', '.join(detail)})"
        if self.kind == "gguf":
            return "a GGUF file"
        if self.kind == "other":
            return "a checkpoint quantized in a layout dsconvert does not read"
        return "not a checkpoint dsconvert recognises"

    def to_dict(self) -> dict:
        """JSON form (``inspect`` reports it as ``kind``)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_gguf_file(p: Path) -> bool:
    if p.suffix == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _int_kind(qc: dict) -> CheckpointKind | None:
    from ..quant.schemes import SCHEMES
    from .registry import detect_format

    try:
        fmt = detect_format(qc)
    except ValueError:
        return None
    if fmt is None or not hasattr(fmt, "spec_from_config"):
        return None
    qm = str(qc.get("quant_method"))
    try:
        spec = fmt.spec_from_config(qc)
    except (DsconvertError, KeyError, TypeError, ValueError):
        return CheckpointKind("int", format=fmt.name, quant_method=qm)
    scheme = next((n for n, cls in SCHEMES.items() if cls.bits == spec.bits and cls.symmetric == spec.symmetric),
                  None)
    return CheckpointKind("int", format=fmt.name, scheme=scheme, bits=spec.bits, group_size=spec.group_size,
                          symmetric=spec.symmetric, quant_method=qm)


def checkpoint_kind(path: str | os.PathLike) -> CheckpointKind:
    """Classify ``path`` (a checkpoint directory, a GGUF file, or a folder of GGUF files); see the module table.

    Never raises: anything unreadable is ``unknown`` and left to the command's reader to report precisely.
    """
    p = Path(path)
    if p.is_file():
        return CheckpointKind("gguf", format="gguf") if _is_gguf_file(p) else CheckpointKind("unknown")
    if not p.is_dir():
        # a split set named without its -0000i-of-0000N suffix, or any *.gguf path that does not exist
        return CheckpointKind("unknown")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        if any(p.glob("*.gguf")):
            return CheckpointKind("gguf", format="gguf")
        return CheckpointKind("unknown")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return CheckpointKind("unknown")
    if not isinstance(cfg, dict):
        return CheckpointKind("unknown")
    qc = cfg.get("quantization_config")
    if not qc:
        dtype = cfg.get("torch_dtype") or cfg.get("dtype")
        return CheckpointKind("float", dtype=str(dtype) if dtype else None)
    if not isinstance(qc, dict):
        return CheckpointKind("other", quant_method=repr(qc))
    qm = qc.get("quant_method")
    if qm == "fp8":
        return CheckpointKind("fp8", quant_method="fp8")
    return _int_kind(qc) or CheckpointKind("other", quant_method=str(qm))


def require_kind(path: str | os.PathLike, command: str, accept: Iterable[str], needs: str,
                 hints: dict[str, str]) -> CheckpointKind:
    """Refuse, before anything is read or written, a ``path`` whose kind ``command`` cannot take.

    Args:
        path: the command's SRC.
        command: ``"fp8-to-bf16"``, for the message.
        accept: the kinds the command takes; ``unknown`` is always let through (the reader's own error is the
            precise one).
        needs: noun phrase of what the command takes (``"DeepSeek's FP8 release or a BF16 checkpoint"``).
        hints: kind -> what to do instead.

    Returns:
        The kind found.

    Raises:
        UnsupportedError (exit 3): ``"SRC: is an INT4 autoawq checkpoint (...); gguf needs ..."``.
    """
    k = checkpoint_kind(path)
    if k.kind == "unknown" or k.kind in set(accept):
        return k
    what = k.describe()
    if k.kind in ("int", "other"):
        what += f" (config.json quantization_config.quant_method {k.quant_method!r})"
    verb = "holds" if k.kind == "fp8" else "is"
    raise UnsupportedError(f"{path}: {verb} {what}; {command} needs {needs}", hint=hints.get(k.kind))
