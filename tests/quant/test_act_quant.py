"""Activation quantize-dequantize rules (dsconvert.quant.act_quant) against compressed-tensors' fake quantization
and slow per-token references."""

from __future__ import annotations

import pytest
import torch

from dsconvert.errors import UnsupportedError
from dsconvert.quant import act_quant

from .._reference import fp8_e4m3fn_table

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam  # noqa: E402


def _acts(t, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((t, n), generator=g) * torch.logspace(-3, 2, t).unsqueeze(1)
    x[0] = 0.0
    x[1, :5] = torch.tensor([1000.0, -1000.0, 0.5, -0.0, 3.0])
    return x.to(dtype)


def _ct_fake(x, args, global_scale=None):
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=global_scale)
    return fake_quantize(x=x, scale=scale, zero_point=zp, args=args, global_scale=global_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_activation_equals_compressed_tensors_fake_quant(dtype):
    x = _acts(12, 64, 0, dtype)
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    amax = x.abs().max()
    gs = generate_gparam(-amax.reshape(1), amax.reshape(1))  # what calibration stores as input_global_scale
    want = _ct_fake(x, args, gs)
    got = act_quant.nvfp4_activation(x, gs)
    assert got.dtype == x.dtype and torch.equal(got, want.to(got.dtype))
    assert not torch.equal(got, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_activation_equals_compressed_tensors_fake_quant(dtype):
    x = _acts(9, 96, 1, dtype)
    args = preset_name_to_scheme("MXFP4", ["Linear"]).input_activations
    assert torch.equal(act_quant.mxfp4_activation(x), _ct_fake(x, args).to(dtype))


def test_int8_per_token_matches_slow_reference():
    x = _acts(7, 40, 2)
    got = act_quant.int8_per_token(x)
    for t in range(x.shape[0]):
        amax = max(abs(v) for v in x[t].tolist())
        s = torch.tensor(amax, dtype=torch.float32) / 127.0
        for j in range(x.shape[1]):
            v = float(x[t, j])
            q = 0.0 if amax == 0 else min(127.0, max(-128.0, float(torch.round(torch.tensor(v) / s))))
            assert float(got[t, j]) == float(torch.tensor(q) * s), (t, j)


def test_fp8_per_token_group_matches_slow_reference():
    x = _acts(5, 256, 3)
    got = act_quant.fp8_per_token_group(x, 128)
    table = fp8_e4m3fn_table()
    finite = table[~torch.isnan(table)]
    for t in range(x.shape[0]):
        for g0 in (0, 128):
            grp = x[t, g0:g0 + 128]
            s = torch.clamp(grp.abs().max(), min=1e-10) / 448.0
            for j in range(0, 128, 7):
                r = float(torch.clamp(grp[j] / s, -448, 448))
                # nearest e4m3 value, ties to the even mantissa (torch's cast), by brute force over the table
                d = (finite - r).abs()
                cands = finite[d == d.min()]
                pick = cands[0] if len(cands) == 1 else [c for c in cands.tolist()
                                                        if torch.tensor(c).to(torch.float8_e4m3fn).view(
                                                            torch.uint8).item() % 2 == 0][0]
                assert float(got[t, g0 + j]) == float(torch.tensor(float(pick)) * s), (t, g0 + j)


def test_dispatch_from_config_args():
    w8a8 = {"dynamic": True, "num_bits": 8, "strategy": "token", "symmetric": True, "type": "int"}
    fp8 = {"dynamic": True, "group_size": 128, "num_bits": 8, "strategy": "group", "symmetric": True, "type": "float"}
    x = _acts(4, 128, 4)
    assert torch.equal(act_quant.activation_quantizer(w8a8)(x, {}), act_quant.int8_per_token(x))
    assert torch.equal(act_quant.activation_quantizer(fp8)(x, {}), act_quant.fp8_per_token_group(x))
    assert act_quant.activation_quantizer(None) is None
    nv = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations.model_dump(mode="json", exclude_unset=True)
    with pytest.raises(UnsupportedError, match="input_global_scale"):
        act_quant.activation_quantizer(nv)(x, {})
    with pytest.raises(UnsupportedError):
        act_quant.activation_quantizer({**w8a8, "dynamic": False})
