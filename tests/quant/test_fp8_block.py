"""dequant_fp8_block: byte identity against the slow block-loop oracle in tests/_reference.py."""

from __future__ import annotations

import pytest
import torch

from dsconvert.quant import fp8_block
from dsconvert.quant.fp8_block import dequant_fp8_block, scale_grid

from .._reference import dequant_fp8_block_reference, fp8_e4m3fn_table

SHAPES = [(576, 384), (130, 256), (200, 300), (1, 1), (16, 16), (257, 129)]


def _random_bytes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    flat = b.view(-1)
    flat[: min(256, flat.numel())] = torch.arange(256, dtype=torch.uint8)[: flat.numel()]  # every byte value
    return b


def _random_scales(grid, seed, lo=-10.0, hi=3.0):
    g = torch.Generator().manual_seed(seed + 1)
    return (10.0 ** (lo + (hi - lo) * torch.rand(grid, generator=g))).to(torch.float32)


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical except NaN payloads: NaN exactly where the oracle has NaN, identical bits elsewhere."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = got.cpu(), want.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ity = {2: torch.int16, 4: torch.int32}[got.element_size()]
    g, w = got.view(ity)[~nan], want.view(ity)[~nan]
    if not torch.equal(g, w):
        bad = (g != w).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{int((g != w).sum())} elements differ, first at flat non-NaN index {bad}: "
                             f"got {g[bad].tolist()} want {w[bad].tolist()}")


def test_table_matches_torch_native_decode():
    table = fp8_e4m3fn_table()
    native = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(torch.isnan(table), torch.isnan(native))
    assert torch.isnan(table[[0x7F, 0xFF]]).all() and int(torch.isnan(table).sum()) == 2
    ok = ~torch.isnan(table)
    assert torch.equal(table[ok].view(torch.int32), native[ok].view(torch.int32))  # incl. -0 at 0x80
    assert table[0x80].item() == 0.0 and str(table[0x80].item()) == "-0.0"
    assert table[0x01].item() == 2.0**-9 and table[0x7E].item() == 448.0


def test_scale_grid_ceil_division():
    assert scale_grid((576, 7168)) == (5, 56)
    assert scale_grid((130, 256)) == (2, 2)
    assert scale_grid((200, 300)) == (2, 3)
    assert scale_grid((1, 1)) == (1, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_byte_identical_to_reference(shape, out_dtype):
    w = _random_bytes(shape, seed=shape[0] * 1000 + shape[1])
    s = _random_scales(scale_grid(shape), seed=shape[0] + shape[1])
    got = dequant_fp8_block(w.view(torch.float8_e4m3fn), s, out_dtype=out_dtype)
    assert_same_bytes(got, dequant_fp8_block_reference(w, s, out_dtype=out_dtype))


def test_special_bytes():
    w = torch.arange(256, dtype=torch.uint8).view(16, 16)
    got = dequant_fp8_block(w, torch.tensor([[1.0]]))
    flat = got.view(-1)
    assert torch.isnan(flat[0x7F]) and torch.isnan(flat[0xFF])
    assert int(torch.isnan(flat).sum()) == 2
    assert flat.view(torch.int16)[0x80].item() == -32768  # 0x8000: -0
    assert flat[0x01].item() == 2.0**-9  # smallest subnormal
    assert_same_bytes(got, dequant_fp8_block_reference(w, torch.tensor([[1.0]])))


def test_uint8_and_fp8_inputs_agree():
    w = _random_bytes((130, 256), 3)
    s = _random_scales((2, 2), 3)
    assert_same_bytes(dequant_fp8_block(w, s), dequant_fp8_block(w.view(torch.float8_e4m3fn), s))


@pytest.mark.parametrize("scales", [
    [[2e36, 1.0], [1e-3, 2.0]],  # s * 2**8 overflows fp32 -> whole tensor takes the plain path
    [[3e38, 1e-40], [0.0, -5e-3]],  # overflowing + subnormal + zero + negative scales
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_extreme_scales_use_exact_fallback(monkeypatch, scales, out_dtype):
    calls = []
    plain = fp8_block._dequant_plain
    monkeypatch.setattr(fp8_block, "_dequant_plain", lambda *a: (calls.append(1), plain(*a)))
    w = _random_bytes((130, 256), 5)
    s = torch.tensor(scales, dtype=torch.float32)
    assert_same_bytes(dequant_fp8_block(w, s, out_dtype=out_dtype),
                      dequant_fp8_block_reference(w, s, out_dtype=out_dtype))
    assert calls == [1]


@pytest.mark.parametrize("scales", [
    [[1e-40, 2.0**-149], [2.0**-126, 1.3e36]],  # tiny/subnormal scales, and one just under the 2**120 fallback bound
    [[float("inf"), float("nan")], [-1.0, 0.0]],
])
def test_unusual_scales_on_fast_path(monkeypatch, scales):
    monkeypatch.setattr(fp8_block, "_dequant_plain", lambda *a: pytest.fail("took the plain path"))
    w = _random_bytes((130, 256), 6)
    s = torch.tensor(scales, dtype=torch.float32)
    assert_same_bytes(dequant_fp8_block(w, s), dequant_fp8_block_reference(w, s))


@pytest.mark.parametrize("chunk", [1, 37 * 300, 300 * 300])
def test_chunks_straddling_row_blocks(monkeypatch, chunk):
    monkeypatch.setattr(fp8_block, "_CHUNK_ELEMS", chunk)  # 1 row, 37 rows, all rows per chunk
    w = _random_bytes((300, 300), 7)
    s = _random_scales((3, 3), 7)
    assert_same_bytes(dequant_fp8_block(w, s), dequant_fp8_block_reference(w, s))


def test_other_block_sizes():
    w = _random_bytes((100, 70), 8)
    s = _random_scales(scale_grid((100, 70), (32, 64)), 8)
    assert_same_bytes(dequant_fp8_block(w, s, block=(32, 64)), dequant_fp8_block_reference(w, s, block=(32, 64)))


def test_non_contiguous_weight_and_out():
    w = _random_bytes((256, 200), 9).t()  # [200, 256], transposed strides
    s = _random_scales((2, 2), 9)
    buf = torch.full((256, 200), 7.0, dtype=torch.bfloat16)
    out = buf.t()
    got = dequant_fp8_block(w, s, out=out)
    assert got is out
    assert_same_bytes(out, dequant_fp8_block_reference(w.contiguous(), s))


def test_out_slice_of_bigger_buffer():
    w = _random_bytes((130, 256), 10)
    s = _random_scales((2, 2), 10)
    buf = torch.zeros((400, 256), dtype=torch.bfloat16)
    got = dequant_fp8_block(w, s, out=buf[100:230])
    assert got.data_ptr() == buf[100:230].data_ptr()
    assert_same_bytes(buf[100:230], dequant_fp8_block_reference(w, s))
    assert not buf[:100].any() and not buf[230:].any()


def test_errors():
    w = _random_bytes((130, 256), 11)
    with pytest.raises(ValueError, match="scale grid"):
        dequant_fp8_block(w, torch.ones(1, 2))  # floor-division grid
    with pytest.raises(ValueError, match="scale grid"):
        dequant_fp8_block(w, torch.ones(2, 2), block=(64, 128))
    with pytest.raises(ValueError, match="scale grid"):
        dequant_fp8_block(w, torch.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        dequant_fp8_block(w.view(2, 65, 256), torch.ones(2, 2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequant_fp8_block(w.to(torch.bfloat16), torch.ones(2, 2))
    with pytest.raises(ValueError, match="out_dtype"):
        dequant_fp8_block(w, torch.ones(2, 2), out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        dequant_fp8_block(w, torch.ones(2, 2), out=torch.empty(130, 255, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        dequant_fp8_block(w, torch.ones(2, 2), out=torch.empty(130, 256, dtype=torch.float16))
    with pytest.raises(ValueError, match="block"):
        dequant_fp8_block(w, torch.ones(2, 2), block=(0, 128))


def test_empty():
    w = torch.empty((0, 256), dtype=torch.uint8)
    assert dequant_fp8_block(w, torch.empty((0, 2))).shape == (0, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_cpu(out_dtype):
    for shape in [(576, 7168), (130, 256), (200, 300), (1, 1)]:
        w = _random_bytes(shape, 12)
        s = _random_scales(scale_grid(shape), 12)
        cpu = dequant_fp8_block(w, s, out_dtype=out_dtype)
        gpu = dequant_fp8_block(w.cuda().view(torch.float8_e4m3fn), s.cuda(), out_dtype=out_dtype)
        assert gpu.device.type == "cuda"
        assert_same_bytes(gpu, cpu)
    w = _random_bytes((130, 256), 13)
    s = torch.tensor([[2e36, 1e-40], [0.0, 2.0]])
    assert_same_bytes(dequant_fp8_block(w.cuda(), s.cuda(), out_dtype=out_dtype),
                      dequant_fp8_block_reference(w, s, out_dtype=out_dtype))


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])
def test_lone_nan_sign(nan_byte):
    w = torch.full((40, 50), 0x3C, dtype=torch.uint8)  # no NaN anywhere else in the chunk
    w[17, 23] = nan_byte
    got = dequant_fp8_block(w, torch.tensor([[0.5]]))
    assert torch.isnan(got).nonzero().tolist() == [[17, 23]]
    assert_same_bytes(got, dequant_fp8_block_reference(w, torch.tensor([[0.5]])))
