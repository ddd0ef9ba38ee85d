"""Streaming Hessian of a linear layer's loss: ``H = (2 / n) X^T X`` over all calibration tokens.

The state keeps the raw sum ``X^T X`` and the token count ``n`` in float32; ``finalize`` divides.
Padding tokens are masked out of ``X`` (and of ``n``). GPTQ is invariant to a positive scalar on H
(damping is relative), so counting tokens (GPTQModel) or sequences (the paper) makes no difference.

**The same H however the samples are grouped.** GPTQ's column loop amplifies tiny changes of H:
a float32 sum taken in another order (1e-7 relative) moves about 0.1 % of a layer's codes, and
the changed block outputs move the next blocks' Hessians further (on SmolLM2-135M, 15 % of the
``down_proj`` codes after one block). So the sum is made independent of how the calibration
samples are split into micro-batches, devices and processes: each sample's ``x^T x`` (the unit:
``x[k]`` of a batch ``[b, ..., in]``; a 2-D ``[tokens, in]`` input is one unit) is computed on
its own, always with the same shapes, and added to a compensated sum (``xtx`` plus its rounding
error ``err``, Knuth's two-sum: about 48 bits). Sums held by several devices are combined
exactly enough (``psum_compensated``: each device's part split on a common power-of-two grid, so
the leading parts add exactly in any order). The float32 H therefore equals the correctly
rounded sum of the samples' products, except where it falls within about 2^-40 of a rounding
tie.

``update`` is jitted with the state donated, so the ``[in, in]`` buffers are reused in place.
``update_sharded`` does the same with the batch sharded over a data axis of a device mesh
(``jax.shard_map``): each device sums its own samples and ``psum_compensated`` combines them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class HessianState:
  xtx: jax.Array  # [in, in] float32, sum over tokens of x x^T (the leading part)
  count: jax.Array  # [] float32, number of (unmasked) tokens
  err: jax.Array  # [in, in] float32, the rounding error of ``xtx`` (compensated summation)


def _zeros(in_features: int) -> jax.Array:
  return jnp.zeros((in_features, in_features), jnp.float32)


def init(in_features: int) -> HessianState:
  return HessianState(xtx=_zeros(in_features), count=jnp.zeros((), jnp.float32),
                      err=_zeros(in_features))


def two_sum(a, b):
  """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _units(x, mask):
  """x: [..., in] -> ([units, tokens, in] float32 with padding zeroed, [units, tokens] mask)."""
  x = jnp.asarray(x).astype(jnp.float32)
  if x.ndim <= 2:  # one unit
    x = x.reshape((1, -1, x.shape[-1]))
  else:
    x = x.reshape((x.shape[0], -1, x.shape[-1]))
  m = (jnp.ones(x.shape[:2], jnp.float32) if mask is None
       else jnp.asarray(mask).reshape(x.shape[:2]).astype(jnp.float32))
  return x * m[..., None], m


def add_products(sums, x, mask, y=None):
  """Add each unit's ``x^T x`` (and, with ``y``, ``(y - x)^T x``) to compensated sums.

  ``sums``: ``((xtx, err), ...)`` pairs, one per product; -> (the new pairs, tokens added).
  A pure function (no jit): the pipeline calls it inside its own compiled steps.
  """
  xs, m = _units(x, mask)
  carry_in = [xs]
  if y is not None:
    carry_in.append(_units(y, mask)[0])

  def body(carry, unit):
    xk = unit[0]
    prods = [jnp.matmul(xk.T, xk, precision=HIGHEST)]
    if y is not None:
      prods.append(jnp.matmul((unit[1] - xk).T, xk, precision=HIGHEST))
    out = []
    for (hi, lo), p in zip(carry, prods):
      s, e = two_sum(hi, p)
      out.append((s, lo + e))
    return tuple(out), None

  sums, _ = jax.lax.scan(body, varying_like(tuple(sums), xs), tuple(carry_in))
  return sums, m.sum()


def varying_like(tree, x):
  """``tree`` marked as varying over the mesh axes ``x`` varies over (inside ``shard_map``: a scan
  carry starting from zeros must have the type of what the body makes of ``x``)."""
  varying = lambda a: getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying",
                              frozenset())
  axes = varying(x)

  def one(a):
    missing = tuple(sorted(axes - varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(one, tree) if axes else tree


def psum_compensated(hi, lo, axis_name: str):
  """``sum over axis_name`` of the compensated sums ``(hi, lo)`` inside ``shard_map``, to about
  ``2^-44`` relative whatever the order: each ``hi`` is split on a power-of-two grid common to all
  devices, whose leading parts add exactly; only the small remainders round."""
  n = jax.lax.axis_size(axis_name)
  if n == 1:
    return hi, lo
  k = math.ceil(math.log2(n)) + 1
  _, e = jnp.frexp(jax.lax.pmax(jnp.abs(hi), axis_name))  # max |hi| < 2^e
  sigma = jnp.ldexp(jnp.ones_like(hi), e + k)
  q = (sigma + hi) - sigma  # hi on the grid of sigma's ulp: exact sums of n of them
  r = hi - q  # exact
  s, err = two_sum(jax.lax.psum(q, axis_name), jax.lax.psum(r + lo, axis_name))
  return s, err


def _add(state: HessianState, xtx, err, count) -> HessianState:
  s, e = two_sum(state.xtx, xtx)
  return HessianState(xtx=s, count=state.count + count, err=state.err + (err + e))


def _check(state: HessianState, x, mask) -> None:
  k = state.xtx.shape[0]
  if x.shape[-1] != k:
    raise ValueError(f"inputs have {x.shape[-1]} features, the Hessian state has {k}")
  if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
    raise ValueError(f"mask shape {tuple(mask.shape)} must equal the inputs' leading shape "
                     f"{tuple(x.shape[:-1])}")


def add(state: HessianState, x, mask=None) -> HessianState:
  """``update`` as a pure function (no jit, no checks), for use inside compiled steps."""
  ((xtx, err),), n = add_products([(state.xtx, state.err)], x, mask)
  return HessianState(xtx=xtx, count=state.count + n, err=err)


_update = jax.jit(add, donate_argnums=0)


def update(state: HessianState, x, mask=None) -> HessianState:
  """Add the tokens of ``x: [..., in]`` (``mask: [...]``, 1 = real token, 0 = padding).

  ``x[k]`` of an input with 3 or more axes is one sample (its ``x^T x`` computed alone); a 2-D
  input is one sample. The state is donated: do not use the argument after the call.
  """
  x = jnp.asarray(x)
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
    z = _zeros(x.shape[-1])
    ((xtx, err),), n = add_products([(z, z)], x, mask)
    return (*psum_compensated(xtx, err, axis_name), jax.lax.psum(n, axis_name))

  xtx, err, n = jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                              out_specs=(P(), P(), P()))(x, mask)
  return _add(state, xtx, err, n)


def update_sharded(state: HessianState, x, mask=None, *, mesh: Mesh,
                   axis_name: str = "data") -> HessianState:
  """``update`` with the batch (axis 0 of ``x``, its samples) split over ``mesh``'s ``axis_name``
  devices. Any batch size works: the batch is padded with masked-out rows to a multiple of the
  axis size. The result equals ``update``'s (see the module docstring).
  """
  x = jnp.asarray(x)
  _check(state, x, mask)
  if x.ndim == 2:  # one sample: it stays whole on one device
    x, mask = x[None], None if mask is None else jnp.asarray(mask)[None]
  x, mask = _pad_batch(x, None if mask is None else jnp.asarray(mask), mesh.shape[axis_name])
  batch_sharded = NamedSharding(mesh, P(axis_name))
  x, mask = jax.device_put(x, batch_sharded), jax.device_put(mask, batch_sharded)
  return _update_sharded(state, x, mask, mesh, axis_name)


def _total(hi, lo) -> jax.Array:
  return hi + lo


def _count(state: HessianState) -> float:
  n = float(np.asarray(state.count))
  if n <= 0:
    raise ValueError("the Hessian saw no calibration tokens (all inputs masked or none given); "
                     "check the calibration batches and their attention masks")
  return n


def finalize(state: HessianState) -> jax.Array:
  """``H = 2 / n * X^T X`` ``[in, in]``; raises if no token was seen (nothing to calibrate on)."""
  return _total(state.xtx, state.err) * (2.0 / _count(state))


# (hi + lo) * scale written into hi's buffer: no [in, in] temporary beside the two sums
_scaled_total = jax.jit(lambda hi, lo, scale: (hi + lo) * scale, donate_argnums=0)


def finalize_consumed(state: HessianState) -> jax.Array:
  """``finalize`` for a state used for the last time: H is written over its ``xtx`` buffer (the
  state must not be used after the call), so making H holds no third [in, in] array (the
  down projection's is 121 MiB at 5632 inputs). Equal to ``finalize(state)``."""
  scale = jnp.float32(2.0 / _count(state))
  return _scaled_total(state.xtx, state.err, scale)


# --- GPTAQ's cross-term ------------------------------------------------------------------------
# GPTAQ (core/gptaq.py) needs, beside H, ``dXXT = (2 / n) (X_float - X)^T X``: the same tokens seen
# by the float model (X_float, the layer's input when every earlier layer is float) and by the
# partly quantized one (X). Both statistics use the same count, so their common scale cancels.


@struct.dataclass
class CrossState:
  xtx: jax.Array  # [in, in] float32, sum over tokens of x x^T (the quantized stream)
  dxxt: jax.Array  # [in, in] float32, sum over tokens of (x_float - x) x^T
  count: jax.Array  # [] float32
  xtx_err: jax.Array  # [in, in] float32: the rounding errors of the two sums
  dxxt_err: jax.Array


def cross_init(in_features: int) -> CrossState:
  z = _zeros  # four buffers (all donated)
  return CrossState(xtx=z(in_features), dxxt=z(in_features), count=jnp.zeros((), jnp.float32),
                    xtx_err=z(in_features), dxxt_err=z(in_features))


def cross_add(state: CrossState, x, x_float, mask=None) -> CrossState:
  """``cross_update`` as a pure function (no jit, no checks)."""
  ((xtx, xe), (dxxt, de)), n = add_products(
      [(state.xtx, state.xtx_err), (state.dxxt, state.dxxt_err)], x, mask, x_float)
  return CrossState(xtx=xtx, dxxt=dxxt, count=state.count + n, xtx_err=xe, dxxt_err=de)


_cross_update = jax.jit(cross_add, donate_argnums=0)


def cross_update(state: CrossState, x, x_float, mask=None) -> CrossState:
  """Add one batch: ``x`` the layer's inputs in the quantized model, ``x_float`` the same tokens'
  inputs in the float model (both ``[..., in]``; samples as in ``update``). The state is
  donated."""
  x, x_float = jnp.asarray(x), jnp.asarray(x_float)
  if tuple(x.shape) != tuple(x_float.shape):
    raise ValueError(f"x {tuple(x.shape)} and x_float {tuple(x_float.shape)} must have one shape")
  _check(state, x, mask)
  return _cross_update(state, x, x_float, mask)


def finalize_cross(state: CrossState) -> tuple[jax.Array, jax.Array]:
  """``(H, dXXT)``, both ``2 / n`` times their sums."""
  H = finalize(HessianState(xtx=state.xtx, count=state.count, err=state.xtx_err))
  return H, _total(state.dxxt, state.dxxt_err) * (2.0 / float(np.asarray(state.count)))


def psum_state(state, axis_name: str):
  """A ``HessianState`` or ``CrossState`` summed over ``axis_name`` inside ``shard_map`` (each
  device held the sums of its own samples): ``psum_compensated`` on each sum."""
  count = jax.lax.psum(state.count, axis_name)
  if isinstance(state, CrossState):
    xtx, xe = psum_compensated(state.xtx, state.xtx_err, axis_name)
    dxxt, de = psum_compensated(state.dxxt, state.dxxt_err, axis_name)
    return CrossState(xtx=xtx, dxxt=dxxt, count=count, xtx_err=xe, dxxt_err=de)
  xtx, err = psum_compensated(state.xtx, state.err, axis_name)
  return HessianState(xtx=xtx, count=count, err=err)
