"""``dsconvert env``: library versions, CPU features, CUDA, free memory and disk."""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil

import torch

from .. import __version__


def _ver(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux), empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def env_report() -> dict:
    """What the fp8/quantize/gguf paths will run on. AMX matters: llama.cpp's repacked buffers crash quantized
    deepseek2 GGUFs on AMX CPUs unless ``use_extra_bufts=False`` (docs/known-failures.md item 25)."""
    import psutil

    flags = cpu_flags()
    cuda = torch.cuda.is_available()
    return {
        "dsconvert": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": _ver("safetensors"),
        "gguf": _ver("gguf"),
        "tokenizers": _ver("tokenizers"),
        "typer": _ver("typer"),
        "llama-cpp-python": _ver("llama_cpp_python"),
        "transformers": _ver("transformers"),
        "compressed-tensors": _ver("compressed-tensors"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx": any(f.startswith("amx") for f in flags),
        "avx512": "avx512f" in flags,
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "fp8_path": "cuda (torch)" if cuda else "cpu (torch, no Triton needed)",
        "ram_total_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 2),
        "disk_free_gib_cwd": round(shutil.disk_usage(".").free / 2**30, 2),
    }
