"""The CLI contract as a newcomer meets it: refused reruns say what differs, usage errors are JSON under
``--json``, gguf's manifest/report can live in ``--state-dir``, fp8-to-bf16 says what it did with the MTP layer,
and human output holds no Python reprs.

Oracles: the options and files each run was given (the test changes exactly one and expects exactly that one
named), the JSON error document of a runtime error (same keys), and the files on disk.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from dsconvert.cli import app
from dsconvert.convert import fp8_to_bf16 as f2b
from dsconvert.convert import gguf_export as ge
from dsconvert.convert import quantize as qz
from dsconvert.errors import OutputExistsError

from ..conftest import run_many


def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    return r


# --- 5. a refused rerun names what differs ---------------------------------------------------------------------

def test_refused_rerun_names_the_option_old_and_new(tiny_src, tmp_path):
    out = tmp_path / "out"
    f2b.run(tiny_src, out, f2b.Options(), progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["fingerprint_parts"]["options"]["mtp"] == "keep"
    with pytest.raises(OutputExistsError) as ei:
        f2b.run(tiny_src, out, f2b.Options(mtp="drop", max_shard_size=10**6), progress=False)
    msg = ei.value.message
    assert "--mtp: keep -> drop" in msg and "--max-shard-size: unset -> 1000000" in msg, msg
    assert "--dtype" not in msg and "source" not in msg.split("differs in:")[1], msg


def test_refused_rerun_names_the_changed_source_file(tiny_copy, tmp_path):
    out = tmp_path / "out"
    rep = qz.run(tiny_copy, out, qz.Options(group_size=32), progress=False)
    assert rep["output"]["path"] == str(out)
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_theta", 10000) * 2
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OutputExistsError) as ei:
        qz.run(tiny_copy, out, qz.Options(group_size=32), progress=False)
    detail = ei.value.message.split("differs in:")[1]
    assert "source file config.json: sha256 " in detail and "->" in detail, detail
    assert "--" not in detail and "index" not in detail, detail  # only config.json changed


def test_refused_gguf_rerun_names_the_type(tiny_src, tmp_path):
    out = tmp_path / "m.gguf"
    ge.run(tiny_src, out, ge.GGUFOptions(type="Q8_0"), progress=False)
    with pytest.raises(OutputExistsError) as ei:
        ge.run(tiny_src, out, ge.GGUFOptions(type="BF16"), progress=False)
    assert "--type: Q8_0 -> BF16" in ei.value.message, ei.value.message


def test_old_manifest_without_parts_keeps_the_general_message(tiny_src, tmp_path):
    out = tmp_path / "out"
    f2b.run(tiny_src, out, f2b.Options(), progress=False)
    man = json.loads((out / "manifest.json").read_text())
    del man["fingerprint_parts"]
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(OutputExistsError, match="a different source or different options$"):
        f2b.run(tiny_src, out, f2b.Options(mtp="drop"), progress=False)
    rep = f2b.run(tiny_src, out, f2b.Options(), progress=False)  # still resumable with the same options
    assert rep["already_complete"]
    assert json.loads((out / "manifest.json").read_text())["fingerprint_parts"]["options"]["mtp"] == "keep"


# --- 6. usage errors under --json ------------------------------------------------------------------------------

@pytest.mark.slow  # three fresh interpreters (the parser runs before any command body): ~6 s idle, ~30 s loaded
def test_usage_errors_print_the_json_error_document(tiny_src, tmp_path):
    jobs = {"bogus": ("fp8-to-bf16", tiny_src, "-o", tmp_path / "a", "--bogus", "--json"),
            "num_samples": ("quantize", tiny_src, "-o", tmp_path / "b", "--gptq", "--num-samples", "0", "--json"),
            "workers": ("fp8-to-bf16", tiny_src, "-o", tmp_path / "c", "--workers", "0", "--json")}
    res = run_many(jobs)
    # the schema of every other error document: a dsconvert UsageError (missing -o) through the same CLI
    ref = json.loads(invoke("fp8-to-bf16", tiny_src, "--json").stdout)
    assert ref["exit_code"] == 2
    for case, flag in (("bogus", "--bogus"), ("num_samples", "--num-samples"), ("workers", "--workers")):
        r = res[case]
        assert r.rc == 2, str(r)
        doc = r.json()
        assert set(doc) == set(ref), (set(doc) ^ set(ref))
        assert doc["error"] == "UsageError" and doc["exit_code"] == 2 and flag in doc["message"], doc
        assert "--help" in doc["hint"] and "Usage:" in r.stderr  # the usual text stays on stderr
    assert not any((tmp_path / n).exists() for n in "abc")


# --- 7. gguf --state-dir ---------------------------------------------------------------------------------------

def test_gguf_state_dir_keeps_the_upload_folder_clean_and_resumes(tiny_src, tmp_path):
    up, state = tmp_path / "upload", tmp_path / "state"
    out = up / "m.gguf"
    args = ("gguf", tiny_src, "-o", out, "--type", "Q8_0", "--split-max-tensors", "12", "--state-dir", state, "-q")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in up.iterdir())
    assert files and all(re.fullmatch(r"m-0000\d-of-0000\d\.gguf", f) for f in files), files
    assert sorted(p.name for p in state.iterdir()) == ["m.gguf.dsconvert-manifest.json",
                                                       "m.gguf.dsconvert-report.json"]
    assert f"resume manifest {state / 'm.gguf.dsconvert-manifest.json'}" in r.stdout
    # resume from there: one finished split lost, the others reused
    (up / files[-1]).unlink()
    r = invoke(*args, "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["resumed"] and rep["files_written"] == 1
    assert rep["files_reused"] == len(files) - 1 and sorted(p.name for p in up.iterdir()) == files
    # without --state-dir the outputs are not vouched for: refused, and the hint names --state-dir
    r = invoke(*args[:-3], "-q")
    assert r.exit_code == 2 and "--state-dir" in r.output, r.output


def test_gguf_summary_says_where_manifest_and_report_are(tiny_src, tmp_path):
    out = tmp_path / "m.gguf"
    r = invoke("gguf", tiny_src, "-o", out, "--type", "Q8_0", "-q")
    assert r.exit_code == 0, r.output
    assert f"resume manifest {out}.dsconvert-manifest.json, report {out}.dsconvert-report.json" in r.stdout
    assert (tmp_path / "m.gguf.dsconvert-manifest.json").is_file()


# --- 8. the MTP layer in fp8-to-bf16's summary -----------------------------------------------------------------

def test_fp8_summary_says_mtp_was_kept_and_transformers_warns(tiny_src, tmp_path):
    cfg = json.loads((tiny_src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    r = invoke("fp8-to-bf16", tiny_src, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    kept = sum(1 for k in idx if k.startswith(f"model.layers.{n}."))
    assert kept > 0
    assert f"MTP layer {n} kept ({kept} tensors, model.layers.{n}.*)" in r.stdout, r.stdout
    assert "transformers" in r.stdout and "warns" in r.stdout and "--mtp drop" in r.stdout
    r = invoke("fp8-to-bf16", tiny_src, "-o", tmp_path / "out2", "--mtp", "drop", "-q")
    assert r.exit_code == 0 and f"MTP layer {n} dropped" in r.stdout and "warns" not in r.stdout


# --- 9. no Python reprs in human output -------------------------------------------------------------------------

REPR = re.compile(r"\bNone\b|\{'|\['|\[\d+(, \d+)*\]|\(s\)|<list\[|<class |\{src\}")


def test_human_output_has_no_python_reprs(tiny_src, tmp_path):
    out = tmp_path / "bf16"
    runs = [("fp8-to-bf16", tiny_src, "--dry-run"), ("fp8-to-bf16", tiny_src, "-o", out, "-q"),
            ("fp8-to-bf16", tiny_src, "-o", out, "-q"), ("quantize", tiny_src, "--dry-run", "--group-size", "32"),
            ("quantize", tiny_src, "--dry-run"), ("gguf", tiny_src, "--dry-run", "--type", "Q4_K_M"),
            ("gguf", tiny_src, "-o", tmp_path / "m.gguf", "--type", "Q8_0", "-q"), ("inspect", tiny_src),
            ("inspect", tmp_path / "m.gguf"), ("inspect", "--list-types", "--list-formats", "--list-schemes"),
            *[(c, "--help") for c in ("fp8-to-bf16", "quantize", "gguf", "imatrix", "validate", "logits", "inspect",
                                      "make-fixture", "env")], ("--help",)]
    for args in runs:
        r = invoke(*args)
        assert r.exit_code in (0, 2), (args, r.output)
        hits = [m.group(0) for m in REPR.finditer(r.output)]
        assert not hits, (args, hits, r.output)
