"""Progress of the work after the blocks (evaluation, the checkpoint, the export, the samples):
no phase that takes more than a few seconds runs silently."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gptq_jax.pipeline.progress import _fmt


class Phase:
  """Lines like ``[evaluation] 3/8 slices of the vocabulary, 12s elapsed ETA 20s`` on stderr: one
  when the phase starts, then one at most every ``every`` seconds, and one when it ends."""

  def __init__(self, name: str, total: int, unit: str, enabled: bool = True,
               every: float = 5.0, stream: TextIO | None = None, clock=time.perf_counter):
    self.name, self.total, self.unit, self.enabled = name, max(1, total), unit, enabled
    self.every, self.stream, self.clock = every, stream or sys.stderr, clock
    self.t0 = self.last = clock()
    self._write(f"[{name}] 0/{self.total} {unit} ...")

  def _write(self, text: str) -> None:
    if self.enabled:
      self.stream.write(text + "\n")
      self.stream.flush()

  def update(self, done: int) -> None:
    """``done`` of ``total`` steps finished."""
    now = self.clock()
    if done < self.total and now - self.last < self.every:
      return
    self.last = now
    elapsed = now - self.t0
    eta = "" if done >= self.total else f" ETA {_fmt(elapsed / max(done, 1) * (self.total - done))}"
    self._write(f"[{self.name}] {done}/{self.total} {self.unit}, {_fmt(elapsed)} elapsed{eta}")


def say(text: str, enabled: bool = True) -> None:
  """One line for a phase that has no steps to count (a load, a generation)."""
  if enabled:
    print(text, file=sys.stderr, flush=True)
