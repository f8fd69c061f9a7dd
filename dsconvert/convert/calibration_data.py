"""Calibration data for ``quantize --awq/--gptq``, kept apart from ``validate``'s evaluation text.

* **The bundled set** ``dsconvert/data/calibration.txt`` (about 24 kB: Python reference-manual prose with
  examples, then standard-library source code; PSF licence, built by :mod:`dsconvert.testing.trained`) is the
  default. It shares no text with ``dsconvert/data/validation.txt``, the default evaluation text, so the
  documented workflow (``quantize --gptq`` then ``validate``) reports held-out quality
  (docs/int-formats.md §16, docs/known-failures.md item 41).
* **Windows.** The text is tokenized with the checkpoint's ``tokenizer.json`` and cut into consecutive
  ``seq_len``-token windows; ``num_samples`` of them are drawn without replacement by a seeded permutation
  (``--calib-seed``; seed 0 is the default). A text shorter than ``num_samples * seq_len`` is repeated, as before.
* **Record.** :func:`calibration_record` names the data and hashes the exact windows (sha256 over the id lists);
  it goes into the quantize report and the output's ``quantization_config``.
* **Overlap.** :func:`ngram_fingerprint` keeps a hash of every ``NGRAM``-token span starting at a multiple of
  ``STRIDE`` inside each calibration window (written to ``OUT/calibration.json``). An evaluation window that
  shares a run of at least ``NGRAM + STRIDE - 1`` tokens with any calibration window contains one of those
  spans whole, so :func:`overlapping_windows` finds every such window (and never reports a shorter accidental
  match of fewer than ``NGRAM`` tokens).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import UsageError

BUNDLED_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
BUNDLED_NAME = "dsconvert:calibration.txt"
#: Sidecar written next to a calibrated output (read by ``validate`` for the overlap check).
SIDECAR = "calibration.json"
NGRAM, STRIDE = 16, 8


def windows_sha256(seqs: list[list[int]]) -> str:
    """sha256 (hex) of the calibration windows: the JSON of the id lists, compact separators."""
    return hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest()


def select_windows(ids: list[int], num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``num_samples`` windows of ``seq_len`` tokens from ``ids``: consecutive non-overlapping windows, drawn
    by ``torch.randperm(n, generator=manual_seed(seed))`` and kept in text order; ``ids`` is repeated first when
    it holds fewer than ``num_samples * seq_len`` tokens (then every window is used)."""
    need = num_samples * seq_len
    if ids and len(ids) < need:
        ids = (ids * (need // len(ids) + 1))[:need]
    wins = [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)]
    wins = [w for w in wins if len(w) == seq_len] or wins
    if len(wins) <= num_samples:
        return wins
    pick = torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [wins[i] for i in sorted(pick.tolist())]


def calibration_record(name: str, seqs: list[list[int]], seq_len: int, seed: int) -> dict:
    """What ``quantization_config["calibration"]`` and the report say about the calibration data."""
    return {"dataset": name, "windows_sha256": windows_sha256(seqs), "sequences": len(seqs),
            "tokens": sum(len(s) for s in seqs), "seq_len": seq_len, "seed": seed}


def _span_hash(span: list[int]) -> str:
    return hashlib.blake2b(json.dumps(span, separators=(",", ":")).encode(), digest_size=8).hexdigest()


def ngram_fingerprint(seqs: list[list[int]]) -> dict:
    """``{"ngram", "stride", "hashes"}``: 64-bit blake2b of every ``NGRAM``-token span of each window starting
    at a multiple of ``STRIDE`` (sorted, deduplicated)."""
    hashes = {_span_hash(s[i: i + NGRAM]) for s in seqs for i in range(0, len(s) - NGRAM + 1, STRIDE)}
    return {"ngram": NGRAM, "stride": STRIDE, "hashes": sorted(hashes)}


def overlapping_windows(eval_seqs: list[list[int]], fingerprint: dict) -> int:
    """How many of ``eval_seqs`` contain a calibration span of ``fingerprint`` (every ``ngram``-token span of
    each evaluation window is looked up).

    Raises:
        UsageError: ``fingerprint`` is not a dict with an int ``ngram`` and a list ``hashes``.
    """
    try:
        n = int(fingerprint["ngram"])
        known = set(fingerprint["hashes"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{SIDECAR}: not a calibration fingerprint ({e})",
                         hint=f"remove the candidate's {SIDECAR} or requantize it") from e
    return sum(1 for s in eval_seqs if any(_span_hash(s[i: i + n]) in known for i in range(len(s) - n + 1)))


def read_text_or_ids(path: Path) -> tuple[str | None, list[list[int]] | None]:
    """A calibration file: ``.json`` = a list of token-id lists, anything else = UTF-8 text.

    Raises:
        UsageError: unreadable file or a malformed id list.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--calib-data {path}: {e.strerror}") from e
    if path.suffix != ".json":
        return raw, None
    try:
        return None, [[int(t) for t in s] for s in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise UsageError(f"--calib-data {path}: expected a JSON list of token-id lists ({e})") from e
