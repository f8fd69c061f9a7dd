"""Does ``tokenizer.json`` belong to this model? Ids inside ``vocab_size``, bos/eos at the ids config.json names.

A swapped tokenizer (another model's ``tokenizer.json`` copied into the folder) loads fine and tokenizes fine, and
then feeds the model ids its embedding has no row for, or begins every prompt with the wrong special token. Two
facts catch it from the files alone (docs/checkpoint-layout.md §15):

* every id in ``tokenizer.json`` (``model.vocab`` and ``added_tokens``) is below config.json's ``vocab_size``;
* the ids of ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` in ``tokenizer.json`` equal config.json's
  ``bos_token_id`` / ``eos_token_id`` (DeepSeek-V3: 0 and 1).

Reads JSON only; no tokenizer code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Problem

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_content(v) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (an AddedToken) -> the token text."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(tok: dict) -> tuple[dict[str, int], int | None]:
    """(token text -> id, for every token of ``tokenizer.json``; the largest id, or None when there is none)."""
    model = tok.get("model") or {}
    vocab = model.get("vocab")
    table: dict[str, int] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        table.update({k: int(v) for k, v in vocab.items() if isinstance(v, int)})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        table.update({e[0]: i for i, e in enumerate(vocab) if isinstance(e, list) and e})
    for a in tok.get("added_tokens") or []:
        if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str):
            table[a["content"]] = a["id"]
    return table, (max(table.values()) if table else None)


def tokenizer_problems(root: Path, config: dict) -> list[Problem]:
    """Problems of ``root/tokenizer.json`` against ``config`` (config.json as a dict), all ``fatal=False``: the
    caller decides (inspect lists them as errors, conversions warn, validate fails its ``tokenizer`` check).

    Kinds: ``tokenizer_missing`` (no tokenizer.json: text input will not work), ``tokenizer_unreadable``,
    ``tokenizer_vocab`` (ids at or above ``vocab_size``), ``tokenizer_special`` (bos/eos ids differ).
    """
    root = Path(root)
    path = root / TOKENIZER
    if not path.is_file():
        return [Problem("tokenizer_missing", f"no {TOKENIZER}: `validate` and `logits --text` will need one to "
                        "tokenize text (token ids still work)", TOKENIZER, fatal=False,
                        hint="copy the release's tokenizer.json and tokenizer_config.json into the folder")]
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tok, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return [Problem("tokenizer_unreadable", f"{TOKENIZER} is not readable JSON ({e})", TOKENIZER, fatal=False,
                        hint="re-download tokenizer.json")]
    table, top = _ids(tok)
    probs: list[Problem] = []
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and top is not None and top >= vocab:
        over = sorted({i for i in table.values() if i >= vocab})
        probs.append(Problem("tokenizer_vocab", f"{TOKENIZER} has ids up to {top} but config.json vocab_size is "
                             f"{vocab} ({len(over)} ids outside 0..{vocab - 1}): it belongs to another model",
                             TOKENIZER, fatal=False,
                             hint="use the tokenizer.json released with this checkpoint"))
    try:
        tcfg = json.loads((root / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tcfg = {}
    for which in ("bos", "eos"):
        want = config.get(f"{which}_token_id")
        text = _token_content(tcfg.get(f"{which}_token")) if isinstance(tcfg, dict) else None
        if want is None or text is None:
            continue
        got = table.get(text)
        wants = set(want) if isinstance(want, list) else {want}
        if got not in wants:
            probs.append(Problem("tokenizer_special", f"{which}_token {text!r} is id {got} in {TOKENIZER} but "
                                 f"config.json says {which}_token_id {want}", TOKENIZER, fatal=False,
                                 hint="the tokenizer does not match the model; use the tokenizer.json and "
                                      "tokenizer_config.json released with this checkpoint"))
    return probs
