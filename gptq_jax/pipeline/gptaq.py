"""GPTAQ's statistics for a block: ``H`` and the cross-term ``dXXT`` of each linear.

GPTAQ (``core/gptaq.py``) needs, for each linear, its inputs ``X`` in the partly quantized model
(the driver's calibration stream through the working block, earlier subsets already quantized, as
for plain GPTQ) and the same tokens' inputs ``X_float`` in the float model: the float block run on
a second stream of hidden states that only float blocks produced (``FloatStream``). As GPTQModel's
native-input capture does, the float inputs come from one run of the untouched float block.

``CrossCapture`` has ``HessianCapture``'s interface (``reset``, ``add``, ``hessian``) plus
``cross(path)``; with a mesh the batch is split over the data axis, each device keeps its own
sums and they are combined when read (core/hessian.py: the same statistics however the samples
are spread).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

from gptq_jax.core import hessian
from gptq_jax.pipeline import multihost
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath
from gptq_jax.pipeline.capture import linear_inputs, local_copy, scan_samples


class CrossCapture:
  """Accumulates ``X^T X`` and ``(X_float - X)^T X`` for the linears ``targets`` of a block (per
  device with a mesh, combined when read, as ``HessianCapture``)."""

  def __init__(self, adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
               mesh: Mesh | None = None, axis_name: str = "data"):
    self.targets, self.mesh, self.axis_name = targets, mesh, axis_name
    self.alias: dict[LinearPath, LinearPath] = {}
    self.states: dict[LinearPath, hessian.CrossState] | None = None
    self._final: dict[LinearPath, tuple] = {}
    self.routed: set[LinearPath] = set()  # no expert inputs: GPTAQ refuses mixtures of experts

    def pairs(block_params, float_params, hidden, float_hidden, ctx):
      reps, alias = linear_inputs(adapter, block_params, hidden, ctx, targets)
      freps, _ = linear_inputs(adapter, float_params, float_hidden, ctx, targets)
      self.alias = alias
      return {path: (x, freps[path]) for path, x in reps.items()}

    def local(states, block_params, float_params, hidden, float_hidden, ctx, mask):
      mine = multihost.own(states) if mesh is not None else states

      def body(st, h, fh, c, m):  # one sample (capture.scan_samples)
        xs = pairs(block_params, float_params, h, fh, c)
        return {p: hessian.cross_add(st[p], x, xf, m) for p, (x, xf) in xs.items()}, None

      mine, _ = scan_samples(body, mine, hidden, float_hidden, ctx, mask)
      return multihost.stacked(mine) if mesh is not None else mine

    inputs = pairs
    if mesh is not None:
      data = P(axis_name)
      inputs = jax.shard_map(pairs, mesh=mesh, in_specs=(P(), P(), data, data, data),
                             out_specs=data)
      local = jax.shard_map(local, mesh=mesh, out_specs=data,
                            in_specs=(data, P(), P(), data, data, data, data))

    self._inputs = inputs
    self._step = jax.jit(local, donate_argnums=0)
    self._replicate = functools.partial(multihost.replicate, mesh) if mesh else (lambda t: t)

  def reset(self) -> None:
    self.states = None
    self._final = {}

  def add(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array, *,
          float_params: Any, float_hidden: jax.Array) -> None:
    block_params, float_params = self._replicate(block_params), self._replicate(float_params)
    if self.states is None:
      shapes = jax.eval_shape(self._inputs, block_params, float_params, hidden, float_hidden, ctx)
      states = {p: hessian.cross_init(s[0].shape[-1]) for p, s in shapes.items()}
      self.states = states if self.mesh is None else multihost.per_device_zeros(
          self.mesh, self.axis_name, states)
    self.states = self._step(self.states, block_params, float_params, hidden, float_hidden, ctx,
                             mask)

  def _finalized(self, path: LinearPath) -> tuple:
    rep = self.alias[path]
    if rep not in self._final:
      state = multihost.combined(self.mesh, self.axis_name, self.states.pop(rep))
      self._final[rep] = tuple(local_copy(a) for a in hessian.finalize_cross(state))
    return self._final[rep]

  def hessian(self, path: LinearPath) -> jax.Array:
    return self._finalized(path)[0]

  def cross(self, path: LinearPath) -> jax.Array:
    return self._finalized(path)[1]


@functools.lru_cache(maxsize=64)
def cross_capture_for(adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
                      mesh: Mesh | None, axis_name: str) -> CrossCapture:
  return CrossCapture(adapter, targets, mesh, axis_name)
