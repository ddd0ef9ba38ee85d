"""Unpack -> dequantize -> dot: the oracle every kernel is tested against, and the XLA path.

* ``reference_matmul``: the oracle, written for clarity: ``x @ w.dequantize()`` in float32 at
  HIGHEST precision, cast to ``x.dtype``.
* ``xla_matmul``: the XLA path, for weights whose groups are contiguous (natural ``g_idx``, or a
  ``PreparedWeight``). It unpacks chunk by chunk with shifts and masks per word row (the layout of
  ``layout.py``), never an interleaving gather, and never a dequantized copy of the whole weight
  on CPU: there a ``scan`` over K-chunks keeps each chunk's dequantized tile small and hot in cache
  (whole-weight float temporaries cost more than the dot on a CPU). On TPU / GPU the chunks are
  dequantized in one fused elementwise op in the compute dtype and fed to a single dot.
* ``gather_matmul``: any ``g_idx`` (act-order without ``prepare_for_kernel``): scales gathered per
  row, then a dot. Correct, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.packing import run_shape
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.kernels import layout
from gptq_jax.kernels.prepare import PreparedWeight

HIGHEST = lax.Precision.HIGHEST
XLA_CHUNK = 256  # K-rows dequantized per scan step on CPU (fits in L2 with N ~ 10k in float32)


def reference_matmul(x: jax.Array, w: PackedWeight | QuantizedWeight | PreparedWeight) -> jax.Array:
  """The oracle: ``x [..., K] @ w.dequantize() [K, N] -> [..., N]`` in ``x.dtype``."""
  y = jnp.matmul(x.astype(jnp.float32), w.dequantize(jnp.float32), precision=HIGHEST)
  return y.astype(x.dtype)


def gather_matmul(x: jax.Array, w: PackedWeight) -> jax.Array:
  """``x [M, K] @ w.dequantize()`` for any ``g_idx``, in float32 -> ``[M, N]`` float32."""
  dt = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  return jnp.dot(x.astype(dt), w.dequantize(dt), precision=_precision(dt),
                 preferred_element_type=jnp.float32)


def xla_chunk_size(in_features: int, group_size: int, bits: int, target: int = XLA_CHUNK) -> int | None:
  """The K-chunk of the XLA path: the largest legal divisor of K up to ``target`` (else the
  smallest above it), or None when groups cannot be expanded per run (``group_size`` not a
  multiple of the values per run, e.g. 3-bit with group 16)."""
  nvals, _ = run_shape(bits)
  gs = layout.effective_group_size(group_size, in_features)
  if gs % nvals:
    return None
  legal = [c for c in range(nvals, in_features + 1, nvals)
           if in_features % c == 0 and layout.groups_per_chunk(c, gs) is not None]
  small = [c for c in legal if c <= target]
  return max(small) if small else (min(legal) if legal else None)


def _precision(dtype):
  return HIGHEST if dtype == jnp.float32 else None


def _chunks(w: PreparedWeight, bkc: int):
  """Per-chunk views: words [nch, rc * nwords, N], scales / zeros [G / gc, gc, 1, N], gc, gs."""
  k, n = w.shape
  nvals, nwords = run_shape(w.bits)
  gs = layout.effective_group_size(w.group_size, k)
  gc = layout.groups_per_chunk(bkc, gs)
  words = w.qweight.reshape(k // bkc, bkc // nvals * nwords, n)
  return words, layout.arrange_groups(w.scales, gc), layout.arrange_groups(w.zeros, gc), gc, gs


def _xla_scan(x: jax.Array, w: PreparedWeight, bkc: int) -> jax.Array:
  """CPU: ``scan`` over K-chunks, float32 throughout. x [M, K] -> [M, N] float32."""
  words, s4, z4, gc, gs = _chunks(w, bkc)
  xs = layout.arrange_x(x.astype(jnp.float32), bkc, w.bits)  # [nch, M, bkc]

  def step(acc, inp):
    words_c, x_c, c = inp  # [rc * nwords, N], [M, bkc], []
    row = layout.group_row(c, bkc, gs, gc)
    w_c = layout.dequantize_chunk(words_c, s4[row], z4[row], w.bits)  # [bkc, N]
    return acc + jnp.dot(x_c, w_c, precision=HIGHEST), None

  acc0 = jnp.zeros((x.shape[0], w.out_features), jnp.float32)
  acc, _ = lax.scan(step, acc0, (words, xs, jnp.arange(words.shape[0])))
  return acc


def _xla_fused(x: jax.Array, w: PreparedWeight, bkc: int) -> jax.Array:
  """TPU / GPU: all chunks dequantized in the compute dtype, one dot. -> [M, N] float32."""
  words, s4, z4, gc, gs = _chunks(w, bkc)
  nch = words.shape[0]
  rows = layout.group_row(jnp.arange(nch), bkc, gs, gc)
  dt = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  deq = jax.vmap(lambda wc, s, z: layout.dequantize_chunk(wc, s, z, w.bits).astype(dt))
  w_all = deq(words, s4[rows], z4[rows]).reshape(w.in_features, w.out_features)  # value-major
  xs = layout.arrange_x(x.astype(dt), bkc, w.bits)  # [nch, M, bkc]
  x_perm = xs.transpose(1, 0, 2).reshape(x.shape[0], w.in_features)
  return jnp.dot(x_perm, w_all, precision=_precision(dt), preferred_element_type=jnp.float32)


def xla_matmul(x: jax.Array, w: PreparedWeight) -> jax.Array:
  """``x [M, K]`` (already in ``w``'s row order) ``@ w`` -> ``[M, N]`` float32.

  ``w`` must have contiguous groups (its ``perm`` already applied to ``x``) and a chunking
  (``xla_chunk_size`` not None); the caller falls back to ``gather_matmul`` otherwise.
  """
  bkc = xla_chunk_size(w.in_features, w.group_size, w.bits)
  if bkc is None:
    raise ValueError(f"no XLA chunking for in_features={w.in_features}, group_size="
                     f"{w.group_size}, bits={w.bits}: use gather_matmul")
  return lax.platform_dependent(
      x, w, cpu=lambda x, w: _xla_scan(x, w, bkc), default=lambda x, w: _xla_fused(x, w, bkc))
