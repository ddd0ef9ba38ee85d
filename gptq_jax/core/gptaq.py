"""GPTAQ's correction for asymmetric calibration (Li et al., 2025, https://arxiv.org/abs/2504.02692).

GPTQ quantizes a layer against its inputs ``X`` in the partly quantized model; the float model
would have fed it ``X_float``. GPTAQ minimises ``||X_float W - X Q||`` instead of ``||X (W - Q)||``,
which adds one statistic beside ``H = X^T X``: the cross-term ``dXXT = (X_float - X)^T X``
(accumulated like H, at the same scale: ``core/hessian.py``). With ``U`` the upper Cholesky
factor of ``H^-1`` (``H^-1 = U^T U``) in the solver's column order, the correction matrix is

    P = alpha * triu(dXXT @ U^T, 1) @ U            (strictly upper triangular, [in, in])

and GPTQ's column loop (``core/gptq.py``) adds ``w_i P[i, j]`` to each later column ``j`` next to
its usual ``-err_i U[i, j]``. ``alpha`` (0.25 in GPTQModel's ``GPTAQConfig``) damps the correction;
``alpha = 0`` is plain GPTQ. A positive scalar on both H and dXXT leaves P unchanged (U scales by
its inverse square root), so tokens or sequences may be counted, as long as both agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def correction(dXXT, U, alpha):
  """``P = alpha * triu(dXXT @ U^T, 1) @ U`` for the permuted, dead-column-fixed ``dXXT`` and the
  inverse-Hessian factor ``U`` (both ``[in, in]``, the same column order)."""
  dXXT = dXXT.astype(jnp.float32)
  T = jnp.triu(jnp.matmul(dXXT, U.T, precision=HIGHEST), 1)
  return jnp.asarray(alpha, jnp.float32) * jnp.matmul(T, U, precision=HIGHEST)


def check_cross(cfg, cross, hessian, name: str = "layer"):
  """``cross`` as an array when ``cfg.gptaq`` (it must then be given, shaped like ``hessian``),
  else None (plain GPTQ ignores it)."""
  if not getattr(cfg, "gptaq", False):
    return None
  if cross is None:
    raise ValueError(f"GPTQ {name}: cfg.gptaq=True needs the cross-term cross=(X_float - X)^T X "
                     "(hessian.CrossState / the driver's GPTAQ capture)")
  cross = jnp.asarray(cross)
  if cross.shape != hessian.shape:
    raise ValueError(f"cross must be [in, in] = {tuple(hessian.shape)}, got {cross.shape}")
  return cross


def permute(dXXT, dead, perm):
  """``dXXT`` in the solver's column order, dead columns zeroed (their X is 0 anyway)."""
  return jnp.where(dead[None, :], 0.0, dXXT.astype(jnp.float32))[perm][:, perm]


# The column loop's GPTAQ steps (``core/gptq.py``'s ``_gptq_blocks``, traced inside it). Column ``i``
# adds ``w_i P[i, j]`` to every later column ``j``: inside a block ``w_i`` is the column's working
# value before it is quantized, in the lazy update it is the quantized value (as GPTAQ's published
# update and GPTQModel do). ``extra = (w, dq)`` records both for the sub-block's columns.
def column_step(Ws, P_i, w, dq, extra, i):
  """One column inside a sub-block: ``Ws [sub, rows] += P_i[:, None] w`` (``P_i [sub]`` is zero up
  to column ``i``, so earlier columns are unchanged); record ``w`` and ``dq`` at ``i``."""
  return Ws + P_i[:, None] * w[None, :], (extra[0].at[i].set(w), extra[1].at[i].set(dq))


def subblock_step(W1, P1, k1, extra, D1):
  """After the sub-block at ``k1``: carry its recorded ``w`` to the rest of the block ``W1 [B,
  rows]`` through ``P1 [B, B]``; store its quantized values in ``D1 [B, rows]``."""
  sub, B = extra[0].shape[0], W1.shape[0]
  Prow = jax.lax.dynamic_slice(P1, (k1, 0), (sub, B))
  W1 = W1 + jnp.matmul(Prow.T, extra[0], precision=HIGHEST)
  return W1, jax.lax.dynamic_update_slice(D1, extra[1], (k1, 0))


def lazy_step(Wc, Pp, i1, j, D1):
  """The lazy update's GPTAQ term for the columns at ``j``: ``+ P[i1:i1+B, j:j+B]^T D1``."""
  B = D1.shape[0]
  return Wc + jnp.matmul(jax.lax.dynamic_slice(Pp, (i1, j), (B, B)).T, D1, precision=HIGHEST)

