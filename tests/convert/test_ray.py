"""``--ray``: work units on a real local Ray cluster (a head and two worker nodes on 127.0.0.1, started and
stopped here), checked against the local run of the same command: byte identity, a worker killed mid-task,
the driver killed and rerun, bounded memory per worker, and the exit-2 path without the ``ray`` package.

The local run is the independent reference: it never imports ray, and its bytes are themselves checked against
DeepSeek's rule in test_fp8_to_bf16.py.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from ..conftest import manifest_files, popen_cli, run_cli, tree_hashes

MODEL_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "manifest.json")


def model_hashes(d: Path) -> dict[str, str]:
    """sha256 of every output file but report.json (which holds times and the command line)."""
    return {k: v for k, v in tree_hashes(d).items() if k != "report.json"}


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# without a cluster
# ----------------------------------------------------------------------------------------------------------


def test_ray_flag_without_ray_package_exits_2_with_install_hint(tiny_src, tmp_path, monkeypatch):
    """Simulate a machine without ray: ``import ray`` fails; --ray must be a usage error naming the extra."""
    from typer.testing import CliRunner

    from dsconvert.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["fp8-to-bf16", str(tiny_src), "-o", str(out), "--ray", "auto", "--json"])
    assert res.exit_code == 2, res.output
    assert "dsconvert[ray]" in res.output
    assert not out.exists()  # refused before anything is written


def test_fault_spec_parsing():
    from dsconvert.convert.executor import _fault_for

    assert _fault_for("kill:a.safetensors:2", "a.safetensors", 1) == ("kill", 1)
    assert _fault_for("kill:a.safetensors:2", "a.safetensors", 3) is None
    assert _fault_for("kill:a.safetensors:2", "b.safetensors", 1) is None
    assert _fault_for("stall:a.safetensors", "a.safetensors", 5) == ("stall", 5)
    assert _fault_for(None, "a.safetensors", 1) is None


# ----------------------------------------------------------------------------------------------------------
# on a local cluster
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: it only schedules) and two worker nodes of 1 CPU each."""
    pytest.importorskip("ray")
    from dsconvert.testing.raycluster import LocalCluster

    c = LocalCluster(workers=2, cpus=1, head_cpus=0)
    c.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    c.start()
    try:
        yield c
    finally:
        c.stop()


SHARD = "2M"  # the tiny fixture in 4 output shards: 4 units


@pytest.fixture(scope="module")
def local_ref(tiny_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray_local") / "out"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "-q")
    assert r.rc == 0, str(r)
    return out


def _units(out: Path) -> list[str]:
    return sorted(manifest_files(out))


@pytest.mark.slow
def test_ray_run_is_byte_identical_to_local_and_reports_nodes(cluster, tiny_src, local_ref, tmp_path):
    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address,
                "--ray-max-in-flight", "2", "--json", timeout=300)
    assert r.rc == 0, str(r)
    assert model_hashes(out) == model_hashes(local_ref)
    assert leftovers(out) == []
    ex = r.json()["executor"]
    assert ex["backend"] == "ray" and ex["nodes"] == 3
    assert sorted(u["unit"] for u in ex["units"]) == _units(local_ref)
    assert 1 <= ex["in_flight_max_seen"] <= 2
    assert ex["retries"] == []
    assert sum(n["bytes"] for n in ex["nodes_used"]) == sum(m["size"] for m in manifest_files(local_ref).values()) \
        - sum(_header_bytes(local_ref / u) for u in _units(local_ref))
    for n in ex["nodes_used"]:
        assert n["units"] and n["mb_per_s"] > 0


def _header_bytes(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.slow
def test_worker_killed_mid_task_is_retried_then_identical(cluster, tiny_src, local_ref, tmp_path):
    unit = _units(local_ref)[1]
    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address, "--json",
                timeout=300, DSCONVERT_TEST_FAULT=f"kill:{unit}:1")
    assert r.rc == 0, str(r)
    ex = r.json()["executor"]
    assert [x["unit"] for x in ex["retries"]] == [unit], ex["retries"]
    assert next(u for u in ex["units"] if u["unit"] == unit)["attempts"] == 2
    assert model_hashes(out) == model_hashes(local_ref)
    assert leftovers(out) == []


@pytest.mark.slow
def test_unit_failing_every_attempt_stops_the_run_naming_it_then_resumes(cluster, tiny_src, local_ref, tmp_path):
    unit = _units(local_ref)[2]
    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address,
                "--ray-max-retries", "1", timeout=300, DSCONVERT_TEST_FAULT=f"kill:{unit}:99")
    assert r.rc == 1, str(r)
    assert unit in r.stderr and "2 attempts" in r.stderr, r.stderr
    assert unit not in manifest_files(out) and not (out / unit).exists()
    assert leftovers(out) == []
    r2 = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address, "--json",
                 timeout=300)
    assert r2.rc == 0, str(r2)
    assert r2.json()["resumed"] is True
    assert model_hashes(out) == model_hashes(local_ref)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes_byte_identical(cluster, tiny_src, local_ref, tmp_path):
    units = _units(local_ref)
    out = tmp_path / "out"
    args = ("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address,
            "--ray-max-in-flight", "1", "-q")
    # one unit at a time, in plan order; the third stalls after its first chunk, so the driver is killed with
    # two shards committed and one piece half-written on a worker
    p = popen_cli(*args, DSCONVERT_TEST_FAULT=f"stall:{units[2]}")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            if len(manifest_files(out)) == 2 and leftovers(out):
                break
            if p.poll() is not None:
                pytest.fail(f"driver exited early: {p.communicate()}")
            time.sleep(0.2)
        else:
            pytest.fail("the stalled unit never started")
        assert sorted(manifest_files(out)) == units[:2]
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    r = run_cli(*args[:-1], "--json", timeout=300)
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["resumed"] is True and rep["shards_reused"] == 2 and rep["shards_written"] == 2
    assert sorted(u["unit"] for u in rep["executor"]["units"]) == units[2:]
    assert model_hashes(out) == model_hashes(local_ref)
    assert leftovers(out) == []


@pytest.mark.slow
def test_worker_memory_is_bounded_by_chunks_not_unit_size(cluster, tmp_path):
    """One 140 MB unit streamed in 1 MiB chunks: each worker's resident memory grows by a few chunks only."""
    import ray

    from dsconvert.convert import fp8_to_bf16 as f2b
    from dsconvert.convert.executor import ExecOptions, RayExecutor
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "tiny", hidden_size=1024, vocab_size=32768, tokenizer=False,
                           num_shards=1, num_nextn_predict_layers=0)
    chunk = 2**20
    opts = f2b.Options(chunk_bytes=chunk)
    try:
        ex = RayExecutor(ExecOptions(ray=cluster.address, max_in_flight=2))
        rep = f2b.run(src, tmp_path / "out", opts, progress=False, executor=ex)
    finally:
        ray.shutdown()
    (u,) = rep["executor"]["units"]
    assert u["bytes"] > 100 * 10**6
    grew = u["rss_peak"] - u["rss_start"]
    assert grew < 48 * 2**20, f"worker RSS grew by {grew / 2**20:.1f} MiB for a {u['bytes'] / 1e6:.0f} MB unit"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_quantize_rtn_on_ray_is_byte_identical_with_the_same_errors(cluster, tiny_src, tmp_path, fmt):
    common = ("quantize", tiny_src, "--scheme", "W4A16", "--group-size", "32", "--format", fmt,
              "--max-shard-size", "1M", "--json")
    loc = run_cli(*common, "-o", tmp_path / "local", timeout=300)
    assert loc.rc == 0, str(loc)
    r = run_cli(*common, "-o", tmp_path / "ray", "--ray", cluster.address, timeout=300)
    assert r.rc == 0, str(r)
    assert model_hashes(tmp_path / "ray") == model_hashes(tmp_path / "local")
    a, b = loc.json(), r.json()
    assert len(b["executor"]["units"]) == len(manifest_files(tmp_path / "local")) > 1
    assert b["quantization_error"] == a["quantization_error"]  # gathered from the workers' extras
    full = lambda d: __import__("json").loads((d / "report.json").read_text())["module_errors"]
    assert full(tmp_path / "ray") == full(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("--scheme", "W8A16", "--group-size", "32", "--scheme-for", r".*mlp\.experts\..*=NVFP4A16",
     "--scheme-for", r".*kv_b_proj$=BF16"),
    ("--scheme", "NVFP4", "--num-samples", "2", "--seq-len", "32"),  # W4A4: the driver's input calibration shipped
], ids=["mixed-recipe", "nvfp4-w4a4"])
def test_quantize_per_module_schemes_on_ray_are_byte_identical(cluster, tiny_src, tmp_path, args):
    common = ("quantize", tiny_src, *args, "--max-shard-size", "1M", "--json")
    loc = run_cli(*common, "-o", tmp_path / "local", timeout=300)
    assert loc.rc == 0, str(loc)
    r = run_cli(*common, "-o", tmp_path / "ray", "--ray", cluster.address, timeout=300)
    assert r.rc == 0, str(r)
    assert model_hashes(tmp_path / "ray") == model_hashes(tmp_path / "local")
    assert len(r.json()["executor"]["units"]) == len(manifest_files(tmp_path / "local")) > 1
    assert r.json()["quantization_error"] == loc.json()["quantization_error"]


# ----------------------------------------------------------------------------------------------------------
# calibrated quantize: the routed expert groups of each MoE layer are the units (dsconvert.convert.calib_ray)
# ----------------------------------------------------------------------------------------------------------

CALIB = ("--group-size", "32", "--num-samples", "4", "--seq-len", "96", "--max-shard-size", "1M")


def _calib_local(tiny_src, out: Path, method: str):
    r = run_cli("quantize", tiny_src, "-o", out, f"--{method}", *CALIB, "--json", timeout=300)
    assert r.rc == 0, str(r)
    return r.json()


def _linear_stats(rep: dict) -> list[dict]:
    return [layer["linears"] for layer in rep["calibration"]["layers"]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantize_on_ray_is_byte_identical_with_a_worker_killed(cluster, tiny_src, tmp_path, method):
    """The tiny fixture's two MoE layers x 8 experts, cut into groups of 2 for the 2 slots: 8 units; the worker
    running layer 1's experts 2-3 is SIGKILLed once after writing its piece. Same bytes and per-linear stats
    as the local run (which never imports ray)."""
    loc = _calib_local(tiny_src, tmp_path / "local", method)
    out = tmp_path / "ray"
    unit = "layer1-experts2-3"
    r = run_cli("quantize", tiny_src, "-o", out, f"--{method}", *CALIB, "--ray", cluster.address, "--json",
                timeout=300, DSCONVERT_TEST_FAULT=f"kill:{unit}:1")
    assert r.rc == 0, str(r)
    assert model_hashes(out) == model_hashes(tmp_path / "local")
    rep = r.json()
    ex = rep["executor"]
    assert ex["backend"] == "ray" and ex["shards_written_by"] == "driver"
    assert sorted(u["unit"] for u in ex["units"]) == sorted(f"layer{L}-experts{e}-{e + 1}" for L in (1, 2)
                                                            for e in (0, 2, 4, 6))
    assert [x["unit"] for x in ex["retries"]] == [unit], ex["retries"]
    assert 1 <= ex["in_flight_max_seen"] <= 2
    assert _linear_stats(rep) == _linear_stats(loc)  # the workers' per-expert stats, merged in order
    assert "layer 2/3: calibrating experts 6-7" in r.stderr  # the local run's stage lines, on the driver
    assert not (out / "calibration-spill").exists() and leftovers(out) == []


@pytest.mark.slow
def test_calibrated_driver_killed_mid_layer_then_rerun_resumes_byte_identical(cluster, tiny_src, tmp_path):
    loc = tmp_path / "local"
    _calib_local(tiny_src, loc, "gptq")
    out = tmp_path / "ray"
    args = ("quantize", tiny_src, "-o", out, "--gptq", *CALIB, "--ray", cluster.address, "--ray-max-in-flight", "1")
    unit = "layer2-experts0-3"  # 1 slot: groups of 4; stalls after writing its piece, the layer half done
    p = popen_cli(*args, "-q", DSCONVERT_TEST_FAULT=f"stall:{unit}")
    spill = out / "calibration-spill"
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            if manifest_files(out) and list(spill.glob(f"{unit}.*.tmp")):
                break
            if p.poll() is not None:
                pytest.fail(f"driver exited early: {p.communicate()}")
            time.sleep(0.2)
        else:
            pytest.fail("the stalled unit never started")
        assert len(manifest_files(out)) < len(manifest_files(loc))
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    r = run_cli(*args, "--json", timeout=300)
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["resumed"] is True and rep["shards_reused"] >= 1
    assert model_hashes(out) == model_hashes(loc)
    assert not spill.exists() and leftovers(out) == []


# ----------------------------------------------------------------------------------------------------------
# gguf: per-layer tensor ranges written as pieces by the workers, appended in order by the driver
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_local(tiny_src, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf_local") / "m.gguf"
    r = run_cli("gguf", tiny_src, "-o", out, "--type", "Q8_0", "--json", timeout=300)
    assert r.rc == 0, str(r)
    return out, r.json()


def gguf_hashes(out: Path) -> dict[str, str]:
    return {k: v for k, v in tree_hashes(out.parent).items() if k.endswith((".gguf", "manifest.json"))}


@pytest.mark.slow
def test_gguf_on_ray_is_byte_identical_with_a_worker_killed(cluster, tiny_src, gguf_local, tmp_path):
    ref, ref_rep = gguf_local
    out = tmp_path / "m.gguf"
    r = run_cli("gguf", tiny_src, "-o", out, "--type", "Q8_0", "--ray", cluster.address, "--json", timeout=300,
                DSCONVERT_TEST_FAULT="kill:m.gguf@1-14:1")
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["output"]["sha256"] == ref_rep["output"]["sha256"]
    assert gguf_hashes(out) == {k: v for k, v in gguf_hashes(ref).items()}
    units = [u["unit"] for u in rep["executor"]["units"]]
    assert len(units) >= 4 and all(u.startswith("m.gguf@") for u in units)  # embedding, layers, head
    assert [x["unit"] for x in rep["executor"]["retries"]] == ["m.gguf@1-14"] or \
        pytest.fail(f"units {units}, retries {rep['executor']['retries']}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.slow
def test_gguf_driver_killed_mid_file_resumes_from_appended_pieces(cluster, tiny_src, gguf_local, tmp_path):
    ref, ref_rep = gguf_local
    out = tmp_path / "m.gguf"
    args = ("gguf", tiny_src, "-o", out, "--type", "Q8_0", "--ray", cluster.address, "--ray-max-in-flight", "1")
    r0 = run_cli("gguf", tiny_src, "-o", tmp_path / "probe.gguf", "--type", "Q8_0", "--ray", cluster.address,
                 "--json", timeout=300)
    assert r0.rc == 0, str(r0)
    # the report lists units as they finished; stall the third piece in file order, so two have been appended
    units = sorted((u["unit"].replace("probe.gguf", "m.gguf") for u in r0.json()["executor"]["units"]),
                   key=lambda u: int(u.rsplit("@", 1)[1].split("-")[0]))
    p = popen_cli(*args, "-q", DSCONVERT_TEST_FAULT=f"stall:{units[2]}")
    side = out.with_name(out.name + ".dsconvert-partial.json")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            try:
                import json
                if len(json.loads(side.read_text())["tensors"]) > 0 and list(tmp_path.glob("m.gguf@*.tmp")):
                    break
            except (OSError, ValueError, KeyError):
                pass
            if p.poll() is not None:
                pytest.fail(f"driver exited early: {p.communicate()}")
            time.sleep(0.2)
        else:
            pytest.fail("the stalled piece never started")
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    r = run_cli(*args, "--json", timeout=300)
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["resumed"] is True and rep["tensors_reused"].get("m.gguf", 0) > 0, rep["tensors_reused"]
    assert rep["output"]["sha256"]["m.gguf"] == ref_rep["output"]["sha256"]["m.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.gguf") and
                  p.name.endswith((".tmp", ".dsconvert-partial.json"))) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_on_the_driver_cancels_the_tasks_and_leaves_no_piece(cluster, tiny_src, local_ref, tmp_path,
                                                                     sig, code):
    units = _units(local_ref)
    out = tmp_path / "out"
    args = ("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", SHARD, "--ray", cluster.address,
            "--ray-max-in-flight", "1", "-q")
    p = popen_cli(*args, DSCONVERT_TEST_FAULT=f"stall:{units[1]}")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240 and not (len(manifest_files(out)) == 1 and leftovers(out)):
            if p.poll() is not None:
                pytest.fail(f"driver exited early: {p.communicate()}")
            time.sleep(0.2)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert leftovers(out) == [] and sorted(manifest_files(out)) == units[:1]
    r = run_cli(*args[:-1], "--json", timeout=300)
    assert r.rc == 0 and r.json()["shards_reused"] == 1, str(r)
    assert model_hashes(out) == model_hashes(local_ref)


@pytest.mark.slow
def test_gguf_v4_on_ray_is_byte_identical_with_a_worker_killed(cluster, v4_src, tmp_path):
    """A deepseek4 plan through the same per-layer units: a K-quant mix with the FP4 experts repacked, a worker
    killed in its first try of layer 0's unit; the file equals the local run's."""
    from dsconvert.convert import gguf_export as ge
    from dsconvert.formats.checkpoint import open_checkpoint

    ref = run_cli("gguf", v4_src, "-o", tmp_path / "ref" / "m.gguf", "--type", "Q4_K_M", "--json", timeout=300)
    assert ref.rc == 0, str(ref)
    out = tmp_path / "m.gguf"
    plan = ge.make_plan(open_checkpoint(v4_src, check_values=False), ge.GGUFOptions(type="Q4_K_M"), out)
    ranges = ge.piece_ranges(plan.files[0], 0)
    unit = ge.PIECE_NAME.format(file="m.gguf", a=ranges[1][0], b=ranges[1][1])
    r = run_cli("gguf", v4_src, "-o", out, "--type", "Q4_K_M", "--ray", cluster.address, "--json", timeout=300,
                DSCONVERT_TEST_FAULT=f"kill:{unit}:1")
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["output"]["sha256"]["m.gguf"] == ref.json()["output"]["sha256"]["m.gguf"]
    assert len(rep["executor"]["units"]) == len(ranges) == 1 + int(plan.ck.config["num_hidden_layers"]) + 1
    assert [x["unit"] for x in rep["executor"]["retries"]] == [unit]
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# imatrix: each MoE layer's routed experts (forward + importance sums) as units
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imatrix_on_ray_is_byte_identical_with_a_worker_killed(cluster, tiny_src, tmp_path):
    common = ("imatrix", tiny_src, "--num-samples", "4", "--seq-len", "64", "--json")
    loc = run_cli(*common, "-o", tmp_path / "local.gguf", timeout=300)
    assert loc.rc == 0, str(loc)
    unit = "layer2-experts4-5"
    r = run_cli(*common, "-o", tmp_path / "ray.gguf", "--ray", cluster.address, timeout=300,
                DSCONVERT_TEST_FAULT=f"kill:{unit}:1")
    assert r.rc == 0, str(r)
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()
    ex = r.json()["executor"]
    assert sorted(u["unit"] for u in ex["units"]) == sorted(f"layer{L}-experts{e}-{e + 1}" for L in (1, 2)
                                                            for e in (0, 2, 4, 6))
    assert [x["unit"] for x in ex["retries"]] == [unit]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.gguf", "ray.gguf"]  # no scratch left
