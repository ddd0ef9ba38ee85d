"""Streaming Hessian of a linear layer's loss: ``H = (2 / n) X^T X`` over all calibration tokens.

The state keeps the raw sum ``X^T X`` and the token count ``n`` in float32; ``finalize`` divides.
Padding tokens are masked out of ``X`` (and of ``n``). GPTQ is invariant to a positive scalar on H
(damping is relative), so counting tokens (GPTQModel) or sequences (the paper) makes no difference.

``update`` is jitted with the state donated, so the ``[in, in]`` buffer is reused in place.
``update_sharded`` does the same with the batch sharded over a data axis of a device mesh
(``jax.shard_map``): each device sums its own tokens and a ``psum`` combines them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class HessianState:
  xtx: jax.Array  # [in, in] float32, sum over tokens of x x^T
  count: jax.Array  # [] float32, number of (unmasked) tokens


def init(in_features: int) -> HessianState:
  return HessianState(xtx=jnp.zeros((in_features, in_features), jnp.float32),
                      count=jnp.zeros((), jnp.float32))


def _masked_tokens(x, mask):
  """x: [..., in] -> ([tokens, in] with padding rows zeroed, number of real tokens)."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if mask is None:
    return x2, jnp.asarray(x2.shape[0], jnp.float32)
  m = mask.reshape(-1).astype(jnp.float32)
  return x2 * m[:, None], m.sum()


def _xtx(x, mask):
  x2, n = _masked_tokens(x, mask)
  return jnp.matmul(x2.T, x2, precision=HIGHEST), n


def _check(state: HessianState, x, mask) -> None:
  k = state.xtx.shape[0]
  if x.shape[-1] != k:
    raise ValueError(f"inputs have {x.shape[-1]} features, the Hessian state has {k}")
  if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
    raise ValueError(f"mask shape {tuple(mask.shape)} must equal the inputs' leading shape "
                     f"{tuple(x.shape[:-1])}")


@functools.partial(jax.jit, donate_argnums=0)
def _update(state: HessianState, x, mask):
  xtx, n = _xtx(x, mask)
  return HessianState(xtx=state.xtx + xtx, count=state.count + n)


def update(state: HessianState, x, mask=None) -> HessianState:
  """Add the tokens of ``x: [..., in]`` (``mask: [...]``, 1 = real token, 0 = padding).

  The state is donated: do not use the argument after the call.
  """
  _check(state, x, mask)
  return _update(state, x, mask)


def _pad_batch(x, mask, multiple: int):
  """Pad the leading axis to a multiple of the device count with masked-out rows."""
  if mask is None:
    mask = jnp.ones(x.shape[:-1], jnp.float32)
  extra = (-x.shape[0]) % multiple
  if extra:
    x = jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))
    mask = jnp.pad(mask, [(0, extra)] + [(0, 0)] * (mask.ndim - 1))
  return x, mask


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name"), donate_argnums=0)
def _update_sharded(state, x, mask, mesh: Mesh, axis_name: str):
  def local(x, mask):
    xtx, n = _xtx(x, mask)
    return jax.lax.psum(xtx, axis_name), jax.lax.psum(n, axis_name)

  xtx, n = jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                         out_specs=(P(), P()))(x, mask)
  return HessianState(xtx=state.xtx + xtx, count=state.count + n)


def update_sharded(state: HessianState, x, mask=None, *, mesh: Mesh,
                   axis_name: str = "data") -> HessianState:
  """``update`` with the batch (axis 0 of ``x``) split over ``mesh``'s ``axis_name`` devices.

  Any batch size works: the batch is padded with masked-out rows to a multiple of the axis size.
  """
  _check(state, x, mask)
  x, mask = _pad_batch(jnp.asarray(x), None if mask is None else jnp.asarray(mask),
                       mesh.shape[axis_name])
  batch_sharded = NamedSharding(mesh, P(axis_name))
  x, mask = jax.device_put(x, batch_sharded), jax.device_put(mask, batch_sharded)
  return _update_sharded(state, x, mask, mesh, axis_name)


def finalize(state: HessianState) -> jax.Array:
  """``H = 2 / n * X^T X`` ``[in, in]``; raises if no token was seen (nothing to calibrate on)."""
  n = float(np.asarray(state.count))
  if n <= 0:
    raise ValueError("the Hessian saw no calibration tokens (all inputs masked or none given); "
                     "check the calibration batches and their attention masks")
  return state.xtx * (2.0 / n)


# --- GPTAQ's cross-term ------------------------------------------------------------------------
# GPTAQ (core/gptaq.py) needs, beside H, ``dXXT = (2 / n) (X_float - X)^T X``: the same tokens seen
# by the float model (X_float, the layer's input when every earlier layer is float) and by the
# partly quantized one (X). Both statistics use the same count, so their common scale cancels.


@struct.dataclass
class CrossState:
  xtx: jax.Array  # [in, in] float32, sum over tokens of x x^T (the quantized stream)
  dxxt: jax.Array  # [in, in] float32, sum over tokens of (x_float - x) x^T
  count: jax.Array  # [] float32


def cross_init(in_features: int) -> CrossState:
  z = lambda: jnp.zeros((in_features, in_features), jnp.float32)  # two buffers (both donated)
  return CrossState(xtx=z(), dxxt=z(), count=jnp.zeros((), jnp.float32))


def _xtx_and_cross(x, x_float, mask):
  """(X^T X, (X_float - X)^T X, n) for one batch, padding masked out of both streams."""
  x2, n = _masked_tokens(x, mask)
  xf2, _ = _masked_tokens(x_float, mask)
  return (jnp.matmul(x2.T, x2, precision=HIGHEST),
          jnp.matmul((xf2 - x2).T, x2, precision=HIGHEST), n)


@functools.partial(jax.jit, donate_argnums=0)
def _cross_update(state: CrossState, x, x_float, mask):
  xtx, dxxt, n = _xtx_and_cross(x, x_float, mask)
  return CrossState(xtx=state.xtx + xtx, dxxt=state.dxxt + dxxt, count=state.count + n)


def cross_update(state: CrossState, x, x_float, mask=None) -> CrossState:
  """Add one batch: ``x`` the layer's inputs in the quantized model, ``x_float`` the same tokens'
  inputs in the float model (both ``[..., in]``). The state is donated."""
  if tuple(x.shape) != tuple(x_float.shape):
    raise ValueError(f"x {tuple(x.shape)} and x_float {tuple(x_float.shape)} must have one shape")
  _check(state, x, mask)
  return _cross_update(state, x, x_float, mask)


def finalize_cross(state: CrossState) -> tuple[jax.Array, jax.Array]:
  """``(H, dXXT)``, both ``2 / n`` times their sums."""
  H = finalize(state)
  return H, state.dxxt * (2.0 / float(np.asarray(state.count)))
