"""Resumable runs: each finished block is saved atomically, a killed run continues from the last.

The partial state of a run writing ``<output>`` lives in ``<output>.partial/``: ``fingerprint.json``
(what the run quantizes: a digest of the model weights and config, the GPTQ config, and the
calibration tokens) and an orbax ``CheckpointManager`` with one finished step per quantized block.
orbax finalizes a step only when it is fully written and the step's checksum table follows it, so
a SIGKILL at any point leaves every block whose table exists whole; a block killed between the two
(committed, no table) is removed on ``--resume`` and quantized again. ``--resume`` refuses a
partial state whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from gptq_jax import checkpoint

logger = logging.getLogger("gptq_jax")

_SAMPLE = 1 << 16  # elements hashed per large tensor (evenly strided): cheap for 70B models too


def _digest_array(h, a) -> None:
  a = np.asarray(a)
  h.update(f"{a.shape}{a.dtype}".encode())
  flat = a.reshape(-1)
  if flat.size > 4 * _SAMPLE:
    flat = flat[:: flat.size // _SAMPLE]
  h.update(np.ascontiguousarray(flat).tobytes())


def weights_digest(params: Any) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    h.update(jax.tree_util.keystr(path).encode())
    _digest_array(h, leaf)
  return h.hexdigest()[:32]


def calibration_digest(samples) -> str:
  """``samples``: ``(ids, mask)`` pairs, as ``pipeline.calib.normalize`` returns them."""
  h = hashlib.sha256()
  for ids, mask in samples:
    _digest_array(h, ids)
    _digest_array(h, mask)
  return h.hexdigest()[:32]


def fingerprint(params: Any, model_config: Any, quant_config: Any, samples) -> dict:
  qc = quant_config.to_dict()
  qc.pop("backend", None)  # how the result is run later does not change it
  return {
      "model": {"config": model_config.to_hf_dict(), "weights": weights_digest(params)},
      "quant_config": qc,
      "calibration": calibration_digest(samples),
  }


class ResumableRun:
  """The partial state of one run. ``resume=False`` refuses to touch an existing one.

  Nothing is written until the first block is saved, so a run that fails before quantizing
  (a bad flag, a missing eval text) leaves no ``.partial`` folder behind.
  """

  def __init__(self, output: str, fp: dict, resume: bool):
    self.output = os.path.abspath(output)
    self.partial = self.output + ".partial"
    self.blocks_dir = os.path.join(self.partial, "blocks")
    self.fp_file = os.path.join(self.partial, "fingerprint.json")
    self.fp = json.loads(json.dumps(fp, default=str))  # as it will read back
    if os.path.exists(self.output):
      raise FileExistsError(f"{self.output!r} already exists: choose another --output (nothing "
                            "was overwritten)")
    self.resuming = os.path.exists(self.fp_file)
    if not self.resuming:
      return
    if not resume:
      raise FileExistsError(
          f"an interrupted run left {self.partial!r}: pass --resume to continue it, or choose "
          "another --output (nothing was touched)")
    with open(self.fp_file) as f:
      saved = json.load(f)
    diff = [k for k in sorted(set(self.fp) | set(saved)) if self.fp.get(k) != saved.get(k)]
    if diff:
      raise ValueError(f"--resume refused: the interrupted run in {self.partial!r} quantized a "
                       f"different {' and '.join(diff)} (fingerprint mismatch); use the same "
                       "model, settings and calibration data, or another --output")

  def completed(self) -> list[tuple[int, Any, list[dict]]]:
    """The saved blocks 0..k-1 (contiguous from 0), as ``(i, block params, records)``."""
    if not self.resuming:
      return []
    out = []
    for i in range(self._usable()):
      tree, meta = checkpoint.read_tree(self.blocks_dir, i)
      out.append((i, tree, meta.get("records", [])))
    return out

  def _usable(self) -> int:
    """How many blocks (0..n-1) were saved to the end; a later step (a save killed after orbax
    committed it, before its checksum table was written, or one past a gap) is removed, so the
    block is quantized and saved again. Every process calls it at the same point."""
    listed = checkpoint.steps(self.blocks_dir)
    n = 0
    while n < len(listed) and listed[n] == n and checkpoint.step_complete(self.blocks_dir, n):
      n += 1
    stale = listed[n:]
    _sync(f"gptq_jax resume listed {self.blocks_dir}")  # every process listed before any removal
    if stale and jax.process_index() == 0:
      logger.warning("gptq_jax: block %d's save was interrupted (no checksum table): it is "
                     "quantized again", stale[0])
      for i in stale:
        shutil.rmtree(os.path.join(self.blocks_dir, str(i)))
    _sync(f"gptq_jax resume cleaned {self.blocks_dir}")
    return n

  def saved(self) -> "SavedBlocks":
    """``completed()`` without reading the blocks: a mapping ``i -> block`` that reads block
    ``i`` from disk each time it is asked for (nothing held in memory), and the records."""
    if not self.resuming:
      return SavedBlocks(self.blocks_dir, 0, [])
    n = self._usable()
    records = [r for i in range(n) for r in checkpoint.read_meta(self.blocks_dir, i).get(
        "records", [])]
    return SavedBlocks(self.blocks_dir, n, records)

  def save_block(self, i: int, block: Any, records: list[dict]) -> None:
    if not os.path.exists(self.fp_file) and jax.process_index() == 0:
      # first save: the fingerprint goes first, atomically (one writer under jax.distributed;
      # the block itself is an orbax save every process takes part in)
      os.makedirs(self.partial, exist_ok=True)
      tmp = self.fp_file + ".tmp"
      with open(tmp, "w") as f:
        json.dump(self.fp, f, indent=2, sort_keys=True)
      os.replace(tmp, self.fp_file)
    checkpoint.write_tree(self.blocks_dir, i, block, {"records": records})

  def finish(self) -> None:
    shutil.rmtree(self.partial, ignore_errors=True)


def _sync(name: str) -> None:
  """A barrier of every process under ``jax.distributed`` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


class SavedBlocks(Mapping):
  """Blocks ``0 .. count - 1`` of an interrupted run, read from ``blocks_dir`` on access."""

  def __init__(self, blocks_dir: str, count: int, records: list[dict]):
    self.blocks_dir, self.count, self.records = blocks_dir, count, records

  def __getitem__(self, i: int) -> Any:
    if not (isinstance(i, int) and 0 <= i < self.count):
      raise KeyError(i)
    return checkpoint.read_tree(self.blocks_dir, i)[0]

  def __iter__(self):
    return iter(range(self.count))

  def __len__(self) -> int:
    return self.count
