"""``quantize --awq`` / ``--gptq`` / ``--method autoround``: drive the layer-streamed :class:`~dsconvert.convert.calibrate.CalibrationEngine`
from the quantize pipeline's producers.

The pipeline writes layer-aligned shards in layer order; the first request for any tensor of decoder layer
``L`` (a quantized module, or a float tensor AWQ folding replaced: norm weights, router columns) runs the engine
through layer ``L`` and keeps that layer's results until the next layer is asked for, so one layer's results
are resident at a time. Tensors of the MTP block (layers >= num_hidden_layers, not part of the forward) are
quantized with RTN, and the report says so.

Resume: after each layer the residual stream of the calibration sequences is saved with safetensors in
``OUT/calibration-state.safetensors`` (hidden states, no pickle; autoround also the float model's stream); a resumed run whose finished shards cover
layers ``0..L`` restores it and continues at ``L + 1`` instead of recalibrating from layer 0.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from ..formats.checkpoint import Checkpoint
from ..formats.int_format import IntFormat
from ..quant.rtn import QTensor, QuantSpec, quantize
from .calib_data import calibration_ids
from .int_module import ModuleResult, read_float, rel_error
from .weights import CheckpointWeightSource

STATE_NAME = "calibration-state.safetensors"
#: Folder of OUT holding the current layer's spilled expert results (removed when the run ends).
SPILL_NAME = "calibration-spill"


class CalibratedRun:
    """Adapter between the pipeline (asks by tensor name, in file order) and the engine (layer by layer)."""

    def __init__(self, ck: Checkpoint, fmt: IntFormat, spec: QuantSpec, opts, device: torch.device):
        from ..model.registry import architecture
        from .calibrate import CalibrationEngine
        from .calibrate_v4 import V4CalibrationEngine
        from .policy import LayerPolicy

        self.ck = ck
        self.fmt = fmt
        self.spec = spec
        self.method = opts.method
        self.device = device
        policy = LayerPolicy(spec, list(opts.ignore))
        self.ids, self.record = calibration_ids(ck, opts.calib_data, opts.num_samples, opts.seq_len,
                                                opts.calib_seed)
        self.layer_index = architecture(ck.config).layer_of  # V4 release names: layers.{i}., MTP None
        engine = V4CalibrationEngine if ck.v4 is not None else CalibrationEngine
        self.engine = engine(CheckpointWeightSource(ck.root, check_values=False),
                             lambda mod, shape: policy(mod + ".weight", shape), opts.method,
                             fmt.convention, self.ids, device=device, progress=self._stage,
                             expert_policy=opts.expert_policy)
        if opts.method == "autoround":
            from .calib_signround import SignRoundOptions

            self.engine.signround = SignRoundOptions(iters=opts.iters, lr=opts.lr)
        self.n_layers = self.engine.num_layers
        self.layer: int | None = None
        self.result = None
        self.layer_stats: list[dict] = []
        self.mtp_rtn: list[str] = []
        self.out_dir: Path | None = None
        self._ray: tuple | None = None  # (RayExecutor, SRC path): expert groups on the cluster

    def use_ray(self, executor, src: str) -> None:
        """Run each MoE layer's routed expert groups as units on ``executor``'s cluster
        (:class:`~.calib_ray.RayExpertGroups`, set up when OUT is known: :meth:`resume`); ``src`` is SRC's
        absolute path, the same on every node. The groups run on the driver's kernel device kind (a CPU
        matmul and a CUDA one round differently, and the output must match the local run's bytes).

        Raises:
            UsageError: the driver calibrates on CUDA but the units reserve no GPU (``--ray-gpus-per-task``), or
                the source is DeepSeek-V4 (its engine has no remote expert groups yet).
        """
        from .calibrate_v4 import V4CalibrationEngine

        if self.method == "autoround":
            raise UsageError("--method autoround with --ray: SignRound runs on one machine for now",
                             hint="drop --ray (autoround streams one layer and one expert group at a time)")
        if isinstance(self.engine, V4CalibrationEngine):
            raise UsageError(f"--{self.method} with --ray: DeepSeek-V4 calibration runs on one machine for now",
                             hint="drop --ray (V4 --gptq/--awq stream one layer and one expert group at a time)")
        if self.device.type == "cuda" and executor.opts.gpus_per_task <= 0:
            raise UsageError(f"--{self.method} on {self.device} with --ray: the expert groups run on the same "
                             "device kind, and the units reserve no GPU",
                             hint="add --ray-gpus-per-task 1, or --device cpu")
        self._ray = (executor, src)

    def _stage(self, layer_idx: int, stage: str) -> None:
        """One plain stderr line per calibration stage ("layer 12/61: calibrating experts 64-95")."""
        print(f"layer {layer_idx + 1}/{self.n_layers if hasattr(self, 'n_layers') else '?'}: {stage}",
              file=sys.stderr, flush=True)

    def fit_memory(self, budget: int | None) -> None:
        """Size the engine's expert groups (and AWQ candidate chunks) to ``budget`` bytes (None: the default
        budget); see :meth:`~dsconvert.convert.calibrate.CalibrationEngine.set_budget`."""
        self.engine.set_budget(budget)

    def peak_memory_estimate(self) -> int:
        """Memory (bytes) calibration adds to the quantize pipeline's own peak:
        :meth:`~dsconvert.convert.calibrate.CalibrationEngine.peak_memory_estimate`."""
        return self.engine.peak_memory_estimate(spilled=True)  # a writing run spills experts to OUT

    def close(self) -> None:
        """Delete the spilled results and their folder (end of the run, or interrupted)."""
        if self.result is not None:
            self.result.close()
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir / SPILL_NAME, ignore_errors=True)

    # -- pipeline hooks -----------------------------------------------------------------------------------
    def compute(self, module: str):
        lay = self.layer_index(module + ".weight")
        if lay is None or lay >= self.n_layers:  # MTP block: not part of the forward, RTN
            w = read_float(self.ck, module + ".weight").to(self.device)
            qt = quantize(w, self.spec, self.fmt.convention, name=module)
            self.mtp_rtn.append(module)
            return ModuleResult({k: v.cpu() for k, v in self.fmt.encode_qtensor(module, qt).items()},
                                rel_error(w, qt))
        res = self._ensure(lay)
        qt: QTensor = res.quantized[module]
        w = read_float(self.ck, module + ".weight")
        return ModuleResult(self.fmt.encode_qtensor(module, qt), rel_error(w, qt))

    def replaced(self, name: str) -> torch.Tensor | None:
        lay = self.layer_index(name)
        if lay is None or lay >= self.n_layers:
            return None
        return self._ensure(lay).replaced.get(name)

    # -- engine driving -------------------------------------------------------------------------------
    def _ensure(self, lay: int):
        if self.layer == lay:
            return self.result
        if lay < self.engine.next_layer:
            raise RuntimeError(f"calibration of layer {lay} requested after layer {self.engine.next_layer - 1}")
        while self.engine.next_layer <= lay:
            if self.result is not None:
                self.result.close()  # the previous layer is written: drop its spilled experts
                self.result = None
            self.result = self.engine.run_layer(self.engine.next_layer)
            self.layer = self.result.layer
            self.layer_stats.append(self.result.stats)
            self._save_state()
        return self.result

    def _save_state(self) -> None:
        if self.out_dir is None:
            return
        tensors = {f"hidden.{i}": h.float().contiguous() for i, h in enumerate(self.engine.hidden_states)}
        ref = getattr(self.engine, "reference_hidden", None)  # autoround: the float stream too
        if ref is not None:
            tensors.update({f"reference.{i}": h.float().contiguous() for i, h in enumerate(ref)})
        from .manifest import commit_tmp

        tmp = self.out_dir / (STATE_NAME + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"next_layer": str(self.engine.next_layer),
                                                   "sequences": str(len(self.engine.hidden_states))})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        commit_tmp(tmp, self.out_dir / STATE_NAME)  # fsync + rename + directory fsync

    def resume(self, out_dir: Path, done: set[str], shards) -> None:
        """Skip recalibrating the layers whose shards are all finished, when a saved state covers them."""
        self.out_dir = out_dir
        shutil.rmtree(out_dir / SPILL_NAME, ignore_errors=True)  # left by a killed run
        self.engine.spill_dir = out_dir / SPILL_NAME
        if self._ray is not None:
            from .calib_ray import RayExpertGroups

            self.engine.expert_dispatch = RayExpertGroups(*self._ray, self.engine.spill_dir)
        last_done = -1
        for s in shards:
            layers = {self.layer_index(t.name) for t in s.tensors} - {None}
            if s.name not in done:
                if layers:  # a layer split over shards is done only when all of its shards are
                    last_done = min(layers) - 1
                break
            if layers:
                last_done = max(last_done, max(layers))
        last_done = min(last_done, self.n_layers - 1)
        state = out_dir / STATE_NAME
        if last_done < 0 or not state.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(state), "pt") as f:
            next_layer = int(f.metadata().get("next_layer", "-1"))
        if next_layer < last_done + 1:
            return
        # the state may be ahead of the finished shards; rerun from the state only when it matches exactly
        if next_layer != last_done + 1:
            return
        hs = load_file(str(state))
        n = sum(1 for k in hs if k.startswith("hidden."))
        hidden = [hs[f"hidden.{i}"] for i in range(n)]
        if len(hidden) != len(self.engine.hidden_states):
            return
        self.engine.restore(hidden, next_layer)
        if f"reference.{n - 1}" in hs:  # autoround's float stream
            self.engine.reference_hidden = [hs[f"reference.{i}"] for i in range(n)]
        self.resumed_at = next_layer

    def report(self) -> dict:
        experts_rtn = sum(1 for st in self.layer_stats for e in (st.get("experts") or {}).values()
                          if e.get("policy") == "rtn")
        return {
            "method": self.method,
            "data": self.record,
            "expert_tokens": self.expert_tokens(),
            "sequences": len(self.ids),
            "tokens": sum(len(s) for s in self.ids),
            "layers_calibrated": len(self.layer_stats),
            "resumed_at_layer": getattr(self, "resumed_at", None),
            "mtp_modules_rtn": len(self.mtp_rtn),
            "experts_rtn_fallback": experts_rtn,
            "layers": self.layer_stats,
        }


    def sidecar(self) -> dict:
        """``OUT/calibration.json``: the record plus the windows' span hashes (calibration_data)."""
        from .calibration_data import ngram_fingerprint

        return {**self.record, **ngram_fingerprint(self.ids)}

    def expert_tokens(self) -> dict[str, dict[str, int]]:
        """Calibration tokens each routed expert received, ``{layer: {eid: tokens}}`` (MoE layers only)."""
        return {str(st["layer"]): {str(e): int(v["tokens_routed"]) for e, v in st["experts"].items()}
                for st in self.layer_stats if st.get("experts")}


def calibrated_compute(ck: Checkpoint, fmt: IntFormat, spec: QuantSpec, opts, device: torch.device
                       ) -> tuple[Callable, CalibratedRun]:
    run = CalibratedRun(ck, fmt, spec, opts, device)
    return run.compute, run

