"""dsconvert's safetensors writer and header reader against the ``safetensors`` library.

* ``ShardWriter`` (streaming, chunked) writes files byte-identical to ``safetensors.torch.save_file`` for the same
  tensors and ``{"format": "pt"}`` metadata, for every dtype DeepSeek checkpoints use plus a few more, empty and
  0-d tensors included.
* Every shard ``fp8-to-bf16`` writes carries ``__metadata__ == {"format": "pt"}`` (docs/known-failures.md item 4), read back
  with ``safetensors.safe_open``.
* ``read_header`` refuses damaged files with a message that names the file and the tensor.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsconvert.errors import BadInputError, UnsupportedError
from dsconvert.formats.safetensors_io import PlannedTensor, ShardWriter, TORCH_TO_ST, read_header

from ..conftest import shard_files


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(130, 256, generator=g)
    return {
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (w * 3).to(torch.float8_e4m3fn),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": torch.rand(2, 2, generator=g),
        "model.embed_tokens.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "half": torch.randn(5, 7, generator=g).to(torch.float16),
        "e5m2": torch.randn(9, 3, generator=g).to(torch.float8_e5m2),
        "ids": torch.arange(-5, 6, dtype=torch.int64),
        "bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "i8": torch.arange(-100, 100, 9, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i32": torch.arange(10, dtype=torch.int32).reshape(2, 5),
        "empty_bf16": torch.empty(0, 16, dtype=torch.bfloat16),
        "empty_f8": torch.empty(4, 0, dtype=torch.float8_e4m3fn),
        "empty_f32": torch.empty(0, dtype=torch.float32),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_shard_writer_byte_identical_to_save_file(tmp_path, chunk_rows):
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})

    ours = tmp_path / "ours.safetensors"
    planned = [PlannedTensor(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    w = ShardWriter(ours, planned, {"format": "pt"})
    for p in w.order:
        t = tensors[p.name]
        if chunk_rows is None or t.dim() == 0:
            w.write(p.name, t)
        else:
            for r0 in range(0, t.shape[0], chunk_rows):
                w.write(p.name, t[r0:r0 + chunk_rows])
    size, digest = w.commit()

    assert not ours.with_name(ours.name + ".tmp").exists()
    assert ours.read_bytes() == ref.read_bytes()
    assert size == ref.stat().st_size
    import hashlib
    assert digest == hashlib.sha256(ref.read_bytes()).hexdigest()


def test_every_output_shard_has_format_pt_metadata(tiny_out):
    out, _ = tiny_out
    shards = shard_files(out)
    assert shards
    for f in shards:
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}, f.name


# --- read_header on damaged files -----------------------------------------------------------------------------

NAME_A = "model.layers.0.self_attn.o_proj.weight"
NAME_B = "model.layers.7.mlp.experts.3.down_proj.weight"


def _write_raw(path, header: dict | bytes, data: bytes) -> None:
    js = header if isinstance(header, bytes) else json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)


def _good_header() -> dict:
    return {"__metadata__": {"format": "pt"},
            NAME_A: {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
            NAME_B: {"dtype": "F32", "shape": [3, 2], "data_offsets": [16, 40]}}


def test_read_header_accepts_the_good_file(tmp_path):
    p = tmp_path / "good.safetensors"
    _write_raw(p, _good_header(), bytes(40))
    h = read_header(p)
    assert set(h.tensors) == {NAME_A, NAME_B}
    # the library agrees the file is valid
    with safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == {NAME_A, NAME_B}


def _damaged(kind: str) -> tuple[dict | bytes, bytes, str | None]:
    """(header, data, tensor the message must name)."""
    h = _good_header()
    if kind == "truncated":
        return h, bytes(30), NAME_B  # B's bytes [16, 40) are cut at 30
    if kind == "offsets_vs_shape":
        h[NAME_B]["shape"] = [4, 2]  # needs 32 bytes, offsets span 24
        return h, bytes(40), NAME_B
    if kind == "dtype_vs_offsets":
        h[NAME_A]["dtype"] = "F32"  # needs 32 bytes, offsets span 16
        return h, bytes(40), NAME_A
    if kind == "overlap":
        h[NAME_B]["data_offsets"] = [8, 32]
        return h, bytes(40), NAME_B
    if kind == "gap":
        h[NAME_B]["data_offsets"] = [24, 48]
        return h, bytes(48), NAME_B
    if kind == "garbage_json":
        return b'{"' + NAME_A.encode() + b'": {"dtype": "BF16", "shape": [2, 4], ', bytes(40), None
    if kind == "unknown_dtype":
        h[NAME_B]["dtype"] = "F4_E2M1X"
        return h, bytes(40), NAME_B
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "offsets_vs_shape", "dtype_vs_offsets", "overlap", "gap",
                                  "garbage_json", "unknown_dtype"])
def test_read_header_errors_name_file_and_tensor(tmp_path, kind):
    header, data, tensor = _damaged(kind)
    p = tmp_path / f"model-00002-of-000009-{kind}.safetensors"
    _write_raw(p, header, data)
    with pytest.raises(BadInputError) as ei:
        read_header(p)
    msg = ei.value.message
    assert str(p) in msg, msg
    if tensor is not None:
        assert tensor in msg, msg
    if kind == "unknown_dtype":
        assert isinstance(ei.value, UnsupportedError)
        assert "F4_E2M1X" in msg
    # the reference library refuses these files too (they really are damaged)
    with pytest.raises(Exception):
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
