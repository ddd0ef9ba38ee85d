"""``grouped_matmul``: rows sorted by expert times each expert's weight, the MoE layers' product.

``x [rows, in]`` holds the routed tokens sorted by expert (``group_sizes[e]`` contiguous rows for
expert ``e``); ``w`` holds every expert's kernel with a leading expert axis: a dense ``[E, in,
out]`` array, or a ``PackedWeight`` / ``QuantizedWeight`` whose every field has that leading axis
(one GPTQ weight per expert, stacked). Only the rows' own experts are computed.

Two implementations (``impl``):

* ``"ragged_dot"``: ``jax.lax.ragged_dot`` (MaxText's MoE: one grouped matmul; TPUs and GPUs run it
  natively). Packed experts are dequantized (all of them, in the compute dtype) first.
* ``"tiled"``: rows copied into tiles that each belong to one expert (``core/routed.py``), a
  ``lax.scan`` over the tiles doing one product per step with that tile's expert weight (a packed
  expert is dequantized inside the step, one expert at a time); tiles without rows are skipped
  (decoding one token touches only its own experts). XLA:CPU has no grouped matmul: it expands
  ``ragged_dot`` into a dense product per expert, E times the work.

``"auto"`` picks ``ragged_dot`` on TPU / GPU and ``tiled`` elsewhere, and logs the choice once.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.core.routed import from_tiles, tile_layout, to_tiles
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels.prepare import PreparedWeight

IMPLS = ("auto", "ragged_dot", "tiled")
logger = logging.getLogger("gptq_jax")
_logged: set[str] = set()


def is_stacked_quantized(w: Any) -> bool:
  """A quantized weight with a leading expert axis (every expert's GPTQ weight, stacked)."""
  return isinstance(w, (PackedWeight, QuantizedWeight, PreparedWeight)) and (
      jax.tree.leaves(w)[0].ndim == 3)


def expert_weight(w: Any, e: Any) -> Any:
  """Expert ``e``'s kernel ``[in, out]`` (a 2-D quantized weight for a stacked one)."""
  return jax.tree.map(lambda a: a[e], w)


def dense_expert(w: Any, e: Any, dtype: Any) -> jax.Array:
  """Expert ``e``'s kernel as a dense ``[in, out]`` array in ``dtype``."""
  we = expert_weight(w, e)
  return we.dequantize(dtype) if hasattr(we, "dequantize") else we.astype(dtype)


def dense_experts(w: Any, dtype: Any = jnp.float32) -> jax.Array:
  """Every expert's kernel, dense: ``[E, in, out]``."""
  if not hasattr(w, "dequantize"):
    return jnp.asarray(w).astype(dtype)
  return jax.vmap(lambda we: we.dequantize(dtype))(w)


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not allowed: expected one of {IMPLS}")
  if impl != "auto":
    return impl
  chosen = "ragged_dot" if jax.default_backend() in ("tpu", "gpu") else "tiled"
  if chosen not in _logged:
    _logged.add(chosen)
    logger.info("gptq_jax MoE: grouped matmul runs %s (%s)", chosen,
                "native grouped matmul" if chosen == "ragged_dot" else
                "XLA:CPU would expand ragged_dot into a dense product per expert")
  return chosen


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def grouped_matmul(x: jax.Array, w: Any, group_sizes: jax.Array, *, dtype: Any = None,
                   impl: str = "auto") -> jax.Array:
  """``y[r] = x[r] @ w[expert of row r]``: x [rows, in] sorted by expert, group_sizes [E] (sum =
  rows) -> y [rows, out] in ``dtype`` (default ``x.dtype``)."""
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  x = x.astype(dtype)
  if resolve_impl(impl) == "ragged_dot":
    return jax.lax.ragged_dot(x, dense_experts(w, dtype), group_sizes.astype(jnp.int32),
                              precision=_precision(dtype))
  rows = x.shape[0]
  layout = tile_layout(group_sizes, rows)
  tiles = to_tiles(x, layout)
  filled = to_tiles(jnp.ones((rows, 1), jnp.int32), layout)[:, :, 0].sum(axis=1)  # [tiles]
  out = w.scales.shape[-1] if hasattr(w, "scales") else w.shape[-1]

  def step(_, inp):
    xt, g, n = inp
    # zeros for a tile without rows; made like xt so that under shard_map both branches vary
    # over the data axis alike
    y = jax.lax.cond(n > 0,
                     lambda: jnp.dot(xt, dense_expert(w, g, dtype), precision=_precision(dtype)),
                     lambda: jnp.zeros_like(xt, shape=(layout.tile, out)))
    return None, y

  _, y = jax.lax.scan(step, None, (tiles, layout.tile_group, filled))
  return from_tiles(y, layout)
