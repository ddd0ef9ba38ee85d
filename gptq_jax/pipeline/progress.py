"""A progress line per block: bar, elapsed time, ETA, and the running layer loss."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class BlockProgress:
  """Prints ``[block 3/30] ######---- 10% 12s elapsed ETA 1m48s | mlp.up_proj loss 0.0123``."""

  def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None,
               width: int = 24):
    self.total, self.enabled, self.width = total, enabled, width
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()
    self.done = 0
    self.first = 0
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def skip(self, n: int) -> None:
    """Blocks already done (resume): they do not count towards the ETA."""
    self.done = self.first = n

  def update(self, block: int, layer: str = "", loss: float | None = None,
             finished: bool = False) -> None:
    if finished:
      self.done = block + 1
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.t0
    frac = self.done / self.total
    worked = self.done - self.first
    eta = elapsed / worked * (self.total - self.done) if worked else float("nan")
    bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
    line = (f"[block {min(block + 1, self.total)}/{self.total}] {bar} {frac:4.0%} "
            f"{_fmt(elapsed)} elapsed ETA {_fmt(eta) if worked else '?'}")
    if layer:
      line += f" | {layer} loss {loss:.4g}" if loss is not None else f" | {layer}"
    if self._tty:
      self.stream.write("\r" + line.ljust(110) + ("\n" if finished and self.done == self.total
                                                  else ""))
    elif finished:
      self.stream.write(line + "\n")
    self.stream.flush()
