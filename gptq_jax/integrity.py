"""Damaged files: one clear error, and a clean exit for the command-line tools.

``DamagedFileError(path, what)`` reads ``"<path>: <what is wrong>"``; the CLIs print it as one
``error: ...`` line and exit with status 2 through ``exit_with_error``, which flushes and leaves with
``os._exit``: orbax keeps asyncio loops in background threads, and when a restore failed midway
their pending callbacks fire during interpreter teardown and print ``RuntimeError: Event loop is
closed`` tracebacks after the error line. Nothing useful runs at exit in these tools, so skipping
the teardown is safe.

orbax's own files carry no checksum of the array bytes (a flipped byte in an uncompressed chunk
reads back silently), so ``write_checksums`` records the size and SHA-256 of every file of a saved
step and ``verify_checksums`` checks them before anything is restored; a step written before this
existed (no checksum file) is read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import NoReturn

CHECKSUMS = "gptq_jax_checksums.json"
_CHUNK = 1 << 22


class DamagedFileError(ValueError):
  """A file that exists but cannot be what it claims to be (truncated, bytes changed, bad header)."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    super().__init__(f"{path}: {what}")


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names if n != CHECKSUMS]
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  """Record ``{relative path: [size, sha256]}`` of every file under ``step_dir`` (atomically)."""
  table = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> bool:
  """Raise ``DamagedFileError`` naming the first file that is missing, truncated, grown or changed;
  False when the step has no checksum file (written before checksums existed), True when it passes."""
  table_path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(table_path):
    return False
  try:
    with open(table_path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise DamagedFileError(table_path, f"unreadable checksum table ({e})") from None
  for rel, (size, digest) in sorted(table.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      raise DamagedFileError(path, "missing (listed in the checkpoint's checksums)")
    actual = os.path.getsize(path)
    if actual != size:
      what = "truncated" if actual < size else "longer than written"
      raise DamagedFileError(path, f"{what}: {actual} bytes, {size} when it was saved")
    if _sha256(path) != digest:
      raise DamagedFileError(path, "bytes changed since it was saved (SHA-256 mismatch)")
  return True


def exit_with_error(message: str, status: int = 2) -> NoReturn:
  """Print ``error: <message>`` as the last line on stderr and exit now (see the module doc)."""
  line = " ".join(str(message).split())  # one line, whatever the message held
  try:
    sys.stdout.flush()
  finally:
    print(f"error: {line}", file=sys.stderr, flush=True)
    os._exit(status)
