"""Shared fixtures for the fp8-to-bf16 / inspect tests.

* ``tiny_src``: the tiny DeepSeek-V3-layout checkpoint (dsconvert.testing.fixtures), built once per session.
  Tests must never modify it; ``tiny_copy`` gives a private copy to damage.
* ``tiny_out``: ``tiny_src`` converted once through the real CLI (a subprocess), with its ``--json`` report.
* ``run_cli``: run ``python -m dsconvert.cli ...`` in a subprocess from the repository root (so this checkout's
  ``dsconvert`` is the one imported) and return rc/stdout/stderr.

Helpers that read checkpoints use the ``safetensors`` library, never dsconvert's own reader, so that what the
tests check does not depend on the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before any test module imports torch: passive OpenMP waiting (see dsconvert/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
MARKER_GLOB = "EXECUTED_*"


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str
    args: tuple

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __str__(self) -> str:  # shown in assertion messages
        return f"dsconvert {' '.join(self.args)} -> rc {self.rc}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("DSCONVERT_DEBUG", None)
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dsconvert.cli", *map(str, args)]


def run_cli(*args, timeout: float = 180, **env: str) -> CliResult:
    """Run the CLI in a fresh interpreter with cwd = repository root; never raises on a non-zero exit."""
    p = subprocess.run(cli_cmd(*args), cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr, tuple(map(str, args)))


def kill_after_shards(p, out: Path, total: int, shards: int = 2, timeout: float = 300) -> None:
    """SIGKILL the CLI process ``p`` once ``out`` holds ``shards`` finished ``model-*.safetensors`` files,
    asserting that the kill really interrupted the run (it was still going and fewer than ``total`` shards
    were written), so a resume test cannot pass without resuming."""
    import signal
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(list(out.glob("model-*.safetensors"))) >= shards or p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed: the resume path was not exercised"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list(out.glob("model-*.safetensors"))) < total, "the kill landed after the last shard"


def popen_cli(*args, **env: str) -> subprocess.Popen:
    """Start the CLI without waiting (for running independent cases concurrently, or killing it)."""
    return subprocess.Popen(cli_cmd(*args), cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks followed), keyed by relative POSIX path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def manifest_files(out: Path) -> dict:
    """``manifest.json``'s finished-file entries (name -> {size, sha256}); {} while there is none yet."""
    try:
        return json.loads((out / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


def read_index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def read_tensors(d: Path) -> dict[str, tuple[str, tuple, bytes, str]]:
    """Every tensor of every shard in ``d`` via ``safetensors.safe_open``: name -> (dtype, shape, raw bytes, shard).

    Raw bytes come from the torch tensor viewed as uint8 (a reinterpretation, not a cast)."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in shard_files(d):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
                assert name not in out, f"{name} appears twice"
                out[name] = (str(t.dtype).replace("torch.", ""), tuple(t.shape), raw, f.name)
    return out


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path_factory.mktemp("tiny") / "src", "tiny")
    guard_source(src)
    return src


@pytest.fixture(scope="session")
def trained_src(tmp_path_factory) -> Path:
    """A copy of the committed trained tiny DeepSeek-V3 (dsconvert.testing.trained): for tests about quality."""
    from dsconvert.testing.trained import TRAINED_DIR

    src = tmp_path_factory.mktemp("trained") / "src"
    shutil.copytree(TRAINED_DIR, src)
    guard_source(src)
    return src


_GUARDED_SOURCES: list[tuple[Path, dict[str, str]]] = []


def guard_source(src: Path) -> dict[str, str]:
    """Hash ``src`` now; the session guard checks at the end that it is unchanged."""
    h = tree_hashes(src)
    _GUARDED_SOURCES.append((src, h))
    return h


@pytest.fixture(scope="session", autouse=True)
def _session_guard(tmp_path_factory):
    """After every test: no source tree changed, and no remote-code file was ever executed anywhere (the fixture's
    ``modeling_deepseek.py``/``configuration_deepseek.py`` write ``EXECUTED_<name>`` next to themselves if run)."""
    yield
    executed = sorted(str(p) for p in tmp_path_factory.getbasetemp().rglob(MARKER_GLOB))
    assert not executed, f"remote code was executed: {executed}"
    for src, before in _GUARDED_SOURCES:
        assert tree_hashes(src) == before, f"source {src} was modified"


@pytest.fixture(scope="session")
def tiny_src_hash(tiny_src) -> dict[str, str]:
    """The whole SRC tree hashed before any command ran on it (checked again at the end of the session)."""
    return next(h for p, h in _GUARDED_SOURCES if p == tiny_src)


@pytest.fixture(scope="session")
def tiny_run(tiny_src, tiny_src_hash, tmp_path_factory) -> tuple[Path, CliResult]:
    """The default conversion of the tiny fixture, with ``--json``: (OUT, the CLI result)."""
    out = tmp_path_factory.mktemp("tiny_out") / "out"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--json")
    assert r.rc == 0, str(r)
    return out, r


@pytest.fixture(scope="session")
def tiny_out(tiny_run) -> tuple[Path, dict]:
    out, r = tiny_run
    return out, r.json()


@pytest.fixture
def tiny_copy(tiny_src, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_src, dst)
    return dst


def run_many(jobs: dict[str, tuple], parallel: int = 4, timeout: float = 300) -> dict[str, CliResult]:
    """Run independent CLI invocations concurrently (at most ``parallel`` at a time); key -> result."""
    import time

    pending = list(jobs.items())
    running: dict[str, tuple[subprocess.Popen, tuple, float]] = {}
    results: dict[str, CliResult] = {}
    while pending or running:
        while pending and len(running) < parallel:
            key, args = pending.pop(0)
            running[key] = (popen_cli(*args), tuple(map(str, args)), time.monotonic())
        for key, (p, args, t0) in list(running.items()):
            try:
                so, se = p.communicate(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > timeout:
                    p.kill()
                    so, se = p.communicate()
                else:
                    continue
            results[key] = CliResult(p.returncode, so, se, args)
            del running[key]
    return results


@pytest.fixture(scope="session")
def v4_src(tmp_path_factory) -> Path:
    """The tiny DeepSeek-V4-Flash release-layout checkpoint (FP4 experts; every layer kind, hash + routed MoE,
    MTP); built from transformers' DeepseekV4ForCausalLM shapes, so it skips without transformers' V4."""
    pytest.importorskip("transformers.models.deepseek_v4")
    from dsconvert.testing.fixtures import build_v4_checkpoint

    src = build_v4_checkpoint(tmp_path_factory.mktemp("v4") / "src", "tiny")
    guard_source(src)
    return src


@pytest.fixture(scope="session")
def v4_base_src(tmp_path_factory) -> Path:
    """The tiny DeepSeek-V4-Flash-Base checkpoint (FP8 experts with F32 power-of-two scales)."""
    pytest.importorskip("transformers.models.deepseek_v4")
    from dsconvert.testing.fixtures import build_v4_checkpoint

    src = build_v4_checkpoint(tmp_path_factory.mktemp("v4base") / "src", "tiny", variant="flash-base")
    guard_source(src)
    return src


@pytest.fixture(scope="session")
def v4_odd_src(tmp_path_factory) -> Path:
    """A V4 checkpoint with partial 128-blocks (hidden 320): for dsconvert's own exact checks only
    (transformers infers the FP8 block from the grid and mis-dequantizes it)."""
    pytest.importorskip("transformers.models.deepseek_v4")
    from dsconvert.testing.fixtures import build_v4_checkpoint

    src = build_v4_checkpoint(tmp_path_factory.mktemp("v4odd") / "src", "tiny-odd")
    guard_source(src)
    return src


# --- tiers ------------------------------------------------------------------------------------------------------
# ``e2e``: the test, a fixture it uses, or a module-level helper either of them calls starts a process (the CLI, a
# Ray cluster, llama.cpp in a child). ``unit``: everything else, in-process against an oracle. Both are assigned here
# at collection from the code itself, so a new test is tiered without anyone remembering to mark it:
# ``make test-fast`` runs ``-m unit``; ``slow`` tests are never ``unit``.
_PROCESS_NAMES = frozenset({"run_cli", "run_many", "popen_cli", "cli_cmd", "subprocess", "Popen", "local_cluster",
                            "start_cluster", "multiprocessing"})


def _starts_process(fn, seen: set) -> bool:
    """Whether ``fn`` (a function) names a process-starting helper, directly or through a function of its module."""
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = set(code.co_names)
    for c in code.co_consts:  # nested functions and lambdas
        if hasattr(c, "co_names"):
            names |= set(c.co_names)
    if names & _PROCESS_NAMES:
        return True
    g = getattr(fn, "__globals__", {})
    return any(callable(g.get(n)) and getattr(g.get(n), "__module__", None) == fn.__module__
               and _starts_process(g[n], seen) for n in names)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("unit"):
            continue
        seen: set = set()
        fns = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        if info is not None:
            fns += [d.func for defs in info.name2fixturedefs.values() for d in defs]
        if any(f is not None and _starts_process(f, seen) for f in fns):
            item.add_marker(pytest.mark.e2e)
        elif not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)
