"""The uniform quantization grid of GPTQ: fit scale / zero per row and group, quantize, RTN.

Numerics follow the reference ``Quantizer.find_params`` / ``quantize`` exactly:
``xmin = min(x.min(), 0)``, ``xmax = max(x.max(), 0)``; symmetric grids use ``xmax = max(|xmin|,
xmax)`` and, where ``xmin < 0``, ``xmin = -xmax`` (a row with no negative value keeps ``xmin = 0``,
as in the reference); an all-zero row gets ``[-1, 1]``; ``scale = (xmax - xmin) / maxq``; the zero is
``(maxq + 1) / 2`` (sym) or ``round(-xmin / scale)`` (asym); ``q = clamp(round(x / scale) + zero, 0,
maxq)``, rounding half to even. The optional clipping search (reference ``mse``) shrinks the range
by ``p = 1 - i / grid`` for ``i < maxshrink * grid`` and keeps, per row, the first candidate with the
lowest ``sum |dequant(q) - x| ** norm``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GRID = 100
MAXSHRINK = 0.8


def true_divide(a, b):
  """``a / b`` rounded as IEEE division, like the references.

  XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which
  rounds differently in the last bit and can move a code across a rounding boundary. Materialising
  the broadcast behind an optimisation barrier keeps the true division. Under ``jax.vmap`` (experts
  solved together, core/batched.py) a divisor that is not batched gets the batch axis broadcast
  outside the barrier; selecting it through an opaque all-true mask shaped like ``a`` makes the
  divisor batched like ``a`` (the same values), so no reciprocal appears there either.
  """
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  b = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), shape))
  keep = jax.lax.optimization_barrier(jnp.ones(shape, bool))
  return a / jnp.where(keep, b, jnp.broadcast_to(a, shape))


def _grid_from_range(xmin, xmax, maxq: int, sym: bool, min_zero: int):
  """scale, zero for ranges that already contain 0 (the reference's last steps)."""
  scale = true_divide(xmax - xmin, maxq)
  if sym:
    zero = jnp.full_like(scale, (maxq + 1) / 2)
  else:
    zero = jnp.clip(jnp.round(true_divide(-xmin, scale)), min_zero, maxq)
  return scale, zero


def quantize_codes(x, scale, zero, maxq: int):
  """Integer codes (as float) ``clamp(round(x / scale) + zero, 0, maxq)``; scale/zero broadcast."""
  return jnp.clip(jnp.round(true_divide(x, scale)) + zero, 0, maxq)


def dequantize_codes(q, scale, zero):
  return scale * (q - zero)


def fake_quantize(x, scale, zero, maxq: int):
  return dequantize_codes(quantize_codes(x, scale, zero, maxq), scale, zero)


def _minmax_range(x, sym: bool):
  zeros = jnp.zeros(x.shape[:-1], x.dtype)
  xmin = jnp.minimum(x.min(axis=-1), zeros)
  xmax = jnp.maximum(x.max(axis=-1), zeros)
  if sym:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  both_zero = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(both_zero, -1.0, xmin)
  xmax = jnp.where(both_zero, 1.0, xmax)
  return xmin, xmax


def fit_grid(x, *, bits: int, sym: bool, min_zero: int = 0, mse: float = 0.0,
             grid: int = GRID, maxshrink: float = MAXSHRINK, weight=None):
  """Fit one grid per row of ``x: [..., n]`` over its last axis -> ``(scale, zero)``, each ``[...]``.

  ``mse > 0`` runs the clipping search with norm exponent ``mse``, vectorised over candidates (in
  batches, so memory stays a few copies of ``x``). ``weight`` (non-negative, broadcastable to
  ``x``) multiplies each element's ``|q - x| ** mse`` in the search; None weighs all alike.
  """
  maxq = 2**bits - 1
  x = x.astype(jnp.float32)
  xmin, xmax = _minmax_range(x, sym)
  scale, zero = _grid_from_range(xmin, xmax, maxq, sym, min_zero)
  if not mse:
    return scale, zero

  shrink = 1.0 - jnp.arange(int(maxshrink * grid), dtype=jnp.float32) / grid  # [ncand]

  def candidate_err(p):
    s, z = _grid_from_range(p * xmin, p * xmax, maxq, sym, min_zero)
    if sym:
      z = zero  # the reference keeps the symmetric zero
    err = jnp.abs(fake_quantize(x, s[..., None], z[..., None], maxq) - x) ** mse
    if weight is not None:
      err = err * weight
    return err.sum(axis=-1)

  errs = jax.lax.map(candidate_err, shrink, batch_size=8)  # [ncand, ...]
  best = jnp.argmin(errs, axis=0)  # first minimum, as the reference's strict '<'
  p = shrink[best]
  s, z = _grid_from_range(p * xmin, p * xmax, maxq, sym, min_zero)
  return s, (zero if sym else z)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "min_zero", "mse"))
def rtn_codes(kernel, *, bits: int, group_size: int, sym: bool, min_zero: int = 0,
              mse: float = 0.0):
  """Round-to-nearest of a Flax kernel ``[in, out]`` with groups along ``in``.

  Returns ``codes [in, out]`` (uint8), ``scales [groups, out]`` (f32), ``zeros [groups, out]``
  (int32), the same grid the GPTQ solver would fit on the untouched weight.
  """
  k_in, n_out = kernel.shape
  gs = k_in if group_size == -1 else group_size
  groups = -(-k_in // gs)
  w = kernel.astype(jnp.float32)
  # Zero rows pad the last group: 0 is always inside the range and quantizes to exactly 0.
  wg = jnp.pad(w, ((0, groups * gs - k_in), (0, 0))).reshape(groups, gs, n_out)
  scale, zero = fit_grid(jnp.swapaxes(wg, 1, 2), bits=bits, sym=sym, min_zero=min_zero,
                         mse=mse)  # [groups, out]
  q = quantize_codes(wg, scale[:, None, :], zero[:, None, :], 2**bits - 1)
  codes = q.reshape(groups * gs, n_out)[:k_in]
  return codes.astype(jnp.uint8), scale, zero.astype(jnp.int32)
