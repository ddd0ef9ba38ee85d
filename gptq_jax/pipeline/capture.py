"""Jitted block runs: Hessians of a block's linears, and the block's outputs.

``HessianCapture`` runs a block on one micro-batch while the adapter reports each linear's input;
inputs shared by several linears (q/k/v, gate/up: the same traced array) are counted once. The
running ``HessianState``s are donated. An expert projection's input (``Routed``: the token copies
sorted by expert) gives one ``X^T X`` per expert over exactly the rows routed to it, padding
tokens masked out (``core.routed.expert_gram``; state ``[E, in, in]`` and counts ``[E]``). With a mesh, the batch is split over the data axis with
``jax.shard_map``: each device runs the block on its own samples and a ``psum`` combines the
``X^T X`` sums, so the Hessians equal the single-device ones up to float summation order.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from gptq_jax.core import hessian, routed
from gptq_jax.pipeline import multihost
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath, is_routed


def linear_inputs(adapter, block_params, hidden, ctx, targets, given=None):
  """``({path: x}, {path: representative path})``: one input per distinct traced array.

  ``given`` (``{path: array}``): inputs kept from earlier passes, applied to those linears in place
  of what the block computes (the same values; what only fed them becomes dead code).
  """
  given = given or {}
  by_input: dict[int, LinearPath] = {}
  reps: dict[LinearPath, jax.Array] = {}
  alias: dict[LinearPath, LinearPath] = {}

  def capture(path, x):
    if path in targets and path not in alias:
      rep = by_input.setdefault(id(x.x) if is_routed(x) else id(x), path)
      alias[path] = rep
      if rep == path:
        reps[path] = x
    return None if is_routed(x) else given.get(path)

  adapter.run_block(block_params, hidden, ctx, capture)
  missing = [p for p in targets if p not in alias]
  if missing:
    raise ValueError(f"the block never applied the linear layer(s) {missing}: check the "
                     "adapter's sequential_groups against the model")
  return reps, alias


class HessianCapture:
  """Accumulates ``X^T X`` for the linears ``targets`` of a block over micro-batches.

  ``add(..., given=, keep=)``: ``given`` are inputs of earlier subsets' linears kept from their
  passes (``{path: array}``, sharded like ``hidden``); with ``keep`` the step also returns this
  subset's inputs (``{representative path: x}``) for the later passes (pipeline/stash.py).
  """

  def __init__(self, adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
               mesh: Mesh | None = None, axis_name: str = "data"):
    self.targets = targets
    self.alias: dict[LinearPath, LinearPath] = {}  # path -> the path whose Hessian it shares
    self.states: dict[LinearPath, hessian.HessianState] | None = None
    self._final: dict[LinearPath, jax.Array] = {}  # H of each input, once finalized
    self.routed: set[LinearPath] = set()  # representative paths of expert inputs

    def local(block_params, hidden, ctx, mask, given):
      reps, alias = linear_inputs(adapter, block_params, hidden, ctx, targets, given)
      self.alias = alias  # fixed at trace time: the same for every call of the compiled step
      self.routed = {p for p, x in reps.items() if is_routed(x)}
      out = {}
      for path, x in reps.items():
        if is_routed(x):  # per expert, the rows routed to it (a row's mask is its token's)
          rows_mask = mask.reshape(-1)[x.routing.token]
          out[path] = routed.expert_gram(x.x, x.routing.group_sizes, rows_mask,
                                         num_groups=x.routing.group_sizes.shape[0])
        else:
          out[path] = hessian._xtx(x, mask)
        if mesh is not None:
          out[path] = jax.lax.psum(out[path], axis_name)
      return out, reps

    if mesh is not None:
      local = jax.shard_map(local, mesh=mesh, out_specs=(P(), P(axis_name)),
                            in_specs=(P(), P(axis_name), P(axis_name), P(axis_name),
                                      P(axis_name)))

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=6)
    def step(states, block_params, hidden, ctx, mask, given, keep):
      new, reps = local(block_params, hidden, ctx, mask, given)
      states = {p: hessian.HessianState(xtx=states[p].xtx + xtx, count=states[p].count + n)
                for p, (xtx, n) in new.items()}
      return states, (reps if keep else None)

    self._local, self._step = local, step
    self._replicate = functools.partial(multihost.replicate, mesh) if mesh else (lambda t: t)

  def reset(self) -> None:
    """Forget the sums (the compiled step stays: every block of a model has the same shapes)."""
    self.states = None
    self._final: dict[LinearPath, jax.Array] = {}

  def input_shapes(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array,
                   given: dict | None = None) -> dict:
    """``{representative path: ShapeDtypeStruct}`` of the inputs ``keep`` would return (traced,
    not run)."""
    return jax.eval_shape(self._local, block_params, hidden, ctx, mask, given or {})[1]

  def add(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array,
          given: dict | None = None, keep: bool = False) -> dict | None:
    """Add one micro-batch; -> this subset's inputs on it when ``keep``, else None."""
    block_params, given = self._replicate(block_params), given or {}
    if self.states is None:
      shapes = jax.eval_shape(self._local, block_params, hidden, ctx, mask, given)[0]
      self.states = self._replicate({p: hessian.HessianState(
          xtx=jnp.zeros(s[0].shape, jnp.float32), count=jnp.zeros(s[1].shape, jnp.float32))
          for p, s in shapes.items()})
    self.states, kept = self._step(self.states, block_params, hidden, ctx, mask, given, keep)
    return kept

  def hessian(self, path: LinearPath) -> jax.Array:
    """The finalized H on one local device (the solver runs there; a replicated H would make it
    compile again for that sharding). The running sum is dropped once H is made from it (no
    more ``add`` until ``reset``): one copy of each H is alive, not two."""
    rep = self.alias[path]
    if rep not in self._final:
      h = hessian.finalize(self.states.pop(rep))
      # H is replicated: take this process's first copy as a plain single-device array (with
      # jax.distributed the global array is not addressable as a whole).
      self._final[rep] = jax.device_put(h.addressable_data(0), jax.local_devices()[0])
    return self._final[rep]

  def expert_hessians(self, path: LinearPath) -> tuple[jax.Array, jax.Array]:
    """An expert projection's ``(H [E, in, in], tokens [E])``: each expert's ``2 / n_e X_e^T X_e``
    over the tokens routed to it (zero for an expert that got none), on one local device, and the
    token counts. The running sum is dropped, as in ``hessian``."""
    rep = self.alias[path]
    if rep not in self._final:
      state = self.states.pop(rep)
      local = lambda a: jax.device_put(a.addressable_data(0), jax.local_devices()[0])  # noqa: E731
      xtx, count = local(state.xtx), local(state.count)
      self._final[rep] = (xtx * (2.0 / jnp.maximum(count, 1.0))[:, None, None], count)
    return self._final[rep]

  def release(self, path: LinearPath) -> None:
    """Drop the finalized H of ``path``'s input (its solves are done)."""
    self._final.pop(self.alias.get(path, path), None)


def run_given(adapter: DecoderAdapter, block_params, hidden, ctx, given=None):
  """The block's output, with the linears in ``given`` (``{path: input}``) applied to those."""
  if not given:
    return adapter.run_block(block_params, hidden, ctx)
  return adapter.run_block(block_params, hidden, ctx, lambda path, x: given.get(path))


def block_runner(adapter: DecoderAdapter, mesh: Mesh | None = None, axis_name: str = "data"):
  """A jitted ``(block_params, hidden, ctx, given=None) -> hidden``, data-parallel over ``mesh``
  if given. ``given``: kept linear inputs (``run_given``)."""
  run = functools.partial(run_given, adapter)
  if mesh is None:
    run = jax.jit(run)
    return lambda block_params, hidden, ctx, given=None: run(block_params, hidden, ctx, given or {})
  run = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name),
                                                        P(axis_name)),
                              out_specs=P(axis_name)))
  return lambda block_params, hidden, ctx, given=None: run(
      multihost.replicate(mesh, block_params), hidden, ctx, given or {})


@functools.lru_cache(maxsize=64)
def ctx_advancer_for(adapter: DecoderAdapter, i: int, mesh: Mesh | None, axis_name: str):
  """A jitted ``(block_params, hidden, ctx) -> ctx`` for block ``i + 1`` (the adapter's
  ``advance_ctx``; data-parallel over ``mesh``), or None for an adapter whose context does not
  change from block to block."""
  if not getattr(adapter, "advances_ctx", False):
    return None
  advance = functools.partial(adapter.advance_ctx, i=i)
  if mesh is None:
    return jax.jit(advance)
  run = jax.jit(jax.shard_map(advance, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name)),
                              out_specs=P(axis_name)))
  return lambda block_params, hidden, ctx: run(multihost.replicate(mesh, block_params), hidden,
                                               ctx)


@functools.lru_cache(maxsize=64)
def capture_for(adapter: DecoderAdapter, targets: tuple[LinearPath, ...], mesh: Mesh | None,
                axis_name: str) -> HessianCapture:
  """A cached ``HessianCapture``: its compiled step is reused across blocks and calls."""
  return HessianCapture(adapter, targets, mesh, axis_name)


@functools.lru_cache(maxsize=16)
def runner_for(adapter: DecoderAdapter, mesh: Mesh | None, axis_name: str):
  return block_runner(adapter, mesh, axis_name)
