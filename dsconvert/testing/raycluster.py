"""A throw-away Ray cluster on 127.0.0.1 for the tests and the bench: a head and N worker nodes, each a
``ray start --block`` process of its own session, started and stopped here.

Every node gets ``--num-cpus`` (1 by default) and a small object store; the head has no dashboard. Stopping
sends SIGTERM to each ``ray start --block`` process (which stops the node's raylet, GCS, ...) and, after a
grace period, SIGKILL to its process group: only processes this object started are signalled. The node
processes inherit ``PYTHONPATH`` from the caller, so the workers import the same ``dsconvert``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    """``with LocalCluster(workers=2) as c: ... c.address ...``; ``c.kill_node(i)`` stops worker node ``i``.

    Args:
        workers: worker nodes besides the head.
        cpus: ``--num-cpus`` of every node (the head included).
        head_cpus: ``--num-cpus`` of the head (default ``cpus``; 0 keeps tasks off the head).
        start_timeout: seconds to wait for each node.

    Raises:
        RuntimeError: a node did not start within ``start_timeout`` (its log tail in the message).
    """

    def __init__(self, workers: int = 2, cpus: int = 1, head_cpus: int | None = None,
                 start_timeout: float = 90.0):
        self.workers = workers
        self.cpus = cpus
        self.head_cpus = cpus if head_cpus is None else head_cpus
        self.start_timeout = start_timeout
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="dsray-", dir="/tmp"))  # short: unix socket paths are limited
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        f = open(log, "wb")
        p = subprocess.Popen([_ray_bin(), "start", *args, "--object-store-memory", str(80 * 10**6),
                              "--disable-usage-stats", "--block"], stdout=f, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True)
        f.close()
        self.procs.append(p)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return p
            if p.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"ray start {' '.join(args)} did not come up:\n{log.read_text(errors='replace')[-2000:]}")

    def start(self) -> "LocalCluster":
        try:
            self._start(["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                         "--include-dashboard=false", f"--temp-dir={self.tmp}", "--node-ip-address=127.0.0.1"],
                        self.tmp / "head.log")
            for i in range(self.workers):
                self.add_node(i)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, i: int) -> subprocess.Popen:
        """Start worker node ``i`` (another ``ray start --address``)."""
        return self._start([f"--address={self.address}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                            "--node-ip-address=127.0.0.1"], self.tmp / f"worker{i}.log")

    def worker_pids(self) -> list[int]:
        """PIDs of the Ray worker processes (``ray::...``) running under this cluster's nodes."""
        import psutil

        pids = []
        for p in self.procs:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    try:
                        if c.name().startswith("ray::") or "default_worker.py" in " ".join(c.cmdline()):
                            pids.append(c.pid)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
        return pids

    def stop(self, grace: float = 30.0) -> None:
        """Stop every node this object started (SIGTERM, then SIGKILL to its process group) and delete the
        cluster's temporary directory (session files and logs)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, grace - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the node's own processes (the group this Popen started)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)  # the nodes' session directories and logs

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
