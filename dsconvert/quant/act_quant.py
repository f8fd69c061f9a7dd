"""Dynamic activation quantize-dequantize, as the serving engine applies it to a Linear's input.

``validate`` uses these to emulate a candidate whose ``quantization_config`` declares ``input_activations``,
so it measures what the engine computes (docs/int-formats.md §13). Inputs are ``x`` ``(T, N)`` (tokens x
in_features), any float dtype; every function returns a tensor of ``x``'s shape and dtype, computed in float32
unless noted:

* **int8, per token** (W8A8 ``int-quantized``): ``s = absmax_token / 127``,
  ``q = clamp(round_half_even(x / s), -128, 127)``, ``x' = q * s`` (vLLM ``dynamic_scaled_int8_quant``,
  symmetric). An all-zero token stays zero.
* **fp8 e4m3, per token group of 128** (FP8_BLOCK ``float-quantized``): ``s = max(absmax_group, 1e-10) / 448``,
  ``x' = e4m3(x / s) * s`` (DeepSeek ``inference/kernel.py::act_quant``, vLLM ``per_token_group_quant_fp8``).
* **NVFP4, per token group of 16** (``nvfp4-pack-quantized`` W4A4): with the module's calibrated
  ``input_global_scale`` ``gs``, ``s = e4m3(gs * (absmax_group / 6))`` (0 -> 0.125), ``x' = e2m1(x / (s / gs)) *
  (s / gs)``, computed in ``x``'s dtype where compressed-tensors' fake quantization computes it.
* **MXFP4, per token group of 32**: the weight rule of :func:`dsconvert.quant.fp4.mxfp4_quantize` on each token.

Which rule applies comes from the config group's ``input_activations`` dict (:func:`activation_quantizer`).
"""

from __future__ import annotations

from typing import Callable

import torch

from dsconvert.errors import UnsupportedError
from dsconvert.quant import fp4

__all__ = ["int8_per_token", "fp8_per_token_group", "nvfp4_activation", "mxfp4_activation",
           "activation_quantizer", "describe_activation"]

_FP8_MAX = 448.0
_FP8_EPS = 1e-10


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric dynamic int8 per token: ``round(x / (absmax / 127))`` clamped to int8, times the scale."""
    xf = x.to(torch.float32)
    s = xf.abs().amax(dim=-1, keepdim=True) / 127.0  # (T, 1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(xf / safe), -128, 127)
    return (q * s).to(x.dtype)


def fp8_per_token_group(x: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """e4m3 per ``group_size`` channels of each token, scale ``max(absmax, 1e-10) / 448``.

    A last partial group (N not a multiple of ``group_size``: only test fixtures; every DeepSeek-V3 width divides
    by 128) is quantized over its own channels, as zero padding to a whole group would.
    """
    t, n = x.shape
    pad = (-n) % group_size
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).unflatten(-1, (-1, group_size))  # (T, G, g)
    s = torch.clamp(xf.abs().amax(dim=-1, keepdim=True), min=_FP8_EPS) / _FP8_MAX  # (T, G, 1)
    q = torch.clamp(xf / s, -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return (q * s).flatten(-2)[:, :n].to(x.dtype)


def nvfp4_activation(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization of ``x`` ``(T, N)`` with the module's ``input_global_scale`` (float32 ``[1]``).

    Source: compressed-tensors 0.20.1 ``compute_dynamic_scales_and_zp`` + ``calculate_qparams`` +
    ``_quantize_dequantize`` for ``dynamic: local``, ``strategy: tensor_group``, group 16.

    Raises:
        ShapeError: N % 16 != 0.
    """
    gs = input_global_scale.to(torch.float32).reshape(1)
    amax = fp4.group_absmax(x, fp4.NVFP4_GROUP)  # (T, G) x.dtype
    s = gs * (amax / torch.tensor(fp4.E2M1_MAX, dtype=x.dtype))  # float32
    s = torch.clamp(s, -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    s = torch.where(s == 0, torch.tensor(0.125), s)
    eff = (s / gs).unsqueeze(-1)  # (T, G, 1) float32
    grp = x.unflatten(-1, (-1, fp4.NVFP4_GROUP))
    q = fp4.e2m1_decode(fp4.e2m1_encode(torch.clamp(grp / eff, -fp4.E2M1_MAX, fp4.E2M1_MAX)))
    return (q * eff).flatten(-2).to(x.dtype)


def mxfp4_activation(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 fake quantization of ``x`` ``(T, N)``: e8m0 exponent per 32 channels, e2m1 values.

    Raises:
        ShapeError: N % 32 != 0.
    """
    xd = x if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else x.to(torch.float32)
    t = fp4.mxfp4_quantize(xd)
    return fp4.mxfp4_dequantize(t, torch.float32).to(x.dtype)


def describe_activation(args: dict | None) -> str | None:
    """A short name for an ``input_activations`` dict (``int8 per token``, ...), None when there is none."""
    if not args:
        return None
    return f"{args.get('type')}{args.get('num_bits')} {args.get('strategy')}" + (
        f" {args.get('group_size')}" if args.get("group_size") else "")


def activation_quantizer(args: dict | None) -> Callable[[torch.Tensor, dict], torch.Tensor] | None:
    """``f(x, module_tensors) -> x'`` for a config group's ``input_activations`` dict; None when it has none.

    ``module_tensors`` holds the module's stored tensors by suffix (``input_global_scale`` for NVFP4).

    Raises:
        UnsupportedError: activation args no rule here implements (static int8/fp8 scales, asymmetric...).
    """
    if not args:
        return None
    typ, bits, strat = args.get("type"), int(args.get("num_bits") or 0), args.get("strategy")
    dyn, sym, g = args.get("dynamic"), args.get("symmetric", True), args.get("group_size")
    if typ == "int" and bits == 8 and strat == "token" and dyn is True and sym:
        return lambda x, _t: int8_per_token(x)
    if typ == "float" and bits == 8 and strat == "group" and dyn is True and sym and g:
        return lambda x, _t, g=int(g): fp8_per_token_group(x, g)
    if typ == "float" and bits == 4 and strat == "tensor_group" and dyn == "local" and g == 16:
        def nv(x, tensors):
            if "input_global_scale" not in tensors:
                raise UnsupportedError("NVFP4 activations need the module's input_global_scale tensor",
                                       remedy="requantize")
            return nvfp4_activation(x, tensors["input_global_scale"])
        return nv
    if typ == "float" and bits == 4 and strat == "group" and dyn is True and g == 32:
        return lambda x, _t: mxfp4_activation(x)
    raise UnsupportedError(f"input_activations {args} are not emulated (dynamic int8 per token, fp8 per token "
                           "group, NVFP4 and MXFP4 are)", remedy="weight-only")
