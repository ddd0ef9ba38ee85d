"""The data-parallel programs of a run, compiled with its real shapes: the embedding, each subset's
Hessian pass and the propagation of one block of each layer kind.

These are the driver's own jitted functions (``pipeline/driver.py`` builds the same objects): the
``HessianCapture`` / ``CrossCapture`` step of each true-sequential subset (``capture_for``,
``cross_capture_for``), the block runner (``runner_for``) and the embedding (``embed_runner``),
called with ``ShapeDtypeStruct``s laid out as the driver lays out its arrays: the calibration
micro-batch ``[B, T]`` split over the data axis of every chip, the block's parameters and the
Hessian sums replicated, the inputs kept between passes (``pipeline/stash.py``) split like the
hidden states. Which subsets' inputs are kept is decided as ``StashPlan`` decides it, with the
budget taken from the chip's HBM instead of a live device's free memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptq_jax.core import hessian
from gptq_jax.pipeline import multihost
from gptq_jax.pipeline.experts import float_by_default
from gptq_jax.pipeline.adapter import get_path
from gptq_jax.pipeline.capture import capture_for, embed_runner, runner_for
from gptq_jax.pipeline.gptaq import cross_capture_for
from gptq_jax.pipeline.stash import given_for
from gptq_jax.plan.layout import Layout
from gptq_jax.plan.measure import Program, measure, nbytes

S = jax.ShapeDtypeStruct


def embedding(lay: Layout) -> Program:
  """The first block's input from the token ids, once per micro-batch of the run."""
  params = {"embed_tokens": {"embedding": S((lay.model.vocab_size, lay.model.hidden_size),
                                            lay.dtype, sharding=lay.replicated)}}
  ids = S((lay.batch, lay.seqlen), jnp.int32, sharding=lay.data)
  run = embed_runner(lay.adapter(None), lay.mesh, "data")
  return measure("embedding", "embedding", run, (params, ids, ids), calls=lay.nbatches)


def _states(lay: Layout, make, *args) -> dict:
  """The running sums a capture starts from (``make(*args)`` traced: its ``_zeros`` or the
  cross-term's), as structs laid out as the driver lays them out."""
  shapes = jax.eval_shape(make, *args)
  return jax.tree.map(lambda s: S(s.shape, s.dtype, sharding=lay.data), shapes)


def _cross_zeros(lay: Layout, cap, *args) -> dict:
  shapes = jax.eval_shape(cap._inputs, *args)
  states = {p: hessian.cross_init(s[0].shape[-1]) for p, s in shapes.items()}
  return states if lay.mesh is None else multihost.per_device_zeros(lay.mesh, "data", states)


def _combine(lay: Layout, states: dict, g: int, group) -> list[Program]:
  """Each running sum summed over the chips (``multihost.combined``), once per block (not the
  router's: it stays float, its sums are never read)."""
  if lay.mesh is None:
    return []
  run = multihost._combiner(lay.mesh, "data")
  return [measure(f"combine {g} {p[-1] if p[-2] != 'experts' else 'experts ' + p[-1]}",
                  "hessian passes", run, (st,)) for p, st in states.items() if p in group and not float_by_default(p)]


class Passes:
  """The Hessian passes of one layer type's block, subset by subset, and the inputs they keep.

  ``programs``: one per subset (calls: micro-batches per block); ``kept_bytes[g]``: bytes per chip
  kept before subset ``g``'s pass (all micro-batches); ``kept``: ``{path: struct}`` for the
  propagation."""

  def __init__(self, lay: Layout, kind, budget: int):
    self.lay, self.kind = lay, kind
    adapter = lay.adapter(kind)
    block = lay.block(kind, lay.replicated)
    hidden, ctx, mask = lay.stream_batch()
    self.programs: list[Program] = []
    self.combines: list[list[Program]] = []  # per subset, after its pass
    self.state_bytes: list[int] = []  # per subset: its running sums per chip
    self.kept_bytes: list[int] = []
    self.groups = lay.groups(adapter)
    self.alias: dict = {}
    kept: dict = {}
    if lay.cfg.gptaq:  # GPTAQ: the float block and stream ride along; nothing is kept
      for g, group in enumerate(self.groups):
        cap = cross_capture_for(adapter, group, lay.mesh, "data")
        states = _states(lay, _cross_zeros, lay, cap, block, block, hidden, hidden, ctx)
        args = (states, block, block, hidden, hidden, ctx, mask)
        self.state_bytes.append(nbytes(states))
        self.combines.append(_combine(lay, states, g, group))
        self.programs.append(measure(f"hessian pass {g} {_names(group)}", "hessian passes",
                                     cap._step, args, calls=lay.nbatches))
        self.kept_bytes.append(0)
        self.alias.update(cap.alias)
      self.kept = {}
      return
    used = 0
    for g, group in enumerate(self.groups):
      cap = capture_for(adapter, group, lay.mesh, "data")
      inputs = cap.input_shapes(block, hidden, ctx, mask, kept)  # sets cap.alias, cap.routed
      states = _states(lay, cap._zeros, inputs)
      self.alias.update(cap.alias)
      keep = False
      if g > 0 and budget > 0 and not cap.routed:  # StashPlan.decide
        need = lay.nbatches * nbytes(lay.on_data(inputs))
        keep = used + need <= budget
      self.kept_bytes.append(lay.nbatches * nbytes(kept))
      self.state_bytes.append(nbytes(states))
      self.combines.append(_combine(lay, states, g, group))
      args = (states, block, hidden, ctx, mask, kept, keep)
      self.programs.append(measure(f"hessian pass {g} {_names(group)}", "hessian passes",
                                   cap._step, args, calls=lay.nbatches))
      if keep:
        inputs = lay.on_data(cap.input_shapes(block, hidden, ctx, mask, kept))
        used += lay.nbatches * nbytes(inputs)
        kept = {**kept, **given_for(cap, group, inputs)}
    self.kept = kept

  def propagation(self) -> Program:
    """The block's outputs from its inputs (the kept inputs applied; none with refinement)."""
    lay = self.lay
    adapter = lay.adapter(self.kind)
    block = lay.block(self.kind, lay.replicated)
    hidden, ctx, _ = lay.stream_batch()
    given = {} if lay.cfg.refine_steps else self.kept
    run = runner_for(adapter, lay.mesh, "data").jitted
    return measure("propagation", "propagation", run, (block, hidden, ctx, given),
                   calls=lay.nbatches)


def _names(group) -> str:
  return "[" + ", ".join(p[-1] for p in group) + "]"


def kernel_shape(block: dict, path) -> tuple[int, ...]:
  return tuple(get_path(block, path)["kernel"].shape)
