"""Importing dsconvert fixes glibc's mmap threshold: chunk-sized buffers freed below a live allocation go back to
the system instead of staying resident (fp8-to-bf16 on the real-size V4 fixture with 256 experts peaked at
0.49-1.08 GiB over three runs before, 0.48-0.50 GiB after)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
if sys.argv[1] == "dsconvert":
    import dsconvert  # noqa: F401
import torch

def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024

t = torch.empty(24 << 20, dtype=torch.uint8); t.fill_(1); del t  # glibc's default: a large free raises the threshold
base = rss()
keep, big = [], []
for i in range(40):  # 8 MiB chunks, each followed by a small long-lived buffer (a header, a scale)
    b = torch.empty((8 << 20) + 4096 * i, dtype=torch.uint8); b.fill_(1); big.append(b)
    s = torch.empty(64 << 10, dtype=torch.uint8); s.fill_(1); keep.append(s)
big.clear()
print((rss() - base) / 2**20)
"""


def _retained_mib(which: str) -> float:
    res = subprocess.run([sys.executable, "-c", PROBE, which], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc / procfs")
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_freed_chunks_are_returned_after_import():
    """With plain torch 40 freed 8 MiB chunks stay resident (~320 MiB; the probe checks the premise); after
    ``import dsconvert`` they are unmapped (only the 2.5 MiB of small buffers and noise stay)."""
    plain = _retained_mib("torch")
    if plain < 200:
        pytest.skip(f"this C library returns freed chunks by itself ({plain:.0f} MiB retained)")
    assert _retained_mib("dsconvert") < 40
