"""Jitted block runs: Hessians of a block's linears, and the block's outputs.

``HessianCapture`` runs a block on one micro-batch while the adapter reports each linear's input;
inputs shared by several linears (q/k/v, gate/up: the same traced array) are counted once. The
running ``HessianState``s are donated. With a mesh, the batch is split over the data axis with
``jax.shard_map``: each device runs the block on its own samples and keeps its own ``X^T X``
sums, combined when H is read; the Hessians equal the single-device ones bit for bit (up to rare
rounding ties: core/hessian.py). An expert projection's input (``Routed``: the
token copies sorted by expert) gives one ``X^T X`` per expert over exactly the rows routed to it,
padding tokens masked out (``core.routed.expert_gram``; state ``[E, in, in]``, counts ``[E]``),
summed and combined the same way.
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
  With a mesh each device keeps the sums of its own samples (no collective per micro-batch);
  ``hessian(path)`` combines them (``multihost.combined``), so H does not depend on how the
  samples were spread over micro-batches, devices and processes (core/hessian.py).
  """

  def __init__(self, adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
               mesh: Mesh | None = None, axis_name: str = "data"):
    self.targets, self.mesh, self.axis_name = targets, mesh, axis_name
    self.alias: dict[LinearPath, LinearPath] = {}  # path -> the path whose Hessian it shares
    self.states: dict[LinearPath, hessian.HessianState] | None = None
    self._final: dict[LinearPath, jax.Array] = {}  # H of each input, once finalized
    self.routed: set[LinearPath] = set()  # representative paths of expert inputs

    def linear_reps(block_params, hidden, ctx, given):
      reps, alias = linear_inputs(adapter, block_params, hidden, ctx, targets, given)
      self.alias = alias  # fixed at trace time: the same for every call of the compiled step
      self.routed = {p for p, x in reps.items() if is_routed(x)}
      return reps

    def local(states, block_params, hidden, ctx, mask, given, keep):
      mine = multihost.own(states) if mesh is not None else states

      def body(st, h, c, m, g):
        reps = linear_reps(block_params, h, c, g)
        new = {p: _add_expert_rows(st[p], x, m) if is_routed(x) else hessian.add(st[p], x, m)
               for p, x in reps.items()}
        return new, (reps if keep else None)

      mine, reps = scan_samples(body, mine, hidden, ctx, mask, given)
      return (multihost.stacked(mine) if mesh is not None else mine), reps

    inputs = linear_reps
    if mesh is not None:
      data = P(axis_name)
      inputs = jax.shard_map(linear_reps, mesh=mesh, in_specs=(P(), data, data, data),
                             out_specs=data)
      local = _data_parallel(local, mesh, axis_name)

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=6)
    def step(states, block_params, hidden, ctx, mask, given, keep):
      return local(states, block_params, hidden, ctx, mask, given, keep)

    self._inputs, self._step = inputs, step
    self._replicate = functools.partial(multihost.replicate, mesh) if mesh else (lambda t: t)

  def reset(self) -> None:
    """Forget the sums (the compiled step stays: every block of a model has the same shapes)."""
    self.states = None
    self._final: dict[LinearPath, jax.Array] = {}

  def input_shapes(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array,
                   given: dict | None = None) -> dict:
    """``{representative path: ShapeDtypeStruct}`` of the inputs ``keep`` would return (traced,
    not run)."""
    del mask
    return jax.eval_shape(self._inputs, block_params, hidden, ctx, given or {})

  def _zeros(self, shapes: dict):
    # under shard_map the per-device routings are laid end to end: E is one device's share
    devices = 1 if self.mesh is None else self.mesh.shape[self.axis_name]
    states = {p: _expert_zeros(s, devices) if is_routed(s) else hessian.init(s.shape[-1])
              for p, s in shapes.items()}
    if self.mesh is None:
      return states
    return multihost.per_device_zeros(self.mesh, self.axis_name, states)

  def add(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array,
          given: dict | None = None, keep: bool = False) -> dict | None:
    """Add one micro-batch; -> this subset's inputs on it when ``keep``, else None."""
    block_params, given = self._replicate(block_params), given or {}
    if self.states is None:
      self.states = self._zeros(self.input_shapes(block_params, hidden, ctx, mask, given))
    self.states, kept = self._step(self.states, block_params, hidden, ctx, mask, given, keep)
    return kept

  def hessian(self, path: LinearPath) -> jax.Array:
    """The finalized H on one local device (the solver runs there; a replicated H would make it
    compile again for that sharding). The running sums are dropped once H is made from them (no
    more ``add`` until ``reset``): one copy of each H is alive, not two."""
    rep = self.alias[path]
    if rep not in self._final:
      h = hessian.finalize_consumed(
          multihost.combined(self.mesh, self.axis_name, self.states.pop(rep)))
      self._final[rep] = local_copy(h)
    return self._final[rep]

  def expert_hessians(self, path: LinearPath) -> tuple[jax.Array, jax.Array]:
    """An expert projection's ``(H [E, in, in], tokens [E])``: each expert's ``2 / n_e X_e^T X_e``
    over the tokens routed to it (zero for an expert that got none), on one local device, and the
    token counts. The running sum is dropped, as in ``hessian``."""
    rep = self.alias[path]
    if rep not in self._final:
      state = multihost.combined(self.mesh, self.axis_name, self.states.pop(rep))
      xtx = local_copy(state.xtx + state.err)
      count = local_copy(state.count)
      self._final[rep] = (xtx * (2.0 / jnp.maximum(count, 1.0))[:, None, None], count)
    return self._final[rep]

  def release(self, path: LinearPath) -> None:
    """Drop the finalized H of ``path``'s input (its solves are done)."""
    self._final.pop(self.alias.get(path, path), None)


def _expert_zeros(x, devices: int = 1) -> hessian.HessianState:
  """The running sums of an expert projection's input (``Routed``; its routing laid end to end
  over ``devices``): ``[E, in, in]``, ``[E]``."""
  E, d = x.routing.group_sizes.shape[0] // devices, x.x.shape[-1]
  zeros = lambda: jnp.zeros((E, d, d), jnp.float32)  # noqa: E731 (two buffers: both donated)
  return hessian.HessianState(xtx=zeros(), count=jnp.zeros((E,), jnp.float32), err=zeros())


def _add_expert_rows(state: hessian.HessianState, x, mask) -> hessian.HessianState:
  """One sample's routed rows added per expert (a row's mask is its token's), compensated as
  ``hessian.add``."""
  rows_mask = mask.reshape(-1)[x.routing.token]
  gram, n = routed.expert_gram(x.x, x.routing.group_sizes, rows_mask,
                               num_groups=x.routing.group_sizes.shape[0])
  xtx, e = hessian.two_sum(state.xtx, gram)
  return hessian.HessianState(xtx=xtx, count=state.count + n, err=state.err + e)


def local_copy(a: jax.Array) -> jax.Array:
  """A replicated array as a plain array on this process's first device (with jax.distributed the
  global array is not addressable as a whole)."""
  return jax.device_put(a.addressable_data(0), jax.local_devices()[0])


def run_given(adapter: DecoderAdapter, block_params, hidden, ctx, given=None):
  """The block's output, with the linears in ``given`` (``{path: input}``) applied to those."""
  if not given:
    return adapter.run_block(block_params, hidden, ctx)
  return adapter.run_block(block_params, hidden, ctx, lambda path, x: given.get(path))


def _data_parallel(local, mesh: Mesh, axis_name: str):
  """``local(states, block_params, hidden, ctx, mask, given, keep)`` per device of the data axis
  (the states per device, the block replicated, the batch split)."""
  data = P(axis_name)

  def wrapped(states, block_params, hidden, ctx, mask, given, keep):
    f = jax.shard_map(functools.partial(local, keep=keep), mesh=mesh,
                      in_specs=(data, P(), data, data, data, data), out_specs=(data, data))
    return f(states, block_params, hidden, ctx, mask, given)

  return wrapped


def scan_samples(body, carry, *batched):
  """``body(carry, *sample) -> (carry, out)`` over the samples (axis 0) of the ``batched``
  pytrees, each passed as a batch of one; the outputs stacked again. XLA's reductions (a norm's
  mean) may sum in another order for another batch shape: one sample at a time, every sample's
  arithmetic is the same whatever the micro-batch, device count and process count."""
  one = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def step(c, xs):
    c, out = body(c, *one(xs))
    return c, jax.tree.map(lambda a: a[0], out)

  if carry is not None:
    carry = hessian.varying_like(carry, batched[0])
  return jax.lax.scan(step, carry, batched)


def map_samples(fn, *batched):
  """``fn(*sample)`` over the samples of ``batched``, one at a time (see ``scan_samples``)."""
  return scan_samples(lambda c, *xs: (c, fn(*xs)), None, *batched)[1]


def block_runner(adapter: DecoderAdapter, mesh: Mesh | None = None, axis_name: str = "data"):
  """A jitted ``(block_params, hidden, ctx, given=None) -> hidden``, data-parallel over ``mesh``
  if given, one sample at a time (``scan_samples``). ``given``: kept linear inputs
  (``run_given``)."""
  run = lambda block_params, hidden, ctx, given: map_samples(
      functools.partial(run_given, adapter, block_params), hidden, ctx, given)
  if mesh is None:
    run = jax.jit(run)
    call = lambda block_params, hidden, ctx, given=None: run(  # noqa: E731
        block_params, hidden, ctx, given or {})
  else:
    run = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name),
                                                          P(axis_name)),
                                out_specs=P(axis_name)))
    call = lambda block_params, hidden, ctx, given=None: run(  # noqa: E731
        multihost.replicate(mesh, block_params), hidden, ctx, given or {})
  call.jitted = run  # (block_params, hidden, ctx, given): what scripts/plan.py compiles
  return call


def embed_runner(adapter: DecoderAdapter, mesh: Mesh | None = None, axis_name: str = "data"):
  """A jitted ``(params, input_ids, attention_mask) -> (hidden, ctx)``: the first block's input,
  data-parallel over ``mesh`` if given."""
  embed = lambda p, ids, mask: adapter.embed(p, ids, mask)  # noqa: E731
  if mesh is not None:
    embed = jax.shard_map(embed, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name)),
                          out_specs=P(axis_name))
  return jax.jit(embed)


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
