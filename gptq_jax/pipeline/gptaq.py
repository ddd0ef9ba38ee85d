"""GPTAQ's statistics for a block: ``H`` and the cross-term ``dXXT`` of each linear.

GPTAQ (``core/gptaq.py``) needs, for each linear, its inputs ``X`` in the partly quantized model
(the driver's calibration stream through the working block, earlier subsets already quantized, as
for plain GPTQ) and the same tokens' inputs ``X_float`` in the float model: the float block run on
a second stream of hidden states that only float blocks produced (``FloatStream``). As GPTQModel's
native-input capture does, the float inputs come from one run of the untouched float block.

``CrossCapture`` has ``HessianCapture``'s interface (``reset``, ``add``, ``hessian``) plus
``cross(path)``; with a mesh the batch is split over the data axis and both sums are ``psum``-ed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

from gptq_jax.core import hessian
from gptq_jax.pipeline import multihost
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath
from gptq_jax.pipeline.capture import linear_inputs


class CrossCapture:
  """Accumulates ``X^T X`` and ``(X_float - X)^T X`` for the linears ``targets`` of a block."""

  def __init__(self, adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
               mesh: Mesh | None = None, axis_name: str = "data"):
    self.targets = targets
    self.alias: dict[LinearPath, LinearPath] = {}
    self.states: dict[LinearPath, hessian.CrossState] | None = None

    def local(block_params, float_params, hidden, float_hidden, ctx, mask):
      reps, alias = linear_inputs(adapter, block_params, hidden, ctx, targets)
      freps, _ = linear_inputs(adapter, float_params, float_hidden, ctx, targets)
      self.alias = alias
      out = {}
      for path, x in reps.items():
        out[path] = hessian._xtx_and_cross(x, freps[path], mask)
        if mesh is not None:
          out[path] = jax.lax.psum(out[path], axis_name)
      return out

    if mesh is not None:
      local = jax.shard_map(local, mesh=mesh, out_specs=P(),
                            in_specs=(P(), P(), P(axis_name), P(axis_name), P(axis_name),
                                      P(axis_name)))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(states, block_params, float_params, hidden, float_hidden, ctx, mask):
      new = local(block_params, float_params, hidden, float_hidden, ctx, mask)
      return {p: hessian.CrossState(xtx=states[p].xtx + xtx, dxxt=states[p].dxxt + dxxt,
                                    count=states[p].count + n)
              for p, (xtx, dxxt, n) in new.items()}

    self._local, self._step = local, step
    self._replicate = functools.partial(multihost.replicate, mesh) if mesh else (lambda t: t)

  def reset(self) -> None:
    self.states = None

  def add(self, block_params: Any, hidden: jax.Array, ctx: Any, mask: jax.Array, *,
          float_params: Any, float_hidden: jax.Array) -> None:
    block_params, float_params = self._replicate(block_params), self._replicate(float_params)
    if self.states is None:
      shapes = jax.eval_shape(self._local, block_params, float_params, hidden, float_hidden, ctx,
                              mask)
      self.states = self._replicate({p: hessian.cross_init(s[0].shape[0])
                                     for p, s in shapes.items()})
    self.states = self._step(self.states, block_params, float_params, hidden, float_hidden, ctx,
                             mask)

  def _local_copy(self, a):
    return jax.device_put(a.addressable_data(0), jax.local_devices()[0])

  def hessian(self, path: LinearPath) -> jax.Array:
    return self._local_copy(hessian.finalize_cross(self.states[self.alias[path]])[0])

  def cross(self, path: LinearPath) -> jax.Array:
    return self._local_copy(hessian.finalize_cross(self.states[self.alias[path]])[1])


@functools.lru_cache(maxsize=64)
def cross_capture_for(adapter: DecoderAdapter, targets: tuple[LinearPath, ...],
                      mesh: Mesh | None, axis_name: str) -> CrossCapture:
  return CrossCapture(adapter, targets, mesh, axis_name)
