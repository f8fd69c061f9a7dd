"""Names on the command line: GGUF ``--type``, quantize ``--format`` and ``--scheme``.

Oracles: llama-quantize's list of K-quant mixes (``tools/quantize/quantize.cpp``, ``QUANT_OPTIONS``) and the
IQ types it offers, written out here by hand; the registries for what ``--help`` must show.
"""

from __future__ import annotations

import json

import pytest

from dsconvert.convert import gguf_export as ge
from dsconvert.convert import quantize as qz
from dsconvert.errors import UsageError
from dsconvert.formats.checkpoint import open_checkpoint


K_MIXES = ["Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M"]  # llama-quantize
IQ_MIXES = ["IQ2_M", "IQ3_XS", "IQ3_M"]                      # llama-quantize IQ file types that are not ggml types
IQ = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("t", IQ)
def test_iq_types_without_a_quantizer_are_refused_by_their_own_name(t):
    """An IQ type dsconvert has no quantizer for is refused as 'not supported yet', naming itself (it used to be
    refused for the shape fallback IQ4_NL of its plan); one it has resolves."""
    from dsconvert.quant.ggml import registered_types

    missing = sorted(x for x in ge._mix_types(t) | {ge.default_type(t)} if x not in registered_types())
    if t in ("IQ2_S", "IQ2_M"):  # llama.cpp's rules put IQ3_S on some tensors of these mixes (llama-quant.cpp)
        assert "IQ3_S" in ge._mix_types(t)
    if not missing:
        assert ge.resolve_type(t) == (t, False)
        return
    with pytest.raises(UsageError) as ei:
        ge.resolve_type(t.lower())
    e = ei.value
    assert e.exit_code == 2 and e.message.startswith(f"--type {t}: IQ types") and "not supported yet" in e.message
    assert f"no {', '.join(missing)} quantizer" in e.message and "IQ4_NL quantizer" not in e.message, e.message
    assert "llama-quantize --imatrix" in e.hint


def test_unknown_type_lists_every_type_and_mix_with_did_you_mean():
    with pytest.raises(UsageError) as ei:
        ge.resolve_type("Q4_K_X")
    hint = ei.value.hint
    assert hint.startswith("did you mean ") and "Q4_K_M" in hint.split("?")[0]
    for t in [*K_MIXES, "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K"]:
        assert t in hint, t


@pytest.mark.parametrize("mix", K_MIXES)
def test_every_listed_mix_plans(tiny_src, mix):
    """Each offered mix resolves and plans with dsconvert's own quantizers (no 'no quantizer' refusal)."""
    assert ge.resolve_type(mix) == (mix, False)
    ck = open_checkpoint(tiny_src)
    try:
        ge.make_plan(ck, ge.GGUFOptions(type=mix), None)
    except UsageError as e:  # Q2_K_S needs an importance matrix, as in llama-quantize; never a missing quantizer
        assert "imatrix" in e.message and "no quantizer" not in e.message, e.message


def _invoke(*args: str):
    """The CLI in-process (help and listings only; no conversion runs here)."""
    from typer.testing import CliRunner

    from dsconvert.cli import app

    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_list_types_and_help_show_the_mixes():
    r = _invoke("inspect", "--list-types", "--list-formats", "--list-schemes", "--json")
    assert r.exit_code == 0, r.output
    reg = json.loads(r.stdout)["registries"]
    assert reg["gguf_mixes"] == K_MIXES + IQ_MIXES   # the IQ mixes once IQ3_S/IQ3_XXS have quantizers
    assert set(IQ) <= set(reg["gguf_mixes"]) | set(reg["gguf_types"]) and not set(IQ) & set(reg["gguf_unsupported"])
    assert reg["formats"]["autoawq"] == ["awq", "awq-gemm"] and "gptq_v2" in reg["formats"]
    human = _invoke("inspect", "--list-types")
    assert all(m in human.stdout for m in K_MIXES) and "not supported yet" in human.stdout
    h = _invoke("gguf", "--help").stdout
    assert all(m in h for m in K_MIXES + IQ_MIXES)
    q = _invoke("quantize", "--help").stdout
    for name, aliases in reg["formats"].items():
        assert name in q and all(a in q for a in aliases), name
    for name, aliases in reg["schemes"].items():
        assert name in q and all(a in q for a in aliases), name


def test_format_and_scheme_are_reported_by_canonical_name(tiny_src):
    rep = qz.run(tiny_src, None, qz.Options(format="AWQ", scheme="int4-asym", group_size=32), dry_run=True,
                 progress=False)
    assert rep["format"] == rep["options"]["format"] == "autoawq"
    assert rep["scheme"]["name"] == rep["options"]["scheme"] == "W4A16_ASYM"
    rep = qz.run(tiny_src, None, qz.Options(format="gptq", checkpoint_format="gptqv2", group_size=32),
                 dry_run=True, progress=False)
    assert rep["format"] == rep["options"]["checkpoint_format"] == "gptq_v2"


@pytest.mark.parametrize("flag,value,guess", [("format", "autoawg", "autoawq"), ("format", "gtpq", "gptq"),
                                              ("scheme", "W4A61", "W4A16"), ("scheme", "w8a61", "W8A16")])
def test_unknown_format_or_scheme_says_did_you_mean(tiny_src, flag, value, guess):
    with pytest.raises(UsageError) as ei:
        qz.run(tiny_src, None, qz.Options(**{flag: value}), dry_run=True, progress=False)
    assert f"unknown --{flag} {value!r}" in ei.value.message
    assert ei.value.hint.startswith("did you mean ") and guess in ei.value.hint.split("?")[0]


# --- --calib-data: what it accepts --------------------------------------------------------------------------------

def test_calib_data_help_says_what_is_accepted():
    h = " ".join(_invoke("quantize", "--help").stdout.split())
    assert "--calib-data FILE" in h and "text file" in h and ".json file holding a list of token-id lists" in h


def test_calib_data_forms(tiny_src, tmp_path):
    """A .json of id lists is used as given; a text file is tokenized with SRC's tokenizer.json (the
    ``tokenizers`` library is the oracle); an ``hf:`` id is refused as a usage error naming the flag."""
    import json as _json

    from tokenizers import Tokenizer

    from dsconvert.convert.calib_data import calibration_ids

    ck = open_checkpoint(tiny_src)
    ids = tmp_path / "ids.json"
    ids.write_text(_json.dumps([[1, 2, 3, 4], [5, 6, 7]]))
    assert calibration_ids(ck, str(ids), 8, 4)[0] == [[1, 2, 3, 4], [5, 6, 7]]
    txt = tmp_path / "calib.txt"
    txt.write_text("the river runs to the sea " * 20)
    want = Tokenizer.from_file(str(tiny_src / "tokenizer.json")).encode(txt.read_text(), add_special_tokens=False).ids
    got, _ = calibration_ids(ck, str(txt), 2, 8)
    assert len(got) == 2 and all(len(s) == 8 for s in got)
    stream = [0] + want  # windows are drawn (seeded) from the token stream, a leading BOS included or not
    assert all(any(stream[i:i + 8] == w for i in range(len(stream) - 7)) for w in got)
    with pytest.raises(UsageError, match="--calib-data hf:wikitext: Hugging Face datasets are not read"):
        calibration_ids(ck, "hf:wikitext", 2, 8)
