"""A swapped tokenizer and a missing one (issue 11, "Found replaying public bug reports" and "Confusing").

The swapped tokenizers are built with the ``tokenizers`` library itself (extra tokens past ``vocab_size``; the
special tokens trained in another order, so bos/eos land at other ids than config.json says), never with
dsconvert. Expectations: ``inspect`` lists a problem (exit 3), every conversion warns on stderr and in its JSON,
``validate`` fails its named ``tokenizer`` check (exit 4) before any forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..conftest import guard_source, run_many

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"]


def _overflow(src: Path) -> None:
    """20 extra tokens appended: ids past the fixture's vocab_size 512."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(20)])
    assert tok.get_vocab_size() > json.loads((src / "config.json").read_text())["vocab_size"]
    tok.save(str(src / "tokenizer.json"))


def _swapped_specials(src: Path) -> None:
    """The same kind of BPE, trained with eos before bos: bos is id 1, eos id 0 (config.json says 0 and 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[SPECIAL[1], SPECIAL[0], *SPECIAL[2:]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the river runs to the sea", "a model of words"], trainer=trainer)
    assert tok.token_to_id(SPECIAL[0]) == 1
    tok.save(str(src / "tokenizer.json"))


@pytest.fixture(scope="module")
def runs(tiny_src, tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    srcs = {}
    for case, damage in (("overflow", _overflow), ("specials", _swapped_specials), ("missing", None)):
        s = base / case / "src"
        shutil.copytree(tiny_src, s)
        if damage is None:
            (s / "tokenizer.json").unlink()
        else:
            damage(s)
        guard_source(s)
        srcs[case] = s
    jobs = {}
    for case, s in srcs.items():
        jobs[(case, "inspect")] = ("inspect", s, "--json")
        jobs[(case, "fp8")] = ("fp8-to-bf16", s, "-o", base / case / "bf16", "--json")
        jobs[(case, "quantize")] = ("quantize", s, "-o", base / case / "int", "--group-size", "32", "--json")
    jobs[("specials", "gguf")] = ("gguf", srcs["specials"], "-o", base / "specials" / "q.gguf", "--type", "Q8_0",
                                  "--json")
    res = run_many(jobs)
    # validate the BF16 conversion (tokenizer copied along) against its damaged source
    vjobs = {case: ("validate", base / case / "bf16", "--reference", srcs[case], "--json")
             for case in ("overflow", "specials")}
    res.update({(c, "validate"): r for c, r in run_many(vjobs).items()})
    return srcs, res


@pytest.mark.parametrize("case,kind", [("overflow", "tokenizer_vocab"), ("specials", "tokenizer_special")])
def test_inspect_flags_a_swapped_tokenizer(runs, case, kind):
    r = runs[1][(case, "inspect")]
    assert r.rc == 3, str(r)
    probs = [p for p in r.json()["problems"] if p["kind"] == kind]
    assert probs and probs[0]["file"] == "tokenizer.json" and probs[0].get("fatal", True), r.json()["problems"]
    if case == "overflow":
        assert "vocab_size is 512" in probs[0]["message"] and "523" in probs[0]["message"]
    else:
        assert "bos_token" in probs[0]["message"] and "id 1" in probs[0]["message"]


@pytest.mark.parametrize("case,kind", [("overflow", "tokenizer_vocab"), ("specials", "tokenizer_special"),
                                       ("missing", "tokenizer_missing")])
@pytest.mark.parametrize("cmd", ["fp8", "quantize"])
def test_conversion_warns(runs, case, kind, cmd):
    r = runs[1][(case, cmd)]
    assert r.rc == 0, str(r)
    kinds = [w.get("kind") for w in r.json()["warnings"] if isinstance(w, dict)]
    assert kind in kinds, r.json()["warnings"]
    assert "warning:" in r.stderr and "tokenizer.json" in r.stderr, r.stderr
    if case == "missing":
        assert "--text" in r.stderr


def test_gguf_warns_about_special_ids(runs):
    r = runs[1][("specials", "gguf")]
    assert r.rc == 0, str(r)
    assert "tokenizer_special" in [w.get("kind") for w in r.json()["warnings"] if isinstance(w, dict)]


def test_missing_tokenizer_inspect_is_a_warning(runs):
    r = runs[1][("missing", "inspect")]
    assert r.rc == 0, str(r)
    (p,) = [p for p in r.json()["problems"] if p["kind"] == "tokenizer_missing"]
    assert p["fatal"] is False


@pytest.mark.parametrize("case", ["overflow", "specials"])
def test_validate_fails_the_tokenizer_check(runs, case):
    r = runs[1][(case, "validate")]
    assert r.rc == 4, str(r)
    rep = r.json()
    assert not rep["passed"] and rep["forward"].startswith("skipped")
    checks = {f["check"] for f in rep["failed_checks"]}
    assert checks == {"tokenizer"}, rep["failed_checks"]
    assert "mean_kld" not in rep
