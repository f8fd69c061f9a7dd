"""Every dsconvert command on a checkpoint with the release's real tensor dimensions, next to the I/O floor and
llama.cpp's ``llama_model_quantize``, measured in the same run.

The fixture is ``dsconvert make-fixture --preset real`` (default: layer 0 dense + layer 1 MoE with all 256 experts,
no MTP, ~15.8 GB); ``--experts 32`` etc. scale it down. Each command runs as a subprocess with a time cap
(``--cap`` seconds; SIGINT, then SIGKILL 10 s later) while this process polls ``/proc`` for the resident memory of
the whole process tree. Printed per command: status (ok / CAPPED / rc), wall seconds, peak tree RSS, source bytes
per second, the extrapolation to the release (688.6 GB of FP8 at the same bytes/s; a capped command's figure is a
lower bound), and the durable I/O floor for that command's bytes (read all input + write + fsync its output size,
rates measured here first). For the GGUF types, llama.cpp quantizes a BF16 GGUF of the same tensors (written by
``dsconvert gguf --type BF16``) with the same thread count; the ratio ours / llama.cpp is printed.

``--arch v4``: the fixture is ``make-fixture --arch v4 --preset real`` (V4-Flash dimensions; default layer 0
sliding + hash-routed, layer 1 CSA + routed, 256 FP4 experts each, ~9 GB) and the commands are inspect,
fp8-to-bf16, quantize W4A16 RTN, quantize --preset experts-mxfp4, gguf Q8_0 and logits on 16 tokens. Each
command's ``--dry-run`` peak-memory estimate is printed next to the measured peak, and the extrapolation is to
V4-Flash (43 layers + MTP: the bytes of its full layout at the command's bytes/s; the dry-run estimate on a
headers-only copy of the full layout for memory).

Usage: python bench/bench_real_size.py [--arch v3|v4] [--experts 32] [--cap 600] [--only inspect,fp8-to-bf16,...]
[--work DIR]. No assertions: figures only. Scratch goes under ``--work`` (default /tmp/dsconvert-real) and is
deleted per command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE_BYTES = 688_574_839_360
COMMANDS = ["inspect", "fp8-to-bf16", "rtn-ct", "rtn-awq", "rtn-gptq", "gptq", "awq", "gguf-Q8_0", "gguf-Q4_K_M",
            "gguf-Q2_K", "validate", "logits"]
V4_COMMANDS = ["inspect", "fp8-to-bf16", "rtn-w4a16", "mxfp4", "gguf-Q8_0", "logits"]


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(parts[1]), []).append(int(d))
            rss[int(d)] = int(parts[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += kids.get(p, [])
    return total


def run(argv: list[str], cap: float) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, capped, killed_at = 0, False, None
    while p.poll() is None:
        peak = max(peak, tree_rss(p.pid))
        el = time.perf_counter() - t
        if el > cap and not capped:
            capped = True
            p.send_signal(signal.SIGINT)
            killed_at = el
        if capped and el > killed_at + 10:
            p.kill()
        time.sleep(0.25)
    err = p.stderr.read() if p.stderr else ""
    return {"wall": time.perf_counter() - t, "peak": peak, "rc": p.returncode, "capped": capped, "stderr": err}


def remove(path: Path) -> None:
    """Delete ``path`` and its siblings named ``path.*`` (resume state and temp files of a capped run)."""
    for p in [path, *path.parent.glob(path.name + ".*"), *path.parent.glob("." + path.name + "*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def io_floor(src: Path, work: Path, probe_bytes: int = 1 << 30) -> tuple[float, float]:
    """(read B/s of all of SRC's shards, durable write B/s of ``probe_bytes`` with fsync)."""
    t = time.perf_counter()
    n = 0
    buf = bytearray(16 << 20)
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    read_rate = n / (time.perf_counter() - t)
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "io-probe"
    t = time.perf_counter()
    with open(probe, "wb") as fh:
        for _ in range(probe_bytes // len(buf)):
            fh.write(buf)
        fh.flush()
        os.fsync(fh.fileno())
    write_rate = probe_bytes / (time.perf_counter() - t)
    probe.unlink()
    return read_rate, write_rate


def llama_quantize(src: Path, dst: Path, ftype: str, nthread: int, cap: float) -> float | None:
    """Seconds for llama.cpp to quantize ``src`` (a BF16 GGUF) to ``ftype`` in a subprocess, or None if capped."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype}\n"
        f"p.nthread = {nthread}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")
    r = run([sys.executable, "-c", code, str(src), str(dst)], cap)
    dst.unlink(missing_ok=True)
    return None if r["capped"] or r["rc"] != 0 else r["wall"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("v3", "v4"), default="v3")
    ap.add_argument("--fixture", type=Path, help="reuse this real-preset fixture (built if absent)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--cap", type=float, default=600, help="seconds per command before SIGINT")
    ap.add_argument("--only", help="comma-separated commands (default: all of the arch's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsconvert-real"))
    ap.add_argument("--no-llama", action="store_true", help="skip llama_model_quantize")
    args = ap.parse_args()
    if args.arch == "v4":
        return main_v4(args)
    dsc = [sys.executable, "-m", "dsconvert.cli"]
    work = args.work
    src = args.fixture or work / f"real-{args.layers}L{args.dense_layers}D-{args.experts}E{'-mtp' if args.mtp else ''}"
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, threads {args.threads}")
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        r = run(dsc + ["make-fixture", str(src), "--preset", "real", "--layers", str(args.layers), "--dense-layers",
                       str(args.dense_layers), "--experts", str(args.experts),
                       "--mtp" if args.mtp else "--no-mtp"], 3600)
        if r["rc"] != 0:
            raise SystemExit(f"make-fixture failed: {r['stderr'][-2000:]}")
        print(f"built {src.name} in {r['wall']:.1f} s (peak RSS {r['peak'] / 2**30:.2f} GiB)")
    src_bytes = du(src)
    print(f"fixture {src}: {src_bytes / 1e9:.2f} GB; release {RELEASE_BYTES / 1e9:.1f} GB "
          f"(x{RELEASE_BYTES / src_bytes:.0f})")
    rd, wr = io_floor(src, work)
    print(f"I/O floor: read {rd / 1e9:.2f} GB/s (page cache may hold the fixture), durable write {wr / 1e9:.2f} GB/s")
    cal = ["--num-samples", "4", "--seq-len", "64"]
    out = work / "out"
    bf16 = work / "bf16"
    plan = {
        "inspect": (dsc + ["inspect", str(src)], None),
        "fp8-to-bf16": (dsc + ["fp8-to-bf16", str(src), "-o", str(bf16)], bf16),
        "rtn-ct": (dsc + ["quantize", str(src), "-o", str(out), "--format", "compressed-tensors"], out),
        "rtn-awq": (dsc + ["quantize", str(src), "-o", str(out), "--format", "awq"], out),
        "rtn-gptq": (dsc + ["quantize", str(src), "-o", str(out), "--format", "gptq"], out),
        "gptq": (dsc + ["quantize", str(src), "-o", str(out), "--gptq", "--format", "gptq", *cal], out),
        "awq": (dsc + ["quantize", str(src), "-o", str(out), "--awq", "--format", "awq", *cal], out),
        "gguf-Q8_0": (dsc + ["gguf", str(src), "-o", str(out) + ".gguf", "--type", "Q8_0"], Path(str(out) + ".gguf")),
        "gguf-Q4_K_M": (dsc + ["gguf", str(src), "-o", str(out) + ".gguf", "--type", "Q4_K_M"],
                        Path(str(out) + ".gguf")),
        "gguf-Q2_K": (dsc + ["gguf", str(src), "-o", str(out) + ".gguf", "--type", "Q2_K"], Path(str(out) + ".gguf")),
        "validate": (dsc + ["validate", str(bf16), "--reference", str(src), "--num-samples", "1", "--seq-len", "16"],
                     None),
        "logits": (dsc + ["logits", str(src), "--token-ids", "0,5,6,7", "-o", str(work / "logits.npy")],
                   work / "logits.npy"),
    }
    only = [c for c in (args.only or ",".join(COMMANDS)).split(",") if c]
    if "validate" in only and "fp8-to-bf16" not in only and not (bf16 / "config.json").is_file():
        print("validate needs the fp8-to-bf16 output: running fp8-to-bf16 first")
        only.insert(0, "fp8-to-bf16")
    print(f"{'command':12s} {'status':>7s} {'wall s':>8s} {'peak GiB':>8s} {'MB/s in':>8s} {'floor s':>8s} "
          f"{'vs floor':>8s} {'release h':>9s} {'llama.cpp s':>11s} {'vs llama':>8s}")
    for name in only:
        argv, produced = plan[name]
        if produced is not None and name != "validate":
            remove(produced)
        r = run(argv, args.cap)
        status = "CAPPED" if r["capped"] else ("ok" if r["rc"] == 0 else f"rc={r['rc']}")
        written = du(produced) if produced is not None else 0
        floor = src_bytes / rd + written / wr if produced is not None else src_bytes / rd
        rate = src_bytes / r["wall"]
        release_h = RELEASE_BYTES / rate / 3600
        llama_s = ratio = ""
        if name.startswith("gguf-") and not args.no_llama and not r["capped"] and r["rc"] == 0:
            ref = work / "ref-bf16.gguf"
            if not ref.is_file():
                rb = run(dsc + ["gguf", str(src), "-o", str(ref), "--type", "BF16"], 3 * args.cap)
                if rb["rc"] != 0:
                    ref = None
            if ref is not None:
                ls = llama_quantize(ref, work / "llama.gguf", name.split("-", 1)[1], args.threads, args.cap)
                llama_s = "capped" if ls is None else f"{ls:.1f}"
                ratio = "" if ls is None else f"{ls / r['wall']:.2f}x"
        print(f"{name:12s} {status:>7s} {r['wall']:8.1f} {r['peak'] / 2**30:8.2f} {rate / 1e6:8.0f} {floor:8.1f} "
              f"{r['wall'] / floor:7.2f}x {release_h:8.1f}{'+' if r['capped'] else ' '} {llama_s:>11s} {ratio:>8s}",
              flush=True)
        if r["rc"] not in (0, None) and not r["capped"]:
            print("   " + r["stderr"].strip().splitlines()[-1][:200] if r["stderr"].strip() else "   (no stderr)")
        if produced is not None and name != "fp8-to-bf16":
            remove(produced)
    print("'vs floor' = wall / (read all input + write the output durably at this run's rates); 'release h' = "
          "688.6 GB at this command's source bytes/s ('+': capped, a lower bound); 'vs llama' = llama.cpp's "
          "seconds / ours (>= 1 means we are as fast), same thread count, llama.cpp reading a BF16 GGUF.")
    remove(bf16)
    remove(work / "ref-bf16.gguf")


def dry_run_peak(argv: list[str]) -> int | None:
    """The ``--dry-run --json`` peak-memory estimate (bytes) of a dsconvert command, or None if it gives none."""
    r = subprocess.run(argv + ["--dry-run", "--json"], cwd=ROOT, capture_output=True, text=True)
    try:
        est = json.loads(r.stdout)["plan"].get("peak_memory_estimate")
    except (ValueError, KeyError):
        return None
    return est["bytes"] if est else None


def main_v4(args) -> None:
    """``--arch v4``: the V4-Flash real-dimension fixture through the V4 commands (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from dsconvert.testing.deepseek_v4 import flash_spec, write_v4_headers_only
    from dsconvert.testing.realsize_v4 import flash_release_bytes

    release = flash_release_bytes()
    dsc = [sys.executable, "-m", "dsconvert.cli"]
    work = args.work
    src = args.fixture or work / f"real-v4-{args.layers}L-{args.experts}E{'-mtp' if args.mtp else ''}"
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        r = run(dsc + ["make-fixture", str(src), "--arch", "v4", "--preset", "real", "--layers", str(args.layers),
                       "--experts", str(args.experts), "--mtp" if args.mtp else "--no-mtp"], 3600)
        if r["rc"] != 0:
            raise SystemExit(f"make-fixture failed: {r['stderr'][-2000:]}")
        print(f"built {src.name} in {r['wall']:.1f} s (peak RSS {r['peak'] / 2**30:.2f} GiB)")
    src_bytes = du(src)
    print(f"fixture {src}: {src_bytes / 1e9:.2f} GB; V4-Flash {release / 1e9:.1f} GB (x{release / src_bytes:.0f})")
    full = work / "flash-headers"
    if not (full / "config.json").is_file():
        write_v4_headers_only(full, flash_spec())
    out, bf16 = work / "out", work / "bf16"
    ids = ",".join(str(i) for i in range(5, 21))  # 16 tokens
    plan = {
        "inspect": (["inspect", "{src}"], None),
        "fp8-to-bf16": (["fp8-to-bf16", "{src}", "-o", str(bf16)], bf16),
        "rtn-w4a16": (["quantize", "{src}", "-o", str(out), "--scheme", "W4A16"], out),
        "mxfp4": (["quantize", "{src}", "-o", str(out), "--preset", "experts-mxfp4"], out),
        "gguf-Q8_0": (["gguf", "{src}", "-o", str(out) + ".gguf", "--type", "Q8_0"], Path(str(out) + ".gguf")),
        "logits": (["logits", "{src}", "--token-ids", ids, "-o", str(work / "logits.npy")], work / "logits.npy"),
    }
    print(f"{'command':12s} {'status':>7s} {'wall s':>8s} {'peak GiB':>8s} {'est GiB':>8s} {'est/peak':>8s} "
          f"{'MB/s in':>8s} {'Flash h':>8s} {'Flash est GiB':>13s}")
    for name in [c for c in (args.only or ",".join(V4_COMMANDS)).split(",") if c]:
        tmpl, produced = plan[name]
        argv = dsc + [str(src) if a == "{src}" else a for a in tmpl]
        est = dry_run_peak(argv) if name != "inspect" else None
        est_full = dry_run_peak(dsc + [str(full) if a == "{src}" else a for a in tmpl]) if est else None
        if produced is not None:
            remove(produced)
        r = run(argv, args.cap)
        status = "CAPPED" if r["capped"] else ("ok" if r["rc"] == 0 else f"rc={r['rc']}")
        rate = src_bytes / r["wall"]
        e = f"{est / 2**30:8.2f} {est / max(r['peak'], 1):8.2f}" if est else f"{'-':>8s} {'-':>8s}"
        ef = f"{est_full / 2**30:13.2f}" if est_full else f"{'-':>13s}"
        print(f"{name:12s} {status:>7s} {r['wall']:8.1f} {r['peak'] / 2**30:8.2f} {e} {rate / 1e6:8.0f} "
              f"{release / rate / 3600:7.2f}{'+' if r['capped'] else ' '} {ef}", flush=True)
        if r["rc"] not in (0, None) and not r["capped"]:
            print("   " + r["stderr"].strip().splitlines()[-1][:200] if r["stderr"].strip() else "   (no stderr)")
        if produced is not None:
            remove(produced)
    print("'est' = the command's --dry-run peak-memory estimate on this fixture; 'Flash h' = V4-Flash's bytes at "
          "this command's source bytes/s ('+': capped, a lower bound); 'Flash est' = the dry-run estimate on a "
          "headers-only copy of V4-Flash's full layout.")
    remove(bf16)


if __name__ == "__main__":
    main()
