"""Where a quantization run's time goes: per-phase seconds, pass counts and compilation time.

``PipelineStats`` is handed to ``quantize(..., stats=...)``. With ``sync=True`` each phase waits for
its device work before its clock stops (JAX dispatches asynchronously: without waiting, a phase's
time would land in whichever later phase first reads a result), at the cost of a few extra host
synchronisations per block. Compilation time is collected from JAX's own monitoring events (it is
spent inside the phases, so it is reported as "of which").

Block work: each Hessian pass runs the part of the block its subset's inputs need (XLA drops what
lies after them, and with kept inputs what lies before: pipeline/stash.py), and the propagation
the rest. The driver charges each pass the matmul FLOPs left in it after dead-code elimination
(``work``), counted in block forwards: 1.0 would be every matmul of the block run once.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import jax

_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/jaxpr_trace_duration")
_listening: list["PipelineStats"] = []


def _on_event(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    for stats in _listening:
      stats.compile_seconds += seconds


_registered = False


class PipelineStats:
  def __init__(self, sync: bool = True):
    global _registered
    self.sync = sync
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.counts: dict[str, int] = collections.defaultdict(int)
    self.compile_seconds = 0.0
    self.flops: dict[str, int] = collections.defaultdict(int)  # dot FLOPs run, by phase
    self.stash: dict = {}  # which subsets' inputs were kept between passes (pipeline/stash.py)
    if not _registered:
      jax.monitoring.register_event_duration_secs_listener(_on_event)
      _registered = True
    _listening.append(self)

  def close(self) -> None:
    if self in _listening:
      _listening.remove(self)

  def mark(self, phase: str, t0: float, wait: Any = None) -> float:
    """Charge the time since ``t0`` to ``phase`` (after ``wait``'s arrays are ready); -> now."""
    if self.sync and wait is not None:
      jax.block_until_ready(wait)
    now = time.perf_counter()
    self.seconds[phase] += now - t0
    return now

  def count(self, what: str, n: int = 1) -> None:
    self.counts[what] += n

  def work(self, phase: str, flops: int) -> None:
    """Charge ``flops`` (matmul FLOPs after dead-code elimination, stash.forward_work) to
    ``phase``; "one block forward" is the unit the forward work per block is counted in."""
    self.flops[phase] += int(flops)

  def forwards_per_block(self) -> float | None:
    """The block work the Hessian passes and the propagation ran, in block forwards."""
    unit = self.flops.get("one block forward", 0)
    if not unit:
      return None
    return (self.flops.get("hessian passes", 0) + self.flops.get("propagation", 0)) / unit

  def summary(self) -> dict:
    return {"seconds": dict(self.seconds), "counts": dict(self.counts),
            "compile_seconds": self.compile_seconds, "flops": dict(self.flops),
            "forward_work_per_block": self.forwards_per_block(), "stash": dict(self.stash)}
