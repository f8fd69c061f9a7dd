"""``dsconvert.quant.ggml.native``: llama.cpp's ``ggml_quantize_chunk`` over ctypes, split over threads.

Oracles: the single-threaded call of the test oracle (:mod:`dsconvert.testing.ggml_oracle`, the same library
without the row split), and dsconvert's torch kernels, which other tests hold byte-identical to it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from dsconvert.quant.ggml import native, quantize, registered_types
from dsconvert.testing import ggml_oracle

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def lib():
    n = native.load()
    if n is None:
        pytest.skip("no ggml shared library (llama_cpp not installed)")
    return n


def _x(rows: int, n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((rows, n)) * np.exp(g.uniform(-2, 2, (rows, 1)))).astype(np.float32)


def test_offers_every_block_type_dsconvert_writes(lib):
    assert lib.types == set(registered_types()) - {"F32", "F16", "BF16"}
    assert lib.requires_imatrix("IQ2_XXS") and lib.requires_imatrix("IQ1_S") and not lib.requires_imatrix("Q4_K")
    assert lib.supports("IQ2_XXS", imatrix=True) and not lib.supports("IQ2_XXS", imatrix=False)
    assert not lib.supports("BF16", imatrix=False)


@pytest.mark.parametrize("name,weighted", [("Q8_0", False), ("Q4_K", False), ("Q6_K", True), ("IQ4_XS", True),
                                           ("IQ2_XXS", True)])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_row_split_gives_the_single_call_bytes(lib, name, weighted, threads):
    """7 rows over 1, 3 or 8 threads (more threads than rows too) equal one ``ggml_quantize_chunk`` over all
    rows, and the torch kernels."""
    x = _x(7, 512)
    im = np.random.default_rng(1).random(512).astype(np.float32) if weighted else None
    got = lib.quantize(x, name, im, threads)
    ref = ggml_oracle.load().quantize(x, GGMLQuantizationType[name], im)
    np.testing.assert_array_equal(got, ref)
    ours = quantize(torch.from_numpy(x), name, None if im is None else torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(got, ours)


def test_refusals_are_errors_not_aborts(lib):
    """What ggml would abort on (GGML_ASSERT) is a ValueError here."""
    with pytest.raises(ValueError, match="without an imatrix"):
        lib.quantize(_x(2, 256), "IQ2_XXS", None)
    with pytest.raises(ValueError, match="block size 256"):
        lib.quantize(_x(2, 200), "Q4_K")
    with pytest.raises(ValueError, match="imatrix has 10 values"):
        lib.quantize(_x(2, 256), "Q4_K", np.ones(10, np.float32))
    with pytest.raises(ValueError, match="cannot quantize F16"):
        lib.quantize(_x(2, 256), "F16")
    assert lib.quantize(np.zeros((0, 256), np.float32), "Q4_K").shape == (0, 144)


def test_library_from_the_environment(lib, monkeypatch, tmp_path):
    """``$DSCONVERT_GGML_LIB`` wins; a path that is not a library gives None (the torch kernels), never a crash."""
    monkeypatch.setenv(native.ENV_LIB, str(lib.path))
    assert native.library_candidates() == [lib.path]
    assert native.load() is not None and native.load().path == lib.path
    junk = tmp_path / "libggml-base.so"
    junk.write_bytes(b"not an ELF file")
    monkeypatch.setenv(native.ENV_LIB, str(junk))
    assert native.load() is None
