"""The inverse-Hessian factor of GPTQ: ``U`` with ``(H + damp I)^-1 = U^T U`` (U upper triangular).

One Cholesky factorization of the index-reversed damped H and one triangular inverse (recursive
2x2 blocking, matmuls), with automatic damping escalation (``factorize``). LAPACK runs with one
BLAS thread on CPU (``_lapack_single_threaded``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gptq_jax.config import GPTQConfig

HIGHEST = jax.lax.Precision.HIGHEST
_TRI_LEAF = 512  # triangular inverses up to this size use one triangular solve


def _upper_inverse(R):
  """``R^-1`` for an upper-triangular ``R`` ``[n, n]``, by recursive 2x2 blocking:
  ``[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]`` (matmuls: ~n^3/3 multiply-adds)."""
  n = R.shape[0]
  if n <= _TRI_LEAF:
    return jax.lax.linalg.triangular_solve(R, jnp.eye(n, dtype=R.dtype), left_side=True,
                                           lower=False)
  h = (n // 2 + 127) // 128 * 128
  Ai, Ci = _upper_inverse(R[:h, :h]), _upper_inverse(R[h:, h:])
  X = -jnp.matmul(jnp.matmul(Ai, R[:h, h:], precision=HIGHEST), Ci, precision=HIGHEST)
  return jnp.block([[Ai, X], [jnp.zeros((n - h, h), R.dtype), Ci]])


def _inverse_factor_impl(H, damp):
  """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (H^-1 = U^T U); NaN if not PD.

  The references factorize, invert and factorize again. With ``Hd = R R^T``, ``R`` upper
  triangular (the lower Cholesky factor of the index-reversed ``Hd``, reversed), ``Hd^-1 =
  (R^-1)^T R^-1``, so ``U = R^-1``: one factorization and one triangular inverse (~4x fewer flops).
  """
  n = H.shape[0]
  Hd = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=H.dtype)
  R = jnp.linalg.cholesky(Hd[::-1, ::-1], symmetrize_input=False)[::-1, ::-1]
  U = _upper_inverse(R)
  return U, jnp.all(jnp.isfinite(U))


_inverse_factor = jax.jit(_inverse_factor_impl)
_inverse_factor_donated = jax.jit(_inverse_factor_impl, donate_argnums=0)


_lapack_loaded = False


def _lapack_single_threaded():
  """On CPU, XLA runs Cholesky and triangular solves through OpenBLAS's LAPACK, whose worker
  threads spin against XLA's own pool: a 576x576 factorization then takes anywhere from 7 ms to
  0.5 s (measured on 2 cores). One BLAS thread makes it steady (and no slower at 4096).

  jaxlib loads that OpenBLAS at the process's first decomposition, and threadpoolctl only limits
  libraries already loaded: a tiny Cholesky first, or the first layer of a process would run with
  every thread and round differently from the rest (same inputs, different codes).
  """
  global _lapack_loaded
  if jax.default_backend() != "cpu":
    return contextlib.nullcontext()
  import threadpoolctl  # a dependency; imported here so accelerator hosts never load it

  if not _lapack_loaded:
    jax.block_until_ready(jnp.linalg.cholesky(jnp.eye(2, dtype=jnp.float32)))
    _lapack_loaded = True
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def factorize(Hp, cfg: GPTQConfig, name: str = "layer", rebuild: Callable[[], Any] | None = None):
  """U for the first damping in ``damp_percent + j * damp_auto_increment < 1`` that works.

  With ``rebuild`` (a function that makes ``Hp`` again), ``Hp`` is donated to the factorization
  (its ``[n, n]`` buffer reused: one fewer alive at the peak; the caller must not use it after)
  and made again by ``rebuild()`` only when a larger damping has to be tried.
  Returns ``(U, damp)``, or ``(None, damp)`` when every damping failed.
  """
  damp = cfg.damp_percent
  while True:
    with _lapack_single_threaded():
      if rebuild is None:
        U, ok = _inverse_factor(Hp, jnp.float32(damp))
      else:
        U, ok = _inverse_factor_donated(Hp if Hp is not None else rebuild(), jnp.float32(damp))
        Hp = None
      ok = bool(ok)  # waits for the factorization inside the thread limit
    if ok:
      if damp != cfg.damp_percent:
        warnings.warn(f"GPTQ {name}: the Hessian was not positive definite at damp_percent="
                      f"{cfg.damp_percent}; succeeded with damp_percent={damp:.5f}", UserWarning,
                      stacklevel=3)
      return U, damp
    nxt = damp + cfg.damp_auto_increment
    if cfg.damp_auto_increment == 0 or nxt >= 1:
      return None, damp
    damp = nxt
