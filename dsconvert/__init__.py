"""dsconvert: convert DeepSeek-V3/R1 checkpoints (FP8 -> BF16, INT8/INT4, GGUF) and validate the result."""

__version__ = "0.1.0"
