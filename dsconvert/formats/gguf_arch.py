"""The GGUF architectures ``dsconvert gguf`` writes, as registry entries the one exporter drives.

An entry is data plus the few functions in which two layouts differ: which checkpoints it takes, the tensor
plan (names, numpy shapes, sources, producer kind, layer), the per-tensor ggml types of a ``--type`` and its
overrides, the model KV pairs, ``general.file_type``, and the options it does not take. Everything else
(writing, splits, resume, progress, ``--dry-run`` sizes, ``--ray`` units) is the exporter's
(``convert/gguf_export.py``) and shared.

- ``deepseek2``: DeepSeek-V3/R1 (FP8 release or BF16), :mod:`dsconvert.formats.gguf_deepseek2`;
- ``deepseek4``: DeepSeek-V4 release checkpoints (FP8 + FP4 experts), :mod:`dsconvert.formats.gguf_deepseek4`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import gguf

from dsconvert.errors import UnsupportedError
from dsconvert.formats import gguf_deepseek2 as g2
from dsconvert.formats import gguf_deepseek4 as g4
from dsconvert.formats.checkpoint import Checkpoint

_ADD = {"UINT32": "add_uint32", "FLOAT32": "add_float32", "BOOL": "add_bool", "STRING": "add_string"}


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture.

    Attributes:
        name: ``general.architecture``.
        layout: one line for the report.
        check: ``check(config)`` raises UnsupportedError for configs the llama.cpp loader rejects.
        plan: ``plan(ck)`` -> :class:`~dsconvert.formats.gguf_deepseek2.GGUFPlan` from headers only.
        types: ``types(plan, ftype, config, overrides=, output_type=, embd_type=, pure=, has_imatrix=)``
            -> ``{name: ggml type}``.
        file_type: ``--type`` mix -> ``general.file_type``.
        write_metadata: ``write_metadata(writer, config, file_type)``: the model KV pairs (the vocab is shared).
        refused: ``(GGUFOptions field, CLI spelling, why)`` for each option it does not take.
        imatrix_optional: regexes of the tensor names an imatrix has no entry for by construction (never a
            matmul input, or collected only on request): llama.cpp quantizes them without weights.
    """

    name: str
    layout: str
    check: Callable[[Mapping[str, Any]], None]
    plan: Callable[[Checkpoint], g2.GGUFPlan]
    types: Callable[..., dict[str, str]]
    file_type: Callable[[str], int]
    write_metadata: Callable[[gguf.GGUFWriter, Mapping[str, Any], int], None]
    refused: tuple[tuple[str, str, str], ...] = ()
    imatrix_optional: tuple[str, ...] = (r"token_embd\.weight$", r"output\.weight$")


def _v3_check(cfg: Mapping[str, Any]) -> None:
    """Refuse configs the deepseek2 layout cannot express (V3.2's indexer needs llama.cpp's deepseek32).

    Raises:
        UnsupportedError: ``model_type`` deepseek_v32.
    """
    if cfg.get("model_type") == "deepseek_v32":
        raise UnsupportedError("DeepSeek-V3.2 (model_type deepseek_v32) is not supported by `dsconvert gguf`: its "
                               "lightning indexer has no deepseek2 tensors",
                               hint="V3.2 needs llama.cpp's deepseek32 architecture, which dsconvert does not "
                                    "write yet")


def _v3_plan(ck: Checkpoint) -> g2.GGUFPlan:
    return g2.plan_tensors({n: (tuple(e.shape), e.dtype) for n, (_, e) in ck.tensors.items() if not ck.is_scale(n)},
                           ck.config)


def _v3_types(plan, ftype, cfg, **kw) -> dict[str, str]:
    return g2.plan_types(plan, ftype, cfg, fallback_f16=True, **kw)


def _v4_plan(ck: Checkpoint) -> g2.GGUFPlan:
    return g4.plan_tensors({n: (tuple(e.shape), e.dtype) for n, (_, e) in ck.tensors.items()}, ck.config)


def _v4_metadata(w: gguf.GGUFWriter, cfg: Mapping[str, Any], file_type: int) -> None:
    """:func:`gguf_deepseek4.metadata_items` in order (``general.architecture`` first, where the data puts it)."""
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    for key, typ, val in g4.metadata_items(cfg, file_type):
        if typ == "ARRAY_FLOAT32":
            w.add_key_value(key, [float(v) for v in val], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
        elif typ == "ARRAY_INT32":
            w.add_key_value(key, [int(v) for v in val], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            getattr(w, _ADD[typ])(key, val)


DEEPSEEK2 = GGUFArch(
    name=g2.ARCH_NAME, layout="mainline MLA (attn_k_b/attn_v_b), llama.cpp >= PR #12801",
    check=_v3_check, plan=_v3_plan, types=_v3_types, file_type=g2.file_type_id,
    write_metadata=g2.write_metadata)

DEEPSEEK4 = GGUFArch(
    name=g4.ARCH_NAME, layout="deepseek4 (hyper-connections, compressed attention, MXFP4 routed experts)",
    check=g4.check_config, plan=_v4_plan, types=g4.plan_types, file_type=g4.file_type,
    write_metadata=_v4_metadata,
    refused=(("recipe", "--recipe", "the named recipes are deepseek2 tensor rules"),),
    # the compressors' ape is added to the pooled keys; the head's mHC mix runs only with --process-output
    imatrix_optional=(r"token_embd\.weight$", r"output\.weight$", r"_ape\.weight$", r"output_hc_fn\.weight$"))

ARCHS: dict[str, GGUFArch] = {a.name: a for a in (DEEPSEEK2, DEEPSEEK4)}


def arch_for(ck: Checkpoint) -> GGUFArch:
    """The entry that writes checkpoint ``ck``: ``deepseek4`` for a DeepSeek-V4 release, ``deepseek2`` otherwise."""
    return DEEPSEEK4 if ck.v4 is not None else DEEPSEEK2
