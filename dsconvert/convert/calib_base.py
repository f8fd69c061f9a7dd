"""What the calibration engines share: the per-layer weight source, the layer results and their spill files,
the small statistics helpers, the memory budget, and :class:`CalibrationEngineBase`, the driving interface
of :class:`~dsconvert.convert.calibrate.CalibrationEngine` (DeepSeek V2/V3) and
:class:`~dsconvert.convert.calibrate_v4.V4CalibrationEngine` that :mod:`dsconvert.convert.calibrated` and
:mod:`dsconvert.convert.calib_ray` talk to."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UsageError
from ..model.source import WeightSource
from ..quant.gptq import HessianAccumulator
from ..quant.rtn import Convention, QTensor, QuantSpec, dequantize


#: ``policy(module_name, (out_features, in_features)) -> QuantSpec | None`` (None = keep in float).
#: ``module_name`` is the HF weight name without ``.weight``, e.g. ``model.layers.3.mlp.experts.7.down_proj``.
Policy = Callable[[str, tuple[int, int]], "QuantSpec | None"]

#: Default minimum routed tokens for an expert to be calibrated on its own tokens.
MIN_EXPERT_TOKENS = 16

#: Experts per progress stage line ("calibrating experts 64-95").
PROGRESS_EXPERTS = 32

#: Tokens (at most) used for the per-linear output-error statistic of AWQ.
STAT_TOKENS = 512

#: AutoAWQ skips the clip search for these name fragments (q/k projections: their outputs go through a
#: softmax, where clipping error is amplified). In DeepSeek this skips q_a/q_b/q_proj only.
CLIP_SKIP = ("q_", "k_", "query", "key", "Wqkv")


@dataclass
class LayerResult:
    """What :meth:`CalibrationEngine.run_layer` returns for one decoder layer.

    Attributes:
        layer: the layer index.
        quantized: ``{module name: QTensor}`` for every linear the policy quantizes in this layer
            (``model.layers.3.mlp.experts.7.down_proj``); write these instead of the source weights.
        replaced: ``{HF tensor name: float32 tensor}`` of float tensors AWQ folding changed, to be
            written instead of the source's: norm weights (``…input_layernorm.weight`` etc.) divided by
            ``s``, the router ``…mlp.gate.weight`` with its columns multiplied by ``s``, and any folded
            linear the policy keeps in float (``…up_proj.weight`` rows ``/ s``, columns ``* s``). Empty
            for GPTQ.
        stats: see :meth:`CalibrationEngine.run_layer`.
        folded: only with ``keep_folded=True``: ``{HF weight name: float32}`` every linear after AWQ
            scale folding and before clipping/quantization (with ``replaced`` the float model is
            unchanged; for tests and diagnostics).
    """

    layer: int
    quantized: Mapping[str, QTensor]
    replaced: dict[str, torch.Tensor]
    stats: dict
    folded: dict[str, torch.Tensor] = field(default_factory=dict)

    def close(self) -> None:
        """Delete the spilled expert results (call when they have been written)."""
        if isinstance(self.quantized, LayerResults):
            self.quantized.close()


class LayerSource:
    """A WeightSource over ``inner`` that caches the non-expert tensors of one layer (dropped by :meth:`reset`)
    and serves ``overrides`` (an :class:`Overrides` of dequantized QTensors and folded tensors, or a dict)
    instead of the inner tensors. Routed experts' weights are not cached: a MoE layer's experts are read when
    used, a group at a time."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        self.config = inner.config
        self.overrides: Mapping[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.overrides = {}
        self._cache = {}

    def has(self, name: str) -> bool:
        return name in self.overrides or self.inner.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the checkpoint header when the source has one (no read)."""
        ck = getattr(self.inner, "ck", None)
        info = ck.tensors.get(name) if ck is not None else None
        if info is not None and name not in self.overrides and not ck.is_scale(name):
            return tuple(info[1].shape)
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        t = self.overrides.get(name)
        if t is not None:
            return t
        t = self._cache.get(name)
        if t is None:
            t = self.inner.get(name)
            if name.startswith("model.layers.") and ".mlp.experts." not in name:
                # routed experts are fetched when needed, never all held (256 x 3 matrices per layer)
                self._cache[name] = t
        return t



def spill_tensors(items: Mapping[str, QTensor]) -> dict[str, torch.Tensor]:
    """The spill file layout of ``{module: QTensor}``: ``MODULE.q``, ``MODULE.scale`` and ``MODULE.zero`` (when
    the tensor has zero points), contiguous."""
    tensors = {}
    for m, qt in items.items():
        tensors[m + ".q"] = qt.q.contiguous()
        tensors[m + ".scale"] = qt.scale.contiguous()
        if qt.zero is not None:
            tensors[m + ".zero"] = qt.zero.contiguous()
    return tensors


class LayerResults(Mapping):
    """``{module name: QTensor}`` of one layer. Non-expert linears are held in memory; the routed experts'
    results are spilled, one safetensors file per expert group, to ``spill_dir`` when it is set (so a MoE
    layer's results do not grow memory with the number of experts), and read back on access. Iteration
    follows insertion order. :meth:`close` deletes the spill files."""

    def __init__(self, spill_dir: Path | None, tag: str):
        self.spill_dir = spill_dir
        self.tag = tag
        self._mem: dict[str, QTensor] = {}
        self._spilled: dict[str, tuple[Path, QuantSpec, Convention, bool]] = {}
        self._order: list[str] = []
        self._files: list[Path] = []

    def __setitem__(self, module: str, qt: QTensor) -> None:
        self.put({module: qt}, spill=False)

    def put(self, items: dict[str, QTensor], spill: bool = True) -> None:
        """Add ``items``; with ``spill`` and a ``spill_dir``, write them to one new spill file."""
        new = [m for m in items if m not in self._mem and m not in self._spilled]
        if not spill or self.spill_dir is None or not items:
            self._mem.update(items)
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{self.tag}-{len(self._files)}.safetensors"
            self._files.append(path)
            save_file(spill_tensors(items), str(path))
            for m, qt in items.items():
                self._spilled[m] = (path, qt.spec, qt.convention, qt.zero is not None)
        self._order += new

    def adopt(self, path: Path, modules: list[tuple[str, QuantSpec, Convention, bool]]) -> None:
        """Register a spill file written elsewhere (another process, same layout as :meth:`put`): ``modules``
        lists ``(module, spec, convention, has_zero)`` of what it holds, in order; :meth:`close` deletes it."""
        self._files.append(path)
        for m, spec, conv, has_zero in modules:
            self._spilled[m] = (path, spec, conv, has_zero)
            if m not in self._mem:
                self._order.append(m)

    def __getitem__(self, module: str) -> QTensor:
        qt = self._mem.get(module)
        if qt is not None:
            return qt
        path, spec, conv, has_zero = self._spilled[module]
        with safe_open(str(path), "pt") as f:
            return QTensor(f.get_tensor(module + ".q"), f.get_tensor(module + ".scale"),
                           f.get_tensor(module + ".zero") if has_zero else None, spec, conv)

    def __contains__(self, module: object) -> bool:
        return module in self._mem or module in self._spilled

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        """Delete the spill files (the results are no longer readable from them)."""
        for f in self._files:
            f.unlink(missing_ok=True)
        self._files = []
        self._spilled = {}
        self._order = [m for m in self._order if m in self._mem]


class Overrides:
    """What the propagate forward reads instead of the source for one layer: ``replaced`` float tensors, and
    each quantized module's weight dequantized when it is fetched (one expert at a time, not the layer)."""

    def __init__(self, quantized: Mapping[str, QTensor], replaced: dict[str, torch.Tensor]):
        self.quantized = quantized
        self.replaced = replaced

    def __contains__(self, name: object) -> bool:
        return name in self.replaced or (isinstance(name, str) and name.endswith(".weight")
                                         and name[: -len(".weight")] in self.quantized)

    def get(self, name: str, default=None):
        t = self.replaced.get(name)
        if t is not None:
            return t
        if name.endswith(".weight") and name[: -len(".weight")] in self.quantized:
            return dequantize(self.quantized[name[: -len(".weight")]])
        return default



def token_chunks(positions: Sequence[torch.Tensor], tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` ranges of sequence indices, each holding at most ``tokens`` tokens (or one
    sequence longer than that), covering every sequence in order."""
    out: list[tuple[int, int]] = []
    c0, n = 0, 0
    for i, p in enumerate(positions):
        t = int(p.numel())
        if i > c0 and n + t > tokens:
            out.append((c0, i))
            c0, n = i, 0
        n += t
    if c0 < len(positions):
        out.append((c0, len(positions)))
    return out


def hessian(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """GPTQ Hessian ``(N, N)`` float32 of the input rows ``x`` ``(n, N)``, accumulated 4096 rows at a time."""
    acc = HessianAccumulator(x.shape[1], device=device)
    for c0 in range(0, x.shape[0], 4096):
        acc.add(x[c0:c0 + 4096])
    return acc.H


def qt_rows(qt: QTensor, r0: int, r1: int) -> QTensor:
    """Rows ``r0:r1`` of a QTensor (a linear's part of a gate/up stack), as contiguous CPU copies."""
    return QTensor(qt.q[r0:r1].cpu().clone(), qt.scale[r0:r1].cpu().clone(),
                   None if qt.zero is None else qt.zero[r0:r1].cpu().clone(), qt.spec, qt.convention)


def cat_rows(parts: Sequence[QTensor]) -> QTensor:
    """Stack QTensors of row blocks of one weight (quantization groups run along K, so rows are independent);
    one part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    z = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), z, parts[0].spec,
                   parts[0].convention)


def expert_ranges(n_experts: int, group: int) -> list[tuple[int, int]]:
    """The routed expert groups ``[(e0, e1), ...]`` of ``group`` (at least 1) experts covering ``0..n_experts-1``."""
    G = max(1, group)
    return [(e0, min(e0 + G, n_experts)) for e0 in range(0, n_experts, G)]


def output_sums(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, w_rtn: torch.Tensor
                ) -> tuple[float, float, float]:
    """``(||x Wᵀ - x Ŵᵀ||², ||x Wᵀ - x W̃ᵀ||², ||x Wᵀ||²)`` in float64 for rows ``x`` ``(n, N)`` and weights
    ``(M, N)`` on one device: the parts of :func:`rel_mse` for the calibrated ``w_hat`` and the RTN ``w_rtn``,
    to be summed over the row blocks of a block-diagonal linear (V4's ``wo_a``)."""
    xs = x.to(torch.float64)
    ref = xs @ w.to(torch.float64).T
    return (float((ref - xs @ w_hat.to(torch.float64).T).pow(2).sum()),
            float((ref - xs @ w_rtn.to(torch.float64).T).pow(2).sum()), float(ref.pow(2).sum()))


def to_cpu(qt: QTensor) -> QTensor:
    """``qt`` with its tensors on the CPU (no copy when they are there already)."""
    return QTensor(qt.q.cpu(), qt.scale.cpu(), None if qt.zero is None else qt.zero.cpu(), qt.spec, qt.convention)


def rel_mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||x Wᵀ - x Ŵᵀ||² / ||x Wᵀ||²`` in float64 (0 for no tokens or a zero output)."""
    if x.shape[0] == 0:
        return 0.0
    x64 = x.to(torch.float64)
    ref = x64 @ w.to(x64.device, torch.float64).T
    num = float((ref - x64 @ w_hat.to(x64.device, torch.float64).T).pow(2).sum())
    den = float(ref.pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


#: Default calibration memory budget when ``--max-memory`` is not given: this share of physical RAM, at most
#: :data:`DEFAULT_BUDGET_CAP` bytes (the expert group size and AWQ candidate chunk follow from it).
DEFAULT_BUDGET_SHARE = 0.6
DEFAULT_BUDGET_CAP = 8 * 2**30


def default_budget() -> int:
    """Bytes the calibration engine plans for without ``--max-memory``: ``min(0.6 x RAM, 8 GiB)``."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_BUDGET_CAP
    return int(min(DEFAULT_BUDGET_SHARE * ram, DEFAULT_BUDGET_CAP))



class CalibrationEngineBase(ABC):
    """The state and driving interface the layer-streamed calibration engines share; a subclass adds
    ``run_layer(i) -> LayerResult`` (called for 0, 1, 2, ... in order), :meth:`peak_memory_estimate` and
    :meth:`_plan_groups`, and names its reference forward in :attr:`model_class` (built over a
    :class:`LayerSource` of ``source``; ``model.embed(ids)`` gives a sequence's first residual stream).

    The arguments are those of :class:`~dsconvert.convert.calibrate.CalibrationEngine` (which checks
    ``method`` and ``expert_policy`` before calling this).

    Raises:
        UsageError: empty calibration set, or ids outside the vocabulary.
    """

    model_class: type

    def __init__(self, source: WeightSource, policy: Policy, method: str, convention: Convention,
                 calib_ids: Sequence[Sequence[int]], *, dtype: torch.dtype, damp: float, act_order: bool,
                 n_grid: int, min_expert_tokens: int, expert_policy: str,
                 progress: Callable[[int, str], None] | None, device: torch.device | str | None,
                 keep_folded: bool, expert_group: int | None, max_memory: int | None, spill_dir: Path | None):
        seqs = [torch.as_tensor(list(s), dtype=torch.long) for s in calib_ids]
        seqs = [s for s in seqs if s.numel()]
        if not seqs:
            raise UsageError("no calibration tokens", hint="pass at least one non-empty token sequence")
        #: the source as the layers read it (one layer's non-expert tensors cached, overrides served)
        self.source = LayerSource(source)
        self.model = self.model_class(self.source, dtype)
        self.cfg = self.model.cfg
        vocab = self.cfg.vocab_size
        if any(int(s.min()) < 0 or int(s.max()) >= vocab for s in seqs):
            raise UsageError(f"calibration token id outside 0..{vocab - 1}")
        self.policy = policy
        self.method = method
        self.convention = convention
        self.damp = damp
        self.act_order = act_order
        self.n_grid = n_grid
        self.min_expert_tokens = min_expert_tokens
        self.expert_policy = expert_policy
        self.progress = progress
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keep_folded = keep_folded
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        #: the calibration sequences (token ids, int64) and their positions ``0..T_s-1``
        self.ids = seqs
        self.positions = [torch.arange(s.numel()) for s in seqs]
        with torch.no_grad():
            self._hidden: list[torch.Tensor] = [self.model.embed(s) for s in seqs]
        self.source.reset()
        self.next_layer = 0
        self._fixed_group = expert_group
        self.set_budget(max_memory)

    @property
    def num_layers(self) -> int:
        """Decoder layers to calibrate (``num_hidden_layers``; the MTP layer is not included)."""
        return self.cfg.num_hidden_layers

    @property
    def num_tokens(self) -> int:
        """Calibration tokens in all sequences."""
        return sum(int(p.numel()) for p in self.positions)

    @property
    def hidden_states(self) -> list[torch.Tensor]:
        """The residual stream after the last calibrated layer (quantized model), one tensor per calibration
        sequence: ``(T_s, hidden)`` (V3), ``(T_s, hc, hidden)`` mHC streams (V4)."""
        return self._hidden

    def restore(self, hidden: Sequence[torch.Tensor], next_layer: int) -> None:
        """Resume from a saved residual stream: ``hidden`` is :attr:`hidden_states` as it was after layer
        ``next_layer - 1`` (one tensor per calibration sequence, same shapes, any float dtype).

        Raises:
            UsageError: the sequence count or shapes differ from this engine's calibration set, or
                ``next_layer`` is outside ``0..num_layers``.
        """
        if len(hidden) != len(self._hidden) or any(tuple(h.shape) != tuple(o.shape)
                                                   for h, o in zip(hidden, self._hidden)):
            raise UsageError("saved calibration state does not match the calibration sequences",
                             hint="rerun without resuming (--overwrite)")
        if not 0 <= next_layer <= self.num_layers:
            raise UsageError(f"saved calibration state names layer {next_layer}, outside 0..{self.num_layers}")
        dtype = self._hidden[0].dtype
        self._hidden = [h.to(dtype) for h in hidden]
        self.next_layer = next_layer

    def set_budget(self, budget: int | None) -> None:
        """Plan the expert group size (and AWQ's candidate chunk where the engine has one) for ``budget``
        bytes (None: :func:`default_budget`); a group size given to the constructor is kept."""
        self.budget = budget if budget is not None else default_budget()
        self._plan_groups()

    @abstractmethod
    def _plan_groups(self) -> None:
        """Set :attr:`expert_group` (and the engine's other planned sizes) for :attr:`budget`."""

    @abstractmethod
    def peak_memory_estimate(self, spilled: bool | None = None) -> int:
        """Estimated peak bytes of one ``run_layer`` on top of the interpreter, for this model, calibration set
        and planned groups; ``spilled`` (default: whether :attr:`spill_dir` is set) says whether expert
        results go to disk."""

    @abstractmethod
    def run_layer(self, layer_idx: int) -> LayerResult:
        """Calibrate and quantize decoder layer ``layer_idx`` (called for 0, 1, 2, ... in order)."""

    def _check_next(self, layer_idx: int, mtp: str) -> None:
        """Refuse a ``run_layer(layer_idx)`` call that is out of order or past the decoder layers (``mtp``: what
        the message calls the MTP part, ``layer`` or ``block``).

        Raises:
            UsageError: ``layer_idx`` is not :attr:`next_layer`, or not below :attr:`num_layers`.
        """
        if layer_idx != self.next_layer:
            raise UsageError(f"run_layer({layer_idx}) called out of order: layer {self.next_layer} is next",
                             hint="call run_layer for 0..num_hidden_layers-1 in order, once each")
        if layer_idx >= self.num_layers:
            raise UsageError(f"layer {layer_idx} is not a decoder layer (0..{self.num_layers - 1}); "
                             f"the MTP {mtp} is not calibrated")

    def report_stage(self, layer_idx: int, stage: str) -> None:
        """Pass ``stage`` of layer ``layer_idx`` to the ``progress`` callback (if any)."""
        if self.progress is not None:
            self.progress(layer_idx, stage)
