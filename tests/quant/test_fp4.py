"""FP4 kernels (dsconvert.quant.fp4) against the installed compressed-tensors library and slow references.

The oracle for scales and bytes is compressed-tensors 0.20.1 itself: its ``calculate_qparams`` /
``generate_gparam`` on the group min/max that llm-compressor's observer feeds it, then its compressors'
``compress`` give the bytes we must write, and their ``decompress`` of *our* bytes gives the weights we must
dequantize to.
"""

from __future__ import annotations

import pytest
import torch

from dsconvert.errors import ShapeError
from dsconvert.quant import fp4

from .._reference import e2m1_encode_reference, fp4_unpack_reference, fp8_e4m3fn_table

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402


def _weights(m, n, seed, dtype=torch.bfloat16):
    """Random weights with a wide spread of group magnitudes, exact e2m1 ties, zeros, -0.0 and an all-zero group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((m, n), generator=g) * 10.0 ** torch.empty((m, n // 16, 1)).uniform_(-6, 1, generator=g).expand(
        m, n // 16, 16).reshape(m, n)
    w[0, :16] = torch.tensor([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -0.25, -0.75, -5, -6, 0, -0.0, 0.1, -0.1])
    w[1, :32] = 0.0
    if m > 2:
        w[2, 16:32] = -0.0
        w[2, 32:48] = torch.tensor([-1e-3] * 15 + [4.0])  # negatives that round to zero keep the sign bit
    return w.to(dtype)


def _ct_nvfp4_reference(w, global_absmax=None):
    """What llm-compressor + compressed-tensors write for one NVFP4 weight (memoryless min/max observer)."""
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    grp = w.unflatten(-1, (-1, 16)).unsqueeze(0)  # (1, M, G, 16): observer's flatten_for_calibration
    mn, mx = torch.amin(grp, dim=(0, -1)), torch.amax(grp, dim=(0, -1))
    if global_absmax is None:
        global_absmax = torch.max(mx.max(), -mn.min())
    gs = generate_gparam(-global_absmax.reshape(1), global_absmax.reshape(1))
    scale, zp = calculate_qparams(mn, mx, scheme.weights, global_scale=gs)
    sd = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_global_scale": gs, "weight_zero_point": zp}
    return NVFP4PackedCompressor.compress(sd, scheme), scheme


def _ct_mxfp4_reference(w):
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    grp = w.unflatten(-1, (-1, 32)).unsqueeze(0)
    mn, mx = torch.amin(grp, dim=(0, -1)), torch.amax(grp, dim=(0, -1))
    scale, zp = calculate_qparams(mn, mx, scheme.weights)
    sd = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}
    return MXFP4PackedCompressor.compress(sd, scheme), scheme


def _assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, what: str):
    g, w = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    assert g.shape == w.shape, (what, g.shape, w.shape)
    bad = (g != w)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {g.numel()} bytes differ, first at {idx}: "
                             f"got {[int(g[tuple(i)]) for i in idx]} want {[int(w[tuple(i)]) for i in idx]}")


def test_e2m1_encode_matches_brute_force_on_every_boundary_and_sign():
    vals = [0.0, -0.0, 0.1, 0.25, 0.2500001, 0.5, 0.74, 0.75, 1.0, 1.25, 1.26, 1.5, 1.75, 2.0, 2.5, 2.51, 3.0,
            3.49, 3.5, 4.0, 4.99, 5.0, 5.01, 6.0, 7.0, 1e30, -0.1, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
            -6.0, -100.0]
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(2000, generator=g) * 14 - 7).tolist()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor(vals + rand, dtype=dtype)
        want = [e2m1_encode_reference(v) for v in x.tolist()]
        assert fp4.e2m1_encode(x).tolist() == want, dtype


def test_e2m1_decode_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = fp4.e2m1_decode(codes)
    assert vals[:8].tolist() == list(fp4.E2M1_VALUES) and vals[9:].tolist() == [-v for v in fp4.E2M1_VALUES[1:]]
    assert str(vals[8].item()) == "-0.0"
    c = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = fp4.pack_fp4(c)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]  # column 2j in the low nibble
    assert fp4_unpack_reference(packed) == c.tolist()
    assert torch.equal(fp4.unpack_fp4(packed), c)
    with pytest.raises(ShapeError):
        fp4.pack_fp4(torch.zeros((2, 3), dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(4, 64), (96, 320), (33, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_bytes_identical_to_compressed_tensors(shape, dtype):
    w = _weights(*shape, seed=shape[0] + shape[1], dtype=dtype)
    want, _ = _ct_nvfp4_reference(w)
    got = fp4.nvfp4_quantize(w)
    _assert_bytes_equal(got.packed, want["weight_packed"], "weight_packed")
    _assert_bytes_equal(got.scale, want["weight_scale"], "weight_scale")
    assert got.scale.dtype == want["weight_scale"].dtype == torch.float8_e4m3fn
    _assert_bytes_equal(got.global_scale, want["weight_global_scale"], "weight_global_scale")
    assert got.global_scale.dtype == torch.float32 and tuple(got.global_scale.shape) == (1,)


def test_nvfp4_fused_global_scale_matches_library():
    """A fused partner's larger absmax sets the global scale (q_a_proj + kv_a_proj_with_mqa, gate + up)."""
    w = _weights(8, 64, seed=3)
    partner_amax = torch.tensor(1000.0, dtype=torch.bfloat16)
    want, _ = _ct_nvfp4_reference(w, global_absmax=partner_amax)
    got = fp4.nvfp4_quantize(w, global_amax=partner_amax)
    _assert_bytes_equal(got.packed, want["weight_packed"], "weight_packed")
    _assert_bytes_equal(got.scale, want["weight_scale"], "weight_scale")
    _assert_bytes_equal(got.global_scale, want["weight_global_scale"], "weight_global_scale")
    assert not torch.equal(got.global_scale, fp4.nvfp4_quantize(w).global_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_library_decompresses_our_bytes_to_our_weights(dtype):
    w = _weights(40, 256, seed=7, dtype=dtype)
    t = fp4.nvfp4_quantize(w)
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    sd = {"weight_packed": t.packed, "weight_scale": t.scale, "weight_global_scale": t.global_scale}
    theirs = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
    ours = fp4.nvfp4_dequantize(t, torch.bfloat16)
    assert theirs.dtype == torch.bfloat16
    _assert_bytes_equal(ours, theirs, "dequantized weight")


def test_nvfp4_dequant_matches_slow_table_reference():
    w = _weights(6, 64, seed=11)
    t = fp4.nvfp4_quantize(w)
    fp8 = fp8_e4m3fn_table()
    codes = fp4_unpack_reference(t.packed)
    sc = t.scale.view(torch.uint8).tolist()
    gs = float(t.global_scale)
    table = fp4.E2M1_VALUES + tuple(-v for v in fp4.E2M1_VALUES)
    want = torch.tensor([[table[codes[i][j]] * float(torch.tensor(float(fp8[sc[i][j // 16]])) / torch.tensor(gs))
                          for j in range(64)] for i in range(6)], dtype=torch.float64)
    got = fp4.nvfp4_dequantize(t, torch.float32).to(torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # and the quantization error is bounded: at most half the widest e2m1 step (1.0) times the group multiplier
    eff = (t.scale.to(torch.float32) / t.global_scale).repeat_interleave(16, dim=1)
    assert bool(((got.float() - w.float()).abs() <= eff * 1.0 + 1e-30).all())


@pytest.mark.parametrize("shape", [(4, 64), (96, 320), (17, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_bytes_identical_to_compressed_tensors(shape, dtype):
    w = _weights(*shape, seed=shape[0] * 7 + shape[1], dtype=dtype)
    want, _ = _ct_mxfp4_reference(w)
    got = fp4.mxfp4_quantize(w)
    assert got.global_scale is None
    _assert_bytes_equal(got.packed, want["weight_packed"], "weight_packed")
    assert want["weight_scale"].dtype == got.scale.dtype == torch.uint8
    _assert_bytes_equal(got.scale, want["weight_scale"], "weight_scale")


def test_mxfp4_library_decompresses_our_bytes_to_our_weights():
    w = _weights(24, 320, seed=5)
    t = fp4.mxfp4_quantize(w)
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    theirs = MXFP4PackedCompressor.decompress({"weight_packed": t.packed, "weight_scale": t.scale}, scheme)["weight"]
    _assert_bytes_equal(fp4.mxfp4_dequantize(t, torch.bfloat16), theirs, "dequantized weight")


def test_mxfp4_exponent_is_ocp_rule_with_rounded_max():
    """e = floor(log2(absmax rounded to a power of two)) - 2 + 127; 1.75 * 2**k and above round up."""
    amax = torch.tensor([6.0, 4.0, 6.9, 7.0, 1.0, 1.74, 1.75, 0.0, 2.0 ** -120], dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        got = fp4.mxfp4_exponents(amax.to(dtype)).tolist()
        assert got == [127, 127, 127, 128, 125, 125, 126, 0, 5], dtype


def test_fp4_shape_errors_name_the_tensor():
    with pytest.raises(ShapeError, match="layers.0.mlp.down_proj"):
        fp4.nvfp4_quantize(torch.zeros((4, 24), dtype=torch.bfloat16), name="layers.0.mlp.down_proj")
    with pytest.raises(ShapeError, match="32"):
        fp4.mxfp4_quantize(torch.zeros((4, 48), dtype=torch.bfloat16), name="x")
