"""The non-weight files of the release-layout fixtures, shared by the DeepSeek-V3 builder
(:mod:`dsconvert.testing.fixtures`, :mod:`dsconvert.testing.realsize`) and the DeepSeek-V4 one
(:mod:`dsconvert.testing.deepseek_v4`): the trained BPE ``tokenizer.json``, the release's
``tokenizer_config.json`` and the prefix of the marker file a remote-code stand-in leaves if anything runs it.
It imports neither builder, so both import it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MARKER_PREFIX", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "write_tokenizer", "write_tokenizer_config"]

#: A remote-code stand-in ``X.py`` writes ``MARKER_PREFIX + X`` beside itself when executed (tests check that
#: nothing ever does).
MARKER_PREFIX = "EXECUTED_"

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
                 "{% else %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def write_tokenizer(out: Path, vocab_size: int, text: str | None = None) -> None:
    """A byte-level BPE ``tokenizer.json`` trained with the ``tokenizers`` library on ``text`` (default: the
    bundled validation text), with DeepSeek's special tokens (bos id 0, eos id 1), plus ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if text is None:
        text = (Path(__file__).resolve().parent.parent / "data" / "validation.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_vocab = min(vocab_size, max(300, vocab_size - 8))
    trainer = trainers.BpeTrainer(vocab_size=n_vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)


def write_tokenizer_config(out: Path) -> None:
    """``tokenizer_config.json`` as the release's (LlamaTokenizerFast, bos/eos/pad, a chat template)."""
    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": SPECIAL_TOKENS[0], "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", "content": SPECIAL_TOKENS[1], "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": {"__type": "AddedToken", "content": SPECIAL_TOKENS[1], "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
