"""GGUF tokenizer keys for DeepSeek (byte-level BPE, ``tokenizer.ggml.model = gpt2``).

Reads ``tokenizer.json`` with the ``tokenizers`` library, never ``AutoTokenizer``: transformers 5.x
loads DeepSeek's tokenizer with a Metaspace pre-tokenizer, so llama.cpp's pre-tokenizer hash stops
matching (docs/known-failures.md item 22). ``tokenizer.ggml.pre`` is therefore written directly.

Tokens and types follow llama.cpp ``conversion/base.py::TextModel.get_vocab_base`` /
``_set_vocab_gpt2``:

- ids ``0 .. vocab_size-1`` (``vocab_size`` from config.json); ids absent from tokenizer.json become
  ``[PAD{id}]`` with type UNUSED (5);
- added tokens: not-normalized ones are round-tripped through encode/decode first; then CONTROL (3)
  if ``special`` or the text looks special (``<|...|>``, ``<｜...｜>``, ``<pad>``, ...), else
  USER_DEFINED (4) with ``▁`` replaced by a space;
- everything else NORMAL (1).

Merges, special token ids (bos/eos/pad/... from tokenizer_config.json then config.json),
``add_bos_token``/``add_eos_token`` and the chat template come from ``gguf.SpecialVocab`` exactly
as the converter uses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import gguf
from gguf import TokenType

from dsconvert.errors import BadInputError, UnsupportedError

log = logging.getLogger(__name__)

# Pre-tokenizer names known to llama.cpp (src/llama-vocab.cpp) for DeepSeek models.
PRE_DEEPSEEK_V3 = "deepseek-v3"  # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM
PRE_DEEPSEEK_LLM = "deepseek-llm"  # DeepSeek LLM 7B/67B and, as published GGUFs show, V2


def default_pre(cfg: Mapping[str, Any]) -> str:
    """``tokenizer.ggml.pre`` for a config: ``deepseek-v3`` for V3/R1, ``deepseek-llm`` for V2."""
    if cfg.get("model_type") == "deepseek_v2" or "DeepseekV2ForCausalLM" in (cfg.get("architectures") or []):
        return PRE_DEEPSEEK_LLM
    return PRE_DEEPSEEK_V3


def does_token_look_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as CONTROL even when not flagged ``special``.

    Source: llama.cpp ``conversion/base.py::TextModel.does_token_look_special``.
    """
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


@dataclass
class GGUFVocab:
    """Everything :func:`write_vocab` writes; ``special`` is the ``gguf.SpecialVocab`` used."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    special: gguf.SpecialVocab

    @property
    def merges(self) -> list[str]:
        return self.special.merges

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self.special.special_token_ids)

    @property
    def add_special_token(self) -> dict[str, bool]:
        return dict(self.special.add_special_token)

    @property
    def chat_template(self):
        return self.special.chat_template

    def summary(self) -> dict[str, Any]:
        """Plain-dict view for ``--dry-run`` / ``inspect`` (no token lists)."""
        counts: dict[str, int] = {}
        for t in self.token_types:
            counts[TokenType(t).name] = counts.get(TokenType(t).name, 0) + 1
        return {
            "tokenizer.ggml.model": self.model,
            "tokenizer.ggml.pre": self.pre,
            "n_tokens": len(self.tokens),
            "token_types": counts,
            "n_merges": len(self.merges),
            "special_token_ids": self.special_token_ids,
            "add_special_token": self.add_special_token,
            "has_chat_template": self.chat_template is not None,
        }


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(directory, tokenizer.json) from a model dir or a tokenizer.json path."""
    p = Path(path)
    tok_json = p / "tokenizer.json" if p.is_dir() else p
    if not tok_json.is_file():
        raise BadInputError(f"no tokenizer.json at {tok_json}",
                            hint="pass the model directory that holds tokenizer.json")
    return tok_json.parent, tok_json


def read_vocab(path: str | Path, cfg: Mapping[str, Any], *, pre: str | None = None) -> GGUFVocab:
    """Build the GGUF vocab from ``tokenizer.json`` (+ tokenizer_config.json, config.json beside it).

    Args:
        path: model directory, or the path of its ``tokenizer.json``.
        cfg: config.json as a dict; ``vocab_size`` sets the token count (padding with
            ``[PAD{id}]``).
        pre: ``tokenizer.ggml.pre``; default from :func:`default_pre`.

    Raises:
        BadInputError: tokenizer.json missing, not a BPE model, or a token id >= ``vocab_size``.
    """
    from tokenizers import Tokenizer  # the Rust library; never transformers

    directory, tok_json = _resolve(path)
    with open(tok_json, encoding="utf-8") as f:
        model_type = (json.load(f).get("model") or {}).get("type")
    if model_type != "BPE":
        raise UnsupportedError(f"{tok_json}: tokenizer model is {model_type!r}, expected byte-level 'BPE'")
    tok = Tokenizer.from_file(str(tok_json))

    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    added_decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
    added_vocab = {at.content: i for i, at in added_decoder.items()}
    vocab_size = int(cfg.get("vocab_size", len(vocab)))
    max_id = max(vocab.values())
    if max_id >= vocab_size:
        raise BadInputError(f"{tok_json}: token id {max_id} >= config vocab_size {vocab_size}")

    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added_vocab and i in added_decoder:
            at = added_decoder[i]
            if not at.normalized:
                before = token
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
                if token != before:
                    log.info("%r is encoded and decoded back to %r", before, token)
            if at.special or does_token_look_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)

    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise BadInputError(f"{tok_json}: no BPE merges found", hint="a byte-level BPE tokenizer.json has model.merges")
    return GGUFVocab("gpt2", pre or default_pre(cfg), tokens, types, special)


def write_vocab(writer: gguf.GGUFWriter, path: str | Path, cfg: Mapping[str, Any], *,
                pre: str | None = None) -> GGUFVocab:
    """Write ``tokenizer.*`` keys (model gpt2, pre, tokens, token_type, merges, special ids,
    add_bos/eos, chat_template) for the tokenizer at ``path``; returns what was written.

    Raises:
        BadInputError, UnsupportedError: see :func:`read_vocab`.
    """
    v = read_vocab(path, cfg, pre=pre)
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    v.special.add_to_gguf(writer, quiet=True)
    return v
