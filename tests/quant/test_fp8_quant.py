"""FP8 block quantization kernel (dsconvert.quant.fp8_quant) and scheme descriptions (dsconvert.quant.schemes).

Oracles: the fixture's own DeepSeek-rule quantizer (dsconvert.testing.fixtures.quantize_fp8_block, amax/448 per
zero-padded block, written independently), the table decoder in tests/_reference.py, and compressed-tensors' presets.
"""

import pytest
import torch

from dsconvert.quant.fp8_quant import FP8BlockSpec, dequantize_fp8_block, quantize_fp8_block
from dsconvert.testing.fixtures import quantize_fp8_block as fixture_quantize
from tests._reference import dequant_fp8_block_reference


def _w(m, n, seed=0, bf16=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * 0.02
    return w.bfloat16().float() if bf16 else w


@pytest.mark.parametrize("shape", [(200, 300), (130, 256), (128, 128)])
def test_matches_independent_deepseek_rule(shape):
    w = _w(*shape)
    ours = quantize_fp8_block(w)
    q, s = fixture_quantize(w)
    assert torch.equal(ours.q.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ours.scale, s)


def test_bf16_round_trip_is_byte_exact():
    w = _w(200, 300, seed=1)
    a = quantize_fp8_block(w)
    bf16 = dequant_fp8_block_reference(a.q, a.scale)  # independent table decoder
    assert torch.equal(bf16, dequantize_fp8_block(a))
    b = quantize_fp8_block(bf16)
    assert torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8))
    assert torch.equal(a.scale, b.scale)


def test_release_from_fp32_weights_payload_round_trips():
    """A release quantized from fp32 weights: the payload comes back exactly, scales within 2^-8 relative."""
    q, s = fixture_quantize(_w(200, 300, seed=2, bf16=False))
    b = quantize_fp8_block(dequant_fp8_block_reference(q, s))
    assert torch.equal(q.view(torch.uint8), b.q.view(torch.uint8))
    assert float(((b.scale - s) / s).abs().max()) <= 2 ** -8


def test_pow2_scales_are_powers_of_two_and_payload_requantized():
    w = _w(200, 300, seed=3)
    t = quantize_fp8_block(w, FP8BlockSpec(pow2=True))
    m, _ = torch.frexp(t.scale)
    assert bool((m == 0.5).all())
    plain = quantize_fp8_block(w)
    assert bool((t.scale >= plain.scale).all())
    # the payload is quantized under the stored (rounded) scale: re-quantizing its own dequant is a fixed point
    again = quantize_fp8_block(dequant_fp8_block_reference(t.q, t.scale, out_dtype=torch.float32),
                               FP8BlockSpec(pow2=True))
    assert torch.equal(t.q.view(torch.uint8), again.q.view(torch.uint8))


def test_zero_block_and_bf16_scales():
    w = _w(128, 256, seed=4)
    w[:, :128] = 0
    t = quantize_fp8_block(w, scale_dtype=torch.bfloat16)
    assert t.scale.dtype == torch.bfloat16 and bool((t.scale > 0).all())
    assert not bool(t.q[:, :128].float().any())
    assert torch.equal(dequantize_fp8_block(t), dequant_fp8_block_reference(t.q, t.scale))


@pytest.mark.parametrize("name,preset", [("W4A16", "W4A16"), ("W4A16_ASYM", "W4A16_ASYM"), ("W8A16", "W8A16")])
def test_scheme_description_matches_compressed_tensors_preset(name, preset):
    qs = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
    from dsconvert.quant.schemes import get_scheme

    d = get_scheme(name).describe()
    lib = qs.preset_name_to_scheme(preset, ["Linear"])
    assert (d.weights.type, d.weights.bits, d.weights.strategy, d.weights.symmetric, d.weights.group_size) == (
        lib.weights.type, lib.weights.num_bits, lib.weights.strategy, lib.weights.symmetric, lib.weights.group_size)
    assert d.input_activations is None and lib.input_activations is None
