"""Wrong-kind inputs are refused up front (exit 3) with what the input is and what the command needs.

``fp8-to-bf16`` on an INT4 output (compressed-tensors, AutoAWQ, GPTQ) or a GGUF file, ``gguf`` and ``quantize`` on
an INT4 output or a GGUF: the message names the input's format and scheme as the writer that made it reports them
(the ``quantize`` report is the oracle), says what the command needs, and nothing is written.
"""

from __future__ import annotations

import pytest

from dsconvert.convert import fp8_to_bf16 as f2b
from dsconvert.convert import gguf_export as ge
from dsconvert.convert import quantize as qz
from dsconvert.errors import UnsupportedError
from dsconvert.formats.kind import checkpoint_kind

from ..conftest import run_many

FORMATS = {"ct": "compressed-tensors", "awq": "awq", "gptq": "gptq"}
COMMANDS = {
    "fp8-to-bf16": (lambda src, out: f2b.run(src, out, f2b.Options(), progress=False), "block-FP8 release"),
    "quantize": (lambda src, out: qz.run(src, out, qz.Options(), progress=False),
                 "FP8 release or an unquantized (BF16) checkpoint"),
    "gguf": (lambda src, out: ge.run(src, out.with_suffix(".gguf"), ge.GGUFOptions(), progress=False),
             "FP8 release or an unquantized (BF16) checkpoint"),
}


@pytest.fixture(scope="module")
def made(tiny_src, tmp_path_factory):
    """INT4 outputs of every format (group 32) and a Q8_0 GGUF of the tiny fixture: key -> (path, writer report)."""
    base = tmp_path_factory.mktemp("kinds")
    outs = {}
    for k, f in FORMATS.items():
        rep = qz.run(tiny_src, base / k, qz.Options(format=f, group_size=32), progress=False)
        outs[k] = (base / k, rep)
    ge.run(tiny_src, base / "t.gguf", ge.GGUFOptions(type="Q8_0"), progress=False)
    outs["gguf"] = (base / "t.gguf", None)
    return base, outs


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", [*FORMATS, "gguf"])
def test_wrong_kind_is_refused_naming_what_it_is(made, command, kind, tmp_path):
    run, need = COMMANDS[command]
    path, wrep = made[1][kind]
    with pytest.raises(UnsupportedError) as ei:
        run(path, tmp_path / "out")
    msg = ei.value.message
    assert ei.value.exit_code == 3 and ei.value.hint
    if kind == "gguf":
        assert "a GGUF file" in msg
    else:  # the format and scheme the writer reported, with bits and group size
        assert wrep["format"] in msg and wrep["scheme"]["name"] in msg, msg
        assert "INT4" in msg and "group size 32" in msg, msg
    assert f"{command} needs" in msg and need in msg, msg
    assert list(tmp_path.iterdir()) == []  # nothing written: no OUT, no GGUF, no manifest or report beside it


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_cli_refusals_exit_3_with_the_json_error(made):
    base, outs = made
    jobs = {"f2b": ("fp8-to-bf16", outs["awq"][0], "-o", base / "x1", "--json"),
            "gguf": ("gguf", outs["ct"][0], "-o", base / "x2.gguf", "--json"),
            "quantize": ("quantize", outs["gptq"][0], "-o", base / "x3", "--json")}
    for key, r in run_many(jobs).items():
        assert r.rc == 3, str(r)
        assert "Traceback" not in r.stderr and "Can not map tensor" not in r.stderr, str(r)
        doc = r.json()
        assert doc["exit_code"] == 3 and doc["error"] == "UnsupportedError" and "INT4" in doc["message"]
    assert not [p for p in base.iterdir() if p.name.startswith("x")]


@pytest.mark.parametrize("kind", list(FORMATS))
def test_checkpoint_kind_matches_the_writer(made, kind):
    path, wrep = made[1][kind]
    k = checkpoint_kind(path)
    sym = wrep["scheme"]["symmetric"] and kind != "awq"  # AutoAWQ GEMM always stores zero points
    assert (k.kind, k.format, k.bits, k.group_size, k.symmetric) == \
        ("int", wrep["format"], wrep["scheme"]["bits"], wrep["scheme"]["group_size"], sym)
    assert k.scheme == ("W4A16" if sym else "W4A16_ASYM")
    from dsconvert.convert.inspect import inspect_checkpoint

    rep = inspect_checkpoint(path)  # inspect answers from the same detector
    assert rep["kind"] == k.to_dict() and rep["quantization"]["format"] == k.format


def test_checkpoint_kind_of_sources_and_gguf(tiny_src, made, tmp_path):
    from dsconvert.testing.fixtures import build_checkpoint

    assert checkpoint_kind(tiny_src).kind == "fp8"
    assert checkpoint_kind(made[1]["gguf"][0]).kind == "gguf"
    bf16 = build_checkpoint(tmp_path / "bf16", "tiny", fp8=False, tokenizer=False)
    assert checkpoint_kind(bf16).kind == "float"
    assert checkpoint_kind(tmp_path / "nothing-here").kind == "unknown"
    with pytest.raises(UnsupportedError, match="unquantized"):
        f2b.run(bf16, tmp_path / "out", f2b.Options(), progress=False)
    assert not (tmp_path / "out").exists()
