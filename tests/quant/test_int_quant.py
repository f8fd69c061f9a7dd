"""RTN maths, bit packing and the scheme registry (dsconvert.quant.{rtn,pack,schemes,registry}).

References here are independent of the code under test: golden words from
docs/int-formats.md, per-element Python packers, and scale formulas written out.
"""

from __future__ import annotations

import pytest
import torch

from dsconvert.convert.remedies import add_hint

from dsconvert.errors import BadInputError, ShapeError, UsageError
from dsconvert.quant import pack
from dsconvert.quant.registry import Registry, normalize_name
from dsconvert.quant.rtn import (
    AUTOAWQ,
    COMPRESSED_TENSORS,
    GPTQ,
    QuantSpec,
    compute_qparams,
    dequantize,
    quantize,
    quantize_with_params,
    round_to_grid,
)
from dsconvert.quant.schemes import SCHEMES, get_scheme, register_scheme, registered_schemes

CONVENTIONS = [COMPRESSED_TENSORS, AUTOAWQ, GPTQ]
U32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# golden words (values from the reference doc, not from the code)
# ---------------------------------------------------------------------------------------------
def test_golden_awq_order_word():
    q = torch.arange(8, dtype=torch.int32)[None, :]  # columns 0..7 hold values 0..7
    assert pack.pack_awq_gemm(q)[0, 0].item() & U32 == 0x75316420
    assert pack.unpack_awq_gemm(pack.pack_awq_gemm(q)).tolist() == q.tolist()


def test_golden_gptq_v1_symmetric_qzeros_word():
    zeros = torch.full((2, 64), 8)  # symmetric 4-bit: zero 8, v1 stores 7
    packed = pack.pack_gptq_qzeros(zeros, 4, "gptq")
    assert packed.shape == (2, 8)
    assert {w & U32 for w in packed.flatten().tolist()} == {0x77777777}
    assert {w & U32 for w in pack.pack_gptq_qzeros(zeros, 4, "gptq_v2").flatten().tolist()} == {0x88888888}
    assert pack.unpack_gptq_qzeros(packed, 4, "gptq").unique().tolist() == [8]


def test_golden_compressed_tensors_word():
    row = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    assert pack.pack_int32_rows_lsb(row, 4)[0, 0].item() & U32 == 0xFEBA9810


# ---------------------------------------------------------------------------------------------
# slow per-element reference packers
# ---------------------------------------------------------------------------------------------
def ref_pack_rows(values, bits, order=None):
    """values: list of rows of unsigned ints; packs each row LSB-first, slot i <- column order[i]."""
    per = 32 // bits
    order = order or list(range(per))
    out = []
    for row in values:
        words = []
        for w0 in range(0, len(row), per):
            word = 0
            for slot in range(per):
                word |= row[w0 + order[slot]] << (slot * bits)
            words.append(word)
        out.append(words)
    return out


def as_u32(t: torch.Tensor):
    return [[w & U32 for w in row] for row in t.tolist()]


@pytest.mark.parametrize("bits", [4, 8])
def test_sequential_and_awq_packers_match_reference(bits):
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 1 << bits, (5, 32), generator=g)
    assert as_u32(pack.pack_int32_lsb(v, bits)) == ref_pack_rows(v.tolist(), bits)
    assert pack.unpack_int32_lsb(pack.pack_int32_lsb(v, bits), bits).tolist() == v.tolist()
    if bits == 4:
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        assert as_u32(pack.pack_awq_gemm(v)) == ref_pack_rows(v.tolist(), 4, order)
        assert pack.unpack_awq_gemm(pack.pack_awq_gemm(v)).tolist() == v.tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_qweight_packs_along_k(bits):
    g = torch.Generator().manual_seed(1)
    k, n = 64, 6
    q = torch.randint(0, 1 << bits, (k, n), generator=g)
    packed = pack.pack_gptq_qweight(q, bits)
    per = 32 // bits
    assert packed.shape == (k // per, n)
    for r in range(k // per):
        for c in range(n):
            want = sum(int(q[r * per + j, c]) << (j * bits) for j in range(per))
            assert packed[r, c].item() & U32 == want
    assert pack.unpack_gptq_qweight(packed, bits).tolist() == q.tolist()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_ct_rows_packer_signed_offset_and_padding(bits, packed_dim):
    g = torch.Generator().manual_seed(2)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    v = torch.randint(lo, hi, (7, 13), generator=g, dtype=torch.int8)  # ragged: 13 not a multiple of 8 or 4
    packed = pack.pack_int32_rows_lsb(v, bits, packed_dim=packed_dim)
    rows = (v if packed_dim == 1 else v.t()).to(torch.int64) + hi
    per = 32 // bits
    padded = [r + [0] * ((-len(r)) % per) for r in rows.tolist()]
    want = ref_pack_rows(padded, bits)
    got = as_u32(packed if packed_dim == 1 else packed.t())
    assert got == want
    size = v.shape[packed_dim]
    assert torch.equal(pack.unpack_int32_rows_lsb(packed, bits, size, packed_dim=packed_dim), v)


def test_ct_rows_packer_matches_library():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(3)
    for bits in (4, 8):
        for dim in (0, 1):
            v = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 45), generator=g, dtype=torch.int8)
            assert torch.equal(helpers.pack_to_int32(v, bits, dim), pack.pack_int32_rows_lsb(v, bits, dim))


def test_gptq_v1_zero_of_zero_wraps_like_the_loader():
    packed = pack.pack_gptq_qzeros(torch.zeros(1, 8, dtype=torch.int64), 4, "gptq")
    assert packed[0, 0].item() & U32 == 0xFFFFFFFF
    assert pack.unpack_gptq_qzeros(packed, 4, "gptq").unique().tolist() == [16]  # the v1 defect, faithfully


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack.pack_int32_lsb(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4)
    with pytest.raises(ValueError):
        pack.pack_int32_lsb(torch.zeros(1, 7, dtype=torch.int64), 4)
    with pytest.raises(ValueError):
        pack.pack_awq_gemm(torch.zeros(1, 4, dtype=torch.int64), bits=8)


# ---------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------
def ref_qparams(group: list[float], bits: int, symmetric: bool, conv):
    """Scale/zero of one group, written out from the library formulas (float64, then rounded)."""
    levels = 2 ** bits - 1
    off = 2 ** (bits - 1)
    if symmetric:
        scale = max(abs(x) for x in group) / (levels / 2)
    else:
        lo, hi = min(min(group), 0.0), max(max(group), 0.0)
        scale = max(hi - lo, conv.range_floor) / levels
    s = torch.tensor(scale, dtype=torch.float32).to(conv.scale_dtype).item()
    if s == 0:
        s = torch.finfo(conv.scale_dtype).eps
    if symmetric:
        zero = None if conv.signed else off
    else:
        zu = min(max(round(-lo / s), 0), levels)  # Python round is half-to-even, like torch.round
        zero = zu - off if conv.signed else zu
    return s, zero


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_qparams_match_written_out_formulas(conv, bits, symmetric):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, 32, generator=g)
    w[0, 0] = w[0, 0].abs() + 0.1  # an all-positive group
    w[0, 1] = 0.0  # an all-zero group
    scale, zero = compute_qparams(w, QuantSpec(bits, 32, symmetric), conv)
    for i in range(6):
        for j in range(4):
            s, z = ref_qparams(w[i, j].tolist(), bits, symmetric, conv)
            assert scale[i, j].item() == pytest.approx(s, rel=0, abs=0), (i, j)
            if z is None:
                assert zero is None
            else:
                assert zero[i, j].item() == z, (i, j)


def test_symmetric_int4_scale_is_absmax_over_7_5():
    w = torch.tensor([[7.5, -3.0, 1.0, 0.0] * 8])
    qt = quantize(w, QuantSpec(4, 32, True), COMPRESSED_TENSORS)
    assert qt.scale.item() == 1.0
    assert qt.q[0, :4].tolist() == [7, -3, 1, 0]  # 7.5 clips to 7 (round-half-even gives 8, clamp 7)


def rtn_bound(conv, bits):
    """Max |w - deq| / scale: 1/2 from rounding (sym: the clipped half step; asym: the rounded zero)
    plus the scale's storage rounding, levels * u (u = 2^-8 bf16, 2^-11 fp16)."""
    u = 2.0 ** -8 if conv.scale_dtype == torch.bfloat16 else 2.0 ** -11
    return 0.5 + (2 ** bits) * u


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 128), (8, True, 128),
                                                  (8, True, -1), (4, False, 64)])
def test_round_trip_error_within_rtn_bound(conv, bits, symmetric, group):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(96, 256, generator=g) * 0.02).to(torch.bfloat16)
    spec = QuantSpec(bits, group, symmetric)
    qt = quantize(w, spec, conv)
    gsz = qt.group_size
    assert qt.q.shape == (96, 256) and qt.scale.shape == (96, 256 // gsz)
    assert torch.equal(qt.scale.to(conv.scale_dtype).float(), qt.scale)  # scale already in storage dtype
    deq = dequantize(qt)
    assert deq.dtype == torch.float32
    s = qt.scale.repeat_interleave(gsz, dim=1)
    err = (w.float() - deq).abs() / s
    # unclipped elements: pure rounding, at most half a step
    z = 0.0 if qt.zero is None else qt.zero.float().repeat_interleave(gsz, dim=1)
    raw = torch.round(w.float() / s) + z
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if conv.signed else (0, (1 << bits) - 1)
    unclipped = (raw >= lo) & (raw <= hi)
    assert unclipped.float().mean() > 0.95
    assert err[unclipped].max().item() <= 0.5 + 1e-6
    assert err.max().item() <= rtn_bound(conv, bits) + 1e-6


def test_dequantize_is_exact_inverse_and_storage_rounding():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(16, 128, generator=g)
    qt = quantize(w, QuantSpec(4, 32, False), AUTOAWQ)
    ref = (qt.q.double() - qt.zero.double().repeat_interleave(32, 1)) * qt.scale.double().repeat_interleave(32, 1)
    assert torch.equal(dequantize(qt).double(), ref)  # exact in float32
    assert torch.equal(dequantize(qt, torch.float16), ref.to(torch.float16))


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: c.name)
def test_quantize_with_params_reproduces_quantize(conv):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 256, generator=g)
    for spec in (QuantSpec(4, 128, True), QuantSpec(4, 128, False)):
        qt = quantize(w, spec, conv)
        again = quantize_with_params(w, qt.scale, qt.zero, spec, conv)
        assert torch.equal(again.q, qt.q) and torch.equal(again.scale, qt.scale)
        # column-by-column (GPTQ's loop) with round_to_grid gives the same q
        s = qt.scale.repeat_interleave(128, 1)
        z = None if qt.zero is None else qt.zero.repeat_interleave(128, 1)
        col = round_to_grid(w[:, 5], s[:, 5], None if z is None else z[:, 5], 4, conv.signed)
        assert col.tolist() == qt.q[:, 5].float().tolist()


def test_signed_and_unsigned_conventions_agree_on_values():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(8, 256, generator=g)
    for sym in (True, False):
        spec = QuantSpec(4, 128, sym)
        a = quantize(w, spec, COMPRESSED_TENSORS.with_scale_dtype(torch.float16))
        b = quantize(w, spec, GPTQ)
        assert torch.equal(dequantize(a), dequantize(b))
        assert torch.equal(dequantize(a.to_convention(GPTQ)), dequantize(b))
        assert torch.equal(b.to_convention(a.convention).q, a.q)


def test_shape_error_group_does_not_divide_k():
    with pytest.raises(ShapeError) as ei:
        quantize(torch.randn(4, 10944), QuantSpec(4, 128, True), name="model.layers.0.mlp.down_proj")
    e = add_hint(ei.value)  # the kernel names the remedy; the convert layer words it
    assert "10944" in e.message and "128" in e.message and "down_proj" in e.message
    assert "64" in e.hint and "--ignore" in e.hint
    assert e.exit_code == 2


def test_bad_specs_and_inputs():
    with pytest.raises(UsageError):
        QuantSpec(3, 128, True)
    with pytest.raises(UsageError):
        QuantSpec(4, 0, True)
    with pytest.raises(ShapeError):
        quantize(torch.randn(2, 3, 4), QuantSpec(4, -1))
    w = torch.randn(2, 128)
    w[1, 5] = float("nan")
    with pytest.raises(BadInputError):
        quantize(w, QuantSpec(4, 128))
    with pytest.raises(BadInputError):  # fp16 scale overflow
        quantize(torch.full((1, 128), 1e6), QuantSpec(4, 128), GPTQ)


def test_all_zero_weight_quantizes_to_zero():
    for conv in CONVENTIONS:
        for sym in (True, False):
            qt = quantize(torch.zeros(4, 128), QuantSpec(4, 128, sym), conv)
            assert (qt.scale > 0).all()
            assert torch.equal(dequantize(qt), torch.zeros(4, 128))


# ---------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------
def test_scheme_registry_names_and_aliases():
    assert registered_schemes()[:3] == ["W4A16", "W4A16_ASYM", "W8A16"]
    for name in ("W4A16", "w4a16", "int4", "INT4", "w4 a16"):
        s = get_scheme(name)
        assert (s.bits, s.group_size, s.symmetric) == (4, 128, True)
    a = get_scheme("w4a16-asym")
    assert (a.bits, a.symmetric) == (4, False)
    assert get_scheme("W4A16 ASYM").name == "W4A16_ASYM"
    e = get_scheme("w8a16")
    assert (e.bits, e.symmetric) == (8, True)
    assert e.spec(-1) == QuantSpec(8, -1, True)


def test_scheme_unknown_name_lists_choices():
    with pytest.raises(KeyError) as ei:
        get_scheme("W3A16")
    msg = str(ei.value)
    for n in ("W4A16", "W4A16_ASYM", "W8A16", "int4"):
        assert n in msg


def test_scheme_duplicate_registration_raises():
    with pytest.raises(ValueError):
        @register_scheme("w4a16")  # same name after normalisation
        class Dup:  # noqa: F841
            pass
    with pytest.raises(ValueError):
        @register_scheme("NEW_ONE", aliases=["INT4"])  # alias collides
        class Dup2:  # noqa: F841
            pass
    assert "NEW_ONE" not in SCHEMES


def test_generic_registry():
    r: Registry[int] = Registry("thing")
    r.register("Pack_Quantized", aliases=["pq"])(1)
    assert normalize_name("pack-quantized") == normalize_name("PACK QUANTIZED") == "packquantized"
    assert r.get("pack-quantized") == 1 and r.get("PQ") == 1
    assert r.canonical("packquantized") == "Pack_Quantized"
    with pytest.raises(ValueError):
        r.register("pq")(2)
    with pytest.raises(KeyError, match="Pack_Quantized.*pq"):
        r.get("nope")
