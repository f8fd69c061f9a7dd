"""`dsconvert gguf` for DeepSeek-V4 release checkpoints: one ``deepseek4`` GGUF file.

The layout (names, KV, types) is data in :mod:`dsconvert.formats.gguf_deepseek4`; this module reads the
release tensors one output tensor at a time and streams them into the file:

- FP8 e4m3 + E8M0 ``.scale``: dequantized to float32 by the exact rule (``dequant_producer``), then BF16
  (exact) or Q8_0 (dsconvert's ggml ``quantize_row_q8_0``);
- FP4 experts: repacked to MXFP4 byte for byte (``repack_mxfp4``), stacked in expert-id order;
- BF16 / F32 as stored, ``tid2eid`` as I32.

Whole-file only: no splits, resume or remote units (the V3 exporter's features) yet.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import UnsupportedError, UsageError
from ..formats import gguf_deepseek4 as g4
from ..formats.checkpoint import Checkpoint
from ..formats.gguf_vocab import write_vocab
from ..quant import ggml
from ..report import base_report
from ..units import bytes_fields
from . import cancel
from .manifest import commit_tmp
from .pipeline import dequant_producer

_DROP_REASON = "mtp.* (no MTP head exported) and the hash layers' unused ffn.gate.bias, as llama.cpp's converter"
_ADD = {"UINT32": "add_uint32", "FLOAT32": "add_float32", "BOOL": "add_bool", "STRING": "add_string"}


def _plan(ck: Checkpoint, ftype: str) -> tuple[list[g4.V4TensorPlan], dict[str, str], list[str]]:
    plans, dropped = g4.plan_tensors({n: (tuple(e.shape), e.dtype) for n, (_, e) in ck.tensors.items()},
                                     ck.config)
    return plans, {p.name: g4.default_type(p, ftype) for p in plans}, dropped


def _nbytes(p: g4.V4TensorPlan, qtype: str) -> int:
    if qtype == "I32":
        return 4 * p.n_elements
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return p.n_elements // bs * ts


def tensor_bytes(ck: Checkpoint, p: g4.V4TensorPlan, qtype: str, device: torch.device) -> np.ndarray:
    """The bytes of output tensor ``p`` as ggml type ``qtype`` (uint8, C order).

    Raises:
        UnsupportedError: a kind/type pair the exporter does not write.
    """
    if p.kind == "experts_mxfp4":
        return torch.stack([g4.repack_mxfp4(ck.read(s), ck.read(ck.scale_of(s))) for s in p.sources]
                           ).numpy().reshape(-1)
    if p.kind == "tid2eid":
        return ck.read(p.sources[0]).to(torch.int32).contiguous().view(torch.uint8).numpy().reshape(-1)
    src = p.sources[0]
    if p.kind == "fp8":
        x = torch.cat(list(dequant_producer(ck, src, torch.float32, device, 64 << 20)()))
    else:
        x = ck.read(src)
    if qtype == "F32":
        return x.to(torch.float32).contiguous().view(torch.uint8).numpy().reshape(-1)
    if qtype == "BF16":
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().reshape(-1)
    if qtype == "Q8_0":
        return ggml.get_type("Q8_0").quantize(x.to(device=device, dtype=torch.float32)).cpu().numpy().reshape(-1)
    raise UnsupportedError(f"{p.name}: dsconvert does not write {qtype} for a deepseek4 GGUF")


def run(ck: Checkpoint, output: Path | None, ftype: str, device: torch.device, *, dry_run: bool = False) -> dict:
    """Export V4 checkpoint ``ck`` to ``output`` as a ``deepseek4`` GGUF of ``--type ftype`` (BF16 | Q8_0).

    Raises:
        UnsupportedError (exit 3): see :func:`gguf_deepseek4.check_config` / ``plan_tensors``.
        UsageError (exit 2): another ``--type``.
    """
    t0 = time.perf_counter()
    if ftype not in ("BF16", "Q8_0"):
        raise UsageError(f"--type {ftype}: DeepSeek-V4 GGUFs are written as BF16 or Q8_0 (experts MXFP4 in both)",
                         hint="dsconvert gguf V4SRC -o out.gguf --type Q8_0")
    g4.check_config(ck.config)
    plans, types, dropped = _plan(ck, ftype)
    nbytes = {p.name: _nbytes(p, types[p.name]) for p in plans}
    report = base_report("gguf")
    summary: dict = {}
    for p in plans:
        d = summary.setdefault(types[p.name], {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += nbytes[p.name]
    n_el = sum(p.n_elements for p in plans)
    report["plan"] = {"architecture": g4.ARCH_NAME, "type": ftype, "file_type": g4.FILE_TYPE_MXFP4_MOE,
                      "tensors": len(plans), "elements": n_el, "types": dict(sorted(summary.items())),
                      "tensor_bytes": bytes_fields(sum(nbytes.values())),
                      "bpw": round(8 * sum(nbytes.values()) / n_el, 4),
                      "dropped": {"tensors": len(dropped), "reason": _DROP_REASON, "list": dropped}}
    report["dry_run"] = dry_run
    report["source"] = {"path": str(ck.root), "family": "DeepSeek-V4", "tensors": len(ck.tensors)}
    if dry_run:
        return report
    tmp = Path(output).with_name(Path(output).name + ".tmp")  # an existing output stays whole until the rename
    try:
        vocab = _write(ck, tmp, plans, types, nbytes, device)
        commit_tmp(tmp, Path(output))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report["vocab"] = vocab.summary()
    report["output"] = {"path": str(output), **bytes_fields(Path(output).stat().st_size)}
    report["types_written"] = dict(Counter(types.values()))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _write(ck: Checkpoint, tmp: Path, plans: list[g4.V4TensorPlan], types: dict[str, str], nbytes: dict[str, int],
           device: torch.device):
    """Write the whole GGUF to ``tmp`` (header, KV, tensor infos, data, one tensor at a time); returns the vocab
    written. Raises :class:`~dsconvert.convert.cancel.Cancelled` between tensors on SIGINT/SIGTERM."""
    w = gguf.GGUFWriter(tmp, g4.ARCH_NAME)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # re-added from the data, in its place
    for key, typ, val in g4.metadata_items(ck.config, g4.FILE_TYPE_MXFP4_MOE):
        if typ == "ARRAY_FLOAT32":
            w.add_key_value(key, [float(v) for v in val], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
        elif typ == "ARRAY_INT32":
            w.add_key_value(key, [int(v) for v in val], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            getattr(w, _ADD[typ])(key, val)
    vocab = write_vocab(w, ck.root, ck.config)
    for p in plans:
        qt = gguf.GGMLQuantizationType[types[p.name]]
        rows = max(1, p.n_elements // p.shape[-1])
        w.add_tensor_info(p.name, (*p.shape[:-1], nbytes[p.name] // rows), np.dtype(np.uint8), nbytes[p.name],
                          raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plans:
        cancel.check()
        b = tensor_bytes(ck, p, types[p.name], device)
        if b.size != nbytes[p.name]:
            raise AssertionError(f"{p.name}: {b.size} bytes made, {nbytes[p.name]} planned")
        w.write_tensor_data(b)
    w.close()
    return vocab
