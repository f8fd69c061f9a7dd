"""``quantize --gptq/--awq --ray``: the routed expert groups of each MoE layer as Ray work units.

The driver runs the calibration engine as on one machine (capture, routing, the non-expert linears, AWQ's
MoE smoothing search, the propagate forward); only the expert groups, the bulk of a MoE layer's work, go to
the cluster (:attr:`~.calibrate.CalibrationEngine.expert_dispatch`):

1. The layer's expert stage (:meth:`~.calib_capture.CalibStage.expert_stage`: the MLP input ``(T, hidden)`` float32,
   each expert's routed token rows, AWQ's MoE scale) is written once to
   ``OUT/calibration-spill/layerL-stage.safetensors`` on the shared filesystem (fsync + rename); its small
   metadata (specs, policies, kernel settings) travels in each unit's payload.
2. One unit per group of experts (``layerL-expertsA-B``; the groups are cut so that the cluster has at least
   two per slot, which never changes a byte: each expert's arithmetic is the same in any group). The worker
   reads the stage file (once per process and layer) and the experts' weights from SRC, sets the driver's
   torch thread count (a CPU matmul's rounding depends on how its work is split), calls the same
   :func:`~.calibrate.run_expert_group` (:meth:`~.calib_gptq.GptqStage.run_experts` / :meth:`~.calib_awq.AwqStage.run_experts`) a local run calls,
   and writes the quantized experts, in the engine's spill layout, to its ``.tmp`` piece in the spill folder.
3. The driver renames each piece into the spill folder and adopts it into the layer's results
   (:meth:`~.calib_capture.CalibStage.adopt_group`, in group order), exactly where a local run spills its own groups;
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

from .calib_base import spill_tensors
from .calib_capture import CalibStage
from .calibrate import run_expert_group
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

    def __init__(self, lay: CalibStage, names: dict[str, tuple[int, int]]):
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

    def __call__(self, lay: CalibStage, groups: list[tuple[int, int]]) -> None:
        meta, tensors = lay.expert_stage()
        # the same torch threads as here: a CPU matmul's rounding depends on how its work is split
        meta["threads"] = torch.get_num_threads()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        stage = self.spill_dir / f"layer{lay.idx}-stage.safetensors"
        tmp = stage.with_name(stage.name + ".tmp")
        save_file(tensors, str(tmp))
        commit_tmp(tmp, stage)
        del tensors
        slots = self.executor.slots or 1
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


# ----------------------------------------------------------------------------------------------------------
# imatrix --ray: a MoE layer's routed experts (their forward and their importance sums) as units
# ----------------------------------------------------------------------------------------------------------


class _Describe:
    """Unit progress on the imatrix driver: the group in flight as the current item (layers are the count)."""

    def __init__(self, prog):
        self.prog = prog

    def describe(self, text: str, boundary: bool = True) -> None:
        self.prog.describe(text, boundary=False)

    def advance(self, n: int) -> None:
        pass


class RayImatrixExperts:
    """``imatrix --ray``: each MoE layer's routed experts, a group per Ray unit, as the ``moe_experts`` of
    :meth:`~dsconvert.model.forward.ReferenceModel.layer_forward_many`.

    Per layer the driver writes the MoE input ``x`` ``(T, hidden)`` (compute dtype) and the routing
    (``weights``, ``indices`` ``(T, k)``) once to ``SCRATCH/layerL-stage.safetensors`` (SCRATCH is
    ``FILE.dsconvert-ray`` next to the output, on the shared filesystem). A worker runs
    :func:`~dsconvert.model.moe.routed_expert_output` (the function the local forward calls) for each expert of
    its group that has tokens, with an :class:`~.imatrix_sums.ImatrixCollector` hooked in, and writes to its piece each
    expert's weighted output and its three ``in_sum2`` rows and counts (float64). The driver yields the outputs
    in ascending expert order to ``moe_forward`` (which adds them as locally) and adds the sums to its collector
    (:meth:`~.imatrix_sums.ImatrixCollector.add_matrix`): the file is byte-identical to a local run's.
    """

    def __init__(self, executor: RayExecutor, src: str, dtype: torch.dtype, col, prog, scratch: Path):
        self.executor, self.src, self.dtype, self.col, self.prog = executor, src, dtype, col, prog
        self.scratch = Path(scratch)

    def __enter__(self) -> "RayImatrixExperts":
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    def layer(self, idx: int):
        """The ``experts(x, weights, indices, eids)`` callable of layer ``idx``."""
        def experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, eids: list[int]):
            self.scratch.mkdir(parents=True, exist_ok=True)
            stage = self.scratch / f"layer{idx}-stage.safetensors"
            tmp = stage.with_name(stage.name + ".tmp")
            save_file({"x": x.cpu().contiguous(), "weights": weights.cpu().contiguous(),
                       "indices": indices.cpu().contiguous()}, str(tmp))
            commit_tmp(tmp, stage)
            slots = self.executor.slots or 1
            size = max(1, math.ceil(len(eids) / (UNITS_PER_SLOT * slots)))
            groups = [eids[i:i + size] for i in range(0, len(eids), size)]
            pieces: dict[int, Path] = {}
            lock = threading.Lock()

            def unit(j: int, group: list[int]) -> Unit:
                def on_result(result: dict, piece: Path) -> None:
                    with lock:
                        pieces[j] = piece
                return Unit(f"layer{idx}-experts{group[0]}-{group[-1]}",
                            (str(stage), idx, group, torch.get_num_threads()), on_result)

            try:
                self.executor.run_units(self.scratch, [unit(j, g) for j, g in enumerate(groups)],
                                        _Describe(self.prog), Job(imatrix_worker, (self.src, self.dtype)))
                for j, group in enumerate(groups):  # ascending expert order, as the local loop
                    with safe_open(str(pieces[j]), "pt") as f:
                        for e in group:
                            for name in sorted({k.split("::")[1] for k in f.keys() if k.startswith("sum::")}):
                                self.col.add_matrix(name, e, f.get_tensor(f"sum::{name}::{e}"),
                                                    float(f.get_tensor(f"count::{name}::{e}")))
                            yield torch.where(indices == e)[0], f.get_tensor(f"y::{e}").to(x.device)
                    pieces.pop(j).unlink(missing_ok=True)
            finally:
                for p in pieces.values():
                    p.unlink(missing_ok=True)
                stage.unlink(missing_ok=True)
        return experts


def imatrix_worker(src: str, dtype: torch.dtype) -> Rebuilt:
    """The :class:`~.executor.Job` build of an ``imatrix --ray`` unit: ``write(unit, (stage, layer, eids,
    threads), tmp, sink)`` computes the experts ``eids`` of ``layer`` from the stage file and SRC (see
    :class:`RayImatrixExperts`) with the driver's torch thread count, and writes ``y::E``, ``sum::NAME::E`` and
    ``count::NAME::E`` to ``tmp`` (fsynced)."""
    from ..model import ReferenceModel
    from ..model.moe import routed_expert_output
    from .imatrix_sums import ImatrixCollector
    from .weights import CheckpointWeightSource

    source = CheckpointWeightSource(Path(src), check_values=False)
    model = ReferenceModel(source, dtype=dtype)

    def write(unit: str, payload, tmp: Path, sink) -> dict:
        stage, layer, eids, threads = payload
        st = _stage_tensors(stage)
        col = ImatrixCollector(source.config, int(source.config.get("n_routed_experts", 0) or 0))
        prefix = f"model.layers.{layer}.mlp"
        out: dict[str, torch.Tensor] = {}
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                for e in eids:
                    _, y = routed_expert_output(st["x"], st["weights"], st["indices"], e,
                                                model._expert_getter(f"{prefix}.experts.{e}"), prefix, col.on_linear)
                    out[f"y::{e}"] = y.contiguous()
        finally:
            torch.set_num_threads(old)
        for name, v in col.values.items():
            for e in eids:
                out[f"sum::{name}::{e}"] = v[e].contiguous()
                out[f"count::{name}::{e}"] = col.counts[name][e].reshape(1)
        save_file(out, str(tmp))
        sink.advance(sum(t.numel() * t.element_size() for t in out.values()))
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            os.fsync(f.fileno())
        return {"size": tmp.stat().st_size, "sha256": h.hexdigest()}

    return Rebuilt(write)
