"""Bad checkpoints fail closed (exit 3) and bad requests are usage errors (exit 2).

Every bad-input case damages its own copy of the tiny fixture, runs ``fp8-to-bf16`` through the CLI (the cases
run concurrently, each in its own process) and requires: exit code 3, a message on stderr that names the file and
the tensor (or config key), no Python traceback, and no model in OUT (no shard, no index, no config.json).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..conftest import INDEX, guard_source, read_index, run_cli, run_many, tree_hashes

SCALE = "_scale_inv"


# --- helpers that damage a copy --------------------------------------------------------------------------------

def load_shard(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_index(src: Path, idx: dict) -> None:
    (src / INDEX).write_text(json.dumps(idx, indent=2))


def edit_config(src: Path, fn) -> None:
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))


def rewrite_header(path: Path, fn) -> None:
    """Apply ``fn`` to the parsed header JSON of ``path`` and write it back, data unchanged."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    fn(hdr)
    js = json.dumps(hdr).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + raw[8 + n:])


def fp8_weight(src: Path, contains: str = "") -> tuple[str, Path, Path]:
    """An FP8 weight of ``src`` whose name contains ``contains``: (name, its shard, its scale's shard)."""
    wm = read_index(src)["weight_map"]
    for n in sorted(wm):
        if n + SCALE in wm and contains in n:
            return n, src / wm[n], src / wm[n + SCALE]
    raise AssertionError(contains)


def _set_scale(src: Path, value: float) -> tuple[str, str]:
    name, _, sp = fp8_weight(src, "layers.1.self_attn.q_b_proj")
    t = load_shard(sp)
    s = t[name + SCALE].clone()
    s.view(-1)[-1] = value
    t[name + SCALE] = s
    save_shard(sp, t)
    return sp.name, name + SCALE


def dmg_missing_scale(src):
    name, wp, sp = fp8_weight(src, "layers.2.mlp.experts.5.up_proj")
    t = load_shard(sp)
    del t[name + SCALE]
    save_shard(sp, t)
    idx = read_index(src)
    del idx["weight_map"][name + SCALE]
    write_index(src, idx)
    return wp.name, name


def dmg_scale_grid(src):
    name, _, sp = fp8_weight(src, "layers.0.self_attn.kv_a_proj_with_mqa")  # [80, 320] -> needs [1, 3]
    t = load_shard(sp)
    assert tuple(t[name + SCALE].shape) == (1, 3)
    t[name + SCALE] = torch.ones(1, 2)  # a floor-division grid
    save_shard(sp, t)
    return sp.name, name + SCALE


def dmg_truncated(src):
    wm = read_index(src)["weight_map"]
    p = src / sorted(set(wm.values()))[1]
    raw = p.read_bytes()
    p.write_bytes(raw[:-1000])
    # the tensor stored last in the file is the one cut off
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    hdr.pop("__metadata__", None)
    last = max(hdr, key=lambda k: hdr[k]["data_offsets"][1])
    return p.name, last


def dmg_header_shape(src):
    name, wp, _ = fp8_weight(src, "layers.1.self_attn.o_proj")

    def fn(h):
        h[name]["shape"] = [h[name]["shape"][0] + 1, h[name]["shape"][1]]
    rewrite_header(wp, fn)
    return wp.name, name


def dmg_header_dtype(src):
    wm = read_index(src)["weight_map"]
    name = "model.norm.weight"
    p = src / wm[name]

    def fn(h):
        assert h[name]["dtype"] == "BF16"
        h[name]["dtype"] = "F32"
    rewrite_header(p, fn)
    return p.name, name


def dmg_header_offsets(src):
    wm = read_index(src)["weight_map"]
    name = "model.embed_tokens.weight"
    p = src / wm[name]

    def fn(h):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b, e - 2]  # no longer covers dtype * shape
    rewrite_header(p, fn)
    return p.name, name


def dmg_duplicate(src):
    wm = read_index(src)["weight_map"]
    name = "model.embed_tokens.weight"
    other = sorted(set(wm.values()) - {wm[name]})[0]
    t = load_shard(src / other)
    t[name] = load_shard(src / wm[name])[name]
    save_shard(src / other, t)
    return other, name


def dmg_index_parent(src):
    idx = read_index(src)
    idx["weight_map"]["model.norm.weight"] = "../x.safetensors"
    write_index(src, idx)
    return INDEX, "../x.safetensors"


def dmg_index_absent_shard(src):
    idx = read_index(src)
    idx["weight_map"]["model.norm.weight"] = "model-00004-of-000003.safetensors"
    write_index(src, idx)
    return "model-00004-of-000003.safetensors", "model.norm.weight"


def dmg_model_type(src):
    edit_config(src, lambda c: c.update(model_type="llama"))
    return "config.json", "model_type"


def dmg_e5m2(src):
    name, wp, _ = fp8_weight(src, "layers.1.mlp.shared_experts.down_proj")
    t = load_shard(wp)
    t[name] = t[name].view(torch.uint8).view(torch.float8_e5m2)
    save_shard(wp, t)
    return wp.name, name


def _scale_as(src, dtype):
    name, _, sp = fp8_weight(src, "layers.2.self_attn.q_a_proj")
    t = load_shard(sp)
    t[name + SCALE] = torch.full(tuple(t[name + SCALE].shape), 120, dtype=torch.uint8).view(dtype)
    save_shard(sp, t)
    return sp.name, name + SCALE


def dmg_quant_method(src):
    edit_config(src, lambda c: c["quantization_config"].update(quant_method="gptq"))
    return "config.json", "quant_method"


BAD_INPUTS = {
    "missing_scale": dmg_missing_scale,
    "scale_grid": dmg_scale_grid,
    "scale_nan": lambda s: _set_scale(s, float("nan")),
    "scale_inf": lambda s: _set_scale(s, float("inf")),
    "scale_zero": lambda s: _set_scale(s, 0.0),
    "scale_negative": lambda s: _set_scale(s, -0.5),
    "truncated_shard": dmg_truncated,
    "header_shape_vs_bytes": dmg_header_shape,
    "header_dtype_vs_bytes": dmg_header_dtype,
    "header_offsets_vs_bytes": dmg_header_offsets,
    "duplicate_tensor": dmg_duplicate,
    "index_parent_path": dmg_index_parent,
    "index_absent_shard": dmg_index_absent_shard,
    "model_type_llama": dmg_model_type,
    "f8_e5m2_weight": dmg_e5m2,
    "u8_scale": lambda s: _scale_as(s, torch.uint8),
    "e8m0_scale": lambda s: _scale_as(s, torch.float8_e8m0fnu),
    "quant_method_not_fp8": dmg_quant_method,
}


@pytest.fixture(scope="module")
def bad_runs(tiny_src, tmp_path_factory):
    """Damage one copy per case and run them all concurrently: case -> (src, out, file, key, result)."""
    from dsconvert.testing.fixtures import build_checkpoint

    base = tmp_path_factory.mktemp("bad")
    cases, jobs = {}, {}
    for case, damage in BAD_INPUTS.items():
        src = base / case / "src"
        shutil.copytree(tiny_src, src)
        file, key = damage(src)
        cases[case] = (src, base / case / "out", file, key)
    # already BF16 (no FP8 weights, no quantization_config)
    src = build_checkpoint(base / "bf16" / "src", "tiny", fp8=False, tokenizer=False)
    cases["already_bf16"] = (src, base / "bf16" / "out", str(src), "FP8")
    for case, (src, out, _, _) in cases.items():
        guard_source(src)
        jobs[case] = ("fp8-to-bf16", src, "-o", out)
    results = run_many(jobs)
    return {c: (*cases[c], results[c]) for c in cases}


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize("case", [*BAD_INPUTS, "already_bf16"])
def test_bad_input_exits_3_naming_file_and_tensor(bad_runs, case):
    src, out, file, key, r = bad_runs[case]
    assert r.rc == 3, str(r)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, str(r)
    err = _squash(r.stderr)  # the console may wrap long lines; compare without whitespace
    assert "error:" in r.stderr
    assert _squash(file) in err, f"message does not name {file!r}\n{r}"
    assert _squash(key) in err, f"message does not name {key!r}\n{r}"
    if out.exists():
        assert not list(out.glob("*.safetensors")) and not (out / INDEX).exists() and not (out / "config.json").exists()


# --- usage errors ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def usage_runs(tiny_src, tmp_path_factory):
    base = tmp_path_factory.mktemp("usage")
    inside = base / "inside_src"
    shutil.copytree(tiny_src, inside)
    guard_source(inside)
    jobs = {
        "mtp": ("fp8-to-bf16", tiny_src, "-o", base / "o1", "--mtp", "sometimes"),
        "dtype": ("fp8-to-bf16", tiny_src, "-o", base / "o2", "--dtype", "f8"),
        "max_shard_size": ("fp8-to-bf16", tiny_src, "-o", base / "o3", "--max-shard-size", "lots"),
        "max_shard_size_unit": ("fp8-to-bf16", tiny_src, "-o", base / "o4", "--max-shard-size", "5Q"),
        "workers": ("fp8-to-bf16", tiny_src, "-o", base / "o5", "--workers", "0"),
        "out_inside_src": ("fp8-to-bf16", inside, "-o", inside / "bf16"),
        "out_is_src": ("fp8-to-bf16", inside, "-o", inside),
        "no_output": ("fp8-to-bf16", tiny_src),
    }
    res = run_many(jobs)
    return base, inside, res


@pytest.mark.parametrize("case", ["mtp", "dtype", "max_shard_size", "max_shard_size_unit", "workers",
                                  "out_inside_src", "out_is_src", "no_output"])
def test_usage_errors_exit_2(usage_runs, case):
    base, inside, res = usage_runs
    r = res[case]
    assert r.rc == 2, str(r)
    assert "Traceback" not in r.stderr, str(r)
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (base / o).exists()
    assert not (inside / "bf16").exists()
    assert not list(inside.glob("manifest.json"))


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_nonempty_output_refused_then_overwrite_keeps_unrelated_files(tiny_src, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "keep.txt").write_text("mine")
    (out / "my-notes.md").write_text("also mine")
    stale = out / "model-00001-of-000003.safetensors"
    stale.write_bytes(b"not a shard")
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "-q")
    assert r.rc == 2, str(r)
    assert "Traceback" not in r.stderr and "--overwrite" in r.stderr
    assert stale.read_bytes() == b"not a shard" and not (out / INDEX).exists()

    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "-q", "--overwrite")
    assert r.rc == 0, str(r)
    assert (out / "notes" / "keep.txt").read_text() == "mine" and (out / "my-notes.md").read_text() == "also mine"
    assert stale.read_bytes() != b"not a shard"
    with safe_open(str(stale), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    assert (out / INDEX).exists() and (out / "config.json").exists()


def test_resume_with_different_options_is_refused(tiny_src, tiny_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_out[0], out)
    before = tree_hashes(out)
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--mtp", "drop", "-q")
    assert r.rc == 2, str(r)
    assert "Traceback" not in r.stderr and "--overwrite" in r.stderr
    assert tree_hashes(out) == before
