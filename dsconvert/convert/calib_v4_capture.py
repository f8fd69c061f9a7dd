"""One DeepSeek-V4 decoder layer's calibration capture for
:class:`~dsconvert.convert.calibrate_v4.V4CalibrationEngine`: the inputs of every quantizable linear (AWQ: cached;
GPTQ: their Hessians, accumulated as the forward produces them, and a token sample), the MoE input, each routed
expert's token rows and calibration choice, the expert groups, and the layer's results as the stages
(:mod:`.calib_v4_gptq`, :mod:`.calib_v4_awq`) fill them; the stages read it only through the public methods of
:class:`V4LayerCapture`. The module notes of :mod:`dsconvert.convert.calibrate_v4` describe the whole loop.

The V4 forward (:class:`~dsconvert.model.v4.V4ReferenceModel`) calls its ``on_linear`` hook with the input of
every Linear it runs; routed experts are run only on the tokens routed to them, so an expert's hook sees exactly
those rows. :func:`capture_hook` narrows that hook to the linears ``quantize`` quantizes on V4
(:data:`~dsconvert.formats.deepseek_v4.QUANTIZABLE`) and hands each input on as a float32 ``(n, K)`` matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..formats.deepseek_v4 import QUANTIZABLE as V4_QUANTIZABLE
from ..model.layers import LinearHook
from ..quant.gptq import HessianAccumulator
from .calib_base import STAT_TOKENS, LayerResults, expert_ranges

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])$")


def is_quantizable(module: str) -> bool:
    """Whether release module ``module`` (``layers.3.attn.wq_a``, no ``.weight``) is a linear V4 quantize
    quantizes (:data:`~dsconvert.formats.deepseek_v4.QUANTIZABLE`)."""
    return V4_QUANTIZABLE.match(module + ".weight") is not None


def is_routed_expert(module: str) -> bool:
    """Whether ``module`` is a routed expert's ``w1``/``w2``/``w3`` (``layers.3.ffn.experts.7.w2``)."""
    return _EXPERT.match(module) is not None


def capture_hook(sink: Callable[[str, torch.Tensor], None],
                 keep: Callable[[str], bool] = is_quantizable) -> LinearHook:
    """An ``on_linear`` hook for :meth:`V4ReferenceModel.layer_forward_many` / ``forward`` that calls
    ``sink(module, x)`` for each module ``keep`` accepts, with ``x`` its input ``(n, K)`` float32 (a detached
    copy; ``n`` = the tokens of the call: all tokens for dense linears, the routed tokens for a routed
    expert). The forward's own input is not replaced."""

    def hook(name: str, x: torch.Tensor) -> None:
        if keep(name):
            sink(name, x.detach().reshape(-1, x.shape[-1]).to(torch.float32))
        return None

    return hook


def input_key(module: str) -> str:
    """The captured input ``module`` reads: ``w3`` reads its MLP's ``w1`` input (``w3``'s is never captured)."""
    return module[:-2] + "w1" if module.endswith(".w3") else module


class V4LayerCapture:
    """The capture of one :meth:`V4CalibrationEngine.run_layer` call (dropped when it returns).

    Attributes (the layer's record, filled by the stages):
        quantized: :class:`~.calib_base.LayerResults` ``{module: QTensor}``.
        replaced: ``{release tensor name: float32}``: AWQ's folded norms and kept linears.
        folded: ``keep_folded``: every folded weight before clip search and quantization (AWQ).
        stats: ``layer``, ``method``, ``tokens``, ``linears``, ``experts``, ``smoothing``, ``clip``.
        p: the layer's name prefix ``layers.{idx}.``.
    """

    def __init__(self, eng, idx: int):
        self.eng, self.idx, self.dev = eng, idx, eng.device
        self.p = f"layers.{idx}."
        self.quantized = LayerResults(eng.spill_dir, f"layer{idx}")
        self.stats: dict = {"layer": idx, "method": eng.method, "tokens": eng.num_tokens, "linears": {},
                            "experts": {}, "smoothing": {}, "clip": {}}
        self.replaced: dict[str, torch.Tensor] = {}
        self.folded: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}  # AWQ: cached inputs of the non-expert linears
        self._hess: dict[str, HessianAccumulator] = {}  # GPTQ: Hessian key -> accumulator (non-expert linears)
        self._sample: dict[str, list[torch.Tensor]] = {}  # GPTQ: Hessian key -> input rows for the statistic
        self._rows: dict[str, list[torch.Tensor]] = {}  # routed expert "e.in" / "e.w2" -> input rows
        self._moe_in: list[torch.Tensor] = []
        self._spec_cache: dict[str, object] = {}
        self._shape_probe: dict[str, torch.Tensor] = {}

    # -- names, weights, policy ---------------------------------------------------------------------------
    def spec(self, module: str, w: torch.Tensor):
        """The policy's ``QuantSpec | None`` for ``module`` with weight (or stand-in) ``w`` (cached by name)."""
        if module not in self._spec_cache:
            self._spec_cache[module] = self.eng.policy(module, tuple(w.shape))
        return self._spec_cache[module]

    def weight(self, module: str) -> torch.Tensor:
        """``module``'s source weight in float32 on the kernel device (read from the source each call)."""
        return self.eng.source.get(module + ".weight").to(device=self.dev, dtype=torch.float32)

    def weight_shape(self, module: str) -> torch.Tensor:
        """A stand-in with the weight's shape for the policy (which reads only the shape)."""
        if module not in self._shape_probe:
            self._shape_probe[module] = torch.empty(tuple(self.weight(module).shape), device="meta")
        return self._shape_probe[module]

    def has_weight(self, module: str) -> bool:
        """Whether the checkpoint has ``module``'s weight."""
        return self.eng.source.inner.has(module + ".weight")

    # -- capture ------------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Run the float layer on every calibration sequence (:meth:`V4ReferenceModel.layer_forward_many`),
        keeping the MoE input, each routed expert's rows (``w1``'s, shared by ``w3``, and ``w2``'s) and, per
        non-expert linear, its input (AWQ) or its Hessian and a token sample (GPTQ; ``wo_a``: one per group)."""
        eng, g = self.eng, self.eng.cfg.geo
        kg = g.heads * g.head_dim // g.o_groups
        step = max(1, eng.num_tokens // STAT_TOKENS)

        awq = eng.method == "awq"

        def add(key: str, x: torch.Tensor) -> None:
            if awq:
                self._inputs.setdefault(key, []).append(x.to(self.dev))
                return
            acc = self._hess.get(key)
            if acc is None:
                acc = self._hess[key] = HessianAccumulator(x.shape[1], device=self.dev)
            acc.add(x.to(self.dev))
            self._sample.setdefault(key, []).append(x[::step])

        def sink(name: str, x: torch.Tensor) -> None:
            if name == self.p + "ffn.gate":
                self._moe_in.append(x.clone())
                return
            m = _EXPERT.match(name)
            if m is not None:
                if m.group(3) != "w3":  # w3 sees w1's rows
                    self._rows.setdefault(f"{m.group(2)}.{'in' if m.group(3) == 'w1' else 'w2'}", []).append(x)
                return
            if name.endswith(".w3"):
                return
            if name == self.p + "attn.wo_a" and not awq:
                for j in range(g.o_groups):
                    add(f"{name}#{j}", x[:, j * kg:(j + 1) * kg])
                return
            add(name, x)

        keep = lambda n: n == self.p + "ffn.gate" or is_quantizable(n)  # noqa: E731
        eng.model.layer_forward_many(self.idx, eng.hidden_states, eng.positions, capture_hook(sink, keep),
                                     token_ids=eng.ids)

    # -- what the stages read -----------------------------------------------------------------------------
    def has_input(self, module: str) -> bool:
        """AWQ: whether the input :func:`input_key` names for non-expert ``module`` was captured."""
        return input_key(module) in self._inputs

    def input(self, module: str) -> torch.Tensor:
        """AWQ: the cached input ``(T, K)`` float32 of non-expert ``module`` (its own name, not :func:`input_key`)."""
        xs = self._inputs[module]
        return torch.cat(xs) if len(xs) > 1 else xs[0]

    def drop_inputs(self) -> None:
        """AWQ: free the non-expert inputs."""
        self._inputs.clear()

    def hessian_keys(self) -> list[str]:
        """GPTQ: the Hessian keys in capture order (a linear's name; ``wo_a`` group ``j``: ``NAME#j``)."""
        return list(self._hess)

    def has_hessian(self, key: str) -> bool:
        """GPTQ: whether Hessian ``key`` was accumulated."""
        return key in self._hess

    def hessian(self, key: str) -> HessianAccumulator:
        """GPTQ: the accumulator of ``key`` (``H`` ``(K, K)`` float32, ``n`` rows)."""
        return self._hess[key]

    def sample(self, key: str) -> torch.Tensor:
        """GPTQ: the token sample of ``key``'s input (every ``T // STAT_TOKENS``-th row), ``(n, K)`` float32."""
        return torch.cat(self._sample[key])

    def drop_hessians(self) -> None:
        """GPTQ: free the non-expert Hessians and samples."""
        self._hess.clear()
        self._sample.clear()

    def take_moe_input(self) -> torch.Tensor | None:
        """The MoE input ``(T, hidden)`` float32 (None if the forward had none); the capture lets it go."""
        x = torch.cat(self._moe_in) if self._moe_in else None
        self._moe_in = []
        return x

    def take_expert_rows(self, e: int, kind: str) -> list[torch.Tensor]:
        """Routed expert ``e``'s input rows, per calibration call: ``kind="in"`` (``w1``/``w3``) or ``"w2"``;
        the capture lets them go."""
        return self._rows.pop(f"{e}.{kind}", [])

    def set_expert_policy(self, e: int, routed: int) -> str:
        """Record and return how routed expert ``e`` (``routed`` tokens) is calibrated: ``routed``, or the
        engine's ``expert_policy`` under ``min_expert_tokens``."""
        pol = "routed" if routed >= self.eng.min_expert_tokens else self.eng.expert_policy
        self.stats["experts"][e] = {"tokens_routed": routed, "policy": pol}
        return pol

    def swiglu_input(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        """``w2``'s input on rows ``x`` as the forward computes it: ``silu(clamp(x W1ᵀ)) * clamp(x W3ᵀ)`` in the
        model dtype on the CPU (unfolded weights), returned float32 on the kernel device."""
        lim, md = self.eng.cfg.swiglu_limit, self.eng.model.dtype
        xm = x.to("cpu", md)
        a = F.linear(xm, w1.to("cpu", md)).clamp(max=lim)
        b = F.linear(xm, w3.to("cpu", md)).clamp(min=-lim, max=lim)
        return (F.silu(a) * b).to(device=self.dev, dtype=torch.float32)

    # -- expert groups (:class:`~.calib_capture.CalibStage`) ---------------------------------------------------
    def groups(self) -> list[tuple[int, int]]:
        """The routed expert groups ``[(e0, e1), ...]`` of the engine's ``expert_group`` experts."""
        return expert_ranges(self.eng.cfg.geo.experts, self.eng.expert_group)

    def report_group(self, e0: int, e1: int) -> None:
        """Name the stage of the expert group ``e0..e1-1`` in flight."""
        self.eng.report_stage(self.idx, f"calibrating experts {e0}-{e1 - 1}")

    def release(self) -> None:
        """Drop every cache of the capture (the record stays)."""
        self._inputs.clear()
        self._hess.clear()
        self._sample.clear()
        self._rows.clear()
        self._moe_in = []
