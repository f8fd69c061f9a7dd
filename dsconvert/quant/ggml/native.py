"""llama.cpp's own block quantizers as a CPU kernel: ``ggml_quantize_chunk`` of the ggml library, over ctypes.

dsconvert's torch quantizers (the other modules of this package) run everywhere torch does, CPU and CUDA, and
give ggml's bytes; on CPU they reach 0.1-1x of llama.cpp's C speed (see the README's bench table). When the ggml
library is on the machine, the ``gguf`` command can hand the block quantization of whole rows to it instead:
the same function ``llama_model_quantize`` (llama-quantize) runs, so the bytes are ggml's by construction and the
speed is llama-quantize's at the same thread count. Nothing else (reading, FP8 decoding, type choice, the
imatrix slicing per expert, the file layout) changes.

Where the library comes from, first match wins:

1. the environment variable ``DSCONVERT_GGML_LIB``: the path of a ``libggml-base`` shared library
   (e.g. ``build/bin/libggml-base.so`` of a llama.cpp build);
2. the ``lib/`` folder of an installed ``llama_cpp`` package (llama-cpp-python ships ``libggml-base``).

The library's ABI is checked before use: ``ggml_get_type_traits`` must report, for every type used, the block
size and bytes per block that ``gguf.GGML_QUANT_SIZES`` lists, else the type is not offered (the torch kernel
is used). ``ggml_quantize_chunk`` is single threaded; :meth:`NativeGGML.quantize` splits the rows over
``threads`` Python threads (ctypes releases the GIL during the call), each writing its own rows, as
``llama_tensor_quantize_impl`` does; the bytes do not depend on the split (every row is quantized on its own).

Source: ``ggml/include/ggml.h`` (``ggml_quantize_chunk``, ``ggml_quantize_requires_imatrix``,
``ggml_get_type_traits``) and ``src/llama-quant.cpp`` (``llama_tensor_quantize_impl``) of llama.cpp.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["ENV_LIB", "NativeGGML", "TypeTraits", "bind_quantize", "library_candidates", "load"]

#: Environment variable naming a ``libggml-base`` shared library to use.
ENV_LIB = "DSCONVERT_GGML_LIB"
_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


class TypeTraits(ctypes.Structure):
    """The leading fields of ``struct ggml_type_traits`` (``include/ggml.h`` of the llama.cpp in
    llama-cpp-python 0.3.36); nothing after ``from_float_ref`` is read."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_candidates() -> list[Path]:
    """Paths to try, in order: ``$DSCONVERT_GGML_LIB`` (alone when set), else ``llama_cpp``'s ``lib/`` folder."""
    env = os.environ.get(ENV_LIB)
    if env:
        return [Path(env)]
    try:
        import importlib.util
        spec = importlib.util.find_spec("llama_cpp")  # found, never imported (importing it loads every backend)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return [libdir / n for n in _NAMES]


def bind_quantize(lib: ctypes.CDLL) -> None:
    """Declare ``size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start,
    int64_t nrows, int64_t n_per_row, const float * imatrix)`` on ``lib`` (``include/ggml.h``)."""
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]


class NativeGGML:
    """The loaded library: which types it quantizes, and :meth:`quantize`."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib = lib
        self.path = path
        bind_quantize(lib)
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        from .base import registered_types  # the block types dsconvert writes (the library may know more)

        self.types = frozenset(n for n in registered_types()
                               if n not in ("F32", "F16", "BF16") and self._abi_matches(GGMLQuantizationType[n]))

    def _abi_matches(self, t: GGMLQuantizationType) -> bool:
        # only types of dsconvert's registry are probed: ggml indexes its traits table without a bounds check
        # in release builds, so a type newer than the library must never reach it
        tr = self.lib.ggml_get_type_traits(int(t)).contents
        name = (tr.type_name or b"").decode("ascii", "replace").upper()
        return bool(tr.is_quantized) and name == t.name and (int(tr.blck_size), int(tr.type_size)) == \
            GGML_QUANT_SIZES[t]

    def requires_imatrix(self, qtype: str) -> bool:
        """Whether ggml aborts on this type without importance weights (IQ2_XXS, IQ2_XS, IQ1_S)."""
        return bool(self.lib.ggml_quantize_requires_imatrix(int(GGMLQuantizationType[qtype])))

    def supports(self, qtype: str, imatrix: bool) -> bool:
        """Whether :meth:`quantize` takes ``qtype`` (with importance weights when ``imatrix``)."""
        return qtype in self.types and (imatrix or not self.requires_imatrix(qtype))

    def _pool(self, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            p = self._pools.get(threads)
            if p is None:
                p = self._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dsconvert-ggml")
            return p

    def quantize(self, x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """Rows of ``x`` (float32 ``[rows, n_per_row]``) as ``qtype`` blocks: uint8 ``[rows, row_bytes]``.

        ``imatrix``: float32 ``[n_per_row]`` importance weights for every row (``quant_weights``), or None.
        ``threads``: rows are split into that many contiguous ranges quantized concurrently.

        Raises:
            ValueError: a type this library does not offer (:meth:`supports`), ``n_per_row`` not a multiple of
                the block size, a wrong-sized imatrix, or no imatrix for a type that needs one (ggml would abort).
        """
        if not self.supports(qtype, imatrix is not None):
            raise ValueError(f"ggml library {self.path}: cannot quantize {qtype}"
                             + (" without an imatrix" if qtype in self.types else ""))
        t = GGMLQuantizationType[qtype]
        bs, ts = GGML_QUANT_SIZES[t]
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] % bs or x.shape[1] == 0:
            raise ValueError(f"{qtype}: rows of {x.shape[-1] if x.ndim else 0} values are not a positive "
                             f"multiple of the block size {bs}")
        rows, n = x.shape
        im = None
        if imatrix is not None:
            im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
            if im.size != n:
                raise ValueError(f"{qtype}: imatrix has {im.size} values, rows have {n}")
        out = np.empty((rows, n // bs * ts), dtype=np.uint8)
        if rows == 0:
            return out
        src, dst = x.ctypes.data, out.ctypes.data
        imp = None if im is None else im.ctypes.data

        def part(r0: int, r1: int) -> int:  # ggml writes row r0's bytes at dst + r0 * row_bytes
            return self.lib.ggml_quantize_chunk(int(t), src, dst, r0 * n, r1 - r0, n, imp)

        k = max(1, min(int(threads), rows))
        bounds = [rows * i // k for i in range(k + 1)]
        if k == 1:
            written = part(0, rows)
        else:
            written = sum(self._pool(k).map(lambda i: part(bounds[i], bounds[i + 1]), range(k)))
        if written != out.nbytes:  # pragma: no cover - an ABI mismatch the traits check did not catch
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype}, expected {out.nbytes}")
        return out


@functools.lru_cache(maxsize=None)
def _load(key: tuple[Path, ...]) -> NativeGGML | None:
    for p in key:
        if not p.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(p))
            for sym in ("ggml_quantize_chunk", "ggml_quantize_requires_imatrix", "ggml_get_type_traits"):
                getattr(lib, sym)
        except (OSError, AttributeError):
            continue
        return NativeGGML(lib, p)
    return None


def load() -> NativeGGML | None:
    """The ggml library found by :func:`library_candidates`, loaded once; ``None`` when there is none usable."""
    return _load(tuple(library_candidates()))
