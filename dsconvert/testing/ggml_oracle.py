"""llama.cpp's own quantizers as a test oracle, through ctypes on the ggml shared library that ships
inside the ``llama_cpp`` (llama-cpp-python) package.

Only test and bench code imports this module. It exposes two calls of ``include/ggml.h``:

* ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` (single threaded; calls
  ``ggml_quantize_init`` itself; with ``imatrix == NULL`` the K-quants run ``quantize_row_*_ref``);
* ``ggml_get_type_traits(type)->to_float`` (``dequantize_row_*``).

:func:`load` returns ``None`` when llama_cpp is not importable or its library lacks the symbols, so
callers can skip cleanly.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from ..quant.ggml.native import TypeTraits as _TypeTraits


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGMLOracle:
    """Thin wrapper over the loaded ``libggml-base`` library."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        from ..quant.ggml.native import bind_quantize

        self.lib = lib
        self.path = path
        bind_quantize(lib)
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def type_size(self, ggml_type: int) -> tuple[int, int]:
        t = self.lib.ggml_get_type_traits(int(ggml_type)).contents
        return int(t.blck_size), int(t.type_size)

    def quantize(self, x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        """``x`` float32 ``[rows, n_per_row]`` -> uint8 ``[rows, row_bytes]`` via ``ggml_quantize_chunk``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        bs, ts = self.type_size(ggml_type)
        out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
        im = None
        if imatrix is not None:
            im = np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_init(int(ggml_type))
        written = self.lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                               None if im is None else im.ctypes.data)
        assert written == out.nbytes, (written, out.nbytes)
        return out

    def dequantize(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
        """uint8 rows -> float32 ``shape`` via the type's ``to_float`` (``dequantize_row_*``)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.zeros(shape, dtype=np.float32)
        fn = self.lib.ggml_get_type_traits(int(ggml_type)).contents.to_float
        if not fn:  # F32 has no to_float
            return raw.view(np.float32).reshape(shape).copy()
        _TO_FLOAT(fn)(raw.ctypes.data, out.ctypes.data, out.size)
        return out


@functools.lru_cache(maxsize=1)
def load() -> GGMLOracle | None:
    """Load llama.cpp's ggml (where :func:`dsconvert.quant.ggml.native.library_candidates` finds it: an installed
    llama_cpp package, or ``$DSCONVERT_GGML_LIB``), or ``None`` if unavailable."""
    from ..quant.ggml.native import library_candidates

    for p in library_candidates():
        if not p.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(p))
            lib.ggml_quantize_chunk  # noqa: B018  (symbol check)
            lib.ggml_get_type_traits  # noqa: B018
        except (OSError, AttributeError):
            continue
        return GGMLOracle(lib, p)
    return None
