"""``quantize --gptq/--awq --ray``: the routed expert groups of each MoE layer as Ray work units.

The driver runs the calibration engine as on one machine (capture, routing, the non-expert linears, AWQ's
MoE smoothing search, the propagate forward); only the expert groups, the bulk of a MoE layer's work, go to
the cluster (:attr:`~.calibrate.CalibrationEngine.expert_dispatch`):

1. The layer's expert stage (:meth:`~.calibrate._Layer.expert_stage`: the MLP input ``(T, hidden)`` float32,
   each expert's routed token rows, AWQ's MoE scale) is written once to
   ``OUT/calibration-spill/layerL-stage.safetensors`` on the shared filesystem (fsync + rename); its small
   metadata (specs, policies, kernel settings) travels in each unit's payload.
2. One unit per group of experts (``layerL-expertsA-B``; the groups are cut so that the cluster has at least
   two per slot, which never changes a byte: each expert's arithmetic is the same in any group). The worker
   reads the stage file (once per process and layer) and the experts' weights from SRC, sets the driver's
   torch thread count (a CPU matmul's rounding depends on how its work is split), calls the same
   :func:`~.calibrate.run_expert_group` (:meth:`_gptq_experts` / :meth:`_awq_experts`) a local run calls,
   and writes the quantized experts, in the engine's spill layout, to its ``.tmp`` piece in the spill folder.
3. The driver renames each piece into the spill folder and adopts it into the layer's results
   (:meth:`~.calibrate._Layer.adopt_group`, in group order), exactly where a local run spills its own groups;
   the shards are then written on the driver as in a local run. The output is therefore byte-identical to a
   local run's, and resume is the local one (the per-layer residual state; a killed layer is recomputed).

Failures and limits are the executor's (:class:`~.executor.RayExecutor`: bounded in-flight units and retries,
the failing unit named). Progress: the driver prints the local run's ``layer i/N: calibrating experts A-B``
line when a group is submitted.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibrate import _Layer, run_expert_group, spill_tensors
from .executor import Job, RayExecutor, Rebuilt, Unit
from .manifest import commit_tmp

#: Expert-group units per in-flight slot that the cluster gets at least (smaller groups, the same bytes).
UNITS_PER_SLOT = 2
_REPLACED = "replaced::"  # prefix of a folded float tensor in a worker's piece


def split_groups(groups: list[tuple[int, int]], slots: int) -> list[tuple[int, int]]:
    """Cut ``groups`` (``[(e0, e1), ...]``, contiguous) so that there are at least ``UNITS_PER_SLOT * slots``
    of them where the experts allow it; no group grows."""
    n_exp = sum(e1 - e0 for e0, e1 in groups)
    size = max(1, min(max(e1 - e0 for e0, e1 in groups), math.ceil(n_exp / (UNITS_PER_SLOT * max(1, slots)))))
    return [(a, min(a + size, e1)) for e0, e1 in groups for a in range(e0, e1, size)]


class _StageLines:
    """The progress a unit reports on the driver: the local run's stage line when a group starts."""

    def __init__(self, lay: _Layer, names: dict[str, tuple[int, int]]):
        self.lay = lay
        self.names = names
        self._lock = threading.Lock()

    def describe(self, text: str, boundary: bool = True) -> None:
        with self._lock:
            self.lay.report_group(*self.names[text])

    def advance(self, n: int) -> None:
        pass


class RayExpertGroups:
    """:attr:`~.calibrate.CalibrationEngine.expert_dispatch` on a Ray cluster (see the module docstring).

    Args:
        executor: the connected :class:`~.executor.RayExecutor` (inside its :meth:`~.executor.RayExecutor.session`).
        src: SRC as every node sees it (absolute path on the shared filesystem).
        spill_dir: ``OUT/calibration-spill`` (shared): the stage file, the pieces, the adopted results.
    """

    def __init__(self, executor: RayExecutor, src: str, spill_dir: Path):
        self.executor = executor
        self.src = src
        self.spill_dir = Path(spill_dir)

    def __call__(self, lay: _Layer, groups: list[tuple[int, int]]) -> None:
        meta, tensors = lay.expert_stage()
        # the same torch threads as here: a CPU matmul's rounding depends on how its work is split
        meta["threads"] = torch.get_num_threads()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        stage = self.spill_dir / f"layer{lay.idx}-stage.safetensors"
        tmp = stage.with_name(stage.name + ".tmp")
        save_file(tensors, str(tmp))
        commit_tmp(tmp, stage)
        del tensors
        slots = self.executor._cap or 1
        results: dict[tuple[int, int], tuple[Path, dict]] = {}
        lock = threading.Lock()

        def unit(e0: int, e1: int) -> Unit:
            name = f"layer{lay.idx}-experts{e0}-{e1 - 1}"

            def on_result(result: dict, piece: Path) -> None:
                final = self.spill_dir / f"{name}.safetensors"
                os.replace(piece, final)  # spill files are scratch: the state after the layer is what resumes
                with lock:
                    results[(e0, e1)] = (final, result)
            return Unit(name, (str(stage), meta, e0, e1), on_result)

        cut = split_groups(groups, slots)
        units = [unit(e0, e1) for e0, e1 in cut]
        try:
            self.executor.run_units(self.spill_dir, units, _StageLines(lay, {u.name: g for u, g in zip(units, cut)}),
                                    Job(expert_worker, (self.src,)))
            for g in cut:  # in group order: the layer's results and stats in the local run's order
                path, res = results.pop(g)
                replaced = {}
                if res["replaced"]:
                    with safe_open(str(path), "pt") as f:
                        replaced = {k[len(_REPLACED):]: f.get_tensor(k) for k in res["replaced"]}
                lay.adopt_group(path, res["modules"], res["stats"], replaced)
        finally:
            for path, _ in results.values():  # not adopted (the run stopped): not the layer's to delete
                path.unlink(missing_ok=True)
            stage.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# the worker side
# ----------------------------------------------------------------------------------------------------------

_STAGE: dict[str, dict] = {}  # stage file -> its tensors, one layer per worker process
_STAGE_LOCK = threading.Lock()


def _stage_tensors(path: str) -> dict:
    key = f"{path}:{os.stat(path).st_mtime_ns}"
    with _STAGE_LOCK:
        if key not in _STAGE:
            _STAGE.clear()
            with safe_open(path, "pt") as f:
                _STAGE[key] = {k: f.get_tensor(k) for k in f.keys()}
        return _STAGE[key]


def expert_worker(src: str) -> Rebuilt:
    """The :class:`~.executor.Job` build of an expert-group unit on a worker: a reader of SRC, and
    ``write(unit, (stage, meta, e0, e1), tmp, sink)`` running :func:`~.calibrate.run_expert_group` and writing
    the group's QTensors (and any folded float tensors, prefixed ``replaced::``) to ``tmp`` (fsynced).
    Returns ``{"size", "sha256", "modules": [(module, spec, convention, has_zero)], "stats", "replaced"}``."""
    from .weights import CheckpointWeightSource

    source = CheckpointWeightSource(Path(src), check_values=False)

    def write(unit: str, payload, tmp: Path, sink) -> dict:
        stage, meta, e0, e1 = payload
        threads = torch.get_num_threads()
        torch.set_num_threads(meta["threads"])
        try:
            quantized, stats, replaced = run_expert_group(source, meta, _stage_tensors(stage), e0, e1)
        finally:
            torch.set_num_threads(threads)
        tensors = spill_tensors(quantized)
        tensors.update({_REPLACED + k: v.contiguous() for k, v in replaced.items()})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp))
        sink.advance(nbytes)  # (a test fault kills the worker here, with the piece written)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            os.fsync(f.fileno())
        return {"size": tmp.stat().st_size, "sha256": h.hexdigest(),
                "modules": [(m, qt.spec, qt.convention, qt.zero is not None) for m, qt in quantized.items()],
                "stats": stats, "replaced": sorted(_REPLACED + k for k in replaced)}

    return Rebuilt(write)
