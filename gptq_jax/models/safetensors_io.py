"""Memory-mapped reading of safetensors files (one tensor at a time), bfloat16 included.

The format: 8 bytes little-endian header length N, N bytes of JSON `{name: {dtype, shape,
data_offsets: [begin, end]}}` (plus an optional "__metadata__"), then the raw little-endian data.
Reading a tensor maps only its bytes, so one layer of a model larger than RAM can be read alone.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
  """Lazy reader: `.keys()`, `.shape(name)`, `.get(name) -> np.ndarray` (a read-only mmap view)."""

  def __init__(self, path: str | os.PathLike):
    from gptq_jax.integrity import DamagedFileError  # noqa: PLC0415

    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise DamagedFileError(self.path, "not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw)
      if n > os.path.getsize(self.path) - 8:
        raise DamagedFileError(self.path, f"truncated or damaged safetensors file: its header "
                               f"length {n} exceeds the file's {os.path.getsize(self.path)} bytes")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(self.path, f"not a safetensors file, or a damaged one (bad header: {e})") from None
    header.pop("__metadata__", None)
    self._header = header
    self._data_start = 8 + n
    _check_size(self.path, header, self._data_start)
    self._mmap: np.memmap | None = None

  def keys(self) -> list[str]:
    return list(self._header)

  def __contains__(self, name: str) -> bool:
    return name in self._header

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

  def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a tensor (along its first axis), read with ``os.pread`` into a fresh
    array: no page of the file is mapped, so reading a large embedding a chunk at a time never
    holds more than the chunk."""
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    shape = info["shape"]
    lo, hi = max(0, lo), min(hi, shape[0])
    dtype = np.dtype(_DTYPES[info["dtype"]])
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    begin = self._data_start + info["data_offsets"][0] + lo * row
    out = np.empty((max(0, hi - lo), *shape[1:]), dtype)
    buf = out.reshape(-1).view(np.uint8)
    with open(self.path, "rb", buffering=0) as f:
      done = 0
      while done < buf.size:
        n = os.preadv(f.fileno(), [buf[done:]], begin + done)
        if n <= 0:
          raise OSError(f"{self.path}: short read of tensor {name!r}")
        done += n
    return out

  def close(self) -> None:
    self._mmap = None


def _check_size(path: str, header: dict, data_start: int) -> None:
  """A truncated file names itself here, not later as a reshape error deep in a loader."""
  from gptq_jax.integrity import DamagedFileError  # noqa: PLC0415

  try:
    need = data_start + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
  except (KeyError, TypeError, ValueError, IndexError):
    raise DamagedFileError(path, "damaged safetensors header (a tensor without data_offsets)") from None
  size = os.path.getsize(path)
  if size < need:
    raise DamagedFileError(path, f"truncated safetensors file: {size} bytes, its header needs {need}")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (bfloat16 included) as one safetensors file, tensors in name order."""
  names = sorted(tensors)
  inverse = {np.dtype(v): k for k, v in _DTYPES.items()}
  header: dict = {"__metadata__": metadata} if metadata else {}
  offset = 0
  arrays = []
  for name in names:
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in inverse:
      raise ValueError(f"cannot save tensor {name!r} of dtype {a.dtype} as safetensors")
    header[name] = {"dtype": inverse[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
