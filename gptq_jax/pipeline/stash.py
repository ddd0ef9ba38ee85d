"""Kept linear inputs: a block runs about once per block instead of once per subset.

True-sequential GPTQ takes each subset's Hessians with the earlier subsets already quantized. Run
naively, each subset's pass starts again from the block's input: the ``[o]`` pass runs the
attention, the ``[gate, up]`` pass runs it again plus ``o``, the ``[down]`` pass all of that plus
``gate``/``up``, and the propagation the whole block. But a subset's input depends only on the
subsets before it, and those do not change after that subset's pass. So the pass of subset ``g``
also returns ``g``'s input on each micro-batch (kept on the devices, sharded over the data axis
like the hidden states), and every later pass and the propagation apply ``g``'s linears to the
kept array instead of the one the block computes (the adapter's ``capture`` returns it). XLA then
drops what only fed that input: the ``[gate, up]`` pass is ``o`` + residual + norm, the ``[down]``
pass is ``gate``/``up`` + activation, the propagation is ``o`` and ``down`` with the residuals
(and Gemma 3's post-norms, which act on those linears' outputs).

The first subset's input is never kept (only norms precede it), nor a mixture-of-experts
subset's (its experts' inputs are token copies sorted by expert: they are recomputed). A subset is kept when its bytes
(all micro-batches, per device) fit the budget left by the earlier kept subsets; otherwise its
input is recomputed, as before. The budget (``quantize(..., stash_bytes=)``): by default half of a
device's free memory where the device reports it (TPU, GPU), else half of the host's available
memory shared among the local devices (CPU), taken once per run (under ``jax.distributed`` the
smallest over the processes, so that all run the same programs); 0 turns keeping off. The plan
(which subsets are kept, how many bytes) is decided at the first quantized block and reported in
``PipelineStats`` and the CLI's breakdown. GPTAQ keeps nothing (its passes also run the float
block); with block refinement the propagation recomputes the block (refinement changes every
weight after the passes).

``forward_work`` measures what a pass costs: the multiply-add FLOPs of every ``dot_general`` left
after dead-code elimination of the traced pass (linears and attention products; the ``X^T X`` of
the Hessians is not counted), so the driver can report work per block in block forwards.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import numpy as np
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe

from gptq_jax.pipeline.capture import linear_inputs, run_given


def default_budget(mesh) -> int:
  """Bytes per device that kept inputs may take (see the module docstring)."""
  dev = mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0]
  try:
    mem = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 (backends without memory statistics)
    mem = {}
  if mem.get("bytes_limit"):
    return int(0.5 * (mem["bytes_limit"] - mem.get("bytes_in_use", 0)))
  return int(0.5 * _host_available() / max(1, jax.local_device_count()))


def _host_available() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class StashPlan:
  """Which subsets' inputs are kept, decided once per run (every block has the same shapes)."""

  def __init__(self, budget: int | None, mesh, ndevices: int):
    self.budget = default_budget(mesh) if budget is None else int(budget)
    if jax.process_count() > 1:  # every process must run the same programs: the smallest budget
      from jax.experimental import multihost_utils  # noqa: PLC0415

      self.budget = int(multihost_utils.process_allgather(np.int64(self.budget)).min())
    self.ndevices = ndevices
    self.keep: dict[int, bool] = {}  # subset index -> kept
    self.bytes: dict[int, int] = {}  # subset index -> bytes per device (all micro-batches)

  def decide(self, g: int, capture, args: tuple, given: dict, nbatches: int) -> bool:
    if g not in self.keep:
      if g == 0 or self.budget <= 0:
        self.keep[g] = False
      else:
        shapes = capture.input_shapes(*args, given)
        if getattr(capture, "routed", None):  # experts' inputs: sorted copies, never kept
          self.keep[g] = False
          return False
        need = nbatches * sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values())
        need = -(-need // self.ndevices)
        self.bytes[g] = need
        self.keep[g] = sum(self.bytes[k] for k in self.keep if self.keep[k]) + need <= self.budget
    return self.keep[g]

  def summary(self) -> dict:
    return {"budget_bytes_per_device": self.budget,
            "kept_subsets": sorted(g for g, k in self.keep.items() if k),
            "recomputed_subsets": sorted(g for g, k in self.keep.items() if not k),
            "kept_bytes_per_device": sum(self.bytes[g] for g, k in self.keep.items() if k)}


def given_for(capture, group, kept: dict) -> dict:
  """``{path: input}`` for every linear of ``group`` from a pass's kept ``{rep: input}``."""
  return {path: kept[capture.alias.get(path, path)] for path in group}


def _shape_key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


def dot_flops(fn, *args) -> int:
  """2 x multiply-adds of the ``dot_general``s that ``fn(*args)``'s outputs need (traced only, on
  unsharded stand-ins of ``args``: the count is per pass, whatever the data axis)."""
  stand_in = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "dtype") else x  # noqa: E731
  args = jax.tree.map(stand_in, args)
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return _count(jaxpr)


def _count(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif eqn.primitive.name == "ragged_dot_general":  # rows x in x out, each row one group
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      total += 2 * math.prod(lhs) * rhs[-1]
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += repeat * _count(sub)
  return total


_work_cache: dict = {}


def forward_work(adapter, block_params, hidden, ctx, targets=None, given=None) -> int:
  """FLOPs of one pass on one micro-batch: the inputs of ``targets`` (None: the block's output),
  the linears in ``given`` applied to kept inputs. Cached per adapter, targets and shapes."""
  given = given or {}
  key = (adapter, targets, tuple(sorted(given)),
         _shape_key((block_params, hidden, ctx, given)))
  if key not in _work_cache:
    if len(_work_cache) >= 256:  # bounded like the compiled-step caches (it holds adapters)
      _work_cache.clear()
    if targets is None:
      fn = functools.partial(run_given, adapter)
    else:
      fn = lambda bp, h, c, gv: linear_inputs(adapter, bp, h, c, targets, gv)[0]  # noqa: E731
    _work_cache[key] = dot_flops(fn, block_params, hidden, ctx, given)
  return _work_cache[key]
