"""``quantize --gptq/--awq --ray``: the expert-group shipping path (dsconvert.convert.calib_ray) without a cluster.

An in-process executor runs each unit through the same Job a Ray worker builds (stage file read back from disk,
experts' weights from SRC, the piece written and adopted by the driver); the engine's results must equal the
plain local loop bit for bit, stats included. The Ray-cluster runs of the CLI are in tests/test_ray.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsconvert.convert.calib_ray import RayExpertGroups, split_groups

from .test_calibrate_grouped import _run, _same, moe16  # noqa: F401 - the fixture and the engine driver

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class InProcess:
    """The part of RayExecutor that RayExpertGroups calls, running each unit here through its Job."""

    slots = 2

    def __init__(self):
        self.units: list[str] = []

    def run_units(self, out_dir: Path, units, progress, job) -> None:
        rebuilt = job.build(*job.args)
        for u in units:
            progress.describe(u.name)
            tmp = Path(out_dir) / f"{u.name}.test-1.tmp"
            result = rebuilt.write(u.name, u.payload, tmp, progress)
            u.on_result(result, tmp)
            self.units.append(u.name)


def test_split_groups_cuts_for_the_slots_and_never_grows_a_group():
    assert split_groups([(0, 8)], 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split_groups([(0, 3), (3, 6), (6, 7)], 1) == [(0, 3), (3, 6), (6, 7)]
    assert split_groups([(0, 16)], 64) == [(e, e + 1) for e in range(16)]


@pytest.mark.parametrize("method,expert_policy", [("gptq", "all-tokens"), ("awq", "all-tokens"), ("awq", "topk")])
@pytest.mark.slow  # > 2 s each: kept out of `make test-fast`, run by `make test-slow`
def test_shipped_expert_groups_equal_the_local_loop(moe16, tmp_path, method, expert_policy):  # noqa: F811
    """Stage -> safetensors -> worker code -> piece -> adopt == the engine's own group loop, bit for bit:
    levels, scales, zeros, folded tensors, per-expert choices and the residual stream."""
    spill = tmp_path / "spill"
    ex = InProcess()
    shipped, a = _run(moe16, method, expert_group=16, spill_dir=spill, expert_policy=expert_policy,
                      _dispatch=lambda eng: RayExpertGroups(ex, str(moe16.ck.root), spill))
    _, b = _run(moe16, method, expert_group=16, expert_policy=expert_policy)
    assert ex.units[:4] == ["layer1-experts0-3", "layer1-experts4-7", "layer1-experts8-11", "layer1-experts12-15"]
    assert a.keys() == b.keys()
    bad = [k for k in a if not _same(a[k], b[k])]
    assert not bad, bad[:5]
    assert sorted(p.name for p in spill.iterdir()) == []  # pieces adopted then closed, stage files removed


def test_cuda_calibration_on_ray_needs_gpus_per_task():
    """The expert groups run on the driver's device kind: a CUDA run whose units reserve no GPU is refused."""
    from types import SimpleNamespace

    from dsconvert.convert.calibrated import CalibratedRun
    from dsconvert.convert.executor import ExecOptions
    from dsconvert.errors import UsageError

    run = SimpleNamespace(device=torch.device("cuda"), method="gptq", _ray=None, engine=None)
    with pytest.raises(UsageError, match="reserve no GPU") as e:
        CalibratedRun.use_ray(run, SimpleNamespace(opts=ExecOptions(ray="auto")), "/src")
    assert "--ray-gpus-per-task" in e.value.hint
    CalibratedRun.use_ray(run, SimpleNamespace(opts=ExecOptions(ray="auto", gpus_per_task=1)), "/src")
    assert run._ray[1] == "/src"


def test_v4_calibration_on_ray_is_refused():
    """The V4 engine has no remote expert groups: --ray is refused (exit 2), not silently run on the driver."""
    from types import SimpleNamespace

    from dsconvert.convert.calibrate_v4 import V4CalibrationEngine
    from dsconvert.convert.calibrated import CalibratedRun
    from dsconvert.convert.executor import ExecOptions
    from dsconvert.errors import UsageError

    run = SimpleNamespace(device=torch.device("cpu"), method="gptq", _ray=None,
                          engine=V4CalibrationEngine.__new__(V4CalibrationEngine))
    with pytest.raises(UsageError, match="DeepSeek-V4 calibration runs on one machine") as e:
        CalibratedRun.use_ray(run, SimpleNamespace(opts=ExecOptions(ray="auto")), "/src")
    assert e.value.exit_code == 2 and run._ray is None
