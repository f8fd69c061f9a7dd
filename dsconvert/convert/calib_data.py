"""Text for the reference forward: tokenizing with a checkpoint's ``tokenizer.json`` and cutting the
calibration set of ``quantize --awq/--gptq`` (``--calib-data``, ``--num-samples``, ``--seq-len``).

``validate`` scores the same bundled text by default (:data:`BUNDLED_TEXT`); it imports :func:`tokenize` from
here. The text is tokenized with the ``tokenizers`` library, never with remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError, UsageError
from ..formats.checkpoint import Checkpoint

__all__ = ["BUNDLED_TEXT", "tokenize", "calibration_ids"]

#: The text validation and calibration use when none is given (about 800 tokens).
BUNDLED_TEXT = Path(__file__).resolve().parent.parent / "data" / "validation.txt"


def tokenize(model_dir: Path, text: str) -> list[int]:
    """Token ids of ``text`` with ``model_dir/tokenizer.json`` (the ``tokenizers`` library, never remote code).
    A BOS token is prepended when ``tokenizer_config.json`` says ``add_bos_token``.

    Raises:
        BadInputError: no tokenizer.json in ``model_dir``.
    """
    from tokenizers import Tokenizer

    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise BadInputError(f"{model_dir}: no tokenizer.json to tokenize text", hint="pass --token-ids instead")
    tok = Tokenizer.from_file(str(tj))
    ids = tok.encode(text, add_special_tokens=False).ids
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        if cfg.get("add_bos_token"):
            bos = cfg.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            bid = tok.token_to_id(bos) if bos else None
            if bid is not None:
                ids = [bid] + ids
    return ids


def calibration_ids(ck: Checkpoint, calib_data: str | None, num_samples: int, seq_len: int, seed: int = 0
                    ) -> tuple[list[list[int]], dict]:
    """Calibration sequences and their record (:mod:`dsconvert.convert.calibration_data`): ``num_samples``
    windows of ``seq_len`` tokens drawn with ``seed`` from a text file (tokenized with the checkpoint's
    tokenizer.json; default: the bundled calibration set, never the evaluation text), or the first
    ``num_samples`` lists of a JSON list of id lists (``.json``).

    Raises:
        UsageError: unreadable file, or no complete sequence of at least 2 tokens.
    """
    from .calibration_data import (BUNDLED_CALIBRATION, BUNDLED_NAME, calibration_record, read_text_or_ids,
                                   select_windows)

    if calib_data and calib_data.startswith("hf:") and not Path(calib_data).exists():
        raise UsageError(f"--calib-data {calib_data}: Hugging Face datasets are not read (dsconvert never downloads)",
                         hint="save the text to a file and pass its path, or a .json list of token-id lists")
    path = Path(calib_data) if calib_data else BUNDLED_CALIBRATION
    text, seqs = read_text_or_ids(path)
    if seqs is not None:
        seqs = seqs[:num_samples]
    else:
        seqs = select_windows(tokenize(ck.root, text), num_samples, seq_len, seed)
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise UsageError(f"--calib-data {path}: no calibration sequence of at least 2 tokens")
    name = BUNDLED_NAME if calib_data is None else path.name
    return seqs, calibration_record(name, seqs, seq_len, seed)
