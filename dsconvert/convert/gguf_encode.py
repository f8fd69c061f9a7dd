"""GGUF tensor data at the lowest level: a checkpoint tensor's rows as float (:func:`rows`) and rows as ggml
type bytes (:func:`encode`). Shared by the exporter (:mod:`.gguf_export`) and the ``--target-size`` sensitivity
(:mod:`.gguf_sensitivity`), which must quantize exactly as the export does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from ..errors import UnsupportedError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_io import read_tensor
from ..quant import ggml
from . import cancel
from .pipeline import dequant_producer

if TYPE_CHECKING:
    from ..quant.ggml.native import NativeGGML


def rows(ck: Checkpoint, name: str, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """HF tensor ``name`` in row chunks of about ``chunk_bytes``: FP8 (+ scale) -> the exact float32 product by
    fp8-to-bf16's own producer; other dtypes as stored. 1-D tensors in one piece."""
    ent = ck.entry(name)
    if ent.dtype == "F8_E4M3":
        yield from dequant_producer(ck, name, torch.float32, torch.device("cpu"), chunk_bytes)()
        return
    if ent.dtype not in ("BF16", "F16", "F32"):
        raise UnsupportedError(f"{name}: dtype {ent.dtype} cannot go into a GGUF",
                               hint="only F8_E4M3 (+ scale), BF16, F16 and F32 tensors are converted")
    if len(ent.shape) < 2:
        yield ck.read(name)
        return
    m = ent.shape[0]
    rows = max(1, chunk_bytes // max(1, 4 * (ent.numel // max(1, m))))
    with open(ck.path_of(name), "rb") as f:
        for r0 in range(0, m, rows):
            yield read_tensor(f, ent, (r0, min(m, r0 + rows)))


#: Rows quantized between two cancellation checks on the CPU: this many of the type's work chunks
#: (``GGMLType.chunk_elems``: 2^16 elements for IQ1, 2^20 for the legacy types) per thread.
PIECE_CHUNKS = 4


def encode(x: torch.Tensor, qtype: str, device: torch.device, importance: np.ndarray | None = None,
           native: "NativeGGML | None" = None, threads: int = 1) -> np.ndarray:
    """Rows of ``x`` (bf16/f16/f32, ``[..., ne0]``) as ggml type ``qtype`` bytes (uint8, C order).

    BF16 output is the input rounded once to bf16 (RNE; bf16 input copied bit for bit); everything else is
    quantized from float32, with the
    importance weights ``importance`` (float32 ``[ne0]``, every row) when given: by ``native`` (ggml's
    ``ggml_quantize_chunk``, ``threads`` threads) when given and it offers the type, else by the torch kernels
    of :mod:`dsconvert.quant.ggml` on ``device``.
    """
    if qtype == "BF16" and x.dtype in (torch.bfloat16, torch.float32):
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().reshape(-1)
    if qtype == "F32":
        return x.to(torch.float32).contiguous().view(torch.uint8).numpy().reshape(-1)
    gt = ggml.get_type(qtype)
    x2 = x.reshape(-1, x.shape[-1])
    use_native = native is not None and native.supports(qtype, importance is not None)
    if device.type != "cpu" and not use_native:
        qw = None if importance is None else torch.from_numpy(np.ascontiguousarray(importance, np.float32))
        return gt.quantize(x2.to(device=device, dtype=torch.float32), qw).cpu().numpy().reshape(-1)
    # on the CPU in pieces of rows, with a cancellation check between them: a SIGINT waits for one piece
    # (PIECE_CHUNKS of the type's work chunks per thread, sized by its speed), not for a whole chunk
    rows = max(1, gt.chunk_elems * PIECE_CHUNKS * max(1, threads) // x2.shape[1])
    qw = None if importance is None or use_native else torch.from_numpy(np.ascontiguousarray(importance, np.float32))
    out = []
    for r0 in range(0, x2.shape[0], rows):
        if r0:
            cancel.check()
        xp = x2[r0:r0 + rows].to(torch.float32).contiguous()
        out.append(native.quantize(xp.numpy(), qtype, importance, threads) if use_native
                   else gt.quantize(xp, qw).numpy())
    return (out[0] if len(out) == 1 else np.concatenate(out)).reshape(-1)
