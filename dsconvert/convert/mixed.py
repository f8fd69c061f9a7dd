"""Per-module schemes for ``dsconvert quantize``: FP4 schemes and mixed recipes in one compressed-tensors output.

:class:`Assignment` maps every quantizable weight to a :class:`ModuleCodec` (or None: kept in BF16) from a
:class:`~dsconvert.convert.recipe.Recipe` and ``--ignore``; :func:`mixed_quantization_config` writes one config
group per scheme, as compressed-tensors' ``QuantizationConfig.from_pretrained`` does (``group_0``, ``group_1``...
in order of first use, except that the scheme of unmatched modules, which targets ``Linear``, comes last; the
others target their recipe patterns; top-level ``format`` is the groups' common format or ``mixed-precision``).

Codecs:

* :class:`ContractCodec`: any scheme the format stores through the scheme/format contract (``IntFormat.bind``:
  pack-quantized, int-quantized, float-quantized).
* :class:`FP4Codec`: NVFP4 / MXFP4 through :mod:`dsconvert.formats.ct_fp4`. NVFP4 members of a fused pair
  ({q_a_proj, kv_a_proj_with_mqa}, {gate_proj, up_proj} of one MLP or expert) share one global scale from the
  absmax of both weights (docs/int-formats.md §12); NVFP4 W4A4 modules get ``input_global_scale`` from the
  absmax of their inputs on the calibration sequences (:func:`input_absmax`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UsageError
from ..formats.checkpoint import Checkpoint
from ..formats.compressed_tensors import ct_quantization_config
from ..formats.ct_fp4 import FP4_LAYOUTS, FP4Layout
from ..formats.int_format import TensorPlan
from ..quant.fp4_schemes import FP4Scheme
from ..quant.rtn import QuantSpec
from ..quant.schemes import SCHEMES, get_scheme, registered_schemes
from .policy import LayerPolicy, module_of
from .recipe import Recipe, check_fused_schemes

__all__ = ["ModuleCodec", "ContractCodec", "FP4Codec", "Assignment", "mixed_quantization_config", "input_absmax",
           "fused_partners"]

_PAIR = re.compile(r"^(?P<base>.*\.(?:mlp|mlp\.shared_experts|mlp\.experts\.\d+))\.(?P<p>gate_proj|up_proj)$")
_QKV_A = re.compile(r"^(?P<base>.*\.self_attn)\.(?P<p>q_a_proj|kv_a_proj_with_mqa)$")


def fused_partners(module: str) -> list[str]:
    """The other member of ``module``'s fused pair that vLLM loads with one global scale, or ``[]``."""
    m = _PAIR.match(module)
    if m:
        return [f"{m['base']}.{'up_proj' if m['p'] == 'gate_proj' else 'gate_proj'}"]
    m = _QKV_A.match(module)
    if m:
        return [f"{m['base']}.{'kv_a_proj_with_mqa' if m['p'] == 'q_a_proj' else 'q_a_proj'}"]
    return []


class ModuleCodec:
    """One scheme's module writer: ``plan``, ``compute`` (tensors + relative RMS error), ``config_group``."""

    scheme: str
    format: str

    def plan(self, module: str, shape: tuple[int, ...]) -> list[TensorPlan]:
        raise NotImplementedError

    def compute(self, module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        raise NotImplementedError

    def config_group(self, targets: list[str]) -> dict:
        raise NotImplementedError

    def bits_per_weight(self) -> float | None:
        return None


class ContractCodec(ModuleCodec):
    """Any scheme the ``--format`` stores through the scheme/format contract (W4A16, W8A16, W8A8, FP8_BLOCK...):
    the scheme's kernel quantizes in the bound codec's storage, the codec plans, packs and describes its group."""

    def __init__(self, scheme, desc, codec):
        self.scheme_obj, self.desc, self.codec = scheme, desc, codec
        self.scheme = desc.name
        self.format = codec.compression_format if hasattr(codec, "compression_format") else codec.name
        self.spec = desc.spec

    def plan(self, module, shape):
        return self.codec.plan(module, tuple(shape), self.spec)

    def compute(self, module, w):
        payload, err = self.scheme_obj.quantize_with_error(w, self.spec, self.codec.storage(self.desc), name=module)
        return self.codec.encode_qtensor(module, payload), err

    def config_group(self, targets):
        g = self.codec.quantization_config(self.spec)["config_groups"]["group_0"]
        return {**g, "targets": list(targets)}


class FP4Codec(ModuleCodec):
    """NVFP4 / MXFP4 modules (:class:`~dsconvert.formats.ct_fp4.FP4Layout`).

    Args:
        amax_of: ``amax_of(module)`` -> absmax of a module's weight in its own dtype (fused global scale).
        input_amax: module -> absmax of its calibration inputs (NVFP4 W4A4), or None when not needed.
    """

    def __init__(self, layout: FP4Layout, amax_of: Callable[[str], torch.Tensor],
                 input_amax: dict[str, float] | None):
        self.layout, self.amax_of, self.input_amax = layout, amax_of, input_amax
        self.scheme, self.format = layout.scheme, layout.format

    def plan(self, module, shape):
        return self.layout.plan(module, tuple(shape))

    def compute(self, module, w):
        gamax = None
        if self.layout.kind == "nvfp4":
            partners = fused_partners(module)
            gamax = w.abs().max() if w.numel() else torch.zeros((), dtype=w.dtype)
            for p in partners:
                gamax = torch.maximum(gamax, self.amax_of(p).to(w.dtype))
        ia = (self.input_amax or {}).get(module, 0.0) if self.layout.static_input_scale else None
        tensors = self.layout.encode(module, w, global_amax=gamax, input_absmax=ia)
        deq = self.layout.decode(tensors, w.dtype).to(torch.float64)
        w64 = w.to(torch.float64)
        n = float(torch.linalg.vector_norm(w64))
        err = float(torch.linalg.vector_norm(w64 - deq)) / n if n > 0 else 0.0
        return tensors, err

    def config_group(self, targets):
        return self.layout.config_group(targets)

    def bits_per_weight(self):
        return self.layout.bits_per_weight()


@dataclass
class _Group:
    codec: ModuleCodec
    targets: list[str]
    modules: list[str]


class Assignment:
    """Which codec each quantizable weight gets.

    Args:
        recipe: default scheme + rules (:func:`~dsconvert.convert.recipe.build_recipe`).
        ignore: ``--ignore`` patterns (keep in BF16; win over the recipe).
        fmt: the ``--format`` instance; FP4 schemes and mixed recipes need compressed-tensors.
        group_size: ``--group-size`` for integer schemes (None: each scheme's default).
        amax_of: see :class:`FP4Codec`.

    Raises:
        UsageError: an unknown scheme (listing them), a format that cannot store a scheme (naming the module).
    """

    def __init__(self, recipe: Recipe, ignore: list[str], fmt, group_size: int | None,
                 amax_of: Callable[[str], torch.Tensor]):
        self.recipe, self.fmt, self.group_size, self.amax_of = recipe, fmt, group_size, amax_of
        self.policy = LayerPolicy(QuantSpec(4), list(ignore))  # only its keep/ignore decision is used
        self.codecs: dict[str, ModuleCodec] = {}  # canonical scheme name -> codec
        self.input_amax: dict[str, float] | None = None
        self.decisions: dict[str, str | None] = {}  # weight name -> canonical scheme (None: BF16)
        self.module_codec: dict[str, ModuleCodec] = {}

    @staticmethod
    def canonical(scheme: str | None, module: str | None = None) -> str | None:
        """The registered name of ``scheme`` (None stays None). Raises UsageError for an unknown one."""
        if scheme is None:
            return None
        try:
            return SCHEMES.canonical(scheme)
        except KeyError:
            where = f" (for module {module})" if module else ""
            raise UsageError(f"unknown scheme {scheme!r}{where}",
                             hint="schemes: " + ", ".join(registered_schemes()) + "; BF16 keeps a module") from None

    def codec(self, scheme: str | None, module: str) -> ModuleCodec | None:
        scheme = self.canonical(scheme, module)
        if scheme is None:
            return None
        if scheme not in self.codecs:
            sch = get_scheme(scheme)
            if isinstance(sch, FP4Scheme):
                if self.fmt.name != "compressed-tensors":
                    raise UsageError(f"format {self.fmt.name} cannot store scheme {sch.name} (module {module})",
                                     hint="use --format compressed-tensors (nvfp4/mxfp4-pack-quantized)")
                layout = FP4_LAYOUTS[sch.name]
                self.codecs[scheme] = FP4Codec(layout, self.amax_of, None)
            else:
                if self.recipe.mixed and self.fmt.name != "compressed-tensors":
                    raise UsageError(f"a mixed recipe needs --format compressed-tensors (config groups); "
                                     f"format {self.fmt.name} holds one scheme (module {module})")
                try:
                    desc = sch.describe(self.group_size)
                except UsageError:
                    if self.group_size is None:
                        raise
                    desc = sch.describe(None)  # --group-size applies to the group-wise schemes of a recipe
                self.codecs[scheme] = ContractCodec(sch, desc, self.fmt.bind(desc, module))
        return self.codecs[scheme]

    def __call__(self, name: str, shape: tuple[int, ...]) -> ModuleCodec | None:
        """The codec for weight ``name`` (None: keep). Records the decision for the fused-group check."""
        if not LayerPolicy.quantizable(name, shape):
            return None
        mod = module_of(name)
        kept = self.policy(name, shape) is None
        scheme = None if kept else self.recipe.scheme_for(mod)
        c = self.codec(scheme, mod)
        self.decisions[name] = c.scheme if c is not None else None
        if c is not None:
            self.module_codec[mod] = c
        return c

    def check(self) -> None:
        """Refuse fused groups split across schemes (exit 2)."""
        check_fused_schemes(self.decisions)

    def needs_input_calibration(self) -> bool:
        return any(isinstance(c, FP4Codec) and c.layout.static_input_scale for c in self.codecs.values())

    def set_input_amax(self, amax: dict[str, float]) -> None:
        self.input_amax = amax
        for c in self.codecs.values():
            if isinstance(c, FP4Codec):
                c.input_amax = amax

    def groups(self) -> list[_Group]:
        """Config groups in order of first use, the default scheme's (targets ``Linear``) last; the others target
        the patterns of the rules that chose them (only rules that matched a module)."""
        out: dict[str, _Group] = {}
        for name, scheme in self.decisions.items():
            if scheme is not None:
                out.setdefault(scheme, _Group(self.codecs[scheme], [], [])).modules.append(module_of(name))
        default = self.canonical(self.recipe.default)
        for scheme, g in out.items():
            if scheme == default:
                g.targets = ["Linear"]
                continue
            for r in self.recipe.rules:
                if self.canonical(r.scheme) == scheme and any(r.matches(m) for m in g.modules):
                    g.targets += [t for t in r.targets if t not in g.targets]
        # the class-target group last: vLLM prefers name/regex targets anyway, but compressed-tensors' offline
        # tools (its dequantizer) give each module to the first group that matches it
        return sorted(out.values(), key=lambda g: g.targets == ["Linear"])


def mixed_quantization_config(groups: list[_Group], ignore: list[str]) -> dict:
    """``quantization_config`` with one config group per scheme, as compressed-tensors 0.20.1 writes it."""
    formats = {g.codec.format for g in groups}
    return ct_quantization_config({f"group_{i}": g.codec.config_group(g.targets) for i, g in enumerate(groups)},
                                  formats.pop() if len(formats) == 1 else "mixed-precision", ignore)


def input_absmax(ck: Checkpoint, modules: set[str], seqs: list[list[int]]) -> dict[str, float]:
    """absmax of each module's input over the calibration sequences, through the reference forward of ``ck``.

    Routed experts see only the tokens routed to them (an expert that got none is absent: its
    ``input_global_scale`` becomes 1.0, compressed-tensors' value for an unobserved input). llm-compressor by
    default runs every token through every expert during calibration, so its expert scales can differ.
    """
    from .validate import CheckpointWeightSource, forward_many

    seen: dict[str, float] = {}
    lock = threading.Lock()

    def hook(name: str, x: torch.Tensor):
        if name in modules and x.numel():
            v = float(x.detach().abs().max())
            with lock:
                seen[name] = max(v, seen.get(name, 0.0))
        return None

    forward_many(CheckpointWeightSource(ck.root), seqs, torch.bfloat16, return_hidden=False, on_linear=hook)
    return seen


def describe_groups(groups: list[_Group], param_of: Callable[[str], int],
                    bytes_of: Callable[[str], int], passed_through: Callable[[str], bool] = lambda m: False
                    ) -> list[dict]:
    """Per config group: scheme, format, targets, modules, parameters, bytes, bits per weight, and how many of
    its modules are copied unchanged from the source (``passed_through``: DeepSeek-V4's FP4 experts to MXFP4)."""
    out = []
    for i, g in enumerate(groups):
        p = sum(param_of(m) for m in g.modules)
        b = sum(bytes_of(m) for m in g.modules)
        out.append({"group": f"group_{i}", "scheme": g.codec.scheme, "format": g.codec.format,
                    "targets": g.targets, "modules": len(g.modules), "parameters": p, "bytes": b,
                    "bits_per_weight": round(8 * b / p, 4) if p else None,
                    "passed_through": sum(1 for m in g.modules if passed_through(m))})
    return out



def mixed_setup(ck: Checkpoint, opts, fmt, device: torch.device, read_weight: Callable[[Checkpoint, str], torch.Tensor]):
    """The :class:`Assignment` and the per-module ``compute(module) -> ModuleResult`` for ``opts``.

    Raises:
        UsageError: ``--awq``/``--gptq`` with per-module schemes (not supported), recipe errors.
    """
    from .quantize import ModuleResult
    from .recipe import build_recipe

    if opts.method != "rtn":
        raise UsageError(f"--{opts.method} with FP4 schemes or a mixed recipe is not supported",
                         hint="use RTN (no --awq/--gptq) for these, or a single integer scheme with calibration")
    recipe = build_recipe(opts.scheme if opts.scheme_given else None, opts.preset,
                          opts.recipe, opts.scheme_for)
    if ck.v4 is not None:
        from .recipe import for_v4

        recipe = for_v4(recipe)
    amax_cache: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def amax_of(module: str) -> torch.Tensor:
        with lock:
            v = amax_cache.get(module)
        if v is None:
            w = read_weight(ck, module + ".weight")
            v = w.abs().max() if w.numel() else torch.zeros((), dtype=w.dtype)
            with lock:
                amax_cache[module] = v
        return v

    assign = Assignment(recipe, list(opts.ignore), fmt, opts.group_size, amax_of)

    def compute(module: str):
        codec = assign.module_codec[module]
        if passes_through(ck, module, codec):
            return ModuleResult(mxfp4_passthrough(ck, module, codec.layout), 0.0)
        w = read_weight(ck, module + ".weight").to(device)
        with lock:
            amax_cache.setdefault(module, w.abs().max().cpu() if w.numel() else torch.zeros((), dtype=w.dtype))
        tensors, err = assign.module_codec[module].compute(module, w)
        return ModuleResult({k: v.cpu() for k, v in tensors.items()}, err)

    return assign, compute


def passes_through(ck: Checkpoint, module: str, codec) -> bool:
    """True when ``module``'s stored weight is already what ``codec`` writes: a release FP4 (e2m1, E8M0 per 32)
    weight going to compressed-tensors MXFP4, whose bytes are copied (:func:`mxfp4_passthrough`)."""
    return (ck.is_fp4_weight(module + ".weight") and isinstance(codec, FP4Codec)
            and codec.layout.kind == "mxfp4")


def mxfp4_passthrough(ck: Checkpoint, module: str, layout: FP4Layout) -> dict[str, torch.Tensor]:
    """A DeepSeek-V4 FP4 routed expert written as compressed-tensors MXFP4 without requantizing: the release's
    e2m1 codes (``I8 [M, N/2]``, element ``2j`` in the low nibble) and E8M0 scales (``[M, N/32]``, one per 32
    inputs) are MXFP4's ``weight_packed`` (``U8``, same nibble order) and ``weight_scale`` (``U8`` e8m0 exponent,
    bias 127) byte for byte: only the dtype label changes (docs/int-formats.md §12, docs/checkpoint-layout.md §13).

    Returns:
        ``{module.weight_packed: uint8 [M, N/2], module.weight_scale: uint8 [M, N/32]}`` in ``layout.plan`` order.
    """
    packed = ck.read(module + ".weight").contiguous().view(torch.uint8)
    scale = ck.read(ck.scale_of(module + ".weight")).contiguous().view(torch.uint8)
    names = [p.name for p in layout.plan(module, (packed.shape[0], 2 * packed.shape[1]))]
    assert len(names) == 2, names  # MXFP4 weights carry no global or input scale
    return {names[0]: packed, names[1]: scale}
