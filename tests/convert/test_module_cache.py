"""``quantize``'s module cache under concurrent shard writers (``--workers 2``, the default).

Two worker threads take tensors of different modules at once. Each module must be computed exactly once and every
thread must get its own module's tensors; a single shared "current module" slot recomputed modules when the other
thread had replaced it, and raised ``KeyError`` when the swap fell between its check and its read.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from dsconvert.convert.quantize import ModuleResult, _ModuleCache


def test_each_module_computed_once_and_tensors_never_mixed():
    calls = Counter()

    def compute(mod: str) -> ModuleResult:
        calls[mod] += 1
        time.sleep(0.002)  # widen the window in which the other thread asks for its own module
        return ModuleResult({f"{mod}.{k}": torch.tensor([hash((mod, k)) % 1000]) for k in ("a", "b", "c")}, 0.5)

    cache = _ModuleCache(compute)
    errors: list[BaseException] = []

    def worker(mods: list[str]) -> None:
        try:
            for m in mods:
                for k in ("a", "b", "c"):
                    t = cache.take(m, f"{m}.{k}")
                    assert int(t) == hash((m, k)) % 1000
                    time.sleep(0.0005)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    shards = [[f"s{s}.m{i}" for i in range(20)] for s in range(2)]
    threads = [threading.Thread(target=worker, args=(mods,)) for mods in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls and set(calls.values()) == {1}, calls
    assert set(cache.errors) == {m for mods in shards for m in mods}
    assert not cache._entries, "finished modules must not stay in memory"


def test_a_failed_compute_reaches_every_waiting_thread():
    gate = threading.Event()

    def compute(mod: str) -> ModuleResult:
        gate.wait(5)
        raise RuntimeError("boom")

    cache = _ModuleCache(compute)
    seen: list[str] = []

    def take():
        try:
            cache.take("m", "m.a")
        except RuntimeError as e:
            seen.append(str(e))

    ts = [threading.Thread(target=take) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in ts:
        t.join(5)
    assert seen == ["boom", "boom"]
