"""dsconvert: convert DeepSeek-V3/R1 checkpoints (FP8 -> BF16, INT8/INT4, GGUF) and validate the result."""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin at every barrier by default. dsconvert runs many short parallel regions (chunked
# kernels) next to its own I/O threads; on a machine with other load, spinning threads starve each other and a
# 2-thread kernel ran ~15x slower than a 1-thread one (measured on the 2-core dev machine: 0.055 vs 0.90 GB/s).
# Passive waiting fixes that (0.78 GB/s under the same load). It only takes effect if set before torch starts
# its thread pool, and a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at 1 MiB. By default glibc raises it each time a large block is freed (up to
    32 MiB), after which chunk-sized buffers (dsconvert's 1-32 MiB row chunks) come from the heap, where a
    freed buffer below a live one stays resident: fp8-to-bf16 on the real-size V4-Flash fixture (2 layers, 256
    FP4 experts each) peaked at 0.49-1.08 GiB over three runs (by thread timing); with the threshold fixed,
    0.48-0.50 GiB over three, at the same wall time. Buffers above 1 MiB are then mapped and unmapped each time. A user's own ``MALLOC_MMAP_THRESHOLD_`` wins;
    a C library without ``mallopt`` (not glibc) is left alone."""
    if "MALLOC_MMAP_THRESHOLD_" in _os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_fixed_mmap_threshold()
