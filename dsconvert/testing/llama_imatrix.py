"""llama.cpp's own importance-matrix collection, as a test oracle for ``dsconvert imatrix``.

llama-imatrix (``tools/imatrix/imatrix.cpp``) is not part of llama-cpp-python, but its collection is an eval
callback on the scheduler: :func:`llama_imatrix` loads a GGUF with the ``llama_cpp`` package's library, sets
``llama_context_params.cb_eval`` and decodes each window in a fresh context memory; the callback takes the same
nodes llama-imatrix takes (``MUL_MAT_ID``; ``MUL_MAT`` with an F32 ``src1`` of at least 16 rows and a ``blk.*``
weight) and accumulates, in float64, what ``IMatrixCollector::collect_imatrix`` accumulates: per routed expert
the squares of the rows its ids select and one count per row, for a dense weight the squares of every row of
``src1`` per matrix ``(i2 % ne2 of src0)`` and one count of ``nrows(src1) / n_mat``. The activations are
llama.cpp's, computed by its ``deepseek4`` / ``deepseek2`` graph.

Only test and bench code imports this module. ``struct ggml_tensor`` is mirrored from ``ggml/include/ggml.h``
of llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64
_GGML_F32 = 0


class _Tensor(ctypes.Structure):
    pass


_Tensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32), ("src", ctypes.POINTER(_Tensor) * _MAX_SRC), ("view_src", ctypes.POINTER(_Tensor)),
    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ops(base) -> tuple[int, int]:
    """The enum values of GGML_OP_MUL_MAT and GGML_OP_MUL_MAT_ID, by name (``ggml_op_name``)."""
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    found = {}
    for i in range(128):
        found[base.ggml_op_name(i).decode("ascii", "replace")] = i
        if "MUL_MAT_ID" in found:
            return found["MUL_MAT"], found["MUL_MAT_ID"]
    raise RuntimeError("ggml_op_name has no MUL_MAT_ID")


def _view(t: _Tensor, dtype) -> np.ndarray:
    """The tensor's host data as a numpy array ``(ne3, ne2, ne1, ne0)`` with its byte strides (no copy)."""
    ne, nb = list(t.ne), list(t.nb)
    item = np.dtype(dtype).itemsize
    size = sum((n - 1) * s for n, s in zip(ne, nb)) + item
    flat = np.frombuffer((ctypes.c_char * size).from_address(t.data), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(flat.view(dtype), shape=ne[::-1], strides=nb[::-1], writeable=False)


def llama_imatrix(gguf_path: str | Path, windows: list[list[int]], n_threads: int = 2
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (sum of squares [n_mat, ne0] float64, counts [n_mat or 1])}`` as llama-imatrix collects them
    over ``windows`` (token id lists, each decoded as one batch from an empty memory).

    Raises:
        ImportError: no ``llama_cpp``. RuntimeError: the model does not load or a decode fails.
    """
    import llama_cpp
    from llama_cpp import llama_cpp as lc

    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    base.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    mul_mat, mul_mat_id = _ops(base)
    stats: dict[str, list[np.ndarray]] = {}

    def collect(tp, ask, _user):
        t = ctypes.cast(tp, ctypes.POINTER(_Tensor)).contents
        if t.op not in (mul_mat, mul_mat_id):
            return not ask
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = src0.name.decode()
        if "#" in name:  # filter_tensor_name
            name = name.split("#")[1]
        if ask:
            return t.op == mul_mat_id or (src1.ne[1] >= 16 and src1.type == _GGML_F32 and name.startswith("blk."))
        if not base.ggml_backend_buffer_is_host(src1.buffer):
            raise RuntimeError("llama_imatrix runs on the CPU backend only")
        x = _view(src1, np.float32).astype(np.float64)  # (ne3, ne2, ne1, ne0)
        if t.op == mul_mat_id:
            ids = _view(t.src[2].contents, np.int32)[0, 0]  # (n_tokens, n_ids)
            v, c = stats.setdefault(name, [np.zeros((src0.ne[2], src1.ne[0])), np.zeros(src0.ne[2])])
            for row in range(src1.ne[2]):
                for slot in range(ids.shape[1]):
                    ex = int(ids[row, slot])
                    xr = x[0, row, slot % src1.ne[1]]
                    v[ex] += xr * xr
                    c[ex] += 1
            return True
        n_mat = src0.ne[2] * src0.ne[3]
        v, c = stats.setdefault(name, [np.zeros((n_mat, src1.ne[0])), np.zeros(1)])
        for i3 in range(src1.ne[3]):
            for i2 in range(src1.ne[2]):
                v[(i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])] += (x[i3, i2] ** 2).sum(0)
        c[0] += src1.ne[1] * src1.ne[2] * src1.ne[3] // n_mat
        return True

    cb = lc.ggml_backend_sched_eval_callback(collect)
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    if hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False  # plain CPU buffers (host data the callback reads)
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    cp = lc.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(len(w) for w in windows)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.cb_eval = cb
    ctx = lc.llama_init_from_model(model, cp)
    try:
        for w in windows:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            arr = (lc.llama_token * len(w))(*w)
            if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(w))) != 0:
                raise RuntimeError("llama_decode failed")
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return {k: (v, c) for k, (v, c) in stats.items()}
