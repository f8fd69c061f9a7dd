"""Where a writing command's work units run: threads in this process, or tasks on a Ray cluster.

The driver plans as always (headers only) and owns every commit. A *work unit* is one output shard
(``fp8-to-bf16``, RTN ``quantize``) or one GGUF tensor range (``gguf``, :meth:`RayExecutor.run_units` with the
driver appending the pieces: :func:`dsconvert.convert.gguf_export.write_file_remote`). Both executors take the
same call for shards, :meth:`Executor.write_shards`, so the safetensors commands hold no backend branches:

* :class:`LocalExecutor` runs :func:`.pipeline.write_shards` (``--workers`` shards at once in threads).
* :class:`RayExecutor` (``--ray ADDRESS``) submits one Ray task per unit not yet in the manifest, at most
  ``--ray-max-in-flight`` at a time. The task gets a :class:`Job` (a module-level function and its picklable
  arguments: SRC path and options), rebuilds the same deterministic plan on its node, streams the shard into
  ``<OUT>/<shard>.<run>-<attempt>.tmp`` on the shared filesystem with the same producers as a local run, fsyncs
  it, and returns its size and sha256. The driver renames it to the final name (fsync, rename, directory fsync)
  and records it in ``manifest.json``, exactly as a local commit. A cluster run is therefore byte-identical to a
  local run, and one killed anywhere resumes as a local run does (docs/cli-conventions.md, Resume; the cluster
  set-up is in docs/distributed.md).

Failures: a task whose worker process or node died (any Ray system error) is resubmitted, at most
``--ray-max-retries`` times, under a new temporary name; then the run stops with :class:`~dsconvert.errors.WorkerFailed`
naming the unit (exit 1; rerun to resume). An error raised by dsconvert inside a task (bad input, disk full) is
not retried: it is re-raised on the driver with its own exit code. Progress: each task yields its byte count
every :data:`PROGRESS_S` seconds; the driver feeds one :class:`~.progress.ByteProgress`, so the display and the
plain log lines are those of a local run (a retried unit's bytes are not counted twice).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import DsconvertError, UsageError, WorkerFailed
from . import cancel
from .manifest import Manifest, commit_tmp
from .pipeline import OutShard, _write_one, write_shards
from .progress import ByteProgress

#: Seconds between a task's progress reports (also how fast a task notices that the driver cancelled it).
PROGRESS_S = 0.5
#: Environment variable holding a fault to inject into Ray tasks (tests only): ``kill:UNIT:N`` makes the
#: worker process SIGKILL itself after its first chunk of UNIT on its first N attempts; ``stall:UNIT`` makes
#: every attempt at UNIT stop after its first chunk (until cancelled). Read on the driver, passed to the task.
FAULT_ENV = "DSCONVERT_TEST_FAULT"
RAY_HINT = "pip install 'dsconvert[ray]' (on the driver and on every node of the cluster)"


@dataclass(frozen=True)
class ExecOptions:
    """The ``--ray*`` flags. ``ray`` is None for a local run, else the address given to ``ray.init``
    (``auto``: ``RAY_ADDRESS`` or the cluster started on this machine by ``ray start``)."""

    ray: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_in_flight: int | None = None  # None: the cluster's CPUs / cpus_per_task
    max_retries: int = 3


@dataclass(frozen=True)
class Job:
    """How a worker rebuilds the driver's plan: ``build(*args) -> Rebuilt``. ``build`` is a module-level
    function (pickled by reference) and ``args`` plain data (the SRC path and the command's options)."""

    build: Callable[..., "Rebuilt"]
    args: tuple


@dataclass
class Rebuilt:
    """A plan rebuilt on a worker, as the one operation a unit needs: ``write(unit, payload, tmp, sink)``
    writes unit ``unit`` into the file ``tmp`` (fsynced, not renamed), calling ``sink.advance(n)`` per chunk,
    and returns ``{"size", "sha256", ...}`` (anything else goes back to the driver as the unit's result)."""

    write: Callable[[str, object, Path, object], dict]


def shard_units(shards: list[OutShard], extras: Callable[[OutShard], dict] | None = None) -> Rebuilt:
    """The :class:`Rebuilt` of a safetensors plan: unit = output shard (its name), payload = header metadata;
    ``extras(shard)`` (e.g. each module's quantization error) is returned as the result's ``extras``."""
    by_name = {s.name: s for s in shards}

    def write(unit: str, metadata, tmp: Path, sink) -> dict:
        shard = by_name.get(unit)
        if shard is None:  # pragma: no cover - the plan is deterministic; a different SRC on this node
            raise UsageError(f"node {socket.gethostname()}: unit {unit} is not in the plan made from SRC there",
                             hint="every node must see the same SRC at the same path (a shared filesystem)")
        w = _write_one(tmp.parent, shard, metadata if metadata is not None else {"format": "pt"}, sink, 2,
                       threading.Event(), path=tmp.with_name(tmp.name[: -len(".tmp")]))
        size, digest = w.finish()
        return {"size": size, "sha256": digest, "extras": extras(shard) if extras else {}}

    return Rebuilt(write)


@dataclass
class Unit:
    """One remote work unit: ``name`` (also its temporary file's prefix), the ``payload`` its task receives,
    and ``on_result(result, tmp)``, run on the driver when it finished (commit, or append a piece)."""

    name: str
    payload: object
    on_result: Callable[[dict, Path], None]
    describe: str | None = None  # the progress item shown while it runs (default: ``name``)


class Executor:
    """The interface the writing commands call."""

    name = "?"
    remote = False  # True: units run in other processes, from a rebuilt plan (:class:`Job`)

    def write_shards(self, out_dir: Path, shards: list[OutShard], manifest: Manifest, progress: ByteProgress, *,
                     job: Job, metadata: dict[str, str] | None = None,
                     on_extras: Callable[[dict], None] | None = None) -> list[str]:
        """Write every shard of ``shards`` not yet in ``manifest.files``; return the names written now.

        ``job`` rebuilds ``shards`` elsewhere (ignored by a local executor); ``on_extras`` receives each remote
        unit's ``extras`` (:func:`shard_units`). Each finished shard is in the manifest (saved atomically) before the
        call returns.

        Raises:
            Cancelled: SIGINT/SIGTERM; OSError: disk full; WorkerFailed: a unit failed on every attempt.
        """
        raise NotImplementedError

    def report(self) -> dict:
        """Where the units ran (the JSON report's ``executor`` section)."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Shards written by ``workers`` threads of this process (:func:`.pipeline.write_shards`)."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = workers

    def write_shards(self, out_dir, shards, manifest, progress, *, job, metadata=None, on_extras=None):
        return write_shards(out_dir, shards, manifest, progress, metadata=metadata, workers=self.workers)

    def report(self) -> dict:
        return {"backend": self.name, "workers": self.workers}


def make_executor(opts: ExecOptions, workers: int) -> Executor:
    """The executor for these flags: Ray when ``opts.ray`` is set, else local threads.

    Raises:
        UsageError: ``--ray`` without the ``ray`` package (exit 2, with the install hint), or bad ``--ray-*`` values.
    """
    return RayExecutor(opts) if opts.ray else LocalExecutor(workers)


# ----------------------------------------------------------------------------------------------------------
# the Ray side: what runs in a task
# ----------------------------------------------------------------------------------------------------------

_REBUILT: dict[str, Rebuilt] = {}  # run id -> plan, per worker process (a worker runs several units of a run)
_REBUILT_LOCK = threading.Lock()


def _rebuilt(run_id: str, job: Job) -> Rebuilt:
    with _REBUILT_LOCK:
        if run_id not in _REBUILT:
            if len(_REBUILT) >= 2:
                _REBUILT.pop(next(iter(_REBUILT)))
            _REBUILT[run_id] = job.build(*job.args)
        return _REBUILT[run_id]


class _Counter:
    """The progress sink of a remote unit: counts bytes, and applies a test fault after the first chunk."""

    def __init__(self, fault: tuple[str, int] | None):
        self.n = 0
        self.fault = fault
        self.stalled = threading.Event()

    def advance(self, n: int) -> None:
        self.n += n
        if self.fault is not None:
            kind, _ = self.fault
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while kind == "stall":  # until the driver cancels the task (which kills this process)
                self.stalled.set()
                time.sleep(1.0)

    def describe(self, text: str, boundary: bool = True) -> None:
        pass


def _fault_for(fault: str | None, unit: str, attempt: int) -> tuple[str, int] | None:
    """Parse :data:`FAULT_ENV` (``kill:UNIT:N`` or ``stall:UNIT``) for ``unit`` at ``attempt`` (1-based)."""
    if not fault:
        return None
    kind, _, rest = fault.partition(":")
    name, _, n = rest.partition(":")
    if name != unit:
        return None
    if kind == "kill" and attempt <= int(n or 1):
        return ("kill", attempt)
    if kind == "stall":
        return ("stall", attempt)
    return None


def unit_task(run_id: str, job: Job, version: str, unit: str, payload, tmp: str,
              fault: tuple[str, int] | None):
    """One work unit on a Ray worker (a generator task): ``Rebuilt.write(unit, payload, tmp)`` of ``job``'s
    plan, in a thread, while the task yields ``{"progress": bytes so far}`` every :data:`PROGRESS_S` s; then
    ``{"done": result}``: ``write``'s result plus ``bytes`` (tensor bytes), ``seconds``, the node (``node_id``,
    ``host``, ``pid``) and the worker's ``rss_start`` / ``rss_peak`` (bytes, sampled every 20 ms).

    Raises:
        UsageError: this node runs another dsconvert version than the driver.
        anything the writer raises (BadInputError, OSError, ...), re-raised on the driver.
    """
    import psutil
    import ray

    if version != __version__:
        raise UsageError(f"node {socket.gethostname()} runs dsconvert {__version__}, the driver {version}",
                         hint="install the same dsconvert on every node of the cluster")
    t0 = time.perf_counter()
    proc = psutil.Process()
    mem = {"start": proc.memory_info().rss}
    mem["peak"] = mem["start"]
    rebuilt = _rebuilt(run_id, job)
    counter = _Counter(fault)
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = rebuilt.write(unit, payload, Path(tmp), counter)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the task's thread
            box["error"] = e

    th = threading.Thread(target=work, name=f"unit-{unit}", daemon=True)
    th.start()
    while th.is_alive():
        for _ in range(int(PROGRESS_S / 0.02)):
            mem["peak"] = max(mem["peak"], proc.memory_info().rss)
            th.join(0.02)
            if not th.is_alive():
                break
        yield {"progress": counter.n}
    if "error" in box:
        raise box["error"]
    ctx = ray.get_runtime_context()
    yield {"done": {**box["result"], "tmp": tmp, "bytes": counter.n, "seconds": time.perf_counter() - t0,
                    "node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                    "rss_start": mem["start"], "rss_peak": mem["peak"]}}


# ----------------------------------------------------------------------------------------------------------
# the Ray side: the driver
# ----------------------------------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs the ray package, which is not installed", hint=RAY_HINT) from None
    return ray


class RayExecutor(Executor):
    """Units as Ray tasks on the cluster at ``opts.ray``; the driver commits (see the module docstring)."""

    name = "ray"
    remote = True

    def __init__(self, opts: ExecOptions):
        if opts.cpus_per_task <= 0 or opts.gpus_per_task < 0:
            raise UsageError("--ray-cpus-per-task must be > 0 and --ray-gpus-per-task >= 0")
        if opts.max_in_flight is not None and opts.max_in_flight < 1:
            raise UsageError("--ray-max-in-flight must be at least 1")
        if opts.max_retries < 0:
            raise UsageError("--ray-max-retries must be at least 0")
        self.ray = _import_ray()
        self.opts = opts
        self.units: list[dict] = []
        self.retries: list[dict] = []
        self.in_flight_max = 0
        self.cluster: dict = {}
        self._connected_here = False
        self._cap: int | None = None  # set while a :meth:`session` holds the connection
        self._lock = threading.Lock()

    @property
    def slots(self) -> int | None:
        """The cap on units in flight while a :meth:`session` holds the connection (None outside one)."""
        return self._cap

    # -- connection ----------------------------------------------------------------------------------------
    def _connect(self) -> int:
        """Connect to the cluster; return the cap on units in flight."""
        ray = self.ray
        self._connected_here = not ray.is_initialized()  # a library caller may have connected already
        if self._connected_here:
            main = threading.current_thread() is threading.main_thread()
            old_term = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(address=self.opts.ray, log_to_driver=False, logging_level="ERROR",
                         configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UsageError(f"--ray {self.opts.ray}: cannot connect to a Ray cluster ({e})",
                                 hint="start one with `ray start --head` (and `ray start --address=HEAD:6379` on "
                                      "the other nodes), or pass its address: --ray HOST:6379") from None
            finally:
                if main:  # ray.init installs sys.exit on SIGTERM; keep dsconvert's cancel (exit 143, no .tmp)
                    signal.signal(signal.SIGTERM, old_term)
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.cluster = {"address": self.opts.ray, "nodes": len(nodes), "cpus": res.get("CPU", 0),
                        "gpus": res.get("GPU", 0)}
        if self.opts.gpus_per_task > res.get("GPU", 0):
            raise UsageError(f"--ray-gpus-per-task {self.opts.gpus_per_task}: the cluster has "
                             f"{res.get('GPU', 0):g} GPUs", hint="lower --ray-gpus-per-task or add GPU nodes")
        if self.opts.cpus_per_task > max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0):
            raise UsageError(f"--ray-cpus-per-task {self.opts.cpus_per_task:g}: no node has that many CPUs",
                             hint="lower --ray-cpus-per-task")
        if self.opts.max_in_flight is not None:
            return self.opts.max_in_flight
        return max(1, int(res.get("CPU", 1) // self.opts.cpus_per_task))

    # -- one unit --------------------------------------------------------------------------------------------
    def _run_unit(self, remote, run_id: str, job: Job, unit: Unit, out_dir: Path, progress: ByteProgress,
                  fault: str | None, stop: threading.Event, in_flight: list[int]) -> None:
        ray = self.ray
        counted = 0  # bytes of this unit already shown (a retry does not count them again)
        last_error = ""
        for attempt in range(1, self.opts.max_retries + 2):
            if stop.is_set() or cancel.requested():
                raise cancel.Cancelled(cancel.signum())
            tmp = out_dir / f"{unit.name}.{run_id[:8]}-{attempt}.tmp"
            progress.describe(unit.describe or unit.name)
            gen = remote.remote(run_id, job, __version__, unit.name, unit.payload, str(tmp),
                                _fault_for(fault, unit.name, attempt))
            with self._lock:
                in_flight[0] += 1
                self.in_flight_max = max(self.in_flight_max, in_flight[0])
            result = None
            try:
                while True:
                    # wait with a timeout: a task still queued for resources yields nothing, and a cancelled
                    # run must not wait for it
                    ready, _ = ray.wait([gen], timeout=2 * PROGRESS_S)
                    if stop.is_set() or cancel.requested():
                        ray.cancel(gen, force=True)
                        raise cancel.Cancelled(cancel.signum())
                    if not ready:
                        continue
                    try:
                        ref = next(gen)
                    except StopIteration:
                        break
                    item = ray.get(ref)
                    if "progress" in item:
                        if item["progress"] > counted:
                            progress.advance(item["progress"] - counted)
                            counted = item["progress"]
                    else:
                        result = item["done"]
            except ray.exceptions.RayTaskError as e:  # dsconvert raised inside the task: not retried
                tmp.unlink(missing_ok=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, (DsconvertError, OSError)):
                    raise cause from None
                if isinstance(cause, ImportError):
                    raise UsageError(f"unit {unit.name}: a Ray worker cannot import dsconvert ({cause})",
                                     hint="install the same dsconvert on every node of the cluster") from None
                raise
            except ray.exceptions.RayError as e:  # the worker process or its node died: retry
                tmp.unlink(missing_ok=True)
                text = str(e).strip()
                last_error = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
                with self._lock:
                    self.retries.append({"unit": unit.name, "attempt": attempt, "error": last_error})
                continue
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                with self._lock:
                    in_flight[0] -= 1
            if result["bytes"] > counted:
                progress.advance(result["bytes"] - counted)
            if Path(result["tmp"]) != tmp or not tmp.is_file() or tmp.stat().st_size != result["size"]:
                tmp.unlink(missing_ok=True)
                raise WorkerFailed(f"unit {unit.name}: the worker wrote {result['tmp']} ({result['size']} bytes) "
                                   f"but the driver sees {'another size' if tmp.is_file() else 'no such file'}",
                                   hint="OUT must be on a filesystem shared by every node, at the same path")
            cancel.check()
            unit.on_result(result, tmp)  # owns ``tmp`` now (renames or consumes it); a failed run's are swept
            with self._lock:
                self.units.append({"unit": unit.name, "node_id": result["node_id"], "host": result["host"],
                                   "pid": result["pid"], "attempts": attempt, "bytes": result["bytes"],
                                   "seconds": round(result["seconds"], 4), "rss_start": result["rss_start"],
                                   "rss_peak": result["rss_peak"]})
            return
        raise WorkerFailed(f"unit {unit.name} failed on {self.opts.max_retries + 1} attempts (last: {last_error})",
                           hint="check the nodes (`ray status`; logs under /tmp/ray/session_latest/logs), then "
                                "rerun the same command: finished units are kept and verified")

    # -- the run ---------------------------------------------------------------------------------------------
    def run_units(self, out_dir: Path, units: list["Unit"], progress: ByteProgress, job: Job) -> None:
        """Run ``units`` (at most the in-flight cap at once) and call each one's ``on_result(result, tmp)``
        on the driver as it finishes (from a driver thread; callbacks must lock what they share). The pieces
        are ``out_dir/<unit>.<run>-<attempt>.tmp``; any of this run's left when it stops are deleted.

        Raises:
            Cancelled, WorkerFailed, and what the units raise (see :meth:`Executor.write_shards`).
        """
        if not units:
            return
        if self._cap is not None:  # inside a session: connected already
            self._run(Path(out_dir), units, progress, job, self._cap)
            return
        with self.session() as cap:
            self._run(Path(out_dir), units, progress, job, cap)

    @contextlib.contextmanager
    def session(self):
        """Stay connected to the cluster across several :meth:`run_units` calls (calibration runs one call
        per MoE layer); yields the cap on units in flight. Ray's driver prints the raylet's error messages (a
        worker died, ...) on sys.stdout, which belongs to the --json report: they go to stderr while connected;
        the connection is closed at the end (unless the caller had connected).

        Raises:
            UsageError: no cluster at the address, or resources it cannot give (see :meth:`_connect`).
        """
        if self._cap is not None:
            yield self._cap
            return
        with contextlib.redirect_stdout(sys.stderr):
            try:
                self._cap = self._connect()
                self.cluster["max_in_flight"] = self._cap
                yield self._cap
            finally:
                self._cap = None
                if self._connected_here:
                    self.ray.shutdown()

    def _run(self, out_dir: Path, units: list["Unit"], progress: ByteProgress, job: Job, cap: int) -> None:
        remote = self.ray.remote(unit_task).options(num_cpus=self.opts.cpus_per_task,
                                                    num_gpus=self.opts.gpus_per_task, max_retries=0,
                                                    num_returns="streaming")
        run_id = uuid.uuid4().hex
        fault = os.environ.get(FAULT_ENV)
        stop = threading.Event()
        in_flight = [0]
        pool = ThreadPoolExecutor(max_workers=cap, thread_name_prefix="ray-unit")
        try:
            futs = [pool.submit(self._run_unit, remote, run_id, job, u, out_dir, progress, fault, stop, in_flight)
                    for u in units]
            cancel.wait_all(futs)
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if stop.is_set():
                for p in out_dir.glob(f"*.{run_id[:8]}-*.tmp"):  # this run's pieces in flight
                    p.unlink(missing_ok=True)

    def write_shards(self, out_dir, shards, manifest, progress, *, job, metadata=None, on_extras=None):
        written: list[str] = []

        def committer(shard: OutShard):
            def on_result(result: dict, tmp: Path) -> None:
                commit_tmp(tmp, Path(out_dir) / shard.name)  # fsync, rename, directory fsync: a local commit
                with self._lock:
                    manifest.files[shard.name] = {"size": result["size"], "sha256": result["sha256"]}
                    manifest.save(Path(out_dir))
                    written.append(shard.name)
                if on_extras is not None and result.get("extras"):
                    on_extras(result["extras"])
            return on_result

        self.run_units(Path(out_dir), [Unit(s.name, metadata, committer(s)) for s in shards
                                       if s.name not in manifest.files], progress, job)
        return written

    def report(self) -> dict:
        nodes: dict[str, dict] = {}
        for u in self.units:
            n = nodes.setdefault(u["node_id"], {"node_id": u["node_id"], "host": u["host"], "units": [],
                                                "bytes": 0, "busy_seconds": 0.0, "rss_peak": 0})
            n["units"].append(u["unit"])
            n["bytes"] += u["bytes"]
            n["busy_seconds"] += u["seconds"]
            n["rss_peak"] = max(n["rss_peak"], u["rss_peak"])
        for n in nodes.values():
            n["busy_seconds"] = round(n["busy_seconds"], 3)
            n["mb_per_s"] = round(n["bytes"] / 1e6 / n["busy_seconds"], 2) if n["busy_seconds"] > 0 else None
        return {"backend": self.name, **self.cluster,
                "cpus_per_task": self.opts.cpus_per_task, "gpus_per_task": self.opts.gpus_per_task,
                "max_retries": self.opts.max_retries, "in_flight_max_seen": self.in_flight_max,
                "nodes_used": sorted(nodes.values(), key=lambda n: n["node_id"]), "units": self.units,
                "retries": self.retries}
