"""llama.cpp's importance-matrix files: the GGUF imatrix current llama.cpp writes and the legacy ``.dat``.

Reading gives ``{tensor name: float32 [n_mat, n_per_row]}`` of mean squared activations, exactly as llama-quantize's
``load_imatrix`` derives them; writing produces the bytes llama-imatrix's ``save_imatrix`` /
``save_imatrix_legacy`` write. Source: llama.cpp ``tools/imatrix/imatrix.cpp`` and ``tools/quantize/quantize.cpp``;
docs/gguf-deepseek2.md §6.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ..errors import BadInputError


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Read llama.cpp's importance matrix: ``imatrix.gguf`` or the legacy ``.dat`` format.

    Returns ``{tensor name: float32 [n_mat, n_per_row]}`` of mean squared activations, as llama-quantize's
    ``load_imatrix`` computes them (GGUF: ``in_sum2 / counts``, 1 where a matrix got no input; legacy:
    ``values / ncall``).

    Raises:
        BadInputError: unreadable, truncated or inconsistent file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BadInputError(f"--imatrix {path}: {e.strerror}") from e
    try:
        if magic == b"GGUF":
            return _imatrix_gguf(path)
        return _imatrix_legacy(path)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
        raise BadInputError(f"--imatrix {path}: not a llama.cpp imatrix ({type(e).__name__}: {e})",
                            hint="pass the imatrix.gguf (or legacy .dat) written by llama-imatrix") from e


def _imatrix_gguf(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise BadInputError(f"--imatrix {path}: {name} has no matching {base}.counts")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        counts = np.asarray(c.data, dtype=np.float32).reshape(-1)
        if counts.size != sums.shape[0]:
            raise BadInputError(f"--imatrix {path}: {base}: {counts.size} counts for {sums.shape[0]} matrices")
        e = np.ones_like(sums)
        ok = counts > 0
        e[ok] = sums[ok] / counts[ok, None]
        out[base] = e
    if not out:
        raise BadInputError(f"--imatrix {path}: a GGUF without any *.in_sum2 tensors is not an imatrix")
    return out


def _imatrix_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt_n: int, dtype) -> np.ndarray:
        nonlocal pos
        nb = np.dtype(dtype).itemsize * fmt_n
        if pos + nb > len(data):
            raise BadInputError(f"--imatrix {path}: truncated at byte {pos}")
        a = np.frombuffer(data, dtype=dtype, count=fmt_n, offset=pos)
        pos += nb
        return a

    n = int(take(1, "<i4")[0])
    if n <= 0 or n > 1_000_000:
        raise BadInputError(f"--imatrix {path}: implausible entry count {n} (neither GGUF nor legacy .dat)")
    out = {}
    for _ in range(n):
        ln = int(take(1, "<i4")[0])
        name = take(ln, np.uint8).tobytes().decode("utf-8")
        ncall, nval = (int(v) for v in take(2, "<i4"))
        vals = take(nval, "<f4").astype(np.float32)
        out[name] = (vals / ncall if ncall > 0 else vals).reshape(1, -1)
    return out


def write_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], datasets: list[str],
               chunk_count: int, chunk_size: int) -> None:
    """Write ``entries`` (``{GGUF tensor name: (sums float32 [n_mat, ne0], counts float32 [n_mat])}``) to
    ``path`` as llama.cpp's GGUF imatrix: ``<name>.in_sum2`` ``[n_mat, ne0]`` and ``<name>.counts`` ``[n_mat, 1]``
    float32, keys ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``.
    Plain write: the caller owns the temporary name and the rename."""
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, (v, c) in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(v, np.float32))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(c.reshape(-1, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def legacy_imatrix_bytes(entries: dict[str, tuple[np.ndarray, np.ndarray]], chunk_count: int, chunk_size: int,
                         dataset: str) -> bytes:
    """The legacy ``.dat`` imatrix: ``int32 n``, then per entry ``int32 len, name, int32 ncall, int32 nval,
    float32[nval] (sum / count) * ncall`` (1 where a matrix has count 0), then ``int32 chunk_count, int32 len,
    dataset``. Entries with every count 0 are left out (as llama-imatrix does)."""
    parts, n = [], 0
    for name, (v, c) in entries.items():
        if not (c > 0).any():
            continue
        n += 1
        ncall = int((int(c.max()) + chunk_size - 1) // chunk_size)
        per = v.reshape(c.size, -1).astype(np.float32)
        cnt = c.astype(np.float32)[:, None]
        vals = np.where(cnt == 0, np.float32(1), per / np.where(cnt == 0, np.float32(1), cnt)) * np.float32(ncall)
        b = name.encode()
        parts += [np.int32(len(b)).tobytes(), b, np.array([ncall, per.size], np.int32).tobytes(),
                  vals.astype(np.float32).tobytes()]
    d = dataset.encode()
    return b"".join([np.int32(n).tobytes(), *parts, np.int32(chunk_count).tobytes(), np.int32(len(d)).tobytes(), d])
