"""Test weights for the kernel tests: random codes, scales and zero points, packed as GPTQ does."""

from __future__ import annotations

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax import GPTQConfig, QuantizedWeight, rtn_quantize
# The module (its name is shadowed by the function in gptq_jax.kernels' namespace).
qm = importlib.import_module("gptq_jax.kernels.quantized_matmul")


def make_quantized(k: int, n: int, bits: int, group_size: int, *, act_order: bool = False,
                   sym: bool = False, seed: int = 0, scales_dtype=jnp.float32) -> QuantizedWeight:
  """Random codes / scales / zero points; act-order gives g_idx = rank(row) // group_size for a
  random row ranking (the non-monotone g_idx of desc_act). Zero points are >= 1 (v1-storable)."""
  rng = np.random.default_rng(seed)
  gs = k if group_size == -1 else group_size
  groups = -(-k // gs)
  codes = rng.integers(0, 2**bits, (k, n)).astype(np.uint8)
  scales = (0.01 + rng.random((groups, n))).astype(np.float32)
  if sym:
    zeros = np.full((groups, n), 2**(bits - 1), np.int32)
  else:
    zeros = rng.integers(1, 2**bits, (groups, n)).astype(np.int32)
  if act_order:
    rank = np.argsort(rng.permutation(k))
    g_idx = (rank // gs).astype(np.int32)
  else:
    g_idx = (np.arange(k) // gs).astype(np.int32)
  return QuantizedWeight(codes=jnp.asarray(codes), scales=jnp.asarray(scales, scales_dtype),
                         zeros=jnp.asarray(zeros), g_idx=jnp.asarray(g_idx), bits=bits,
                         group_size=group_size)


def make_rtn(k: int, n: int, bits: int, group_size: int, seed: int = 0) -> QuantizedWeight:
  kernel = jax.random.normal(jax.random.key(seed), (k, n)) * 0.05
  return rtn_quantize(kernel, GPTQConfig(bits, group_size=group_size, sym=False, format="gptq_v2"))


def make_x(shape, dtype=jnp.float32, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def assert_matmul_close(y, x, w_dense, *, rtol: float | None = None):
  """``y`` equals ``x @ w_dense`` up to the rounding of ``y``'s dtype, scaled per output element by
  ``|x| @ |w|`` (the size of the terms summed, so cancellation does not hide errors)."""
  x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  w64 = np.asarray(w_dense, np.float64)
  want = x32 @ w64
  scale = np.abs(x32) @ np.abs(w64) + 1e-30
  if rtol is None:
    rtol = 2e-6 if jnp.dtype(y.dtype) == jnp.float32 else 2e-2
  err = np.abs(np.asarray(jnp.asarray(y, jnp.float32), np.float64) - want) / scale
  assert y.shape == want.shape, (y.shape, want.shape)
  assert err.max() <= rtol, f"max scaled error {err.max():.3g} > {rtol:g}"


class LogCapture(logging.Handler):
  """Collects gptq_jax log messages (and forgets the once-only memory, so each test sees its own)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    self.messages = []
    qm._logged.clear()
    log = logging.getLogger("gptq_jax")
    self._level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(self)
    return self

  def __exit__(self, *exc):
    log = logging.getLogger("gptq_jax")
    log.removeHandler(self)
    log.setLevel(self._level)
    qm._logged.clear()
