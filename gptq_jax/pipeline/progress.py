"""A progress line per block: bar, elapsed time, ETA, and the running layer loss."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class BlockProgress:
  """A line per block, e.g. ``[block 2/29] ###----- 10% 12s elapsed ETA 1m48s | mlp.up_proj
  loss 0.0123``: blocks are numbered from 0, as in the tensor names (``model.layers.2``), the
  report and its plot; the line shows the block over the last block's number. While a
  mixture-of-experts layer's experts are solved, ``| experts 12/32
  experts.gate_proj+experts.up_proj``, and the finished line of a sparse block says how many
  experts it quantized.

  On a terminal the line is redrawn after each layer (the layer just quantized and its GPTQ loss)
  and kept when the block finishes; elsewhere (a log file, a pipe) one line per finished block is
  written, ending with the block's largest layer loss. The ETA counts only blocks quantized in
  this run (a resumed run's skipped blocks took no time) and, from the second one on, leaves out
  the first (it includes compilation).
  """

  def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None,
               width: int = 24, clock=time.perf_counter):
    self.total, self.enabled, self.width, self.clock = total, enabled, width, clock
    self.stream = stream or sys.stderr
    self.t0 = clock()
    self.done = 0
    self.first = 0
    self.t_first: float | None = None  # when the first block of this run finished
    self.worst: tuple[str, float] | None = None  # the current block's largest layer loss
    self.experts: tuple[int, int] | None = None  # (experts done, per projection) in this block
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def skip(self, n: int) -> None:
    """Blocks already done (resume): they do not count towards the ETA."""
    self.done = self.first = n

  def update(self, block: int, layer: str = "", loss: float | None = None,
             finished: bool = False, experts: tuple[int, int] | None = None) -> None:
    if experts is not None:
      self.experts = experts
    if loss is not None and math.isfinite(loss) and (self.worst is None or loss > self.worst[1]):
      self.worst = (layer, loss)
    if finished:
      self.done = block + 1
      if self.t_first is None:
        self.t_first = self.clock()
    if self.enabled and (finished or self._tty):
      self.stream.write(self.line(block, layer, loss, finished))
      self.stream.flush()
    if finished:
      self.worst = self.experts = None

  def line(self, block: int, layer: str, loss: float | None, finished: bool) -> str:
    elapsed = self.clock() - self.t0
    frac = self.done / self.total
    worked = self.done - self.first
    if worked >= 2:  # the pace after the first block, whose time includes compilation
      pace = (self.clock() - self.t_first) / (worked - 1)
    else:
      pace = elapsed / worked if worked else None
    eta = "?" if pace is None else _fmt(pace * (self.total - self.done))
    filled = int(frac * self.width)
    text = (f"[block {min(block, self.total - 1)}/{self.total - 1}] "
            f"{'#' * filled}{'-' * (self.width - filled)} {frac:4.0%} "
            f"{_fmt(elapsed)} elapsed ETA {eta}")
    if self.experts is not None:
      text += f" | experts {self.experts[0]}/{self.experts[1]}"
    if finished and self.worst is not None:
      text += f" | max layer loss {self.worst[1]:.4g} ({self.worst[0]})"
    elif layer:
      text += f" | {layer} loss {loss:.4g}" if loss is not None else f" | {layer}"
    if not self._tty:
      return text + "\n"
    return "\r" + text.ljust(110) + ("\n" if finished else "")
