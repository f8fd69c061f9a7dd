"""Registry and row/chunk driver for the GGML block types.

A subclass of :class:`GGMLType` declares its ``gguf.GGMLQuantizationType`` in the class statement
(``class Q4_K(GGMLType, qtype=GGMLQuantizationType.Q4_K)``); ``block_size`` and ``type_size`` are
then read from ``gguf.GGML_QUANT_SIZES`` and the class registers itself under its name. A subclass
implements only :meth:`GGMLType.quantize_blocks` and :meth:`GGMLType.dequantize_blocks` on
``(n_blocks, block_size)`` / ``(n_blocks, type_size)`` tensors; :meth:`GGMLType.quantize` and
:meth:`GGMLType.dequantize` handle rows, dtype, devices and memory-bounded chunking.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ._ops import div, seqsum

#: Default bound on the float32 input processed at once by :meth:`GGMLType.quantize` (64 MiB).
MAX_CHUNK_BYTES = 64 << 20

_REGISTRY: dict[str, type[GGMLType]] = {}


def _norm(name: str) -> str:
    return name.strip().upper().replace("-", "").replace("_", "")


class GGMLType:
    """One GGML tensor type: block geometry plus exact block (de)quantizers.

    Class attributes (set automatically from ``gguf``):
        name: canonical ggml name, e.g. ``"Q4_K"``.
        ggml_type: the ``gguf.GGMLQuantizationType`` member.
        block_size: elements per block (32 for legacy types, 256 for K-quants, 1 for F32/F16/BF16).
        type_size: bytes per block.
        supports_imatrix: whether ``quantize(..., imatrix=...)`` is implemented.
        chunk_elems: elements per internal work chunk (bounds temporaries and keeps them cache-sized).
    """

    name: ClassVar[str]
    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    supports_imatrix: ClassVar[bool] = False
    #: imatrix weights ignored by llama.cpp itself (Q8_0, F16, ...): accepted and ignored.
    ignores_imatrix: ClassVar[bool] = False
    #: legacy ``quantize_row_*_impl`` need sum(x^2)/n_per_row of the whole row when an imatrix is given.
    needs_row_sigma2: ClassVar[bool] = False
    chunk_elems: ClassVar[int] = 1 << 20

    def __init__(self) -> None:  # pragma: no cover - classes are used as namespaces
        raise TypeError("GGMLType classes are used through their classmethods, not instances")

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        cls.ggml_type = qtype
        cls.name = qtype.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        key = _norm(cls.name)
        if key in _REGISTRY:
            raise ValueError(f"GGML type {cls.name} registered twice")
        _REGISTRY[key] = cls

    # ---- to implement -------------------------------------------------------------------------

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, qw: torch.Tensor | None = None,
                        sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_blocks, block_size)`` float32 -> ``(n_blocks, type_size)`` uint8.

        ``qw`` is the importance matrix laid out like ``blocks`` (or ``None``); ``sigma2`` is
        ``sum(x^2)/n_per_row`` of each block's row, shape ``(n_blocks,)``, given only to types with
        ``needs_row_sigma2`` when ``qw`` is given.
        """
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """``(n_blocks, type_size)`` uint8 -> ``(n_blocks, block_size)`` float32."""
        raise NotImplementedError

    # ---- row API ------------------------------------------------------------------------------

    @classmethod
    def row_bytes(cls, n_per_row: int) -> int:
        """Bytes of one quantized row of ``n_per_row`` elements (ValueError if not a block multiple)."""
        cls._check_row(n_per_row)
        return n_per_row // cls.block_size * cls.type_size

    @classmethod
    def _check_row(cls, n_per_row: int) -> None:
        if n_per_row <= 0 or n_per_row % cls.block_size:
            raise ValueError(f"{cls.name}: n_per_row={n_per_row} is not a positive multiple of the block size "
                             f"{cls.block_size}")

    @classmethod
    def quantize(cls, x: torch.Tensor, imatrix: torch.Tensor | None = None, *,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> torch.Tensor:
        """Quantize rows exactly like llama.cpp's ``ggml_quantize_chunk``.

        Args:
            x: ``[..., n_per_row]`` floating tensor (converted to float32), on any device.
            imatrix: optional ``[n_per_row]`` importance weights (``quant_weights`` in llama.cpp).
            max_chunk_bytes: upper bound on the float32 input handled at once (whole rows, at least one).

        Returns:
            ``[..., n_per_row // block_size * type_size]`` uint8 on ``x``'s device.

        Raises:
            ValueError: ``n_per_row`` is not a multiple of ``block_size``, or ``imatrix`` has the wrong shape.
            NotImplementedError: an imatrix was given for a type without imatrix support here.
        """
        if x.dim() == 0:
            raise ValueError(f"{cls.name}: cannot quantize a 0-d tensor")
        n = x.shape[-1]
        rb = cls.row_bytes(n)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        rows = x2.shape[0]
        if imatrix is not None:
            if cls.ignores_imatrix:
                imatrix = None
            elif not cls.supports_imatrix:
                raise NotImplementedError(f"{cls.name}: quantization with an imatrix is not implemented")
            else:
                imatrix = imatrix.to(device=x.device, dtype=torch.float32).reshape(-1)
                if imatrix.numel() != n:
                    raise ValueError(f"{cls.name}: imatrix has {imatrix.numel()} values, rows have {n}")
        out = torch.empty((rows, rb), dtype=torch.uint8, device=x.device)
        nb = n // cls.block_size
        step = max(1, min(max_chunk_bytes // 4, cls.chunk_elems) // n)
        for r0 in range(0, rows, step):
            xc = x2[r0:r0 + step].to(torch.float32)
            nr = xc.shape[0]
            qw = sig = None
            if imatrix is not None:
                qw = imatrix.view(1, n).expand(nr, n).reshape(nr * nb, cls.block_size)
                if cls.needs_row_sigma2:
                    # float sum_x2 = 0; for (j < n_per_row) sum_x2 += x[j]*x[j]; sigma2 = sum_x2/n_per_row
                    xt = xc.t().contiguous()
                    sig = div(seqsum(xt * xt), n).repeat_interleave(nb)
            out[r0:r0 + nr] = cls.quantize_blocks(xc.reshape(nr * nb, cls.block_size).contiguous(), qw, sig) \
                .view(nr, rb)
        return out.view(*lead, rb)

    @classmethod
    def dequantize(cls, raw: torch.Tensor, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """Inverse of :meth:`quantize` (``dequantize_row_*`` in ggml-quants.c).

        Args:
            raw: uint8 ``[..., row_bytes]`` (any integer dtype of byte size is viewed as uint8).
            shape: float shape ``[..., n_per_row]``; default derives ``n_per_row`` from ``row_bytes``.

        Returns:
            float32 tensor of ``shape`` on ``raw``'s device.

        Raises:
            ValueError: the byte count does not match ``shape``.
        """
        if raw.dtype != torch.uint8:
            raw = raw.contiguous().view(torch.uint8)
        rb = raw.shape[-1]
        if rb % cls.type_size:
            raise ValueError(f"{cls.name}: row of {rb} bytes is not a multiple of the block size {cls.type_size}")
        if shape is None:
            shape = (*raw.shape[:-1], rb // cls.type_size * cls.block_size)
        shape = tuple(int(s) for s in shape)
        n_el = 1
        for s in shape:
            n_el *= s
        if n_el % cls.block_size or raw.numel() != n_el // cls.block_size * cls.type_size:
            raise ValueError(f"{cls.name}: {raw.numel()} bytes do not hold a tensor of shape {shape}")
        blocks = raw.reshape(-1, cls.type_size)
        out = torch.empty((blocks.shape[0], cls.block_size), dtype=torch.float32, device=raw.device)
        step = max(1, cls.chunk_elems // cls.block_size)
        for b0 in range(0, blocks.shape[0], step):
            out[b0:b0 + step] = cls.dequantize_blocks(blocks[b0:b0 + step].contiguous())
        return out.view(shape)


def get_type(name: str | int | GGMLQuantizationType) -> type[GGMLType]:
    """Look up a registered type by name (case, ``-`` and ``_`` ignored: ``"q4_k"``, ``"Q4K"``) or enum.

    Raises:
        KeyError: unknown name; the message lists the registered names.
    """
    if isinstance(name, (GGMLQuantizationType, int)) and not isinstance(name, bool):
        try:
            name = GGMLQuantizationType(int(name)).name
        except ValueError:
            raise KeyError(f"unknown GGML type {name!r}; choices: {', '.join(registered_types())}") from None
    cls = _REGISTRY.get(_norm(str(name)))
    if cls is None:
        raise KeyError(f"unknown GGML type {name!r}; choices: {', '.join(registered_types())}")
    return cls


def registered_types() -> list[str]:
    """Canonical names of all registered types, in ``GGMLQuantizationType`` order."""
    return [c.name for c in sorted(_REGISTRY.values(), key=lambda c: int(c.ggml_type))]
