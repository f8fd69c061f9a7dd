"""Tests for dsconvert.quant.ggml: exact GGML block quantizers in torch.

Oracles:
  * gguf-py's numpy quantizers (legacy types + BF16) and dequantizers (all types);
  * llama.cpp itself (``ggml_quantize_chunk`` / ``to_float`` from the ggml library inside the
    llama_cpp package), marked ``llamacpp`` and skipped when llama_cpp is not importable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from dsconvert.quant import ggml_quants
from dsconvert.quant.ggml import dequantize, get_type, quantize, registered_types
from dsconvert.testing import ggml_oracle

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IQUANTS = ["IQ4_NL", "IQ4_XS"]
# lattice types: llama.cpp quantizes IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M only with an imatrix (IQ1_M's kernel also runs
# without one); IQ2_S, IQ3_XXS and IQ3_S take one optionally
GRID_IQ = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_S"]
GRID_NO_IMATRIX = ["IQ2_S", "IQ3_XXS", "IQ3_S"]
PLAIN = ["F32", "F16", "BF16"]
ALL = PLAIN + LEGACY + KQUANTS + IQUANTS + GRID_IQ


def _rows(n: int, n_rows: int, seed: int) -> np.ndarray:
    """Random normal rows with per-row scales and outliers, plus degenerate rows."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n_rows, n)).astype(np.float32)
    x *= np.exp(g.uniform(-6, 2, size=(n_rows, 1))).astype(np.float32)
    out = g.random(x.shape) < 0.01
    x[out] *= 20
    x[0] = 0                                 # zeros
    x[1] = 0.75                              # constant positive
    x[2] = -3.5                              # constant negative
    x[3] *= np.float32(1e-30)                # tiny (below GROUP_MAX_EPS)
    x[4] = np.round(x[4] * 4) / 8            # many exact ties (.5 after scaling)
    x[5, : n // 2] = 0                       # half-zero row
    x[6] = np.abs(x[6])                      # all positive
    x[7] = -np.abs(x[7])                     # all negative
    x[8, ::37] = 1e4                         # huge outliers
    return x


@pytest.fixture(scope="module")
def data() -> dict[int, np.ndarray]:
    # rows of 256 / 512 / 4096 / 7168 (V3 hidden size) values, about 0.7 M values in all
    return {256: _rows(256, 48, 1), 512: _rows(512, 32, 2), 4096: _rows(4096, 80, 3), 7168: _rows(7168, 40, 4)}


# ---- registry ----------------------------------------------------------------------------------

def test_registry_names_and_sizes():
    names = registered_types()
    assert set(names) == set(ALL)
    for name in names:
        t = get_type(name)
        assert t.name == name
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[t.ggml_type]
    assert get_type("q4_k") is get_type("Q4K") is get_type("q4-k") is get_type(GGMLQuantizationType.Q4_K)
    assert get_type(12) is get_type("Q4_K")
    assert ggml_quants.get_type is get_type


def test_unknown_type_lists_choices():
    with pytest.raises(KeyError, match="Q4_K"):
        get_type("q9_x")
    with pytest.raises(KeyError):
        get_type(1234)


@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS)
def test_bad_row_length(name):
    t = get_type(name)
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.zeros(2, t.block_size + 16), name)


def test_imatrix_handling():
    x = torch.randn(2, 256)
    im = torch.rand(256)
    # llama.cpp ignores quant_weights for Q8_0 and the float types
    assert torch.equal(quantize(x, "Q8_0", im), quantize(x, "Q8_0"))
    assert torch.equal(quantize(x, "F16", im), quantize(x, "F16"))
    assert not torch.equal(quantize(x, "Q4_K", im), quantize(x, "Q4_K"))
    with pytest.raises(ValueError, match="imatrix has 128 values"):
        quantize(x, "Q4_K", torch.rand(128))


# ---- gguf-py oracle ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", LEGACY + ["BF16", "F16", "F32"])
def test_quantize_matches_gguf_py(name, data):
    qt = GGMLQuantizationType[name]
    for x in data.values():
        # gguf-py differs from ggml (and from us) on blocks made only of +-0 with a -0.0 among
        # them: it takes the -0.0 as the max-|x| value, ggml keeps its +0.0 start (sign of d).
        # The ggml behaviour is checked in test_exact_vs_llamacpp; here negative zeros are dropped.
        x = x + np.float32(0.0)
        ours = quantize(torch.from_numpy(x), name).numpy()
        ref = gq.quantize(x, qt)
        if ref.dtype != np.uint8:  # F32/F16: gguf-py returns the cast array
            ref = ref.view(np.uint8)
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS + ["BF16"])
def test_dequantize_matches_gguf_py(name, data):
    qt = GGMLQuantizationType[name]
    x = data[512]
    raw = quantize(torch.from_numpy(x), name)
    ours = dequantize(raw, name, x.shape).numpy()
    ref = gq.dequantize(raw.numpy(), qt)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_shapes_chunking_and_nd():
    x = torch.randn(3, 5, 512)
    raw = quantize(x, "Q4_K")
    assert raw.shape == (3, 5, 512 // 256 * 144) and raw.dtype == torch.uint8
    # tiny chunks (one row at a time) give the same bytes
    assert torch.equal(get_type("Q4_K").quantize(x, max_chunk_bytes=1), raw)
    assert torch.equal(quantize(x.to(torch.bfloat16), "Q8_0"), quantize(x.to(torch.bfloat16).float(), "Q8_0"))
    back = dequantize(raw, "Q4_K")
    assert back.shape == x.shape and back.dtype == torch.float32
    with pytest.raises(ValueError):
        dequantize(raw, "Q4_K", (3, 5, 256))


@pytest.mark.parametrize("name", KQUANTS + LEGACY + IQUANTS)
def test_roundtrip_error_is_sane(name):
    x = torch.randn(16, 1024)
    err = (dequantize(quantize(x, name), name, x.shape) - x).pow(2).mean().sqrt().item()
    bits = get_type(name).type_size * 8 / get_type(name).block_size
    assert err < 2.0 ** (-bits + 2.5), (name, err)


# ---- llama.cpp oracle --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    o = ggml_oracle.load()
    if o is None:
        pytest.skip("llama_cpp (ggml shared library) not available")
    return o


def _compare(oracle, name, x):
    t = get_type(name)
    qt = GGMLQuantizationType[name]
    ours = quantize(torch.from_numpy(x), name).numpy()
    ref = oracle.quantize(x, qt)
    ob = ours.reshape(-1, t.type_size)
    rb = ref.reshape(-1, t.type_size)
    bad = (ob != rb).any(1)
    dq_ours = oracle.dequantize(ours, qt, x.shape)
    dq_ref = oracle.dequantize(ref, qt, x.shape)
    return bad, ours, ref, dq_ours, dq_ref


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", PLAIN + LEGACY)
def test_exact_vs_llamacpp(oracle, name, data):
    for x in data.values():
        _, ours, ref, _, _ = _compare(oracle, name, x)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", KQUANTS + IQUANTS)
def test_kquants_vs_llamacpp(oracle, name, data):
    """Every K-quant and IQ4 block is byte-identical to ``ggml_quantize_chunk`` (no tolerance)."""
    for n, x in data.items():
        bad, _, _, _, _ = _compare(oracle, name, x)
        assert not bad.any(), f"{name}: {int(bad.sum())}/{bad.size} blocks of the {n}-wide rows differ " \
                              f"from llama.cpp, first {int(np.nonzero(bad)[0][0])}"


def _imatrix(n: int, seed: int) -> np.ndarray:
    """Importance weights as llama-imatrix produces them (mean squared activations): positive, heavy
    tailed, a few exact zeros (channels that never fired)."""
    g = np.random.default_rng(seed)
    im = (g.standard_normal(n) ** 2 * np.exp(g.uniform(-4, 4, n))).astype(np.float32)
    im[g.random(n) < 0.02] = 0
    return im


IMATRIX_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"] + KQUANTS + IQUANTS


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_imatrix_quantization_vs_llamacpp(oracle, name, data):
    """With importance weights every block is byte-identical to ``ggml_quantize_chunk(..., imatrix)`` (the
    ``quantize_row_*_impl`` paths), and the weights really change the result."""
    t = get_type(name)
    qt = GGMLQuantizationType[name]
    for n, x in data.items():
        im = _imatrix(n, n)
        ours = quantize(torch.from_numpy(x), name, torch.from_numpy(im)).numpy().reshape(-1, t.type_size)
        ref = oracle.quantize(x, qt, im).reshape(-1, t.type_size)
        bad = (ours != ref).any(1)
        assert not bad.any(), f"{name}: {int(bad.sum())}/{bad.size} blocks of the {n}-wide rows differ"
        plain = oracle.quantize(x, qt).reshape(-1, t.type_size)
        assert (plain != ref).any(1).mean() > 0.5


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", GRID_IQ)
@pytest.mark.slow  # > 2 s each: kept out of `make test-fast`, run by `make test-slow`
def test_grid_iq_vs_llamacpp(oracle, name):
    """Lattice types with importance weights: byte-identical to ``ggml_quantize_chunk`` (signs, parity flips,
    off-grid groups snapped to the listed neighbours, zero and degenerate rows), and our dequantizer equals
    llama.cpp's and gguf-py's on llama.cpp's bytes. Without weights IQ2_S, IQ3_XXS and IQ3_S are byte-identical
    too; the others refuse, as llama.cpp asserts."""
    t = get_type(name)
    qt = GGMLQuantizationType[name]
    for n, rows, seed in ((256, 24, 21), (4096, 10, 22)):
        x = _rows(n, rows, seed)
        im = _imatrix(n, seed)
        ours = quantize(torch.from_numpy(x), name, torch.from_numpy(im)).numpy().reshape(-1, t.type_size)
        ref = oracle.quantize(x, qt, im).reshape(-1, t.type_size)
        bad = (ours != ref).any(1)
        assert not bad.any(), f"{name}: {int(bad.sum())}/{bad.size} blocks of the {n}-wide rows differ"
        dq = dequantize(torch.from_numpy(ref.reshape(rows, -1)), name, x.shape).numpy()
        np.testing.assert_array_equal(dq, oracle.dequantize(ref.reshape(-1), qt, x.shape))
        np.testing.assert_allclose(dq, gq.dequantize(ref.reshape(rows, -1), qt), rtol=1e-6, atol=0)
        if name in GRID_NO_IMATRIX:
            ours = quantize(torch.from_numpy(x), name).numpy().reshape(-1, t.type_size)
            plain = oracle.quantize(x, qt).reshape(-1, t.type_size)
            bad = (ours != plain).any(1)
            assert not bad.any(), f"{name} (no imatrix): {int(bad.sum())}/{bad.size} blocks differ"
            assert (plain != ref).any(1).mean() > 0.5
    if name == "IQ1_M":  # the kernel's no-imatrix path: weights x*x
        x = _rows(512, 16, 23)
        np.testing.assert_array_equal(quantize(torch.from_numpy(x), name).numpy(), oracle.quantize(x, qt))
        return
    if name not in GRID_NO_IMATRIX:
        with pytest.raises(ValueError, match="importance weights"):
            quantize(torch.randn(2, 256), name)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", [pytest.param("IQ2_S", marks=pytest.mark.slow), "IQ3_XXS", "IQ3_S"])
def test_grid_iq_zero_blocks_and_subnormals(oracle, name):
    """All-zero 32-blocks inside non-zero super-blocks (IQ3_S then writes the later blocks' qs/signs earlier),
    subnormal rows (an infinite ``1/max`` and ``1/d``: C's ``nearest_int(inf)`` is -4194304) and single subnormal
    elements: byte-identical to ``ggml_quantize_chunk`` with and without an imatrix."""
    t = get_type(name)
    x = _rows(1024, 12, 31)
    z = np.random.default_rng(5).random((12, 32)) < 0.3
    x.reshape(12, 32, 32)[z] = 0
    x[5] *= np.float32(1e-39)
    x[6, :32] = np.float32(1e-45)
    x[6, 40] = -np.float32(3e-45)
    im = _imatrix(1024, 31)
    for w in (im, None):
        ours = quantize(torch.from_numpy(x), name, None if w is None else torch.from_numpy(w)).numpy()
        ref = oracle.quantize(x, GGMLQuantizationType[name], w)
        bad = (ours.reshape(-1, t.type_size) != ref.reshape(-1, t.type_size)).any(1)
        assert not bad.any(), f"{name} (imatrix: {w is not None}): blocks {np.nonzero(bad)[0].tolist()} differ"


def test_sqrtf_is_correctly_rounded():
    """``sqrtf`` equals numpy's IEEE float32 square root; torch's float32 ``sqrt`` is not on every CPU."""
    from dsconvert.quant.ggml._ops import sqrtf
    g = np.random.default_rng(7)
    a = np.abs(g.standard_normal(1 << 16) * np.exp(g.uniform(-30, 30, 1 << 16))).astype(np.float32)
    a[:4] = [0.0, 1.0, 3125005.0, np.float32(2.0) ** -140]
    np.testing.assert_array_equal(sqrtf(torch.from_numpy(a)).numpy().view(np.int32), np.sqrt(a).view(np.int32))


_CAPABILITY_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from tests.quant.test_ggml_quants import _rows
from dsconvert.quant.ggml import quantize
from dsconvert.testing import ggml_oracle
from gguf import GGMLQuantizationType
o = ggml_oracle.load()
x = _rows(4096, 24, 11)
bad = {}
im = np.abs(np.random.default_rng(12).standard_normal(4096)).astype(np.float32)
for name in sys.argv[2].split(","):
    ours = quantize(torch.from_numpy(x), name).numpy()
    ref = o.quantize(x, GGMLQuantizationType[name])
    bad[name] = int((ours != ref).sum())
    ours = quantize(torch.from_numpy(x), name, torch.from_numpy(im)).numpy()
    ref = o.quantize(x, GGMLQuantizationType[name], im)
    bad[name + "+imatrix"] = int((ours != ref).sum())
print(torch.backends.cpu.get_cpu_capability(), bad)
sys.exit(1 if any(bad.values()) else 0)
"""


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_bytes_independent_of_cpu_kernels(oracle, capability):
    """Each of torch's CPU kernel sets (``ATEN_CPU_CAPABILITY``) gives llama.cpp's bytes for every type.

    A capability the CPU lacks falls back to a lower one inside torch, so the run is still valid.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(root), ",".join(LEGACY + KQUANTS + IQUANTS + PLAIN)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", PLAIN + LEGACY + KQUANTS + IQUANTS)
def test_dequantize_exact_vs_llamacpp(oracle, name, data):
    x = data[4096][:16]
    qt = GGMLQuantizationType[name]
    ref = oracle.quantize(x, qt)
    ours = dequantize(torch.from_numpy(ref), name, x.shape).numpy()
    np.testing.assert_array_equal(ours.view(np.int32), oracle.dequantize(ref, qt, x.shape).view(np.int32))


@pytest.mark.llamacpp
def test_special_values_vs_llamacpp(oracle):
    x = np.zeros((4, 256), dtype=np.float32)
    x[0] = np.linspace(-1, 1, 256)
    x[1, :] = np.float32(2.0) ** -24       # fp16 subnormal scales
    x[2, :] = np.float32(65504.0)          # fp16 max
    x[3, ::2] = 1.0
    for name in LEGACY + KQUANTS + PLAIN:
        _, ours, ref, _, _ = _compare(oracle, name, x)
        np.testing.assert_array_equal(ours, ref, err_msg=name)


# ---- device agnostic -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LEGACY + KQUANTS + IQUANTS + PLAIN)
def test_cuda_matches_cpu(name, data):
    x = torch.from_numpy(data[4096])
    cpu = quantize(x, name)
    gpu = quantize(x.cuda(), name).cpu()
    assert torch.equal(cpu, gpu)
    assert torch.equal(dequantize(gpu.cuda(), name, x.shape).cpu(), dequantize(cpu, name, x.shape))


def test_iq1_running_best_equals_the_c_loop():
    """The near-best shortcut of the IQ1 partition search keeps the candidate C's float32 running test keeps, on
    rows with exact ties, near ties (a few ulps apart), zero and tiny sums, and rows without a valid candidate."""
    from dsconvert.quant.ggml.iq1 import _running_best
    g = np.random.default_rng(5)
    M, K = 400, 60
    qx = g.standard_normal((M, K)).astype(np.float32)
    q2 = np.abs(g.standard_normal((M, K))).astype(np.float32) + np.float32(0.1)
    qx[:100, 30:] = qx[:100, :30]; q2[:100, 30:] = q2[:100, :30]            # exact ties
    qx[100:200, 1::2] = np.nextafter(qx[100:200, ::2], np.float32(np.inf))   # ulp-close pairs
    q2[100:200, 1::2] = q2[100:200, ::2]
    qx[200:230] = 0                                                          # best score 0
    qx[230:260] *= np.float32(1e-25); q2[230:260] *= np.float32(1e-25)       # tiny sums
    q2[260:280] = 0                                                          # no valid candidate
    q2[280:300, ::3] = 0
    want = np.full(M, -1)
    for r in range(M):
        best = np.float32(-np.finfo(np.float32).max)
        for k in range(K):
            a, b = qx[r, k], q2[r, k]
            with np.errstate(over="ignore"):   # -FLT_MAX * b -> -inf, as in C
                take = b > 0 and a * a > best * b
            if take:
                best = np.float32(a / b) * a
                want[r] = k
    got = _running_best(torch.from_numpy(qx), torch.from_numpy(q2)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", [pytest.param("IQ2_XXS", marks=pytest.mark.slow), "IQ3_S"])
def test_nearest_listed_equals_the_c_loop(name, monkeypatch):
    """The blocked neighbour search (groups sorted by list length, padded blocks, several steps) picks what the C
    loop of ``iq2_find_best_neighbour`` picks: the first listed point with the smallest float32 ``d2`` summed in
    element order, the first listed one when every ``d2`` is ``FLT_MAX`` or more (or NaN); on random groups, groups
    of zero weight (all ``d2`` tie at 0), duplicated groups and infinite values."""
    from dsconvert.quant.ggml import _ops
    from dsconvert.quant.ggml.iq2 import _device_tables
    monkeypatch.setattr(_ops, "_PAIRS_PER_STEP", 512)
    grid, kmap, neigh, counts, qt = _device_tables(name, get_type(name).nwant, torch.device("cpu"))
    g = np.random.default_rng(9)
    off = np.nonzero(kmap.numpy() < 0)[0]
    m, n = 600, grid.shape[1]
    key = g.choice(off, m)
    x = np.abs(g.standard_normal((m, n))).astype(np.float32) * np.float32(3)
    w = g.random((m, n)).astype(np.float32)
    s = (g.random(m) + 0.5).astype(np.float32)
    w[:40] = 0                                   # every d2 is 0: the first listed wins
    x[40:80], w[40:80], s[40:80], key[40:80] = x[80:120], w[80:120], s[80:120], key[80:120]
    x[120:130, 0] = np.inf                       # d2 inf or NaN everywhere: the first listed
    x[130:140] *= np.float32(1e19)               # d2 overflows float32
    want = np.empty(m, dtype=np.int64)
    nb, q = neigh.numpy(), qt.numpy()
    for r in range(m):
        lst = nb[key[r]][nb[key[r]] >= 0]
        best, want[r] = np.float32(np.finfo(np.float32).max), lst[0]
        d2 = np.zeros(lst.size, dtype=np.float32)       # all listed points at once, elements in C's order
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(n):
                diff = s[r] * q[i, lst] - x[r, i]
                d2 = d2 + (w[r, i] * diff) * diff
        for p, d in zip(lst, d2):
            if d < best:
                best, want[r] = d, p
    got = _ops.nearest_listed(torch.from_numpy(key), neigh, counts, torch.from_numpy(x), torch.from_numpy(w),
                              torch.from_numpy(s), qt).numpy()
    np.testing.assert_array_equal(got, want)
