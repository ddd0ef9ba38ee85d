"""``apply_linear``: one entry point for every kind of kernel a Llama projection may hold."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels.prepare import PreparedWeight
from gptq_jax.kernels.quantized_matmul import quantized_matmul

HIGHEST = jax.lax.Precision.HIGHEST


def is_quantized(kernel: Any) -> bool:
  return isinstance(kernel, (PackedWeight, PreparedWeight, QuantizedWeight))


def apply_linear(x: jax.Array, kernel: Any, bias: jax.Array | None = None, *, dtype: Any = None,
                 backend: str | None = "auto") -> jax.Array:
  """``y = x @ kernel + bias`` in ``dtype`` (default ``x.dtype``).

  x: [..., in]; kernel: a dense array [in, out] (dot at HIGHEST precision for float32), a
  ``QuantizedWeight`` (dequantized, then the dense dot), or a ``PackedWeight`` /
  ``PreparedWeight`` (``quantized_matmul`` with ``backend``); bias: [out] or None -> [..., out].
  """
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  x = x.astype(dtype)
  if isinstance(kernel, QuantizedWeight):
    kernel = kernel.dequantize(dtype)
  if isinstance(kernel, (PackedWeight, PreparedWeight)):
    y = quantized_matmul(x, kernel, backend="auto" if backend is None else backend)
  else:
    kernel = jnp.asarray(kernel).astype(dtype)
    precision = HIGHEST if dtype == jnp.float32 else None
    y = jnp.dot(x, kernel, precision=precision)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y
