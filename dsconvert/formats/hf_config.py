"""``config.json`` of DeepSeek checkpoints: read as plain JSON (never ``AutoConfig``, never remote code),
recognise the model family and its FP8 scheme, and derive the configs dsconvert writes.

Facts: docs/checkpoint-layout.md §3 and 7.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, UnsupportedError

# model_type -> human family label. deepseek_v32 adds the lightning-indexer tensors (FP8 wq_b/wk).
FAMILIES = {
    "deepseek_v3": "DeepSeek-V3/R1",
    "deepseek_v32": "DeepSeek-V3.2",
    "deepseek_v2": "DeepSeek-V2",
    "kimi_k2": "Kimi-K2 (DeepSeek-V3 layout)",
    "deepseek_v4": "DeepSeek-V4",  # its own layout: formats/deepseek_v4.py, docs/checkpoint-layout.md §11
}


@dataclass(frozen=True)
class FP8Scheme:
    """DeepSeek's block FP8 scheme as declared in ``quantization_config``."""

    fmt: str  # "e4m3"
    block: tuple[int, int]  # weight_block_size, e.g. (128, 128)
    scale_fmt: str | None  # None before V3.1, "ue8m0" from V3.1 (scales still stored as F32)
    activation_scheme: str | None


def load_config(model_dir: str | Path) -> dict:
    """Parse ``model_dir/config.json`` as JSON.

    Raises:
        BadInputError: missing, unreadable or not a JSON object, or without ``model_type``.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BadInputError(f"{path}: not found", hint="SRC must be a checkpoint directory holding config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise BadInputError(f"{path}: has no model_type", hint="is this a Hugging Face model directory?")
    return cfg


def family(cfg: dict, *, source: str = "config.json") -> str:
    """The family label for a supported ``model_type``.

    Raises:
        UnsupportedError: any model_type outside the DeepSeek V2/V3/V4 families (named, with the supported list);
            DeepSeek-V4.1, saying why (docs/checkpoint-layout.md §14).
    """
    mt = cfg.get("model_type")
    if mt in ("deepseek_v4", "deepseek_v41") or (str(mt).startswith("deepseek") and "text_config" in cfg):
        from .deepseek_v4 import refuse_v41

        refuse_v41(cfg, source)
    if mt not in FAMILIES:
        raise UnsupportedError(f"{source}: model_type {mt!r} is not a DeepSeek V2/V3-family model",
                               hint="supported model_type values: " + ", ".join(sorted(FAMILIES)))
    return FAMILIES[mt]


def fp8_scheme(cfg: dict, *, source: str = "config.json") -> FP8Scheme | None:
    """DeepSeek's FP8 block scheme, or ``None`` when the config declares no quantization.

    Raises:
        UnsupportedError: a quantization_config that is not DeepSeek's e4m3 block FP8 (another quant_method,
            fmt, a non-2-D block size, or an unknown ``scale_fmt``) — refused rather than mis-converted.
    """
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise UnsupportedError(f"{source}: quantization_config.quant_method is {method!r}; this command reads "
                               "DeepSeek's block FP8 (quant_method fp8) or unquantized checkpoints",
                               hint="pass an FP8 release or a BF16 checkpoint")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only e4m3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedError(f"{source}: quantization_config.weight_block_size {block!r} is not a 2-D block size",
                               hint="per-tensor or per-channel FP8 checkpoints are not DeepSeek's layout")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise UnsupportedError(f"{source}: quantization_config.scale_fmt {scale_fmt!r} is unknown")
    return FP8Scheme(fmt, (block[0], block[1]), scale_fmt, qc.get("activation_scheme"))


def version_label(cfg: dict) -> str:
    """A readable release label: 'DeepSeek-V3/R1', 'DeepSeek-V3.1 (scale_fmt ue8m0)', 'DeepSeek-V4 (FP4 experts)'."""
    fam = FAMILIES.get(cfg.get("model_type"), str(cfg.get("model_type")))
    qc = cfg.get("quantization_config") or {}
    if cfg.get("model_type") == "deepseek_v4":
        ed = qc.get("expert_dtype", cfg.get("expert_dtype"))
        return f"{fam} ({ed.upper()} experts)" if qc and ed else fam
    if cfg.get("model_type") == "deepseek_v3" and qc.get("scale_fmt") == "ue8m0":
        return "DeepSeek-V3.1 (scale_fmt ue8m0)"
    return fam


def unquantized_config(cfg: dict, dtype: str = "bfloat16") -> dict:
    """The config to write next to dequantized weights: ``quantization_config`` removed, dtype set.

    Keeps ``architectures``, ``auto_map`` and ``num_nextn_predict_layers``. Sets ``torch_dtype`` (and ``dtype``
    where the source already uses transformers 5's key).
    """
    out = copy.deepcopy(cfg)
    out.pop("quantization_config", None)
    out["torch_dtype"] = dtype
    if "dtype" in out:
        out["dtype"] = dtype
    return out


def dump_config(cfg: dict) -> bytes:
    """Serialise a config the way transformers does (2-space indent, sorted as given, trailing newline)."""
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
