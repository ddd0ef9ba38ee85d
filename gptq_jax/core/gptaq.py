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


def quantize_weight(kernel, hessian, cross, cfg, **kwargs):
  """GPTAQ for one linear: ``core.gptq.quantize_weight`` with ``cfg.gptaq`` set and ``cross``."""
  from gptq_jax.core import gptq  # noqa: PLC0415 (gptq imports this module)

  if not cfg.gptaq:
    cfg = cfg.replace(gptaq=True)
  return gptq.quantize_weight(kernel, hessian, cfg, cross=cross, **kwargs)
