"""safetensors bytes: a validating header reader, ranged tensor reads, and a streaming shard writer.

Layout (https://github.com/huggingface/safetensors, README "Format"): an 8-byte little-endian u64 ``N``,
``N`` bytes of UTF-8 JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}}``,
space-padded to a multiple of 8), then the data buffer; offsets are relative to the buffer start and must
tile it exactly (no holes, no overlap).

Why our own code next to the ``safetensors`` library: the library's ``save_file`` needs every tensor of a
shard in memory at once, and its errors on a damaged file do not name the tensor. The writer here emits the
header first (computed from shapes) and then streams each tensor's bytes, so peak memory is one chunk, and
writes files byte-identical to ``safetensors.torch.save_file`` for the same tensors and metadata (tested).
Reading uses ``readinto`` on byte ranges; nothing is unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, UnsupportedError

# safetensors dtype name -> (torch dtype, bytes per element). Sub-byte types are refused: no DeepSeek V3/R1
# tensor uses them, and a converter must not guess at FP4 packing.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = (torch.float8_e8m0fnu, 1)

TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items()}

# Order of the Rust ``Dtype`` enum; ``save_file`` lays tensors out by this rank descending, then by name.
_DTYPE_RANK = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
               "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def dtype_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (``"BF16"`` -> 2)."""
    return DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: name, dtype (safetensors name), shape, absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SafetensorsHeader:
    """Parsed and validated header of one ``.safetensors`` file."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike, *, check_size: bool = True) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Checks: header length within the file and the library's limit; valid JSON object; every entry has a known
    dtype, a shape of non-negative ints and offsets consistent with ``numel * dtype_size``; the offsets tile the
    buffer exactly; the file is not shorter than the buffer (a truncated download).

    Raises:
        BadInputError: naming the file (and tensor) and what to do.
        UnsupportedError: a dtype dsconvert does not convert (e.g. sub-byte FP4).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInputError(f"{path}: file is {size} bytes, too short to be safetensors",
                                    hint="re-download this shard")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise BadInputError(f"{path}: header length {n} exceeds the file ({size} bytes); truncated or not "
                                    "a safetensors file", hint="re-download this shard")
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}", hint="check the path and permissions") from e
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: header is not valid JSON ({e})", hint="re-download this shard") from e
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: header is not a JSON object", hint="re-download this shard")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadInputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, info in obj.items():
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise BadInputError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from exc
        if dtype not in DTYPES:
            raise UnsupportedError(f"{path}: tensor {name!r} has dtype {dtype}, which dsconvert does not handle",
                                   hint="only F8_E4M3 weights with F32 scales and plain float/int tensors are "
                                        "supported; FP4/E8M0 layouts are refused rather than guessed")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise BadInputError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e):
            raise BadInputError(f"{path}: tensor {name!r}: bad data_offsets {[b, e]!r}")
        ent = TensorEntry(name, dtype, tuple(shape), data_start + b, data_start + e)
        if ent.numel * dtype_size(dtype) != ent.nbytes:
            raise BadInputError(f"{path}: tensor {name!r}: {dtype} {list(shape)} needs "
                                f"{ent.numel * dtype_size(dtype)} bytes but its offsets span {ent.nbytes}",
                                hint="the header does not match the data; re-download this shard")
        tensors[name] = ent
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes"
            raise BadInputError(f"{path}: tensor {name!r} {what} in the data buffer",
                                hint="the header is corrupt; re-download this shard")
        pos = e
    if check_size and data_start + pos > size:
        cut = next(name for b, e, name in spans if data_start + e > size)
        raise BadInputError(f"{path}: truncated: header promises {data_start + pos} bytes, file has {size}; tensor "
                            f"{cut!r} is cut off", hint="the download was cut short; re-download this shard")
    return SafetensorsHeader(path, meta, tensors, data_start, size)


def read_range(f, begin: int, nbytes: int) -> torch.Tensor:
    """Read ``nbytes`` at absolute offset ``begin`` of open binary file ``f`` into a fresh uint8 tensor."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        mv = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            k = os.preadv(f.fileno(), [mv[got:]], begin + got) if hasattr(os, "preadv") else None
            if k is None:
                f.seek(begin + got)
                k = f.readinto(mv[got:])
            if not k:
                raise BadInputError(f"{getattr(f, 'name', '?')}: unexpected end of file at byte {begin + got}",
                                    hint="the file is truncated; re-download it")
            got += k
    return buf


def read_tensor(f, entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or a row range ``[r0, r1)`` of its first axis) from open file ``f``.

    Returns a CPU tensor of the entry's dtype and shape (rows cropped), owning its memory.
    """
    torch_dtype, esz = DTYPES[entry.dtype]
    shape = list(entry.shape)
    begin, nbytes = entry.begin, entry.nbytes
    if rows is not None:
        r0, r1 = rows
        row_bytes = (entry.numel // shape[0] if shape[0] else 0) * esz
        begin, nbytes = entry.begin + r0 * row_bytes, (r1 - r0) * row_bytes
        shape[0] = r1 - r0
    raw = read_range(f, begin, nbytes)
    return raw.view(torch_dtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


@dataclass
class PlannedTensor:
    """A tensor the writer will emit: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


def layout_order(tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    """The order ``safetensors.torch.save_file`` lays tensors out in: dtype rank descending, then name."""
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK.index(t.dtype), t.name))


def build_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    """Serialise the header (length prefix included) for ``tensors`` in the given order."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    off = 0
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    js = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


@dataclass
class ShardWriter:
    """Write one safetensors file tensor by tensor, under ``<final>.tmp``, then fsync and rename.

    Usage::

        w = ShardWriter(final_path, planned, {"format": "pt"})
        for t in w.order:            # tensors must be fed in this order (save_file's unless keep_order)
            w.write(t.name, chunk)   # any number of chunks per tensor, bytes in row-major order
        w.commit()                   # checks every byte arrived; fsync; rename; returns (size, sha256)

    Raises ``RuntimeError`` on out-of-order or short writes (a bug, never user input). ``abort()`` deletes the
    temporary file. The sha256 is computed while writing, so resume checks cost no second read.
    """

    final_path: Path
    planned: list[PlannedTensor]
    metadata: dict[str, str] | None = None
    keep_order: bool = False  # True: lay tensors out as planned (e.g. a module's tensors adjacent)
    order: list[PlannedTensor] = field(init=False)

    def __post_init__(self):
        self.final_path = Path(self.final_path)
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.order = list(self.planned) if self.keep_order else layout_order(self.planned)
        names = [t.name for t in self.order]
        if len(set(names)) != len(names):
            raise RuntimeError(f"duplicate tensor names planned for {self.final_path.name}")
        self._f = open(self.tmp_path, "wb")
        self._sha = hashlib.sha256()
        self._idx = 0
        self._left = self.order[0].nbytes if self.order else 0
        self._put(build_header(self.order, self.metadata))
        self._skip_empty()

    def _put(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)

    def _skip_empty(self) -> None:
        while self._idx < len(self.order) and self._left == 0:
            self._idx += 1
            self._left = self.order[self._idx].nbytes if self._idx < len(self.order) else 0

    def write(self, name: str, data: torch.Tensor | bytes | memoryview | np.ndarray) -> None:
        """Append bytes of tensor ``name`` (a tensor chunk is written as its raw row-major bytes)."""
        if getattr(data, "numel", None) and data.numel() == 0 or (not isinstance(data, torch.Tensor) and len(data) == 0):
            return  # empty tensors occupy no bytes; nothing to check or write
        if self._idx >= len(self.order) or self.order[self._idx].name != name:
            expected = self.order[self._idx].name if self._idx < len(self.order) else "<end>"
            raise RuntimeError(f"{self.final_path.name}: got bytes for {name!r}, expected {expected!r}")
        if isinstance(data, torch.Tensor):
            mv = _tensor_bytes(data)
        elif isinstance(data, np.ndarray):
            mv = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        else:
            mv = memoryview(data).cast("B")
        if len(mv) > self._left:
            raise RuntimeError(f"{self.final_path.name}: {name!r} overflows its planned size")
        self._put(mv)
        self._left -= len(mv)
        self._skip_empty()

    def finish(self) -> tuple[int, str]:
        """Verify completeness, fsync and close the temporary file, without renaming it (a remote worker's
        piece, which the driver renames). Returns (file size in bytes, sha256)."""
        if self._idx < len(self.order):
            raise RuntimeError(f"{self.final_path.name}: tensor {self.order[self._idx].name!r} incomplete")
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell()
        self._f.close()
        return size, self._sha.hexdigest()

    def commit(self) -> tuple[int, str]:
        """Finish: verify completeness, fsync, rename to the final name. Returns (file size in bytes, sha256)."""
        size, digest = self.finish()
        os.replace(self.tmp_path, self.final_path)
        return size, digest

    def abort(self) -> None:
        """Close and delete the temporary file (the final name is never touched)."""
        try:
            self._f.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, bufsize: int = 16 << 20) -> str:
    """sha256 hex digest of a file, read in ``bufsize`` chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
