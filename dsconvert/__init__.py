"""dsconvert: convert DeepSeek-V3/R1 checkpoints (FP8 -> BF16, INT8/INT4, GGUF) and validate the result."""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin at every barrier by default. dsconvert runs many short parallel regions (chunked
# kernels) next to its own I/O threads; on a machine with other load, spinning threads starve each other and a
# 2-thread kernel ran ~15x slower than a 1-thread one (measured on the 2-core dev machine: 0.055 vs 0.90 GB/s).
# Passive waiting fixes that (0.78 GB/s under the same load). It only takes effect if set before torch starts
# its thread pool, and a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
